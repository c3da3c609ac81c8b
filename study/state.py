"""One execution of a study: the :class:`Study` that every stage receives, and its resume state.

The :class:`Study` is built once (:func:`study.pipeline.open_study`) and carries
what every stage needs: the config, the prepared cohort and its cache, the
splits, where files and checkpoints go, and the execution's state. The state
(``state.json``) is what a rerun needs to continue an execution instead of
starting afresh: which folds are finished and logged, and the MLflow runs to
continue. This module publishes nothing and computes only what the folds read
their volumes through (:meth:`Study.fold_cache`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from study.config import StudyConfig
from study.data.adjustment import fit_adjustment
from study.data.cache import VolumeCache
from study.data.cohort import Cohort, Problem
from study.data.splits import OuterFold
from study.errors import StudyError
from study.storage import hold_exclusive, in_use, replace_atomically, submitted_job_id

LOCK_FILE = "running.lock"  # held by the driver that runs an execution, for as long as it runs


def config_hash(config: StudyConfig) -> str:
    """Hash of everything that changes results (not resources nor where they are stored or tracked)."""
    exclude: dict = {"resources": True, "tracking": True, "storage_path": True}
    if config.cohort.task == "classification":  # keys that came with regression: unfinished executions resume
        exclude |= {"cohort": {"task"}, "train": {"loss"}}
    dumped = config.model_dump_json(exclude=exclude)
    return hashlib.sha1(dumped.encode()).hexdigest()[:12]


@dataclass
class StudyState:
    """What an execution has done so far, kept in ``<study dir>/<execution>/state.json``.

    A rerun of the same config continues an unfinished execution: finished
    folds (saved in ``folds/``) are not redone, searches resume from their Tune
    state, and the same MLflow runs are continued.
    """

    config_hash: str
    execution: str  # names this execution's directory and Ray storage; new for every fresh start
    parent_run: str | None = None  # the study's MLflow run
    fold_runs: dict[int, str] = field(default_factory=dict)  # fold -> its MLflow run
    logged_folds: list[int] = field(default_factory=list)  # folds whose results MLflow has
    baseline_runs: dict[int, str] = field(default_factory=dict)  # fold -> MLflow run of its linear baseline
    ensemble: str | None = None  # models:/<name>/<version> of the registered fold ensemble
    finished: bool = False

    @staticmethod
    def path(directory: Path) -> Path:
        return directory / "state.json"

    @classmethod
    def load(cls, directory: Path) -> StudyState:
        """The state in ``directory``; an unreadable file, or one that names another execution, is a
        :class:`StudyError` naming it (a state decides what a rerun continues and what ``study clean`` deletes)."""
        path = cls.path(directory)
        try:
            data = json.loads(path.read_text())
            for runs in ("fold_runs", "baseline_runs"):
                data[runs] = {int(k): v for k, v in data.get(runs, {}).items()}
            state = cls(**data)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise StudyError(
                f"{path}: unreadable execution state ({type(err).__name__}: {err}); move that "
                f"execution's folder {directory} aside (its results stay there) and run again"
            ) from None
        if state.execution != directory.name:
            raise StudyError(
                f"{path} names execution {state.execution!r}, not its folder {directory.name!r}: not "
                "this folder's state; restore it or move the folder aside"
            )
        return state

    def save(self, directory: Path) -> None:
        replace_atomically(self.path(directory), lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))


LATEST = "latest"  # <study dir>/latest: a link to the execution run or resumed last (stable path to its report)


def new_execution_id() -> str:
    """A new execution's name: when it started, in UTC, to the millisecond (sorts by time anywhere, also two
    started in one second), and a random character."""
    now = time.time_ns()
    return (
        time.strftime("%Y%m%d-%H%M%S", time.gmtime(now / 1e9)) + f"-{now // 1_000_000 % 1000:03d}" + uuid.uuid4().hex[0]
    )


def _holder() -> str:
    """Who runs an execution, for the message a second driver gets: process, host, Ray job, since when."""
    job = submitted_job_id()
    return (
        f"pid {os.getpid()} on {socket.gethostname()}"
        + (f", Ray job {job}" if job else "")
        + f", since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )


def running(directory: Path) -> str | None:
    """Who runs the execution in ``directory`` now (see :func:`resume_or_start`), or None."""
    lock = directory / LOCK_FILE
    return (lock.read_text().strip() or "another process") if in_use(lock) else None


def list_executions(study_directory: Path) -> list[tuple[Path, StudyState]]:
    """Every execution of a study (its directory and state), oldest first."""
    found = [path.parent for path in study_directory.glob("*/state.json") if not path.parent.is_symlink()]
    return [(directory, StudyState.load(directory)) for directory in sorted(found)]


def resume_or_start(config: StudyConfig, study_directory: Path, restart: bool) -> tuple[StudyState, Path, bool]:
    """The newest unfinished execution of this very config, else a fresh one: its state, directory, and
    whether it resumes.

    Each execution has a directory of its own under ``study_directory``, so a
    fresh start (``--restart``, changed ``--set`` values, or a rerun of a
    finished study) never touches an earlier execution's results;
    ``study clean`` removes old executions when asked.
    """
    resumable = (
        []
        if restart
        else [
            (d, s)
            for d, s in list_executions(study_directory)
            if s.config_hash == config_hash(config) and not s.finished
        ]
    )
    if resumable:
        directory, state = resumable[-1]
    else:
        state = StudyState(config_hash(config), new_execution_id())
        directory = study_directory / state.execution
        directory.mkdir(parents=True)
    holder = hold_exclusive(directory / LOCK_FILE, _holder())
    if holder is not None:
        raise StudyError(
            f"execution {directory.name} of study {config.name} is being run by another driver "
            f"({holder}): two drivers would write the same folds, state and MLflow runs. Wait for it "
            "to end, or stop it (a submitted job: ray job stop ID) and run again; --restart starts "
            "a new execution beside it"
        )
    if not resumable:
        state.save(directory)
    link = study_directory / LATEST
    replace_atomically(link, lambda tmp: tmp.symlink_to(directory.name, target_is_directory=True))
    return state, directory, bool(resumable)


@dataclass
class StageTimes:
    """Wall-clock seconds per stage of an execution, in the order the stages ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block and add it to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def merge(self, seconds: dict[str, float]) -> None:
        """Add what a stage timed (stage -> seconds), e.g. its result's ``seconds``."""
        for name, value in seconds.items():
            self.add(name, value)


@dataclass
class Study:
    """Everything a stage needs to know about one execution of a study."""

    config: StudyConfig
    cohort: Cohort  # the usable subjects
    cache: VolumeCache  # their preprocessed volumes
    excluded: list[Problem]  # subjects left out, with the reason (cohort.on_invalid: exclude)
    folds: list[OuterFold]
    state: StudyState
    resumed: bool  # True when this continues an unfinished execution
    directory: Path  # this execution's splits, state, finished folds, maps, report (<study dir>/<execution>)
    storage: str  # Ray Train/Tune storage of this execution: a path or a cloud URI
    audit: bool = False  # record which subjects each training worker read (tests prove no leak with it)
    _fold_caches: dict[int, VolumeCache] = field(default_factory=dict, init=False, repr=False)

    @functools.cached_property
    def confounds(self) -> pd.DataFrame:
        """Every subject's confounds (``cohort.confounds``), indexed by subject id; each column's kind (numeric or
        categorical) read once, on the whole cohort."""
        return self.cohort.confound_table(self.cohort.ids).set_axis(self.cohort.ids)

    def fold_cache(self, fold: int) -> VolumeCache:
        """The cache as outer fold ``fold`` reads it: with ``cv.adjust``, every volume adjusted for the confounds
        by an adjustment fitted on the fold's training subjects only (:mod:`study.data.adjustment`, fitted on
        first use); else the cache itself."""
        method = self.config.cv.adjust
        if method == "none":
            return self.cache
        if fold not in self._fold_caches:
            train, group_by = self.folds[fold].train, self.config.cv.group_by
            voxels = self.cache.brain_voxels(train, self.brain)
            keep = (group_by,) if group_by else ()
            adjustment = fit_adjustment(method, voxels, self.confounds.loc[train], self.brain, keep)
            self._fold_caches[fold] = self.cache.adjusted(adjustment.for_subjects(self.confounds))
        return self._fold_caches[fold]

    @functools.cached_property
    def brain(self) -> np.ndarray:
        """Voxels inside the brain of any subject of the cache: where maps and the baseline look."""
        return self.cache.brain()

    @functools.cached_property
    def cohort_mean(self) -> np.ndarray:
        """The mean of the classes' mean volumes, float32 [D, H, W]: what Meaningful Perturbations deletes
        towards, as far from one class as from another whatever the classes' sizes (a regression study's: the
        mean volume)."""
        ids = np.array(self.cohort.ids)
        if self.cohort.target.kind == "regression":
            return self.cache.mean_volume(self.cohort.ids).astype(np.float32)
        labels = self.labels(self.cohort.ids)
        means = [self.cache.mean_volume(ids[labels == code].tolist()) for code in range(len(self.cohort.target.names))]
        return np.mean(means, axis=0).astype(np.float32)

    def labels(self, subject_ids: list[str]) -> np.ndarray:
        """Class indices (e.g. 1 male, 0 female), or a regression target's values, of the given subjects, in that
        order."""
        labels = self.cohort.labels
        label = dict(zip(self.cohort.ids, labels))
        return np.array([label[s] for s in subject_ids], dtype=labels.dtype)

    def save_state(self) -> None:
        self.state.save(self.directory)
