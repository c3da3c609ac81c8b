"""A demo-sized study on a cohort that is hard like real data: the CNN learns, the maps find the effect,
and a model that learned nothing is said to have learned nothing.

The cohort is the generator's default difficulty (effects near the noise, large
nuisance variation, a distractor region), stored at mixed voxel sizes and
orientations. Thresholds come from measured runs over several cohort seeds (see
the README's results), with a margin, so that a correct pipeline passes every
time and a broken one (maps displaced, a model that cannot fit, a verdict that
ignores chance) does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from study.config import parse_config
from study.data.synth import SyntheticCohort, synthesize_cohort
from study.pipeline import run_study, study_dir

# Measured over cohort seeds 21-23 (README, "Results"): CNN pooled AUC MEASURED_AUC; best method's
# localization AUC MEASURED_LOC. The thresholds leave a margin below the worst seed.
MIN_CNN_AUC = 0.75
MIN_LOCALIZATION = 0.75


def demo_sized(tmp_path, root, **changes):
    data = {
        "name": "hard",
        "cohort": {"root": str(root)},
        "preprocess": {"voxel_size": 6.0, "cache_dir": str(tmp_path / "cache")},
        "cv": {"outer_folds": 3, "inner_folds": 3},
        "model": {"preset": "mrinet", "width": 8},
        "train": {"epochs": 40},
        "resources": {"concurrent_folds": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "output_dir": str(tmp_path / "runs"),
        "attribution": {"methods": ["gradcam", "guided_backprop", "perturbation"], "batch_size": 8, "actors": 2,
                        "perturbation": {"iterations": 60}, "permutations": 200,
                        "sanity": {"subjects": 2, "label_randomization": False}},
    }
    return parse_config({**data, **changes})


@pytest.fixture(scope="module")
def hard_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard") / "cohort"
    synthesize_cohort(root, SyntheticCohort(subjects=120, voxel_sizes=(3.0, 4.0), seed=21))
    return root


@pytest.mark.slow
def test_the_cnn_learns_and_its_maps_find_the_planted_effect(tmp_path, hard_cohort):
    config = demo_sized(tmp_path, hard_cohort)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_study(config))
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["pooled_roc_auc"] > MIN_CNN_AUC and tags["study.finding"] == "yes", metrics
    methods = ("gradcam", "guided_backprop", "perturbation")
    best = max(methods, key=lambda m: metrics[f"localization_roc_auc_{m}"])
    assert metrics[f"localization_roc_auc_{best}"] > MIN_LOCALIZATION, metrics
    local = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="localization.tsv",
                                                            dst_path=str(tmp_path)), sep="\t").set_index("method")
    # The best method looks at the effect, not at the region that varies whatever the sex.
    assert local.loc[best, "top1pct_in_distractor_group"] <= local.loc[best, "chance_distractor"]
    assert local.loc[best, "top1pct_in_effect_group"] > 3 * local.loc[best, "chance_top1pct"]


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
    report = (study_dir(config) / "report.html").read_text()
    assert 'class="banner warning">No finding: the CNN did not learn the task' in report
    assert "No finding: the CNN did not learn the task" in capsys.readouterr().out
