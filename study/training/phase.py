"""One phase of a training on one Ray Train worker: its model, optimizer, learning-rate schedule and data shard.

A :class:`Phase` builds the model (the same initial weights on every rank, DDP
through Ray Train), AdamW with linear warm-up and cosine decay
(:func:`lr_factor`), and this rank's shard of the phase's subjects; its
:meth:`~Phase.epoch` trains one pass, augmenting on the device. The selection
and the refit of :mod:`.loop` are a phase each.
"""

from __future__ import annotations

import math

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
from study.training.calibration import reestimate_batchnorm
from study.training.metrics import regression_loss
from study.training.models import Architecture, Network, build_model


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up, then cosine decay to 0 (or constant)."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class Phase:
    """One phase's model, optimizer, schedule and data shard on this worker."""

    def __init__(
        self,
        architecture: Architecture | Network,
        train: TrainConfig,
        cache: VolumeCache,
        ids: list[str],
        labels: np.ndarray,
        epochs: int,
        precision: Precision,
        outputs: int = 2,
    ):
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(train.seed)  # the same initial weights on every rank, and in every phase
        self.generator = torch.Generator().manual_seed(train.seed * 1000 + rank)
        self.ids, self.train, self.precision = ids, train, precision
        self.dataset = CachedVolumes(cache, ids, labels)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=train.seed)
        self.loader = DataLoader(
            self.dataset,
            batch_size=train.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            pin_memory=precision.pinned,
        )
        self.regression = self.dataset.labels.is_floating_point()  # a regression target's standardized values
        self.model = ray.train.torch.prepare_model(precision.model(build_model(architecture, cache.shape, outputs)))
        self.bare: torch.nn.Module = getattr(self.model, "module", self.model)
        self.step = torch.compile(self.model) if train.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        steps_per_epoch = max(len(self.loader), 1)
        total, warmup = epochs * steps_per_epoch, round(train.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total, warmup, train.schedule)
        )
        self.voxel_mm = cache.grid.voxel_mm

    def restore(self, state: dict) -> None:
        self.bare.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def progress(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def reestimate_batchnorm(self) -> None:
        """BatchNorm's running statistics from this phase's subjects as they are tested: un-augmented, float32.

        Every rank reads all of the phase's subjects (not its shard), so all ranks keep the same statistics.
        See :func:`study.training.calibration.reestimate_batchnorm` for why.
        """
        loader = DataLoader(self.dataset, batch_size=self.train.batch_size, collate_fn=collate)
        with self.precision.exact():
            reestimate_batchnorm(self.bare, (self.precision.volumes(x) for x, _ in loader))

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
                logits = logits.float()
                loss = (
                    regression_loss(logits[:, 0], y, self.train.loss) if self.regression else F.cross_entropy(logits, y)
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if self.train.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.detach() * len(y)
            if not self.regression:
                correct += (logits.argmax(1) == y).sum()
        seen = [self.ids[i] for i in self.sampler]
        n = max(len(seen), 1)
        accuracy = {} if self.regression else {"train_accuracy": correct.item() / n}
        return {"train_loss": total_loss.item() / n, **accuracy, "lr": lr}, seen


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
