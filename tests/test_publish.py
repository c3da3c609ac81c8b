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
from study.training.evaluation import evaluate
from study.training.folds import FoldResult
from study.training.metrics import classification_metrics
from study.training.models import Architecture
from study.training.trainer import TrainingSetup


def published(tmp_path, cohort_dir, cnn_signal: float, baseline_signal: float, fit: float):
    """Publish a two-fold study of the synthetic cohort whose held-out P(male) carry ``*_signal`` of the label
    (0: none) and whose CNN fitted its training subjects to accuracy ``fit``; its run, report and evaluation."""
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
        cnn = np.clip(0.5 + cnn_signal * (labels - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0, 1)
        linear = np.clip(0.5 + baseline_signal * (labels - 0.5) + 0.2 * rng.standard_normal(len(labels)), 0, 1)
        history = pd.DataFrame({"phase": ["refit"], "refit_epoch": [0], "fit_accuracy": [fit]})
        setup = TrainingSetup(Architecture(width=4), config.train)
        predictions = cohort.classes.predictions(fold.test, labels, cnn)
        results.append(
            FoldResult(
                fold.fold,
                setup,
                history,
                Checkpoint(str(tmp_path)),
                classification_metrics(labels, cnn),
                predictions,
                {"training": 1.0},
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
