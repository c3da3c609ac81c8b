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
from study.data.cohort import load_cohort
from study.data.splits import make_splits
from study.output.classification import publish_classification
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study, StudyState
from study.training.baseline import BaselineResult
from study.training.calibration import Calibration
from study.training.confounds import confound_predictions
from study.training.evaluation import evaluate
from study.training.folds import FoldResult
from study.training.metrics import classification_metrics
from study.training.models import Architecture
from study.training.trainer import TrainingSetup


def published(
    tmp_path, cohort_dir, cnn_signal: float, baseline_signal: float, fit: float, shift: float = 0.0, site: bool = False
):
    """Publish a two-fold study of the synthetic cohort whose held-out P(male) carry ``*_signal`` of the label
    (0: none) and whose CNN fitted its training subjects to accuracy ``fit``; its run, report and evaluation.

    ``shift``: the CNN's softmax log-odds before calibration were shifted by it, in opposite directions in the two
    folds, and each fold's calibration took it back. ``site``: the cohort names a confound, a scanner that scanned
    most men and few women, and ``*_signal`` is the models' signal of the scanner instead of the label."""
    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype=str)
    male = table.sex.str.upper().str.startswith("M").to_numpy()
    scanner_b = np.random.default_rng(1).random(len(table)) < np.where(male, 0.9, 0.1)
    table.assign(site=np.where(scanner_b, "B", "A")).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    cohort_config = {"root": str(cohort_dir)} | (
        {"participants": str(tmp_path / "participants.tsv"), "confounds": ["site"]} if site else {}
    )
    config = parse_config({"name": "published", "cohort": cohort_config, "cv": {"outer_folds": 2, "inner_folds": 2}})
    cohort = load_cohort(config.cohort)
    families = [s.family_id for s in cohort.subjects]
    folds = make_splits(cohort.ids, cohort.labels, families, 2, 2, 0, cohort.target.names)
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", config.name)
    state = StudyState("hash", "execution", parent_run=tracker.start_run(config.name, {"study.level": "study"}))
    study = Study(config, cohort, None, [], folds, state, False, tmp_path, str(tmp_path / "ray"))
    rng = np.random.default_rng(0)
    results, baselines = [], []
    for fold in folds:
        labels = study.labels(fold.test)
        learned = (cohort.confound_table(fold.test).site == "B").to_numpy().astype(float) if site else labels
        cnn = np.clip(0.5 + cnn_signal * (learned - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0.01, 0.99)
        linear = np.clip(0.5 + baseline_signal * (learned - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0, 1)
        history = pd.DataFrame({"phase": ["refit"], "refit_epoch": [0], "fit_accuracy": [fit]})
        setup = TrainingSetup(Architecture(width=4), config.train)
        direction = 1 if fold.fold == 0 else -1
        log_odds = np.log(cnn / (1 - cnn)) + direction * shift
        predictions = cohort.target.predictions(fold.test, labels, cnn, log_odds)
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
                cohort.target.predictions(fold.test, labels, linear),
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
    confounds = cohort.confound_table(ids) if site else None
    row = {s: i for i, s in enumerate(ids)}
    rows = [([row[s] for s in f.train], [row[s] for s in f.test]) for f in folds]
    alone = confound_predictions(confounds, study.labels(ids), rows) if site else None
    evaluation = evaluate(
        study.labels(ids),
        pooled["cnn"],
        fold_of,
        pooled["linear"],
        permutations=999,
        confounds=confounds,
        confounds_alone=alone,
    )
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


def test_a_study_whose_models_learned_the_scanner_says_the_confounds_explain_it(tmp_path, cohort_dir, capsys):
    """Both models predict the scanner, which scanned most men: above chance, but nothing beyond the confound.
    The banner, the console, the study.finding tag and the metrics say so, and the report has the tests."""
    run, report, evaluation, _ = published(
        tmp_path, cohort_dir, cnn_signal=0.6, baseline_signal=0.6, fit=1.0, site=True
    )
    confounds = evaluation.confounds
    assert evaluation.cnn_p < 0.05 and confounds.full.p >= 0.05 and confounds.partial.p < 0.05
    assert evaluation.finding == run.data.tags["study.finding"] == "confounds" and report.banner[0] == "warning"
    metrics = run.data.metrics
    assert metrics["confounds_pooled_roc_auc"] == pytest.approx(confounds.alone.value) and confounds.alone.value > 0.75
    assert metrics["full_confound_test_p"] == pytest.approx(confounds.full.p)
    assert metrics["baseline_partial_confound_test_p"] == pytest.approx(confounds.baseline_partial.p)
    html = report.html()
    assert 'class="banner warning">Explained by the confounds (site)' in html
    assert "Beyond the confounds?" in html and "confounds alone (site)" in html
    assert "Explained by the confounds (site)" in capsys.readouterr().out


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
    assert metrics["pooled_roc_auc"] == pytest.approx(evaluation.cnn.value)
    assert metrics["pooled_roc_auc_uncalibrated"] < evaluation.cnn.value - 0.05
    assert {"test_brier_mean", "test_brier_std", "pooled_balanced_accuracy"} <= set(metrics)
    client = mlflow.MlflowClient(uri)
    assert "reliability.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    html = report.html()
    assert "Reliability diagrams of the CNN" in html and f"{metrics['pooled_roc_auc_uncalibrated']:.3f}" in html
    assert "CNN ROC AUC (fold mean ± sd)" in html and "CNN calibration (temperature, bias)" in html
