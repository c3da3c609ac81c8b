"""One training on Ray Train: the settings the study gives Ray Train's controller, without starting Ray."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from study.config import ResourcesConfig, TrainConfig
from study.training import trainer
from study.training.loop import TrainingData
from study.training.models import Architecture


def test_a_training_waits_a_day_for_its_cpus_and_polls_its_workers_often_unless_the_user_says_otherwise(
    tmp_path, monkeypatch
):
    """Ray Train's default gave up waiting for CPUs after 60 s with a traceback, every minute, whenever more
    trainings ran than the cluster holds; and its 2 s poll made every epoch of a search trial wait for it. The
    controller reads both from the environment of the process that fits (tests/test_study.py proves which
    variable it reads); a value the user set wins."""
    seen = []

    class Trainer:  # what fit() hands to Ray Train, and the environment the controller would start in
        def __init__(self, loop, train_loop_config, scaling_config, run_config):
            self.config = train_loop_config

        def fit(self):
            seen.append({k: os.environ.get(k) for k in trainer.controller_settings()})
            return SimpleNamespace(checkpoint="a checkpoint")

    monkeypatch.setattr(trainer, "TorchTrainer", Trainer)
    setup = trainer.TrainingSetup(Architecture(width=4), TrainConfig())
    data = TrainingData(None, [], np.zeros(0), [], np.zeros(0))
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert trainer.fit(setup, data, "fold0", str(tmp_path), ResourcesConfig()).checkpoint == "a checkpoint"
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    trainer.fit(setup, data, "fold0", str(tmp_path), ResourcesConfig())
    assert seen == [
        {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "86400.0"},
        {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"},
    ]
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in os.environ  # the user's value stays after the training
