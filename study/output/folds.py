"""The cross-validation stage published: a run per outer fold, its live curves, and each finished fold.

Each fold's MLflow run is opened with the study's run (its split's sizes as
params), follows the fold's training epoch by epoch (:func:`live_curves`), and
gets, once the fold is finished, its whole history, test metrics, predictions,
ROC curve, confusion matrix and model (:func:`publish_fold`).
"""

from __future__ import annotations

import pandas as pd
from sklearn.metrics import confusion_matrix

from study.output import regression
from study.output.console import say
from study.output.figures import confusion_figure, decided, one_vs_rest, roc_figure
from study.output.models import log_model
from study.output.tracking import Tracker, is_tracking_failure
from study.output.trials import publish_search
from study.state import StageTimes, Study
from study.training.checkpoint import load_model
from study.training.folds import FoldResult
from study.training.live import OnEpochs

# A fold's training phases and their step column: selection or calibration on the inner split, then the refit.
PHASE_STEPS = {"select": "epoch", "calibrate": "calibration_epoch", "refit": "refit_epoch"}


def open_fold_runs(tracker: Tracker, study: Study) -> None:
    """A run under the study's for every fold not yet opened (with its split's sizes); reopen unfinished ones."""
    state = study.state
    for fold in study.folds:
        if fold.fold in state.fold_runs:
            if fold.fold not in state.logged_folds:
                tracker.reopen(state.fold_runs[fold.fold])
            continue
        tags = {"study.level": "fold", "study.fold": str(fold.fold), "study.execution": state.execution}
        run_id = tracker.start_run(f"fold {fold.fold}", tags, parent=state.parent_run)
        sizes = {
            "n_train": len(fold.train),
            "n_test": len(fold.test),
            "n_inner_train": len(fold.validation.train),
            "n_inner_validation": len(fold.validation.test),
        }
        tracker.log_params(run_id, {"fold": fold.fold, **sizes})
        state.fold_runs[fold.fold] = run_id
    study.save_state()


def live_curves(tracker: Tracker, study: Study) -> OnEpochs:
    """A callback for the cross-validation stage: each fold's new epochs on its run's curves, as they train."""

    def epochs(fold: int, records: list[dict]) -> None:
        history = pd.DataFrame(records)
        try:  # live curves are a view: a tracking hiccup must not stop training (the fold logs them at its end)
            for phase, step in PHASE_STEPS.items():
                rows = history[history["phase"] == phase] if "phase" in history else history.iloc[:0]
                if len(rows):
                    tracker.log_history(study.state.fold_runs[fold], rows, step, only_new=True)
        except Exception as err:
            if not is_tracking_failure(err):
                raise

    return epochs


def publish_fold(tracker: Tracker, study: Study, result: FoldResult, times: StageTimes) -> None:
    """Log a finished fold (unless MLflow has it already), end its run, and say how it went."""
    state = study.state
    if result.fold in state.logged_folds:
        return
    run_id = state.fold_runs[result.fold]
    if result.search is not None:
        publish_search(tracker, result.fold, run_id, result.search)
    for phase, step in PHASE_STEPS.items():
        rows = result.history[result.history["phase"] == phase].dropna(axis=1, how="all")
        if len(rows):
            tracker.log_history(run_id, rows, step, only_new=True)
    tracker.log_metrics(run_id, result.test_metrics, prefix="test_")
    target, name = study.cohort.target, f"fold {result.fold}"
    if result.calibration.subjects:
        calibration = result.calibration.to_dict()
        biases = dict(zip((f"calibration_bias_{c}" for c in target.names), calibration.pop("class_bias", [])))
        tracker.log_metrics(run_id, {f"calibration_{k}": v for k, v in calibration.items()} | biases)
    tracker.log_table(run_id, result.predictions, "predictions.tsv")
    if target.kind == "classification":
        labels = study.labels(result.predictions.subject_id.tolist())
        p = target.probabilities(result.predictions)
        roc = roc_figure(one_vs_rest(target.names, labels, p, name), f"ROC, {name}", target.names)
        tracker.log_figure(run_id, roc, "roc.png")
        matrix = confusion_matrix(labels, decided(p), labels=range(len(target.names)))
        tracker.log_figure(run_id, confusion_figure({name: matrix}, target.names), "confusion.png")
    with times.stage("MLflow model logging"):
        log_model(tracker, run_id, load_model(result.checkpoint), study.cache.shape)
    tracker.end(run_id)
    state.logged_folds.append(result.fold)
    study.save_state()
    done = f"{len(state.logged_folds)}/{len(study.folds)}"
    tracker.set_tags(state.parent_run, {"study.progress": f"{done} folds done"})
    say(f"fold {result.fold} ({done} done): {_fold_line(study, result)}")


def _fold_line(study: Study, result: FoldResult) -> str:
    """How a fold trained and how it tested, in one line."""
    phases = []
    if select := result.epochs("select"):
        phases.append(f"{select} epochs on the inner split")
    if calibrate := result.epochs("calibrate"):
        phases.append(f"{calibrate} epochs on the inner split (calibration)")
    if refit := result.epochs("refit"):
        phases.append(f"{refit} epochs on all {len(study.folds[result.fold].train)} training subjects")
    m = result.test_metrics
    if study.cohort.target.several:
        return (
            f"{' + '.join(phases)}; training accuracy {result.fit_accuracy:.2f}; test macro ROC AUC "
            f"{m['roc_auc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} [{sum(result.seconds.values()):.0f} s]"
        )
    if study.cohort.target.kind == "regression":
        return f"{' + '.join(phases)}; {regression.fold_line(result)} [{sum(result.seconds.values()):.0f} s]"
    return (
        f"{' + '.join(phases)}; training accuracy {result.fit_accuracy:.2f}; test ROC AUC {m['roc_auc']:.3f}, "
        f"balanced accuracy {m['balanced_accuracy']:.3f} [{sum(result.seconds.values()):.0f} s]"
    )
