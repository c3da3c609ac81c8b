"""A regression target (brain age): its statistics against reference implementations, its cohort and config
checks, and a study end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from study.data.targets import Regression
from study.training.calibration import Calibration
from study.training.metrics import regression_metrics
from study.training.regression import (
    bias_corrected_gap,
    bootstrap_scores,
    evaluate_regression,
    mae_permutation_p,
    paired_absolute_errors,
)


def _ages(n: int = 90, noise: float = 6.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 80, n)
    return ages, 0.7 * ages + 15 + rng.normal(0, noise, n), np.arange(n) % 3


def test_scores_are_scikit_learns_and_scipys_and_their_intervals_hold_them():
    ages, predicted, _ = _ages()
    scores = bootstrap_scores(ages, predicted, resamples=500)
    assert scores["mae"].value == pytest.approx(mean_absolute_error(ages, predicted))
    assert scores["rmse"].value == pytest.approx(np.sqrt(mean_squared_error(ages, predicted)))
    assert scores["r"].value == pytest.approx(scipy.stats.pearsonr(ages, predicted)[0])
    assert scores["r2"].value == pytest.approx(r2_score(ages, predicted))
    assert {k: pytest.approx(v.value) for k, v in scores.items()} == {
        k: v for k, v in regression_metrics(ages, predicted).items() if k != "mean_error"
    }
    for estimate in scores.values():
        assert estimate.low < estimate.value < estimate.high
    # the interval narrows as subjects grow
    many = bootstrap_scores(*_ages(n=900)[:2], resamples=500)["mae"]
    assert many.high - many.low < 0.5 * (scores["mae"].high - scores["mae"].low)


def test_the_permutation_test_matches_a_brute_force_count_of_every_permutation_within_folds():
    rng = np.random.default_rng(1)
    ages = rng.uniform(20, 80, 10)
    predicted = 0.2 * ages + 40 + rng.normal(0, 10, 10)  # a weak model: p near 0.15
    folds = np.array([0] * 5 + [1] * 5)
    observed = np.mean(np.abs(predicted - ages))
    count = total = 0
    for first, second in itertools.product(itertools.permutations(range(5)), repeat=2):
        permuted = np.concatenate([ages[:5][list(first)], ages[5:][list(second)]])
        count += np.mean(np.abs(predicted - permuted)) <= observed + 1e-12
        total += 1
    exact = count / total
    assert mae_permutation_p(ages, predicted, folds, permutations=20000, seed=2) == pytest.approx(exact, abs=0.01)
    assert 0.005 < exact < 0.9  # neither end, so the comparison means something


def test_the_paired_test_is_wilcoxons_on_the_differences_of_absolute_errors():
    ages, good, _ = _ages(noise=4)
    bad = ages + np.random.default_rng(5).normal(0, 9, len(ages))
    difference, p = paired_absolute_errors(ages, good, bad, resamples=500)
    expected = np.abs(good - ages) - np.abs(bad - ages)
    assert difference.value == pytest.approx(mean_absolute_error(ages, good) - mean_absolute_error(ages, bad))
    assert p == pytest.approx(scipy.stats.wilcoxon(expected).pvalue)
    assert difference.high < 0 and p < 0.05
    assert paired_absolute_errors(ages, good, good)[1] == 1.0


def test_the_verdict_reads_in_mae_and_a_cnn_worse_than_ridge_is_below_baseline():
    ages, predicted, folds = _ages(noise=3)
    noisy = ages + np.random.default_rng(3).normal(0, 12, len(ages))
    better = evaluate_regression(ages, predicted, folds, noisy, permutations=500)
    assert better.finding == "yes" and "held-out MAE" in better.verdict and "Wilcoxon" in better.verdict
    worse = evaluate_regression(ages, noisy, folds, predicted, permutations=500)
    assert worse.finding == "below_baseline"
    chance = evaluate_regression(ages, np.random.default_rng(4).permutation(ages), folds, permutations=500)
    assert chance.finding == "none" and chance.cnn_p > 0.05


def test_the_gap_correction_undoes_each_folds_line():
    ages, _, folds = _ages()
    lines = {0: (0.6, 20.0), 1: (0.8, 10.0), 2: (0.5, 25.0)}
    predicted = np.array([lines[f][0] * a + lines[f][1] for a, f in zip(ages, folds)])
    np.testing.assert_allclose(bias_corrected_gap(ages, predicted, folds, lines), 0, atol=1e-9)


def test_folds_balance_the_targets_quartiles_and_standardize_by_training_subjects():
    ages = np.arange(20.0, 100.0)
    strata, names = Regression("age").strata(ages)
    assert names == tuple(f"age quartile {i}" for i in (1, 2, 3, 4)) and np.bincount(strata).tolist() == [20] * 4
    standardization = Calibration.standardizing(ages[:40])
    assert standardization.bias == pytest.approx(ages[:40].mean()) and standardization.subjects == 40
    np.testing.assert_allclose(standardization.values(standardization.standardized(ages)), ages)


def test_a_regression_cohort_reads_numbers_and_names_what_is_not_one(tmp_path):
    from study.data.cohort import CohortConfig, load_cohort
    from study.data.synth import SyntheticCohort, synthesize_cohort
    from study.tasks import map_in_process
    from tests.test_cohort import edit_table

    synthesize_cohort(tmp_path, SyntheticCohort(subjects=6, voxel_sizes=(8.0,), age_effect=0.2), tasks=map_in_process)
    edit_table(tmp_path, lambda lines: [lines[0], lines[1].replace(lines[1].split("\t")[-1], "unknown"), *lines[2:]])
    cohort = load_cohort(CohortConfig(root=tmp_path, label="age", task="regression"))
    assert cohort.labels.dtype == np.float64 and 20 <= cohort.labels.min() and cohort.labels.max() <= 80
    assert [p.subject for p in cohort.problems] == ["0001"]
    assert "'unknown' in column 'age' is not a number; task regression needs one" in cohort.problems[0].message


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"attribution": {"methods": ["gradcam"]}}, "attribution: set attribution: null"),
        ({"cohort": {"confounds": ["site"]}}, "cohort.confounds: remove them"),
        ({"train": {"calibration": "platt"}}, "train.calibration: remove it"),
        ({"cohort": {"classes": ["young", "old"]}}, "remove cohort.classes and cohort.label_mapping"),
    ],
)
def test_what_a_regression_study_cannot_do_yet_is_refused_when_the_config_loads(tmp_path, sections, expected):
    from study.errors import ConfigError
    from tests.test_study import study_config

    cohort = {"label": "age", "task": "regression"} | sections.pop("cohort", {})
    with pytest.raises(ConfigError, match=expected):
        study_config(tmp_path, tmp_path, cohort=cohort, **sections)
