"""Several classes' results published (CN / MCI / AD, subtypes): held-out macro one-vs-rest ROC AUC of the CNN and
the multinomial baseline, the confusion matrices, and the verdict; the twin of :mod:`.classification` for more
than two classes, with one function per artifact or report section.
"""

from __future__ import annotations

import pandas as pd
from sklearn.metrics import confusion_matrix

from study.output.classification import DESCRIPTION, FINAL_FITS, log_baseline_runs, search_table
from study.output.console import say
from study.output.figures import confusion_figure, one_vs_rest, roc_figure
from study.output.regression import finding_rows, pooled_estimates
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study
from study.training.baseline import BaselineResult
from study.training.evaluation import Evaluation, format_p
from study.training.folds import FoldResult
from study.training.metrics import SEVERAL_CLASS_SUMMARY, cross_fold_summary, fit_check

NAMES = {"roc_auc": "macro ROC AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "brier": "Brier"}


def publish_multiclass(
    tracker: Tracker,
    report: Report,
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    evaluation: Evaluation,
) -> str | None:
    """The held-out results of the CNN and the multinomial baseline, and whether they are a finding; returns what
    the fit check found of folds that did not fit their own training subjects (None: every fold did)."""
    parent, target = study.state.parent_run, study.cohort.target
    fit, underfit = fit_check({r.fold: r.fit_accuracy for r in results})
    held_out = pd.concat([r.predictions.assign(fold=r.fold) for r in results], ignore_index=True)
    linear = pd.concat([b.predictions for b in baselines]).set_index("subject_id").loc[held_out.subject_id]
    labels = study.labels(held_out.subject_id.tolist())
    models = {"CNN": target.probabilities(held_out)} | ({"linear": target.probabilities(linear)} if baselines else {})
    tracker.log_metrics(parent, _metrics(results, baselines, evaluation))
    tracker.set_tags(parent, {"study.finding": evaluation.finding, "study.fit": fit})
    log_baseline_runs(tracker, study, baselines)
    tracker.log_table(parent, held_out, "predictions.tsv")
    curves = {k: v for model, p in models.items() for k, v in one_vs_rest(target.names, labels, p, model).items()}
    roc = roc_figure(curves, "ROC of each class against the rest (pooled)", target.names)
    matrices = {
        model: confusion_matrix(labels, p.argmax(1), labels=range(len(target.names))) for model, p in models.items()
    }
    confusion = confusion_figure(matrices, target.names, "held-out subjects, pooled over folds")
    tracker.log_figure(parent, roc, "roc.png")
    tracker.log_figure(parent, confusion, "confusion.png")
    _console(results, baselines, evaluation, underfit)
    report.banner = (
        "finding" if evaluation.finding == "yes" else "warning",
        " ".join(filter(None, [evaluation.verdict, underfit])),
    )
    folds = cross_fold_summary([r.test_metrics for r in results], SEVERAL_CLASS_SUMMARY)
    counts = ", ".join(f"{int((study.cohort.labels == k).sum())} {c}" for k, c in enumerate(target.names))
    report.summary = [
        ("subjects", f"{len(study.cohort.subjects)} ({counts})"),
        ("outer folds", str(len(results))),
        ("CNN macro ROC AUC (pooled, 95% CI)", str(evaluation.cnn)),
        ("CNN macro ROC AUC (fold mean ± sd)", f"{folds['test_roc_auc_mean']:.3f} ± {folds['test_roc_auc_std']:.3f}"),
        (
            f"CNN balanced accuracy (chance 1/{len(target.names)})",
            str(evaluation.scores["cnn_balanced_accuracy"]),
        ),
        ("linear baseline macro ROC AUC", str(evaluation.baseline) if evaluation.baseline else "-"),
        ("CNN vs chance", format_p(evaluation.cnn_p)),
        ("MLflow run", parent[:12]),
    ]
    _fold_table(report, study, results, baselines)
    _finding_table(report, evaluation)
    report.add_images(
        "ROC curves and confusion matrices",
        [(ROC.format(classes=", ".join(target.names)), roc), (CONFUSION, confusion)],
    )
    if study.config.search:
        search_table(tracker, report, parent, results)
    note = DESCRIPTION.format(
        name=study.config.name, subjects=len(study.cohort.subjects), folds=len(results), verdict=evaluation.verdict
    )
    tracker.set_tags(parent, {"mlflow.note.content": note})
    return underfit


def _metrics(results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation) -> dict[str, float]:
    """The study run's metrics: each model's fold mean and spread, the pooled scores with their intervals (the
    macro ROC AUC is ``pooled_roc_auc``, as of two classes), and the tests."""
    metrics = cross_fold_summary([r.test_metrics for r in results], SEVERAL_CLASS_SUMMARY)
    linear = cross_fold_summary([b.test_metrics for b in baselines], SEVERAL_CLASS_SUMMARY)
    metrics |= {k.replace("test_", "baseline_test_", 1): v for k, v in linear.items()}
    return metrics | pooled_estimates(evaluation, "roc_auc")


ROC = (
    "Each class against the rest ({classes}), for every held-out subject pooled over folds: the CNN's curves and "
    "the multinomial baseline's. A model's macro ROC AUC is the mean of the areas under its curves, each class "
    "counting the same."
)
CONFUSION = (
    "Confusion matrices of the held-out subjects (rows: true class; columns: the class each model called most "
    "probable), with each row's shares: the diagonal is each class's recall, whose mean is the balanced accuracy."
)


def _console(
    results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation, underfit: str | None
) -> None:
    """Each fold's CNN and baseline side by side, and the verdict."""
    say(f"{'fold':>6} {'CNN macro AUC':>14} {'linear AUC':>11} {'CNN bal. acc.':>14} {'CNN fits train':>15}")
    for r, b in zip(results, baselines):
        say(
            f"{r.fold:>6} {r.test_metrics['roc_auc']:>14.3f} {b.test_metrics['roc_auc']:>11.3f} "
            f"{r.test_metrics['balanced_accuracy']:>14.3f} {r.fit_accuracy:>15.2f}"
        )
    say(evaluation.verdict)
    if underfit:
        say(underfit)


FOLDS = (
    "{final_fit} Each final model was tested once on its fold's held-out subjects. CNN training accuracy: the final "
    "model on its own training subjects (no augmentation); near chance means it never fitted them. The linear "
    "baseline is a multinomial l2 logistic regression on the same voxels, its C chosen on the same inner splits by "
    "macro ROC AUC. CNN calibration: the temperature and each class's bias added to its logit before softmax "
    "(1 and 0 leave softmax's probabilities as they are; none: too few subjects, or train.calibration: none). "
    "Brier score of several classes: the squared distance of the probabilities from the true class, summed over "
    "classes (0 is perfect, 2 the worst; a model that says 1/{classes} to each scores {uniform:.2f})."
)


def _fold_table(report: Report, study: Study, results: list[FoldResult], baselines: list[BaselineResult]) -> None:
    """Every fold's held-out metrics, the CNN beside the linear baseline."""
    rows = [
        {
            "fold": r.fold,
            "test subjects": len(r.predictions),
            "epochs": r.final_epochs,
            "CNN training accuracy": r.fit_accuracy,
            **{f"CNN {NAMES[m]}": r.test_metrics.get(m, float("nan")) for m in SEVERAL_CLASS_SUMMARY},
            "CNN calibration (temperature; biases)": f"{r.calibration.temperature:.2f}; "
            + ", ".join(f"{b:+.2f}" for b in r.calibration.class_bias)
            if r.calibration.subjects
            else "none",
            "linear macro ROC AUC": b.test_metrics["roc_auc"],
            "linear balanced accuracy": b.test_metrics["balanced_accuracy"],
            "linear C": b.C,
        }
        for r, b in zip(results, baselines)
    ]
    classes = len(study.cohort.target.names)
    note = FOLDS.format(final_fit=FINAL_FITS[study.config.train.final_fit], classes=classes, uniform=1 - 1 / classes)
    report.add_table("Held-out test metrics per outer fold: the CNN and a linear baseline", pd.DataFrame(rows), note)


FINDING = (
    "Every subject's prediction comes from the one model that never saw it. Macro ROC AUC: each class against the "
    "rest, averaged over classes. Intervals: percentile bootstrap, subjects resampled within each class. p of the "
    "CNN and of the baseline: against chance, by {permutations} label permutations within outer folds (one-sided). "
    "p of CNN - linear: the paired bootstrap's percentile test of the difference (two-sided). Balanced accuracy "
    "(chance: 1 / the number of classes) with its interval below."
)


def _finding_table(report: Report, evaluation: Evaluation) -> None:
    """The pooled held-out macro ROC AUC of each model with its interval and p, then the balanced accuracies."""
    table = finding_rows(evaluation, "linear", {"balanced_accuracy": "balanced accuracy"})
    note = FINDING.format(permutations=evaluation.permutations)
    report.add_table("Is it a finding? Pooled held-out macro ROC AUC with confidence intervals", table, note)
