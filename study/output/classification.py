"""The classification stage published: held-out metrics of the CNN and the linear baseline, and the verdict."""

from __future__ import annotations

import pandas as pd

from study.output.console import say
from study.output.figures import roc_figure
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study
from study.training.baseline import BaselineResult
from study.training.crossval import FoldResult
from study.training.evaluation import Evaluation, fit_check, format_p
from study.training.metrics import SUMMARY_METRICS, cross_fold_summary

FINAL_FITS = {
    "all_subjects": "Each fold's final model trained on all of its training subjects for the configured epochs.",
    "early_stopped": "Each fold chose its number of epochs on its first inner split (early stopping), then trained "
    "its final model on all of its training subjects for that many epochs.",
    "inner_split": "Each fold's final model is the one chosen on its first inner split (early stopping); it never "
    "saw that split's validation subjects (one inner fold of the fold's training subjects).",
}


def publish_classification(
    tracker: Tracker,
    report: Report,
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    evaluation: Evaluation,
) -> str | None:
    """The held-out results of the CNN and the linear baseline, and whether they are a finding."""
    parent, state = study.state.parent_run, study.state
    summary = cross_fold_summary([r.test_metrics for r in results])
    linear = cross_fold_summary([b.test_metrics for b in baselines])
    tracker.log_metrics(parent, summary)
    tracker.log_metrics(parent, {k.replace("test_", "baseline_test_", 1): v for k, v in linear.items()})
    tracker.log_metrics(parent, _evaluation_metrics(evaluation))
    fit, underfit = fit_check({r.fold: r.fit_accuracy for r in results})
    tracker.set_tags(parent, {"study.finding": evaluation.finding, "study.fit": fit})
    for baseline in baselines:
        if baseline.fold in state.baseline_runs:
            continue
        run_id = tracker.start_run(
            f"baseline fold {baseline.fold}",
            {"study.level": "baseline", "study.model": "linear", "study.fold": str(baseline.fold)},
            parent=parent,
        )
        tracker.log_params(run_id, {"model": "l2 logistic regression", "C": baseline.C, "fold": baseline.fold})
        tracker.log_metrics(run_id, baseline.test_metrics, prefix="test_")
        tracker.log_table(run_id, baseline.predictions, "predictions.tsv")
        tracker.end(run_id)
        state.baseline_runs[baseline.fold] = run_id
        study.save_state()
    predictions = pd.concat([r.predictions.assign(fold=r.fold) for r in results])
    tracker.log_table(parent, predictions, "predictions.tsv")
    classes = study.cohort.classes
    curves = {
        f"{model}, fold {r.fold}": (study.labels(r.predictions.subject_id.tolist()), r.predictions[classes.p])
        for model, fold_results in (("CNN", results), ("linear", baselines))
        for r in fold_results
    }
    roc = roc_figure(curves, "ROC per outer fold: CNN and linear baseline", classes.names)
    tracker.log_figure(parent, roc, "roc.png")

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

    report.banner = (
        "finding" if evaluation.finding == "yes" else "warning",
        evaluation.verdict + (f" {underfit}" if underfit else ""),
    )
    report.summary = [
        ("subjects", f"{len(study.cohort.subjects)} ({int(study.cohort.labels.sum())} {classes.positive})"),
        ("outer folds", str(len(results))),
        ("CNN ROC AUC (pooled, 95% CI)", str(evaluation.cnn)),
        ("linear baseline ROC AUC", str(evaluation.baseline) if evaluation.baseline else "-"),
        ("CNN vs chance", format_p(evaluation.cnn_p)),
        ("MLflow run", parent[:12]),
    ]
    table = pd.DataFrame(
        [
            {
                "fold": r.fold,
                "test subjects": len(r.predictions),
                "epochs (inner split)": r.epochs("select") or "-",
                "epochs (refit)": r.epochs("refit") or "-",
                "CNN training accuracy": r.fit_accuracy,
                **{f"CNN {m}": r.test_metrics[m] for m in SUMMARY_METRICS},
                "linear ROC AUC": b.test_metrics["roc_auc"],
                "linear balanced_accuracy": b.test_metrics["balanced_accuracy"],
                "linear C": b.C,
            }
            for r, b in zip(results, baselines)
        ]
    )
    report.add_table(
        "Held-out test metrics per outer fold: the CNN and a linear baseline",
        table,
        f"{FINAL_FITS[study.config.train.final_fit]} Each final model was tested once on its fold's "
        "held-out subjects. CNN training accuracy: the final model on its own training subjects (no "
        "augmentation); near 0.5 means it never fitted them. The linear baseline is an l2 logistic "
        "regression on the same voxels, its C chosen on the same inner splits.",
    )
    significance = pd.DataFrame(
        [  # p: the CNN and the baseline vs chance; their difference by DeLong
            {
                "model": "CNN",
                "pooled ROC AUC": evaluation.cnn.auc,
                "95% CI low": evaluation.cnn.low,
                "95% CI high": evaluation.cnn.high,
                "p": format_p(evaluation.cnn_p),
            },
            *(
                [
                    {
                        "model": "linear baseline",
                        "pooled ROC AUC": evaluation.baseline.auc,
                        "95% CI low": evaluation.baseline.low,
                        "95% CI high": evaluation.baseline.high,
                        "p": format_p(evaluation.baseline_p),
                    },
                    {
                        "model": "CNN - linear",
                        "pooled ROC AUC": evaluation.difference.auc,
                        "95% CI low": evaluation.difference.low,
                        "95% CI high": evaluation.difference.high,
                        "p": format_p(evaluation.difference_p),
                    },
                ]
                if evaluation.baseline
                else []
            ),
        ]
    )
    confound = ""
    if evaluation.brain_volume is not None:
        confound = (
            f" Confound check: brain volume on the study grid alone separates the classes with ROC "
            f"AUC {evaluation.brain_volume} (0.5: not at all; above: {classes.positive} larger). A high "
            "value means a model can succeed from brain size, not from where the brain differs. It "
            "measures the size left after registration to MNI152: near 0.5 does not rule out a head-size "
            "difference in the native images, which a nonlinear registration largely removes."
        )
    report.add_table(
        "Is it a finding? Pooled held-out ROC AUC with confidence intervals",
        significance,
        "Every subject's prediction comes from the one model that never saw it. Intervals: DeLong. "
        f"p of the CNN and of the baseline: against chance, by {evaluation.permutations} label "
        "permutations within outer folds (one-sided). p of CNN - linear: DeLong's paired test of the "
        "difference (two-sided)." + confound,
    )
    report.add_images("ROC curves", [(f"ROC per outer fold ({classes.positive} = positive)", roc)])
    if study.config.search:
        chosen = pd.DataFrame(
            [{"fold": r.fold, **{k: str(v) for k, v in sorted(r.search.best.items())}} for r in results if r.search]
        )
        tracker.log_table(parent, chosen, "search_best_configs.tsv")
        report.add_table(
            "Architecture search: the best configuration of each outer fold",
            chosen,
            "Each fold searched on its own training subjects only; stable choices across folds "
            "mean the architecture does not depend on which subjects were held out.",
        )
    tracker.set_tags(parent, {"mlflow.note.content": _description(study, evaluation)})
    return underfit


def _evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
    metrics = {
        "pooled_roc_auc": evaluation.cnn.auc,
        "pooled_roc_auc_ci_low": evaluation.cnn.low,
        "pooled_roc_auc_ci_high": evaluation.cnn.high,
        "pooled_roc_auc_p_vs_chance": evaluation.cnn_p,
    }
    if evaluation.brain_volume is not None:
        metrics["brain_volume_roc_auc"] = evaluation.brain_volume.auc
    if evaluation.baseline is not None:
        metrics |= {
            "baseline_pooled_roc_auc": evaluation.baseline.auc,
            "baseline_pooled_roc_auc_p_vs_chance": evaluation.baseline_p,
            "cnn_minus_baseline_roc_auc": evaluation.difference.auc,
            "cnn_minus_baseline_p": evaluation.difference_p,
        }
    return metrics


def _description(study: Study, evaluation: Evaluation) -> str:
    """The study run's description in the MLflow UI (markdown)."""
    return (
        f"**{study.config.name}**: {len(study.cohort.subjects)} subjects, {study.config.cv.outer_folds}-fold CV. "
        f"{evaluation.verdict}\n\n"
        "Open `report.html` under Artifacts for the maps, method agreement and sanity checks; "
        "expand this run to see one child run per outer fold and per fold of the linear baseline."
    )
