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


def group_means(maps: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Mean and median normalized map per class and over everyone; ``{name: [voxels]}``.

    Keys: ``mean_all``, and ``mean_<class>``, ``median_<class>`` for each class
    present in ``labels`` (class indices into ``classes``), e.g. ``mean_male``; ``mean_all`` only without
    classes (a regression target).
    """
    out = {"mean_all": maps.mean(0)}
    for code in reversed(range(len(classes))):
        if (labels == code).any():
            out[f"mean_{classes[code]}"] = maps[labels == code].mean(0)
            out[f"median_{classes[code]}"] = np.median(maps[labels == code], axis=0)
    return out


SUBJECT_CHUNK = 128  # subjects ranked at once: bounds memory at the paper's grid (1,113 x 61k voxels per method)


def _top_mask(maps: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` largest voxels as a bool mask of the same shape."""
    mask = np.zeros(maps.shape, dtype=bool)
    np.put_along_axis(mask, np.argpartition(-maps, k - 1, axis=1)[:, :k], True, axis=1)
    return mask


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.maximum(np.sqrt((a**2).sum(1) * (b**2).sum(1)), 1e-12)


def _top_count(voxels: int, fraction: float) -> int:
    return max(1, int(round(voxels * fraction)))


def dice_top(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Dice overlap of the top ``fraction`` voxels of a and b, row by row."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    k = _top_count(a.shape[1], fraction)
    return (_top_mask(a, k) & _top_mask(b, k)).sum(1) / k  # both sets have k voxels: 2|A & B| / 2k


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of a and b, row by row."""
    return _pearson_rows(rankdata(np.atleast_2d(a), axis=1), rankdata(np.atleast_2d(b), axis=1))


def method_agreement(maps: dict[str, np.ndarray], top_fraction: float = 0.05) -> pd.DataFrame:
    """Agreement of every pair of methods: per subject (mean ± std) and of the pooled group means.

    Each method's maps are ranked once per chunk of subjects, not once per pair.
    """
    names = sorted(maps)
    pairs = list(itertools.combinations(names, 2))
    subjects, voxels = maps[names[0]].shape
    k = _top_count(voxels, top_fraction)
    rho: dict[tuple[str, str], list[np.ndarray]] = {pair: [] for pair in pairs}
    dice: dict[tuple[str, str], list[np.ndarray]] = {pair: [] for pair in pairs}
    for start in range(0, subjects, SUBJECT_CHUNK):
        chunk = {m: maps[m][start : start + SUBJECT_CHUNK] for m in names}
        ranks = {m: rankdata(x, axis=1) for m, x in chunk.items()}
        tops = {m: _top_mask(x, k) for m, x in chunk.items()}
        for a, b in pairs:
            rho[a, b].append(_pearson_rows(ranks[a], ranks[b]))
            dice[a, b].append((tops[a] & tops[b]).sum(1) / k)
    rows = []
    for a, b in pairs:
        subject_rho, subject_dice = np.concatenate(rho[a, b]), np.concatenate(dice[a, b])
        pooled_a, pooled_b = maps[a].mean(0), maps[b].mean(0)
        rows.append(
            {
                "method_a": a,
                "method_b": b,
                "spearman_subject_mean": float(subject_rho.mean()),
                "spearman_subject_std": float(subject_rho.std()),
                f"dice_top{top_fraction:.0%}_subject_mean": float(subject_dice.mean()),
                "spearman_pooled": float(spearman_rows(pooled_a, pooled_b)[0]),
                f"dice_top{top_fraction:.0%}_pooled": float(dice_top(pooled_a, pooled_b, top_fraction)[0]),
            }
        )
    return pd.DataFrame(rows)


def localization(
    maps: np.ndarray, truth: np.ndarray, distractor: np.ndarray | None = None, top_fraction: float = 0.01
) -> dict[str, float]:
    """How well maps find a known effect, and how little they point at a known distractor.

    Voxel ROC AUC against ``truth`` (bool [voxels]) and the share of each map's
    top 1% voxels inside it, per subject (mean) and for the group mean; with a
    ``distractor`` (bool [voxels]), the group map's top-1% share inside that
    region too. Chance for a share is the region's share of the voxels. A
    subject's AUC is the Mann-Whitney U of its midranks (ties count half, as in
    scikit-learn's ``roc_auc_score``), all subjects of a chunk ranked at once.
    """
    k = _top_count(maps.shape[1], top_fraction)
    inside, outside = int(truth.sum()), int((~truth).sum())
    auc, top_share = [], []
    for start in range(0, len(maps), SUBJECT_CHUNK):
        chunk = maps[start : start + SUBJECT_CHUNK]
        auc.append((rankdata(chunk, axis=1)[:, truth].sum(1) - inside * (inside + 1) / 2) / (inside * outside))
        top_share.append(_top_mask(chunk, k)[:, truth].sum(1) / k)
    group = maps.mean(0, keepdims=True)
    group_top = _top_mask(group, k)[0]
    scores = {
        "roc_auc_subject_mean": float(np.concatenate(auc).mean()),
        "roc_auc_group": float(roc_auc_score(truth, group[0])),
        "top1pct_in_effect_subject_mean": float(np.concatenate(top_share).mean()),
        "top1pct_in_effect_group": float(truth[group_top].mean()),
        "chance_top1pct": float(truth.mean()),
    }
    if distractor is not None:
        scores |= {
            "top1pct_in_distractor_group": float(distractor[group_top].mean()),
            "chance_distractor": float(distractor.mean()),
        }
    return scores


def region_table(mean_map: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> pd.DataFrame:
    """Regions ranked by mean attribution inside them (labels and map on the same voxels)."""
    rows = [
        {
            "label": int(label),
            "region": names.get(int(label), f"label {int(label)}"),
            "mean_attribution": float(mean_map[labels == label].mean()),
            "voxels": int((labels == label).sum()),
        }
        for label in np.unique(labels)
        if label != 0
    ]
    table = pd.DataFrame(rows, columns=["label", "region", "mean_attribution", "voxels"])
    return table.sort_values("mean_attribution", ascending=False).reset_index(drop=True)
