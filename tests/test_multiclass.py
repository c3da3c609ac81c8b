"""Several classes (CN / MCI / AD, subtypes): their statistics against reference implementations, calibration,
the baseline as a network, the cohort and config checks, and a three-class study end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from study.data.targets import Classes
from study.training.calibration import CalibratedModel, Calibration, logit_difference
from study.training.metrics import classification_metrics, epoch_scores
from study.training.multiclass import (
    _stratified_rows,
    bootstrap_scores,
    evaluate_multiclass,
    macro_auc,
    macro_auc_permutation_p,
    paired_bootstrap,
)

CLASSES = ("control", "subtype_a", "subtype_b")


def _three(n: int = 90, signal: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits [n, 3] that favour each subject's class by ``signal``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += signal
    return labels, logits


def test_scores_are_scikit_learns_and_the_bootstrap_keeps_every_class():
    labels, logits = _three()
    p = softmax(logits, axis=1)
    assert macro_auc(labels, p) == pytest.approx(roc_auc_score(labels, p, multi_class="ovr", average="macro"))
    metrics = classification_metrics(labels, p)
    assert metrics["roc_auc"] == pytest.approx(macro_auc(labels, p))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, p.argmax(1)))
    assert metrics["brier"] == pytest.approx(np.mean(np.sum((p - np.eye(3)[labels]) ** 2, axis=1)))
    scores = bootstrap_scores(labels, p, resamples=400)
    assert scores["balanced_accuracy"].value == pytest.approx(metrics["balanced_accuracy"])
    for estimate in scores.values():
        assert estimate.low < estimate.value < estimate.high
    rows = _stratified_rows(labels, 50, seed=3)
    assert all((np.bincount(labels[r], minlength=3) == np.bincount(labels)).all() for r in rows)
    # the macro AUC of a resample is scikit-learn's of the same subjects
    assert macro_auc(labels[rows[0]], p[rows[0]]) == pytest.approx(
        roc_auc_score(labels[rows[0]], p[rows[0]], multi_class="ovr")
    )


def test_the_permutation_test_matches_a_brute_force_count_of_every_permutation_within_folds():
    labels = np.array([0, 1, 2, 0, 1, 0, 1, 2, 2, 1])
    rng = np.random.default_rng(4)
    p = softmax(rng.normal(size=(10, 3)) + 0.8 * np.eye(3)[labels], axis=1)
    folds = np.array([0] * 5 + [1] * 5)
    observed = macro_auc(labels, p)
    count = total = 0
    for first, second in itertools.product(itertools.permutations(range(5)), repeat=2):
        permuted = np.concatenate([labels[:5][list(first)], labels[5:][list(second)]])
        count += macro_auc(permuted, p) >= observed - 1e-12
        total += 1
    exact = count / total
    assert macro_auc_permutation_p(labels, p, folds, permutations=20000, seed=2) == pytest.approx(exact, abs=0.01)
    assert 0.005 < exact < 0.9  # neither end, so the comparison means something


def test_the_paired_bootstrap_resamples_both_models_alike_and_its_p_agrees_with_its_interval():
    labels, logits = _three(n=120, signal=1.2)
    rng = np.random.default_rng(5)
    a, b = softmax(logits, axis=1), softmax(0.6 * logits + rng.normal(size=logits.shape), axis=1)
    difference, p = paired_bootstrap(labels, a, b, resamples=600, seed=7)
    assert difference.value == pytest.approx(macro_auc(labels, a) - macro_auc(labels, b))
    rows = _stratified_rows(labels, 600, seed=7)
    resampled = [
        roc_auc_score(labels[r], a[r], multi_class="ovr") - roc_auc_score(labels[r], b[r], multi_class="ovr")
        for r in rows
    ]
    assert difference.low == pytest.approx(np.quantile(resampled, 0.025))
    assert difference.high == pytest.approx(np.quantile(resampled, 0.975))
    assert (difference.low > 0) == (p < 0.05) and difference.low > 0
    same, p_same = paired_bootstrap(labels, a, a)
    assert same.value == 0 and p_same == 1.0


def test_the_verdict_reads_in_macro_auc():
    labels, logits = _three(n=150, signal=1.5)
    folds = np.arange(150) // 50
    rng = np.random.default_rng(0)
    noise = softmax(rng.normal(size=logits.shape), axis=1)
    learned = evaluate_multiclass(labels, softmax(logits, axis=1), folds, noise, permutations=500)
    assert learned.finding == "yes" and learned.metric == "macro ROC AUC"
    assert "held-out macro ROC AUC" in learned.verdict and "paired bootstrap" in learned.verdict
    assert {"cnn_balanced_accuracy", "baseline_balanced_accuracy"} == set(learned.scores)
    below = evaluate_multiclass(labels, noise, folds, softmax(logits, axis=1), permutations=500)
    assert below.finding == "baseline_only"


def test_calibration_of_several_classes_is_the_two_class_one_and_the_network_carries_it():
    rng = np.random.default_rng(1)
    z = rng.normal(size=300)
    y = (z + rng.normal(size=300) > 0.8).astype(int)

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    two = np.stack([-z / 2, z / 2], axis=1)  # two classes' logits about their mean
    assert np.diff(Calibration.recentered(two, y).class_bias)[0] == pytest.approx(Calibration.recentered(z, y).bias)
    # temperature scaling recovers a temperature that was planted
    labels, logits = _three(n=3000, signal=2.0, seed=2)
    true_p = softmax(logits, axis=1)
    drawn = np.array([rng.choice(3, p=row) for row in true_p])
    fitted = Calibration.fit(logit_difference(logits / 2.5), drawn, bias=False)
    assert fitted.temperature == pytest.approx(2.5, rel=0.1) and fitted.class_bias == (0.0, 0.0, 0.0)
    scaled = fitted.applied_to(Fixed())  # a temperature alone still carries its classes to the network
    np.testing.assert_allclose(
        torch.softmax(scaled(torch.tensor(logits[:5], dtype=torch.float32)), 1).numpy(),
        fitted.probabilities(logit_difference(logits[:5])),
        rtol=1e-5,
    )
    # recentering a shifted model moves each class's bias against the shift
    shifted = Calibration.recentered(logit_difference(logits + np.array([1.0, 0.0, -1.0])), labels)
    assert shifted.class_bias[0] < 0 < shifted.class_bias[2] and sum(shifted.class_bias) == pytest.approx(0)
    assert Calibration.from_dict(shifted.to_dict()) == shifted

    calibration = Calibration(1.7, 0.0, 10, (0.3, -0.5, 0.2))
    model = calibration.applied_to(Fixed())
    assert isinstance(model, CalibratedModel)
    x = torch.tensor(logits[:5], dtype=torch.float32)
    np.testing.assert_allclose(
        torch.softmax(model(x), 1).numpy(), calibration.probabilities(logit_difference(logits[:5])), rtol=1e-5
    )


def test_epoch_scores_of_several_classes_are_cross_entropy_and_macro_auc():
    labels, logits = _three(n=60)
    scores = epoch_scores(logit_difference(logits), labels, "val", None, "l1")
    loss = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
    assert scores["val_loss"] == pytest.approx(float(loss))
    assert scores["val_roc_auc"] == pytest.approx(roc_auc_score(labels, softmax(logits, 1), multi_class="ovr"))


def test_the_multinomial_baseline_as_a_network_is_scikit_learns():
    from study.attribution.linear import LinearVoxelModel
    from study.training.baseline import BaselineResult

    rng = np.random.default_rng(3)
    brain = np.zeros((3, 3, 3), dtype=bool)
    brain[1:, 1:, :] = True
    labels = np.arange(40) % 3
    volumes = rng.normal(size=(40, 3, 3, 3)) + labels[:, None, None, None] * brain
    x = volumes[:, brain]
    mean, scale = x.mean(0), x.std(0)
    fitted = LogisticRegression(C=0.5).fit((x - mean) / scale, labels)
    baseline = BaselineResult(
        0, 0.5, {}, pd.DataFrame(), np.zeros(brain.sum()), 0.0, 0.0, mean, scale, fitted.coef_, fitted.intercept_
    )
    model = LinearVoxelModel(baseline, brain, outputs=3)
    logits = model(torch.tensor(volumes[:, None], dtype=torch.float32))
    np.testing.assert_allclose(
        torch.softmax(logits, 1).numpy(), fitted.predict_proba((x - mean) / scale), rtol=1e-4, atol=1e-6
    )


def test_a_three_class_table_and_config_read_and_refuse_what_is_not_built(tmp_path):
    from study.config.sections import AttributionConfig
    from tests.test_study import study_config

    target = Classes("group", CLASSES)
    assert target.several and target.outputs == 3 and target.columns == [f"p_{c}" for c in CLASSES]
    table = target.predictions(["a", "b"], np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]))
    assert list(table.columns) == ["subject_id", "group", *target.columns, "predicted"]
    assert table.predicted.tolist() == ["subtype_b", "control"] and table.group.tolist() == ["subtype_b", "control"]
    np.testing.assert_allclose(target.probabilities(table), [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])

    cohort = {"label": "group", "classes": list(CLASSES)}
    config = study_config(tmp_path, tmp_path, cohort=cohort, attribution={})
    assert config.cohort.target.several and config.attribution.target == "true_class"
    assert config.attribution.methods == AttributionConfig().methods
    with pytest.raises(ValueError, match="attribution.target: use true_class"):
        study_config(tmp_path, tmp_path, cohort=cohort, attribution={"target": "contrast"})
    with pytest.raises(ValueError, match="cohort.confounds: remove them"):
        study_config(tmp_path, tmp_path, cohort=cohort | {"confounds": ["age"]})
    with pytest.raises(ValueError, match="two or more class names"):
        study_config(tmp_path, tmp_path, cohort={"label": "group", "classes": ["a", "b", "A"]})


def test_a_three_class_cohort_reads_each_class_and_names_what_is_not_one(tmp_path, capsys):
    from study.cli import main
    from study.data.synth import SyntheticCohort, synthesize_cohort
    from study.tasks import map_in_process

    synthesize_cohort(tmp_path, SyntheticCohort(subjects=9, voxel_sizes=(4.0,), group_effect=0.3), tasks=map_in_process)
    table = pd.read_csv(tmp_path / "participants.tsv", sep="\t")
    assert sorted(table.group.value_counts().tolist()) == [3, 3, 3]
    classes = ["--label", "group", "--classes", *CLASSES]
    assert main(["validate", str(tmp_path), *classes], tasks=map_in_process) == 0
    table.loc[0, "group"] = "subtype_c"
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    capsys.readouterr()
    assert main(["validate", str(tmp_path), *classes], tasks=map_in_process) == 1
    output = capsys.readouterr()
    assert "8 subjects OK, 1 problems in 1 subjects" in output.err
    assert "unknown label 'subtype_c' in column 'group'; use control/subtype_a/subtype_b" in output.out


@pytest.mark.slow
def test_a_three_class_study_scores_each_class_against_the_rest_and_predicts_every_class(tmp_path):
    """``run_study`` on a cohort whose subtypes each lose volume in regions of their own: three logits, the macro
    AUC tested against chance and the multinomial baseline, per-class maps, and study predict's probabilities of
    each class equal to the held-out ones of the fold that held a subject out."""
    import mlflow
    import nibabel as nib

    from study.cli import main
    from study.pipeline import run_study, study_dir
    from study.tasks import map_in_process
    from tests.test_predict import held_out
    from tests.test_regression import mlflow_client, mlflow_run
    from tests.test_study import study_config

    root = tmp_path / "subtypes"
    argv = ["synth", str(root), "--subjects", "30", "--voxel-size", "4", "--group-effect", "0.25", "--seed", "3"]
    assert main(argv, tasks=map_in_process) == 0
    config = study_config(
        tmp_path,
        root,
        cohort={"label": "group", "classes": list(CLASSES)},
        cv={"outer_folds": 3, "inner_folds": 2},
        train={"epochs": 8, "lr": 0.003},
        attribution={"methods": ["gradcam", "integrated_gradients"], "permutations": 20, "sanity": {"subjects": 2}},
    )
    run_id = run_study(config)
    table = held_out(config, run_id, tmp_path)
    target = config.cohort.target
    p = target.probabilities(table)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    assert (table.predicted == np.array(CLASSES)[p.argmax(1)]).all()
    labels = table.group.map(CLASSES.index).to_numpy()
    metrics = mlflow_run(config, run_id).data.metrics
    assert metrics["pooled_roc_auc"] == pytest.approx(roc_auc_score(labels, p, multi_class="ovr"))
    assert metrics["pooled_roc_auc_ci_low"] <= metrics["pooled_roc_auc"] <= metrics["pooled_roc_auc_ci_high"]
    for name in ("baseline_pooled_roc_auc", "pooled_balanced_accuracy", "cnn_minus_baseline_p", "n_subtype_a"):
        assert np.isfinite(metrics[name]), name
    execution = study_dir(config) / "latest"
    report = (execution / "report.html").read_text()
    assert "group classification from T1w MRI" in report and "held-out macro ROC AUC" in report
    assert "Confusion matrices" in report
    assert "The test between classes asks every subject one question per class" in report
    client = mlflow_client(config)
    artifacts = {f.path for f in client.list_artifacts(run_id, "maps/gradcam")}
    assert {f"maps/gradcam/gradcam_mean_{c}.nii.gz" for c in CLASSES} <= artifacts
    assert {f"maps/gradcam/gradcam_t_{c}_minus_rest.nii.gz" for c in CLASSES} <= artifacts
    t = {
        c: nib.load(client.download_artifacts(run_id, f"maps/gradcam/gradcam_t_{c}_minus_rest.nii.gz", str(tmp_path)))
        for c in CLASSES
    }
    for c in CLASSES:  # each class's own test: its own t map, its voxel count logged
        assert f"Grad-CAM: {c} - the rest t, FWER p" in report
        assert metrics[f"test_voxels_fwer05_integrated_gradients_{c}"] >= 0, c
        assert np.abs(t[c].get_fdata()).max() > 0, c
    assert not np.allclose(t["subtype_a"].get_fdata(), t["subtype_b"].get_fdata())
    assert 0 <= metrics["localization_roc_auc_integrated_gradients"] <= 1

    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    participants.head(4).to_csv(root / "new.tsv", sep="\t", index=False)
    out = tmp_path / "predicted.tsv"
    assert (
        main(["predict", "tiny", str(root / "new.tsv"), "--out", str(out), "--tracking-uri", config.tracking.uri]) == 0
    )
    predicted = pd.read_csv(out, sep="\t", dtype={"subject_id": str}).set_index("subject_id")
    outputs = {c.name: c.type.name for c in mlflow.models.get_model_info("models:/tiny/1").signature.outputs}
    assert outputs["predicted_group"] == "string" and outputs["p_subtype_a"] == outputs["p_control_fold0"] == "double"
    for subject, row in table.set_index("subject_id").loc[predicted.index].iterrows():
        for c in CLASSES:
            assert predicted.loc[subject, f"p_{c}_fold{int(row.fold)}"] == pytest.approx(row[f"p_{c}"], rel=1e-4)
        mean = predicted.loc[subject, [f"p_{c}" for c in CLASSES]].to_numpy(float)
        assert predicted.loc[subject, "predicted_group"] == CLASSES[int(mean.argmax())]
