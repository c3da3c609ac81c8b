"""A regression target's results published (brain age): held-out errors of the CNN and the ridge baseline, the
brain-age gap, and the verdict; the regression twin of :mod:`.classification`, with one function per artifact
or report section.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from study.output.classification import log_baseline_runs, search_table
from study.output.console import say
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study
from study.training.baseline import BaselineResult
from study.training.calibration import MIN_SLOPE
from study.training.evaluation import Evaluation, format_p
from study.training.folds import FoldResult
from study.training.metrics import REGRESSION_SUMMARY, UNDERFIT, cross_fold_summary, fit_check
from study.training.regression import bias_corrected_gap

SCORES = {"rmse": "RMSE", "r": "Pearson r", "r2": "R^2"}
NAMES = {"mae": "MAE", **SCORES}


def publish_regression(
    tracker: Tracker,
    report: Report,
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    evaluation: Evaluation,
) -> str | None:
    """The held-out results of the CNN and the ridge baseline, the brain-age gap and whether they are a finding;
    returns what the fit check found of folds that did not fit their own training subjects (None: every fold
    did)."""
    parent, target = study.state.parent_run, study.cohort.target
    fit, underfit = fit_check({r.fold: r.fit_score("fit_r") for r in results}, "r")
    held_out = held_out_gaps(study, results)
    linear = pd.concat([b.predictions for b in baselines]).set_index("subject_id")[target.prediction]
    tracker.log_metrics(parent, _metrics(results, baselines, evaluation, held_out))
    tracker.set_tags(parent, {"study.finding": evaluation.finding, "study.fit": fit})
    log_baseline_runs(tracker, study, baselines)
    tracker.log_table(parent, held_out, "predictions.tsv")
    scatter = predicted_figure(held_out, target.column, target.prediction, linear)
    tracker.log_figure(parent, scatter, "predicted_vs_true.png")
    _console(results, baselines, evaluation, underfit)
    report.banner = (
        "finding" if evaluation.finding == "yes" else "warning",
        " ".join(filter(None, [evaluation.verdict, underfit])),
    )
    folds = cross_fold_summary([r.test_metrics for r in results], REGRESSION_SUMMARY)
    report.summary = [
        ("subjects", f"{len(study.cohort.subjects)} ({target.column} {_range(study.cohort.labels)})"),
        ("outer folds", str(len(results))),
        ("CNN MAE (pooled, 95% CI)", str(evaluation.cnn)),
        ("CNN MAE (fold mean ± sd)", f"{folds['test_mae_mean']:.3f} ± {folds['test_mae_std']:.3f}"),
        ("CNN Pearson r", str(evaluation.scores["cnn_r"])),
        ("ridge baseline MAE", str(evaluation.baseline) if evaluation.baseline else "-"),
        ("CNN vs chance", format_p(evaluation.cnn_p)),
        ("MLflow run", parent[:12]),
    ]
    _fold_table(report, results, baselines)
    _finding_table(report, evaluation)
    how = CORRECTED[study.config.train.calibration]
    report.add_images("Predicted against true", [(SCATTER.format(column=target.column, how=how), scatter)])
    if study.config.search:
        search_table(tracker, report, parent, results)
    tracker.set_tags(
        parent,
        {
            "mlflow.note.content": f"**{study.config.name}**: {len(study.cohort.subjects)} subjects, "
            f"{study.config.cv.outer_folds}-fold CV, {target.column} regression. {evaluation.verdict}"
        },
    )
    return underfit


def held_out_gaps(study: Study, results: list[FoldResult]) -> pd.DataFrame:
    """Every fold's held-out predictions with the gap (predicted - true) and the gap corrected for regression to
    the mean by a line fitted on each fold's own training subjects (:func:`bias_corrected_gap`)."""
    target = study.cohort.target
    table = pd.concat([r.predictions.assign(fold=r.fold) for r in results], ignore_index=True)
    lines = {r.fold: (r.fit_score("fit_slope"), r.fit_score("fit_intercept")) for r in results}
    values, predicted = table[target.column].to_numpy(), table[target.prediction].to_numpy()
    return table.assign(
        gap=predicted - values, corrected_gap=bias_corrected_gap(values, predicted, table.fold.to_numpy(), lines)
    )


def pooled_estimates(evaluation: Evaluation, name: str) -> dict[str, float]:
    """The MLflow metrics of an evaluation with bootstrap intervals: ``pooled_<name>`` (e.g. pooled_mae) and every
    other score of each model (``pooled_r``, ``baseline_pooled_r``), each with ``_ci_low`` and ``_ci_high``; the
    p values against chance; the CNN-minus-baseline difference and its p."""
    estimates = {f"pooled_{name}": evaluation.cnn} | {
        f"{'baseline_' if score.startswith('baseline') else ''}pooled_{score.split('_', 1)[1]}": estimate
        for score, estimate in evaluation.scores.items()
    }
    metrics = {f"pooled_{name}_p_vs_chance": evaluation.cnn_p}
    if evaluation.baseline is not None:
        estimates[f"baseline_pooled_{name}"] = evaluation.baseline
        metrics |= {
            f"baseline_pooled_{name}_p_vs_chance": evaluation.baseline_p,
            f"cnn_minus_baseline_{name}": evaluation.difference.value,
            "cnn_minus_baseline_p": evaluation.difference_p,
        }
    for key, estimate in estimates.items():
        metrics |= {key: estimate.value, f"{key}_ci_low": estimate.low, f"{key}_ci_high": estimate.high}
    return metrics


def finding_rows(evaluation: Evaluation, baseline: str, names: dict[str, str]) -> pd.DataFrame:
    """The finding table of an evaluation with bootstrap intervals: each model's score (``evaluation.metric``) with
    its interval and p, their difference, then every other score (``names``: score -> its name here); ``baseline``
    names the baseline model (ridge, linear)."""
    rows = [("CNN", evaluation.metric, evaluation.cnn, format_p(evaluation.cnn_p))]
    if evaluation.baseline:
        rows += [
            (f"{baseline} baseline", evaluation.metric, evaluation.baseline, format_p(evaluation.baseline_p)),
            (f"CNN - {baseline}", evaluation.metric, evaluation.difference, format_p(evaluation.difference_p)),
        ]
    for key, estimate in evaluation.scores.items():
        model, score = key.split("_", 1)
        rows.append(("CNN" if model == "cnn" else f"{baseline} baseline", names[score], estimate, ""))
    return pd.DataFrame(
        [
            {"model": m, "score": s, "pooled": e.value, "95% CI low": e.low, "95% CI high": e.high, "p": p}
            for m, s, e, p in rows
        ]
    )


def _range(values: np.ndarray) -> str:
    return f"{values.min():.4g} to {values.max():.4g}, mean {values.mean():.4g}"


def _metrics(
    results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation, held_out: pd.DataFrame
) -> dict[str, float]:
    """The study run's metrics: each model's fold mean and spread, the pooled scores with their intervals, the
    tests, and the brain-age gap's spread before and after its correction."""
    metrics = cross_fold_summary([r.test_metrics for r in results], REGRESSION_SUMMARY)
    linear = cross_fold_summary([b.test_metrics for b in baselines], REGRESSION_SUMMARY)
    metrics |= {k.replace("test_", "baseline_test_", 1): v for k, v in linear.items()}
    metrics |= pooled_estimates(evaluation, "mae")
    return metrics | {
        "gap_sd": float(held_out.gap.std()),
        "corrected_gap_sd": float(held_out.corrected_gap.std()),
        "corrected_gap_mean": float(held_out.corrected_gap.mean()),
    }


SCATTER = (
    "Left: each held-out subject's {column} as predicted by the model of the fold that held it out, against the "
    "true one; on the grey identity line the prediction is exact. A slope below it is the regression to the mean "
    "every brain-age model shows (young predicted older, old younger). Right: the brain-age gap (predicted - "
    "true), before and after the field's bias correction (de Lange & Cole 2020): predicted {column} regressed on "
    "true {column} on each fold's own training subjects, never on a held-out one, and undone. {how}"
)
CORRECTED = {  # train.calibration
    "recenter": "Here each fold's predictions are corrected by that line already (train.calibration: recenter; "
    "the fold table shows it), so the two gaps coincide.",
    "none": "Here the predictions are the network's outputs as they are (train.calibration: none).",
}


def predicted_figure(held_out: pd.DataFrame, column: str, prediction: str, baseline: pd.Series) -> Figure:
    """Predicted against true values of the CNN (and the baseline), with the identity line; the gap's
    distribution before and after its correction."""
    fig = Figure(figsize=(9.0, 4.2), dpi=110)
    scatter, gaps = fig.subplots(1, 2)
    values = held_out[column].to_numpy()
    scatter.scatter(values, baseline.loc[held_out.subject_id], s=10, c="#999999", alpha=0.6, label="ridge baseline")
    for fold, rows in held_out.groupby("fold"):
        scatter.scatter(rows[column], rows[prediction], s=12, alpha=0.8, label=f"CNN, fold {fold}")
    low, high = values.min(), values.max()
    scatter.plot([low, high], [low, high], c="grey", lw=0.8, ls="--")
    scatter.set(xlabel=f"true {column}", ylabel=f"predicted {column}", title="held-out predictions")
    scatter.legend(fontsize=7)
    corrected = held_out.corrected_gap.dropna()  # none where a fold's line was too flat to undo
    bins = np.histogram_bin_edges(np.concatenate([held_out.gap, corrected]), bins=25)
    gaps.hist(held_out.gap, bins=bins, alpha=0.6, label=f"gap (sd {held_out.gap.std():.2f})")
    gaps.hist(corrected, bins=bins, alpha=0.6, label=f"corrected, {len(corrected)} subjects (sd {corrected.std():.2f})")
    gaps.axvline(0, c="grey", lw=0.8)
    gaps.set(xlabel=f"predicted - true {column}", ylabel="subjects", title="the gap")
    gaps.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fold_line(result: FoldResult) -> str:
    """How a regression fold tested, for the console's line of a finished fold."""
    m = result.test_metrics
    return f"training r {result.fit_score('fit_r'):.3f}; test MAE {m['mae']:.3f}, r {m['r']:.3f}"


def _console(
    results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation, underfit: str | None
) -> None:
    """Each fold's CNN and baseline side by side, their means, and the verdict."""
    summary = cross_fold_summary([r.test_metrics for r in results], REGRESSION_SUMMARY)
    linear = cross_fold_summary([b.test_metrics for b in baselines], REGRESSION_SUMMARY)
    say(f"{'fold':>6} {'CNN MAE':>10} {'ridge MAE':>10} {'CNN r':>8} {'CNN fits train (r)':>19}")
    for r, b in zip(results, baselines):
        say(
            f"{r.fold:>6} {r.test_metrics['mae']:>10.3f} {b.test_metrics['mae']:>10.3f} "
            f"{r.test_metrics['r']:>8.3f} {r.fit_score('fit_r'):>19.3f}"
        )
    say(
        f"{'all':>6} {summary['test_mae_mean']:.3f} ± {summary['test_mae_std']:.3f} "
        f"{linear['test_mae_mean']:.3f} ± {linear['test_mae_std']:.3f}"
    )
    say(evaluation.verdict)
    if underfit:
        say(underfit)


FOLDS = (
    "Each fold's final model was tested once on its fold's held-out subjects. The network learns the target "
    "standardized by the mean and sd of the fold's training subjects; its output, back in the target's unit (v), "
    "is, with train.calibration: recenter, corrected by the line of v on the true values of those training "
    "subjects (shown: slope, intercept; predicted = (v - intercept) / slope; left as it is when the slope is "
    "below {min_slope}). CNN training r: the final model's predictions against the true values of its own "
    "training subjects (no augmentation); below {underfit} it never fitted them. The linear baseline is a ridge "
    "regression on the same voxels, its penalty chosen on the same inner splits."
)


def _fold_table(report: Report, results: list[FoldResult], baselines: list[BaselineResult]) -> None:
    """Every fold's held-out metrics, the CNN beside the linear baseline."""
    rows = [
        {
            "fold": r.fold,
            "test subjects": len(r.predictions),
            "epochs": r.final_epochs,
            "CNN training r": r.fit_score("fit_r"),
            "line on training subjects": f"{r.fit_score('fit_raw_slope'):.2f}, {r.fit_score('fit_raw_intercept'):+.3g}",
            **{f"CNN {NAMES[m]}": r.test_metrics[m] for m in REGRESSION_SUMMARY},
            "ridge MAE": b.test_metrics["mae"],
            "ridge r": b.test_metrics["r"],
            "ridge penalty": 1 / b.C,
        }
        for r, b in zip(results, baselines)
    ]
    note = FOLDS.format(min_slope=MIN_SLOPE, underfit=UNDERFIT["r"])
    report.add_table("Held-out test metrics per outer fold: the CNN and a ridge baseline", pd.DataFrame(rows), note)


FINDING = (
    "Every subject's prediction comes from the one model that never saw it. Intervals: percentile bootstrap over "
    "subjects. p of the CNN and of the baseline: against chance, by {permutations} permutations of the true values "
    "within outer folds (one-sided: the share of permutations whose MAE is as low). p of CNN - ridge: a sign-flip "
    "permutation test of the mean paired difference of absolute errors (two-sided). RMSE, r and R^2 with their "
    "intervals below the MAE."
)


def _finding_table(report: Report, evaluation: Evaluation) -> None:
    """The pooled held-out MAE of each model with its interval and p, then the other scores."""
    table = finding_rows(evaluation, "ridge", SCORES)
    report.add_table(
        "Is it a finding? Pooled held-out errors with confidence intervals",
        table,
        FINDING.format(permutations=evaluation.permutations),
    )
