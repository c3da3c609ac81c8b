"""One training on Ray Train: what it trains (:class:`TrainingSetup`) and the TorchTrainer run (:func:`fit`).

Cross-validation, the search's trials and the label-randomization check all
train through :func:`fit`, so each gets the same DDP workers, checkpoints,
restarts and Ray Train settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from study.config import SEARCHABLE_TRAIN_KEYS, ResourcesConfig, TrainConfig, train_params
from study.runtime import environment
from study.storage import join
from study.training.loop import TrainingData, train_loop_per_worker
from study.training.models import Architecture, Network, architecture_of


@dataclass(frozen=True)
class TrainingSetup:
    """What one training uses: the architecture and the training recipe, both validated."""

    architecture: Architecture | Network
    train: TrainConfig

    def with_params(self, params: dict[str, Any]) -> TrainingSetup:
        """This setup with searched keys applied; each side is validated as a whole."""
        arch = {k: v for k, v in params.items() if k not in SEARCHABLE_TRAIN_KEYS}
        recipe = self.train.model_dump()
        for key, value in train_params(params).items():
            recipe[key] = {**recipe[key], **value} if key == "augment" else value
        return TrainingSetup(
            architecture_of({**self.architecture.model_dump(), **arch}), TrainConfig.model_validate(recipe)
        )


# How often Ray Train's controller polls its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). It
# takes one report per worker per poll and a worker's next report waits for it, so a training that reports every
# epoch (a search trial: ASHA decides on epochs) paid up to 2 s an epoch (benchmarks/report_wait.py). A poll
# is a small RPC; a worker that misses one is declared dead only after 10 minutes, as before.
CONTROLLER_POLL_S = 0.1
# How long a training may wait for its CPUs or GPUs (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default):
# more trainings at once than the cluster holds (concurrent folds, the label-randomized model beside them) or
# an autoscaler adding a node. Ray Train's default gives up after 60 s, prints a traceback and asks again, for
# ever; a day of quiet waiting behaves the same without the tracebacks on the console.
RESOURCES_WAIT_S = 86400.0


def controller_settings() -> dict[str, str]:
    """The environment Ray Train's controller starts in: :data:`CONTROLLER_POLL_S` and :data:`RESOURCES_WAIT_S`,
    unless the user set either variable."""
    defaults = {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": CONTROLLER_POLL_S,
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": RESOURCES_WAIT_S,
    }
    return {key: os.environ.get(key, str(value)) for key, value in defaults.items()}


def fit(
    setup: TrainingSetup,
    data: TrainingData,
    name: str,
    storage_path: str,
    resources: ResourcesConfig,
    audit_dir: Path | None = None,
    callbacks: list | None = None,
    refit_epochs: int | None = None,
    live_path: Path | None = None,
) -> ray.train.Result:
    """Train one model with a TorchTrainer (DDP over ``resources.num_workers``).

    ``name`` is its stable run name in ``storage_path`` (a path or a cloud URI):
    a rerun of the same name continues from its last checkpoint, as does a run
    that lost a worker (up to ``resources.max_failures`` times). ``refit_epochs``
    sets the refit's length when ``data`` has no selection split; ``live_path``
    gets every epoch's metrics as they are computed (see :func:`train_loop_per_worker`).
    """
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "architecture": setup.architecture,
            "train": setup.train,
            "data": data,
            "refit_epochs": refit_epochs,
            "audit_dir": str(audit_dir) if audit_dir else None,
            "live_path": str(live_path) if live_path else None,
            "checkpoint_every_s": resources.checkpoint_every_s,
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=resources.worker_bundle
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # not every epoch's report on the console
        ),
    )
    with environment(**controller_settings()):
        result = trainer.fit()  # the controller reads them from this process's environment as it starts
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} reported no checkpoint; see {join(storage_path, name)}")
    return result
