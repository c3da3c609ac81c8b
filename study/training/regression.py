"""Is a regression result (brain age) a finding? Held-out errors with intervals, tests, and the brain-age gap.

The held-out predictions of all outer folds are pooled (every subject is
tested exactly once), as for two classes (:mod:`.evaluation`):

- MAE, RMSE, Pearson r and R^2, each with a percentile bootstrap interval over
  subjects;
- a permutation test against chance: the true values permuted within outer
  folds (each fold's model keeps its own subjects, as the AUC test does), the
  p value the share of permutations whose MAE is at most the observed one;
- the CNN against the linear (ridge) baseline: the paired difference of
  absolute errors, its mean (the MAE difference) with a bootstrap interval,
  and a sign-flip permutation test of that mean (each subject's difference
  flips its sign under the null; the direction and the p are of the same
  mean, which a rank test's need not be);
- the brain-age gap (predicted minus true value) with the bias correction of
  de Lange & Cole (2020): on its own training subjects, each fold's model's
  predictions are regressed on the true values (``fit_slope``,
  ``fit_intercept``), and its held-out predictions are corrected by that line,
  ``(predicted - intercept) / slope``. No held-out subject enters the line.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from study.training.calibration import MIN_SLOPE
from study.training.confounds import permuted_within
from study.training.evaluation import ALPHA, Estimate, Evaluation

BOOTSTRAP = 2000  # resamples of each interval


def _row_scores(values: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """MAE, RMSE, r and R^2 of each row of [resamples, subjects] values and predictions (as
    :func:`~study.training.metrics.regression_metrics` computes them for one)."""
    error = predicted - values
    centred_v = values - values.mean(axis=1, keepdims=True)
    centred_p = predicted - predicted.mean(axis=1, keepdims=True)
    total = (centred_v**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (centred_v * centred_p).sum(axis=1) / np.sqrt(total * (centred_p**2).sum(axis=1))
        r2 = 1 - (error**2).sum(axis=1) / total
    return {"mae": np.abs(error).mean(axis=1), "rmse": np.sqrt((error**2).mean(axis=1)), "r": r, "r2": r2}


def bootstrap_scores(
    values: np.ndarray, predicted: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0, alpha: float = ALPHA
) -> dict[str, Estimate]:
    """MAE, RMSE, Pearson r and R^2, each with its (1 - alpha) percentile bootstrap interval (subjects
    resampled with replacement)."""
    values, predicted = np.asarray(values, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    rows = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    observed = _row_scores(values[None], predicted[None])
    resampled = _row_scores(values[rows], predicted[rows])
    return {
        name: Estimate(float(observed[name][0]), *map(float, np.nanquantile(scores, [alpha / 2, 1 - alpha / 2])))
        for name, scores in resampled.items()
    }


def mae_permutation_p(
    values: np.ndarray, predicted: np.ndarray, folds: np.ndarray, permutations: int = 5000, seed: int = 0
) -> float:
    """One-sided p value of an MAE below chance: the share of true values, permuted within folds, whose MAE is at
    most the observed one."""
    values, predicted, folds = np.asarray(values, dtype=np.float64), np.asarray(predicted), np.asarray(folds)
    observed = np.mean(np.abs(predicted - values))
    permuted = permuted_within(values, folds, permutations, seed)
    maes = np.abs(permuted - predicted).mean(axis=1)
    return float((1 + np.sum(maes <= observed + 1e-12)) / (permutations + 1))


def paired_absolute_errors(
    values: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    resamples: int = BOOTSTRAP,
    permutations: int = 10000,
    seed: int = 0,
) -> tuple[Estimate, float]:
    """MAE(a) - MAE(b) on the same subjects, with its bootstrap interval, and the two-sided p value of a
    sign-flip permutation test of the mean paired difference of absolute errors (as scipy's
    ``permutation_test(permutation_type="samples")`` on one sample)."""
    values = np.asarray(values, dtype=np.float64)
    differences = np.abs(np.asarray(a) - values) - np.abs(np.asarray(b) - values)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.quantile(differences[rows].mean(axis=1), [ALPHA / 2, 1 - ALPHA / 2])
    observed = differences.mean()
    null = (rng.choice([-1.0, 1.0], size=(permutations, len(values))) * differences).mean(axis=1)
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (permutations + 1)
    return Estimate(float(observed), float(low), float(high)), float(p)


def bias_corrected_gap(
    values: np.ndarray, predicted: np.ndarray, folds: np.ndarray, lines: dict[int, tuple[float, float]]
) -> np.ndarray:
    """The brain-age gap, corrected for regression to the mean: ``(predicted - intercept) / slope - values``,
    with each subject's fold's ``lines[fold] = (slope, intercept)``, fitted on that fold's training subjects; NaN
    where a slope is below :data:`~study.training.calibration.MIN_SLOPE` (a model that learned too little)."""
    slope = np.array([lines[int(f)][0] for f in folds], dtype=np.float64)
    intercept = np.array([lines[int(f)][1] for f in folds])
    slope[~(slope >= MIN_SLOPE)] = np.nan
    return (np.asarray(predicted) - intercept) / slope - np.asarray(values)


def evaluate_regression(
    values: np.ndarray,
    cnn: np.ndarray,
    folds: np.ndarray,
    baseline: np.ndarray | None = None,
    permutations: int = 5000,
    seed: int = 0,
) -> Evaluation:
    """Test pooled held-out predictions of a regression target (e.g. ages) by the CNN and, if given, the baseline.

    Parameters
    ----------
    values : ndarray
        The true value of each held-out subject.
    cnn, baseline : ndarray
        Each subject's value as predicted by the model of the fold that held it out.
    folds : ndarray
        The outer fold of each subject (permutations stay within folds).
    permutations : int
        Permutations of the test against chance.
    seed : int
        Seed of the permutations and the bootstrap.

    Returns
    -------
    Evaluation
        With ``metric`` "MAE" (lower is better); ``scores`` holds RMSE, r and R^2 of each model.
    """
    return bootstrapped_evaluation(
        "MAE",
        "mae",
        lambda predicted: bootstrap_scores(values, predicted, seed=seed),
        lambda predicted, shift: mae_permutation_p(values, predicted, folds, permutations, seed + shift),
        lambda: paired_absolute_errors(values, cnn, baseline, seed=seed),
        cnn,
        baseline,
        permutations,
    )


def bootstrapped_evaluation(
    metric: str,
    name: str,
    scores_of: Callable[[np.ndarray], dict[str, Estimate]],
    p_of: Callable[[np.ndarray, int], float],
    paired: Callable[[], tuple[Estimate, float]],
    cnn: np.ndarray,
    baseline: np.ndarray | None,
    permutations: int,
) -> Evaluation:
    """The :class:`Evaluation` of a score with bootstrap intervals (a regression's MAE, several classes' macro AUC):
    each model's scores (``scores_of(predictions)``, ``name`` the one the verdict reads, in ``metric``'s words),
    its p against chance (``p_of(predictions, seed shift)``: 0 for the CNN, 1 for the baseline) and, with a
    baseline, the paired test of their difference (``paired()``)."""
    models = {"cnn": cnn} | ({} if baseline is None else {"baseline": baseline})
    scores = {f"{model}_{score}": e for model, predicted in models.items() for score, e in scores_of(predicted).items()}
    result = Evaluation(
        scores.pop(f"cnn_{name}"), p_of(cnn, 0), None, None, None, None, permutations, metric=metric, scores=scores
    )
    if baseline is not None:
        result.baseline, result.baseline_p = scores.pop(f"baseline_{name}"), p_of(baseline, 1)
        result.difference, result.difference_p = paired()
    return result
