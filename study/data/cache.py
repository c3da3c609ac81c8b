"""The preprocessing cache: every subject on the study grid in one float16 memmap.

Layout under ``cache_dir/<params hash>/``::

    volumes-<cohort hash>.f16   [subjects, D, H, W] float16, C order
    index-<cohort hash>.json    subject ids, source keys, grid affine (written last)
    staging/<source key>.npy    subjects finished by a build that has not completed

A build reuses rows of the previous cache whose source key (path, size, mtime)
is unchanged, and staged subjects of an interrupted or refused build, so only
what changed is recomputed. Files are written under temporary names and renamed,
so a crash never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from study.data.adjustment import Adjustment
from study.data.cohort import Cohort, Problem
from study.data.volumes import Grid, preprocess_volume
from study.storage import allocate, exclusive, hold_shared, in_use, replace_atomically
from study.tasks import TaskMap, map_tasks

PREPROCESS_VERSION = 1  # bump when preprocess_volume changes its output


@dataclass(frozen=True)
class VolumeCache:
    """A finished cache: memmapped volumes, their subject ids and the grid affine.

    With an ``adjustment`` (an outer fold's, :mod:`study.data.adjustment`), every volume read through
    :class:`CachedVolumes` is adjusted for the confounds; the file keeps them as they were preprocessed.
    """

    path: Path
    subject_ids: list[str]
    shape: tuple[int, int, int]
    affine: np.ndarray
    adjustment: Adjustment | None = None

    def adjusted(self, adjustment: Adjustment | None) -> VolumeCache:
        """The same volumes, read through ``adjustment`` (None: as they were preprocessed)."""
        return replace(self, adjustment=adjustment)

    @property
    def volumes(self) -> np.ndarray:
        """The memmap [subjects, D, H, W], opened read-only."""
        if not self.path.exists():  # a node of a cluster that does not share the study's file system
            raise FileNotFoundError(
                f"preprocessing cache {self.path} is not on node {socket.gethostname()}: every node of a "
                "cluster must see the cache, cohort and output_dir at the same path (a shared file system, "
                "as cluster.yaml mounts at $STUDY_HOME)"
            )
        return _open_memmap(self.path, len(self.subject_ids), self.shape, mode="r")

    @property
    def grid(self) -> Grid:
        """The study grid the volumes are on."""
        return Grid(self.shape, self.affine)

    def _chunks(self, rows: np.ndarray | None = None, size: int = 64) -> Iterator[np.ndarray]:
        """The volumes of ``rows`` (default: every subject), ``size`` subjects at a time (float16)."""
        volumes = self.volumes
        rows = np.arange(len(volumes)) if rows is None else np.sort(rows)
        for start in range(0, len(rows), size):
            yield volumes[rows[start : start + size]]

    def brain(self) -> np.ndarray:
        """Voxels inside the brain of any subject (non-zero after preprocessing), bool [D, H, W]."""
        mask = np.zeros(self.shape, dtype=bool)
        for chunk in self._chunks():
            mask |= np.any(chunk != 0, axis=0)
        return mask

    def mean_volume(self, subject_ids: list[str] | None = None) -> np.ndarray:
        """The voxel-wise mean volume of the given subjects (default: all), float32 [D, H, W] (summed in float64)."""
        rows = None if subject_ids is None else self.rows(subject_ids)
        total = np.zeros(self.shape, dtype=np.float64)
        for chunk in self._chunks(rows):
            total += chunk.sum(0, dtype=np.float64)
        return (total / (len(self.subject_ids) if rows is None else len(rows))).astype(np.float32)

    def brain_volumes_ml(self) -> dict[str, float]:
        """Each subject's brain volume on the study grid (its non-zero voxels), in millilitres."""
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000
        counts = np.concatenate([(chunk != 0).reshape(len(chunk), -1).sum(1) for chunk in self._chunks()])
        return dict(zip(self.subject_ids, (counts * voxel_ml).tolist()))

    def brain_voxels(self, subject_ids: list[str], brain: np.ndarray) -> np.ndarray:
        """The brain voxels of ``subject_ids`` as read for training (adjusted, when there is an adjustment):
        [subjects, brain voxels] float32, read 64 subjects at a time."""
        dataset = CachedVolumes(self, subject_ids, np.zeros(len(subject_ids)))
        return np.concatenate(
            [np.zeros((0, int(brain.sum())), np.float32)]
            + [
                dataset.__getitems__(list(range(s, min(s + 64, len(subject_ids)))))[0].numpy()[:, 0][:, brain]
                for s in range(0, len(subject_ids), 64)
            ]
        )

    def rows(self, subject_ids: list[str]) -> np.ndarray:
        """Row numbers of the given subjects in the memmap."""
        where = {sid: i for i, sid in enumerate(self.subject_ids)}
        return np.array([where[s] for s in subject_ids], dtype=np.int64)


def params_key(grid: Grid, normalize: str) -> str:
    """Hash of everything that changes preprocessed voxels (not where they are stored)."""
    params = {"v": PREPROCESS_VERSION, "voxel": grid.voxel_mm, "shape": list(grid.shape), "norm": normalize}
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _open_memmap(path: Path, n: int, shape: tuple[int, ...], mode: str) -> np.ndarray:
    if mode == "w+":  # disk space reserved first: a full disk is an error here, not a SIGBUS mid-write
        allocate(path, n * int(np.prod(shape)) * np.dtype(np.float16).itemsize)
        mode = "r+"
    return np.memmap(path, dtype=np.float16, mode=mode, shape=(n, *shape))


def _volumes_of(index_path: Path) -> Path:
    """The volumes file of a cache index: named after the index's own file name, never after what it says
    (a forged ``volumes`` entry would make the clean-up delete any file)."""
    return index_path.with_name(f"volumes-{index_path.stem.removeprefix('index-')}.f16")


def _previous_rows(directory: Path) -> dict[str, tuple[Path, int, dict]]:
    """Source key -> (volumes file, row, index) for every finished cache in ``directory``."""
    rows: dict[str, tuple[Path, int, dict]] = {}
    for index_path in directory.glob("index-*.json"):
        index = json.loads(index_path.read_text())
        volumes = _volumes_of(index_path)
        if volumes.exists():
            for row, key in enumerate(index["source_keys"]):
                rows[key] = (volumes, row, index)
    return rows


@dataclass(frozen=True)
class CacheBuild:
    """The outcome of :func:`build_cache`."""

    cache: VolumeCache | None  # the subjects that succeeded (None when none did)
    problems: list[Problem]  # one per subject that failed
    computed: list[str]  # subjects preprocessed by this build (the rest were reused)


def build_cache(
    cohort: Cohort,
    grid: Grid,
    cache_dir: Path,
    normalize: str = "zscore",
    hold: bool = False,
    tasks: TaskMap = map_tasks,
) -> CacheBuild:
    """Preprocess every subject of ``cohort`` into the cache (in parallel, with a progress bar).

    Subjects whose image is unchanged since an earlier build are reused. When
    some subjects fail, the cache holds the others and every failure is
    returned as a problem; nothing computed is lost.

    Parameters
    ----------
    cohort : Cohort
        The subjects to preprocess.
    grid : Grid
        The study grid (MNI-like, RAS).
    cache_dir : Path
        Where caches live; each grid and normalization gets its own folder.
    normalize : {"zscore", "none"}
        Intensity normalization (see :func:`study.data.volumes.preprocess_volume`).
    hold : bool
        Mark the finished cache as in use by this process (a study, until it ends): another
        study's build that supersedes it leaves it in place.
    tasks : callable
        How subjects are preprocessed: as Ray tasks (:func:`~study.tasks.map_tasks`), or one after another
        in this process (:func:`~study.tasks.map_in_process`).
    """
    directory = Path(cache_dir) / params_key(grid, normalize)
    (directory / "staging").mkdir(parents=True, exist_ok=True)
    # One build at a time per cache folder: two studies started together on one cohort (the same grid and
    # normalization) would otherwise compute every subject twice, and one could delete the staged files that
    # the other is assembling. The second waits, then reuses what the first built.
    with exclusive(directory / ".build.lock", f"preprocessing cache {directory}"):
        build = _build(cohort, grid, normalize, directory, tasks)
        if hold and build.cache is not None:  # inside the lock: no other build can remove it first
            hold_shared(build.cache.path)
        return build


def _build(cohort: Cohort, grid: Grid, normalize: str, directory: Path, tasks: TaskMap) -> CacheBuild:
    """:func:`build_cache` inside its lock."""
    staging = directory / "staging"
    keys = [s.source_key() for s in cohort.subjects]
    # Which subject has which image is part of the key: a corrected table (A and B's images swapped) is a new
    # cohort, whose rows are reused by image, each under the subject the table now gives it.
    cohort_key = hashlib.sha1(
        "".join(f"{s.subject_id}|{k};" for s, k in zip(cohort.subjects, keys)).encode()
    ).hexdigest()[:12]
    index_path = directory / f"index-{cohort_key}.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index["subject_ids"] == cohort.ids and index["source_keys"] == keys:  # never trusted on its name alone
            return CacheBuild(_open_cache(index_path), [], [])

    previous = _previous_rows(directory)
    todo = [i for i, k in enumerate(keys) if k not in previous and not (staging / f"{k}.npy").exists()]
    problems, computed = [], []
    args = [(cohort.subjects[i].image, grid, normalize, cohort.subjects[i].brain_mask) for i in todo]
    for j, volume, error in tasks(preprocess_volume, args, desc="preprocessing"):
        subject = cohort.subjects[todo[j]]
        if error is not None:
            problems.append(Problem(subject.subject_id, str(subject.image), str(error)))
        else:
            replace_atomically(staging / f"{keys[todo[j]]}.npy", lambda tmp: np.save(tmp, volume))
            computed.append(subject.subject_id)
    if problems:
        # The subjects that succeeded become a complete cache of their own.
        usable = cohort.exclude(problems)
        cache = _build(usable, grid, normalize, directory, tasks).cache if usable.subjects else None
        return CacheBuild(cache, sorted(problems, key=lambda p: p.subject), sorted(computed))
    return CacheBuild(_assemble(cohort, keys, cohort_key, directory, grid, previous), [], sorted(computed))


def _assemble(
    cohort: Cohort, keys: list[str], cohort_key: str, directory: Path, grid: Grid, previous: dict
) -> VolumeCache:
    name = f"volumes-{cohort_key}.f16"
    staged = {key: directory / "staging" / f"{key}.npy" for key in keys if key not in previous}

    def write(tmp: Path) -> None:
        out = _open_memmap(tmp, len(keys), grid.shape, mode="w+")
        for row, key in enumerate(keys):
            if key in previous:
                src_path, src_row, src_index = previous[key]
                out[row] = _open_memmap(src_path, len(src_index["source_keys"]), tuple(src_index["shape"]), "r")[
                    src_row
                ]
            else:
                out[row] = np.load(staged[key])
        out.flush()

    replace_atomically(directory / name, write)
    index = {
        "volumes": name,
        "subject_ids": cohort.ids,
        "source_keys": keys,
        "shape": list(grid.shape),
        "affine": grid.affine.tolist(),
    }
    index_path = directory / f"index-{cohort_key}.json"
    replace_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index)))
    for path in staged.values():
        path.unlink(missing_ok=True)
    _remove_superseded(directory, keep=index_path)
    return _open_cache(index_path)


def _remove_superseded(directory: Path, keep: Path) -> None:
    """Delete older finished caches in the same parameter directory, except those a running study uses
    (:func:`study.storage.hold_shared` on their volumes; a later build removes them)."""
    for index_path in directory.glob("index-*.json"):
        if index_path != keep:
            volumes = _volumes_of(index_path)
            if in_use(volumes):
                continue
            index_path.unlink(missing_ok=True)
            volumes.unlink(missing_ok=True)


def _open_cache(index_path: Path) -> VolumeCache:
    index = json.loads(index_path.read_text())
    return VolumeCache(
        _volumes_of(index_path), index["subject_ids"], tuple(index["shape"]), np.asarray(index["affine"])
    )


class CachedVolumes(torch.utils.data.Dataset):
    """Subjects of a cache as a torch Dataset: (1, D, H, W) float32 volume and label.

    Batches are read with ``__getitems__`` straight from the memmap (no
    decompression, one allocation per batch), and adjusted for the confounds when the cache
    has an adjustment; use it with ``collate_fn=collate``.
    """

    def __init__(self, cache: VolumeCache, subject_ids: list[str], labels: np.ndarray):
        self.cache_path = cache.path
        self.n_cached = len(cache.subject_ids)
        self.shape = cache.shape
        self.rows = cache.rows(subject_ids)
        self.subject_ids = list(subject_ids)
        labels = np.asarray(labels)  # class indices; a regression target's (standardized) values are float32
        self.labels = torch.from_numpy(labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64))
        self.adjustment = cache.adjustment
        self._volumes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def volumes(self) -> np.ndarray:
        # Opened lazily so that the dataset pickles cheaply into Ray workers.
        if self._volumes is None:
            self._volumes = _open_memmap(self.cache_path, self.n_cached, self.shape, "r")
        return self._volumes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[indices]
        order = np.argsort(rows)  # sequential reads from the memmap
        batch = np.empty((len(rows), 1, *self.shape), dtype=np.float32)
        batch[order, 0] = self.volumes[rows[order]]
        if self.adjustment is not None:
            confounds = self.adjustment.subjects.loc[[self.subject_ids[i] for i in indices]]
            batch = self.adjustment.apply_to_volumes(batch, confounds)
        return torch.from_numpy(batch), self.labels[indices]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_volumes": None}


def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader collate function for :class:`CachedVolumes` (batches come whole)."""
    return batch
