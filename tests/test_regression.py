"""A regression target (brain age): its statistics against reference implementations, its cohort and config
checks, and a study end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from study.data.targets import Regression
from study.training.calibration import MIN_SLOPE, Calibration
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


def test_the_paired_test_is_scipys_sign_flip_permutation_test_of_the_mean_difference():
    rng = np.random.default_rng(5)
    ages = rng.uniform(20, 80, 12)
    a, b = ages + rng.normal(0, 3, 12), ages + rng.normal(0, 5, 12)
    difference, p = paired_absolute_errors(ages, a, b, resamples=500, permutations=40000)
    expected = np.abs(a - ages) - np.abs(b - ages)
    assert difference.value == pytest.approx(mean_absolute_error(ages, a) - mean_absolute_error(ages, b))
    exact = scipy.stats.permutation_test((expected,), np.mean, permutation_type="samples", n_resamples=np.inf)
    assert p == pytest.approx(exact.pvalue, abs=0.01) and 0.01 < exact.pvalue < 0.9
    ages, good, _ = _ages(noise=4)
    bad = ages + np.random.default_rng(5).normal(0, 9, len(ages))
    difference, p = paired_absolute_errors(ages, good, bad, resamples=500)
    assert difference.high < 0 and p < 0.05
    assert paired_absolute_errors(ages, good, good)[1] == 1.0


def test_the_verdict_reads_in_mae_and_a_cnn_worse_than_ridge_is_below_baseline():
    ages, predicted, folds = _ages(noise=3)
    noisy = ages + np.random.default_rng(3).normal(0, 12, len(ages))
    better = evaluate_regression(ages, predicted, folds, noisy, permutations=500)
    assert better.finding == "yes" and "held-out MAE" in better.verdict and "sign-flip permutation" in better.verdict
    worse = evaluate_regression(ages, noisy, folds, predicted, permutations=500)
    assert worse.finding == "below_baseline" and "better than chance" in worse.verdict
    assert "significantly worse than the linear baseline's" in worse.verdict and "above chance" not in worse.verdict
    chance = evaluate_regression(ages, np.random.default_rng(4).permutation(ages), folds, permutations=500)
    assert chance.finding == "none" and chance.cnn_p > 0.05


def test_the_gap_correction_undoes_each_folds_line():
    ages, _, folds = _ages()
    lines = {0: (0.6, 20.0), 1: (0.8, 10.0), 2: (0.5, 25.0)}
    predicted = np.array([lines[f][0] * a + lines[f][1] for a, f in zip(ages, folds)])
    np.testing.assert_allclose(bias_corrected_gap(ages, predicted, folds, lines), 0, atol=1e-9)
    # a fold whose model learned too little (its line nearly flat) gets no correction, not one that blows up noise
    flat = lines | {1: (0.1, 45.0)}
    gaps = bias_corrected_gap(ages, predicted, folds, flat)
    assert np.isnan(gaps[folds == 1]).all() and np.isfinite(gaps[folds != 1]).all()


def test_folds_balance_the_targets_quartiles_and_standardize_by_training_subjects():
    ages = np.arange(20.0, 100.0)
    strata, names = Regression("age").strata(ages)
    assert names == ("age 20 to 39", "age 40 to 59", "age 60 to 79", "age 80 to 99")
    assert np.bincount(strata).tolist() == [20] * 4
    # a floor effect (half the cohort at one value) leaves no stratum empty, which the splits would refuse
    floored = np.concatenate([np.full(50, 20.0), np.linspace(30, 80, 50)])
    strata, names = Regression("age").strata(floored)
    assert np.bincount(strata).tolist() == [50, 25, 25] and names[0] == "age 20 to 20"
    standardization = Calibration.standardizing(ages[:40])
    assert standardization.bias == pytest.approx(ages[:40].mean()) and standardization.subjects == 40
    np.testing.assert_allclose(standardization.values(standardization.standardized(ages)), ages)


def test_a_regression_cohort_reads_numbers_and_names_what_is_not_one(tmp_path, capsys):
    from study.cli import main
    from study.data.cohort import CohortConfig, load_cohort
    from study.data.synth import SyntheticCohort, synthesize_cohort
    from study.tasks import map_in_process
    from tests.test_cohort import edit_table

    synthesize_cohort(tmp_path, SyntheticCohort(subjects=6, voxel_sizes=(4.0,), age_effect=0.2), tasks=map_in_process)
    edit_table(tmp_path, lambda lines: [lines[0], lines[1].replace(lines[1].split("\t")[-1], "unknown"), *lines[2:]])
    cohort = load_cohort(CohortConfig(root=tmp_path, label="age", task="regression"))
    assert cohort.labels.dtype == np.float64 and 20 <= cohort.labels.min() and cohort.labels.max() <= 80
    assert [p.subject for p in cohort.problems] == ["0001"]
    assert "'unknown' in column 'age' is not a number; task regression needs one" in cohort.problems[0].message
    # as a new user first types it: the ages as classes name the task that reads them
    as_classes = load_cohort(CohortConfig(root=tmp_path, label="age"))
    assert "(a number to predict, such as an age: cohort.task: regression)" in as_classes.problems[-1].message
    capsys.readouterr()
    assert main(["validate", str(tmp_path), "--label", "age", "--task", "regression"], tasks=map_in_process) == 1
    output = capsys.readouterr()
    assert "5 subjects OK, 1 problems in 1 subjects" in output.err and "0001" in output.out


def test_the_maps_association_with_the_target_is_the_ols_t_of_scipys_linregress():
    from study.attribution.stats import permutation_test

    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 40)
    maps = rng.normal(size=(40, 30))
    maps[:, :5] += 0.05 * ages[:, None]  # five voxels go with age
    test = permutation_test(maps, ages, 200, confounds=np.zeros((40, 0)), seed=1)
    for voxel in range(30):
        fit = scipy.stats.linregress(ages, maps[:, voxel])
        assert test.t[voxel] == pytest.approx(fit.slope / fit.stderr, rel=1e-8)
    assert (test.p[:5] < 0.05).all() and (test.p[5:] > 0.05).mean() > 0.9


def test_the_ridge_baselines_weight_test_fits_scikit_learns_ridge():
    from sklearn.linear_model import Ridge

    from study.attribution.linear import LinearVoxelModel, standardize, weight_test
    from study.training.baseline import BaselineResult

    rng = np.random.default_rng(2)
    voxels = rng.normal(size=(30, 200))
    ages = 40 + 10 * voxels[:, 0] + rng.normal(0, 2, 30)
    test = weight_test(voxels, ages, C=1 / 5.0, permutations=50, regression=True)
    reference = Ridge(alpha=5.0).fit(standardize(voxels), ages)
    np.testing.assert_allclose(test.t, reference.coef_, rtol=1e-6, atol=1e-9)
    assert np.argmax(np.abs(test.t)) == 0 and test.p[0] < 0.05
    # the same model as a network: one output, the ridge's prediction
    baseline = BaselineResult(0, 0.2, {}, None, reference.coef_, 0.0, reference.intercept_, np.zeros(200), np.ones(200))
    model = LinearVoxelModel(baseline, np.ones((5, 5, 8), bool), outputs=1)
    x = torch.tensor(standardize(voxels)[:3], dtype=torch.float32).reshape(3, 1, 5, 5, 8)
    np.testing.assert_allclose(model(x)[:, 0].numpy(), reference.predict(standardize(voxels)[:3]), rtol=1e-4)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"attribution": {"methods": ["gradcam"], "target": "true_class"}}, "attribution.target: use contrast"),
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


def test_classes_refuse_val_mae(tmp_path):
    from study.errors import ConfigError
    from tests.test_study import study_config

    search = {"space": {"lr": {"choice": [0.001]}}, "metric": "val_mae"}
    with pytest.raises(ConfigError, match="search.metric val_mae is a regression target's"):
        study_config(tmp_path, tmp_path, search=search)


def test_meaningful_perturbations_of_a_regression_model_delete_what_moves_each_prediction_to_the_mean():
    """A model of age from one region's intensity, carrying its fold's map to years: deleting towards the cohort's
    mean volume moves an old prediction and a young one towards the mean, and the maps are the region."""
    from sklearn.metrics import roc_auc_score

    from study.attribution.perturbation import Perturbation, meaningful_perturbation
    from tests.test_attribution import REGION, SHAPE, box

    class AgeNet(torch.nn.Module):
        """Standardized age from the region's mean intensity (0 at mid-grey), nothing else."""

        def __init__(self):
            super().__init__()
            self.register_buffer("region", box(REGION).float()[None, None])

        def forward(self, x):
            return ((x * self.region).flatten(1).sum(1, keepdim=True) / self.region.sum() - 0.5) * 4

    torch.manual_seed(0)
    x = torch.rand(2, 1, *SHAPE) * 0.1
    x[(0, 0, *REGION)] += 1.0  # an old-looking subject; the other's region is dark, young-looking
    mean = x.mean(0)[0]
    model = Calibration(10.0, 50.0).applied_to(AgeNet()).eval()  # years: 50 + 10 x the standardized output
    config = Perturbation(iterations=150, mask_scale=2, reference="cohort_mean")
    maps = meaningful_perturbation(model, x, None, config, voxel_mm=2.0, cohort_mean=mean)
    with torch.no_grad():
        before = model(x)[:, 0]
        after = model(x * (1 - maps[:, None]) + mean * maps[:, None])[:, 0]
    assert before[0] > 65 and before[1] < 35  # one predicted old, one young
    middle = model(mean[None, None])[0, 0]
    assert ((after - middle).abs() < 0.3 * (before - middle).abs()).all()  # both moved most of the way
    region = box(REGION).flatten().numpy()
    for subject in maps:
        assert roc_auc_score(region, subject.flatten().numpy()) > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["recenter", "none"])
def test_a_brain_age_study_standardizes_tests_and_corrects_the_gap_on_training_subjects_only(tmp_path, calibration):
    """``run_study`` on a cohort with an age effect: each fold's model learns ages standardized by its training
    subjects and predicts held-out ones in years, corrected (``recenter``) by the line of its own predictions on
    its training subjects, which also corrects the gap (no held-out subject in it); MLflow and the report carry the
    MAE, its tests and the gap, and the maps (with ``recenter``) their association with age."""
    import pyarrow.fs
    import torch

    from study.cli import main
    from study.data.cache import CachedVolumes
    from study.data.prepare import prepare_cohort
    from study.data.splits import load_splits
    from study.pipeline import run_study, study_dir
    from study.runtime import Precision
    from study.tasks import map_in_process
    from study.training.checkpoint import load_model
    from study.training.folds import FoldResult
    from study.training.loop import predict_log_odds
    from tests.test_predict import held_out
    from tests.test_study import study_config

    root = tmp_path / "ageing"
    argv = ["synth", str(root), "--subjects", "30", "--voxel-size", "4", "--age-effect", "0.3", "--seed", "2"]
    assert main(argv, tasks=map_in_process) == 0
    config = study_config(
        tmp_path,
        root,
        cohort={"label": "age", "task": "regression"},
        train={"loss": "huber", "calibration": calibration, "epochs": 12, "lr": 0.003},
        attribution={
            "methods": ["gradcam", "integrated_gradients", "perturbation"],
            "perturbation": {"iterations": 20},
            "permutations": 20,
            "sanity": {"subjects": 2},
        }
        if calibration == "recenter"
        else None,
    )
    run_id = run_study(config)
    execution = study_dir(config) / "latest"

    cohort = prepare_cohort(config.cohort, config.preprocess).cache
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    ages = dict(zip(participants.participant_id.str.removeprefix("sub-"), participants.age))
    splits = {f.fold: f for f in load_splits(execution / "splits.json")[1]}
    precision = Precision.choose(torch.device("cpu"), "fp32", False)
    table = held_out(config, run_id, tmp_path)
    folds = {}
    for path in sorted((execution / "folds").glob("fold*.json")):
        result = FoldResult.from_json(path.read_text(), pyarrow.fs.LocalFileSystem())
        folds[result.fold] = result
        train = splits[result.fold].train
        train_ages = np.array([ages[s] for s in train])
        # standardized by the fold's training subjects (never a held-out one), then, with recenter, corrected by
        # the line of the model's outputs on those training subjects
        training = CachedVolumes(cohort, train, train_ages)
        outputs = predict_log_odds(load_model(result.checkpoint), training, 4, precision)
        raw = outputs * train_ages.std() + train_ages.mean()  # in years, before the correction
        raw_slope, raw_intercept = np.polyfit(train_ages, raw, 1)
        assert raw_slope >= MIN_SLOPE, "the test's model must learn enough for its line to be undone"
        assert result.fit_score("fit_raw_slope") == pytest.approx(raw_slope, rel=1e-4)
        assert result.fit_score("fit_raw_intercept") == pytest.approx(raw_intercept, rel=1e-4, abs=1e-3)
        expected = Calibration.standardizing(train_ages)
        if calibration == "recenter":
            expected = expected.corrected_by(raw_slope, raw_intercept)
        assert result.calibration.temperature == pytest.approx(expected.temperature, rel=1e-4)
        assert result.calibration.bias == pytest.approx(expected.bias, rel=1e-4)
        model = load_model(result.checkpoint, calibrated=True)
        on_train = predict_log_odds(model, training, 4, precision)
        if calibration == "recenter":
            np.testing.assert_allclose(on_train, (raw - raw_intercept) / raw_slope, rtol=1e-5)
        slope, intercept = np.polyfit(train_ages, on_train, 1)  # as it predicts: recenter undid the line
        if calibration == "recenter":
            assert slope == pytest.approx(1, rel=1e-5) and intercept == pytest.approx(0, abs=1e-4)
        else:  # the gap's correction is the line itself: no identity that a wrong wiring would also pass
            assert slope == pytest.approx(raw_slope, rel=1e-4) and abs(slope - 1) > 1e-3
        assert result.fit_score("fit_slope") == pytest.approx(slope, rel=1e-4)
        assert result.fit_score("fit_intercept") == pytest.approx(intercept, abs=1e-3)
        test = table[table.fold == result.fold]
        on_test = predict_log_odds(model, CachedVolumes(cohort, test.subject_id.tolist(), test.age), 4, precision)
        np.testing.assert_allclose(test.predicted_age, on_test, rtol=1e-5)
        np.testing.assert_allclose(test.corrected_gap, (on_test - intercept) / slope - test.age, rtol=1e-4, atol=1e-4)

    run = mlflow_run(config, run_id)
    metrics = run.data.metrics
    assert metrics["pooled_mae_ci_low"] < metrics["pooled_mae"] < metrics["pooled_mae_ci_high"]
    for name in ("baseline_pooled_mae", "pooled_r", "pooled_r2", "cnn_minus_baseline_p", "corrected_gap_sd"):
        assert np.isfinite(metrics[name]), name
    assert run.data.tags["study.finding"] in ("yes", "below_baseline", "baseline_only", "none")
    report = (execution / "report.html").read_text()
    assert "age regression from T1w MRI" in report and "held-out MAE" in report and "Predicted against true" in report
    if calibration == "none":
        assert not np.allclose(table.gap, table.corrected_gap)
        return
    # maps of the predicted age, tested for their association with age, scored against the planted age regions
    assert "whose maps go with age" in report and "its r on its own shuffled labels" in report
    artifacts = {f.path for f in mlflow_client(config).list_artifacts(run_id, "maps/gradcam")}
    assert {"maps/gradcam/gradcam_t_age.nii.gz", "maps/gradcam/gradcam_mean_all.nii.gz"} <= artifacts
    assert "maps/linear_baseline/linear_baseline_weights_age.nii.gz" in {
        f.path for f in mlflow_client(config).list_artifacts(run_id, "maps/linear_baseline")
    }
    assert 0 <= metrics["localization_roc_auc_gradcam"] <= 1
    assert "to move it to its fold" in report  # Meaningful Perturbations of the predicted age (' escaped)

    # study predict: each fold's model gives a held-out subject the age the study gave it, and the table's true
    # age gives the gap, corrected by each fold's line
    participants.head(4).to_csv(root / "new.tsv", sep="\t", index=False)
    out, uri = tmp_path / "predicted.tsv", config.tracking.uri
    maps = ["--maps", str(tmp_path / "maps")]
    assert main(["predict", "tiny", str(root / "new.tsv"), "--out", str(out), "--tracking-uri", uri, *maps]) == 0
    for method in ("integrated_gradients", "perturbation"):
        assert len(list((tmp_path / "maps" / method).glob(f"sub-*_{method}.nii.gz"))) == 4
    predicted = pd.read_csv(out, sep="\t", dtype={"subject_id": str}).set_index("subject_id")
    lines = {f: (r.fit_score("fit_slope"), r.fit_score("fit_intercept")) for f, r in folds.items()}
    for subject, row in table.set_index("subject_id").loc[predicted.index].iterrows():
        assert predicted.loc[subject, f"predicted_age_fold{int(row.fold)}"] == pytest.approx(
            row.predicted_age, rel=1e-5
        )
        by_fold = [predicted.loc[subject, f"predicted_age_fold{f}"] for f in sorted(lines)]
        corrected = np.mean([(v - lines[f][1]) / lines[f][0] for f, v in zip(sorted(lines), by_fold)]) - row.age
        assert predicted.loc[subject, "corrected_gap"] == pytest.approx(corrected, rel=1e-4, abs=1e-4)
        assert predicted.loc[subject, "gap"] == pytest.approx(np.mean(by_fold) - row.age, abs=1e-4)


def mlflow_client(config):
    import mlflow

    return mlflow.MlflowClient(config.tracking.uri)


def mlflow_run(config, run_id: str):
    return mlflow_client(config).get_run(run_id)
