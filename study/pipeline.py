"""A study from end to end: what ``study run CONFIG`` does, in the README's order.

1. the cohort: checked and preprocessed into the cache;  2. the splits;
3. per outer fold: search (if configured), train on Ray Train, test; a linear
baseline in the same folds, and whether the CNN's result is a finding;
4. attribution maps of every held-out subject;  5. their group analysis and
sanity checks;  6. everything published to MLflow, the report and the console.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from study.attribution.shuffled import start_label_randomization
from study.attribution.stage import explain_study
from study.config import StudyConfig
from study.data.adjustment import check_folds
from study.data.prepare import PreparedCohort, make_or_load_splits, prepare_cohort
from study.errors import StudyError
from study.memory import MemoryEstimate, estimate_memory, memory_problems
from study.output.publish import Publisher
from study.runtime import gpu_memory, interrupts_kept, start_ray, unsatisfiable
from study.state import StageTimes, Study, resume_or_start
from study.storage import join, release_held
from study.training.baseline import BaselineResult, fit_baselines
from study.training.confounds import confound_predictions
from study.training.crossval import cross_validate
from study.training.evaluation import Evaluation, evaluate
from study.training.folds import FoldResult
from study.training.models import build_model
from study.training.multiclass import evaluate_multiclass
from study.training.regression import evaluate_regression


def study_dir(config: StudyConfig) -> Path:
    """Where a study keeps its executions (``<execution>/``: splits, state, folds, maps, report) and ``latest``."""
    return config.output_dir.resolve() / config.name


def open_study(config: StudyConfig, prepared: PreparedCohort, restart: bool = False, audit: bool = False) -> Study:
    """The :class:`Study` of this execution: an unfinished execution resumed, else a new one; its splits."""
    state, directory, resumed = resume_or_start(config, study_dir(config), restart)
    folds = make_or_load_splits(config.cv, prepared.cohort, directory / "splits.json")
    # Each execution has its own Ray storage: a resume finds its checkpoints, a fresh start meets none of old.
    storage = join(config.storage_path, config.name, directory.name) if config.storage_path else str(directory / "ray")
    study = Study(
        config, prepared.cohort, prepared.cache, prepared.excluded, folds, state, resumed, directory, storage, audit
    )
    if config.cv.adjust != "none":  # refused now, not after the first folds have trained
        keep = (config.cv.group_by,) if config.cv.group_by else ()
        check_folds(config.cv.adjust, study.confounds, [(f.train, f.test) for f in folds], keep)
    return study


def _check_resources(config: StudyConfig) -> None:
    """Refuse at once what this Ray can never run, instead of waiting for it forever."""
    resources = config.resources
    if resources.wait_for_nodes:
        return
    problems = [
        unsatisfiable(
            resources.worker_bundle, "a training worker (resources.cpus_per_worker, gpus_per_worker, use_gpu)"
        )
    ]
    if config.attribution is not None and resources.use_gpu:
        problems.append(
            unsatisfiable(
                {"CPU": 1, "GPU": config.attribution.gpus_per_actor},
                "an attribution actor (attribution.gpus_per_actor)",
            )
        )
    problems = [p for p in problems if p]
    if problems:
        raise StudyError(
            "; ".join(problems) + ". Lower the request, set resources.use_gpu=false, or run where "
            "such a node exists (on an autoscaling cluster that adds it: "
            "resources.wait_for_nodes=true)."
        )


def _memory_needs(study: Study) -> MemoryEstimate:
    """What the study will hold in memory; refused at once when this machine cannot (see :mod:`study.memory`)."""
    config = study.config
    attribution, grid = config.attribution, study.cache.grid
    needs = estimate_memory(
        build_model(config.model, grid.shape),
        grid.shape,
        config.train.batch_size,
        attribution.batch_size if attribution else None,
        len(attribution.methods) + 1 if attribution else 1,
        len(study.cohort.subjects),
        int(study.brain.sum()),
        config.resources.use_gpu,
        attribution.gpus_per_actor if attribution else 1.0,
    )
    gpu = gpu_memory() if config.resources.use_gpu else None
    problems = memory_problems(needs, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), gpu)
    if problems:
        raise StudyError(f"{needs.describe()}. Too much: " + "; ".join(problems) + ".")
    return needs


def _check_writable(key: str, folder: Path) -> None:
    """Refuse at once a folder the study could not write, before any work rather than after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StudyError(
            f"cannot write {key} ({folder}): {err.strerror or err}. Fix the permissions, free the "
            f"path, or choose another folder (e.g. --set {key}=...)."
        ) from None


@interrupts_kept()  # a Ctrl-C that lands in a garbage collector's callback stops the study all the same
def run_study(config: StudyConfig, restart: bool = False, audit: bool = False) -> str:
    """Carry out a study, or continue an unfinished execution of it.

    Parameters
    ----------
    config : StudyConfig
        The study (see :func:`study.config.load_config`).
    restart : bool
        Start a new execution even if an unfinished one exists.
    audit : bool
        Record which subjects each training worker read (tests prove there is no leak with it).

    Returns
    -------
    str
        The MLflow run id of the study.

    Notes
    -----
    Each finished fold is saved under the study directory before it is logged,
    so a tracking server that goes away loses nothing: the rerun logs it.
    """
    publisher = Publisher(config)  # fails fast when MLflow is unreachable
    ray_description = start_ray(config.resources.num_cpus)
    _check_resources(config)
    _check_writable("output_dir", config.output_dir)  # a finished cache may be read-only: its writes say so
    times = StageTimes()
    shuffled_fit = None  # the label-randomization check's training, once started
    try:  # the cache stays marked in use (prepare_cohort) until the study ends
        with times.stage("preprocessing"):
            prepared = prepare_cohort(config.cohort, config.preprocess)
        study = open_study(config, prepared, restart, audit)
        needs = _memory_needs(study)
        publisher.start(study, prepared, ray_description, needs.describe())
        with publisher.recording(study):
            results = []
            for result in cross_validate(study, publisher.training(study), publisher.searching(study)):
                times.merge(result.seconds)
                publisher.fold(study, result)
                results.append(result)
                if result.fold == 0 and config.resources.concurrent_folds > 1:  # it trains beside later folds
                    shuffled_fit = start_label_randomization(study, result)
            results.sort(key=lambda r: r.fold)
            if shuffled_fit is None:  # one training at a time: it starts after the folds
                shuffled_fit = start_label_randomization(study, results[0])
            with times.stage("linear baseline"):
                baselines = fit_baselines(study, study.brain)
            evaluation = evaluate_folds(study, results, baselines)
            publisher.classification(study, results, baselines, evaluation)
            publisher.ensemble(study, results)
            if config.attribution is not None:
                attribution = explain_study(study, results, baselines, shuffled_fit, publisher.explaining(study))
                times.merge(attribution.seconds)
                publisher.attribution(study, attribution, evaluation)
            publisher.finish(study, evaluation, times)
        return study.state.parent_run
    finally:
        if shuffled_fit is not None:  # a study that failed stops it; one that finished has its result
            ray.cancel(shuffled_fit, force=True)
        release_held()


def evaluate_folds(study: Study, results: list[FoldResult], baselines: list[BaselineResult]) -> Evaluation:
    """The pooled held-out predictions of the CNN and the baseline, tested (see :mod:`study.training.evaluation`)."""
    cnn = pd.concat([r.predictions.assign(fold=r.fold) for r in results], ignore_index=True)
    linear = pd.concat([b.predictions for b in baselines], ignore_index=True).set_index("subject_id")
    target, ids = study.cohort.target, cnn.subject_id.tolist()
    p = target.prediction
    if target.several:  # each class's probability
        baseline = target.probabilities(linear.loc[cnn.subject_id]) if len(linear) else None
        folds, seed = cnn.fold.to_numpy(), study.config.cv.seed
        return evaluate_multiclass(study.labels(ids), target.probabilities(cnn), folds, baseline, seed=seed)
    baseline = linear.loc[cnn.subject_id, p].to_numpy() if len(linear) else None
    if target.kind == "regression":
        folds = cnn.fold.to_numpy()
        return evaluate_regression(study.labels(ids), cnn[p].to_numpy(), folds, baseline, seed=study.config.cv.seed)
    volumes = study.cache.brain_volumes_ml()
    confounds, alone = None, None
    if study.cohort.confounds:  # a model of the confounds alone, in the same folds
        confounds, labels = study.cohort.confound_table(ids), study.labels(ids)
        row = {s: i for i, s in enumerate(ids)}
        folds = [
            (np.array([row[s] for s in study.folds[r.fold].train]), np.flatnonzero(cnn.fold.to_numpy() == r.fold))
            for r in results
        ]
        alone = confound_predictions(confounds, labels, folds)
    return evaluate(
        study.labels(ids),
        cnn[p].to_numpy(),
        cnn.fold.to_numpy(),
        baseline,
        np.array([volumes[s] for s in cnn.subject_id]),
        seed=study.config.cv.seed,
        confounds=confounds,
        confounds_alone=alone,
    )
