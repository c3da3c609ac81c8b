"""Matplotlib figures of classification results (ROC curves, confusion matrices)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """ROC curves, one per name: ``{name: (labels, p_male)}`` (male = positive)."""
    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    ax = fig.subplots()
    for name, (labels, scores) in curves.items():
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, lw=1.5, label=name)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 - specificity (females called male)", ylabel="sensitivity (males called male)",
           title=title, xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(metrics: dict[str, float], title: str) -> Figure:
    """The 2x2 confusion matrix of a fold (rows: true sex, columns: predicted sex)."""
    matrix = np.array([[metrics["true_negatives"], metrics["false_positives"]],
                       [metrics["false_negatives"], metrics["true_positives"]]])
    fig = Figure(figsize=(3.4, 3.0), dpi=110)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, int(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["female", "male"], yticklabels=["female", "male"],
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig
