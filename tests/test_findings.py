"""A demo-sized study on a cohort that is hard like real data: the CNN learns, its best map finds the
planted effect, and a model that learned nothing is said to have learned nothing.

The cohort is the generator's default difficulty (effects near the noise, large
nuisance variation, a distractor region), stored at mixed voxel sizes and
orientations. Thresholds come from runs over cohort seeds 21-23 (this file's
``demo_sized`` study), with a margin below the worst seed, so that a correct
pipeline passes every time and a broken one does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from study.data.synth import SyntheticCohort, synthesize_cohort
from study.pipeline import run_study, study_dir
from tests.test_study import study_config

# Measured over cohort seeds 21, 22, 23: CNN pooled ROC AUC 1.000, 0.858, 0.886. The linear baseline's
# weight map localizes the planted effect at voxel AUC 0.978, 0.988, 0.985, with 79%, 60%, 62% of its top 1%
# inside the effect (chance about 1%) and none in the distractor. The CNN's best map (Meaningful Perturbations
# each time, deleting towards the cohort's mean) at voxel AUC 0.949, 0.905, 0.742, with 23, 35 and 26 times
# its chance share of top voxels inside the effect; in the distractor none, 8% (seed 22: replacing the
# distractor by the cohort's mean moves that model's decision 5 times more than a random region of its size,
# 28 times less than the effect) and none.
MIN_CNN_AUC = 0.75
MIN_LOCALIZATION = 0.9  # the linear map's voxel AUC
MIN_CNN_LOCALIZATION = 0.65  # the CNN's best map's voxel AUC
MIN_TOP_SHARE = 10  # the CNN's best map's top 1% inside the effect, in multiples of chance


def demo_sized(tmp_path, root, **changes):
    """The demo's study (6 mm, 3 folds, MriNet width 8, the default recipe) with quick attribution settings."""
    return study_config(
        tmp_path,
        root,
        **{
            "name": "hard",
            "preprocess": {"voxel_size": 6.0},
            "cv": {"outer_folds": 3, "inner_folds": 3},
            "model": {"width": 8},
            "train": {"epochs": 40, "batch_size": 8, "patience": 15},
            "resources": {"concurrent_folds": 2},
            "attribution": {
                "methods": ["gradcam", "guided_backprop", "perturbation"],
                "batch_size": 8,
                "actors": 2,
                "perturbation": {"iterations": 60},
                "permutations": 200,
                "sanity": {"subjects": 2, "label_randomization": False},
            },
            **changes,
        },
    )


@pytest.fixture(scope="module")
def hard_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard") / "cohort"
    synthesize_cohort(root, SyntheticCohort(subjects=120, voxel_sizes=(3.0, 4.0), seed=21))
    return root


@pytest.mark.slow
def test_the_cnn_learns_and_its_best_map_finds_the_planted_effect(tmp_path, hard_cohort):
    config = demo_sized(tmp_path, hard_cohort)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_study(config))
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["pooled_roc_auc"] > MIN_CNN_AUC and tags["study.finding"] == "yes", metrics
    local = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="localization.tsv", dst_path=str(tmp_path)
        ),
        sep="\t",
    ).set_index("method")
    assert set(local.index) == {"gradcam", "guided_backprop", "perturbation", "linear_baseline"}
    # The map path (store, group maps, MNI grid, ground truth) is right: the map that does localize, does.
    linear = local.loc["linear_baseline"]
    assert linear.roc_auc_group > MIN_LOCALIZATION, local
    assert linear.top1pct_in_effect_group > 10 * linear.chance_top1pct, local
    assert linear.top1pct_in_distractor_group <= linear.chance_distractor, local
    assert metrics["localization_roc_auc_linear_baseline"] == pytest.approx(linear.roc_auc_group)
    # The CNN's best map (most of its top 1% inside the planted effect) finds the effect and not the distractor.
    cnn = local.drop(index="linear_baseline")
    best = cnn.loc[cnn.top1pct_in_effect_group.idxmax()]
    assert best.top1pct_in_effect_group > MIN_TOP_SHARE * best.chance_top1pct, local
    assert best.roc_auc_group > MIN_CNN_LOCALIZATION, local
    assert best.top1pct_in_distractor_group < best.top1pct_in_effect_group / 2, local
    # Without the ground truth, the deletion check says the same: deleting that map's top voxels moves the
    # model's decisions more than random blobs of as many voxels do.
    assert best.name not in tags["sanity.deletion_flagged"].split(","), tags
    assert metrics[f"deletion_change_{best.name}"] > 3 * metrics["deletion_change_random"], metrics


@pytest.mark.slow
def test_a_model_trained_on_shuffled_labels_is_said_to_have_learned_nothing(tmp_path, hard_cohort, capsys):
    shuffled = Path(shutil.copytree(hard_cohort, tmp_path / "shuffled"))
    table = pd.read_csv(shuffled / "participants.tsv", sep="\t")
    table["sex"] = np.random.default_rng(0).permutation(table["sex"].to_numpy())
    table.to_csv(shuffled / "participants.tsv", sep="\t", index=False)
    config = demo_sized(tmp_path, shuffled, attribution=None)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_study(config))
    assert run.data.tags["study.finding"] == "none", run.data.metrics
    assert run.data.metrics["pooled_roc_auc_p_vs_chance"] >= 0.05
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert 'class="banner warning">No finding: neither the CNN nor the linear baseline learned the task' in report
    assert "No finding: neither the CNN nor the linear baseline learned the task" in capsys.readouterr().out


@pytest.mark.slow
def test_a_cnn_that_cannot_learn_beside_a_baseline_that_did_gets_the_baseline_verdict(tmp_path, hard_cohort, capsys):
    """One epoch at a learning rate that moves nothing: only the linear baseline learns. The verdict says so, the
    fit check names the folds, and the baseline's map gets the CNN maps' treatment (test, deletion, regions)."""
    config = demo_sized(
        tmp_path,
        hard_cohort,
        train={"epochs": 1, "lr": 1e-9, "warmup_epochs": 0},
        attribution={
            "methods": ["gradcam"],
            "batch_size": 8,
            "actors": 2,
            "permutations": 99,
            "sanity": {"subjects": 2, "label_randomization": False},
        },
    )
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_study(config))
    metrics, tags = run.data.metrics, run.data.tags
    assert tags["study.finding"] == "baseline_only" and tags["study.fit"] == "underfit", metrics
    assert metrics["baseline_pooled_roc_auc_p_vs_chance"] < 0.05 <= metrics["pooled_roc_auc_p_vs_chance"]
    out = capsys.readouterr().out
    assert "The linear baseline learned the task, the CNN did not" in out
    assert "did not fit its own training subjects in 3 of 3 folds" in out
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert 'class="banner warning">The linear baseline learned the task' in report
    assert report.index("The finding: the linear baseline&#x27;s weights") < report.index("Where the network looks")
    # the weights' own test finds voxels, and deleting the baseline's top voxels moves its decisions
    assert metrics["test_voxels_fwer05_linear_baseline"] > 0, metrics
    assert "linear_baseline" not in tags["sanity.deletion_flagged"].split(","), tags
    assert metrics["deletion_change_linear_baseline"] > 3 * metrics["deletion_change_random"], metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "maps/linear_baseline")}
    assert "maps/linear_baseline/linear_baseline_weights_male_minus_female.nii.gz" in artifacts, artifacts
