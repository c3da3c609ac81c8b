"""Confounds removed from the images inside each outer fold: voxel-wise regression or ComBat.

A CNN given images of two scanners learns the scanner when it predicts the
label; given heads of different sizes, their size. ``cv.adjust`` removes the
confounds (``cohort.confounds``) from every volume before the CNN and the
linear baseline see it, as Snoek et al. (2019) ask of anything fitted to
confounds: the adjustment of an outer fold is fitted on that fold's training
subjects only, and applied unchanged to its held-out subjects, so a held-out
subject's image or label never shapes it. The cache keeps the unadjusted
volumes; each fold reads them through its own :class:`Adjustment`
(:class:`~study.data.cache.CachedVolumes`), before any augmentation.

- ``residualize`` (cross-validated confound regression): each brain voxel is
  regressed on the confounds (categorical ones as indicator columns, numeric
  ones standardized) over the training subjects, and every subject loses the
  part its confounds predict. The training subjects' mean image is kept.
- ``combat``: ComBat (Johnson et al. 2007; Fortin et al. 2017, 2018) harmonizes
  the sites, the one categorical confound: each site's voxel-wise shift and
  scale, shrunk towards all voxels' by empirical Bayes, are removed. The
  numeric confounds are regressed out in the same model. This is
  ``neuroCombat``'s parametric ComBat without preserved covariates, computed
  from sums so that it needs no copy of the standardized data.

Both keep the training subjects' mean image, so the unadjusted cohort mean
that Meaningful Perturbations and the deletion check delete towards stays close
to what the adjusted images vary around. Voxels that no training subject varies
in (background, or brain only in held-out images) are left as they are. The
label is never a covariate: a held-out subject's label is unknown when it is
adjusted, and a model that kept the label's effect in the training subjects
only would show the CNN a different relation in training than in testing. A
label that goes with a confound (most men on scanner B) therefore loses what it
shares with it, which is the question the adjustment asks: is anything left
beyond the confounds?

The fold's inner splits (early stopping, a search, calibration, the baseline's
choice of C) see images adjusted on all of the fold's training subjects, their
inner validation subjects included: model selection, not the held-out test,
sees its own subjects in the fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from study.data.participants import is_categorical
from study.errors import StudyError

VOXEL_CHUNK = 20_000  # voxels fitted at a time (float64 copies of [training subjects, chunk])
COMBAT_TOLERANCE = 1e-4  # neuroCombat's convergence of the empirical Bayes estimates (relative change)
COMBAT_ITERATIONS = 1000  # a bound neuroCombat lacks (it converges in tens)


@dataclass(frozen=True)
class Covariate:
    """One regressor from one confound column: a numeric column standardized, or one level of a categorical
    column as an indicator; centred on the training subjects' mean either way."""

    column: str
    level: str | None  # None: the column is numeric
    centre: float
    scale: float = 1.0

    def values(self, table: pd.DataFrame) -> np.ndarray:
        raw = (table[self.column] == self.level) if self.level is not None else table[self.column]
        return (np.asarray(raw, dtype=np.float64) - self.centre) / self.scale


@dataclass(frozen=True)
class Adjustment:
    """One fold's adjustment of brain voxels: ``x' = (x - covariates @ offsets) / scale[site] + centre``.

    A subject's covariates are its ComBat site indicators (when there are ``sites``) then its
    :class:`Covariate` values. Residualizing has no sites, no scale and no centre: ``x' = x - covariates @ offsets``.

    Parameters
    ----------
    method : {"residualize", "combat"}
    covariates : tuple of Covariate
        The regressors made from the confounds on the training subjects.
    offsets : ndarray
        [site indicators + covariates, brain voxels] float32.
    brain : ndarray
        bool [D, H, W]: the voxels adjusted (the others are background and stay as they are).
    levels : dict of str to tuple of str
        Each categorical confound's values among the training subjects: the only ones it can remove.
    batch : str, optional
        ComBat's site column; its ``levels`` are the sites, in the order of ``scale``'s rows.
    scale : ndarray, optional
        [sites, brain voxels]: ComBat's square root of each site's scale (delta*).
    centre : ndarray, optional
        [brain voxels]: ComBat's mean image of the training subjects.
    subjects : DataFrame
        The confounds of the subjects it may adjust (:meth:`for_subjects`), indexed by subject id.
    """

    method: str
    covariates: tuple[Covariate, ...]
    offsets: np.ndarray
    brain: np.ndarray
    levels: dict[str, tuple[str, ...]]
    batch: str | None = None
    scale: np.ndarray | None = None
    centre: np.ndarray | None = None
    subjects: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def columns(self) -> list[str]:
        """The confound columns it removes (and needs of every subject it adjusts)."""
        return list(dict.fromkeys([*self.levels, *(c.column for c in self.covariates)]))

    def design(self, confounds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's covariates [rows, offsets] and ComBat site index (None when residualizing).

        Raises StudyError naming the subjects whose site (or other category) no training subject has: nothing
        was learned of it, so nothing can remove it."""
        for column, levels in self.levels.items():
            unseen = confounds.index[~confounds[column].isin(levels)]
            if len(unseen):
                raise StudyError(
                    f"{column} {confounds.loc[unseen[0], column]!r} of subject(s) {', '.join(map(str, unseen[:5]))} "
                    f"is none of the training subjects' {list(levels)}: the adjustment (cv.adjust: {self.method}) "
                    "learned nothing of it, so it cannot remove it"
                )
        columns = [c.values(confounds) for c in self.covariates]
        site = None
        if self.batch is not None:
            site = np.searchsorted(self.levels[self.batch], confounds[self.batch].to_numpy())
            columns = list(np.eye(len(self.levels[self.batch]))[site].T) + columns
        return np.stack(columns, axis=1) if columns else np.zeros((len(confounds), 0)), site

    def for_subjects(self, confounds: pd.DataFrame) -> Adjustment:
        """The same adjustment, given the confounds of the subjects it will adjust (indexed by subject id);
        refused at once for a subject it cannot adjust."""
        self.design(confounds)
        return replace(self, subjects=confounds)

    def apply(self, voxels: np.ndarray, confounds: pd.DataFrame) -> np.ndarray:
        """Brain voxels [subjects, brain voxels] of subjects with these confounds (a row each), adjusted."""
        covariates, site = self.design(confounds)
        adjusted = voxels - covariates @ self.offsets
        if self.scale is not None:
            adjusted = adjusted / self.scale[site] + self.centre
        return adjusted.astype(voxels.dtype, copy=False)

    def apply_to_volumes(self, volumes: np.ndarray, confounds: pd.DataFrame) -> np.ndarray:
        """Volumes [subjects, (1,) D, H, W] adjusted, given their subjects' confounds (a row each)."""
        flat = np.array(volumes).reshape(len(volumes), -1)
        inside = np.flatnonzero(self.brain.ravel())
        flat[:, inside] = self.apply(flat[:, inside], confounds)
        return flat.reshape(volumes.shape)

    def save(self, path: Path) -> Path:
        """The adjustment as one ``.npz`` of arrays and its encoding as JSON text (no pickle); without subjects."""
        spec = {
            "method": self.method,
            "covariates": [vars(c) for c in self.covariates],
            "levels": {column: list(values) for column, values in self.levels.items()},
            "batch": self.batch,
        }
        arrays = {"offsets": self.offsets, "brain": self.brain, "spec": np.array(json.dumps(spec))}
        if self.scale is not None:
            arrays |= {"scale": self.scale, "centre": self.centre}
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> Adjustment:
        """The adjustment :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as arrays:
            spec = json.loads(str(arrays["spec"]))
            return cls(
                spec["method"],
                tuple(Covariate(**c) for c in spec["covariates"]),
                arrays["offsets"],
                arrays["brain"],
                {column: tuple(values) for column, values in spec["levels"].items()},
                spec["batch"],
                arrays["scale"] if "scale" in arrays else None,
                arrays["centre"] if "centre" in arrays else None,
            )


def fit_adjustment(
    method: str, voxels: np.ndarray, confounds: pd.DataFrame, brain: np.ndarray, keep: tuple[str, ...] = ()
) -> Adjustment:
    """Fit ``method`` on the training subjects' brain voxels and confounds.

    Parameters
    ----------
    method : {"residualize", "combat"}
    voxels : ndarray
        [training subjects, brain voxels].
    confounds : DataFrame
        The training subjects' confounds, a row each (categorical columns as strings, numeric ones as floats).
    brain : ndarray
        bool [D, H, W], whose voxels ``voxels`` holds in C order.
    keep : tuple of str
        Confound columns left in the images (``cv.group_by``'s: each of its values is held out whole, so the
        training subjects know nothing of a held-out one).
    """
    columns = [c for c in confounds if c not in keep]
    categorical = [c for c in columns if is_categorical(confounds[c])]
    levels = {c: tuple(sorted(confounds[c].unique())) for c in categorical}
    if method == "combat":
        if len(categorical) != 1:
            raise StudyError(
                f"cv.adjust: combat harmonizes one site column, a categorical confound; cohort.confounds "
                f"{columns} has {len(categorical)} ({categorical}). Name one site column (a column of numbers reads "
                "as numeric: name sites with letters, such as siteA), or use cv.adjust: residualize, which regresses "
                "out any number of confounds."
            )
        return _combat(voxels, confounds, brain, categorical[0], [c for c in columns if c not in categorical], levels)
    covariates = _covariates(confounds, [c for c in columns if c not in categorical], levels)
    design = np.zeros((len(confounds), 0)) if not covariates else np.stack([c.values(confounds) for c in covariates], 1)
    offsets = np.concatenate([_least_squares(design, voxels[:, v])[1:] for v in _chunks(voxels.shape[1])], axis=1)
    return Adjustment(method, covariates, offsets.astype(np.float32), brain, levels)


def check_folds(
    method: str, confounds: pd.DataFrame, folds: list[tuple[list[str], list[str]]], keep: tuple[str, ...] = ()
) -> None:
    """Refuse, before any training, what ``method`` cannot adjust in these outer folds.

    A category (a site) that only a fold's held-out subjects have was never learned by its adjustment; ComBat also
    needs 2 training subjects of each site. ``confounds``: every subject's, indexed by subject id; ``folds``: each
    outer fold's (training, held-out) subject ids; ``keep``: the columns left in (``cv.group_by``'s)."""
    categorical = [c for c in confounds if c not in keep and is_categorical(confounds[c])]
    for k, (train, test) in enumerate(folds):
        for column in categorical:
            known = confounds.loc[train, column].value_counts()
            held_out = confounds.loc[test, column]
            if len(unseen := held_out[~held_out.isin(known.index)]):
                raise StudyError(
                    f"{column} {unseen.iloc[0]!r} of subject(s) {', '.join(unseen.index[:5])} is only among outer "
                    f"fold {k}'s held-out subjects: no training subject of that fold has it, so cv.adjust ({method}) "
                    f"cannot remove it. Merge rare {column} values, lower cv.outer_folds, or leave those subjects out."
                )
            if method == "combat" and len(few := known[known < 2]):
                raise StudyError(
                    f"{column} {few.index[0]!r} has {few.iloc[0]} training subject(s) in outer fold {k}: ComBat needs "
                    f"2 to estimate its variance. Merge rare {column} values, lower cv.outer_folds, or leave them out."
                )


def _covariates(confounds: pd.DataFrame, numeric: list[str], levels: dict[str, tuple[str, ...]]) -> tuple:
    """The regressors: each numeric column standardized; each categorical level but the first as an indicator;
    all centred on the training subjects (the first level, like the intercept, is what the others differ from)."""
    covariates = [Covariate(c, None, float(confounds[c].mean()), float(confounds[c].std()) or 1.0) for c in numeric]
    for column, values in levels.items():
        covariates += [Covariate(column, v, float((confounds[column] == v).mean())) for v in values[1:]]
    return tuple(covariates)


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(start + VOXEL_CHUNK, n)) for start in range(0, n, VOXEL_CHUNK)]


def _least_squares(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Coefficients [1 + regressors, voxels] of an intercept and ``design`` for each column of ``values``."""
    full = np.hstack([np.ones((len(design), 1)), design])
    return np.linalg.lstsq(full, values.astype(np.float64), rcond=None)[0]


def _combat(
    voxels: np.ndarray,
    confounds: pd.DataFrame,
    brain: np.ndarray,
    batch: str,
    numeric: list[str],
    levels: dict[str, tuple[str, ...]],
) -> Adjustment:
    """Parametric ComBat of the site column ``batch``, the numeric confounds regressed out in the same model.

    As ``neuroCombat.neuroCombat`` (0.2.12) with the numeric confounds as ``continuous_cols``, whose effects it
    keeps and this removes: per voxel, a least-squares fit of the site intercepts and the confounds; the data
    standardized by the site-weighted mean and the pooled variance; each site's mean (gamma) and variance (delta)
    of the standardized data, shrunk by empirical Bayes towards their distribution over voxels. Voxels that no
    training subject varies in are neither fitted nor counted in that distribution, and stay as they are."""
    sites = levels[batch]
    covariates = _covariates(confounds, numeric, {})
    site = np.searchsorted(sites, confounds[batch].to_numpy())
    indicators = np.eye(len(sites))[site]
    counts = indicators.sum(0)
    if few := [f"{s!r} ({int(c)})" for s, c in zip(sites, counts) if c < 2]:
        raise StudyError(
            f"cv.adjust: combat needs at least 2 training subjects of each {batch} to estimate its variance; "
            f"{', '.join(few)} has fewer in a fold's training subjects. Merge rare {batch}s, or leave them out."
        )
    design = np.hstack([indicators] + [c.values(confounds)[:, None] for c in covariates])
    varies = np.flatnonzero(voxels.min(0) != voxels.max(0))
    n, fitted = len(voxels), len(varies)
    centre, pooled_sd = np.empty(fitted), np.empty(fitted)
    sums, squares = np.empty((len(sites), fitted)), np.empty((len(sites), fitted))
    slopes = np.empty((len(covariates), fitted))
    for chunk in _chunks(fitted):
        x = voxels[:, varies[chunk]].astype(np.float64)
        beta = np.linalg.lstsq(design, x, rcond=None)[0]
        variance = np.mean((x - design @ beta) ** 2, axis=0)
        variance[variance == 0] = 1.0  # a voxel the model fits exactly (neuroCombat: median(var_pooled != 0))
        centre[chunk] = counts / n @ beta[: len(sites)]
        slopes[:, chunk] = beta[len(sites) :]
        pooled_sd[chunk] = np.sqrt(variance)
        standardized = (x - centre[chunk] - design[:, len(sites) :] @ slopes[:, chunk]) / pooled_sd[chunk]
        sums[:, chunk] = indicators.T @ standardized
        squares[:, chunk] = indicators.T @ standardized**2
    gamma_hat = sums / counts[:, None]
    delta_hat = np.maximum(squares - counts[:, None] * gamma_hat**2, 0) / (counts[:, None] - 1)  # >= 0 despite rounding
    delta_hat[delta_hat == 0] = 1.0  # neuroCombat's convert_zeroes
    gamma_star, delta_star = (
        np.array(estimates)
        for estimates in zip(
            *[_shrink(gamma_hat[b], delta_hat[b], sums[b], squares[b], counts[b]) for b in range(len(sites))]
        )
    )
    # x' = (x - offsets) / scale + centre on the fitted voxels; the others keep x (offsets 0, scale 1, centre 0)
    offsets = np.zeros((len(sites) + len(covariates), voxels.shape[1]), np.float32)
    offsets[:, varies] = np.vstack([centre + gamma_star * pooled_sd, slopes])
    scale = np.ones((len(sites), voxels.shape[1]), np.float32)
    scale[:, varies] = np.sqrt(delta_star)
    full_centre = np.zeros(voxels.shape[1], np.float32)
    full_centre[varies] = centre
    return Adjustment("combat", covariates, offsets, brain, {batch: sites}, batch, scale, full_centre)


def _shrink(
    gamma_hat: np.ndarray, delta_hat: np.ndarray, sums: np.ndarray, squares: np.ndarray, n: float
) -> tuple[np.ndarray, np.ndarray]:
    """One site's empirical Bayes estimates (gamma*, delta*) from its voxels' means and variances of the
    standardized data (``neuroCombat.it_sol``), from the site's per-voxel sum and sum of squares.

    Priors over voxels: gamma ~ N(gamma_bar, tau²), delta ~ InverseGamma(a, b) by the method of moments."""
    gamma_bar, tau2 = gamma_hat.mean(), gamma_hat.var(ddof=1)
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    a, b = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
    gamma, delta = gamma_hat, delta_hat
    for _ in range(COMBAT_ITERATIONS):
        gamma_new = (tau2 * n * gamma_hat + delta * gamma_bar) / (tau2 * n + delta)
        residual = squares - 2 * gamma_new * sums + n * gamma_new**2  # sum over the site's subjects of (s - gamma)²
        delta_new = (0.5 * residual + b) / (n / 2 + a - 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # a voxel where a site's mean is exactly 0
            change = np.concatenate([np.abs(gamma_new - gamma) / gamma, np.abs(delta_new - delta) / delta])
        gamma, delta = gamma_new, delta_new
        if np.max(change[np.isfinite(change)], initial=0.0) <= COMBAT_TOLERANCE:
            break
    return gamma, delta
