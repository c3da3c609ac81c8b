"""The confound check: the confounds-only model, Spisak's full and partial confound tests, and the verdict.

The tests are checked against exact enumerations of their null distributions on small samples (``mlconfound``,
the reference implementation, pins pygam 0.8.0 and imports ``pkg_resources``; ``benchmarks/confounds.py``
compares it side by side where it is installed), and their false-positive rate over many confound-only samples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from study.data.cohort import CohortConfig, load_cohort
from study.errors import CohortError
from study.training.confounds import (
    conditional_permutations,
    confound_model,
    confound_predictions,
    full_confound_test,
    partial_confound_test,
)
from study.training.evaluation import evaluate


def _sample(n: int, seed: int, label_signal: float, confound_signal: float, site: bool = False):
    """Labels, a confound that goes with them (numeric, or a two-level site), and predictions made of
    ``label_signal`` x label + ``confound_signal`` x confound + noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    if site:
        c = np.where(rng.random(n) < np.where(y == 1, 0.8, 0.2), "B", "A")
        numeric = (c == "B").astype(float)
    else:
        numeric = y + rng.normal(size=n)
        c = numeric
    yhat = label_signal * y + confound_signal * numeric + rng.normal(size=n)
    return y, yhat, pd.DataFrame({"site" if site else "tiv": c})


def _exact_permutation_distribution(log_likelihood: np.ndarray) -> dict[tuple, float]:
    """Every permutation's probability under the conditional permutation distribution, prod_j q(x_pi(j) | z_j),
    summed by the permuted vector it gives (here: of indices into x)."""
    n = len(log_likelihood)
    weights = {}
    for pi in itertools.permutations(range(n)):
        weights[pi] = math.exp(sum(log_likelihood[pi[j], j] for j in range(n)))
    total = sum(weights.values())
    return {pi: w / total for pi, w in weights.items()}


def test_the_conditional_permutations_follow_berretts_distribution():
    """The pairwise-swap chains draw permutations with the probabilities the CPT defines (exact enumeration of
    5! permutations), not uniformly: the permuted labels keep their relation to the confound."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=5)
    x = np.array([0, 0, 1, 1, 1])
    p1 = 1 / (1 + np.exp(-2 * z))
    log_likelihood = np.log(np.where(x[:, None] == 1, p1[None], 1 - p1[None]))  # q(x_i | z_j)
    exact = _exact_permutation_distribution(log_likelihood)
    by_labels: dict[tuple, float] = {}
    for pi, w in exact.items():
        by_labels[tuple(x[list(pi)])] = by_labels.get(tuple(x[list(pi)]), 0) + w
    drawn = x[conditional_permutations(log_likelihood, 20000, seed=1)]
    counts = pd.Series([tuple(row) for row in drawn]).value_counts(normalize=True)
    total_variation = 0.5 * sum(abs(counts.get(k, 0) - w) for k, w in by_labels.items())
    uniform = 0.5 * sum(abs(1 / len(by_labels) - w) for w in by_labels.values())
    assert total_variation < 0.02 < uniform / 3


def test_the_full_test_p_is_the_exact_conditional_permutation_p():
    y, yhat, table = _sample(7, seed=3, label_signal=1.0, confound_signal=1.0)
    result = full_confound_test(y, yhat, table, permutations=20000, seed=0)
    p1 = confound_model(table).fit(table, y).predict_proba(table)[:, 1]
    log_likelihood = np.log(np.where(y[:, None] == 1, p1[None], 1 - p1[None]))
    observed = np.corrcoef(y, yhat)[0, 1] ** 2
    exact = sum(
        w
        for pi, w in _exact_permutation_distribution(log_likelihood).items()
        if np.corrcoef(y[list(pi)], yhat)[0, 1] ** 2 >= observed - 1e-12
    )
    assert result.r2 == pytest.approx(observed)
    assert result.p == pytest.approx(exact, abs=0.015)


def test_the_partial_test_p_is_the_exact_within_class_permutation_p():
    y, yhat, table = _sample(8, seed=4, label_signal=1.0, confound_signal=1.5, site=True)
    result = partial_confound_test(y, yhat, table, permutations=20000, seed=0)
    design = np.column_stack([np.ones(len(y)), table.site == "B"])

    def r2(predictions: np.ndarray) -> float:  # ordinary least squares on the site, with an intercept
        residuals = predictions - design @ np.linalg.lstsq(design, predictions)[0]
        return 1 - residuals @ residuals / np.sum((predictions - predictions.mean()) ** 2)

    classes = [np.flatnonzero(y == k) for k in (0, 1)]
    null = []
    for zero, one in itertools.product(*(itertools.permutations(rows) for rows in classes)):
        permuted = yhat.copy()
        permuted[classes[0]], permuted[classes[1]] = yhat[list(zero)], yhat[list(one)]
        null.append(r2(permuted))
    assert result.r2 == pytest.approx(r2(yhat))
    assert result.p == pytest.approx(np.mean(np.array(null) >= r2(yhat) - 1e-12), abs=0.01)


@pytest.mark.parametrize("site", [False, True], ids=["tiv", "site"])
def test_a_model_of_the_confound_alone_is_called_beyond_it_at_most_5_percent_of_the_time(site):
    """Confound-only samples (predictions follow the confound, not the label): the full test rejects at the 5%
    level no more often than it should; with signal from the label as well it nearly always does, and the partial
    test sees the confound.

    The test is conservative here, as ``mlconfound``'s is on the same samples: its null depends on the slope of the
    fitted model of label given confound, and a logistic regression's estimate is biased away from zero in small
    samples (with the true model, the p values are uniform)."""
    runs = 100
    beyond = [
        full_confound_test(*_sample(150, s, 0.0, 2.0, site), permutations=200, seed=s).p < 0.05 for s in range(runs)
    ]
    assert np.mean(beyond) <= 0.08
    powered = [full_confound_test(*_sample(150, s, 1.5, 2.0, site), permutations=200, seed=s).p for s in range(20)]
    assert np.mean(np.array(powered) < 0.05) >= 0.9
    assert partial_confound_test(*_sample(150, 0, 0.0, 2.0, site), permutations=200).p < 0.05


def test_the_confounds_alone_are_fitted_on_each_folds_training_subjects_only():
    """Changing a held-out subject's confound changes its own prediction and no other; changing a training
    subject's changes the predictions of the fold it trains."""
    y, _, table = _sample(40, seed=5, label_signal=0.0, confound_signal=0.0)
    table["site"] = np.where(np.arange(40) % 3 == 0, "B", "A")
    folds = [(np.arange(20, 40), np.arange(20)), (np.arange(20), np.arange(20, 40))]
    before = confound_predictions(table, y, folds)
    changed = table.copy()
    changed.loc[3, "tiv"] += 5.0  # held out by fold 0, which predicts subjects 0-19; trains fold 1
    after = confound_predictions(changed, y, folds)
    assert after[3] != before[3] and np.array_equal(np.delete(after[:20], 3), np.delete(before[:20], 3))
    assert not np.allclose(after[20:], before[20:])


def test_a_result_the_confounds_explain_is_called_so_and_one_beyond_them_keeps_its_finding():
    labels, _, table = _sample(300, seed=6, label_signal=0.0, confound_signal=0.0)
    rng = np.random.default_rng(6)
    folds = np.arange(300) % 3
    rows = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(3)]
    alone = confound_predictions(table, labels, rows)
    confounded = 1 / (1 + np.exp(-(2 * table["tiv"].to_numpy() + rng.normal(size=300))))
    evaluation = evaluate(labels, confounded, folds, permutations=199, confounds=table, confounds_alone=alone)
    assert evaluation.cnn_p < 0.05 and evaluation.confounds.full.p >= 0.05 and evaluation.finding == "confounds"
    assert evaluation.confounds.partial.p < 0.05 and evaluation.confounds.alone.value > 0.7
    assert evaluation.verdict.startswith("Explained by the confounds (tiv): the CNN's held-out ROC AUC")
    assert f"The confounds alone reach ROC AUC {evaluation.confounds.alone}" in evaluation.verdict
    beyond = 1 / (1 + np.exp(-(2 * labels + table["tiv"].to_numpy() + rng.normal(size=300))))
    evaluation = evaluate(labels, beyond, folds, permutations=199, confounds=table, confounds_alone=alone)
    assert evaluation.finding == "yes" and evaluation.confounds.full.p < 0.05
    assert "Beyond the confounds (tiv; alone they reach ROC AUC" in evaluation.verdict
    assert evaluate(labels, beyond, folds, permutations=199).verdict.startswith(evaluation.verdict.split(" Beyond")[0])


def test_a_confound_without_a_value_or_column_is_named_with_the_subject(cohort_dir, tmp_path):
    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype=str)
    table["site"] = ["A", "B"] * (len(table) // 2) + ["A"] * (len(table) % 2)
    table["tiv"] = "1500"
    table.loc[2, "tiv"] = ""
    path = tmp_path / "participants.tsv"
    table.to_csv(path, sep="\t", index=False)
    cohort = load_cohort(CohortConfig(root=cohort_dir, participants=path, confounds=["site", "tiv"]))
    sid = table.participant_id[2].removeprefix("sub-")
    assert [(p.subject, p.message) for p in cohort.problems] == [
        (
            sid,
            "missing value in confound column 'tiv'; fill it in, or drop the row, or the column from cohort.confounds",
        )
    ]
    confounds = cohort.confound_table(cohort.ids[:4])
    site = dict(zip(table.participant_id.str.removeprefix("sub-"), table.site))
    assert confounds.tiv.dtype == float and list(confounds.site) == [site[s] for s in cohort.ids[:4]]
    with pytest.raises(CohortError, match="no column 'scanner'"):
        load_cohort(CohortConfig(root=cohort_dir, participants=path, confounds=["scanner"]))


def test_a_prepared_cohort_keeps_its_confounds_and_the_study_tests_them(cohort_dir, tmp_path):
    """From the participants table through preprocessing to the study's evaluation (``evaluate_folds``), as
    ``study run`` does it: the confounds-only model is fitted in the study's own folds."""
    from types import SimpleNamespace

    from study.config import parse_config
    from study.data.prepare import make_or_load_splits, prepare_cohort
    from study.pipeline import evaluate_folds
    from study.tasks import map_in_process

    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype=str)
    male = table.sex.str.upper().str.startswith("M").to_numpy()
    table["site"] = np.where(np.random.default_rng(0).random(len(table)) < np.where(male, 0.9, 0.1), "B", "A")
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    config = parse_config(
        {
            "name": "confounded",
            "cohort": {
                "root": str(cohort_dir),
                "participants": str(tmp_path / "participants.tsv"),
                "confounds": ["site"],
            },
            "preprocess": {"voxel_size": 8.0, "cache_dir": str(tmp_path / "cache")},
            "cv": {"outer_folds": 2, "inner_folds": 2},
        }
    )
    prepared = prepare_cohort(config.cohort, config.preprocess, map_in_process)
    assert prepared.cohort.confounds == ("site",)
    folds = make_or_load_splits(config.cv, prepared.cohort, tmp_path / "splits.json")
    classes, results, baselines = prepared.cohort.target, [], []
    for fold in folds:  # both models predict the scanner
        site = prepared.cohort.confound_table(fold.test).site.to_numpy()
        p = np.where(site == "B", 0.7, 0.3)
        labels = prepared.cohort.labels[[prepared.cohort.ids.index(s) for s in fold.test]]
        results.append(SimpleNamespace(fold=fold.fold, predictions=classes.predictions(fold.test, labels, p)))
        baselines.append(SimpleNamespace(predictions=classes.predictions(fold.test, labels, p)))
    labels = dict(zip(prepared.cohort.ids, prepared.cohort.labels))
    study = SimpleNamespace(
        cohort=prepared.cohort,
        cache=prepared.cache,
        folds=folds,
        config=config,
        labels=lambda ids: np.array([labels[s] for s in ids]),
    )
    evaluation = evaluate_folds(study, results, baselines)
    assert evaluation.confounds.names == ("site",) and evaluation.confounds.full.p >= 0.05
    assert evaluation.confounds.alone.value > 0.7


def test_leave_site_out_splits_come_from_the_participants_table(cohort_dir, tmp_path):
    from study.config import parse_config
    from study.data.prepare import make_or_load_splits

    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype=str)
    first = {f: i for i, f in enumerate(dict.fromkeys(table.family_id))}
    table["scanner"] = ["AB"[first[f] % 2] for f in table.family_id]  # whole families per scanner
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    cohort = {"root": str(cohort_dir), "participants": str(tmp_path / "participants.tsv"), "confounds": ["scanner"]}
    config = parse_config(
        {"name": "sites", "cohort": cohort, "cv": {"outer_folds": 2, "inner_folds": 2, "group_by": "scanner"}}
    )
    loaded = load_cohort(config.cohort)
    folds = make_or_load_splits(config.cv, loaded, tmp_path / "splits.json")
    scanner = dict(zip(loaded.ids, loaded.confound_table(loaded.ids).scanner))
    assert sorted({scanner[s] for s in f.test}.pop() for f in folds) == ["A", "B"]
    assert "group_by=scanner" in (tmp_path / "splits.json").read_text()


@pytest.mark.slow
def test_a_study_of_a_scanner_confound_finds_nothing_beyond_it(tmp_path):
    """``study synth`` with no sex effect and a scanner that scanned most men, then ``run_study`` with
    ``cohort.confounds: [site]``: the confounds alone predict sex, the verdict claims nothing beyond them, and the
    maps' group test is adjusted for the scanner."""
    import mlflow

    from study.cli import main
    from study.pipeline import run_study, study_dir
    from study.tasks import map_in_process
    from tests.test_study import study_config

    root = tmp_path / "scanner"
    argv = ["synth", str(root), "--subjects", "48", "--voxel-size", "4", "--effect-size", "0", "--site-confound"]
    assert main([*argv, "0.9", "--seed", "3"], tasks=map_in_process) == 0
    config = study_config(
        tmp_path,
        root,
        cohort={"confounds": ["site"]},
        train={"epochs": 8},
        attribution={
            "methods": ["gradcam"],
            "permutations": 20,
            "sanity": {"subjects": 2, "label_randomization": False},
        },
    )
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_study(config))
    metrics, finding = run.data.metrics, run.data.tags["study.finding"]
    assert finding in ("confounds", "none") and metrics["confounds_pooled_roc_auc"] > 0.8, (finding, metrics)
    assert 0 < metrics["partial_confound_test_p"] <= 1 and 0 < metrics["baseline_full_confound_test_p"] <= 1
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert "Beyond the confounds?" in report and "Adjusted for the confounds (site)" in report
    assert finding != "confounds" or "explaining a model of the confounds (site)" in report
