"""Classification metrics of a held-out fold (class 1, e.g. male, is the positive class)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from study.training.calibration import brier_score


def classification_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC, sensitivity (class 1), specificity (class 0), the Brier score and the
    share of subjects predicted class 1; ``p`` is P(class 1), a subject is predicted class 1 at p >= 0.5."""
    labels = np.asarray(labels)
    predicted = (np.asarray(p) >= 0.5).astype(int)
    (tn, fp), (fn, tp) = confusion_matrix(labels, predicted, labels=[0, 1])
    both = len(np.unique(labels)) == 2
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if both else float("nan"),
        "roc_auc": float(roc_auc_score(labels, p)) if both else float("nan"),
        "sensitivity": float(tp / max(tp + fn, 1)),
        "specificity": float(tn / max(tn + fp, 1)),
        "brier": brier_score(labels, p),
        "predicted_positive_rate": float(predicted.mean()) if len(predicted) else float("nan"),
        "true_negatives": float(tn),
        "false_positives": float(fp),
        "false_negatives": float(fn),
        "true_positives": float(tp),
    }


SUMMARY_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "brier")


def cross_fold_summary(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Mean and standard deviation over outer folds of each of :data:`SUMMARY_METRICS`."""
    summary = {}
    for name in SUMMARY_METRICS:
        values = np.array([m.get(name, np.nan) for m in per_fold])  # folds kept before a metric existed lack it
        summary[f"test_{name}_mean"] = float(np.nanmean(values))
        summary[f"test_{name}_std"] = float(np.nanstd(values))
    return summary
