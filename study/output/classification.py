"""The classification stage published: held-out metrics of the CNN and the linear baseline, and the verdict.

One function per artifact or report section, each with its caption templates
above it: the study run's metrics and tags, the baseline's runs, the pooled
predictions and ROC curves, the console's table, and the report's verdict,
summary and tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from study.data.adjustment import Adjustment
from study.output.confounds import CONFOUNDS, adjusted_images, confound_metrics, confound_table
from study.output.console import say
from study.output.figures import reliability_figure, roc_figure
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study
from study.training.baseline import BaselineResult
from study.training.evaluation import Evaluation, format_p
from study.training.folds import FoldResult
from study.training.metrics import SUMMARY_METRICS, classification_metrics, cross_fold_summary, fit_check


def publish_classification(
    tracker: Tracker,
    report: Report,
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    evaluation: Evaluation,
) -> str | None:
    """The held-out results of the CNN and the linear baseline, and whether they are a finding; returns what the
    fit check found of folds that did not fit their own training subjects (None: every fold did)."""
    parent = study.state.parent_run
    fit, underfit = fit_check({r.fold: r.fit_accuracy for r in results})
    held_out = pd.concat([r.predictions.assign(fold=r.fold) for r in results])  # every fold's test subjects
    pooled = _pooled(study, held_out)
    _log_metrics(tracker, parent, results, baselines, evaluation, pooled)
    tracker.set_tags(parent, {"study.finding": evaluation.finding, "study.fit": fit})
    log_baseline_runs(tracker, study, baselines)
    tracker.log_table(parent, held_out, "predictions.tsv")
    roc = _roc(study, results, baselines)
    tracker.log_figure(parent, roc, "roc.png")
    _console(results, baselines, evaluation, underfit)
    report.banner = (
        "finding" if evaluation.finding == "yes" else "warning",
        " ".join(filter(None, [evaluation.verdict, underfit])),
    )
    report.summary = _summary(study, results, evaluation, pooled)
    _fold_table(report, study, results, baselines)
    _finding_table(report, study, evaluation)
    report.add_images("ROC curves", [(f"ROC per outer fold ({study.cohort.target.positive} = positive)", roc)])
    reliability = _reliability(study, held_out, calibrated=any(r.calibration.subjects for r in results))
    tracker.log_figure(parent, reliability, "reliability.png")
    how = CALIBRATED_BY[study.config.train.calibration]
    caption = CALIBRATION.format(positive=study.cohort.target.positive, how=how, **pooled)
    report.add_images("Calibration", [(caption, reliability)])
    if study.config.search:
        search_table(tracker, report, parent, results)
    tracker.set_tags(
        parent,
        {
            "mlflow.note.content": DESCRIPTION.format(
                name=study.config.name,
                subjects=len(study.cohort.subjects),
                folds=study.config.cv.outer_folds,
                verdict=evaluation.verdict,
            )
        },
    )
    return underfit


def _pooled(study: Study, table: pd.DataFrame) -> dict[str, float]:
    """The CNN's pooled held-out Brier score and balanced accuracy (calibrated), and its pooled ROC AUC before
    calibration (NaN for folds kept before calibration existed), from the folds' prediction ``table``."""
    labels = study.labels(table.subject_id.tolist())
    metrics = classification_metrics(labels, table[study.cohort.target.p].to_numpy())
    raw = table["log_odds"].to_numpy() if "log_odds" in table else np.full(len(table), np.nan)
    uncalibrated = float(roc_auc_score(labels, raw)) if np.isfinite(raw).all() else float("nan")
    return {"brier": metrics["brier"], "balanced_accuracy": metrics["balanced_accuracy"], "uncalibrated": uncalibrated}


def _log_metrics(
    tracker: Tracker,
    parent: str,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    evaluation: Evaluation,
    pooled: dict[str, float],
) -> None:
    """The study run's metrics: each model's fold mean and spread, the pooled tests and calibration."""
    tracker.log_metrics(parent, cross_fold_summary([r.test_metrics for r in results]))
    linear = cross_fold_summary([b.test_metrics for b in baselines])
    tracker.log_metrics(parent, {k.replace("test_", "baseline_test_", 1): v for k, v in linear.items()})
    metrics = {
        "pooled_roc_auc": evaluation.cnn.value,
        "pooled_roc_auc_ci_low": evaluation.cnn.low,
        "pooled_roc_auc_ci_high": evaluation.cnn.high,
        "pooled_roc_auc_p_vs_chance": evaluation.cnn_p,
    }
    metrics |= {
        "pooled_brier": pooled["brier"],
        "pooled_balanced_accuracy": pooled["balanced_accuracy"],
        "pooled_roc_auc_uncalibrated": pooled["uncalibrated"],
    }
    if evaluation.brain_volume is not None:
        metrics["brain_volume_roc_auc"] = evaluation.brain_volume.value
    if evaluation.confounds is not None:
        metrics |= confound_metrics(evaluation.confounds)
    if evaluation.baseline is not None:
        metrics |= {
            "baseline_pooled_roc_auc": evaluation.baseline.value,
            "baseline_pooled_roc_auc_p_vs_chance": evaluation.baseline_p,
            "cnn_minus_baseline_roc_auc": evaluation.difference.value,
            "cnn_minus_baseline_p": evaluation.difference_p,
        }
    tracker.log_metrics(parent, metrics)


def log_baseline_runs(tracker: Tracker, study: Study, baselines: list[BaselineResult]) -> None:
    """One run per fold of the linear baseline, beside the CNN's fold runs (once: the state records it)."""
    state = study.state
    for baseline in baselines:
        if baseline.fold in state.baseline_runs:
            continue
        tags = {"study.level": "baseline", "study.model": "linear", "study.fold": str(baseline.fold)}
        run_id = tracker.start_run(f"baseline fold {baseline.fold}", tags, parent=state.parent_run)
        penalty = {"model": f"{'multinomial ' * study.cohort.target.several}l2 logistic regression", "C": baseline.C}
        if study.cohort.target.kind == "regression":
            penalty = {"model": "ridge regression", "alpha": 1 / baseline.C}
        tracker.log_params(run_id, {**penalty, "fold": baseline.fold})
        tracker.log_metrics(run_id, baseline.test_metrics, prefix="test_")
        tracker.log_table(run_id, baseline.predictions, "predictions.tsv")
        tracker.end(run_id)
        state.baseline_runs[baseline.fold] = run_id
        study.save_state()


CALIBRATION = (
    "Reliability diagrams of the CNN's held-out probabilities: in ten bins of predicted P({positive}), the share "
    "of subjects who are {positive}, each point sized by its subjects; on the diagonal, a probability means what "
    "it says. Left: as tested, {how}; never on held-out subjects. Pooled Brier score {brier:.3f} (0 is perfect, "
    "0.25 a coin), balanced accuracy {balanced_accuracy:.3f}. Right (when there was a calibration): the same "
    "models' softmax probabilities before it (pooled ROC AUC {uncalibrated:.3f}): folds that lean to one class "
    "there mix different scales when pooled. BatchNorm's statistics were re-estimated on the un-augmented "
    "training subjects in both."
)
CALIBRATED_BY = {  # train.calibration
    "recenter": "each fold's 0.5 threshold moved to midway between the two classes' median log-odds on its own "
    "training subjects",
    "temperature": "each fold's probabilities calibrated by a temperature fitted on its first inner split's "
    "validation subjects, predicted by a model that did not train on them",
    "platt": "each fold's probabilities calibrated by a temperature and a bias fitted on its first inner split's "
    "validation subjects, predicted by a model that did not train on them",
    "none": "softmax's probabilities, not calibrated (train.calibration: none)",
}


def _reliability(study: Study, table: pd.DataFrame, calibrated: bool) -> Figure:
    """The reliability diagrams of every fold of the prediction ``table`` and of all of them pooled; beside them,
    when the folds were ``calibrated``, the same before calibration."""
    classes = study.cohort.target
    panels: dict[str, dict] = {"calibrated (as tested)": {}, "before calibration (softmax)": {}}
    before = calibrated and "log_odds" in table and table["log_odds"].notna().all()
    for name, rows in [(f"fold {f}", t) for f, t in table.groupby("fold")] + [("pooled", table)]:
        labels = study.labels(rows.subject_id.tolist())
        panels["calibrated (as tested)"][name] = (labels, rows[classes.p].to_numpy())
        if before:
            panels["before calibration (softmax)"][name] = (labels, expit(rows["log_odds"].to_numpy()))
    return reliability_figure({k: v for k, v in panels.items() if v}, classes.names)


def _roc(study: Study, results: list[FoldResult], baselines: list[BaselineResult]) -> Figure:
    """Every fold's ROC curve of the CNN and of the linear baseline, in one figure."""
    classes = study.cohort.target
    curves = {
        f"{model}, fold {r.fold}": (study.labels(r.predictions.subject_id.tolist()), r.predictions[classes.p])
        for model, fold_results in (("CNN", results), ("linear", baselines))
        for r in fold_results
    }
    return roc_figure(curves, "ROC per outer fold: CNN and linear baseline", classes.names)


def _console(
    results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation, underfit: str | None
) -> None:
    """Each fold's CNN and baseline side by side, their means, and the verdict."""
    summary = cross_fold_summary([r.test_metrics for r in results])
    linear = cross_fold_summary([b.test_metrics for b in baselines])
    say(f"{'fold':>6} {'CNN ROC AUC':>12} {'linear AUC':>11} {'CNN bal. acc.':>14} {'CNN fits train':>15}")
    for r, b in zip(results, baselines):
        say(
            f"{r.fold:>6} {r.test_metrics['roc_auc']:>12.3f} {b.test_metrics['roc_auc']:>11.3f} "
            f"{r.test_metrics['balanced_accuracy']:>14.3f} {r.fit_accuracy:>15.2f}"
        )
    say(
        f"{'all':>6} {summary['test_roc_auc_mean']:>6.3f} ± {summary['test_roc_auc_std']:.3f} "
        f"{linear['test_roc_auc_mean']:>5.3f} ± {linear['test_roc_auc_std']:.3f}"
    )
    say(evaluation.verdict)
    if underfit:
        say(underfit)


COMBAT_CAUTION = (
    " ComBat's empirical Bayes estimates, fitted on a fold's training subjects, leave held-out subjects with a site "
    'pattern of the opposite sign, even where the sites did not differ (docs/results.md, "Adjusting the images"): '
    "a model can learn it, so a held-out ROC AUC below 0.5 is no surprise here."
)


def _adjustment(study: Study) -> Adjustment | None:
    """The first fold's adjustment of the images for the confounds (every fold's removes the same ones)."""
    return study.fold_cache(study.folds[0].fold).adjustment if study.config.cv.adjust != "none" else None


def _summary(
    study: Study, results: list[FoldResult], evaluation: Evaluation, pooled: dict[str, float]
) -> list[tuple[str, str]]:
    """The report's headline numbers: the pooled ROC AUC first (the honest number), the fold mean beside it."""
    cohort, folds = study.cohort, cross_fold_summary([r.test_metrics for r in results])
    return [
        ("subjects", f"{len(cohort.subjects)} ({int(cohort.labels.sum())} {cohort.target.positive})"),
        ("outer folds", str(len(results))),
        ("CNN ROC AUC (pooled, 95% CI)", str(evaluation.cnn)),
        ("CNN ROC AUC (fold mean ± sd)", f"{folds['test_roc_auc_mean']:.3f} ± {folds['test_roc_auc_std']:.3f}"),
        ("CNN Brier score (pooled)", f"{pooled['brier']:.3f}"),
        ("linear baseline ROC AUC", str(evaluation.baseline) if evaluation.baseline else "-"),
        ("CNN vs chance", format_p(evaluation.cnn_p)),
        *(
            [(f"confounds alone ({c.listing}) ROC AUC", str(c.alone)), ("CNN beyond them", format_p(c.full.p))]
            if (c := evaluation.confounds)
            else []
        ),
        *([("images adjusted", adjusted_images(a, study.config.cv.group_by))] if (a := _adjustment(study)) else []),
        ("MLflow run", study.state.parent_run[:12]),
    ]


FINAL_FITS = {
    "all_subjects": "Each fold's final model trained on all of its training subjects for the configured epochs.",
    "early_stopped": "Each fold chose its number of epochs on its first inner split (early stopping), then trained "
    "its final model on all of its training subjects for that many epochs.",
    "inner_split": "Each fold's final model is the one chosen on its first inner split (early stopping); it never "
    "saw that split's validation subjects (one inner fold of the fold's training subjects).",
}
FOLDS = (
    "{final_fit} Each final model was tested once on its fold's held-out subjects. CNN training accuracy: the final "
    "model on its own training subjects (no augmentation); near 0.5 means it never fitted them. The linear baseline "
    "is an l2 logistic regression on the same voxels, its C chosen on the same inner splits. CNN calibration: the "
    "temperature and bias that map its log-odds to the probabilities tested (1, +0 leave softmax's; see the "
    "Calibration section; none: too few subjects, or train.calibration: none)."
)


def _fold_table(report: Report, study: Study, results: list[FoldResult], baselines: list[BaselineResult]) -> None:
    """Every fold's held-out metrics, the CNN beside the linear baseline."""
    rows = [
        {
            "fold": r.fold,
            "test subjects": len(r.predictions),
            "epochs (inner split)": r.epochs("select") or r.epochs("calibrate") or "-",
            "epochs (refit)": r.epochs("refit") or "-",
            "CNN training accuracy": r.fit_accuracy,
            **{f"CNN {m}": r.test_metrics.get(m, float("nan")) for m in SUMMARY_METRICS},
            "CNN calibration (temperature, bias)": f"{r.calibration.temperature:.2f}, {r.calibration.bias:+.2f}"
            if r.calibration.subjects
            else "none",
            "linear ROC AUC": b.test_metrics["roc_auc"],
            "linear balanced_accuracy": b.test_metrics["balanced_accuracy"],
            "linear C": b.C,
        }
        for r, b in zip(results, baselines)
    ]
    report.add_table(
        "Held-out test metrics per outer fold: the CNN and a linear baseline",
        pd.DataFrame(rows),
        FOLDS.format(final_fit=FINAL_FITS[study.config.train.final_fit]),
    )


FINDING = (
    "Every subject's prediction comes from the one model that never saw it. Intervals: DeLong. p of the CNN and of "
    "the baseline: against chance, by {permutations} label permutations within outer folds (one-sided). p of CNN - "
    "linear: DeLong's paired test of the difference (two-sided)."
)
BRAIN_VOLUME = (
    " Confound check: brain volume on the study grid alone separates the classes with ROC AUC {auc} (0.5: not at "
    "all; above: {positive} larger). A high value means a model can succeed from brain size, not from where the "
    "brain differs. It measures the size left after registration to MNI152: near 0.5 does not rule out a head-size "
    "difference in the native images, which a nonlinear registration largely removes."
)


def _finding_table(report: Report, study: Study, evaluation: Evaluation) -> None:
    """The pooled held-out ROC AUC of each model with its interval and p, and the brain-volume confound check."""
    rows = [("CNN", evaluation.cnn, evaluation.cnn_p)]
    if evaluation.baseline:
        rows += [
            ("linear baseline", evaluation.baseline, evaluation.baseline_p),
            ("CNN - linear", evaluation.difference, evaluation.difference_p),
        ]
    table = pd.DataFrame(
        [
            {"model": m, "pooled ROC AUC": auc.value, "95% CI low": auc.low, "95% CI high": auc.high, "p": format_p(p)}
            for m, auc, p in rows
        ]
    )
    note = FINDING.format(permutations=evaluation.permutations)
    if evaluation.brain_volume is not None:
        note += BRAIN_VOLUME.format(auc=evaluation.brain_volume, positive=study.cohort.target.positive)
    report.add_table("Is it a finding? Pooled held-out ROC AUC with confidence intervals", table, note)
    if evaluation.confounds is not None:
        adjustment = _adjustment(study)
        note = CONFOUNDS + (
            f" The images were adjusted: {adjusted_images(adjustment, study.config.cv.group_by)}; the CNN and the "
            "linear baseline saw them so." + (COMBAT_CAUTION if adjustment.batch else "")
            if adjustment
            else ""
        )
        report.add_table("Beyond the confounds?", confound_table(evaluation.confounds), note)


SEARCH = (
    "Each fold searched on its own training subjects only; stable choices across folds mean the architecture does "
    "not depend on which subjects were held out."
)


def search_table(tracker: Tracker, report: Report, parent: str, results: list[FoldResult]) -> None:
    """What each fold's search chose."""
    chosen = pd.DataFrame(
        [{"fold": r.fold, **{k: str(v) for k, v in sorted(r.search.best.items())}} for r in results if r.search]
    )
    tracker.log_table(parent, chosen, "search_best_configs.tsv")
    report.add_table("Architecture search: the best configuration of each outer fold", chosen, SEARCH)


DESCRIPTION = (  # the study run's description in the MLflow UI (markdown)
    "**{name}**: {subjects} subjects, {folds}-fold CV. {verdict}\n\nOpen `report.html` under Artifacts for the maps, "
    "method agreement and sanity checks; expand this run to see one child run per outer fold and per fold of the "
    "linear baseline."
)
