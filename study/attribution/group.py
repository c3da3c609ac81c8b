"""Group analysis of attribution maps: normalization, group means, method agreement,
localization against a ground truth, and region tables (the test is in :mod:`stats`).

All functions work on maps restricted to brain voxels: arrays [subjects, voxels].
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def unmask(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Values of the brain voxels back on the grid of ``brain`` (zero outside it)."""
    volume = np.zeros(brain.shape, dtype=np.float32)
    volume[brain] = values
    return volume


def normalize(maps: np.ndarray) -> np.ndarray:
    """Each subject's map divided by its 99.5th percentile and clipped to [0, 1].

    Methods differ in scale by orders of magnitude; a robust per-subject
    maximum makes them comparable without letting one hot voxel decide.
    """
    scale = np.percentile(maps, 99.5, axis=1, keepdims=True)
    return np.clip(maps / np.maximum(scale, 1e-12), 0, 1).astype(np.float32)


def group_means(maps: np.ndarray, labels: np.ndarray, classes: tuple[str, str]) -> dict[str, np.ndarray]:
    """Mean and median normalized map per class and over everyone; ``{name: [voxels]}``.

    Keys: ``mean_all``, and ``mean_<class>``, ``median_<class>`` for each class
    present in ``labels`` (class indices into ``classes``), e.g. ``mean_male``.
    """
    out = {"mean_all": maps.mean(0)}
    for code in (1, 0):
        if (labels == code).any():
            out[f"mean_{classes[code]}"] = maps[labels == code].mean(0)
            out[f"median_{classes[code]}"] = np.median(maps[labels == code], axis=0)
    return out


def dice_top(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Dice overlap of the top ``fraction`` voxels of a and b, row by row."""
    k = max(1, int(round(a.shape[-1] * fraction)))
    top_a = np.argpartition(-a, k - 1, axis=-1)[..., :k]
    top_b = np.argpartition(-b, k - 1, axis=-1)[..., :k]
    return np.array([len(np.intersect1d(x, y)) * 2 / (2 * k) for x, y in zip(np.atleast_2d(top_a), np.atleast_2d(top_b))])


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of a and b, row by row."""
    ra, rb = rankdata(np.atleast_2d(a), axis=1), rankdata(np.atleast_2d(b), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.maximum(np.sqrt((ra**2).sum(1) * (rb**2).sum(1)), 1e-12)


def method_agreement(maps: dict[str, np.ndarray], top_fraction: float = 0.05) -> pd.DataFrame:
    """Agreement of every pair of methods: per subject (mean ± std) and of the pooled group means."""
    rows = []
    for a, b in itertools.combinations(sorted(maps), 2):
        rho = spearman_rows(maps[a], maps[b])
        dice = dice_top(maps[a], maps[b], top_fraction)
        pooled_a, pooled_b = maps[a].mean(0), maps[b].mean(0)
        rows.append({
            "method_a": a, "method_b": b,
            "spearman_subject_mean": float(rho.mean()), "spearman_subject_std": float(rho.std()),
            f"dice_top{top_fraction:.0%}_subject_mean": float(dice.mean()),
            "spearman_pooled": float(spearman_rows(pooled_a, pooled_b)[0]),
            f"dice_top{top_fraction:.0%}_pooled": float(dice_top(pooled_a, pooled_b, top_fraction)[0]),
        })
    return pd.DataFrame(rows)


def localization(maps: np.ndarray, truth: np.ndarray, distractor: np.ndarray | None = None,
                 top_fraction: float = 0.01) -> dict[str, float]:
    """How well maps find a known effect, and how little they point at a known distractor.

    Voxel ROC AUC against ``truth`` (bool [voxels]) and the share of each map's
    top 1% voxels inside it, per subject (mean) and for the group mean; with a
    ``distractor`` (bool [voxels]), the group map's top-1% share inside that
    region too. Chance for a share is the region's share of the voxels.
    """
    k = max(1, int(round(maps.shape[1] * top_fraction)))

    def top_inside(m: np.ndarray, region: np.ndarray) -> float:
        return float(region[np.argpartition(-m, k - 1)[:k]].mean())

    group = maps.mean(0)
    scores = {
        "roc_auc_subject_mean": float(np.mean([roc_auc_score(truth, m) for m in maps])),
        "roc_auc_group": float(roc_auc_score(truth, group)),
        "top1pct_in_effect_subject_mean": float(np.mean([top_inside(m, truth) for m in maps])),
        "top1pct_in_effect_group": top_inside(group, truth),
        "chance_top1pct": float(truth.mean()),
    }
    if distractor is not None:
        scores |= {"top1pct_in_distractor_group": top_inside(group, distractor),
                   "chance_distractor": float(distractor.mean())}
    return scores


def region_table(mean_map: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> pd.DataFrame:
    """Regions ranked by mean attribution inside them (labels and map on the same voxels)."""
    rows = [{"label": int(l), "region": names.get(int(l), f"label {int(l)}"),
             "mean_attribution": float(mean_map[labels == l].mean()), "voxels": int((labels == l).sum())}
            for l in np.unique(labels) if l != 0]
    table = pd.DataFrame(rows, columns=["label", "region", "mean_attribution", "voxels"])
    return table.sort_values("mean_attribution", ascending=False).reset_index(drop=True)
