"""Is a result of several classes (CN / MCI / AD, subtypes) a finding? Macro one-vs-rest ROC AUC, tested.

The held-out predictions of all outer folds are pooled (every subject is
tested exactly once), as for two classes (:mod:`.evaluation`). Each class is
scored against the rest by the ROC AUC of its probability, and the scores are
averaged with equal weight per class (the macro one-vs-rest AUC of
scikit-learn's ``roc_auc_score(multi_class="ovr")``; Provost & Domingos 2000):

- its interval: a percentile bootstrap that resamples subjects within each
  class (as pROC's stratified bootstrap does), so every resample has every class;
- the test against chance: the labels permuted within outer folds (each fold's
  model keeps its own subjects), as the two-class test does; every class's
  AUC of every labelling from the ranks of its probability (Mann-Whitney U);
- the CNN against the multinomial logistic-regression baseline: the paired
  bootstrap of the difference (the same resampled subjects for both models),
  its interval the resamples' percentiles and its two-sided p their share on
  either side of 0 (the percentile test, so that an interval without 0 has
  p < 0.05; a z of the difference over the resamples' sd, pROC's, disagrees
  with that interval when a model is near AUC 1 and the resamples skew).

Balanced accuracy (the mean recall over classes) gets a bootstrap interval too.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from study.training.confounds import permuted_within
from study.training.evaluation import ALPHA, Estimate, Evaluation
from study.training.regression import bootstrapped_evaluation

BOOTSTRAP = 2000  # resamples of each interval and of the paired test


def macro_auc(labels: np.ndarray, p: np.ndarray) -> float:
    """The macro one-vs-rest ROC AUC of scores ``p`` [subjects, classes] for class indices ``labels``: scikit-learn's
    ``roc_auc_score(multi_class="ovr")``, which also takes scores whose rows do not sum to 1."""
    return float(_macro_auc_rows(np.asarray(labels)[None], np.asarray(p, dtype=np.float64)[None])[0])


def _macro_auc_rows(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The macro one-vs-rest AUC of each row of [resamples, subjects] labels and [resamples, subjects, classes]
    probabilities, from midranks (ties count half, as in scikit-learn)."""
    aucs = []
    for k in range(p.shape[2]):
        ranks = scipy.stats.rankdata(p[:, :, k], axis=1)
        positive = labels == k
        m = positive.sum(1)
        n = labels.shape[1] - m
        aucs.append(((ranks * positive).sum(1) - m * (m + 1) / 2) / (m * n))
    return np.mean(aucs, axis=0)


def _stratified_rows(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, subjects] indices: each resample draws each class's subjects from that class, with replacement."""
    rng = np.random.default_rng(seed)
    rows = np.empty((resamples, len(labels)), dtype=np.int64)
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        rows[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return rows


def _balanced_accuracy_rows(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    recalls = [((predicted == k) & (labels == k)).sum(1) / (labels == k).sum(1) for k in range(classes)]
    return np.mean(recalls, axis=0)


def bootstrap_scores(
    labels: np.ndarray, p: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0, alpha: float = ALPHA
) -> dict[str, Estimate]:
    """Macro one-vs-rest ROC AUC and balanced accuracy, each with its (1 - alpha) percentile interval of a
    bootstrap stratified by class."""
    labels, p = np.asarray(labels, dtype=np.int64), np.asarray(p, dtype=np.float64)
    rows = _stratified_rows(labels, resamples, seed)
    predicted = p.argmax(1)
    observed = {
        "roc_auc": macro_auc(labels, p),
        "balanced_accuracy": float(_balanced_accuracy_rows(labels[None], predicted[None], p.shape[1])[0]),
    }
    resampled = {
        "roc_auc": _macro_auc_rows(labels[rows], p[rows]),
        "balanced_accuracy": _balanced_accuracy_rows(labels[rows], predicted[rows], p.shape[1]),
    }
    quantiles = [alpha / 2, 1 - alpha / 2]
    return {name: Estimate(observed[name], *map(float, np.quantile(resampled[name], quantiles))) for name in observed}


def macro_auc_permutation_p(
    labels: np.ndarray, p: np.ndarray, folds: np.ndarray, permutations: int = 5000, seed: int = 0
) -> float:
    """One-sided p value of a macro AUC above 0.5: the share of labellings, permuted within folds, whose macro
    AUC reaches the observed one."""
    labels, folds, p = np.asarray(labels, dtype=np.int64), np.asarray(folds), np.asarray(p, dtype=np.float64)
    observed = macro_auc(labels, p)
    permuted = permuted_within(labels, folds, permutations, seed)
    aucs = np.zeros(permutations)
    for k in range(p.shape[1]):  # class sizes stay as they are: only which subjects hold them changes
        ranks = scipy.stats.rankdata(p[:, k])
        m = int((labels == k).sum())
        aucs += ((permuted == k) @ ranks - m * (m + 1) / 2) / (m * (len(labels) - m))
    aucs /= p.shape[1]
    return float((1 + np.sum(aucs >= observed - 1e-12)) / (permutations + 1))


def paired_bootstrap(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0, alpha: float = ALPHA
) -> tuple[Estimate, float]:
    """Macro AUC(a) - AUC(b) on the same subjects, with the percentile interval of a paired stratified bootstrap,
    and the two-sided p of the percentile test: twice the smaller share of resampled differences on either side
    of 0 (0: none on the far side of 0, which the report prints as p < 0.001)."""
    labels = np.asarray(labels, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rows = _stratified_rows(labels, resamples, seed)
    differences = _macro_auc_rows(labels[rows], a[rows]) - _macro_auc_rows(labels[rows], b[rows])
    difference = macro_auc(labels, a) - macro_auc(labels, b)
    low, high = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    side = min(np.sum(differences <= 0), np.sum(differences >= 0))
    return Estimate(difference, float(low), float(high)), float(min(1.0, 2 * side / resamples))


def evaluate_multiclass(
    labels: np.ndarray,
    cnn: np.ndarray,
    folds: np.ndarray,
    baseline: np.ndarray | None = None,
    permutations: int = 5000,
    seed: int = 0,
) -> Evaluation:
    """Test pooled held-out probabilities of several classes by the CNN and, if given, the baseline.

    Parameters
    ----------
    labels : ndarray
        The class index of each held-out subject.
    cnn, baseline : ndarray
        [subjects, classes]: each subject's probability of each class from the model of the fold that held it out.
    folds : ndarray
        The outer fold of each subject (permutations stay within folds).
    permutations : int
        Label permutations of the test against chance.
    seed : int
        Seed of the permutations and the bootstrap.

    Returns
    -------
    Evaluation
        With ``metric`` "macro ROC AUC"; ``scores`` holds each model's balanced accuracy.
    """
    return bootstrapped_evaluation(
        "macro ROC AUC",
        "roc_auc",
        lambda p: bootstrap_scores(labels, p, seed=seed),
        lambda p, shift: macro_auc_permutation_p(labels, p, folds, permutations, seed + shift),
        lambda: paired_bootstrap(labels, cnn, baseline, seed=seed),
        cnn,
        baseline,
        permutations,
    )
