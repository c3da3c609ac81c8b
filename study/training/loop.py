"""Training one model on Ray Train (data-parallel, DDP) and predicting with it.

``train_loop_per_worker`` is what every Ray Train worker runs: it reads its
shard of the training subjects from the preprocessing cache, trains with
early stopping on the validation split, and reports each epoch's metrics with
a checkpoint whenever the validation loss improves, so the latest checkpoint
is the best one.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
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
from study.training.models import Architecture, BrainCNN

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainingData:
    """The subjects of one training run: a training and a validation split of the cache."""

    cache: VolumeCache
    train_ids: list[str]
    train_labels: np.ndarray
    val_ids: list[str]
    val_labels: np.ndarray


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CachedVolumes, batch_size: int, precision: Precision) -> np.ndarray:
    """P(male) for every subject of ``dataset``, in order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    probs = []
    for x, _ in loader:
        with precision.autocast():
            logits = model(precision.volumes(x))
        probs.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(probs).numpy() if probs else np.zeros(0)


def _validation_metrics(model: torch.nn.Module, dataset: CachedVolumes, batch_size: int,
                        precision: Precision) -> dict[str, float]:
    p_male = predict(model, dataset, batch_size, precision)
    labels = dataset.labels.numpy()
    eps = 1e-7
    loss = -np.mean(labels * np.log(p_male + eps) + (1 - labels) * np.log(1 - p_male + eps))
    scores = classification_metrics(labels, p_male)
    return {"val_loss": float(loss), "val_accuracy": scores["accuracy"], "val_roc_auc": scores["roc_auc"]}


def save_checkpoint(directory: Path, model: BrainCNN, best_state: dict, optimizer, epoch: int,
                    best_val_loss: float, history: list[dict[str, float]]) -> None:
    """Write the best weights so far, the optimizer state and the per-epoch history."""
    torch.save({
        "model": best_state, "arch": model.architecture.model_dump(), "input_shape": model.input_shape,
        "optimizer": optimizer.state_dict(), "epoch": epoch, "best_val_loss": best_val_loss,
        "history": history,
    }, directory / CHECKPOINT_FILE)


def load_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics stored in a training checkpoint."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["history"]


def load_model(checkpoint: ray.train.Checkpoint | Path, device: torch.device | str = "cpu") -> BrainCNN:
    """The trained model of a checkpoint (directory or Ray Checkpoint), in eval mode."""
    if isinstance(checkpoint, ray.train.Checkpoint):
        with checkpoint.as_directory() as directory:
            return load_model(Path(directory), device)
    state = torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location=device, weights_only=False)
    model = BrainCNN(Architecture(**state["arch"]), tuple(state["input_shape"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _audit(directory: str | None, record: dict[str, Any]) -> None:
    """Append one JSON line to this worker's data-access audit (which subjects it read)."""
    if directory:
        rank = ray.train.get_context().get_world_rank()
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: train on this rank's shard, validate, report, stop early.

    ``loop_config`` holds ``architecture`` (:class:`Architecture`), ``train``
    (the validated :class:`TrainConfig`), ``data`` (:class:`TrainingData`) and
    ``audit_dir`` (None, or where to record which subjects this worker read).
    """
    architecture: Architecture = loop_config["architecture"]
    train: TrainConfig = loop_config["train"]
    data: TrainingData = loop_config["data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    precision = Precision.choose(ray.train.torch.get_device(), train.precision, train.channels_last)
    torch.manual_seed(train.seed)
    generator = torch.Generator().manual_seed(train.seed * 1000 + rank)

    train_set = CachedVolumes(data.cache, data.train_ids, data.train_labels)
    val_set = CachedVolumes(data.cache, data.val_ids, data.val_labels)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=train.seed)
    loader = DataLoader(train_set, batch_size=train.batch_size, sampler=sampler, collate_fn=collate)

    model = ray.train.torch.prepare_model(precision.model(BrainCNN(architecture, data.cache.shape)))
    bare: BrainCNN = getattr(model, "module", model)
    step = torch.compile(model) if train.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start, best, stale, history = 0, math.inf, 0, []
    if (resumed := ray.train.get_checkpoint()) is not None:
        with resumed.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=precision.device, weights_only=False)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["epoch"] + 1, state["best_val_loss"], state["history"]
    best_state = _cpu_state(bare)

    voxel_mm = data.cache.grid.voxel_mm
    for epoch in range(start, train.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        total_loss, correct = 0.0, 0
        for x, y in loader:
            x, y = precision.volumes(x), y.to(precision.device)
            x = augment(x, train.augment, voxel_mm, generator)
            with precision.autocast():
                logits = step(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        seen = [data.train_ids[i] for i in sampler]
        _audit(loop_config.get("audit_dir"), {"epoch": epoch, "subjects": seen + data.val_ids})

        metrics = {"epoch": epoch, "train_loss": total_loss / max(len(seen), 1),
                   "train_accuracy": correct / max(len(seen), 1)}
        metrics |= _validation_metrics(model, val_set, train.batch_size, precision)
        metrics["epoch_seconds"] = time.perf_counter() - started
        improved = metrics["val_loss"] < best - 1e-4
        best, stale = (metrics["val_loss"], 0) if improved else (best, stale + 1)
        metrics["best_val_loss"] = best
        history.append(metrics)
        if improved:
            best_state = _cpu_state(bare)
        last = stale >= train.patience or epoch == train.epochs - 1
        # A checkpoint at each improvement (fault tolerance) and at the end (the full history).
        if (improved or last) and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(Path(directory), bare, best_state, optimizer, epoch, best, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if last:
            break
    weights = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in bare.parameters())).hexdigest()
    _audit(loop_config.get("audit_dir"), {"final_weights": weights})
