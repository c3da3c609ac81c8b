"""The class 1 versus class 0 test of attribution maps (e.g. male vs female): voxel-wise Welch t, FWER by permutation.

Maps come as [subjects, voxels]. The p value of a voxel is corrected for the
family-wise error over all voxels by the maximum statistic: the share of label
permutations whose largest |t| anywhere reaches the voxel's |t| (Nichols &
Holmes 2002). Labels are permuted only in ways that keep the study's design, as
PALM does with exchangeability blocks (Winkler et al. 2015): within each outer
fold (maps of one fold come from one model), whole families are exchanged with
families of the same size, and siblings within their family (relatives are not
independent). Variances are computed in float64 from data centred per voxel, a
two-pass scheme whose sums cannot cancel catastrophically; voxels that do not
vary at all are left out of the test and counted.

With confounds (cohort.confounds: site, TIV, age), the statistic is instead the
ordinary least squares t of the label in a model with the confounds, and the
permutations follow Freedman & Lane (1983), as nilearn's ``permuted_ols`` and
PALM do: the maps' residuals on the confounds are permuted and added back to the
confounds' fit, so that a difference that the confounds explain is not called
one between the classes (Winkler et al. 2014).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from study.training.confounds import orthonormal_basis


@dataclass
class PermutationTest:
    """The result of :func:`permutation_test`; arrays are [voxels], NaN where a voxel was not tested."""

    t: np.ndarray  # class 1 - class 0 Welch t
    p: np.ndarray  # FWER-corrected p value (max statistic); NaN everywhere without permutations
    constant: int  # voxels left out because they have the same value in every subject
    permutations: int
    adjusted_for: tuple[str, ...] = ()  # the confounds the t is adjusted for (Freedman-Lane); () : Welch t


class ExchangeabilityBlocks:
    """The permutations of subjects that respect the design, drawn fast for thousands of permutations.

    Within each fold, families of the same size swap places as wholes, and the
    members of each family are shuffled among themselves; no subject leaves its fold.
    The design is worked out once: each group of same-sized families of one fold is a
    [families, members] array, and a draw shuffles its rows and then each row.
    """

    def __init__(self, folds: np.ndarray, families: np.ndarray):
        folds, families = np.asarray(folds), np.asarray(families)
        self.subjects = len(folds)
        self.groups: list[np.ndarray] = []
        for fold in np.unique(folds):
            in_fold = np.flatnonzero(folds == fold)
            _, family_of = np.unique(families[in_fold], return_inverse=True)
            members = [in_fold[family_of == f] for f in range(family_of.max() + 1)]
            for size in sorted({len(m) for m in members}):
                self.groups.append(np.stack([m for m in members if len(m) == size]))

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A random permutation: ``labels[perm]`` is a permuted labelling."""
        perm = np.arange(self.subjects)
        for group in self.groups:
            perm[group] = rng.permuted(group[rng.permutation(len(group))], axis=1)
        return perm


def welch_t(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Voxel-wise Welch t of group 1 minus group 0 (float64, two-pass), as scipy's ``ttest_ind(equal_var=False)``."""
    x = np.asarray(maps, dtype=np.float64)
    a, b = x[np.asarray(labels) == 1], x[np.asarray(labels) == 0]
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a.mean(0) - b.mean(0)) / se


def _t_of(
    labels: torch.Tensor, centred: torch.Tensor, squares: torch.Tensor, n1: int, n0: int, floor: torch.Tensor
) -> torch.Tensor:
    """Welch t for many labellings at once: ``labels`` [p, subjects] of 0/1 over centred voxels [subjects, v]."""
    sum1 = labels @ centred  # the centred data sum to 0 per voxel: group 0's sum is -sum1
    square1 = labels @ squares
    mean1, mean0 = sum1 / n1, -sum1 / n0
    var1 = (square1 - n1 * mean1**2) / (n1 - 1)
    var0 = (squares.sum(0) - square1 - n0 * mean0**2) / (n0 - 1)
    se = torch.sqrt(torch.clamp(var1, min=0) / n1 + torch.clamp(var0, min=0) / n0)
    return (mean1 - mean0) / torch.maximum(se, floor)


def permutation_test(
    maps: np.ndarray,
    labels: np.ndarray,
    permutations: int,
    folds: np.ndarray | None = None,
    families: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    voxel_chunk: int = 20000,
    permutation_chunk: int = 256,
    confounds: np.ndarray | None = None,
) -> PermutationTest:
    """Voxel-wise class 1 minus class 0 Welch t (or, with ``confounds``, OLS t adjusted for them) and its
    FWER-corrected p value (max statistic).

    Parameters
    ----------
    maps : ndarray [subjects, voxels]
        One map per subject, all explaining the same score (e.g. the class 1 minus class 0 logit).
    labels : ndarray [subjects]
        Class index: 1 (e.g. male), 0 (e.g. female).
    permutations : int
        Label permutations (0: t only).
    folds, families : ndarray [subjects], optional
        The exchangeability blocks: each subject's outer fold and family (default: one block).
    seed : int
        Seed of the permutations.
    device : str
        Where the sums run (``cuda`` for a GPU); the result is the same.
    voxel_chunk, permutation_chunk : int
        Work sizes, which bound memory at the paper's grid.
    confounds : ndarray [subjects, columns], optional
        The confounds as regressors (categorical ones one-hot): the label's t adjusted for them, under
        Freedman-Lane permutations within the same exchangeability blocks.

    Returns
    -------
    PermutationTest
    """
    labels = np.asarray(labels)
    n = len(labels)
    folds = np.zeros(n, dtype=int) if folds is None else np.asarray(folds)
    families = np.arange(n).astype(str) if families is None else np.asarray(families).astype(str)
    rng = np.random.default_rng(seed)
    blocks = ExchangeabilityBlocks(folds, families)
    orders = [np.arange(n)] + [blocks.draw(rng) for _ in range(permutations)]
    if confounds is None:
        labellings, test = np.stack([labels[order] for order in orders]), _chunk_test
    else:  # Freedman-Lane: residuals permuted, i.e. each subject's residual label moved to where its residual goes
        labellings, test = np.stack([np.argsort(order) for order in orders]), _freedman_lane(labels, confounds, device)
    t = np.full(maps.shape[1], np.nan)
    max_null = torch.zeros(permutations, dtype=torch.float64, device=device)
    rows = torch.as_tensor(labellings, dtype=torch.float64 if confounds is None else torch.long, device=device)
    for start in range(0, maps.shape[1], voxel_chunk):
        # a float64 copy (a Ray task's maps are read-only, which torch warns about)
        x = torch.from_numpy(np.array(maps[:, start : start + voxel_chunk], dtype=np.float64)).to(device)
        varies, observed, chunk_max = test(rows, x, permutation_chunk)
        t[start + np.flatnonzero(varies)] = observed
        torch.maximum(max_null, chunk_max, out=max_null)
    return PermutationTest(t, fwer_p(t, max_null.cpu().numpy()), int(np.isnan(t).sum()), permutations)


def fwer_p(observed: np.ndarray, null_maxima: np.ndarray) -> np.ndarray:
    """FWER-corrected p of each observed statistic by the maximum statistic: the share of permutations whose
    largest |statistic| reaches it, the observed labelling counted once, ``(count + 1) / (permutations + 1)``
    (Westfall and Young; Nichols and Holmes 2002). NaN where ``observed`` is, and everywhere without permutations."""
    p = np.full(observed.shape, np.nan)
    tested = ~np.isnan(observed)
    if len(null_maxima):
        ordered = np.sort(null_maxima)
        exceed = len(ordered) - np.searchsorted(ordered, np.abs(observed[tested]), side="left")
        p[tested] = (exceed + 1) / (len(ordered) + 1)
    return p


def _chunk_test(
    rows: torch.Tensor, x: torch.Tensor, permutation_chunk: int
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """One chunk of voxels ``x`` [subjects, v] under the labellings ``rows`` (the observed one first): which voxels
    vary, their observed t, and each permutation's largest |t| among them."""
    n1 = int(rows[0].sum())
    n0 = len(rows[0]) - n1
    centred = x - x.mean(0)
    squares = centred**2
    varies = squares.sum(0) > 0
    centred, squares = centred[:, varies], squares[:, varies]
    floor = 1e-12 * torch.sqrt(squares.sum(0) / len(x))  # se never exactly 0 where the data vary
    observed, maxima = _observed_and_maxima(
        lambda r: _t_of(r, centred, squares, n1, n0, floor), rows, permutation_chunk
    )
    return varies.cpu().numpy(), observed, maxima


def _observed_and_maxima(
    t_of: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, permutation_chunk: int
) -> tuple[np.ndarray, torch.Tensor]:
    """The observed t (``rows[0]``) and each permutation's largest |t|, ``permutation_chunk`` rows at a time."""
    observed = t_of(rows[:1])[0]
    maxima = torch.zeros(len(rows) - 1, dtype=torch.float64, device=rows.device)
    for first in range(1, len(rows), permutation_chunk):
        null = t_of(rows[first : first + permutation_chunk])
        if null.shape[1]:
            maxima[first - 1 : first - 1 + len(null)] = null.abs().max(1).values
    return observed.cpu().numpy(), maxima


def _freedman_lane(labels: np.ndarray, confounds: np.ndarray, device: str):
    """The chunk test of the label's OLS t adjusted for ``confounds``, under Freedman-Lane permutations.

    With H the projection on [1, confounds] and R = (I - H) Y the maps' residuals, a permutation P gives
    Y* = HY + PR, whose label t in the full model is that of the residual label x = (I - H) label against
    (I - H) P R: its numerator is x[P^-1]' R, and its residual sum of squares |R|² - |Q[P^-1]' R|² - numerator²/|x|²
    (Q an orthonormal basis of H), for every permutation in two matrix products. ``rows`` are the inverse
    orders P^-1, the identity first.
    """
    design = np.column_stack([np.ones(len(labels)), np.asarray(confounds, dtype=np.float64)])
    basis = torch.as_tensor(orthonormal_basis(design), device=device)  # [subjects, rank]
    label = torch.as_tensor(np.asarray(labels, dtype=np.float64), device=device)
    residual_label = label - basis @ (basis.T @ label)
    sxx = float(residual_label @ residual_label)
    df = len(labels) - basis.shape[1] - 1

    def t_of(inverse: torch.Tensor, residuals: torch.Tensor, total: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        numerator = residual_label[inverse] @ residuals  # [p, v]
        fitted = torch.einsum("pnr,nv->prv", basis[inverse], residuals)  # Q[P^-1]' R
        rss = total - (fitted**2).sum(1) - numerator**2 / sxx
        return (numerator / sxx) / torch.maximum(torch.sqrt(torch.clamp(rss, min=0) / df / sxx), floor)

    def chunk(rows: torch.Tensor, x: torch.Tensor, permutation_chunk: int):
        residuals = x - basis @ (basis.T @ x)
        total = (residuals**2).sum(0)
        varies = total > 1e-20 * torch.clamp((x**2).sum(0), min=1e-300)
        residuals, total = residuals[:, varies], total[varies]
        floor = 1e-12 * torch.sqrt(total / len(x) / sxx)
        observed, maxima = _observed_and_maxima(lambda r: t_of(r, residuals, total, floor), rows, permutation_chunk)
        return varies.cpu().numpy(), observed, maxima

    return chunk


def permutation_test_on_device(
    maps: np.ndarray,
    labels: np.ndarray,
    permutations: int,
    folds: np.ndarray,
    families: np.ndarray,
    seed: int,
    confounds: np.ndarray | None = None,
) -> PermutationTest:
    """:func:`permutation_test` on the GPU that Ray gave this task, else the CPU."""
    from study.runtime import worker_device

    return permutation_test(
        maps, labels, permutations, folds, families, seed=seed, device=str(worker_device()), confounds=confounds
    )
