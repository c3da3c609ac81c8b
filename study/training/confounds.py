"""Is the finding the label, or a confound? A confounds-only model and Spisak's confound tests.

A classifier of sex can succeed from head size or from the scanner a group was
scanned on (site), without any regional brain difference. With
``cohort.confounds`` named (columns of the participants table, categorical or
numeric), the study asks three questions of its pooled held-out predictions,
as Spisak (2022) proposes:

- how well do the confounds alone predict the label? (:func:`confound_predictions`:
  a logistic regression on the confounds, fitted on each outer fold's training
  subjects only, as Snoek et al. 2019 ask of anything fitted to confounds);
- do the predictions carry information about the label beyond the confounds?
  (:func:`full_confound_test`, null: predictions independent of the label given
  the confounds, i.e. the model is explained by them);
- are the predictions driven by the confounds beyond the label?
  (:func:`partial_confound_test`, null: predictions independent of the
  confounds given the label).

Both tests are conditional permutation tests (Berrett et al. 2020): the
permuted variable keeps its relation to the conditioning one. The full test
permutes the labels with Berrett's pairwise-swap sampler under a logistic model
of label given confounds, as ``mlconfound``'s ``full_confound_test`` does for a
categorical target; the partial test permutes within each class of the label,
which is the exact conditional permutation for a label of two classes
(``mlconfound`` instead samples the confounds from a fitted model of confounds
given label). The statistics are ``mlconfound``'s: R² of the label and the
predictions (full), R² of the predictions on the confounds (partial).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from study.data.participants import is_categorical

MCMC_STEPS = 50  # pairwise-swap sweeps per permutation (mlconfound's default)


def confound_model(table: pd.DataFrame) -> Pipeline:
    """A logistic regression on the confounds: categorical columns one-hot, numeric ones standardized.

    Nearly unpenalized (C = 100) so that its probabilities are those of the data, yet finite when a confound
    separates the classes."""
    categorical = [c for c in table if is_categorical(table[c])]
    numeric = [c for c in table if c not in categorical]
    design = ColumnTransformer(
        [("categorical", OneHotEncoder(handle_unknown="ignore"), categorical), ("numeric", StandardScaler(), numeric)]
    )
    return make_pipeline(design, LogisticRegression(C=100.0, max_iter=1000))


def confound_design(table: pd.DataFrame) -> np.ndarray:
    """The confounds as regressors [subjects, columns]: categorical ones one-hot, numeric ones standardized."""
    design = confound_model(table)[0].fit_transform(table)
    return np.asarray(design.toarray() if hasattr(design, "toarray") else design, dtype=np.float64)


def confound_predictions(
    table: pd.DataFrame, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """P(class 1) of each subject from the confounds alone, by the model of the outer fold that held it out.

    Parameters
    ----------
    table : DataFrame
        The confounds, one row per subject (:meth:`~study.data.cohort.Cohort.confound_table`).
    labels : ndarray
        Class index per row.
    folds : list of (train rows, test rows)
        The study's outer folds as row indices of ``table``; each fold's model is fitted on its training rows
        only, so a held-out subject's confounds never shape the model that predicts it.
    """
    p = np.full(len(table), np.nan)
    for train, test in folds:
        if len(np.unique(labels[train])) < 2:
            p[test] = labels[train].mean()
            continue
        model = confound_model(table).fit(table.iloc[train], labels[train])
        p[test] = model.predict_proba(table.iloc[test])[:, 1]
    return p


@dataclass(frozen=True)
class ConfoundTest:
    """A conditional permutation test: its statistic (an R²), the null's median, and the p value."""

    r2: float
    null_median: float
    p: float
    permutations: int


def full_confound_test(
    labels: np.ndarray, predictions: np.ndarray, table: pd.DataFrame, permutations: int = 1000, seed: int = 0
) -> ConfoundTest:
    """Do ``predictions`` carry information about the label beyond the confounds? A low p says yes.

    The labels are permuted conditionally on the confounds (Berrett et al.'s pairwise-swap Markov chain, under a
    logistic model of the label given the confounds fitted to these subjects), so each permutation keeps the
    confounds' relation to the label and breaks any other; the statistic is the squared correlation of labels
    and predictions. A model that learned only the confounds does no better on the real labels than on these.
    """
    y, yhat = np.asarray(labels, int), np.asarray(predictions, float)
    p1 = confound_model(table).fit(table, y).predict_proba(table)[:, 1]
    log_p = np.log(np.clip(np.stack([1 - p1, p1]), 1e-300, None))  # [class, subject]
    log_likelihood = log_p[y]  # [i, j]: log P(label of subject i | confounds of subject j)
    permuted = y[conditional_permutations(log_likelihood, permutations, seed)]
    return _test(_squared_correlation(y[None], yhat)[0], _squared_correlation(permuted, yhat), permutations)


def partial_confound_test(
    labels: np.ndarray, predictions: np.ndarray, table: pd.DataFrame, permutations: int = 1000, seed: int = 0
) -> ConfoundTest:
    """Are ``predictions`` driven by the confounds beyond the label? A low p says yes.

    The statistic is R² of the predictions regressed on the confounds (one-hot and numeric columns); its null
    permutes the predictions within each class of the label, which keeps their relation to the label and breaks
    any other to the confounds.
    """
    y, yhat = np.asarray(labels, int), np.asarray(predictions, float)
    design = confound_design(table)
    basis = orthonormal_basis(design - design.mean(0))
    permuted = permuted_within(yhat, y, permutations, seed)
    return _test(_r2_on(basis, yhat[None])[0], _r2_on(basis, permuted), permutations)


def permuted_within(values: np.ndarray, blocks: np.ndarray, permutations: int, seed: int) -> np.ndarray:
    """``permutations`` copies of ``values`` [permutations, n], each permuted within every block (an outer fold, a
    class): the null of every test here that keeps the blocks' members together."""
    rng = np.random.default_rng(seed)
    permuted = np.tile(values, (permutations, 1))
    for block in np.unique(blocks):
        rows = np.flatnonzero(blocks == block)
        permuted[:, rows] = rng.permuted(permuted[:, rows], axis=1)
    return permuted


def conditional_permutations(log_likelihood: np.ndarray, permutations: int, seed: int = 0) -> np.ndarray:
    """Permutations [permutations, n] drawn from the conditional permutation distribution of Berrett et al. (2020).

    ``log_likelihood[i, j]`` is log q(x_i | z_j), the model of the permuted variable given the conditioning one;
    a permutation π has probability proportional to prod_j q(x_π(j) | z_j). Each permutation runs
    :data:`MCMC_STEPS` sweeps of random disjoint pairwise swaps from a common start that ran five times as many
    from the identity (as ``mlconfound`` does); all chains move at once.
    """
    n, rng = len(log_likelihood), np.random.default_rng(seed)
    start = _swap_sweeps(log_likelihood, np.arange(n)[None], 5 * MCMC_STEPS, rng)
    return _swap_sweeps(log_likelihood, np.repeat(start, permutations, axis=0), MCMC_STEPS, rng)


def _swap_sweeps(log_likelihood: np.ndarray, chains: np.ndarray, sweeps: int, rng: np.random.Generator) -> np.ndarray:
    """``sweeps`` sweeps of each chain (row: a permutation of 0..n-1): disjoint random pairs (i, j) swap their
    values with the probability that the swapped pair has under the model against the pair as it is."""
    chains, (m, n) = chains.copy(), chains.shape
    half, rows = n // 2, np.arange(m)[:, None]
    for _ in range(sweeps):
        order = rng.permuted(np.tile(np.arange(n), (m, 1)), axis=1)
        i, j = order[:, :half], order[:, half : 2 * half]
        a, b = chains[rows, i], chains[rows, j]
        log_odds = log_likelihood[a, j] + log_likelihood[b, i] - log_likelihood[a, i] - log_likelihood[b, j]
        swap = rng.random(log_odds.shape) < 1 / (1 + np.exp(-np.maximum(log_odds, -500)))
        chains[rows, i], chains[rows, j] = np.where(swap, b, a), np.where(swap, a, b)
    return chains


def _squared_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Pearson correlation of each row of ``x`` with ``y``."""
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean()
    return (xc @ yc) ** 2 / ((xc**2).sum(1) * (yc**2).sum())


def orthonormal_basis(design: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the column space of a design (rank-deficient columns dropped): one-hot columns
    of every level beside an intercept are fine."""
    u, s, _ = np.linalg.svd(design, full_matrices=False)
    return u[:, s > s.max(initial=0) * 1e-10] if len(s) else u


def _r2_on(basis: np.ndarray, y: np.ndarray) -> np.ndarray:
    """R² of ordinary least squares of each row of ``y`` on the design (with intercept) that ``basis`` spans."""
    yc = y - y.mean(1, keepdims=True)
    return ((yc @ basis) ** 2).sum(1) / (yc**2).sum(1)


def _test(observed: float, null: np.ndarray, permutations: int) -> ConfoundTest:
    """p counts the observed statistic among the permutations (so it is never 0)."""
    p = (1 + np.sum(null >= observed - 1e-12)) / (permutations + 1)
    return ConfoundTest(float(observed), float(np.median(null)), float(p), permutations)
