"""Cross-validation, the stage: for each outer fold, search (if configured), train on Ray Train, test once.

:func:`cross_validate` yields one :class:`~study.training.folds.FoldResult` per
outer fold as each finishes: first the folds an earlier, interrupted run of
this execution finished (:func:`finished_folds`, read back from
``<execution>/folds/``), then the others, up to ``resources.concurrent_folds``
at once, each kept there before it is yielded. A fold's search runs in the
driver (Ray Tune); its training and test in a Ray task (:func:`train_and_test`).
While folds train, their per-epoch records reach ``on_epochs`` (:mod:`.live`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow.fs
import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from study.config import ResourcesConfig, TrainConfig
from study.data.cache import CachedVolumes
from study.data.splits import OuterFold
from study.errors import StudyError
from study.runtime import Precision, worker_device
from study.state import Study
from study.storage import join, replace_atomically
from study.training.calibration import Calibration
from study.training.checkpoint import Progress, load_model, network_class, read_checkpoint
from study.training.folds import FoldJob, FoldResult
from study.training.live import LIVE_POLL_S, LiveFiles, OnEpochs
from study.training.loop import TrainingData, predict_log_odds
from study.training.metrics import classification_metrics, regression_metrics
from study.training.trainer import TrainingSetup, fit


class OnTrial(Protocol):
    """A search trial's event, as it happens: ``start``, ``result`` (an epoch), ``complete`` or ``error``."""

    def __call__(self, fold: int, event: str, trial_id: str, params: dict, result: dict) -> None: ...


def cross_validate(
    study: Study, on_epochs: OnEpochs | None = None, on_trial: OnTrial | None = None
) -> Iterator[FoldResult]:
    """Search (if configured), train and test every outer fold; yield each result as it is ready.

    Folds finished by an earlier, interrupted run of this execution come first,
    without training. Every fold trains on its training side only (a search and
    early stopping see its first inner split), so no held-out subject influences
    training or model selection.

    Parameters
    ----------
    study : Study
        The execution: its folds, cache, config and where checkpoints go.
    on_epochs : OnEpochs, optional
        Each training fold's new per-epoch records, at most ``LIVE_POLL_S`` late.
    on_trial : OnTrial, optional
        Each search trial's events (see :func:`study.training.search.search_fold`).
    """
    finished = finished_folds(study)
    yield from finished
    done = {result.fold for result in finished}
    queue = [fold for fold in study.folds if fold.fold not in done]
    live = LiveFiles(study.directory / "live")
    pending: dict[ray.ObjectRef, int] = {}  # a training in flight -> its fold
    task = driving_task(train_and_test)
    try:
        while queue or pending:
            while queue and len(pending) < study.config.resources.concurrent_folds:
                job = _fold_job(study, queue.pop(0), live, on_epochs, on_trial)
                pending[task.remote(job, *_training_place(study, job.fold, live))] = job.fold
            yield _next_finished(study, pending, live, on_epochs)
    finally:  # a failed fold or Ctrl-C stops the trainings in flight; else they ran on until the driver exits
        for ref in pending:
            ray.cancel(ref, force=True)


def finished_folds(study: Study) -> list[FoldResult]:
    """The folds an earlier run of this execution finished, from ``<execution>/folds/``, by fold.

    A fold whose checkpoint names another network than the config is refused: loading it would import code the
    config does not name.
    """
    folder = study.directory / "folds"
    folder.mkdir(exist_ok=True)
    expected = getattr(study.config.model, "factory", None)
    results = []
    for path in sorted(folder.glob("fold*.json")):
        result = FoldResult.from_json(path.read_text(), pyarrow.fs.FileSystem.from_uri(study.storage)[0])
        if (found := network_class(result.checkpoint)) != expected:
            raise StudyError(
                f"{path}: its checkpoint's network is {found or 'the study CNN'}, the config's "
                f"{expected or 'the study CNN'}: loading it would import code the config does not name. Move this "
                "execution aside, or run with --restart"
            )
        results.append(result)
    return results


def _fold_job(
    study: Study, fold: OuterFold, live: LiveFiles, on_epochs: OnEpochs | None, on_trial: OnTrial | None
) -> FoldJob:
    """What ``fold`` trains: the config's setup, or the best of its search (run now, in this process, while the
    folds already training keep their curves live)."""
    from study.training.search import search_fold  # Ray Tune and Optuna only where a search runs

    config = study.config
    data = training_data(study, fold.fold, fold.validation.train, fold.validation.test, fold.train)
    base, search, started = TrainingSetup(config.model, config.train), None, time.perf_counter()
    if config.search:
        audit_root = study.directory / "audit" / f"fold{fold.fold}_search" if study.audit else None
        trial_events = functools.partial(on_trial, fold.fold) if on_trial else None
        with live.delivered(on_epochs):
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
    setup = base.with_params(search.best) if search else base
    test_labels = study.labels(fold.test)
    seconds = time.perf_counter() - started if search else 0.0
    return FoldJob(fold.fold, setup, data, fold.test, test_labels, study.cohort.target, search, seconds)


def _training_place(study: Study, fold: int, live: LiveFiles) -> tuple[str, ResourcesConfig, Path | None, Path]:
    """Where a fold's training runs and writes: its Ray storage, resources, audit folder and live file."""
    audit_dir = study.directory / "audit" / f"fold{fold}" if study.audit else None
    if audit_dir:
        audit_dir.mkdir(parents=True, exist_ok=True)
    return join(study.storage, "train"), study.config.resources, audit_dir, live.start(fold)


def _next_finished(
    study: Study, pending: dict[ray.ObjectRef, int], live: LiveFiles, on_epochs: OnEpochs | None
) -> FoldResult:
    """Wait for the next fold to finish, handing on the training folds' new epochs meanwhile; keep its result."""
    ready = []
    while not ready:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=LIVE_POLL_S)
        if on_epochs:
            for fold, records in live.new_records().items():
                on_epochs(fold, records)
    fold = pending.pop(ready[0])
    live.stop(fold)  # its last lines were read above, after it finished
    try:
        result: FoldResult = ray.get(ready[0])
    except ray.exceptions.RayError as err:
        raise StudyError(_failure_message(fold, err, study.config.resources.max_failures)) from None
    path = study.directory / "folds" / f"fold{result.fold}.json"
    replace_atomically(path, lambda tmp: tmp.write_text(result.to_json()))
    return result


def training_data(
    study: Study, fold: int, train_ids: list[str], val_ids: list[str], refit_ids: list[str] | None = None
) -> TrainingData:
    """The labelled subjects of one training in outer fold ``fold``: a selection split and, optionally, the final
    fit's subjects; their volumes as the fold reads them (:meth:`~study.state.Study.fold_cache`).

    A regression target's values are standardized by the mean and sd of the fold's training subjects (the final
    fit's, else the selection's): never by a held-out subject's.
    """
    refit_ids = refit_ids or []
    labels, standardization = study.labels, None
    if study.cohort.target.kind == "regression":
        standardization = Calibration.standardizing(study.labels(refit_ids or train_ids + val_ids))

        def labels(ids: list[str]) -> np.ndarray:
            return standardization.standardized(study.labels(ids))

    return TrainingData(
        study.fold_cache(fold),
        train_ids,
        labels(train_ids),
        val_ids,
        labels(val_ids),
        refit_ids,
        labels(refit_ids),
        standardization,
        study.cohort.target.outputs,
    )


def train_and_test(
    job: FoldJob,
    storage_path: str,
    resources: ResourcesConfig,
    audit_dir: Path | None = None,
    live_path: Path | None = None,
) -> FoldResult:
    """Train the fold's setup as its ``final_fit`` says, then test it on the held-out subjects (a Ray task).

    ``job.data`` holds the fold's first inner split and all of its training subjects (see :func:`_final_fit`).
    The held-out probabilities are the model's, calibrated as ``train.calibration`` says (a regression target's
    values: the model's outputs in the target's unit).
    """
    started, setup, search = time.perf_counter(), job.setup, job.search
    data, refit_epochs = _final_fit(job)
    name = f"fold{job.fold}"
    checkpoint = fit(setup, data, name, storage_path, resources, audit_dir, None, refit_epochs, live_path).checkpoint
    progress = Progress.from_dict(read_checkpoint(checkpoint))
    history = pd.DataFrame(progress.history)
    selected_by_search = search is not None and setup.train.final_fit == "early_stopped"
    if selected_by_search:
        history = pd.concat([search.best_trial.history.assign(phase="select"), history], ignore_index=True)
    fitted = time.perf_counter()
    test_set = CachedVolumes(data.cache, job.test_ids, job.test_labels)
    log_odds = ray.get(predict_task(resources).remote(checkpoint, test_set, setup.train))
    calibration = Calibration.from_dict(progress.calibration)
    regression = job.target.kind == "regression"
    p = calibration.values(log_odds) if regression else calibration.probabilities(log_odds)
    trained_here = history[history["phase"] != "select"] if selected_by_search else history
    training = float(trained_here.filter(like="epoch_seconds").sum().sum())
    seconds = ({"search": job.search_seconds} if search else {}) | {
        "training": training,
        "Ray Train set-up": max(fitted - started - training, 0.0),
        "testing": time.perf_counter() - fitted,
    }
    predictions = job.target.predictions(job.test_ids, job.test_labels, p, log_odds)
    metrics = (regression_metrics if regression else classification_metrics)(job.test_labels, p)
    return FoldResult(job.fold, setup, history, checkpoint, metrics, predictions, seconds, search, calibration)


def _final_fit(job: FoldJob) -> tuple[TrainingData, int | None]:
    """What the fold's final training gets, as ``train.final_fit`` and ``train.calibration`` say: its subjects
    (with the inner split, when it selects, or calibrates by ``temperature`` or ``platt``) and the refit's epochs
    (None: early stopping chooses).

    After a search, the best trial already made any selection on the inner split: what is left is the training on
    all subjects (or, for ``inner_split``, the best setup trained again on the inner split).
    """
    train, data = job.setup.train, job.data
    calibrated = data if train.calibration in ("temperature", "platt") else data.refit_only()
    if train.final_fit == "all_subjects":
        return calibrated, train.epochs
    if train.final_fit == "inner_split":
        return data.selection_only(), None
    if job.search is not None:  # early_stopped: the search's best trial chose the epochs
        return calibrated, job.search.best_epoch + 1
    return data, None


def predict_task(resources: ResourcesConfig) -> ray.remote_function.RemoteFunction:
    """The Ray task that tests a fold's model, on a training worker's share of a node.

    Its GPUs are given to ``ray.remote`` itself, which then ends the task's process after it (max_calls 1):
    through ``.options()`` the process would keep its CUDA context and its GPU for the next task it runs.
    """
    gpus = resources.gpus_per_worker if resources.use_gpu else 0
    return ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=gpus)(_predict_checkpoint)


def _predict_checkpoint(checkpoint: ray.train.Checkpoint, dataset: CachedVolumes, train: TrainConfig) -> np.ndarray:
    """The log-odds of class 1 of the checkpoint's model for every subject of ``dataset``."""
    precision = Precision.choose(worker_device(), train.precision, train.channels_last)
    return predict_log_odds(precision.model(load_model(checkpoint)), dataset, train.batch_size, precision)


def driving_task(function: Callable) -> Any:
    """``function`` as a Ray task that only drives a training: no resources of its own, on the driver's node.

    A task holding no resources would look idle to an autoscaler, which could remove its node mid-training; the
    driver's node (the head in a job) is never scaled away.
    """
    return ray.remote(num_cpus=0)(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
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
