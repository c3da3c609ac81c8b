"""Brain figures (nilearn, over the MNI152 template) and the study's HTML report.

The report is one self-contained ``report.html`` (figures embedded) that shows
the study at a glance: test metrics, ROC, where each method looks, the male-
vs-female difference, region rankings, ground-truth scores, method agreement
and sanity checks.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

METHOD_TITLES = {
    "gradcam": "Grad-CAM",
    "guided_backprop": "Guided Backprop",
    "perturbation": "Meaningful Perturbations",
    "guided_gradcam": "Guided Grad-CAM",
}


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def brain_figure(image: nib.Nifti1Image, title: str, kind: str = "ortho", symmetric: bool = False,
                 top_percent: float = 10.0) -> bytes:
    """A map over the MNI152 template, orthogonal slices or a glass brain; PNG bytes.

    Only the top ``top_percent`` of non-zero voxels are coloured (all of them
    for a symmetric, already thresholded statistic map), so the anatomy and
    the strongest regions stay readable.
    """
    from nilearn import plotting

    figure = Figure(figsize=(6.2, 2.3))
    data = np.abs(np.asarray(image.dataobj))
    values = data[data != 0]
    vmax = float(np.percentile(values, 99.5)) if values.size else 1.0
    threshold = 1e-6 if symmetric or not values.size else float(np.percentile(values, 100 - top_percent))
    common = {"figure": figure, "title": title, "colorbar": True, "vmax": vmax, "threshold": threshold}
    if kind == "glass":
        plotting.plot_glass_brain(image, plot_abs=not symmetric, cmap="RdBu_r" if symmetric else "hot",
                                  vmin=-vmax if symmetric else 0, **common)
    else:
        plotting.plot_stat_map(image, display_mode="ortho", cmap="RdBu_r" if symmetric else "hot",
                               symmetric_cbar=symmetric, **common)
    return png_bytes(figure)


def agreement_figure(agreement: pd.DataFrame, methods: list[str]) -> bytes:
    """Heatmap of the per-subject Spearman correlation between every pair of methods."""
    index = {m: i for i, m in enumerate(methods)}
    matrix = np.eye(len(methods))
    for row in agreement.itertuples():
        i, j = index[row.method_a], index[row.method_b]
        matrix[i, j] = matrix[j, i] = row.spearman_subject_mean
    figure = Figure(figsize=(1.3 * len(methods) + 1.8, 1.1 * len(methods) + 1.2))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
    labels = [METHOD_TITLES.get(m, m) for m in methods]
    ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), labels)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    ax.set_title("Spearman correlation of maps (mean over subjects)", fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046)
    return png_bytes(figure)


def sanity_figure(cascade: pd.DataFrame) -> bytes:
    """Similarity to the original maps as layers are randomized from the top."""
    figure = Figure(figsize=(6.5, 3.0))
    axes = figure.subplots(1, 2, sharey=True)
    steps = cascade.drop_duplicates("step").sort_values("step")
    for ax, metric in zip(axes, ("spearman", "ssim")):
        for method, rows in cascade.groupby("method"):
            rows = rows.sort_values("step")
            ax.plot([0, *rows.step], [1.0, *rows[metric]], marker="o", label=METHOD_TITLES.get(method, method))
        ax.set_xticks([0, *steps.step], ["original", *steps.randomized_down_to], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(-0.2, 1.05)
        ax.set_title(f"{metric} to original maps", fontsize=9)
        ax.axhline(0, c="grey", lw=0.6)
    axes[0].legend(fontsize=7)
    figure.suptitle("Cascading model-parameter randomization", fontsize=10)
    figure.tight_layout()
    return png_bytes(figure)


@dataclass
class Report:
    """The parts of the HTML report, filled in as the study goes."""

    title: str
    summary: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, HTML body)

    def add_table(self, heading: str, table: pd.DataFrame, note: str = "") -> None:
        body = (f"<p>{html.escape(note)}</p>" if note else "") + table.to_html(
            index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="table")
        self.sections.append((heading, body))

    def add_images(self, heading: str, images: list[tuple[str, bytes]], note: str = "") -> None:
        figures = "".join(
            f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, png in images)
        self.sections.append((heading, (f"<p>{html.escape(note)}</p>" if note else "") + f'<div class="figs">{figures}</div>'))

    def html(self) -> str:
        summary = "".join(f"<div><span>{html.escape(k)}</span><b>{html.escape(v)}</b></div>" for k, v in self.summary)
        toc = "".join(f'<a href="#s{i}">{html.escape(h)}</a>' for i, (h, _) in enumerate(self.sections))
        body = "".join(f'<section id="s{i}"><h2>{html.escape(h)}</h2>{b}</section>'
                       for i, (h, b) in enumerate(self.sections))
        made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}}
header{{background:#1d2330;color:#fff;padding:18px 28px}} header h1{{margin:0;font-size:22px}}
header p{{margin:4px 0 0;color:#b8c0d0;font-size:13px}}
nav{{padding:8px 28px;background:#e9ecf2;font-size:13px}} nav a{{margin-right:16px;color:#2a4d9b}}
.summary{{display:flex;flex-wrap:wrap;gap:10px;padding:16px 28px}}
.summary div{{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002}}
.summary span{{display:block;font-size:12px;color:#5a6478}} .summary b{{font-size:18px}}
section{{background:#fff;margin:14px 28px;padding:14px 20px;border-radius:6px;box-shadow:0 1px 2px #0002}}
h2{{font-size:17px;margin:4px 0 10px}} p{{font-size:13px;color:#3a4356;max-width:70em}}
.table{{border-collapse:collapse;font-size:13px}} .table th,.table td{{padding:4px 10px;border-bottom:1px solid #e3e6ec;text-align:right}}
.table th{{background:#f0f2f6}} .table td:first-child,.table th:first-child{{text-align:left}}
.figs{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} figure img{{width:620px;max-width:100%;border:1px solid #e3e6ec}}
figcaption{{font-size:12px;color:#5a6478}}
</style></head><body>
<header><h1>{html.escape(self.title)}</h1><p>made {made} by study</p></header>
<nav>{toc}</nav><div class="summary">{summary}</div>{body}</body></html>"""
