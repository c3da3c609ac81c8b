"""Architecture search inside one outer fold: Ray Tune + Optuna (TPE), ASHA early stopping.

The YAML search space becomes an Optuna define-by-run space (conditionals
included). Each trial is a Tune function that trains with a Ray Train
``TorchTrainer`` on the fold's first inner split (Train V2: the trainer is
built inside the trial and reports to Tune through ``TuneReportCallback``).
A search interrupted at any point resumes with ``Tuner.restore``: finished
trials are kept and the Optuna sampler keeps its history.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.config import ResourcesConfig, SearchConfig, SearchDimension
from study.errors import StudyError
from study.runtime import environment
from study.storage import join
from study.training.loop import TrainingData
from study.training.trainer import TrainingSetup, fit
from study.training.trials import SearchResult, Trial, TrialEvents


def _suggest(trial: optuna.Trial, key: str, dim: SearchDimension) -> Any:
    if dim.choice is not None:
        return trial.suggest_categorical(key, dim.choice)
    if dim.uniform is not None:
        return trial.suggest_float(key, *dim.uniform)
    if dim.loguniform is not None:
        return trial.suggest_float(key, *dim.loguniform, log=True)
    return trial.suggest_int(key, *dim.int_range)


class DefineByRun:
    """The search space as an Optuna define-by-run function (keys in YAML order).

    A class rather than a closure: Tune pickles the searcher with its state.
    """

    def __init__(self, space: dict[str, SearchDimension]):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        sampled: dict[str, Any] = {}
        for key, dim in self.space.items():
            condition = dim.condition
            if condition is None or condition.holds(sampled):
                sampled[key] = _suggest(trial, key, dim)


# A search's listener of trial events, by search: Tune pickles its callbacks with its state, so the
# callback keeps only this key and a restored search reaches the listener of the driver that restores it.
_TRIAL_LISTENERS: dict[str, Callable[[str, str, dict, dict], None]] = {}


class _TrialEvents(tune.Callback):
    """Tune's trial events (start, result, complete, error), passed on as they happen; Tune calls it in the driver."""

    def __init__(self, key: str):
        self.key = key

    def _tell(self, event: str, trial, result: dict | None = None) -> None:
        if (listener := _TRIAL_LISTENERS.get(self.key)) is not None:
            listener(event, trial.trial_id, dict(trial.config), result or {})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._tell("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._tell("result", trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._tell("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._tell("error", trial)


def _run_trial(
    params: dict[str, Any],
    base: TrainingSetup,
    data: TrainingData,
    storage: str,
    resources: ResourcesConfig,
    audit_root: Path | None,
) -> None:
    trial_id = tune.get_context().get_trial_id()
    audit = None
    if audit_root is not None:
        audit = audit_root / trial_id
        audit.mkdir(parents=True, exist_ok=True)
    fit(
        base.with_params(params),
        data,
        f"trial_{trial_id}",
        storage,
        resources,
        audit_dir=audit,
        callbacks=[TuneReportCallback()],
    )


def _restorable(path: str) -> bool:
    """True when the search in ``path`` saved its trials, so that ``Tuner.restore`` continues it.

    ``Tuner.can_restore`` only looks for the tuner's own file, written before the
    first trial starts. A search stopped before Tune wrote its experiment state
    has that file and a searcher checkpoint that counts trials it never kept:
    restored, it restarts with fewer trials than configured. Such a search starts
    over in an emptied directory.
    """
    if not tune.Tuner.can_restore(path):
        return False
    filesystem, root = pyarrow.fs.FileSystem.from_uri(path)
    names = [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root))]
    if any(re.fullmatch(r"experiment_state-.*\.json", name) for name in names):
        return True
    filesystem.delete_dir_contents(root)
    return False


def _tuner(
    search: SearchConfig,
    base: TrainingSetup,
    data: TrainingData,
    storage: str,
    name: str,
    resources: ResourcesConfig,
    audit_root: Path | None,
    seed: int,
) -> tune.Tuner:
    path = join(storage, name)
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            base=base,
            data=data,
            storage=join(path, "trainings"),
            resources=resources,
            audit_root=audit_root,
        ),
        {"CPU": 0.01},  # the trial only drives its TorchTrainer, whose workers hold the resources
    )
    if _restorable(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    if audit_root is not None:  # a search that starts over keeps no record of trials it dropped
        shutil.rmtree(audit_root, ignore_errors=True)
    sampler = optuna.samplers.TPESampler(seed=seed)
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=DefineByRun(search.space), metric=search.metric, mode=search.mode, sampler=sampler),
        max_concurrent=search.max_concurrent,
    )
    scheduler = (
        ASHAScheduler(max_t=_most_epochs(search, base), grace_period=search.grace_period)
        if search.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.num_samples,
            metric=search.metric,
            mode=search.mode,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1, callbacks=[_TrialEvents(path)]),
    )


def _most_epochs(search: SearchConfig, base: TrainingSetup) -> int:
    """The longest training a trial may have: the recipe's epochs, or the largest searched ``epochs``."""
    return int(max(search.space["epochs"].values)) if "epochs" in search.space else base.train.epochs


def _trial_id(result: tune.Result) -> str:
    """Tune's id of a trial (also for failed trials, which reported no metrics)."""
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)


def _trial(result: Any, search: SearchConfig, epochs: int) -> Trial:
    """A finished Tune trial (``ray.tune.Result``) as plain data: completed, stopped early (ASHA) or errored, and
    its score under ``search.metric``."""
    history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    if result.error is not None or history.empty:
        status, score = "errored", float("nan")
    else:
        epochs = int(result.config.get("epochs", epochs))
        status = "completed" if len(history) >= epochs else "stopped_early"
        column = history[search.metric]
        score = float(column.min() if search.mode == "min" else column.max())
    return Trial(_trial_id(result), dict(result.config), history, status, score)


def search_fold(
    search: SearchConfig,
    base: TrainingSetup,
    data: TrainingData,
    storage: str,
    fold: int,
    resources: ResourcesConfig,
    audit_root: Path | None = None,
    on_trial: TrialEvents | None = None,
) -> SearchResult:
    """Search one outer fold in Ray ``storage`` (resuming it if interrupted).

    Parameters
    ----------
    search : SearchConfig
        The space, the number of trials, the scheduler and the metric.
    base : TrainingSetup
        The architecture and recipe that sampled keys override.
    data : TrainingData
        The fold's first inner split: the only subjects a trial sees.
    storage : str
        Ray storage (a path or a cloud URI) for the search's state and checkpoints.
    fold : int
        The outer fold; names the search and seeds its sampler.
    resources : ResourcesConfig
        Workers and devices of each trial's training.
    audit_root : Path, optional
        Record which subjects each trial's workers read (tests prove no leak with it).
    on_trial : callable, optional
        ``on_trial(event, trial_id, params, result)`` as trials start, report an
        epoch (``result``), complete or fail (events ``start``, ``result``,
        ``complete``, ``error``).

    Returns
    -------
    SearchResult
        Every trial (completed, stopped early by ASHA, or failed) and the best params.
    """
    # Ctrl-C must stop the study. Tune's own handler would end the search early and return, and the
    # study would go on with a partial search; the interrupted search resumes from its saved state.
    key = join(storage, f"fold{fold}")
    if on_trial is not None:
        _TRIAL_LISTENERS[key] = on_trial
    try:
        with environment(TUNE_DISABLE_SIGINT_HANDLER="1"):
            results = _tuner(
                search, base, data, storage, f"fold{fold}", resources, audit_root, seed=search.seed + fold
            ).fit()
    finally:
        _TRIAL_LISTENERS.pop(key, None)
    trials = [_trial(result, search, base.train.epochs) for result in results]
    scored = [t for t in trials if t.status != "errored"]
    if not scored:
        raise StudyError(
            f"every trial of fold {fold}'s search failed; see the Tune logs in {key}. Finished folds are kept: "
            "mend the cause and run the same command again."
        )
    best = (min if search.mode == "min" else max)(scored, key=lambda t: t.score)
    return SearchResult(search.metric, best.params, trials)
