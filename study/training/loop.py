"""Training one model on Ray Train (data-parallel, DDP) and predicting with it.

``train_loop_per_worker`` is what every Ray Train worker runs. A training has
up to two phases, in one Ray Train run (its set-up is paid once):

- **select**: train on an inner training split and validate on its inner
  validation split after every epoch; stop early when the validation loss no
  longer improves, and remember the best epoch.
- **refit**: train a fresh model on all the subjects of the final fit for the
  selected number of epochs (or a given number), and keep the last state: the
  model that is tested and explained sees every training subject of its fold.

Each epoch's metrics are reported to Ray Train, with a checkpoint whenever the
state worth keeping changes, so a training that loses a worker resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from study.config import TrainConfig
from study.data.cache import CachedVolumes, VolumeCache, collate
from study.runtime import Precision
from study.training.augment import augment
from study.training.metrics import classification_metrics
from study.training.models import Architecture, Network, build_model, model_from_record, model_record

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainingData:
    """The subjects of one training.

    ``train_*``/``val_*`` are the selection phase's split (no validation
    subjects: no selection phase); ``refit_*`` the subjects of the final fit
    (none: the selected model is the final one).
    """

    cache: VolumeCache
    train_ids: list[str]
    train_labels: np.ndarray
    val_ids: list[str]
    val_labels: np.ndarray
    refit_ids: list[str] = field(default_factory=list)
    refit_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def selection_only(self) -> TrainingData:
        """The same subjects without the final fit (what a search trial trains)."""
        return replace(self, refit_ids=[], refit_labels=self.refit_labels[:0])

    def refit_only(self) -> TrainingData:
        """The same subjects without the selection split (when the epochs are already chosen)."""
        return replace(self, val_ids=[], val_labels=self.val_labels[:0])


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CachedVolumes, batch_size: int, precision: Precision) -> np.ndarray:
    """P(class 1) (e.g. P(male)) for every subject of ``dataset``, in order.

    In float32 whatever the training's precision (``Precision.exact``): bf16 logits would round test
    probabilities to steps of up to 0.03 and tie subjects in the ROC curve.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, pin_memory=precision.pinned)
    probs = []
    for x, _ in loader:
        with precision.exact():
            logits = model(precision.volumes(x))
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(probs).numpy() if probs else np.zeros(0)


def _scores(
    model: torch.nn.Module, dataset: CachedVolumes, batch_size: int, precision: Precision, prefix: str
) -> dict[str, float]:
    """Loss, accuracy and ROC AUC of ``model`` on ``dataset`` in eval mode (no augmentation, no dropout)."""
    p = predict(model, dataset, batch_size, precision)
    labels = dataset.labels.numpy()
    eps = 1e-7
    loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
    scores = classification_metrics(labels, p)
    return {
        f"{prefix}_loss": float(loss),
        f"{prefix}_accuracy": scores["accuracy"],
        f"{prefix}_roc_auc": scores["roc_auc"],
    }


def save_checkpoint(directory: Path, model: torch.nn.Module, state: dict, **progress: Any) -> None:
    """Write the weights worth keeping, the architecture, and the training's progress (phase, epoch, history...)."""
    torch.save({**model_record(model, state), **progress}, directory / CHECKPOINT_FILE)


def load_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics stored in a training checkpoint."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["history"]


def load_model(checkpoint: ray.train.Checkpoint | Path) -> torch.nn.Module:
    """The trained model of a checkpoint (directory or Ray Checkpoint), in eval mode, on the host
    (``Precision.model`` moves it to a device, in its memory format)."""
    if isinstance(checkpoint, ray.train.Checkpoint):
        with checkpoint.as_directory() as directory:
            return load_model(Path(directory))
    record = torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return model_from_record(record)


def network_class(checkpoint: ray.train.Checkpoint) -> str | None:
    """The ``model.class`` a checkpoint's network is built from (None: the study's own CNN), read without
    building it: building imports that class's module."""
    with checkpoint.as_directory() as directory:
        record = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return record["arch"].get("class")


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _audit(directory: str | None, record: dict[str, Any]) -> None:
    """Append one JSON line to this worker's data-access audit (which subjects it read)."""
    if directory:
        rank = ray.train.get_context().get_world_rank()
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then cosine decay to 0 (or constant)."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class _Phase:
    """One phase's model, optimizer, schedule and data shard on this worker."""

    def __init__(
        self,
        architecture: Architecture | Network,
        train: TrainConfig,
        data: TrainingData,
        ids: list[str],
        labels: np.ndarray,
        epochs: int,
        precision: Precision,
    ):
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(train.seed)  # the same initial weights on every rank, and in every phase
        self.generator = torch.Generator().manual_seed(train.seed * 1000 + rank)
        self.ids, self.train, self.precision = ids, train, precision
        self.dataset = CachedVolumes(data.cache, ids, labels)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=train.seed)
        self.loader = DataLoader(
            self.dataset,
            batch_size=train.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            pin_memory=precision.pinned,
        )
        self.model = ray.train.torch.prepare_model(precision.model(build_model(architecture, data.cache.shape)))
        self.bare: torch.nn.Module = getattr(self.model, "module", self.model)
        self.step = torch.compile(self.model) if train.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        steps_per_epoch = max(len(self.loader), 1)
        total, warmup = epochs * steps_per_epoch, round(train.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total, warmup, train.schedule)
        )
        self.voxel_mm = data.cache.grid.voxel_mm

    def restore(self, state: dict) -> None:
        self.bare.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def progress(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def epoch(self, epoch: int) -> tuple[dict[str, float], list[str]]:
        """One pass over this rank's shard; returns the mean training loss/accuracy and the subjects read."""
        self.sampler.set_epoch(epoch)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        # Summed on the device and read once per epoch: a read per step (``.item()``) would make the host wait
        # for each step's GPU work before it reads the next batch from the cache.
        total_loss = torch.zeros((), device=self.precision.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.precision.device)
        for x, y in self.loader:
            x, y = self.precision.volumes(x), y.to(self.precision.device, non_blocking=True)
            with self.precision.training():
                x = augment(x, self.train.augment, self.voxel_mm, self.generator)
                with self.precision.autocast():
                    logits = self.step(x)
                loss = F.cross_entropy(logits.float(), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if self.train.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        seen = [self.ids[i] for i in self.sampler]
        n = max(len(seen), 1)
        return {"train_loss": total_loss.item() / n, "train_accuracy": correct.item() / n, "lr": lr}, seen


def _report(metrics: dict, checkpoint_state: dict | None, model: torch.nn.Module, rank: int, **progress: Any) -> None:
    """Report an epoch's metrics; with a checkpoint (written by rank 0 only) when there is state to keep."""
    if checkpoint_state is not None and rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory), model, checkpoint_state, **progress)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


def _report_due(last_report: float, every_s: float, device: torch.device) -> bool:
    """True when ``every_s`` seconds have passed on any worker: all of them must report together.

    Each report waits for Ray Train's controller to take it (one per poll; see
    :data:`study.training.trainer.CONTROLLER_POLL_S`) and a checkpoint costs a save and an upload, so the
    final fit reports (with a checkpoint, for restarts) every ``resources.checkpoint_every_s`` and at its end;
    the selection phase reports every epoch, which Tune's schedulers need.
    """
    due = torch.tensor([float(time.monotonic() - last_report >= every_s)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(due, op=torch.distributed.ReduceOp.MAX)
    return bool(due.item())


def _live(path: str | None, record: dict[str, Any], rank: int) -> None:
    """Append an epoch's record to the training's live file (rank 0), which the driver follows for MLflow."""
    if path and rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: select the epoch count on the inner split, then refit; report as it goes.

    ``loop_config`` holds ``architecture`` (:class:`Architecture` or :class:`Network`), ``train``
    (the validated :class:`TrainConfig`), ``data`` (:class:`TrainingData`),
    ``refit_epochs`` (the refit's epochs when there is no selection phase),
    ``audit_dir`` (None, or where to record which subjects this worker read) and
    ``live_path`` (None, or a JSON-lines file that gets every epoch's metrics as
    soon as they exist: Ray Train's reports are throttled, this is not) and
    ``checkpoint_every_s`` (how often the final fit reports with a checkpoint).
    """
    architecture: Architecture | Network = loop_config["architecture"]
    train: TrainConfig = loop_config["train"]
    data: TrainingData = loop_config["data"]
    audit_dir, live_path = loop_config.get("audit_dir"), loop_config.get("live_path")
    checkpoint_every_s = loop_config["checkpoint_every_s"]
    rank = ray.train.get_context().get_world_rank()
    precision = Precision.choose(ray.train.torch.get_device(), train.precision, train.channels_last)
    resumed = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            # To the host: restoring copies the weights and the optimizer's state into the phase's own tensors.
            resumed = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    history = resumed["history"] if resumed else []
    phase = resumed["phase"] if resumed else ("select" if data.val_ids else "refit")
    best_epoch = resumed.get("best_epoch") if resumed else None
    refit_epochs = loop_config.get("refit_epochs")

    if phase == "select":
        current = _Phase(architecture, train, data, data.train_ids, data.train_labels, train.epochs, precision)
        val_set = CachedVolumes(data.cache, data.val_ids, data.val_labels)
        start, best, stale = 0, math.inf, 0
        if resumed:
            current.restore(resumed)
            start, best, best_epoch = resumed["epoch"] + 1, resumed["best_val_loss"], resumed["best_epoch"]
        best_state = _cpu_state(current.bare)
        for epoch in range(start, train.epochs):
            started = time.perf_counter()
            metrics, seen = current.epoch(epoch)
            _audit(audit_dir, {"phase": "select", "epoch": epoch, "subjects": seen + data.val_ids})
            metrics = {"epoch": epoch, **metrics, **_scores(current.model, val_set, train.batch_size, precision, "val")}
            improved = metrics["val_loss"] < best - 1e-4
            if improved:
                best, best_epoch, stale, best_state = metrics["val_loss"], epoch, 0, _cpu_state(current.bare)
            else:
                stale += 1
            last = stale >= train.patience or epoch == train.epochs - 1
            final = last and not data.refit_ids
            if final:
                current.bare.load_state_dict(best_state)
                metrics |= _scores(current.model, current.dataset, train.batch_size, precision, "fit")
            metrics |= {"best_val_loss": best, "epoch_seconds": time.perf_counter() - started, "wall_time": time.time()}
            history.append({"phase": "select", **metrics})
            _live(live_path, history[-1], rank)
            if last and data.refit_ids:  # what a resumed run needs to start the refit
                progress = {"phase": "refit", "epoch": -1, "refit_epochs": best_epoch + 1}
            else:
                progress = {"phase": "select", "epoch": epoch, "best_val_loss": best, **current.progress()}
            # A checkpoint at each improvement (fault tolerance) and at the end (the full history).
            _report(
                metrics,
                best_state if improved or last else None,
                current.bare,
                rank,
                best_epoch=best_epoch,
                history=history,
                **progress,
            )
            if last:
                break
        phase, refit_epochs, resumed = "refit", best_epoch + 1, None

    if phase == "refit" and data.refit_ids:
        refit_epochs = resumed["refit_epochs"] if resumed else refit_epochs
        current = None  # the selection's model, optimizer and DDP buffers go before the refit's are built
        current = _Phase(architecture, train, data, data.refit_ids, data.refit_labels, refit_epochs, precision)
        start, last_report = 0, time.monotonic()
        if resumed and resumed["epoch"] >= 0:  # -1: the selection ended, the refit had not started
            current.restore(resumed)
            start = resumed["epoch"] + 1
        for epoch in range(start, refit_epochs):
            started = time.perf_counter()
            metrics, seen = current.epoch(epoch)
            _audit(audit_dir, {"phase": "refit", "epoch": epoch, "subjects": seen})
            metrics = {"refit_epoch": epoch, **{f"refit_{k}": v for k, v in metrics.items()}}
            if epoch == refit_epochs - 1:
                metrics |= _scores(current.model, current.dataset, train.batch_size, precision, "fit")
            metrics |= {"refit_epoch_seconds": time.perf_counter() - started, "wall_time": time.time()}
            history.append({"phase": "refit", **metrics})
            _live(live_path, history[-1], rank)
            if epoch == refit_epochs - 1 or _report_due(last_report, checkpoint_every_s, precision.device):
                _report(
                    metrics,
                    _cpu_state(current.bare),
                    current.bare,
                    rank,
                    phase="refit",
                    epoch=epoch,
                    refit_epochs=refit_epochs,
                    best_epoch=best_epoch,
                    history=history,
                    **current.progress(),
                )
                last_report = time.monotonic()
    weights = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in current.bare.parameters())).hexdigest()
    _audit(audit_dir, {"final_weights": weights})
