"""Metrics of a held-out fold: of two classes (class 1, e.g. male, is the positive class), of several classes
(each against the rest), or of a regression target (e.g. age) in its unit."""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from scipy.special import expit, log_softmax, softmax
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, mean_absolute_error, r2_score, roc_auc_score

from study.training.calibration import Calibration, brier_score


def classification_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC, sensitivity (class 1), specificity (class 0), the Brier score and the
    share of subjects predicted class 1; ``p`` is P(class 1), a subject is predicted class 1 at p >= 0.5. Of
    several classes (``p`` [subjects, classes]): :func:`several_class_metrics`."""
    labels = np.asarray(labels)
    if np.ndim(p) == 2:
        return several_class_metrics(labels, p)
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


def several_class_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Of several classes' probabilities [subjects, classes]: accuracy and balanced accuracy of the most probable
    class, the macro one-vs-rest ROC AUC (NaN unless every class is present) and the multi-class Brier score
    (the mean over subjects of the summed squared errors; 0 is perfect)."""
    labels, p = np.asarray(labels, dtype=np.int64), np.asarray(p, dtype=np.float64)
    predicted, every = p.argmax(1), len(np.unique(labels)) == p.shape[1]
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)) if len(labels) else float("nan"),
        "roc_auc": float(roc_auc_score(labels, p, multi_class="ovr", average="macro")) if every else float("nan"),
        "brier": float(np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1))),
    }


def regression_metrics(values: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R^2 (scikit-learn's: 1 - residual / total sum of squares, negative when worse
    than predicting the mean) of ``predicted`` for the true ``values``, and the mean error (predicted - true)."""
    values, predicted = np.asarray(values, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    varied = len(values) > 1 and values.std() > 0 and predicted.std() > 0
    return {
        "mae": float(mean_absolute_error(values, predicted)),
        "rmse": float(np.sqrt(np.mean((predicted - values) ** 2))),
        "r": float(scipy.stats.pearsonr(values, predicted)[0]) if varied else float("nan"),
        "r2": float(r2_score(values, predicted)) if len(values) > 1 else float("nan"),
        "mean_error": float(np.mean(predicted - values)),
    }


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """The training loss (``train.loss``: L1, or Huber with delta 1) of standardized outputs [batch] and targets:
    what a regression network is trained on and validated by."""
    return F.l1_loss(outputs, targets) if loss == "l1" else F.huber_loss(outputs, targets, delta=1.0)


def _float64(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def epoch_scores(
    outputs: np.ndarray, labels: np.ndarray, prefix: str, standardization: Calibration | None, loss: str
) -> dict[str, float]:
    """Loss, accuracy and ROC AUC of softmax's probabilities (uncalibrated) for ``labels``; for a regression
    target (``standardization``), the ``loss`` on standardized values, and the MAE, R^2 and the line of predicted
    on true values in the target's unit."""
    if standardization is not None:
        values, predicted = standardization.values(labels), standardization.values(outputs)
        scores = regression_metrics(values, predicted)
        slope, intercept = np.polyfit(values, predicted, 1) if len(values) > 1 else (np.nan, np.nan)
        return {  # the line of predicted on true values: a brain-age study's bias correction (fit_slope, ...)
            f"{prefix}_loss": float(regression_loss(_float64(outputs), _float64(labels), loss)),
            f"{prefix}_mae": scores["mae"],
            f"{prefix}_r": scores["r"],
            f"{prefix}_r2": scores["r2"],
            f"{prefix}_slope": float(slope),
            f"{prefix}_intercept": float(intercept),
        }
    if np.ndim(outputs) == 2:  # several classes' logits about their mean
        log_p = log_softmax(outputs, axis=1)
        scores = several_class_metrics(labels, softmax(outputs, axis=1))
        return {
            f"{prefix}_loss": float(-np.mean(log_p[np.arange(len(labels)), np.asarray(labels, int)])),
            f"{prefix}_accuracy": scores["accuracy"],
            f"{prefix}_roc_auc": scores["roc_auc"],
        }
    p = expit(outputs)
    eps = 1e-7
    loss_value = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
    scores = classification_metrics(labels, p)
    return {
        f"{prefix}_loss": float(loss_value),
        f"{prefix}_accuracy": scores["accuracy"],
        f"{prefix}_roc_auc": scores["roc_auc"],
    }


# a final model below this accuracy (a regression's Pearson r, which its correction leaves as it is) on its own
# training subjects never fitted them
UNDERFIT = {"accuracy": 0.6, "r": 0.7}
FIT_SCORE = {"classification": "fit_accuracy", "regression": "fit_r"}  # how a final model fits its subjects
SUMMARY_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "brier")
SEVERAL_CLASS_SUMMARY = ("roc_auc", "balanced_accuracy", "accuracy", "brier")
REGRESSION_SUMMARY = ("mae", "rmse", "r", "r2")


def cross_fold_summary(per_fold: list[dict[str, float]], names: tuple[str, ...] = SUMMARY_METRICS) -> dict[str, float]:
    """Mean and standard deviation over outer folds of each of ``names`` (:data:`SUMMARY_METRICS`, or
    :data:`REGRESSION_SUMMARY`)."""
    summary = {}
    for name in names:
        values = np.array([m.get(name, np.nan) for m in per_fold])  # folds kept before a metric existed lack it
        summary[f"test_{name}_mean"] = float(np.nanmean(values))
        summary[f"test_{name}_std"] = float(np.nanstd(values))
    return summary


def fit_check(fit_scores: dict[int, float], score: str = "accuracy") -> tuple[str, str | None]:
    """Did every fold's final CNN fit its own training subjects? ``(study.fit tag, message or None)``.

    ``fit_scores`` maps each outer fold to its final model's ``score`` (accuracy; a regression's r) on its own
    training subjects (eval mode, no augmentation). Below :data:`UNDERFIT` of it the training failed to optimize
    (not overfitting), and held-out results say nothing about what a CNN could learn from these images.
    """
    threshold = UNDERFIT[score]
    under = {fold: a for fold, a in sorted(fit_scores.items()) if not a >= threshold}
    if not under:
        return "fits", None
    listing = ", ".join(f"fold {fold} ({a:.2f})" for fold, a in under.items())
    return "underfit", (
        f"The CNN did not fit its own training subjects in {len(under)} of {len(fit_scores)} folds: training "
        f"{score} {listing}, below {threshold}. That is a failure to optimize, not overfitting. Try more "
        "epochs (train.epochs), another learning rate (train.lr), weaker augmentation (train.augment.strength) or "
        "less dropout (model.dropout), or let the inner CV choose them (search.space: lr, epochs, "
        "augment_strength, dropout; see tune_configs/demo_search.yaml)."
    )
