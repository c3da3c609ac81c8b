"""A pool of long-lived Ray actors that explain every held-out subject.

Each actor loads a fold's model once and explains batches of that fold's
held-out subjects, read from the preprocessing cache. The driver writes each
batch into the :class:`MapStore` as it completes, so a crash loses at most the
batches in flight, a rerun skips what exists, and an actor that dies is
replaced and its batch given to another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.train
import torch
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from study.attribution.methods import Batch
from study.attribution.perturbation import Perturbation
from study.attribution.store import MapStore
from study.attribution.targets import VersusRest, select_targets
from study.data.cache import CachedVolumes, VolumeCache
from study.runtime import Precision, worker_device
from study.training.checkpoint import load_model


@dataclass(frozen=True)
class Explanation:
    """What to compute for every subject: the methods, the class score they explain, and MP's settings."""

    methods: tuple[str, ...]
    target: str  # true_class | predicted_class | contrast
    perturbation: Perturbation
    cohort_mean: np.ndarray | None = field(default=None, compare=False)  # [D, H, W]: MP's cohort_mean reference
    versus_rest: int | None = None  # of several classes: the class whose score against the rest every map explains


@dataclass(frozen=True)
class FoldModel:
    """A trained model, the held-out subjects it must explain, and their volumes as the model read them (the
    fold's view of the cache: adjusted for the confounds with ``cv.adjust``)."""

    fold: int
    checkpoint: ray.train.Checkpoint
    subject_ids: list[str]
    labels: np.ndarray
    cache: VolumeCache


def explain_batch(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    explanation: Explanation,
    voxel_mm: float,
    precision: Precision,
) -> dict[str, np.ndarray]:
    """Every method's maps for one batch (``x`` already on the device), as float16 [batch, D, H, W].

    In float32 on every device (``Precision.exact``): under bf16 autocast a GPU's Meaningful Perturbations
    masks differed from the CPU's by up to half their maximum, and the explained class of a subject near the
    decision boundary could differ from the one its reported probability gives.
    """
    if explanation.versus_rest is not None:  # the contrast of this two-logit view: class k against the rest
        model = VersusRest(model, explanation.versus_rest)
    with torch.no_grad(), precision.exact():
        targets = select_targets(explanation.target, labels, model(x))
    mean = None if explanation.cohort_mean is None else torch.tensor(explanation.cohort_mean, device=x.device)
    batch = Batch(model, x, targets, voxel_mm, explanation.perturbation, mean)
    with precision.exact():
        maps = {method: batch.map(method) for method in explanation.methods}
    return {m: maps[m].float().cpu().numpy().astype(np.float16) for m in explanation.methods}


def explain_subjects(
    model: torch.nn.Module,
    cache: VolumeCache,
    subject_ids: list[str],
    labels: np.ndarray,
    explanation: Explanation,
    precision: Precision,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Every method's maps of the given cached subjects, ``batch_size`` subjects at a time (what the memory
    estimate allows a device to hold)."""
    volumes, batches = CachedVolumes(cache, subject_ids, labels), []
    for start in range(0, len(subject_ids), batch_size):
        x, y = volumes.__getitems__(list(range(start, min(start + batch_size, len(subject_ids)))))
        batches.append(
            explain_batch(
                model, precision.volumes(x), y.to(precision.device), explanation, cache.grid.voxel_mm, precision
            )
        )
    return {m: np.concatenate([b[m] for b in batches]) for m in explanation.methods}


class Explainer:
    """One actor of the pool: keeps the model of the fold it last explained."""

    def __init__(self, explanation: Explanation):
        self.explanation = explanation
        self.precision = Precision.choose(worker_device())
        self.fold: int | None = None
        self.model: torch.nn.Module | None = None

    def explain(self, job: FoldModel, subject_ids: list[str], labels: np.ndarray) -> tuple[list[str], dict]:
        if self.fold != job.fold:
            self.model = self.precision.model(load_model(job.checkpoint, calibrated=True))
            self.fold = job.fold
        return subject_ids, explain_subjects(
            self.model, job.cache, subject_ids, labels, self.explanation, self.precision, len(subject_ids)
        )


def pool_size(actors: int | None, gpus_per_actor: float) -> int:
    """Actors in the pool: as many as asked, else as many as fit on the cluster's GPUs, else 2 on CPUs."""
    if actors:
        return actors
    if gpus_per_actor:
        return max(1, int(ray.cluster_resources().get("GPU", 0) / gpus_per_actor))
    return 2


def _start_actor(explanation: Explanation, gpus_per_actor: float, name: str):
    options = {"num_cpus": 1, "num_gpus": gpus_per_actor, "name": name}
    return ray.remote(Explainer).options(**options).remote(explanation)


def explain_cohort(
    jobs: list[FoldModel],
    store: MapStore,
    explanation: Explanation,
    batch_size: int,
    actors: int,
    gpus_per_actor: float = 0,
    on_batch: Callable[[int], None] | None = None,
    desc: str = "explaining",
) -> int:
    """Explain every subject of ``jobs`` not yet in ``store``; returns how many were explained.

    Parameters
    ----------
    jobs : list of FoldModel
        Each fold's model, the held-out subjects it explains and their volumes.
    store : MapStore
        Where maps go, batch by batch; subjects already there are skipped.
    explanation : Explanation
        The methods, their target and Meaningful Perturbations' settings.
    batch_size : int
        Subjects per actor call.
    actors : int
        Actors in the pool (at most one per batch).
    gpus_per_actor : float
        GPU share of each actor (0: CPU only; 0.5: two actors per GPU).
    on_batch : callable, optional
        ``on_batch(n_done)`` after each stored batch (progress reporting).
    desc : str
        What the progress bar says.
    """
    queue = []
    for job in jobs:
        todo = store.missing(job.subject_ids)
        label = dict(zip(job.subject_ids, job.labels))
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            queue.append((job, ids, np.array([label[s] for s in ids])))
    total = sum(len(ids) for _, ids, _ in queue)
    if not queue:
        return 0
    # Named explainer-<slot>.<generation>: a replaced actor gets the next generation.
    generation = [0] * min(actors, len(queue))
    pool = [_start_actor(explanation, gpus_per_actor, f"explainer-{i}.0") for i in range(len(generation))]
    try:
        _run_pool(pool, generation, queue, total, store, explanation, gpus_per_actor, on_batch, desc)
    finally:  # also when a batch or the progress callback fails: no actor keeps its GPU share
        for actor in pool:
            ray.kill(actor)
    return total


def _run_pool(
    pool: list,
    generation: list[int],
    queue: list,
    total: int,
    store: MapStore,
    explanation: Explanation,
    gpus_per_actor: float,
    on_batch: Callable[[int], None] | None,
    desc: str,
) -> None:
    """Feed the queue of batches to the pool, replacing an actor that dies, until every batch is stored."""
    in_flight: dict[ray.ObjectRef, tuple[int, tuple]] = {}
    explained = 0
    with tqdm(total=total, desc=desc, unit="subject") as bar:
        idle = list(range(len(pool)))
        while queue or in_flight:
            while queue and idle:
                slot = idle.pop()
                item = queue.pop(0)
                in_flight[pool[slot].explain.remote(*item)] = (slot, item)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            slot, item = in_flight.pop(ref)
            try:
                subject_ids, maps = ray.get(ref)
            except RayActorError:
                generation[slot] += 1  # replace the dead actor and retry its batch
                pool[slot] = _start_actor(explanation, gpus_per_actor, f"explainer-{slot}.{generation[slot]}")
                queue.insert(0, item)
                idle.append(slot)
                continue
            store.write(subject_ids, maps)
            explained += len(subject_ids)
            bar.update(len(subject_ids))
            idle.append(slot)
            if on_batch:
                on_batch(explained)
