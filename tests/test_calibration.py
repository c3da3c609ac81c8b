"""Calibration of a fold's probabilities: BatchNorm re-estimated, Platt scaling, and the scores the field reports."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from study.attribution.methods import METHODS, Batch
from study.attribution.perturbation import Perturbation
from study.attribution.targets import class_score, select_targets
from study.config.sections import TrainConfig
from study.data.cohort import CohortConfig, load_cohort
from study.training.calibration import (
    Calibration,
    brier_score,
    logit_difference,
    reestimate_batchnorm,
    reliability_bins,
)
from study.training.checkpoint import Progress, load_model, read_checkpoint, save_checkpoint
from study.training.loop import TrainingData, train_loop_per_worker
from study.training.models import Architecture, build_model
from tests.conftest import cache_for


def _logistic(n: int, temperature: float, bias: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds and labels drawn so that P(1) = sigmoid(temperature * log-odds + bias)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    return z, (rng.random(n) < expit(temperature * z + bias)).astype(int)


def test_the_brier_score_and_reliability_bins_are_scikit_learns():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(200), [0.0, 1.0, 0.1, 0.2, 0.5]])  # bin edges included
    y = (rng.random(len(p)) < p).astype(int)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    predicted, observed, counts = reliability_bins(y, p, bins=10)
    reference_observed, reference_predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(predicted, reference_predicted, atol=1e-12)
    np.testing.assert_allclose(observed, reference_observed, atol=1e-12)
    assert counts.sum() == len(p) and (counts > 0).all()
    sparse = np.array([0.05, 0.07, 0.93])  # empty bins are left out, as scikit-learn does
    assert len(reliability_bins(np.array([0, 1, 1]), sparse)[0]) == len(calibration_curve([0, 1, 1], sparse)[0]) == 2


def test_platt_scaling_is_the_maximum_likelihood_logistic_fit():
    z, y = _logistic(4000, temperature=0.4, bias=-1.2)
    fitted = Calibration.fit(z, y)
    reference = LogisticRegression(C=np.inf).fit(z[:, None], y)  # the textbook fit, no prior
    assert fitted.temperature == pytest.approx(reference.coef_[0, 0], rel=0.01)
    assert fitted.bias == pytest.approx(reference.intercept_[0], abs=0.02)
    assert fitted.temperature == pytest.approx(0.4, rel=0.15) and fitted.bias == pytest.approx(-1.2, abs=0.15)
    assert fitted.subjects == 4000
    temperature = Calibration.fit(z, y, bias=False)  # temperature scaling: no intercept, every decision kept
    no_intercept = LogisticRegression(C=np.inf, fit_intercept=False).fit(z[:, None], y)
    assert temperature.bias == 0 and temperature.temperature == pytest.approx(no_intercept.coef_[0, 0], rel=0.01)
    assert np.array_equal(temperature.probabilities(z) >= 0.5, z >= 0)
    # Softmax's own probabilities of these log-odds are too sure and shifted: calibrated, they score better.
    assert brier_score(y, fitted.probabilities(z)) < brier_score(y, expit(z)) - 0.02


def test_platt_scaling_stays_finite_and_keeps_the_ranking_when_it_has_little_to_go_on():
    separated = Calibration.fit(np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]), np.array([0, 0, 0, 1, 1, 1]))
    assert 0 < separated.temperature < 100 and np.isfinite(separated.bias)
    assert Calibration.fit(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == Calibration()  # too few
    assert Calibration.fit(np.arange(6.0), np.ones(6)) == Calibration()  # one class only
    z = np.linspace(-4, 4, 9)
    assert np.all(np.diff(separated.probabilities(z)) > 0)
    np.testing.assert_allclose(Calibration().probabilities(z), expit(z))
    assert Calibration.from_dict(separated.to_dict()) == separated
    assert Calibration.from_dict(None) == Calibration()


def test_recentering_puts_the_threshold_midway_between_the_classes_medians():
    z = np.array([-9.0, -5.0, -4.0, -3.0, -1.0, 0.0, 1.0, 7.0])  # a training leaning to class 0, sure of itself
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    recentered = Calibration.recentered(z, y)
    assert (recentered.temperature, recentered.bias, recentered.subjects) == (1.0, 2.0, 8)  # medians -4.5 and 0.5
    assert np.mean(recentered.probabilities(z) >= 0.5) == 0.5 and np.mean(expit(z) >= 0.5) == 0.375
    assert Calibration.recentered(z[:3], y[:3]) == Calibration.recentered(z, np.ones(8)) == Calibration()


def test_log_odds_are_what_softmax_says_of_class_1():
    logits = torch.tensor([[0.3, 1.1], [2.0, -1.0]])
    np.testing.assert_allclose(expit(logit_difference(logits)), torch.softmax(logits, 1)[:, 1].numpy(), rtol=1e-6)


def test_the_maps_start_from_the_calibrated_decisions_with_the_networks_gradients(tmp_path):
    """A saved fold's model loaded for its maps: softmax gives the calibrated probability, the predicted class
    (``predicted_class``, Meaningful Perturbations' and the deletion check's decision) is the calibrated one, and
    a class score's gradient is the network's times the temperature."""
    torch.manual_seed(0)
    shape = (12, 12, 12)
    network = build_model(Architecture(width=2, blocks=2), shape).eval()
    x = torch.randn(8, 1, *shape)
    log_odds = logit_difference(network(x).detach())
    calibration = Calibration(0.5, float(-0.5 * np.median(log_odds)), 40)  # half the subjects on each side
    save_checkpoint(tmp_path, network, network.state_dict(), Progress("refit", calibration=calibration.to_dict()))
    calibrated = load_model(tmp_path, calibrated=True)
    logits = calibrated(x)
    np.testing.assert_allclose(
        torch.softmax(logits, 1)[:, 1].detach().numpy(), calibration.probabilities(log_odds), rtol=1e-5
    )
    decided = select_targets("predicted_class", torch.zeros(8, dtype=torch.long), logits).numpy()
    np.testing.assert_array_equal(decided, calibration.probabilities(log_odds) >= 0.5)
    assert decided.sum() == 4 and not np.array_equal(decided, log_odds >= 0)  # the calibration moved decisions
    gradients = []
    for model in (load_model(tmp_path), calibrated):
        volume = x[:2].clone().requires_grad_(True)
        class_score(model(volume), None).sum().backward()
        gradients.append(volume.grad)
    torch.testing.assert_close(gradients[1], 0.5 * gradients[0])
    for method in METHODS:  # every method explains the calibrated model as it would the network
        batch = Batch(calibrated, x[:2], None, 4.0, Perturbation(iterations=2, reference="blur"), None)
        assert batch.map(method).shape == (2, *shape), method
    save_checkpoint(tmp_path, network, network.state_dict(), Progress("refit"))  # before calibration: as trained
    assert type(load_model(tmp_path, calibrated=True)) is type(network)


def test_batchnorm_is_re_estimated_on_the_volumes_given_and_nothing_else_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2), torch.nn.ReLU())
    for _ in range(5):  # running statistics of other data, as after training on augmented volumes
        model.train()(torch.randn(4, 1, 6, 6, 6) * 3 + 2)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(4, 1, 6, 6, 6) for _ in range(3)]
    reestimate_batchnorm(model, batches)
    features = [model[0](x).transpose(0, 1).flatten(1) for x in batches]
    norm = model[1]
    expected_mean = torch.stack([f.mean(1) for f in features]).mean(0)
    expected_var = torch.stack([f.var(1) for f in features]).mean(0)  # the average of the batches' statistics
    torch.testing.assert_close(norm.running_mean, expected_mean.detach())
    torch.testing.assert_close(norm.running_var, expected_var.detach())
    assert norm.momentum == 0.1 and not model.training
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def _changed(cache, subject_ids: list[str], tmp_path, value: float = np.nan):
    """A copy of ``cache`` whose ``subject_ids`` are all ``value`` inside the brain (NaN: a model or calibration
    that read one would be NaN)."""
    tmp_path.mkdir()
    path = tmp_path / "volumes.f16"
    shutil.copy(cache.path, path)
    poisoned = replace(cache, path=path)
    volumes = np.memmap(path, dtype=np.float16, mode="r+", shape=(len(cache.subject_ids), *cache.shape))
    rows = poisoned.rows(subject_ids)
    volumes[rows] = np.where(volumes[rows] != 0, value, 0)
    volumes.flush()
    return poisoned


def _final_training(data: TrainingData, tmp_path, name: str, monkeypatch, calibration: str) -> dict:
    """The fold's final training as crossval runs it (inner split calibrates, then the refit), in this process;
    its last checkpoint's record."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    kept, report = [], ray.train.report

    def keep(metrics: dict, checkpoint: ray.train.Checkpoint | None = None, **kwargs) -> None:
        if checkpoint is not None:  # local mode keeps no copy of the reported folder, which the loop then deletes
            kept.append(read_checkpoint(checkpoint))
        report(metrics, checkpoint=checkpoint, **kwargs)

    monkeypatch.setattr(ray.train, "report", keep)
    config = {
        "architecture": Architecture(width=2, blocks=2),
        "train": TrainConfig(epochs=2, batch_size=2, seed=0, calibration=calibration),
        "data": data,
        "refit_epochs": 2,
        "checkpoint_every_s": 3600.0,
    }
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=0),  # Ray Train's local mode: this process, no Ray
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "ray")),
    ).fit()
    return kept[-1]


@pytest.mark.parametrize("calibration", ["temperature", "recenter"])
def test_a_fold_is_calibrated_on_its_training_subjects_and_never_on_its_test_subjects(
    calibration, cohort_dir, preprocess_config, tmp_path, monkeypatch
):
    """``temperature`` from the inner split's model on its validation subjects; ``recenter`` from the final
    model on all of its training subjects; a held-out subject changes neither."""
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    label = dict(zip(cohort.ids, cohort.labels.tolist()))
    by_class = [[s for s in cohort.ids if label[s] == c] for c in (0, 1)]
    test = by_class[0][:2] + by_class[1][:2]
    inner_train = by_class[0][2:4] + by_class[1][2:4]
    validation = by_class[0][4:] + by_class[1][4:]
    assert len(validation) >= 4 and not set(test) & set(inner_train + validation)

    def data(on) -> TrainingData:
        labels = lambda ids: np.array([label[s] for s in ids])  # noqa: E731
        train = inner_train + validation
        return TrainingData(on, inner_train, labels(inner_train), validation, labels(validation), train, labels(train))

    kept = _final_training(data(cache), tmp_path, "clean", monkeypatch, calibration)
    progress = Progress.from_dict(kept)
    fitted = Calibration.from_dict(progress.calibration)
    assert fitted.subjects == (len(validation) if calibration == "temperature" else len(inner_train + validation))
    assert [row["phase"] for row in progress.history] == ["calibrate"] * 2 + ["refit"] * 2
    assert np.isfinite(progress.history[1]["calibration_val_loss"])  # validated after its last epoch only
    assert "calibration_val_loss" not in progress.history[0]

    with_poisoned_test = _final_training(
        data(_changed(cache, test, tmp_path / "a")), tmp_path, "test", monkeypatch, calibration
    )
    assert with_poisoned_test["calibration"] == kept["calibration"]
    for key, weights in kept["model"].items():  # BatchNorm statistics included: re-estimated on training subjects
        torch.testing.assert_close(with_poisoned_test["model"][key], weights, msg=key)

    # The check can fail: a validation subject (a training subject of the final fit) does change the calibration.
    changed = data(_changed(cache, validation[:1], tmp_path / "b", value=3.0))
    assert _final_training(changed, tmp_path, "val", monkeypatch, calibration)["calibration"] != kept["calibration"]


@pytest.mark.parametrize(
    ("final_fit", "calibration", "searched", "phases", "refit_epochs"),
    [
        ("all_subjects", "temperature", False, ("inner split", "refit"), 7),  # the inner split only calibrates
        ("all_subjects", "none", False, ("refit",), 7),
        ("early_stopped", "temperature", False, ("inner split", "refit"), None),  # early stopping chooses
        ("early_stopped", "temperature", True, ("inner split", "refit"), 5),  # the search chose: calibrate only
        ("early_stopped", "none", True, ("refit",), 5),
        ("inner_split", "platt", False, ("inner split",), None),
        ("all_subjects", "recenter", False, ("refit",), 7),  # from the final model's own training subjects
        ("early_stopped", "recenter", True, ("refit",), 5),
        ("early_stopped", "recenter", False, ("inner split", "refit"), None),
    ],
)
def test_each_final_fit_gets_the_inner_split_when_it_selects_or_calibrates(
    final_fit, calibration, searched, phases, refit_epochs
):
    from study.data.targets import Classes
    from study.training.crossval import _final_fit
    from study.training.folds import FoldJob
    from study.training.trainer import TrainingSetup
    from study.training.trials import SearchResult, Trial

    labels = np.array([0, 1, 0, 1])
    data = TrainingData(None, ["a", "b"], labels[:2], ["c", "d"], labels[2:], ["a", "b", "c", "d"], labels)
    search = None
    if searched:
        history = pd.DataFrame({"epoch": range(6), "val_loss": [5, 4, 3, 2, 1, 1.5]})  # best epoch 4
        search = SearchResult("val_loss", {}, [Trial("t", {}, history, "completed", 1.0)])
    train = TrainConfig(final_fit=final_fit, calibration=calibration, epochs=7)
    job = FoldJob(0, TrainingSetup(Architecture(), train), data, ["e"], np.array([1]), Classes(), search)
    got, epochs = _final_fit(job)
    assert epochs == refit_epochs
    assert ("inner split" in phases) == bool(got.val_ids) and ("refit" in phases) == bool(got.refit_ids)
    assert "e" not in [*got.train_ids, *got.val_ids, *got.refit_ids]
