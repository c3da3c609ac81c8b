"""Architecture search inside one outer fold: Ray Tune + Optuna (TPE), ASHA early stopping.

The YAML search space becomes an Optuna define-by-run space (conditionals
included). Each trial is a Tune function that trains with a Ray Train
``TorchTrainer`` on the fold's first inner split (Train V2: the trainer is
built inside the trial and reports to Tune through ``TuneReportCallback``).
A search interrupted at any point resumes with ``Tuner.restore``: finished
trials are kept and the Optuna sampler keeps its history.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.config import SearchConfig, SearchDimension, StudyConfig, split_params
from study.crossval import fit
from study.storage import join
from study.train import TrainingData

_CONDITION = re.compile(r"^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")
_OPERATORS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
              ">": operator.gt, "<": operator.lt}


@dataclass
class Trial:
    """One finished (or stopped, or failed) trial of a search."""

    trial_id: str
    params: dict[str, Any]
    history: pd.DataFrame
    status: str  # completed | stopped_early | errored
    score: float


def _holds(condition: str, sampled: dict[str, Any]) -> bool:
    match = _CONDITION.match(condition)
    if match is None:
        raise ValueError(f"search condition {condition!r}: expected 'KEY OP VALUE', e.g. 'blocks > 2'")
    key, op, raw = match.groups()
    return key in sampled and _OPERATORS[op](sampled[key], yaml.safe_load(raw))


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

    def __init__(self, search: SearchConfig):
        self.space = search.space

    def __call__(self, trial: optuna.Trial) -> None:
        sampled: dict[str, Any] = {}
        for key, dim in self.space.items():
            if dim.when is None or _holds(dim.when, sampled):
                sampled[key] = _suggest(trial, key, dim)


def _run_trial(params: dict[str, Any], study: StudyConfig, data: TrainingData, storage: str,
               audit_root: Path | None) -> None:
    trial_id = tune.get_context().get_trial_id()
    arch, train = split_params(params)
    audit = None
    if audit_root is not None:
        audit = audit_root / trial_id
        audit.mkdir(parents=True, exist_ok=True)
    fit(study, {**study.model.arch(), **arch}, data, f"trial_{trial_id}", storage, train_overrides=train,
        audit_dir=audit, callbacks=[TuneReportCallback()])


def _tuner(config: StudyConfig, data: TrainingData, storage: str, name: str, audit_root: Path | None,
           seed: int) -> tune.Tuner:
    search = config.search
    path = join(storage, name)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, study=config, data=data, storage=join(path, "trainings"),
                             audit_root=audit_root),
        {"CPU": 0.01},  # the trial only drives its TorchTrainer, whose workers hold the resources
    )
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    sampler = optuna.samplers.TPESampler(seed=seed)
    searcher = ConcurrencyLimiter(
        OptunaSearch(space=DefineByRun(search), metric=search.metric, mode=search.mode, sampler=sampler),
        max_concurrent=search.max_concurrent,
    )
    scheduler = (ASHAScheduler(max_t=config.train.epochs, grace_period=search.grace_period)
                 if search.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=search.num_samples,
                                    metric=search.metric, mode=search.mode),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
    )


def _trial_id(result: tune.Result) -> str:
    """Tune's id of a trial (also for failed trials, which reported no metrics)."""
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)


def search_fold(config: StudyConfig, data: TrainingData, storage: str, fold: int,
                audit_root: Path | None = None) -> tuple[dict[str, Any], list[Trial]]:
    """Search one outer fold in Ray ``storage`` (resuming it if interrupted).

    Returns the best sampled params and every trial.
    """
    search = config.search
    # Ctrl-C must stop the study. Tune's own handler would end the search early and return, and the
    # study would go on with a partial search; the interrupted search resumes from its saved state.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    results = _tuner(config, data, storage, f"fold{fold}", audit_root, seed=search.seed + fold).fit()
    trials = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        if result.error is not None or history.empty:
            status, score = "errored", float("nan")
        else:
            status = "completed" if len(history) >= config.train.epochs else "stopped_early"
            column = history[search.metric]
            score = float(column.min() if search.mode == "min" else column.max())
        trials.append(Trial(_trial_id(result), dict(result.config), history, status, score))
    scored = [t for t in trials if t.status != "errored"]
    if not scored:
        raise RuntimeError(f"every trial of the search in {join(storage, f'fold{fold}')} failed; "
                           "see the Tune logs there")
    best = (min if search.mode == "min" else max)(scored, key=lambda t: t.score)
    return best.params, trials
