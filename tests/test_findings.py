"""A demo-sized study on a cohort that is hard like real data: the CNN learns, its best map finds the
planted effect, every method's maps are published, and a CNN that learned nothing beside a baseline that did is
said to have learned nothing.

The cohort is the generator's default difficulty (effects near the noise, large
nuisance variation, a distractor region), stored at mixed voxel sizes and
orientations. Thresholds come from runs over cohort seeds 21-23 (this file's
``demo_sized`` study), with a margin below the worst seed, so that a correct
pipeline passes every time and a broken one does not.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
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


QUICK_ATTRIBUTION = {
    "methods": ["gradcam", "guided_backprop", "perturbation"],
    "batch_size": 8,
    "actors": 2,
    "perturbation": {"iterations": 60},
    "permutations": 200,
    "sanity": {"subjects": 2, "label_randomization": False},
}


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
            "attribution": QUICK_ATTRIBUTION,
            **changes,
        },
    )


@pytest.fixture(scope="module")
def hard_cohort(tmp_path_factory, ray_head):
    """Synthesized by Ray tasks on the tests' head: asked for first, so that alone this module still joins it
    (before, the tasks would start a Ray of their own when no earlier test had started the head)."""
    root = tmp_path_factory.mktemp("hard") / "cohort"
    synthesize_cohort(root, SyntheticCohort(subjects=120, voxel_sizes=(3.0, 4.0), seed=21))
    return root


@pytest.mark.slow
def test_the_cnn_learns_and_its_best_map_finds_the_planted_effect(tmp_path, hard_cohort):
    methods = ["gradcam", "guided_backprop", "perturbation", "integrated_gradients"]
    (tmp_path / "atlas.tsv").write_text("label\tname\n1\tamygdala L\n2\tputamen R\n3\tcerebellum R\n4\tprecuneus L\n")
    atlas = {
        "atlas": str(hard_cohort / "derivatives/ground_truth/regions.nii.gz"),
        "atlas_names": str(tmp_path / "atlas.tsv"),
    }
    attribution = {**QUICK_ATTRIBUTION, "methods": methods, "subject_nifti": True, **atlas}
    config = demo_sized(tmp_path, hard_cohort, attribution=attribution)
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
    assert set(local.index) == {*methods, "linear_baseline"}
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
    assert_every_map_is_published(tmp_path, config, run, methods, subjects=120)


def assert_every_map_is_published(tmp_path: Path, config, run, methods: list[str], subjects: int) -> None:
    """Every method's maps in MLflow (study and fold runs) and the report, each subject's as NIfTI, the region
    tables of the atlas, the sanity tables and the stage times."""
    client, parent_id = mlflow.MlflowClient(), run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.html", "agreement.tsv", "localization.tsv", "maps", "sanity", "regions"} <= artifacts
    for method in methods:
        maps = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(parent_id, f"maps/{method}")}
        assert {f"{method}_mean_male.nii.gz", f"{method}_mean_all.nii.gz"} <= maps, maps
        # each class's own decision: no male - female test of Meaningful Perturbations' maps
        tested = {f"{method}_t_male_minus_female.nii.gz", f"{method}_p_fwer.nii.gz"}
        assert tested <= maps if method != "perturbation" else not tested & maps, maps
    for child in [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("study.level") == "fold"]:
        assert {a.path for a in client.list_artifacts(child.info.run_id, "maps")} >= {f"maps/{m}" for m in methods}
    atlas_table = client.download_artifacts(parent_id, "regions/perturbation_atlas.tsv", str(tmp_path))
    assert set(pd.read_csv(atlas_table, sep="\t").region) == {"amygdala L", "putamen R", "cerebellum R", "precuneus L"}
    report = (study_dir(config) / "latest" / "report.html").read_text()  # each caption says what its maps show
    assert "Grad-CAM: mean map, male; explains the male - female logit: its magnitude, evidence for either" in report
    assert "Perturbations: mean map, female; explains the male - female logit: what must be deleted, towards" in report
    assert "Integrated Gradients: mean map, all held-out subjects (top 10% of voxels); explains the male" in report
    assert "Integrated Gradients: male - female t, FWER p &lt; 0.05" in report
    subject_maps = study_dir(config) / "latest" / "maps" / "subjects"
    for method in methods:
        assert len(list((subject_maps / method).glob("sub-*_" + method + ".nii.gz"))) == subjects
    sanity = {a.path for a in client.list_artifacts(parent_id, "sanity")}
    assert sanity == {"sanity/parameter_randomization.tsv", "sanity/deletion.tsv"}
    times = pd.read_csv(client.download_artifacts(parent_id, "stage_times.tsv", str(tmp_path)), sep="\t")
    assert {"attribution", "group statistics", "sanity checks"} <= set(times.stage), times


@pytest.mark.slow
def test_a_cnn_that_cannot_learn_beside_a_baseline_that_did_gets_the_baseline_verdict(tmp_path, hard_cohort, capsys):
    """One epoch at a learning rate that moves nothing: only the linear baseline learns. The verdict says so, the
    fit check names the folds, and the baseline's map gets the CNN maps' treatment (test, deletion, regions).
    (A study whose models both learned nothing: test_publish.py, from its held-out predictions on.)"""
    config = demo_sized(
        tmp_path,
        hard_cohort,
        cv={"outer_folds": 2, "inner_folds": 2},
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
    assert "did not fit its own training subjects in 2 of 2 folds" in out
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert 'class="banner warning">The linear baseline learned the task' in report
    assert report.index("The finding: the linear baseline&#x27;s weights") < report.index("Where the network looks")
    # the weights' own test finds voxels, and deleting the baseline's top voxels moves its decisions
    assert metrics["test_voxels_fwer05_linear_baseline"] > 0, metrics
    assert "linear_baseline" not in tags["sanity.deletion_flagged"].split(","), tags
    assert metrics["deletion_change_linear_baseline"] > 3 * metrics["deletion_change_random"], metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "maps/linear_baseline")}
    assert "maps/linear_baseline/linear_baseline_weights_male_minus_female.nii.gz" in artifacts, artifacts
