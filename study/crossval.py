"""One outer fold of the cross-validation: train on Ray Train, then test on the held-out subjects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from study.cache import CachedVolumes, VolumeCache
from study.cohort import Cohort
from study.config import StudyConfig, split_params
from study.metrics import classification_metrics
from study.splits import OuterFold
from study.train import TrainingData, load_history, load_model, predict, train_loop_per_worker


@dataclass
class FoldResult:
    """What an outer fold produced: curves, the model, and its held-out test results."""

    fold: int
    history: pd.DataFrame  # one row per epoch: train/val loss, accuracy, AUC
    checkpoint: ray.train.Checkpoint  # the best model (lowest validation loss)
    test_metrics: dict[str, float]
    predictions: pd.DataFrame  # subject_id, sex, p_male, predicted

    @property
    def labels(self) -> np.ndarray:
        """True sex of the held-out subjects, 1 male, 0 female, in predictions order."""
        return (self.predictions["sex"] == "male").to_numpy(int)


def training_data(cohort: Cohort, cache: VolumeCache, train_ids: list[str], val_ids: list[str]) -> TrainingData:
    """The labelled training and validation subjects of one run."""
    label = dict(zip(cohort.ids, cohort.labels))
    return TrainingData(cache, train_ids, np.array([label[s] for s in train_ids]),
                        val_ids, np.array([label[s] for s in val_ids]))


def scaling_config(config: StudyConfig) -> ScalingConfig:
    res = config.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.use_gpu else {})
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def fit(config: StudyConfig, arch: dict[str, Any], data: TrainingData, name: str, storage_path: str,
        train_overrides: dict[str, Any] | None = None, audit_dir: Path | None = None,
        callbacks: list | None = None) -> ray.train.Result:
    """Train one model with a TorchTrainer.

    ``name`` is its stable run name in ``storage_path`` (a path or a cloud URI):
    a rerun of the same name continues from its last checkpoint, as does a run
    that lost a worker (up to ``resources.max_failures`` times).
    """
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"study": config, "arch": arch, "data": data, "train": train_overrides or {},
                           "audit_dir": str(audit_dir) if audit_dir else None},
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=config.resources.max_failures),
        ),
    )
    return trainer.fit()


def _predict_checkpoint(config: StudyConfig, checkpoint: ray.train.Checkpoint, dataset: CachedVolumes) -> np.ndarray:
    device = torch.device("cuda" if config.resources.use_gpu else "cpu")
    return predict(load_model(checkpoint, device), dataset, config.train.batch_size, config.train, device)


def run_outer_fold(config: StudyConfig, fold: OuterFold, cohort: Cohort, cache: VolumeCache,
                   storage_path: str, audit_dir: Path | None = None,
                   params: dict[str, Any] | None = None) -> FoldResult:
    """Train on ``fold``'s training side and test on its held-out side.

    The validation split for early stopping is the fold's first inner split,
    so no held-out subject influences training or model selection. ``params``
    (a search's best architecture and train keys) override the config's.
    """
    arch, train = split_params(params or {})
    data = training_data(cohort, cache, fold.validation.train, fold.validation.test)
    result = fit(config, {**config.model.arch(), **arch}, data, f"fold{fold.fold}", storage_path,
                 train_overrides=train, audit_dir=audit_dir)
    if result.checkpoint is None:
        raise RuntimeError(f"fold {fold.fold}: training reported no checkpoint; see {storage_path}")
    label = dict(zip(cohort.ids, cohort.labels))
    labels = np.array([label[s] for s in fold.test])
    test_set = CachedVolumes(cache, fold.test, labels)
    res = config.resources
    p_male = ray.get(
        ray.remote(_predict_checkpoint)
        .options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if res.use_gpu else 0)
        .remote(config, result.checkpoint, test_set)
    )
    predictions = pd.DataFrame({
        "subject_id": fold.test, "sex": np.where(labels == 1, "male", "female"),
        "p_male": p_male, "predicted": np.where(p_male >= 0.5, "male", "female"),
    })
    return FoldResult(fold.fold, pd.DataFrame(load_history(result.checkpoint)), result.checkpoint,
                      classification_metrics(labels, p_male), predictions)
