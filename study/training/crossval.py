"""Cross-validation: for each outer fold, search (if configured), train on Ray Train, test once.

:func:`cross_validate` is the stage: it yields one :class:`FoldResult` per
outer fold as each finishes (up to ``resources.concurrent_folds`` at once) and
keeps each in ``<study dir>/folds/`` first, so a rerun yields finished folds
without training them again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from study.config import ResourcesConfig, TrainConfig
from study.data.cache import CachedVolumes
from study.data.cohort import Classes
from study.data.splits import OuterFold
from study.errors import StudyError
from study.runtime import Precision, worker_device
from study.state import Study
from study.storage import join, replace_atomically
from study.training.loop import TrainingData, load_history, load_model, network_class, predict
from study.training.metrics import classification_metrics
from study.training.models import architecture_of
from study.training.trainer import TrainingSetup, fit
from study.training.trials import SearchResult, Trial


@dataclass
class FoldResult:
    """What an outer fold produced: the setup it trained, curves, the model, its held-out test results."""

    fold: int
    setup: TrainingSetup
    history: pd.DataFrame  # one row per epoch; column phase: select (inner split) or refit (all training subjects)
    checkpoint: ray.train.Checkpoint  # the final model: refit on all training subjects, else the selected one
    test_metrics: dict[str, float]
    predictions: pd.DataFrame  # subject_id, the true class, P(class 1), predicted (Classes.predictions)
    seconds: dict[str, float]  # training, Ray set-up, testing (and search, when there was one)
    search: SearchResult | None = None

    def epochs(self, phase: str) -> int:
        """Epochs trained in ``phase`` (select or refit)."""
        return int((self.history["phase"] == phase).sum()) if "phase" in self.history else 0

    @property
    def final_epochs(self) -> int:
        """Epochs the final model trained: its refit, or up to its best epoch on the inner split."""
        if self.epochs("refit"):
            return self.epochs("refit")
        select = self.history[self.history["phase"] == "select"]
        return int(select.loc[select["val_loss"].idxmin(), "epoch"]) + 1

    @property
    def fit_accuracy(self) -> float:
        """The final model's accuracy on its own training subjects (eval mode): did it fit them at all?"""
        return float(self.history["fit_accuracy"].dropna().iloc[-1]) if "fit_accuracy" in self.history else float("nan")

    def to_json(self) -> str:
        """The fold as JSON: a rerun trusts this file, and JSON (unlike pickle) cannot run code when read."""
        search = (
            None
            if self.search is None
            else {
                "metric": self.search.metric,
                "best": self.search.best,
                "trials": [{**vars(t), "history": t.history.to_dict("records")} for t in self.search.trials],
            }
        )
        return json.dumps(
            {
                "fold": self.fold,
                "architecture": self.setup.architecture.model_dump(mode="json"),
                "train": self.setup.train.model_dump(mode="json"),
                "history": self.history.to_dict("records"),
                "checkpoint": self.checkpoint.path,  # within Ray storage's file system, given back to from_json
                "test_metrics": self.test_metrics,
                "predictions": self.predictions.to_dict("records"),
                "seconds": self.seconds,
                "search": search,
            },
            indent=1,
            default=lambda value: value.item(),
        )

    @classmethod
    def from_json(cls, text: str, filesystem: pyarrow.fs.FileSystem | None = None) -> FoldResult:
        """The fold of :meth:`to_json`; ``filesystem``: that of the Ray storage holding its checkpoint (local if
        None)."""
        data = json.loads(text)
        search = data["search"] and SearchResult(
            data["search"]["metric"],
            data["search"]["best"],
            [Trial(**{**t, "history": pd.DataFrame(t["history"])}) for t in data["search"]["trials"]],
        )
        setup = TrainingSetup(architecture_of(data["architecture"]), TrainConfig.model_validate(data["train"]))
        return cls(
            data["fold"],
            setup,
            pd.DataFrame(data["history"]),
            ray.train.Checkpoint(data["checkpoint"], filesystem or pyarrow.fs.LocalFileSystem()),
            data["test_metrics"],
            pd.DataFrame(data["predictions"]).astype({"subject_id": str}),
            data["seconds"],
            search,
        )


def training_data(
    study: Study, train_ids: list[str], val_ids: list[str], refit_ids: list[str] | None = None
) -> TrainingData:
    """The labelled subjects of one training: a selection split and, optionally, the final fit's subjects."""
    refit_ids = refit_ids or []
    return TrainingData(
        study.cache,
        train_ids,
        study.labels(train_ids),
        val_ids,
        study.labels(val_ids),
        refit_ids,
        study.labels(refit_ids),
    )


def predict_task(resources: ResourcesConfig) -> ray.remote_function.RemoteFunction:
    """The Ray task that tests a fold's model, on a training worker's share of a node.

    Its GPUs are given to ``ray.remote`` itself, which then ends the task's process after it (max_calls 1):
    through ``.options()`` the process would keep its CUDA context and its GPU for the next task it runs.
    """
    gpus = resources.gpus_per_worker if resources.use_gpu else 0
    return ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=gpus)(_predict_checkpoint)


def _predict_checkpoint(checkpoint: ray.train.Checkpoint, dataset: CachedVolumes, train: TrainConfig) -> np.ndarray:
    precision = Precision.choose(worker_device(), train.precision, train.channels_last)
    return predict(precision.model(load_model(checkpoint)), dataset, train.batch_size, precision)


def train_and_test(
    fold: int,
    setup: TrainingSetup,
    data: TrainingData,
    test_ids: list[str],
    test_labels: np.ndarray,
    classes: Classes,
    storage_path: str,
    resources: ResourcesConfig,
    audit_dir: Path | None = None,
    search: SearchResult | None = None,
    live_path: Path | None = None,
) -> FoldResult:
    """Train ``setup`` as its ``final_fit`` says, then test it on the held-out subjects.

    ``data`` holds the fold's first inner split and all of its training
    subjects. After a search, the best trial already made any selection on the
    inner split: what is left is the training on all subjects (or, for
    ``inner_split``, the best setup trained again on the inner split).
    """
    started = time.perf_counter()
    final_fit = setup.train.final_fit
    refit_epochs = setup.train.epochs
    if final_fit == "all_subjects":
        data = data.refit_only()
    elif final_fit == "inner_split":
        data = data.selection_only()
    elif search is not None:  # early_stopped: the search's best trial chose the epochs
        data, refit_epochs = data.refit_only(), search.best_epoch + 1
    checkpoint = fit(
        setup, data, f"fold{fold}", storage_path, resources, audit_dir, refit_epochs=refit_epochs, live_path=live_path
    ).checkpoint
    history = pd.DataFrame(load_history(checkpoint))
    selected_by_search = search is not None and final_fit == "early_stopped"
    if selected_by_search:
        history = pd.concat([search.best_trial.history.assign(phase="select"), history], ignore_index=True)
    fitted = time.perf_counter()
    test_set = CachedVolumes(data.cache, test_ids, test_labels)
    p = ray.get(predict_task(resources).remote(checkpoint, test_set, setup.train))
    trained_here = history[history["phase"] == "refit"] if selected_by_search else history
    training = float(trained_here.filter(like="epoch_seconds").sum().sum())
    predictions = classes.predictions(test_ids, test_labels, p)
    seconds = {
        "training": training,
        "Ray Train set-up": max(fitted - started - training, 0.0),
        "testing": time.perf_counter() - fitted,
    }
    return FoldResult(
        fold, setup, history, checkpoint, classification_metrics(test_labels, p), predictions, seconds, search
    )


LOST_WORKER = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.train.PreemptionError,
)


def _lost_worker(err: BaseException) -> bool:
    """True when a training stopped because a worker or its node went away, not because its code failed.

    Ray wraps the cause: a task error holds Ray Train's error, which holds each
    worker's failure (a failed health check holds why it failed).
    """
    return isinstance(err, LOST_WORKER) or any(_lost_worker(e) for e in _nested(err))


def _nested(err: BaseException) -> list[BaseException]:
    """The errors that ``err`` wraps (a task's cause, Ray Train's controller and worker failures)."""
    nested = [
        getattr(err, "cause", None),
        getattr(err, "controller_failure", None),
        getattr(err, "health_check_failure", None),
        *getattr(err, "worker_failures", {}).values(),
    ]
    return [e for e in nested if isinstance(e, BaseException) and e is not err]


def _failure_message(fold: int, err: Exception, max_failures: int) -> str:
    """Why a fold's training stopped, what is kept, and how to go on."""
    cause = err
    while _nested(cause):
        cause = _nested(cause)[0]
    lines = [line for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
    last = lines[-1] if lines[0].startswith("Traceback") else f"{type(cause).__name__}: {lines[0]}"  # a worker's
    if not _lost_worker(err):
        return (
            f"fold {fold}'s training failed: {last[:300]}. Finished folds are kept: mend the cause and run "
            "the same command again to resume."
        )
    return (
        f"fold {fold}'s training failed (a worker or its node was lost) after {max_failures} restart(s) "
        "(resources.max_failures). Finished folds and this fold's last checkpoint are kept: run the same "
        "command again to resume, and raise resources.max_failures to let trainings survive lost workers "
        "(e.g. 3 on spot nodes)."
    )


LIVE_POLL_S = 2.0  # how often the driver looks for new epochs of the folds in training


class LiveFiles:
    """The per-epoch records that training folds append to ``<directory>/fold<k>.jsonl``, read as they grow."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.read: dict[int, int] = {}  # fold -> bytes consumed

    def start(self, fold: int) -> Path:
        """A fresh live file for ``fold`` (a retried fold starts its curves again)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"fold{fold}.jsonl"
        path.write_text("")
        self.read[fold] = 0
        return path

    def stop(self, fold: int) -> None:
        """Stop following ``fold``'s file."""
        self.read.pop(fold, None)

    def new_records(self) -> dict[int, list[dict]]:
        """Every fold's complete lines written since the last call."""
        found = {}
        for fold, offset in self.read.items():
            with open(self.directory / f"fold{fold}.jsonl", "rb") as f:
                f.seek(offset)
                text = f.read()
            complete = text[: text.rfind(b"\n") + 1]
            if complete:
                self.read[fold] = offset + len(complete)
                found[fold] = [json.loads(line) for line in complete.decode().splitlines()]
        return found

    @contextlib.contextmanager
    def delivered(self, on_epochs: Callable[[int, list[dict]], None] | None) -> Iterator[None]:
        """Hand new records to ``on_epochs`` every ``LIVE_POLL_S`` from a thread while the caller is busy
        (a fold's search blocks the driver; folds already training keep reaching MLflow meanwhile)."""
        if on_epochs is None:
            yield
            return
        stop, failed = threading.Event(), []

        def deliver() -> None:
            try:
                while not stop.wait(LIVE_POLL_S):
                    for fold, records in self.new_records().items():
                        on_epochs(fold, records)
            except Exception as err:  # noqa: BLE001 - raised again in the caller's thread below
                failed.append(err)

        thread = threading.Thread(target=deliver, name="live-curves", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if failed:
            raise failed[0]


def driving_task(function: Callable) -> Any:
    """``function`` as a Ray task that only drives a training: no resources of its own, on the driver's node.

    A task holding no resources would look idle to an autoscaler, which could remove its node mid-training; the
    driver's node (the head in a job) is never scaled away.
    """
    return ray.remote(num_cpus=0)(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    )


def cross_validate(
    study: Study,
    on_epochs: Callable[[int, list[dict]], None] | None = None,
    on_trial: Callable[[int, str, str, dict, dict], None] | None = None,
) -> Iterator[FoldResult]:
    """Search (if configured), train and test every outer fold; yield each result as it is ready.

    Folds finished by an earlier, interrupted run of this execution come first,
    without training. Every fold trains on its training side only (a search and
    early stopping see its first inner split), so no held-out subject influences
    training or model selection. While folds train, ``on_epochs(fold, records)``
    gets each fold's new per-epoch records (at most ``LIVE_POLL_S`` late), and
    ``on_trial(fold, event, trial_id, params, result)`` each search trial's events
    (see :func:`study.training.search.search_fold`).
    """
    from study.training.search import search_fold  # Ray Tune and Optuna only where a search runs

    config = study.config
    finished = study.directory / "folds"
    finished.mkdir(exist_ok=True)
    done = set()
    for path in sorted(finished.glob("fold*.json")):
        result = FoldResult.from_json(path.read_text(), pyarrow.fs.FileSystem.from_uri(study.storage)[0])
        if (found := network_class(result.checkpoint)) != getattr(config.model, "factory", None):
            raise StudyError(
                f"{path}: its checkpoint's network is {found or 'the study CNN'}, the config's "
                f"{getattr(config.model, 'factory', None) or 'the study CNN'}: loading it would import "
                "code the config does not name. Move this execution aside, or run with --restart"
            )
        done.add(result.fold)
        yield result
    base = TrainingSetup(config.model, config.train)
    task = driving_task(train_and_test)
    live = LiveFiles(study.directory / "live")

    def start(fold: OuterFold) -> ray.ObjectRef:
        """Search ``fold`` (if configured) in this process, then start its training as a Ray task."""
        data = training_data(study, fold.validation.train, fold.validation.test, fold.train)
        search = None
        if config.search:
            started = time.perf_counter()
            audit_root = study.directory / "audit" / f"fold{fold.fold}_search" if study.audit else None
            trial_events = functools.partial(on_trial, fold.fold) if on_trial else None
            with live.delivered(on_epochs):  # the folds in flight keep their curves live during this search
                search = search_fold(
                    config.search,
                    base,
                    data.selection_only(),
                    join(study.storage, "search"),
                    fold.fold,
                    config.resources,
                    audit_root,
                    trial_events,
                )
            study.times.add("search", time.perf_counter() - started)
        audit_dir = study.directory / "audit" / f"fold{fold.fold}" if study.audit else None
        if audit_dir:
            audit_dir.mkdir(parents=True, exist_ok=True)
        setup = base.with_params(search.best) if search else base
        return task.remote(
            fold.fold,
            setup,
            data,
            fold.test,
            study.labels(fold.test),
            study.cohort.classes,
            join(study.storage, "train"),
            config.resources,
            audit_dir,
            search,
            live.start(fold.fold),
        )

    pending: dict[ray.ObjectRef, int] = {}  # a training in flight -> its fold
    queue = [f for f in study.folds if f.fold not in done]
    try:
        while queue or pending:
            while queue and len(pending) < config.resources.concurrent_folds:
                fold = queue.pop(0)
                pending[start(fold)] = fold.fold
            ready = []
            while not ready:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=LIVE_POLL_S)
                if on_epochs:
                    for fold_number, records in live.new_records().items():
                        on_epochs(fold_number, records)
            fold_number = pending.pop(ready[0])
            live.stop(fold_number)  # its last lines were read above, after it finished
            try:
                result: FoldResult = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise StudyError(_failure_message(fold_number, err, config.resources.max_failures)) from None
            replace_atomically(finished / f"fold{result.fold}.json", lambda tmp: tmp.write_text(result.to_json()))
            yield result
    finally:  # a failed fold or Ctrl-C stops the trainings in flight; else they ran on until the driver exits
        for ref in pending:
            ray.cancel(ref, force=True)
