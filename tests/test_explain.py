"""The attribution actor pool and the study's attribution stage, on a local Ray."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import ray.train
import torch

from study.attribution import Perturbation
from study.attribution.actors import Explanation, FoldModel, explain_cohort
from study.attribution.store import MapStore
from study.config import AttributionConfig
from study.data.cohort import CohortConfig, load_cohort
from study.pipeline import run_study, study_dir
from study.training.checkpoint import Progress, save_checkpoint
from study.training.models import Architecture, BrainCNN
from tests.conftest import cache_for
from tests.test_study import study_config


def random_checkpoint(tmp_path, shape, seed):
    torch.manual_seed(seed)
    model = BrainCNN(Architecture(width=4), shape)
    directory = tmp_path / f"ckpt{seed}"
    directory.mkdir()
    save_checkpoint(directory, model, model.state_dict(), Progress("refit"))
    return ray.train.Checkpoint.from_directory(str(directory))


@pytest.mark.slow
def test_pool_explains_every_subject_once_and_survives_a_killed_actor(tmp_path, cohort_dir, preprocess_config):
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    ids, labels = cohort.ids, cohort.labels
    jobs = [FoldModel(k, random_checkpoint(tmp_path, cache.shape, k), ids[k::2], labels[k::2], cache) for k in (0, 1)]
    methods = ("gradcam", "guided_backprop", "perturbation", "guided_gradcam")
    explanation = Explanation(methods, "true_class", Perturbation(iterations=5), cache.mean_volume())
    store = MapStore(tmp_path / "maps", ids, cache.shape, list(methods))
    killed = []

    def kill_one_actor(n_done):
        if not killed:
            killed.append(n_done)
            ray.kill(ray.get_actor("explainer-0.0"))

    assert explain_cohort(jobs, store, explanation, batch_size=2, actors=2, on_batch=kill_one_actor) == 12
    assert killed
    for method in methods:
        assert store.done(method).all()
        maps = store.read(method)
        assert np.isfinite(maps).all() and (maps >= 0).all()
        if method == "perturbation":  # gradient maps of a random net may be all zero; masks move
            assert (maps.reshape(12, -1).max(1) > 0).all()  # every subject really has a map
    np.testing.assert_allclose(
        store.read("guided_gradcam"), store.read("gradcam") * store.read("guided_backprop"), rtol=0.01, atol=1e-3
    )
    assert explain_cohort(jobs, store, explanation, batch_size=2, actors=2) == 0  # a rerun skips what exists


@pytest.mark.slow
def test_a_failure_in_the_pool_stops_it_and_frees_every_actor(tmp_path, cohort_dir, preprocess_config):
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    jobs = [FoldModel(0, random_checkpoint(tmp_path, cache.shape, 0), cohort.ids, cohort.labels, cache)]
    explanation = Explanation(("gradcam",), "true_class", Perturbation(iterations=5))
    store = MapStore(tmp_path / "maps", cohort.ids, cache.shape, ["gradcam"])

    def fail(n_done):
        raise ConnectionError("the progress callback failed")

    with pytest.raises(ConnectionError):
        explain_cohort(jobs, store, explanation, batch_size=2, actors=2, on_batch=fail)
    for name in ("explainer-0.0", "explainer-1.0"):  # killed, not left holding their CPU or GPU share
        with pytest.raises(ValueError):
            ray.get_actor(name)
    assert store.done("gradcam").sum() == 2  # the batch stored before the failure is kept


def test_store_keeps_finished_batches_only(tmp_path):
    store = MapStore(tmp_path, ["a", "b", "c"], (2, 2, 2), ["gradcam"])
    store.write(["b"], {"gradcam": np.ones((1, 2, 2, 2))})
    again = MapStore(tmp_path, ["a", "b", "c"], (2, 2, 2), ["gradcam"])  # e.g. after a crash
    assert again.missing(["a", "b", "c"]) == ["a", "c"]
    assert again.read("gradcam", ["b"]).sum() == 8


@pytest.mark.slow
def test_maps_of_a_model_that_ignores_its_input_are_flagged(tmp_path, cohort_dir):
    # Its maps are empty and stay empty when its layers are randomized, so the randomization checks pass them;
    # deleting what they mark moves its decision no more than random blobs: the deletion check flags them all.
    config = study_config(tmp_path, cohort_dir, model={"class": "tests.networks:TinyNet", "blind": True})
    config.attribution = AttributionConfig(
        batch_size=8,
        actors=1,
        permutations=10,
        perturbation={"iterations": 5},
        sanity={"subjects": 2, "label_randomization": False},
    )
    parent_id = run_study(config)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(parent_id)
    tags, metrics = run.data.tags, run.data.metrics
    # (the linear baseline's row is judged on its own model, which does look at the images)
    flagged = set(tags["sanity.deletion_flagged"].split(",")) - {"linear_baseline"}
    assert flagged == {"gradcam", "guided_backprop", "perturbation"} and tags["sanity.flagged"] == "none"
    assert metrics["deletion_change_gradcam"] == metrics["deletion_change_random"] == 0, metrics
    changes = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=parent_id, artifact_path="sanity/deletion.tsv", dst_path=str(tmp_path)
        ),
        sep="\t",
    )
    subjects = len(load_cohort(config.cohort).subjects)
    assert (changes.model == "cnn").sum() == 4 * subjects  # every subject: three methods and random
    assert (changes.model == "linear").sum() == 2 * subjects  # the baseline's weights and its own random blobs
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert "Sanity check: deleting what each map marks" in report
    assert (
        "no more surely than random blobs (e.g. of a model that ignores its input): Grad-CAM, Guided Backprop" in report
    )
