"""A pool of long-lived Ray actors that explain every held-out subject.

Each actor loads a fold's model once and explains batches of that fold's
held-out subjects, read from the preprocessing cache. The driver writes each
batch into the :class:`MapStore` as it completes, so a crash loses at most the
batches in flight, a rerun skips what exists, and an actor that dies is
replaced and its batch given to another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from study.attribution.gradcam import gradcam
from study.attribution.guided_backprop import guided_backprop
from study.attribution.perturbation import meaningful_perturbation
from study.attribution.store import MapStore
from study.attribution.targets import select_targets
from study.cache import CachedVolumes, VolumeCache
from study.config import AttributionConfig
from study.train import load_model


@dataclass(frozen=True)
class FoldModel:
    """A trained model and the held-out subjects it must explain."""

    fold: int
    checkpoint: ray.train.Checkpoint
    subject_ids: list[str]
    labels: np.ndarray


def explain_batch(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, config: AttributionConfig,
                  voxel_mm: float, methods: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every configured method's maps for one batch, as float16 [batch, D, H, W]."""
    methods = methods or config.methods
    bf16 = x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        targets = select_targets(config.target, labels, model(x))
    maps: dict[str, torch.Tensor] = {}
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        if "gradcam" in methods or "guided_gradcam" in methods:
            maps["gradcam"] = gradcam(model, x, targets)
        if "guided_backprop" in methods or "guided_gradcam" in methods:
            maps["guided_backprop"] = guided_backprop(model, x, targets)
        if "perturbation" in methods:
            maps["perturbation"] = meaningful_perturbation(model, x, targets, config.perturbation, voxel_mm)
    if "guided_gradcam" in methods:
        maps["guided_gradcam"] = maps["gradcam"] * maps["guided_backprop"]
    return {m: maps[m].float().cpu().numpy().astype(np.float16) for m in methods}


class Explainer:
    """One actor of the pool: keeps the model of the fold it last explained."""

    def __init__(self, config: AttributionConfig, cache: VolumeCache, use_gpu: bool):
        self.config, self.cache = config, cache
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.fold: int | None = None
        self.model: torch.nn.Module | None = None

    def explain(self, job: FoldModel, subject_ids: list[str], labels: np.ndarray) -> tuple[list[str], dict]:
        if self.fold != job.fold:
            self.model = load_model(job.checkpoint, self.device)
            if self.device.type == "cuda":
                self.model = self.model.to(memory_format=torch.channels_last_3d)
            self.fold = job.fold
        x, y = CachedVolumes(self.cache, subject_ids, labels).__getitems__(list(range(len(subject_ids))))
        x = x.to(self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        voxel_mm = float(abs(self.cache.affine[0, 0]))
        return subject_ids, explain_batch(self.model, x, y.to(self.device), self.config, voxel_mm)


def _start_actor(config: AttributionConfig, cache: VolumeCache, use_gpu: bool, name: str):
    options = {"num_cpus": 1, "num_gpus": config.gpus_per_actor if use_gpu else 0, "name": name}
    return ray.remote(Explainer).options(**options).remote(config, cache, use_gpu)


def explain_cohort(jobs: list[FoldModel], cache: VolumeCache, store: MapStore, config: AttributionConfig,
                   use_gpu: bool, on_batch: Callable[[int], None] | None = None) -> int:
    """Explain every subject of ``jobs`` not yet in ``store``; returns how many were explained.

    ``on_batch(n_done)`` is called after each stored batch (progress reporting).
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    n_actors = config.actors or (max(1, int(gpus / config.gpus_per_actor)) if use_gpu else 2)
    queue = []
    for job in jobs:
        todo = store.missing(job.subject_ids)
        label = dict(zip(job.subject_ids, job.labels))
        for start in range(0, len(todo), config.batch_size):
            ids = todo[start:start + config.batch_size]
            queue.append((job, ids, np.array([label[s] for s in ids])))
    total = sum(len(ids) for _, ids, _ in queue)
    if not queue:
        return 0
    # Named explainer-<slot>.<generation>: a replaced actor gets the next generation.
    generation = [0] * min(n_actors, len(queue))
    actors = [_start_actor(config, cache, use_gpu, f"explainer-{i}.0") for i in range(len(generation))]
    in_flight: dict[ray.ObjectRef, tuple[int, tuple]] = {}
    explained = 0
    with tqdm(total=total, desc="explaining", unit="subject") as bar:
        idle = list(range(len(actors)))
        while queue or in_flight:
            while queue and idle:
                slot = idle.pop()
                item = queue.pop(0)
                in_flight[actors[slot].explain.remote(*item)] = (slot, item)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            slot, item = in_flight.pop(ref)
            try:
                subject_ids, maps = ray.get(ref)
            except RayActorError:
                generation[slot] += 1  # replace the dead actor and retry its batch
                actors[slot] = _start_actor(config, cache, use_gpu, f"explainer-{slot}.{generation[slot]}")
                queue.insert(0, item)
                idle.append(slot)
                continue
            store.write(subject_ids, maps)
            explained += len(subject_ids)
            bar.update(len(subject_ids))
            idle.append(slot)
            if on_batch:
                on_batch(explained)
    for actor in actors:
        ray.kill(actor)
    return explained
