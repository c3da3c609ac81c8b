"""Every statistic of the maps against a reference: scipy, scikit-image, scikit-learn or a brute-force count."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import scipy.stats
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score

from study.attribution import group
from study.attribution.group import dice_top, localization, method_agreement, spearman_rows, unmask
from study.attribution.sanity import compare
from study.attribution.stats import ExchangeabilityBlocks, permutation_test, welch_t


def design(n_families: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, folds and families of a cohort with singletons and sibling pairs, families never split by folds."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2], size=n_families, p=[0.6, 0.4])
    families = np.repeat([f"f{i}" for i in range(n_families)], sizes)
    folds = np.repeat(rng.integers(0, 3, size=n_families), sizes)
    labels = rng.integers(0, 2, size=len(families))
    labels[:2] = [0, 1]
    return labels, folds, families


def null_maps(rng: np.random.Generator, seed: int, voxels: int) -> tuple[np.ndarray, ...]:
    """A design of 24 families (:func:`design`) and maps with no effect, siblings sharing part of theirs."""
    labels, folds, families = design(24, seed=seed)
    _, family_index = np.unique(families, return_inverse=True)
    shared = rng.normal(size=(family_index.max() + 1, voxels))[family_index]
    return labels, folds, families, rng.normal(size=(len(labels), voxels)) + shared


def test_welch_t_is_scipys():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(40, 30)) * rng.uniform(0.5, 2, size=30)
    labels = (rng.random(40) < 0.4).astype(int)
    maps[labels == 1] += 0.7
    expected = scipy.stats.ttest_ind(maps[labels == 1], maps[labels == 0], equal_var=False).statistic
    np.testing.assert_allclose(welch_t(maps, labels), expected, rtol=1e-10)
    np.testing.assert_allclose(permutation_test(maps, labels, 0).t, expected, rtol=1e-9)


def test_t_is_right_for_data_far_from_zero():
    # Variance as E[x^2] - mean^2 in float32 loses everything at this offset; the two-pass float64 sum does not.
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 25)
    maps = (1e4 + rng.normal(0, 1e-2, size=(50, 20)) + 5e-3 * labels[:, None]).astype(np.float32)
    expected = scipy.stats.ttest_ind(
        maps[labels == 1].astype(np.float64), maps[labels == 0].astype(np.float64), equal_var=False
    ).statistic
    np.testing.assert_allclose(permutation_test(maps, labels, 0).t, expected, rtol=1e-6)


def test_a_constant_voxel_is_left_out_and_cannot_swamp_the_test():
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 20)
    maps = rng.normal(size=(40, 50)).astype(np.float32)
    maps[labels == 1, :5] += 2.0  # a real effect in five voxels
    maps[:, 10] = 0.5  # the same value in every subject
    maps[:, 11] = 0.5 + rng.normal(0, 1e-7, size=40).astype(np.float32)  # almost the same
    result = permutation_test(maps, labels, 200, seed=0)
    assert result.constant == 1 and np.isnan(result.t[10]) and np.isnan(result.p[10])
    assert (result.p[:5] < 0.05).all()  # a near-constant voxel (|t| from noise) does not push every p to 1
    assert np.isfinite(result.t[11]) and result.p[11] > 0.05


def test_fwer_p_values_equal_a_brute_force_count():
    rng = np.random.default_rng(4)
    labels, folds, families = design(25, seed=4)
    maps = rng.normal(size=(len(labels), 60))
    maps[labels == 1, :3] += 1.2
    permutations, seed = 99, 7
    result = permutation_test(
        maps, labels, permutations, folds, families, seed=seed, voxel_chunk=17, permutation_chunk=10
    )
    draws = np.random.default_rng(seed)
    max_null = []
    for _ in range(permutations):
        permuted = labels[ExchangeabilityBlocks(folds, families).draw(draws)]
        t = scipy.stats.ttest_ind(maps[permuted == 1], maps[permuted == 0], equal_var=False).statistic
        max_null.append(np.abs(t).max())
    observed = scipy.stats.ttest_ind(maps[labels == 1], maps[labels == 0], equal_var=False).statistic
    expected = [(1 + sum(m >= abs(t) - 1e-9 for m in max_null)) / (permutations + 1) for t in observed]
    np.testing.assert_allclose(result.t, observed, rtol=1e-9)
    np.testing.assert_allclose(result.p, expected)


def test_permutations_keep_folds_and_exchange_whole_families():
    labels, folds, families = design(40, seed=5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm = ExchangeabilityBlocks(folds, families).draw(rng)
        assert sorted(perm) == list(range(len(labels)))
        assert (folds[perm] == folds).all()  # nobody leaves their fold
        for family in np.unique(families):
            sources = set(families[perm[families == family]])
            assert len(sources) == 1  # a family's labels all come from one family (of the same size)


def test_draws_are_exactly_the_permutations_the_design_allows():
    # Fold 0: two sibling pairs and a singleton; fold 1: two singletons. Allowed: the pairs swap or not, each pair's
    # members in either order, the singletons of fold 1 swap or not: 2 * 2 * 2 * 2 = 16 permutations.
    folds = np.array([0, 0, 0, 0, 0, 1, 1])
    families = np.array(["b", "b", "a", "a", "c", "d", "e"])
    allowed = {
        perm
        for perm in itertools.permutations(range(7))
        if (folds[list(perm)] == folds).all()
        and all(len(set(families[list(perm)][families == f])) == 1 for f in set(families))
    }
    assert len(allowed) == 16
    blocks, rng = ExchangeabilityBlocks(folds, families), np.random.default_rng(0)
    drawn = collections.Counter(tuple(blocks.draw(rng)) for _ in range(3200))
    assert set(drawn) == allowed  # every allowed permutation, nothing else
    assert min(drawn.values()) > 120  # and about equally often (200 expected each)


@pytest.mark.parametrize("blocked", [False, True])
def test_family_wise_error_rate_under_the_null_is_five_percent(blocked):
    # No effect; siblings share part of their maps and each fold's model adds its own offset. Over many
    # draws, the chance of any voxel at p <= 0.05 anywhere stays at the nominal 5%.
    rng = np.random.default_rng(6)
    draws, hits = 300, 0
    for draw in range(draws):
        labels, folds, families, maps = null_maps(rng, 1000 + draw, 40)
        maps += rng.normal(size=(3, 40))[folds]
        result = permutation_test(
            maps, labels, 99, folds if blocked else None, families if blocked else None, seed=draw
        )
        hits += bool((result.p <= 0.05).any())  # with 99 permutations p is k/100: p <= 0.05 is the 5% level
    assert 0.02 <= hits / draws <= 0.085, hits / draws


def test_spearman_and_dice_against_scipy_and_numpy():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 200)), rng.normal(size=(5, 200))
    b[:2] += a[:2]
    expected = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, rtol=1e-10)
    k = 10  # 5% of 200
    expected_dice = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) * 2 / (2 * k) for x, y in zip(a, b)]
    np.testing.assert_allclose(dice_top(a, b, 0.05), expected_dice)


def test_ssim_is_scikit_images_windowed_ssim():
    rng = np.random.default_rng(8)
    brain = np.zeros((12, 14, 12), dtype=bool)
    brain[2:10, 2:12, 2:10] = True
    original = {"m": rng.random((3, *brain.shape)).astype(np.float32)}
    other = {"m": (original["m"] * 0.5 + rng.random((3, *brain.shape)) * 0.5).astype(np.float32)}
    rho, ssim = compare(original, other, brain)["m"]
    from study.attribution.group import normalize

    a, b = normalize(original["m"][:, brain]), normalize(other["m"][:, brain])
    expected = np.mean(
        [structural_similarity(unmask(x, brain), unmask(y, brain), data_range=1.0) for x, y in zip(a, b)]
    )
    assert ssim == pytest.approx(expected) and 0 < ssim < 1
    assert compare(original, original, brain)["m"] == pytest.approx((1.0, 1.0))


def test_localization_auc_is_scikit_learns(monkeypatch):
    rng = np.random.default_rng(9)
    truth = np.zeros(300, dtype=bool)
    truth[:30] = True
    maps = rng.random((7, 300)) + truth * 0.3
    maps[:, ::3] = 0  # ties, as in maps clipped at zero
    maps[2, 100:] = np.round(maps[2, 100:], 1)  # ties below the top voxels, whose order is then unambiguous
    monkeypatch.setattr(group, "SUBJECT_CHUNK", 3)  # chunk boundaries inside the 7 subjects
    scores = localization(maps, truth)
    assert scores["roc_auc_group"] == pytest.approx(roc_auc_score(truth, maps.mean(0)))
    assert scores["roc_auc_subject_mean"] == pytest.approx(np.mean([roc_auc_score(truth, m) for m in maps]), rel=1e-12)
    top = [truth[np.argsort(-m)[:3]].mean() for m in maps]  # top 1% of 300 voxels
    assert scores["top1pct_in_effect_subject_mean"] == pytest.approx(np.mean(top))
    assert scores["chance_top1pct"] == pytest.approx(0.1)


def test_method_agreement_is_pairwise_spearman_and_dice(monkeypatch):
    rng = np.random.default_rng(10)
    maps = {m: rng.random((7, 200)) for m in "abc"}
    maps["b"] += maps["a"]
    monkeypatch.setattr(group, "SUBJECT_CHUNK", 3)
    table = method_agreement(maps).set_index(["method_a", "method_b"])
    for a, b in [("a", "b"), ("a", "c"), ("b", "c")]:
        rho = [scipy.stats.spearmanr(x, y).statistic for x, y in zip(maps[a], maps[b])]
        dice = [len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10 for x, y in zip(maps[a], maps[b])]
        assert table.loc[(a, b), "spearman_subject_mean"] == pytest.approx(np.mean(rho))
        assert table.loc[(a, b), "spearman_subject_std"] == pytest.approx(np.std(rho))
        assert table.loc[(a, b), "dice_top5%_subject_mean"] == pytest.approx(np.mean(dice))
    assert table.loc[("a", "b"), "spearman_subject_mean"] > 0.5 > abs(table.loc[("a", "c"), "spearman_subject_mean"])


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_the_linear_weights_are_scikit_learns_logistic_regression(C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from study.attribution.linear import weight_test

    rng = np.random.default_rng(8)
    labels = (rng.random(50) < 0.45).astype(int)
    voxels = rng.normal(size=(50, 300)) * rng.uniform(0.5, 3, size=300) + 100
    voxels[labels == 1, :10] += 1.0
    voxels[:, 20] = 7.0  # a constant voxel: left out, as StandardScaler leaves it at 0
    reference = LogisticRegression(C=C, max_iter=20000, tol=1e-12).fit(StandardScaler().fit_transform(voxels), labels)
    result = weight_test(voxels, labels, C, permutations=0)
    expected = np.delete(reference.coef_[0], 20)
    # to scikit-learn's own tolerance (lbfgs stops short of the exact optimum that Newton's method reaches)
    np.testing.assert_allclose(np.delete(result.t, 20), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert np.isnan(result.t[20]) and result.constant == 1


def test_linear_weight_p_values_equal_a_brute_force_count():
    from sklearn.linear_model import LogisticRegression

    from study.attribution.linear import standardize, weight_test

    rng = np.random.default_rng(9)
    labels, _, families = design(15, seed=9)
    voxels = rng.normal(size=(len(labels), 40))
    voxels[labels == 1, :2] += 1.5
    permutations, seed, C = 19, 3, 0.5
    result = weight_test(voxels, labels, C, permutations, families, seed=seed, chunk=6)
    x, draws = standardize(voxels), np.random.default_rng(seed)
    blocks = ExchangeabilityBlocks(np.zeros(len(labels), dtype=int), families)
    fit = lambda y: LogisticRegression(C=C, max_iter=20000, tol=1e-12).fit(x, y).coef_[0]  # noqa: E731
    max_null = [np.abs(fit(labels[blocks.draw(draws)])).max() for _ in range(permutations)]
    observed = fit(labels)
    expected = [(1 + sum(m >= abs(w) - 1e-6 for m in max_null)) / (permutations + 1) for w in observed]
    np.testing.assert_allclose(result.t, observed, rtol=1e-4, atol=1e-6 * np.abs(observed).max())
    np.testing.assert_allclose(result.p, expected)


def test_linear_weight_test_family_wise_error_rate_under_the_null_is_five_percent():
    # No effect; siblings share part of their voxels. The weights' max-statistic test keeps FWER at 5%.
    from study.attribution.linear import weight_test

    rng = np.random.default_rng(10)
    draws, hits = 300, 0
    for draw in range(draws):
        labels, _, families, voxels = null_maps(rng, 2000 + draw, 30)
        hits += bool((weight_test(voxels, labels, 0.1, 99, families, seed=draw).p <= 0.05).any())
    assert 0.02 <= hits / draws <= 0.085, hits / draws


def test_adjusted_for_confounds_the_test_is_nilearns_freedman_lane_permuted_ols():
    """With confounds, the t is OLS t of the label adjusted for them, as nilearn's ``permuted_ols`` computes it,
    and the FWER p values agree within Monte Carlo error; a voxel that only follows the confound is significant
    for Welch's test of the classes, not for the adjusted one."""
    from nilearn.mass_univariate import permuted_ols

    from study.attribution.stats import permutation_test

    rng = np.random.default_rng(0)
    n, v = 60, 300
    labels = rng.integers(0, 2, n)
    confounds = np.column_stack([labels + 0.5 * rng.normal(size=n), rng.integers(0, 2, n)])  # head size, a site
    maps = rng.normal(size=(n, v))
    maps[:, :20] += 2.0 * labels[:, None]  # the classes differ here
    maps[:, 20:60] += 1.5 * confounds[:, [0]]  # only the head size here
    adjusted = permutation_test(maps, labels, 2000, seed=1, confounds=confounds)
    reference = permuted_ols(
        labels[:, None].astype(float), maps, confounding_vars=confounds, n_perm=2000, random_state=1, output_type="dict"
    )
    np.testing.assert_allclose(adjusted.t, reference["t"][0], rtol=1e-9)
    np.testing.assert_allclose(adjusted.p, 10 ** -reference["logp_max_t"][0], atol=0.04)
    welch = permutation_test(maps, labels, 2000, seed=1)
    assert np.mean(welch.p[20:60] < 0.05) > 0.5 and np.mean(adjusted.p[20:60] < 0.05) < 0.1
    assert np.mean(adjusted.p[:20] < 0.05) > 0.3
