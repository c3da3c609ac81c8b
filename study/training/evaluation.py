"""Is the classifier's result a finding? Confidence intervals and tests of held-out ROC AUC.

The held-out predictions of all outer folds are pooled (every subject is
tested exactly once). The AUC gets a DeLong confidence interval (DeLong et al.
1988, with the fast midrank algorithm of Sun & Xu 2014) and a label-permutation
test against chance (labels permuted within outer folds, so that each fold's
model keeps its own subjects); the CNN-minus-baseline difference gets DeLong's
paired test, both models having predicted the same subjects. The verdict says
which model learned the task: the CNN, the CNN but less than the baseline,
only the baseline (then its weight map is the finding), the confounds (when
``cohort.confounds`` are named and neither model's predictions carry
information about the label beyond them; :mod:`.confounds`), or neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.metrics import roc_auc_score

from study.training.confounds import ConfoundTest, full_confound_test, partial_confound_test, permuted_within

ALPHA = 0.05
CONFOUND_PERMUTATIONS = 1000  # conditional permutations of each confound test (mlconfound's default)


def _midranks(x: np.ndarray) -> np.ndarray:
    return scipy.stats.rankdata(x, method="average")


def delong_components(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components: V10 per positive, V01 per negative (Sun & Xu's midranks)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = scores[labels], scores[~labels]
    m, n = len(positives), len(negatives)
    all_ranks = _midranks(np.concatenate([positives, negatives]))
    v10 = (all_ranks[:m] - _midranks(positives)) / n
    v01 = 1 - (all_ranks[m:] - _midranks(negatives)) / m
    return float(v10.mean()), v10, v01


def delong_variance(labels: np.ndarray, scores: np.ndarray) -> float:
    """The variance of the AUC of ``scores`` for ``labels`` (1 positive), by DeLong's method."""
    _, v10, v01 = delong_components(labels, np.asarray(scores, dtype=np.float64))
    return float(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))


def format_p(p: float) -> str:
    """A p-value as papers print it: ``p = 0.012``, or ``p < 0.001`` (never ``p = 0.000``)."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


@dataclass(frozen=True)
class Estimate:
    """A score (an AUC, a mean absolute error) with its confidence interval (DeLong's, a bootstrap's)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, alpha: float = ALPHA) -> Estimate:
    """AUC and its (1 - alpha) DeLong interval, clipped to [0, 1]."""
    auc = float(roc_auc_score(labels, scores))
    half = scipy.stats.norm.ppf(1 - alpha / 2) * np.sqrt(delong_variance(labels, scores))
    return Estimate(auc, float(max(0.0, auc - half)), float(min(1.0, auc + half)))


def paired_delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> tuple[Estimate, float]:
    """AUC(a) - AUC(b) on the same subjects, with its interval, and the two-sided p value of DeLong's test."""
    auc_a, v10_a, v01_a = delong_components(labels, np.asarray(a, dtype=np.float64))
    auc_b, v10_b, v01_b = delong_components(labels, np.asarray(b, dtype=np.float64))
    s10 = np.cov(np.stack([v10_a, v10_b]))
    s01 = np.cov(np.stack([v01_a, v01_b]))
    covariance = s10 / len(v10_a) + s01 / len(v01_a)
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = auc_a - auc_b
    if variance <= 0:
        return Estimate(difference, difference, difference), 1.0 if difference == 0 else 0.0
    z = difference / np.sqrt(variance)
    half = scipy.stats.norm.ppf(1 - alpha / 2) * np.sqrt(variance)
    return (
        Estimate(difference, float(difference - half), float(difference + half)),
        float(2 * scipy.stats.norm.sf(abs(z))),
    )


def auc_permutation_p(
    labels: np.ndarray, scores: np.ndarray, folds: np.ndarray, permutations: int = 5000, seed: int = 0
) -> float:
    """One-sided p value of AUC > 0.5: the share of labellings, permuted within folds, whose AUC reaches it."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    observed = roc_auc_score(labels, scores)
    permuted = permuted_within(labels, folds, permutations, seed)
    # AUC of each labelling from the ranks of the scores: the Mann-Whitney U over the positives.
    ranks = _midranks(scores)
    m = labels.sum()
    n = len(labels) - m
    aucs = (permuted @ ranks - m * (m + 1) / 2) / (m * n)
    return float((1 + np.sum(aucs >= observed - 1e-12)) / (permutations + 1))


@dataclass(frozen=True)
class ConfoundCheck:
    """What the named confounds explain of the pooled held-out predictions (:mod:`.confounds`)."""

    names: tuple[str, ...]  # cohort.confounds
    alone: Estimate  # a model of the confounds alone, fitted in the same outer folds
    full: ConfoundTest  # the CNN's predictions: information about the label beyond the confounds? (low p: yes)
    partial: ConfoundTest  # the CNN's predictions: driven by the confounds beyond the label? (low p: yes)
    baseline_full: ConfoundTest | None = None  # the same for the linear baseline
    baseline_partial: ConfoundTest | None = None

    @property
    def listing(self) -> str:
        return ", ".join(self.names)

    def describe(self, full: ConfoundTest, partial: ConfoundTest) -> str:
        """One model's two tests in words."""
        drive = "the confounds drive its predictions" if partial.p < ALPHA else "no sign that the confounds drive them"
        return f"full confound test {format_p(full.p)}; partial confound test {format_p(partial.p)}: {drive}"


PAIRED_TESTS = {"MAE": "sign-flip permutation", "macro ROC AUC": "paired bootstrap"}  # else DeLong's


@dataclass
class Evaluation:
    """The study's classification result and whether it is a finding."""

    cnn: Estimate  # pooled held-out AUC of the CNN
    cnn_p: float  # its permutation p value against chance
    baseline: Estimate | None  # the same for the linear baseline
    baseline_p: float | None
    difference: Estimate | None  # CNN - baseline, paired
    difference_p: float | None
    permutations: int
    brain_volume: Estimate | None = None  # how well brain volume alone separates the classes (a confound)
    confounds: ConfoundCheck | None = None  # with cohort.confounds: what they explain
    # what cnn, baseline and difference measure: a regression's "MAE" (lower is better), several classes'
    # "macro ROC AUC"
    metric: str = "ROC AUC"
    # other scores, each with its interval: a regression's cnn_rmse, cnn_r, cnn_r2, baseline_rmse, ...; several
    # classes' cnn_balanced_accuracy, baseline_balanced_accuracy
    scores: dict[str, Estimate] = field(default_factory=dict)

    @property
    def cnn_learned(self) -> bool:
        """The CNN's predictions are above chance, and beyond the confounds when there are any."""
        return self.cnn_p < ALPHA and (self.confounds is None or self.confounds.full.p < ALPHA)

    @property
    def baseline_learned(self) -> bool:
        """The same of the linear baseline."""
        if self.baseline_p is None or self.baseline_p >= ALPHA:
            return False
        return self.confounds is None or self.confounds.baseline_full is None or self.confounds.baseline_full.p < ALPHA

    @property
    def finding(self) -> str:
        """What was learned: ``yes`` (the CNN, not significantly below the linear baseline), ``below_baseline``
        (the CNN, significantly below the baseline), ``baseline_only`` (not the CNN, but the baseline),
        ``confounds`` (a model above chance, but neither beyond the confounds) or ``none``."""
        if not self.cnn_learned:
            if self.baseline_learned:
                return "baseline_only"
            above_chance = self.cnn_p < ALPHA or (self.baseline_p is not None and self.baseline_p < ALPHA)
            return "confounds" if above_chance else "none"
        if self.difference is not None and self.difference_p < ALPHA:
            if (self.difference.value > 0) if self.lower_is_better else (self.difference.value < 0):
                return "below_baseline"
        return "yes"

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "MAE"

    @property
    def above_chance(self) -> str:
        """Better than chance, in the metric's direction."""
        return "better than chance" if self.lower_is_better else "above chance"

    @property
    def paired_test(self) -> str:
        """The test of the CNN-minus-baseline difference."""
        return PAIRED_TESTS.get(self.metric, "DeLong")

    @property
    def verdict(self) -> str:
        """The finding in plain words, for the console, MLflow and the report; with confounds, what they explain."""
        confounds = self.confounds
        if confounds is None:
            return self._verdict_without_confounds()
        if self.finding == "confounds":
            return (
                f"Explained by the confounds ({confounds.listing}): the CNN's held-out {self.metric} is {self.cnn} "
                f"(permutation {format_p(self.cnn_p)} against chance), but its predictions carry no information "
                f"about the label beyond the confounds ({confounds.describe(confounds.full, confounds.partial)}). "
                f"The confounds alone reach ROC AUC {confounds.alone}. "
                + (
                    f"The linear baseline's {self.baseline} is no further beyond them (full confound test "
                    f"{format_p(confounds.baseline_full.p)}). "
                    if self.baseline is not None and confounds.baseline_full is not None
                    else ""
                )
                + "The maps show where the confounds leave their mark, not a difference between the classes."
            )
        model = "the CNN" if self.finding != "baseline_only" else "the linear baseline"
        full, partial = (
            (confounds.full, confounds.partial)
            if model == "the CNN"
            else (confounds.baseline_full, confounds.baseline_partial)
        )
        return (
            f"{self._verdict_without_confounds()} Beyond the confounds ({confounds.listing}; alone they reach ROC AUC "
            f"{confounds.alone}): {model}'s predictions carry information about the label that they do not "
            f"({confounds.describe(full, partial)})."
            if self.finding != "none"
            else self._verdict_without_confounds()
        )

    def _verdict_without_confounds(self) -> str:
        linear = (
            f"the linear baseline's {self.baseline} (permutation {format_p(self.baseline_p)})"
            if self.baseline is not None
            else ""
        )
        if self.finding == "none":
            return (
                "No finding: neither the CNN nor the linear baseline learned the task. The CNN's held-out "
                f"{self.metric} {self.cnn} is not significantly {self.above_chance} "
                f"(permutation {format_p(self.cnn_p)})"
                + (f", nor is {linear}" if linear else "")
                + "; the maps explain models that learned nothing "
                "about the label."
            )
        if self.finding == "baseline_only":
            return (
                f"The linear baseline learned the task, the CNN did not. Linear baseline: held-out {self.metric} "
                f"{self.baseline}, {self.above_chance} (permutation {format_p(self.baseline_p)}); CNN: {self.cnn}, "
                + (
                    f"not significantly {self.above_chance}"
                    if self.cnn_p >= ALPHA
                    else f"{self.above_chance} but not beyond the confounds"
                )
                + f" (permutation {format_p(self.cnn_p)}). The finding to read is the "
                "linear baseline's weight map and its test; the CNN's maps explain a model that learned "
                "nothing about the label."
            )
        if self.finding == "below_baseline":
            return (
                f"The CNN learned less than a linear model: its held-out {self.metric} {self.cnn} is "
                f"{self.above_chance} (permutation {format_p(self.cnn_p)}) but significantly "
                f"{'worse than' if self.lower_is_better else 'below'} {linear} (difference "
                f"{self.difference}, {self.paired_test} {format_p(self.difference_p)}). Read the linear baseline's "
                "weight map beside the CNN's maps."
            )
        if self.baseline is None:
            return (
                f"The CNN learned the task: held-out {self.metric} {self.cnn}, {self.above_chance} (permutation "
                f"{format_p(self.cnn_p)})."
            )
        if self.difference_p < ALPHA:
            versus = (
                f"significantly better than {linear} (difference {self.difference}, {self.paired_test} "
                f"{format_p(self.difference_p)})"
            )
        else:
            versus = (
                f"not significantly different from {linear} (difference {self.difference}, {self.paired_test} "
                f"{format_p(self.difference_p)}); compare their maps"
            )
        return (
            f"The CNN learned the task: held-out {self.metric} {self.cnn}, {self.above_chance} (permutation "
            f"{format_p(self.cnn_p)}), {versus}."
        )


def evaluate(
    labels: np.ndarray,
    cnn: np.ndarray,
    folds: np.ndarray,
    baseline: np.ndarray | None = None,
    brain_volumes: np.ndarray | None = None,
    permutations: int = 5000,
    seed: int = 0,
    confounds: pd.DataFrame | None = None,
    confounds_alone: np.ndarray | None = None,
) -> Evaluation:
    """Test pooled held-out predictions (P(class 1), e.g. P(male), one per subject) of the CNN and, if given, of
    the baseline.

    Parameters
    ----------
    labels : ndarray
        Class index (e.g. 1 male, 0 female), one per held-out subject.
    cnn, baseline : ndarray
        P(class 1) of each subject from the model of the fold that held it out.
    folds : ndarray
        The outer fold of each subject (permutations stay within folds).
    brain_volumes : ndarray, optional
        Each subject's brain volume: its AUC for the label says how much a model could
        learn from head size alone (a confound, not a regional difference).
    permutations : int
        Label permutations of the test against chance.
    seed : int
        Seed of the permutations.
    confounds : DataFrame, optional
        Each subject's confounds (cohort.confounds; rows as ``labels``): the full and partial confound tests of
        both models' predictions (:data:`CONFOUND_PERMUTATIONS` conditional permutations each).
    confounds_alone : ndarray, optional
        P(class 1) of each subject from a model of the confounds alone, fitted in the same outer folds
        (:func:`~study.training.confounds.confound_predictions`); needed with ``confounds``.
    """
    result = Evaluation(
        auc_with_ci(labels, cnn),
        auc_permutation_p(labels, cnn, folds, permutations, seed),
        None,
        None,
        None,
        None,
        permutations,
    )
    if brain_volumes is not None:
        result.brain_volume = auc_with_ci(labels, brain_volumes)
    if baseline is not None:
        result.baseline = auc_with_ci(labels, baseline)
        result.baseline_p = auc_permutation_p(labels, baseline, folds, permutations, seed + 1)
        result.difference, result.difference_p = paired_delong(labels, cnn, baseline)
    if confounds is not None:
        tests = [
            test(labels, predictions, confounds, CONFOUND_PERMUTATIONS, seed)
            for predictions in ([cnn] if baseline is None else [cnn, baseline])
            for test in (full_confound_test, partial_confound_test)
        ]
        result.confounds = ConfoundCheck(tuple(confounds.columns), auc_with_ci(labels, confounds_alone), *tests)
    return result
