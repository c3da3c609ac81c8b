"""One execution of a study: the :class:`Study` that every stage receives, and its resume state.

The :class:`Study` is built once (:func:`study.pipeline.open_study`) and carries
what every stage needs: the config, the prepared cohort and its cache, the
splits, where files and checkpoints go, and the execution's state. The state
(``state.json``) is what a rerun needs to continue an execution instead of
starting afresh: which folds are finished and logged, and the MLflow runs to
continue. This module computes nothing and publishes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from study.config import StudyConfig
from study.data.cache import VolumeCache
from study.data.cohort import Cohort, Problem
from study.data.splits import OuterFold
from study.storage import replace_atomically


def config_hash(config: StudyConfig) -> str:
    """Hash of everything that changes results (not resources nor where they are stored or tracked)."""
    dumped = config.model_dump_json(exclude={"resources", "tracking", "storage_path"})
    return hashlib.sha1(dumped.encode()).hexdigest()[:12]


@dataclass
class StudyState:
    """What an execution has done so far, kept in ``<study dir>/state.json``.

    A rerun of the same config continues an unfinished execution: finished
    folds (saved in ``folds/``) are not redone, searches resume from their Tune
    state, and the same MLflow runs are continued.
    """

    config_hash: str
    execution: str  # names this execution's Ray storage; new for every fresh start
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
    def load(cls, directory: Path) -> "StudyState":
        data = json.loads(cls.path(directory).read_text())
        for runs in ("fold_runs", "baseline_runs"):
            data[runs] = {int(k): v for k, v in data.get(runs, {}).items()}
        return cls(**data)

    def save(self, directory: Path) -> None:
        replace_atomically(self.path(directory), lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))


def resume_or_start(config: StudyConfig, directory: Path, restart: bool) -> tuple[StudyState, bool]:
    """The state of an unfinished execution of this very config, else of a fresh one; and whether it resumes.

    A fresh execution removes what an earlier one left in ``directory`` (finished
    folds, Ray storage, maps), so nothing of it is mistaken for new results.
    """
    if StudyState.path(directory).exists() and not restart:
        state = StudyState.load(directory)
        if state.config_hash == config_hash(config) and not state.finished:
            return state, True
    for part in ("folds", "ray", "audit", "maps"):
        shutil.rmtree(directory / part, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    state = StudyState(config_hash(config), uuid.uuid4().hex[:12])
    state.save(directory)
    return state, False


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
    directory: Path  # splits, state, finished folds, maps, report
    storage: str  # Ray Train/Tune storage of this execution: a path or a cloud URI
    audit: bool = False  # record which subjects each training worker read (tests prove no leak with it)
    times: StageTimes = field(default_factory=StageTimes)

    @functools.cached_property
    def brain(self) -> np.ndarray:
        """Voxels inside the brain of any subject of the cache: where maps and the baseline look."""
        return self.cache.brain()

    def labels(self, subject_ids: list[str]) -> np.ndarray:
        """Labels (1 male, 0 female) of the given subjects, in that order."""
        label = dict(zip(self.cohort.ids, self.cohort.labels))
        return np.array([label[s] for s in subject_ids], dtype=np.int64)

    def save_state(self) -> None:
        self.state.save(self.directory)
