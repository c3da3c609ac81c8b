"""The group analysis of a study's maps and what the checkpoint carries: plain functions, no Ray, no study run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study.attribution.analysis import (
    Atlas,
    GroundTruth,
    HeldOut,
    analyse_method,
    baseline_maps,
    methods_with_group_test,
    normalized_maps,
)
from study.attribution.group import normalize
from study.attribution.methods import METHODS
from study.attribution.sanity import RANDOM, deletion_tables
from study.attribution.store import MapStore
from study.training.checkpoint import Progress

CLASSES = ("female", "male")


def planted(subjects: int = 12, seed: int = 0):
    """Maps over a 6x6x6 brain in a 8x8x8 grid, higher for males inside a planted 2x2x2 box; their subjects."""
    rng = np.random.default_rng(seed)
    brain = np.zeros((8, 8, 8), dtype=bool)
    brain[1:7, 1:7, 1:7] = True
    effect = np.zeros_like(brain)
    effect[2:4, 2:4, 2:4] = True
    distractor = np.zeros_like(brain)
    distractor[5:7, 5:7, 5:7] = True
    labels = np.array([0, 1] * (subjects // 2))
    maps = rng.random((subjects, int(brain.sum()))) * 0.5
    maps[:, effect[brain]] += 1.0 + labels[:, None]
    held_out = HeldOut(
        [f"{i:02d}" for i in range(subjects)], labels, np.repeat([0, 1], subjects // 2), np.arange(subjects).astype(str)
    )
    regions = effect.astype(int) + 2 * distractor
    truth = GroundTruth(effect, distractor, regions, {1: "effect", 2: "distractor"})
    return normalize(maps), held_out, brain, truth


def test_a_methods_group_maps_are_its_class_means_pooled_and_per_fold_with_regions_and_localization():
    maps, held_out, brain, truth = planted()
    atlas = Atlas(truth.regions, {1: "amygdala L"})  # label 2 has no name: called by its number
    analysed = analyse_method("gradcam", maps, held_out, CLASSES, brain, None, truth, atlas)
    np.testing.assert_allclose(analysed.group["mean_male"], maps[held_out.labels == 1].mean(0))
    np.testing.assert_allclose(analysed.group["median_female"], np.median(maps[held_out.labels == 0], axis=0))
    assert sorted(analysed.per_fold) == [0, 1] and all(type(fold) is int for fold in analysed.per_fold)
    second = held_out.folds == 1
    np.testing.assert_allclose(analysed.per_fold[1]["mean_all"], maps[second].mean(0))
    assert analysed.regions["planted"].region.tolist() == ["effect", "distractor"]  # ranked by mean attribution
    assert analysed.regions["atlas"].region.tolist() == ["amygdala L", "label 2"]
    assert analysed.localization["roc_auc_group"] == 1.0 and analysed.localization["top1pct_in_effect_group"] == 1.0
    assert analysed.test is None


def test_the_linear_baseline_is_one_map_per_fold_model_and_only_the_contrast_is_tested():
    weights = {0: np.array([1.0, -2.0, 0.5]), 1: np.array([-3.0, 0.0, 3.0])}
    maps = baseline_maps(weights, np.array([1, 0, 1]))
    np.testing.assert_allclose(maps, normalize(np.abs(np.stack([weights[1], weights[0], weights[1]]))))
    assert methods_with_group_test(METHODS, "contrast") == [m for m in METHODS if m != "perturbation"]
    assert methods_with_group_test(METHODS, "true_class") == methods_with_group_test(METHODS, "predicted_class") == []


def test_normalized_maps_are_the_stores_maps_over_the_brain_each_subject_scaled(tmp_path):
    brain = np.zeros((2, 2, 2), dtype=bool)
    brain[0] = True
    store = MapStore(tmp_path, ["a", "b"], (2, 2, 2), ["gradcam"])
    values = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    store.write(["a", "b"], {"gradcam": values})
    (maps,) = normalized_maps(store, ["gradcam"], ["b", "a"], brain).values()
    np.testing.assert_allclose(maps, normalize(values[[1, 0]][:, brain]), rtol=1e-3)


def test_deletion_tables_tag_each_fold_and_judge_each_model_against_its_own_random_blobs():
    def table(method: str, change: float, fold: int, subjects: int = 6) -> pd.DataFrame:
        rows = [
            (f"{fold}-{i}", m, 0.9, c + 0.01 * i) for i in range(subjects) for m, c in ((method, change), (RANDOM, 0.0))
        ]
        return pd.DataFrame(rows, columns=["subject_id", "method", "p_decision", "p_change"])

    cnn = {0: table("gradcam", 0.3, 0), 1: table("gradcam", 0.3, 1)}
    deletion, summary = deletion_tables(cnn, {0: table("linear_baseline", 0.0, 0)})
    assert sorted(set(zip(deletion.fold, deletion.model))) == [(0, "cnn"), (0, "linear"), (1, "cnn")]
    judged = summary.set_index("method")
    assert judged.loc["gradcam", "beats_random"] and not judged.loc["linear_baseline", "beats_random"]
    assert judged.loc["gradcam", "subjects"] == 12  # both folds' held-out subjects
    deletion, summary = deletion_tables(cnn, {})  # a study without the baseline
    assert set(deletion.model) == {"cnn"} and summary.method.tolist() == ["gradcam"]


def test_a_checkpoints_progress_reads_back_and_an_old_refit_not_yet_started_reads_as_none():
    progress = Progress("select", epoch=4, best_epoch=2, best_val_loss=0.31, history=[{"epoch": 0.0}])
    assert Progress.from_dict({**progress.to_dict(), "model": {}, "optimizer": {}}) == progress
    assert progress.next_epoch == 5 and Progress("refit").next_epoch == 0
    # what checkpoints before 2026-12 wrote when a selection ended: the refit's epoch -1
    old = Progress.from_dict({"phase": "refit", "epoch": -1, "refit_epochs": 3, "best_epoch": 2, "history": []})
    assert old.epoch is None and old.next_epoch == 0 and old.refit_epochs == 3
    assert old.best_val_loss == pytest.approx(float("inf"))
