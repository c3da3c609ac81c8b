"""The classification statistics against references: DeLong by brute force, AUC by scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from study.training.evaluation import (
    auc_permutation_p,
    auc_with_ci,
    delong_components,
    delong_variance,
    evaluate,
    paired_delong,
)


def brute_force_components(labels, scores):
    """DeLong's placement values by their definition: psi(x, y) = 1 if x > y, 1/2 if equal, 0 if smaller."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    psi = (positives[:, None] > negatives[None]) + 0.5 * (positives[:, None] == negatives[None])
    return psi.mean(), psi.mean(1), psi.mean(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_components_and_variance_match_their_definition(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.45).astype(int)
    scores = np.round(rng.normal(size=60) + labels * 0.8, 1)  # rounded: ties, handled by midranks
    auc, v10, v01 = delong_components(labels, scores)
    expected_auc, expected_v10, expected_v01 = brute_force_components(labels, scores)
    assert auc == pytest.approx(expected_auc) == pytest.approx(roc_auc_score(labels, scores))
    np.testing.assert_allclose(v10, expected_v10)
    np.testing.assert_allclose(v01, expected_v01)
    expected = expected_v10.var(ddof=1) / len(expected_v10) + expected_v01.var(ddof=1) / len(expected_v01)
    assert delong_variance(labels, scores) == pytest.approx(expected)


def test_paired_delong_of_a_model_with_itself_and_of_two_models():
    rng = np.random.default_rng(3)
    labels = (rng.random(120) < 0.5).astype(int)
    good, bad = rng.normal(size=120) + 1.5 * labels, rng.normal(size=120) + 0.2 * labels
    same, p_same = paired_delong(labels, good, good)
    assert same.value == 0 and p_same == 1.0
    difference, p = paired_delong(labels, good, bad)
    assert difference.value == pytest.approx(roc_auc_score(labels, good) - roc_auc_score(labels, bad))
    assert difference.low < difference.value < difference.high and p < 0.01


def test_auc_permutation_p_against_a_direct_count():
    rng = np.random.default_rng(4)
    labels = (rng.random(40) < 0.5).astype(int)
    scores = rng.normal(size=40) + 0.6 * labels
    folds = np.repeat([0, 1], 20)
    p = auc_permutation_p(labels, scores, folds, permutations=500, seed=9)
    draws = np.random.default_rng(9)
    permuted = np.tile(labels, (500, 1))
    for fold in (0, 1):
        rows = np.flatnonzero(folds == fold)
        permuted[:, rows] = draws.permuted(permuted[:, rows], axis=1)
    observed = roc_auc_score(labels, scores)
    count = sum(roc_auc_score(row, scores) >= observed - 1e-12 for row in permuted)
    assert p == pytest.approx((1 + count) / 501)


def test_chance_and_real_classifiers_get_the_right_verdict():
    rng = np.random.default_rng(5)
    labels = (rng.random(150) < 0.45).astype(int)
    folds = np.arange(150) % 3
    noise = rng.random(150)
    learned = 1 / (1 + np.exp(-(rng.normal(size=150) + 2.0 * (labels - 0.5) * 2)))
    assert evaluate(labels, noise, folds, permutations=999).finding == "none"
    assert evaluate(labels, learned, folds, noise, permutations=999).finding == "yes"
    assert evaluate(
        labels, noise * 0.1 + learned * 0.05 + rng.random(150), folds, learned, permutations=999
    ).finding in {"baseline_only", "below_baseline"}
    # a CNN at chance beside a baseline that learned: the verdict names the baseline's finding
    only_linear = evaluate(labels, noise, folds, learned, permutations=999)
    assert only_linear.finding == "baseline_only" and only_linear.baseline_p < 0.05
    assert "linear baseline learned the task, the CNN did not" in only_linear.verdict
    assert evaluate(labels, noise, folds, rng.random(150), permutations=999).finding == "none"
    behind = evaluate(labels, 0.6 * learned + 0.9 * rng.random(150), folds, learned, permutations=999)
    assert behind.cnn_p < 0.05 and behind.finding == "below_baseline" and "below the linear baseline" in behind.verdict
    ci = auc_with_ci(labels, learned)
    assert ci.low < ci.value < ci.high


def test_folds_whose_cnn_did_not_fit_its_training_subjects_are_named():
    from study.training.metrics import fit_check

    assert fit_check({0: 0.98, 1: 0.6, 2: 1.0}) == ("fits", None)
    tag, message = fit_check({0: 0.98, 1: 0.52, 2: float("nan")})
    assert tag == "underfit"
    assert "in 2 of 3 folds: training accuracy fold 1 (0.52), fold 2 (nan)" in message
    assert "train.epochs" in message and "search.space" in message
