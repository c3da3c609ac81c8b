"""A study from end to end: what ``study run CONFIG`` does.

cohort -> checks -> preprocessing cache -> splits -> per outer fold: train on
Ray Train and test -> cross-fold summary, all tracked in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from study.cache import VolumeCache, build_cache
from study.cohort import Cohort, Problem, load_cohort
from study.config import StudyConfig
from study.crossval import FoldResult, run_outer_fold, training_data
from study.figures import confusion_figure, roc_figure
from study.interpret import Interpretation, interpret_study
from study.parallel import init_ray
from study.report import Report, png_bytes
from study.search import search_fold
from study.splits import OuterFold, load_splits, make_splits, save_splits
from study.storage import join, replace_atomically
from study.tracking import Tracker, TrackingError, is_tracking_failure
from study.train import load_model

SUMMARY_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")


class StudyError(RuntimeError):
    """A study that cannot start or go on; the message says why and what to do."""


@dataclass
class PreparedCohort:
    """The usable subjects, their cache, and the subjects left out (with reasons)."""

    cohort: Cohort
    cache: VolumeCache
    excluded: list[Problem]


def study_dir(config: StudyConfig) -> Path:
    """Where this study keeps its splits, Ray storage and audit files."""
    return config.output_dir.resolve() / config.name


def prepare_cohort(config: StudyConfig) -> PreparedCohort:
    """Load, check and preprocess the cohort; refuse or exclude bad subjects as configured.

    Every problem is reported at once. Subjects preprocessed before a refusal
    stay in the cache, so the rerun after a fix only redoes what changed.
    """
    synthetic = config.cohort.synthetic
    if synthetic is not None and not config.cohort.participants_path.exists():
        from study.synth import synthesize_cohort

        print(f"generating a synthetic cohort of {synthetic.subjects} subjects in {config.cohort.root}")
        synthesize_cohort(config.cohort.root, synthetic.subjects, voxel_size=synthetic.voxel_size,
                          effect_size=synthetic.effect_size, seed=synthetic.seed)
    cohort = load_cohort(config.cohort)
    build = build_cache(cohort, config.preprocess)
    problems = cohort.problems + build.problems
    reused = len(cohort.subjects) - len(build.computed) - len(build.problems)
    print(f"cohort: {len(cohort.subjects)} subjects with images; preprocessed {len(build.computed)}, "
          f"reused {reused} from the cache")
    if problems and config.cohort.on_invalid == "refuse":
        listing = "\n".join(f"  {p}" for p in problems)
        raise StudyError(
            f"{len(problems)} problems in the cohort (subject, file, problem):\n{listing}\n"
            "Fix them and run again (finished subjects stay cached), or set cohort.on_invalid: exclude "
            "to leave these subjects out."
        )
    if build.cache is None:
        raise StudyError("no subject could be preprocessed; see the problems above")
    cached = set(build.cache.subject_ids)
    usable = Cohort([s for s in cohort.subjects if s.subject_id in cached])
    for problem in problems:
        print(f"excluded: {problem}")
    return PreparedCohort(usable, build.cache, problems)


def make_or_load_splits(config: StudyConfig, cohort: Cohort) -> list[OuterFold]:
    """The study's splits: reused from ``splits.json`` when made for this very cohort."""
    path = study_dir(config) / "splits.json"
    fingerprint = cohort.fingerprint()
    if path.exists():
        saved_for, folds = load_splits(path)
        if saved_for == fingerprint and len(folds) == config.cv.outer_folds:
            return folds
    families = [s.family_id for s in cohort.subjects]
    folds = make_splits(cohort.ids, cohort.labels, families, config.cv.outer_folds, config.cv.inner_folds,
                        config.cv.seed)
    save_splits(folds, path, fingerprint)
    return folds


def _log_fold(tracker: Tracker, run_id: str, result: FoldResult, cache: VolumeCache) -> None:
    tracker.log_history(run_id, result.history)
    tracker.log_metrics(run_id, result.test_metrics, prefix="test_")
    tracker.log_table(run_id, result.predictions, "predictions.tsv")
    tracker.log_figure(run_id, roc_figure({f"fold {result.fold}": (result.labels, result.predictions["p_male"])},
                                          f"ROC, fold {result.fold}"), "roc.png")
    tracker.log_figure(run_id, confusion_figure(result.test_metrics, f"fold {result.fold}"), "confusion.png")
    tracker.log_model(run_id, load_model(result.checkpoint), cache.shape)


def _summary(results: list[FoldResult]) -> dict[str, float]:
    summary = {}
    for name in SUMMARY_METRICS:
        values = np.array([r.test_metrics[name] for r in results])
        summary[f"test_{name}_mean"] = float(np.nanmean(values))
        summary[f"test_{name}_std"] = float(np.nanstd(values))
    return summary


def _print_table(results: list[FoldResult], summary: dict[str, float]) -> None:
    header = f"{'fold':>6} " + " ".join(f"{m:>18}" for m in SUMMARY_METRICS)
    print(header)
    for r in results:  # sorted by fold
        print(f"{r.fold:>6} " + " ".join(f"{r.test_metrics[m]:>18.3f}" for m in SUMMARY_METRICS))
    print(f"{'all':>6} " + " ".join(
        f"{summary[f'test_{m}_mean']:>10.3f} ± {summary[f'test_{m}_std']:.3f}" for m in SUMMARY_METRICS))


@dataclass
class StudyState:
    """What a study execution has done so far, kept in ``<study dir>/state.json``.

    A rerun of the same config continues an unfinished execution: its MLflow
    runs are reused, finished folds (pickled in ``folds/``) are not redone and
    searches resume from their Tune state.
    """

    config_hash: str
    parent_run: str
    fold_runs: dict[str, str]
    logged_folds: list[int] = field(default_factory=list)  # folds whose results MLflow has
    finished: bool = False

    @staticmethod
    def path(directory: Path) -> Path:
        return directory / "state.json"

    def save(self, directory: Path) -> None:
        replace_atomically(self.path(directory), lambda tmp: tmp.write_text(json.dumps(vars(self), indent=1)))


def config_hash(config: StudyConfig) -> str:
    """Hash of everything that changes results (not resources nor where they are stored or tracked)."""
    dumped = config.model_dump_json(exclude={"resources", "tracking", "storage_path"})
    return hashlib.sha1(dumped.encode()).hexdigest()[:12]


def _resume_or_start(config: StudyConfig, tracker: Tracker, cohort: Cohort, directory: Path,
                     restart: bool) -> StudyState:
    path = StudyState.path(directory)
    if path.exists() and not restart:
        state = StudyState(**json.loads(path.read_text()))
        if state.config_hash == config_hash(config) and not state.finished:
            tracker.reopen(state.parent_run)
            print(f"resuming study {config.name} (MLflow run {state.parent_run})")
            return state
    for part in ("folds", "ray", "audit", "maps"):  # a fresh execution keeps nothing of the last
        shutil.rmtree(directory / part, ignore_errors=True)
    state = StudyState(config_hash(config), tracker.start_study(config, cohort.fingerprint()), {})
    state.save(directory)
    return state


def _fold_run(tracker: Tracker, state: StudyState, fold: OuterFold, directory: Path) -> str:
    key = str(fold.fold)
    if key not in state.fold_runs:
        run_id = tracker.start_child(state.parent_run, f"fold {fold.fold}",
                                     {"study.level": "fold", "study.fold": key})
        tracker.log_params(run_id, {"fold": fold.fold, "n_train": len(fold.validation.train),
                                    "n_validation": len(fold.validation.test), "n_test": len(fold.test)})
        state.fold_runs[key] = run_id
        state.save(directory)
    else:
        tracker.reopen(state.fold_runs[key])
    return state.fold_runs[key]


def ray_storage(config: StudyConfig, state: StudyState) -> str:
    """Ray storage of this execution (a path or a cloud URI), named after its MLflow run.

    A resumed execution finds its checkpoints and searches there again; a fresh
    one never meets those of an earlier execution.
    """
    if config.storage_path:
        return join(config.storage_path, config.name, state.parent_run)
    return join(study_dir(config) / "ray", state.parent_run)


def _search(config: StudyConfig, fold: OuterFold, cohort: Cohort, cache: VolumeCache, tracker: Tracker,
            run_id: str, directory: Path, storage: str, audit: bool) -> dict:
    """Search fold ``fold`` (resuming if interrupted), log its trials, return the best params."""
    data = training_data(cohort, cache, fold.validation.train, fold.validation.test)
    audit_root = directory / "audit" / f"fold{fold.fold}_search" if audit else None
    best, trials = search_fold(config, data, join(storage, "search"), fold.fold, audit_root)
    tracker.log_trials(run_id, trials, config.search.metric)
    tracker.log_params(run_id, {"best": best})
    tracker.log_metrics(run_id, {f"search_best_{config.search.metric}":
                                 next(t.score for t in trials if t.params == best)})
    print(f"fold {fold.fold}: searched {len(trials)} trials; best {best}")
    return best


def _record_fold(tracker: Tracker, state: StudyState, run_id: str, result: FoldResult, cache: VolumeCache,
                 directory: Path) -> None:
    """Log a finished fold to MLflow, end its run, and note it as logged in the state."""
    _log_fold(tracker, run_id, result, cache)
    tracker.end(run_id)
    state.logged_folds.append(result.fold)
    state.save(directory)


def run_study(config: StudyConfig, audit: bool = False, restart: bool = False) -> str:
    """Carry out the study (or continue an unfinished one); returns the study's MLflow run id.

    Each finished fold is saved under the study directory before it is logged,
    so a tracking server that goes away loses nothing: the rerun logs it.
    ``audit`` records which subjects each training worker read (under the
    study directory's ``audit/``), so that tests can prove there is no leak;
    ``restart`` starts afresh even if an unfinished execution exists.
    """
    tracker = Tracker(config)  # fails fast when MLflow is unreachable
    init_ray(config.resources.num_cpus)
    prepared = prepare_cohort(config)
    cohort, cache = prepared.cohort, prepared.cache
    folds = make_or_load_splits(config, cohort)
    directory = study_dir(config)
    state = _resume_or_start(config, tracker, cohort, directory, restart)
    parent, storage = state.parent_run, ray_storage(config, state)
    finished = directory / "folds"
    finished.mkdir(exist_ok=True)
    results = [pickle.loads(p.read_bytes()) for p in sorted(finished.glob("fold*.pkl"))]
    try:
        tracker.log_file(parent, directory / "splits.json")
        if prepared.excluded:
            tracker.log_table(parent, pd.DataFrame([vars(p) for p in prepared.excluded]), "excluded_subjects.tsv")
        tracker.log_metrics(parent, {"n_subjects": len(cohort.subjects), "n_male": int(cohort.labels.sum()),
                                     "n_excluded": len(prepared.excluded)})
        for result in results:
            if result.fold not in state.logged_folds:  # computed while MLflow was away
                _record_fold(tracker, state, state.fold_runs[str(result.fold)], result, cache, directory)
        print(f"study {config.name}: {len(cohort.subjects)} subjects, {len(folds)} outer folds "
              f"({len(results)} already done); MLflow run {parent} at {tracker.uri}; Ray storage {storage}")
        _train_folds(config, folds, cohort, cache, tracker, state, directory, storage, audit, results)
        results.sort(key=lambda r: r.fold)
        summary = _summary(results)
        tracker.log_metrics(parent, summary)
        predictions = pd.concat([r.predictions.assign(fold=r.fold) for r in results])
        tracker.log_table(parent, predictions, "predictions.tsv")
        curves = {f"fold {r.fold}": (r.labels, r.predictions["p_male"]) for r in results}
        roc = roc_figure(curves, "ROC per outer fold")
        tracker.log_figure(parent, roc, "roc.png")
        _print_table(results, summary)
        report = _classification_report(config, cohort, results, summary, parent, roc)
        if config.search:
            chosen = _chosen_architectures(tracker, state)
            tracker.log_table(parent, chosen, "search_best_configs.tsv")
            report.add_table("Architecture search: the best configuration of each outer fold", chosen,
                             "Each fold searched on its own training subjects only; stable choices across folds "
                             "mean the architecture does not depend on which subjects were held out.")
        fold_runs = {int(k): v for k, v in state.fold_runs.items()}
        if config.attribution is not None:
            interpretation = interpret_study(config, results, folds, cohort, cache, tracker, parent, fold_runs,
                                             directory, storage, report)
            _print_interpretation(interpretation)
        report_path = directory / "report.html"
        report_path.write_text(report.html())
        tracker.log_file(parent, report_path)
        tracker.set_tags(parent, {"mlflow.note.content": _run_description(config, cohort, summary)})
    except BaseException as err:
        if is_tracking_failure(err):
            raise TrackingError(
                f"MLflow at {tracker.uri} stopped answering or refused a request: {err}\n"
                f"Nothing computed is lost: finished folds are in {finished}, checkpoints in {storage}, "
                f"maps in {directory / 'maps'}. Start the tracking server again and rerun the same command: "
                "the study logs what it has and goes on."
            ) from err
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        for fold, run_id in state.fold_runs.items():
            if int(fold) not in state.logged_folds:
                tracker.end(run_id, status)
        tracker.end(parent, status)
        raise
    tracker.end(parent)
    state.finished = True
    state.save(directory)
    print(f"report: {report_path}")
    print(f"MLflow: run {parent}; {tracker.run_url(parent)}")
    return parent


def _train_folds(config: StudyConfig, folds: list[OuterFold], cohort: Cohort, cache: VolumeCache,
                 tracker: Tracker, state: StudyState, directory: Path, storage: str, audit: bool,
                 results: list[FoldResult]) -> None:
    """Search (if configured), train and test every outer fold not in ``results``; append them.

    Up to ``resources.concurrent_folds`` folds train at once, each a Ray task
    driving its own TorchTrainer; each result is saved, then logged.
    """
    fold_task = ray.remote(num_cpus=0)(run_outer_fold)
    pending: dict[ray.ObjectRef, tuple[OuterFold, str, float]] = {}
    done = {r.fold for r in results}
    queue = [f for f in folds if f.fold not in done]
    while queue or pending:
        while queue and len(pending) < config.resources.concurrent_folds:
            fold = queue.pop(0)
            run_id = _fold_run(tracker, state, fold, directory)
            started = time.time()
            params = _search(config, fold, cohort, cache, tracker, run_id, directory, storage, audit) \
                if config.search else None
            audit_dir = directory / "audit" / f"fold{fold.fold}" if audit else None
            if audit_dir:
                audit_dir.mkdir(parents=True, exist_ok=True)
            ref = fold_task.remote(config, fold, cohort, cache, join(storage, "train"), audit_dir, params)
            pending[ref] = (fold, run_id, started)
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        fold, run_id, started = pending.pop(ready)
        result: FoldResult = ray.get(ready)
        replace_atomically(directory / "folds" / f"fold{fold.fold}.pkl",
                           lambda tmp: tmp.write_bytes(pickle.dumps(result)))
        results.append(result)
        _record_fold(tracker, state, run_id, result, cache, directory)
        m = result.test_metrics
        print(f"fold {fold.fold} ({len(results)}/{len(folds)} done): {len(result.history)} epochs, test ROC AUC "
              f"{m['roc_auc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} "
              f"[{time.time() - started:.0f} s]")


def _chosen_architectures(tracker: Tracker, state: StudyState) -> pd.DataFrame:
    """One row per fold: the best searched params (from the fold runs' ``best.*`` params)."""
    rows = []
    for fold, run_id in sorted(state.fold_runs.items(), key=lambda kv: int(kv[0])):
        params = tracker.client.get_run(run_id).data.params
        rows.append({"fold": int(fold), **{k[5:]: v for k, v in sorted(params.items()) if k.startswith("best.")}})
    return pd.DataFrame(rows)


def _classification_report(config: StudyConfig, cohort: Cohort, results: list[FoldResult],
                           summary: dict[str, float], parent: str, roc) -> Report:
    report = Report(f"study {config.name}: sex classification from T1w MRI")
    report.summary = [
        ("subjects", f"{len(cohort.subjects)} ({int(cohort.labels.sum())} male)"),
        ("outer folds", str(len(results))),
        ("test ROC AUC", f"{summary['test_roc_auc_mean']:.3f} ± {summary['test_roc_auc_std']:.3f}"),
        ("balanced accuracy", f"{summary['test_balanced_accuracy_mean']:.3f} ± {summary['test_balanced_accuracy_std']:.3f}"),
        ("MLflow run", parent[:12]),
    ]
    table = pd.DataFrame([{"fold": r.fold, "test subjects": len(r.predictions), "epochs": len(r.history),
                           **{m: r.test_metrics[m] for m in SUMMARY_METRICS}} for r in results])
    report.add_table("Held-out test metrics per outer fold", table,
                     "Each fold's model was selected on an inner validation split and tested once on its held-out subjects.")
    report.add_images("ROC curves", [("ROC per outer fold (male = positive)", png_bytes(roc))])
    return report


def _run_description(config: StudyConfig, cohort: Cohort, summary: dict[str, float]) -> str:
    """The study run's description in the MLflow UI (markdown)."""
    return (f"**{config.name}**: {len(cohort.subjects)} subjects, {config.cv.outer_folds}-fold CV, "
            f"test ROC AUC {summary['test_roc_auc_mean']:.3f} ± {summary['test_roc_auc_std']:.3f}.\n\n"
            "Open `report.html` under Artifacts for the maps, method agreement and sanity checks; "
            "expand this run to see one child run per outer fold.")


def _print_interpretation(interpretation: Interpretation) -> None:
    print("method agreement (Spearman, mean over subjects):")
    for row in interpretation.agreement.itertuples():
        print(f"  {row.method_a:>16} ~ {row.method_b:<16} {row.spearman_subject_mean:.3f}")
    if len(interpretation.localization):
        print("localization of the planted effect (voxel ROC AUC of the group map):")
        for row in interpretation.localization.itertuples():
            print(f"  {row.method:>16} {row.roc_auc_group:.3f}")
    print(f"sanity checks: flagged methods: {', '.join(interpretation.flagged) or 'none'}")
