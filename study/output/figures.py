"""The figures of a study: ROC curves, confusion matrices, brain maps, method agreement, sanity checks.

Each function returns a matplotlib ``Figure`` made without pyplot, so no
backend is chosen and nothing global changes.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from study.attribution.methods import title
from study.training.calibration import reliability_bins


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, classes: tuple[str, ...] = ("female", "male")
) -> Figure:
    """ROC curves, one per name: ``{name: (labels, P(class 1))}``; class 1 of ``classes`` is positive (of several
    classes, each curve's class against the rest: :func:`one_vs_rest`)."""
    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    ax = fig.subplots()
    for name, (labels, scores) in curves.items():
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, lw=1.5, label=name)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    negative, positive = classes if len(classes) == 2 else ("the rest", "the class")
    ax.set(
        xlabel=f"1 - specificity ({negative} called {positive})",
        ylabel=f"sensitivity ({positive} called {positive})",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def one_vs_rest(
    classes: tuple[str, ...], labels: np.ndarray, p: np.ndarray, name: str = ""
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`roc_figure`'s curves of P(class 1) [subjects], or of several classes' P [subjects, classes] one curve
    per class against the rest (``name``, then the class)."""
    if np.ndim(p) == 1:
        return {name: (labels, p)}
    return {f"{name} {c}".strip(): (np.asarray(labels) == k, p[:, k]) for k, c in enumerate(classes)}


def decided(p: np.ndarray) -> np.ndarray:
    """The class each subject is called: P(class 1) >= 0.5, or of several classes the most probable."""
    return np.argmax(p, axis=1) if np.ndim(p) == 2 else (np.asarray(p) >= 0.5).astype(int)


def reliability_figure(
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], classes: tuple[str, str] = ("female", "male")
) -> Figure:
    """Reliability diagrams side by side, one panel per title: ``{title: {name: (labels, P(class 1))}}``.

    Each curve is the observed share of class 1 against the mean predicted P(class 1) in ten equal bins
    (:func:`~study.training.calibration.reliability_bins`), each point sized by its subjects; on the diagonal,
    probabilities mean what they say.
    """
    fig = Figure(figsize=(4.0 * len(panels), 4.2), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    positive = classes[1]
    for ax, (heading, curves) in zip(axes, panels.items()):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        for name, (labels, p) in curves.items():
            predicted, observed, counts = reliability_bins(labels, p)
            pooled = name.startswith("pooled")
            ax.plot(predicted, observed, lw=2.2 if pooled else 1.0, c="black" if pooled else None, label=name)
            ax.scatter(predicted, observed, s=6 + 60 * counts / counts.max(), c="black" if pooled else None, zorder=3)
        ax.set(xlabel=f"predicted P({positive})", title=heading, xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.legend(loc="upper left", fontsize=7)
    axes[0].set_ylabel(f"observed share of {positive}")
    fig.tight_layout()
    return fig


def confusion_figure(
    matrices: dict[str, np.ndarray], classes: tuple[str, ...] = ("female", "male"), title: str = ""
) -> Figure:
    """Confusion matrices side by side, one per name (rows: true class, columns: predicted class), each cell's
    count with its share of the true class."""
    fig = Figure(figsize=(0.4 + (1.1 + 0.75 * len(classes)) * len(matrices), 0.9 + 0.75 * len(classes)), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, (name, matrix) in zip(axes, matrices.items()):
        shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(count)}\n{shares[i, j]:.0%}", ha="center", va="center", color=color, fontsize=9)
        ticks = list(range(len(classes)))
        ax.set(xticks=ticks, yticks=ticks, xticklabels=list(classes), yticklabels=list(classes))
        ax.set(xlabel="predicted", ylabel="true", title=name)
        ax.tick_params(axis="x", labelrotation=30 if len(classes) > 2 else 0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def top_threshold(values: np.ndarray, percent: float = 10.0) -> float:
    """The |value| above which the top ``percent`` of the non-zero voxels lie: where a map's figure (and the
    report's viewer, at first) starts to colour it."""
    nonzero = np.abs(values[values != 0])
    return float(np.percentile(nonzero, 100 - percent)) if nonzero.size else 0.0


def brain_figure(
    image: nib.Nifti1Image, title: str, kind: str = "ortho", symmetric: bool = False, top_percent: float = 10.0
) -> Figure:
    """A map over the MNI152 template, orthogonal slices or a glass brain.

    Only the top ``top_percent`` of non-zero voxels are coloured (all of them
    for a symmetric, already thresholded statistic map), so the anatomy and
    the strongest regions stay readable. A map with no voxel left (a t map
    where none survives) is drawn as the empty brain, its title saying so,
    instead of nilearn's warnings on the console.
    """
    from nilearn import datasets, plotting

    figure = Figure(figsize=(6.2, 2.3))
    data = np.abs(np.asarray(image.dataobj))
    values = data[data != 0]
    if not values.size:
        title = f"{title}: no voxel survives"
        if kind == "glass":
            plotting.plot_glass_brain(None, figure=figure, title=title)
        else:
            template = datasets.load_mni152_template()
            plotting.plot_anat(template, figure=figure, title=title, display_mode="ortho", colorbar=False)
        return figure
    vmax = float(np.percentile(values, 99.5))
    threshold = 1e-6 if symmetric else top_threshold(data, top_percent)
    common = {"figure": figure, "title": title, "colorbar": True, "vmax": vmax, "threshold": threshold}
    if kind == "glass":
        plotting.plot_glass_brain(
            image,
            plot_abs=not symmetric,
            cmap="RdBu_r" if symmetric else "hot",
            vmin=-vmax if symmetric else 0,
            **common,
        )
    else:
        plotting.plot_stat_map(
            image, display_mode="ortho", cmap="RdBu_r" if symmetric else "hot", symmetric_cbar=symmetric, **common
        )
    return figure


def agreement_figure(agreement: pd.DataFrame, methods: list[str]) -> Figure:
    """Heatmap of the per-subject Spearman correlation between every pair of methods."""
    index = {m: i for i, m in enumerate(methods)}
    matrix = np.eye(len(methods))
    for row in agreement.itertuples():
        i, j = index[row.method_a], index[row.method_b]
        matrix[i, j] = matrix[j, i] = row.spearman_subject_mean
    figure = Figure(figsize=(1.3 * len(methods) + 1.8, 1.1 * len(methods) + 1.2))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
    labels = [title(m) for m in methods]
    ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), labels)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    ax.set_title("Spearman correlation of maps (mean over subjects)", fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046)
    return figure


def sanity_figure(cascade: pd.DataFrame) -> Figure:
    """Similarity to the original maps as layers are randomized from the top."""
    figure = Figure(figsize=(8.5, 3.0))
    axes = figure.subplots(1, 2, sharey=True)
    steps = cascade.drop_duplicates("step").sort_values("step")
    for ax, metric in zip(axes, ("spearman", "ssim")):
        for method, rows in cascade.groupby("method"):
            rows = rows.sort_values("step")
            ax.plot([0, *rows.step], [1.0, *rows[metric]], marker="o", label=title(method))
        ax.set_xticks([0, *steps.step], ["original", *steps.randomized_down_to], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(min(-0.2, float(cascade[["spearman", "ssim"]].min().min()) - 0.05), 1.05)
        ax.set_title(f"{metric} to original maps", fontsize=9)
        ax.axhline(0, c="grey", lw=0.6)
    figure.suptitle("Cascading model-parameter randomization", fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.78, 1))  # the legend beside the plots, where no curve runs under it
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
    return figure
