"""What a study publishes of its classification, from held-out predictions to the banner, console and MLflow.

Plain results (a fold's predictions and history, the baseline's) through the
real publication into a real MLflow SQLite store and a real report, without
training anything: the verdict a researcher reads first is the one the
statistics give.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from ray.train import Checkpoint

from study.config import parse_config
from study.data.cohort import CohortConfig, load_cohort
from study.data.splits import make_splits
from study.output.classification import publish_classification
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study, StudyState
from study.training.baseline import BaselineResult
from study.training.calibration import Calibration
from study.training.evaluation import evaluate
from study.training.folds import FoldResult
from study.training.metrics import classification_metrics
from study.training.models import Architecture
from study.training.trainer import TrainingSetup


def published(tmp_path, cohort_dir, cnn_signal: float, baseline_signal: float, fit: float, shift: float = 0.0):
    """Publish a two-fold study of the synthetic cohort whose held-out P(male) carry ``*_signal`` of the label
    (0: none) and whose CNN fitted its training subjects to accuracy ``fit``; its run, report and evaluation.

    ``shift``: the CNN's softmax log-odds before calibration were shifted by it, in opposite directions in the two
    folds, and each fold's calibration took it back."""
    config = parse_config(
        {"name": "published", "cohort": {"root": str(cohort_dir)}, "cv": {"outer_folds": 2, "inner_folds": 2}}
    )
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    families = [s.family_id for s in cohort.subjects]
    folds = make_splits(cohort.ids, cohort.labels, families, 2, 2, 0, cohort.classes.names)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", config.name)
    state = StudyState("hash", "execution", parent_run=tracker.start_run(config.name, {"study.level": "study"}))
    study = Study(config, cohort, None, [], folds, state, False, tmp_path, str(tmp_path / "ray"))
    rng = np.random.default_rng(0)
    results, baselines = [], []
    for fold in folds:
        labels = study.labels(fold.test)
        cnn = np.clip(0.5 + cnn_signal * (labels - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0.01, 0.99)
        linear = np.clip(0.5 + baseline_signal * (labels - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0, 1)
        history = pd.DataFrame({"phase": ["refit"], "refit_epoch": [0], "fit_accuracy": [fit]})
        setup = TrainingSetup(Architecture(width=4), config.train)
        direction = 1 if fold.fold == 0 else -1
        log_odds = np.log(cnn / (1 - cnn)) + direction * shift
        predictions = cohort.classes.predictions(fold.test, labels, cnn, log_odds)
        results.append(
            FoldResult(
                fold.fold,
                setup,
                history,
                Checkpoint(str(tmp_path)),
                classification_metrics(labels, cnn),
                predictions,
                {"training": 1.0},
                calibration=Calibration(1.0, -direction * shift, 20),
            )
        )
        baselines.append(
            BaselineResult(
                fold.fold,
                1.0,
                classification_metrics(labels, linear),
                cohort.classes.predictions(fold.test, labels, linear),
                np.zeros(3),
                0.1,
            )
        )
    ids = [s for r in results for s in r.predictions.subject_id]
    pooled = {
        r: pd.concat([x.predictions for x in group]).p_male.to_numpy()
        for r, group in (("cnn", results), ("linear", baselines))
    }
    fold_of = np.concatenate([[r.fold] * len(r.predictions) for r in results])
    evaluation = evaluate(study.labels(ids), pooled["cnn"], fold_of, pooled["linear"], permutations=999)
    report = Report("published")
    underfit = publish_classification(tracker, report, study, results, baselines, evaluation)
    return mlflow.MlflowClient(tracker.uri).get_run(state.parent_run), report, evaluation, underfit


def test_a_study_whose_models_learned_nothing_says_so_first(tmp_path, cohort_dir, capsys):
    """Labels the models cannot know (a CNN trained on shuffled labels): the banner, the console and MLflow say
    there is no finding, and the maps that follow explain models that learned nothing."""
    run, report, evaluation, _ = published(tmp_path, cohort_dir, cnn_signal=0.0, baseline_signal=0.0, fit=1.0)
    assert evaluation.finding == "none" and evaluation.cnn_p >= 0.05
    assert run.data.tags["study.finding"] == "none" and run.data.tags["study.fit"] == "fits"
    assert run.data.metrics["pooled_roc_auc_p_vs_chance"] == pytest.approx(evaluation.cnn_p)
    assert report.banner[0] == "warning"
    assert (
        'class="banner warning">No finding: neither the CNN nor the linear baseline learned the task' in report.html()
    )
    assert "No finding: neither the CNN nor the linear baseline learned the task" in capsys.readouterr().out


def test_only_the_baseline_learned_and_the_cnn_fitted_nothing(tmp_path, cohort_dir, capsys):
    run, report, evaluation, underfit = published(tmp_path, cohort_dir, cnn_signal=0.0, baseline_signal=1.2, fit=0.5)
    assert evaluation.finding == "baseline_only" and run.data.tags["study.fit"] == "underfit"
    assert "did not fit its own training subjects in 2 of 2 folds" in underfit
    html = report.html()
    assert 'class="banner warning">The linear baseline learned the task, the CNN did not' in html
    assert underfit in html and underfit in capsys.readouterr().out
    assert run.data.metrics["baseline_pooled_roc_auc_p_vs_chance"] < 0.05
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    baselines = client.search_runs([run.info.experiment_id], "tags.`study.level` = 'baseline'")
    assert sorted(r.data.tags["study.fold"] for r in baselines) == ["0", "1"]  # a run per fold, beside the CNN's


def test_calibration_is_reported_pooled_and_per_fold_beside_softmax_probabilities(tmp_path, cohort_dir):
    """Folds shifted to opposite classes before calibration: the report shows their reliability before and after,
    MLflow has the Brier scores and the pooled ROC AUC before calibration, which the shift lowered."""
    from sklearn.metrics import brier_score_loss

    run, report, evaluation, _ = published(tmp_path, cohort_dir, cnn_signal=0.6, baseline_signal=0.6, fit=1.0, shift=3)
    metrics = run.data.metrics
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="predictions.tsv", tracking_uri=uri
    )
    table = pd.read_csv(path, sep="\t")
    truth = (table["sex"] == "male").to_numpy()
    assert metrics["pooled_brier"] == pytest.approx(brier_score_loss(truth, table["p_male"]))
    assert metrics["pooled_roc_auc"] == pytest.approx(evaluation.cnn.auc)
    assert metrics["pooled_roc_auc_uncalibrated"] < evaluation.cnn.auc - 0.05
    assert {"test_brier_mean", "test_brier_std", "pooled_balanced_accuracy"} <= set(metrics)
    client = mlflow.MlflowClient(uri)
    assert "reliability.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    html = report.html()
    assert "Reliability diagrams of the CNN" in html and f"{metrics['pooled_roc_auc_uncalibrated']:.3f}" in html
    assert "CNN ROC AUC (fold mean ± sd)" in html and "CNN calibration (temperature, bias)" in html
