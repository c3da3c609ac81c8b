"""The one place that publishes a study: MLflow runs, the HTML report and the console.

The stages compute and return values; a :class:`Publisher` turns each into
what researchers read: the MLflow run tree (study > fold > trial) with params,
curves, metrics, tables, NIfTI maps, figures and models; the sections of
``report.html``; and the lines printed on the console. It also records in the
study's state which results MLflow has, so that a study interrupted by a lost
tracking server logs the rest when it is run again.
"""

from __future__ import annotations

import getpass
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from study.attribution import METHODS
from study.attribution.analysis import LINEAR_BASELINE, AttributionResult, explanation_of
from study.attribution.stats import PermutationTest
from study.attribution.sanity import DELETED_SHARE, FLAG_DELETION_P, FLAG_SPEARMAN, RANDOM_BLOB_MM
from study.config import AttributionConfig, StudyConfig
from study.data.cohort import Classes
from study.data.prepare import PreparedCohort
from study.output.figures import agreement_figure, brain_figure, confusion_figure, roc_figure, sanity_figure
from study.output.report import Report
from study.output.tracking import WALL_TIME, Tracker, TrackingError, is_tracking_failure, tracking_uri
from study.predict import Ensemble
from study.state import Study
from study.storage import replace_atomically
from study.training.baseline import BaselineResult
from study.training.crossval import FoldResult
from study.training.evaluation import Evaluation, fit_check, format_p
from study.training.loop import load_model
from study.training.metrics import SUMMARY_METRICS, cross_fold_summary
from study.training.trials import SearchResult

PACKAGES = ("study", "torch", "ray", "mlflow", "optuna", "nibabel", "nilearn", "numpy")
TARGETS = {"contrast": "the {contrast} logit", "true_class": "each subject's true {column}'s logit",
           "predicted_class": "each subject's predicted {column}'s logit"}  # formatted with the study's Classes
TITLES = {**METHODS, LINEAR_BASELINE: "Linear baseline weights"}
TRIAL_METRICS = ("train_", "val_", "best_")  # what a search trial's run shows of each epoch
PHASE_STEPS = {"select": "epoch", "refit": "refit_epoch"}  # a fold's training phases and their step column
FINAL_FITS = {
    "all_subjects": "Each fold's final model trained on all of its training subjects for the configured epochs.",
    "early_stopped": "Each fold chose its number of epochs on its first inner split (early stopping), then trained "
                     "its final model on all of its training subjects for that many epochs.",
    "inner_split": "Each fold's final model is the one chosen on its first inner split (early stopping); it never "
                   "saw that split's validation subjects (one inner fold of the fold's training subjects).",
}


def say(text: str) -> None:
    """A line for the researcher watching the console."""
    print(text, flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in PACKAGES:
        try:
            found[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            found[f"version.{package}"] = "not installed"
    return found


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _source_tags(commit: str) -> dict[str, str]:
    """MLflow's own tags for who ran the study and from what, shown in its run list (User, Source)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a name
        pass
    return tags


def config_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML, as a researcher would write it."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class Publisher:
    """Publishes one execution of a study as its stages return results.

    Parameters
    ----------
    config : StudyConfig
        The study; its ``tracking`` section says where MLflow is. An unreachable
        tracking server fails here, before any work.
    """

    def __init__(self, config: StudyConfig):
        self.config = config
        self.tracker = Tracker(tracking_uri(config.tracking.uri), config.tracking.experiment or config.name)
        self.report = Report(f"study {config.name}: {config.cohort.task.column} classification from T1w MRI")
        self.started = time.perf_counter()
        self.underfit: str | None = None  # what classification found of folds that did not fit their subjects
        for view_id, (name, level, columns, order_by, ascending) in self.views().items():
            self.tracker.save_view(view_id, name, f"tags.`study.level` = '{level}'", columns, order_by, ascending)

    def views(self) -> dict[str, tuple[str, str, list[str], str | None, bool]]:
        """The MLflow UI's saved views of a study's runs: id -> (name, study.level, columns, sort column,
        ascending). Executions newest first; folds and trials as flat lists (by fold; best trial first)."""
        search = self.config.search
        searched = [f"params.{k}" for k in search.space] if search else []
        methods = self.config.attribution.methods if self.config.attribution else []
        return {
            "study-executions": ("study: executions", "study", [
                "tags.study.execution", "tags.study.finding", "metrics.pooled_roc_auc", "metrics.pooled_roc_auc_ci_low",
                "metrics.pooled_roc_auc_ci_high", "metrics.baseline_pooled_roc_auc", "metrics.cnn_minus_baseline_p",
                *[f"metrics.localization_roc_auc_{m}" for m in methods], "tags.study.progress",
                "metrics.time_whole_study_wall_s"], None, False),
            "study-folds": ("study: outer folds", "fold", [
                "tags.study.execution", "tags.study.fold", "metrics.test_roc_auc", "metrics.test_balanced_accuracy",
                "metrics.fit_accuracy", *[f"params.best.{k.removeprefix('params.')}" for k in searched]],
                "tags.study.fold", True),
            "study-trials": ("study: search trials", "trial", [  # ranked by the score the search ranks by
                "tags.study.fold", "tags.study.trial_status", f"metrics.search_{search.metric if search else 'val_loss'}",
                "metrics.best_val_loss", *searched],
                f"metrics.search_{search.metric if search else 'val_loss'}", search is None or search.mode == "min"),
        }

    # -- the run tree ------------------------------------------------------------------------------------------

    def start(self, study: Study, prepared: PreparedCohort, ray_description: str) -> None:
        """Open (or reopen) the study's runs; log the cohort, its exclusions and the splits."""
        config, state, tracker = self.config, study.state, self.tracker
        say(ray_description)
        if prepared.synthesized:
            say(f"generated a synthetic cohort of {config.cohort.synthetic.subjects} subjects in {config.cohort.root}")
        reused = len(prepared.cohort.subjects) - prepared.preprocessed
        say(f"cohort: {len(prepared.cohort.subjects)} subjects with images; preprocessed {prepared.preprocessed}, "
            f"reused {reused} from the cache")
        for problem in prepared.excluded:
            say(f"excluded: {problem}")
        for warning in prepared.cohort.warnings:
            say(f"warning: {warning}")
        if state.parent_run is None:
            commit = _git_commit()
            tags = {"study.name": config.name, "study.cohort": study.cohort.fingerprint(), "study.level": "study",
                    "study.execution": state.execution, "study.directory": str(study.directory), "git.commit": commit, **_versions(), **_source_tags(commit)}
            state.parent_run = tracker.start_run(config.name, tags)
            tracker.log_params(state.parent_run, config.model_dump(mode="json"))
            tracker.log_text(state.parent_run, config_yaml(config), "config.yaml")
        else:
            tracker.reopen(state.parent_run)
            say(f"resuming study {config.name} (MLflow run {state.parent_run})")
        parent = state.parent_run
        for fold in study.folds:
            if fold.fold not in state.fold_runs:
                run_id = tracker.start_run(f"fold {fold.fold}", {"study.level": "fold", "study.fold": str(fold.fold),
                                                                  "study.execution": state.execution}, parent=parent)
                tracker.log_params(run_id, {"fold": fold.fold, "n_train": len(fold.train), "n_test": len(fold.test),
                                            "n_inner_train": len(fold.validation.train),
                                            "n_inner_validation": len(fold.validation.test)})
                state.fold_runs[fold.fold] = run_id
            elif fold.fold not in state.logged_folds:
                tracker.reopen(state.fold_runs[fold.fold])
        study.save_state()
        tracker.log_file(parent, study.directory / "splits.json")
        if prepared.excluded:
            tracker.log_table(parent, pd.DataFrame([vars(p) for p in prepared.excluded]), "excluded_subjects.tsv")
        tracker.log_metrics(parent, {"n_subjects": len(study.cohort.subjects),
                                     f"n_{study.cohort.classes.positive}": int(study.cohort.labels.sum()),
                                     "n_excluded": len(prepared.excluded)})
        done = len(list((study.directory / "folds").glob("fold*.json")))
        say(f"study {config.name}: {len(study.cohort.subjects)} subjects, {len(study.folds)} outer folds "
            f"({done} already done); execution {state.execution} in {study.directory}; MLflow run {parent} at "
            f"{tracker.uri}" + (f"; Ray storage {study.storage}" if config.storage_path else ""))

    def fold(self, study: Study, result: FoldResult) -> None:
        """Log a finished fold (unless MLflow has it already) and end its run."""
        state, tracker = study.state, self.tracker
        for stage, seconds in result.seconds.items():
            study.times.add(stage, seconds)
        if result.fold in state.logged_folds:
            return
        run_id = state.fold_runs[result.fold]
        if result.search is not None:
            self._search(result.fold, run_id, result.search)
        for phase, step in PHASE_STEPS.items():
            rows = result.history[result.history["phase"] == phase].dropna(axis=1, how="all")
            if len(rows):
                tracker.log_history(run_id, rows, step, only_new=True)
        tracker.log_metrics(run_id, result.test_metrics, prefix="test_")
        tracker.log_table(run_id, result.predictions, "predictions.tsv")
        classes = study.cohort.classes
        labels = study.labels(result.predictions.subject_id.tolist())
        tracker.log_figure(run_id, roc_figure({f"fold {result.fold}": (labels, result.predictions[classes.p])},
                                              f"ROC, fold {result.fold}", classes.names), "roc.png")
        tracker.log_figure(run_id, confusion_figure(result.test_metrics, f"fold {result.fold}", classes.names),
                           "confusion.png")
        with study.times.stage("MLflow model logging"):
            tracker.log_model(run_id, load_model(result.checkpoint), study.cache.shape)
        tracker.end(run_id)
        state.logged_folds.append(result.fold)
        study.save_state()
        tracker.set_tags(state.parent_run, {"study.progress": f"{len(state.logged_folds)}/{len(study.folds)} folds done"})
        m = result.test_metrics
        phases = []
        if select := result.epochs("select"):
            phases.append(f"{select} epochs on the inner split")
        if refit := result.epochs("refit"):
            phases.append(f"{refit} epochs on all {len(study.folds[result.fold].train)} training subjects")
        say(f"fold {result.fold} ({len(state.logged_folds)}/{len(study.folds)} done): {' + '.join(phases)}; "
            f"training accuracy {result.fit_accuracy:.2f}; test ROC AUC {m['roc_auc']:.3f}, balanced accuracy "
            f"{m['balanced_accuracy']:.3f} [{sum(result.seconds.values()):.0f} s]")

    def training(self, study: Study):
        """A callback for the cross-validation stage: each fold's new epochs on its run's curves, as they train."""
        def epochs(fold: int, records: list[dict]) -> None:
            history = pd.DataFrame(records)
            try:  # live curves are a view: a tracking hiccup must not stop training (the fold logs them at its end)
                for phase, step in PHASE_STEPS.items():
                    rows = history[history["phase"] == phase] if "phase" in history else history.iloc[:0]
                    if len(rows):
                        self.tracker.log_history(study.state.fold_runs[fold], rows, step, only_new=True)
            except Exception as err:
                if not is_tracking_failure(err):
                    raise
        return epochs

    def explaining(self, study: Study):
        """A callback for the attribution stage: the study run's progress tag, as subjects are explained."""
        def progress(done: int, total: int) -> None:
            try:  # a cosmetic tag: a tracking hiccup must not stop a long attribution stage
                self.tracker.set_tags(study.state.parent_run, {"study.progress": f"{done}/{total} subjects explained"})
            except Exception as err:  # only a tracking failure is swallowed
                if not is_tracking_failure(err):
                    raise
        return progress

    def searching(self, study: Study):
        """A callback for searches: each trial a run under its fold's run when it starts, its curves as it trains."""
        runs: dict[tuple[int, str], str] = {}
        epochs: dict[tuple[int, str], int] = {}

        def event(fold: int, kind: str, trial_id: str, params: dict, result: dict) -> None:
            try:  # live trials are a view: a tracking hiccup must not stop the search (its end logs every trial)
                key = (fold, trial_id)
                if key not in runs:
                    runs[key] = self._trial_run(fold, study.state.fold_runs[fold], trial_id, params)
                if kind == "result" and "epoch" in result:
                    epochs[key] = epochs.get(key, 0) + 1
                    row = {k: v for k, v in result.items() if k == "epoch" or k.startswith(TRIAL_METRICS)}
                    self.tracker.log_history(runs[key], pd.DataFrame([row]), only_new=True)
                elif kind in ("complete", "error"):
                    budget = params.get("epochs", self.config.train.epochs)
                    status = "errored" if kind == "error" else \
                        "completed" if epochs.get(key, 0) >= budget else "stopped_early"
                    self.tracker.set_tags(runs[key], {"study.trial_status": status})
                    self.tracker.end(runs[key], "FAILED" if kind == "error" else "FINISHED")
            except Exception as err:
                if not is_tracking_failure(err):
                    raise
        return event

    def _trial_run(self, fold: int, fold_run: str, trial_id: str, params: dict, runs: list | None = None) -> str:
        """The run of a search trial under its fold's run: found again by its tag, else started."""
        for run in runs if runs is not None else self.tracker.children(fold_run):
            if run.data.tags.get("study.trial") == trial_id:
                return run.info.run_id
        run_id = self.tracker.start_run(f"trial {trial_id}", {
            "study.level": "trial", "study.fold": str(fold), "study.trial": trial_id, "study.trial_status": "running"},
            parent=fold_run)
        self.tracker.log_params(run_id, params)
        return run_id

    def _search(self, fold: int, fold_run: str, search: SearchResult) -> None:
        """Every trial's run complete (curves, status, score; trials whose run has its score are done) and the best."""
        tracker = self.tracker
        children = tracker.children(fold_run)
        done = {r.data.tags.get("study.trial") for r in children if f"search_{search.metric}" in r.data.metrics}
        for trial in search.trials:
            if trial.trial_id in done:
                continue
            run_id = self._trial_run(fold, fold_run, trial.trial_id, trial.params, children)
            if not trial.history.empty:
                tracker.log_history(run_id, trial.history[[c for c in trial.history.columns
                                                           if c.startswith(TRIAL_METRICS) or c in ("epoch", WALL_TIME)]],
                                    only_new=True)
            tracker.set_tags(run_id, {"study.trial_status": trial.status})
            if trial.score == trial.score:  # not NaN
                tracker.log_metrics(run_id, {f"search_{search.metric}": trial.score})
            tracker.end(run_id, "FAILED" if trial.status == "errored" else "FINISHED")
        tracker.log_params(fold_run, {"best": search.best})
        tracker.log_metrics(fold_run, {f"search_best_{search.metric}": search.best_score})
        say(f"searched {len(search.trials)} trials; best {search.best}")

    def classification(self, study: Study, results: list[FoldResult], baselines: list[BaselineResult],
                       evaluation: Evaluation) -> None:
        """The held-out results of the CNN and the linear baseline, and whether they are a finding."""
        parent, tracker, state = study.state.parent_run, self.tracker, study.state
        summary = cross_fold_summary([r.test_metrics for r in results])
        linear = cross_fold_summary([b.test_metrics for b in baselines])
        tracker.log_metrics(parent, summary)
        tracker.log_metrics(parent, {k.replace("test_", "baseline_test_", 1): v for k, v in linear.items()})
        tracker.log_metrics(parent, self._evaluation_metrics(evaluation))
        fit, underfit = fit_check({r.fold: r.fit_accuracy for r in results})
        tracker.set_tags(parent, {"study.finding": evaluation.finding, "study.fit": fit})
        for baseline in baselines:
            if baseline.fold in state.baseline_runs:
                continue
            run_id = tracker.start_run(f"baseline fold {baseline.fold}", {
                "study.level": "baseline", "study.model": "linear", "study.fold": str(baseline.fold)}, parent=parent)
            tracker.log_params(run_id, {"model": "l2 logistic regression", "C": baseline.C, "fold": baseline.fold})
            tracker.log_metrics(run_id, baseline.test_metrics, prefix="test_")
            tracker.log_table(run_id, baseline.predictions, "predictions.tsv")
            tracker.end(run_id)
            state.baseline_runs[baseline.fold] = run_id
            study.save_state()
        predictions = pd.concat([r.predictions.assign(fold=r.fold) for r in results])
        tracker.log_table(parent, predictions, "predictions.tsv")
        classes = study.cohort.classes
        curves = {f"{model}, fold {r.fold}": (study.labels(r.predictions.subject_id.tolist()),
                                              r.predictions[classes.p])
                  for model, fold_results in (("CNN", results), ("linear", baselines)) for r in fold_results}
        roc = roc_figure(curves, "ROC per outer fold: CNN and linear baseline", classes.names)
        tracker.log_figure(parent, roc, "roc.png")

        say(f"{'fold':>6} {'CNN ROC AUC':>12} {'linear AUC':>11} {'CNN bal. acc.':>14} {'CNN fits train':>15}")
        for r, b in zip(results, baselines):
            say(f"{r.fold:>6} {r.test_metrics['roc_auc']:>12.3f} {b.test_metrics['roc_auc']:>11.3f} "
                f"{r.test_metrics['balanced_accuracy']:>14.3f} {r.fit_accuracy:>15.2f}")
        say(f"{'all':>6} {summary['test_roc_auc_mean']:>6.3f} ± {summary['test_roc_auc_std']:.3f} "
            f"{linear['test_roc_auc_mean']:>5.3f} ± {linear['test_roc_auc_std']:.3f}")
        say(evaluation.verdict)
        if underfit:
            say(underfit)
        self.underfit = underfit  # said again at the end, beside the verdict

        report = self.report
        report.banner = ("finding" if evaluation.finding == "yes" else "warning",
                         evaluation.verdict + (f" {underfit}" if underfit else ""))
        report.summary = [
            ("subjects", f"{len(study.cohort.subjects)} ({int(study.cohort.labels.sum())} {classes.positive})"),
            ("outer folds", str(len(results))),
            ("CNN ROC AUC (pooled, 95% CI)", str(evaluation.cnn)),
            ("linear baseline ROC AUC", str(evaluation.baseline) if evaluation.baseline else "-"),
            ("CNN vs chance", format_p(evaluation.cnn_p)),
            ("MLflow run", parent[:12]),
        ]
        table = pd.DataFrame([{"fold": r.fold, "test subjects": len(r.predictions),
                               "epochs (inner split)": r.epochs("select"), "epochs (refit)": r.epochs("refit"),
                               "CNN training accuracy": r.fit_accuracy,
                               **{f"CNN {m}": r.test_metrics[m] for m in SUMMARY_METRICS},
                               "linear ROC AUC": b.test_metrics["roc_auc"],
                               "linear balanced_accuracy": b.test_metrics["balanced_accuracy"], "linear C": b.C}
                              for r, b in zip(results, baselines)])
        report.add_table("Held-out test metrics per outer fold: the CNN and a linear baseline", table,
                         f"{FINAL_FITS[self.config.train.final_fit]} Each final model was tested once on its fold's "
                         "held-out subjects. CNN training accuracy: the final model on its own training subjects (no "
                         "augmentation); near 0.5 means it never fitted them. The linear baseline is an l2 logistic "
                         "regression on the same voxels, its C chosen on the same inner splits.")
        significance = pd.DataFrame([  # p: the CNN and the baseline vs chance; their difference by DeLong
            {"model": "CNN", "pooled ROC AUC": evaluation.cnn.auc, "95% CI low": evaluation.cnn.low,
             "95% CI high": evaluation.cnn.high, "p": format_p(evaluation.cnn_p)},
            *([{"model": "linear baseline", "pooled ROC AUC": evaluation.baseline.auc,
                "95% CI low": evaluation.baseline.low, "95% CI high": evaluation.baseline.high,
                "p": format_p(evaluation.baseline_p)},
               {"model": "CNN - linear", "pooled ROC AUC": evaluation.difference.auc,
                "95% CI low": evaluation.difference.low, "95% CI high": evaluation.difference.high,
                "p": format_p(evaluation.difference_p)}] if evaluation.baseline else []),
        ])
        confound = ""
        if evaluation.brain_volume is not None:
            confound = (f" Confound check: brain volume on the study grid alone separates the classes with ROC "
                        f"AUC {evaluation.brain_volume} (0.5: not at all; above: {classes.positive} larger). A high "
                        "value means a model can succeed from brain size, not from where the brain differs. It "
                        "measures the size left after registration to MNI152: near 0.5 does not rule out a head-size "
                        "difference in the native images, which a nonlinear registration largely removes.")
        report.add_table("Is it a finding? Pooled held-out ROC AUC with confidence intervals", significance,
                         "Every subject's prediction comes from the one model that never saw it. Intervals: DeLong. "
                         f"p of the CNN and of the baseline: against chance, by {evaluation.permutations} label "
                         "permutations within outer folds (one-sided). p of CNN - linear: DeLong's paired test of the "
                         "difference (two-sided)." + confound)
        report.add_images("ROC curves", [(f"ROC per outer fold ({classes.positive} = positive)", roc)])
        if self.config.search:
            chosen = pd.DataFrame([{"fold": r.fold, **{k: str(v) for k, v in sorted(r.search.best.items())}}
                                   for r in results if r.search])
            tracker.log_table(parent, chosen, "search_best_configs.tsv")
            report.add_table("Architecture search: the best configuration of each outer fold", chosen,
                             "Each fold searched on its own training subjects only; stable choices across folds "
                             "mean the architecture does not depend on which subjects were held out.")
        tracker.set_tags(parent, {"mlflow.note.content": self._description(study, evaluation)})

    def ensemble(self, study: Study, results: list[FoldResult]) -> None:
        """The folds' models as one pyfunc (see :mod:`study.predict`), logged to the study run and registered."""
        state = study.state
        if state.ensemble is None:
            attribution = self.config.attribution or AttributionConfig()  # maps on request, even if none here
            ensemble = Ensemble({r.fold: load_model(r.checkpoint) for r in results}, study.cache.grid,
                                self.config.preprocess.normalize, tuple(attribution.methods), attribution.target,
                                attribution.perturbation.model_dump(), study.cohort.classes,
                                explanation_of(attribution, study).cohort_mean)
            with study.times.stage("MLflow model logging"):
                _, version = self.tracker.log_ensemble(state.parent_run, ensemble.save(study.directory / "ensemble"),
                                                       ensemble.signature(), self.config.name,
                                                       f"{study.cohort.classes.column} ({study.cohort.classes.contrast})")
            state.ensemble = f"models:/{self.config.name}/{version}"
            study.save_state()
        say(f"model: the {len(results)} fold models as one ensemble, registered as {state.ensemble}; apply it to "
            f"new images with: study predict {state.ensemble} IMAGES...")

    @staticmethod
    def _evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
        metrics = {"pooled_roc_auc": evaluation.cnn.auc, "pooled_roc_auc_ci_low": evaluation.cnn.low,
                   "pooled_roc_auc_ci_high": evaluation.cnn.high, "pooled_roc_auc_p_vs_chance": evaluation.cnn_p}
        if evaluation.brain_volume is not None:
            metrics["brain_volume_roc_auc"] = evaluation.brain_volume.auc
        if evaluation.baseline is not None:
            metrics |= {"baseline_pooled_roc_auc": evaluation.baseline.auc,
                        "baseline_pooled_roc_auc_p_vs_chance": evaluation.baseline_p,
                        "cnn_minus_baseline_roc_auc": evaluation.difference.auc,
                        "cnn_minus_baseline_p": evaluation.difference_p}
        return metrics

    def attribution(self, study: Study, result: AttributionResult, evaluation: Evaluation) -> None:
        """Maps as NIfTI (study and fold runs), tables, figures, report sections and a console summary."""
        attribution, parent, tracker = self.config.attribution, study.state.parent_run, self.tracker
        if attribution.subject_nifti:
            self._subject_maps(result, study.directory / "maps" / "subjects")
        figures, region_tables = [], []
        beside: dict[str, tuple[str, Figure]] = {}  # each method's main map, for the CNN-beside-linear section
        classes = study.cohort.classes
        target = TARGETS[result.target].format(contrast=classes.contrast, column=classes.column)
        deletion = {"cohort_mean": "towards the cohort's mean", "blur": "by blurring"}[
            (self.config.attribution or AttributionConfig()).perturbation.reference]

        def explains(method: str) -> str:
            """What one method's maps show of the target, for its captions."""
            if result.target != "contrast":
                return target
            if method == "perturbation":
                return (f"{target}: what must be deleted, {deletion}, to undo the model's decision on each subject "
                        "(no t map: the two classes' maps answer different questions)")
            return f"{target}: its magnitude, evidence for either class"
        with tempfile.TemporaryDirectory() as tmp:
            def log_map(run_id: str, values: np.ndarray, name: str, method: str) -> None:
                path = Path(tmp) / run_id / f"{name}.nii.gz"
                path.parent.mkdir(exist_ok=True)
                nib.save(self._image(result, values), path)
                tracker.log_file(run_id, path, f"maps/{method}")

            for method, maps in result.maps.items():
                title = TITLES[method]
                if method == LINEAR_BASELINE:  # one map per fold model, the same for every subject
                    log_map(parent, maps.group["mean_all"], f"{method}_mean_all", method)
                    figures.append((f"{title}: |weights| on standardized voxels, mean over folds (top 10% of voxels)",
                                    brain_figure(self._image(result, maps.group["mean_all"]), title, "glass")))
                    if maps.test is not None:
                        figures.append(self._weight_test(parent, maps.test, result, classes, log_map))
                        beside[method] = figures[-1]
                    for kind, table in maps.regions.items():
                        tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
                        region_tables.append((f"{title}: regions ({kind})", table.head(15)))
                    continue
                for name, values in maps.group.items():
                    log_map(parent, values, f"{method}_{name}", method)
                for fold, group in maps.per_fold.items():
                    for name, values in group.items():
                        log_map(study.state.fold_runs[fold], values, f"fold{fold}_{method}_{name}", method)
                figures += [
                    (f"{title}: mean map, all held-out subjects (top 10% of voxels); explains {explains(method)}",
                     brain_figure(self._image(result, maps.group["mean_all"]), f"{title} (n={result.subjects})",
                                  "glass")),
                    *[(f"{title}: mean map, {name}; explains {explains(method)}",
                       brain_figure(self._image(result, maps.group[f"mean_{name}"]), f"{title}, {name}"))
                      for name in reversed(classes.names) if f"mean_{name}" in maps.group],
                ]
                beside[method] = next(f for f in figures if f[0].startswith(f"{title}: mean map, all held-out"))
                if maps.test is not None:
                    test = maps.test
                    log_map(parent, np.nan_to_num(test.t), f"{method}_t_{'_minus_'.join(reversed(classes.names))}",
                            method)
                    if test.permutations:
                        log_map(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_p_fwer", method)
                        tested = ~np.isnan(test.p)
                        tracker.log_metrics(parent, {f"test_voxels_fwer05_{method}": float((test.p[tested] < 0.05).sum()),
                                                     f"test_constant_voxels_{method}": test.constant})
                    significant = np.where(test.p < 0.05, np.nan_to_num(test.t), 0) if test.permutations \
                        else np.nan_to_num(test.t)
                    figures.append((f"{title}: {classes.contrast} t, FWER p < 0.05 ({test.constant} constant "
                                    "voxels left out)",
                                    brain_figure(self._image(result, significant),
                                                 f"{title}: {classes.contrast} (t, p_FWER<0.05)", "glass",
                                                 symmetric=True)))
                for kind, table in maps.regions.items():
                    tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
                    region_tables.append((f"{title}: regions ({kind})", table.head(15)))
        tracker.log_table(parent, result.agreement, "agreement.tsv")
        local = result.localization
        if len(local):
            tracker.log_table(parent, local, "localization.tsv")
            for row in local.to_dict("records"):
                tracker.log_metrics(parent, {f"localization_roc_auc_{row['method']}": row["roc_auc_group"],
                                             f"localization_top1pct_{row['method']}": row["top1pct_in_effect_group"],
                                             f"localization_top1pct_distractor_{row['method']}":
                                                 row.get("top1pct_in_distractor_group", float("nan"))})
        tracker.log_table(parent, result.cascade, "sanity/parameter_randomization.tsv")
        if len(result.shuffled):
            tracker.log_table(parent, result.shuffled, "sanity/label_randomization.tsv")
            tracker.log_metrics(parent, {"sanity_shuffled_labels_fit_accuracy": result.shuffled_fit_accuracy})
        deletions = result.deletion_summary
        tracker.log_table(parent, result.deletion, "sanity/deletion.tsv")
        tracker.log_metrics(parent, {f"deletion_change_{row.method}": row.change_mean for row in deletions.itertuples()}
                            | {"deletion_change_random": float(
                                deletions.random_change_mean[deletions.method != LINEAR_BASELINE].mean())})
        tracker.set_tags(parent, {"sanity.flagged": ",".join(result.flagged) or "none",
                                  "sanity.deletion_flagged": ",".join(result.deletion_flagged) or "none"})

        report, methods = self.report, list(result.maps)
        tests = [m.test for name, m in result.maps.items() if m.test is not None and name != LINEAR_BASELINE]
        if tests:
            how = (f"The t maps show voxels where the maps of {classes.names[1]} and {classes.names[0]} differ "
                   f"(Welch t), FWER-corrected by the maximum statistic over {tests[0].permutations} label "
                   "permutations within outer folds, exchanging whole families (PALM-style exchangeability blocks); "
                   "voxels with the same value in every subject are left out of the test.")
        else:
            how = (f"No {classes.contrast} test: with target {result.target} the maps of each class explain different "
                   "scores, so their difference would be there by construction; set attribution.target: contrast.")
        heading = "Where the network looks" if evaluation.finding in ("yes", "below_baseline") else \
            "Where the network looks: explaining a model that did not learn the task"
        if "gradcam" in result.maps:
            (d, h, w), spacing = result.gradcam_grid
            network = "fold 0's network" if study.config.search else "the network"
            how += (f" Grad-CAM shows no detail finer than {network}'s last feature map: {d}x{h}x{w} voxels, one "
                    f"every {spacing:.0f} mm on this grid.")
        if LINEAR_BASELINE in beside and len(beside) > 1:
            linear = beside.pop(LINEAR_BASELINE)
            if evaluation.finding == "baseline_only":  # the finding to read comes first
                report.add_images("The finding: the linear baseline's weights", [linear],
                                  "Only the linear baseline learned the task (see the banner): its weight map is the "
                                  "finding. The CNN's maps further down explain a model that learned nothing.")
            else:
                report.add_images("The CNN's maps beside the linear baseline's", [*beside.values(), linear],
                                  f"Where both models look. {evaluation.verdict}")
        report.add_images(heading, figures,
                          f"Every map explains {target}. Normalized maps (each subject scaled to its 99.5th "
                          "percentile) averaged over held-out subjects, over the MNI152 template. " + how)
        for heading, table in region_tables:
            report.add_table(heading, table, "Regions ranked by mean normalized attribution over all held-out subjects.")
        if len(local):
            columns = {"roc_auc_subject_mean": "voxel AUC, subjects (mean)", "roc_auc_group": "voxel AUC, group map",
                       "top1pct_in_effect_subject_mean": "top 1% in effect, subjects (mean)",
                       "top1pct_in_effect_group": "top 1% in effect, group map", "chance_top1pct": "chance",
                       "top1pct_in_distractor_group": "top 1% in distractor, group map",
                       "chance_distractor": "chance (distractor)"}
            shown = local.rename(columns=columns).assign(method=[TITLES.get(m, m) for m in local.method])
            report.add_table("Ground truth: localization of the planted effect", shown,
                             "Voxel ROC AUC against the planted effect, the share of the top 1% voxels inside it "
                             "(chance: the effect's share of the brain), and the group map's top-1% share in the "
                             "distractor, a region that varies whatever the class (chance: its share of the brain; a "
                             "method above chance there follows the data, not the model's decision).")
        report.add_images("Method agreement", [("Spearman correlation", agreement_figure(result.agreement, methods))])
        report.add_table("Method agreement (table)", result.agreement)
        flag_note = (f"Flagged (Spearman > {FLAG_SPEARMAN} to the original maps after full randomization or "
                     f"shuffled-label training): " + ", ".join(TITLES[m] for m in result.flagged)) if result.flagged \
            else "No method flagged: every method's maps change when the model or its labels are randomized."
        report.add_images("Sanity checks", [("Cascading randomization", sanity_figure(result.cascade))], flag_note)
        shown = deletions.assign(
            method=[TITLES[m] for m in deletions.method], p_vs_random=[format_p(p) for p in deletions.p_vs_random],
            beats_random=["yes" if above else "no: flagged" for above in deletions.beats_random],
        ).rename(columns={
            "change_mean": "change of p(decision): mean", "change_median": "median",
            "random_change_mean": "random blobs: mean", "share_above_random": "subjects above random",
            "p_vs_random": "above random", "beats_random": f"above random (p < {FLAG_DELETION_P})"})
        optimized = " Meaningful Perturbations optimizes this very deletion, so its lead here is expected." \
            if "perturbation" in result.maps and attribution.perturbation.reference == "cohort_mean" else ""
        report.add_table("Sanity check: deleting what each map marks", shown,
                         f"For every held-out subject, the {DELETED_SHARE:.0%} of brain voxels that a method's map "
                         "ranks highest were replaced by the cohort's mean volume (of all subjects' images) and the "
                         "fold's model decided again: the change of the probability of the class it had decided, "
                         f"against random blobs of as many brain voxels (noise smoothed by {RANDOM_BLOB_MM:.0f} mm), "
                         "in a paired one-sided Wilcoxon test over subjects. A map that explains the model marks "
                         "voxels its decision rests on. Methods whose maps move it no more surely than random blobs "
                         f"(e.g. of a model that ignores its input): "
                         f"{', '.join(TITLES[m] for m in result.deletion_flagged) or 'none'}. The check says whether "
                         f"a map's top voxels matter to the model, not that the map is complete.{optimized}")
        if len(result.shuffled):
            memorized = ("it memorized them" if result.shuffled_fit_accuracy >= 0.9 else
                         "it did not memorize them, so this check is weak: train longer or wider to make it strong")
            report.add_table("Sanity check: model trained on shuffled labels", result.shuffled,
                             "Similarity of maps from a model trained on shuffled labels to the real maps; high "
                             "values mean the method does not depend on what the model learned. The model had the "
                             "first fold's architecture, subjects and number of epochs, with every label shuffled; "
                             f"its accuracy on its own shuffled labels was {result.shuffled_fit_accuracy:.2f}: "
                             f"{memorized}.")

        say("method agreement (Spearman, mean over subjects):")
        for row in result.agreement.itertuples():
            say(f"  {row.method_a:>16} ~ {row.method_b:<16} {row.spearman_subject_mean:.3f}")
        if len(local):
            say("localization of the planted effect (voxel ROC AUC of the group map):")
            for row in local.itertuples():
                say(f"  {row.method:>16} {row.roc_auc_group:.3f}")
        say(f"sanity checks: flagged by randomization: {', '.join(result.flagged) or 'none'}; by deletion (no more "
            f"than random blobs): {', '.join(result.deletion_flagged) or 'none'}")

    def finish(self, study: Study, evaluation: Evaluation) -> None:
        """Stage times, the report, the verdict again, and the end of the study's run."""
        parent, tracker = study.state.parent_run, self.tracker
        times = self._stage_times(study)
        tracker.log_table(parent, times, "stage_times.tsv")
        tracker.log_metrics(parent, {"time_" + re.sub(r"\W+", "_", row.stage).strip("_") + "_s": row.seconds
                                     for row in times.itertuples()})
        shown = times.assign(seconds=times.seconds.map("{:.1f}".format), share=times.share.map("{:.1%}".format))
        self.report.add_table("Where the time went", shown,
                              "Seconds per stage. Fold stages are summed over folds, which may train side by side, "
                              "and some stages run beside others: the rows can add up to more than the wall time.")
        report_path = study.directory / "report.html"
        html = self.report.html()
        replace_atomically(report_path, lambda tmp: tmp.write_text(html))
        tracker.log_file(parent, report_path)
        tracker.set_tags(parent, {"study.progress": "finished"})
        tracker.end(parent)
        study.state.finished = True
        study.save_state()
        say("time per stage (seconds; fold stages summed over folds, which train side by side):")
        for row in times.itertuples():
            say(f"  {row.stage:<24} {row.seconds:>8.1f}  {row.share:>6.1%}")
        say(evaluation.verdict)
        if self.underfit:
            say(self.underfit)
        say(f"report: {report_path}")
        say(f"MLflow: run {parent}; {tracker.run_url(parent)}")

    def _stage_times(self, study: Study) -> pd.DataFrame:
        wall = time.perf_counter() - self.started
        rows = [{"stage": k, "seconds": v, "share": v / wall} for k, v in study.times.seconds.items()]
        rows.append({"stage": "whole study (wall)", "seconds": wall, "share": 1.0})
        return pd.DataFrame(rows)

    @contextmanager
    def recording(self, study: Study) -> Iterator[None]:
        """Run a block of stages; an MLflow failure becomes one message, other failures end the runs."""
        try:
            yield
        except BaseException as err:
            if is_tracking_failure(err):
                raise TrackingError(
                    f"MLflow at {self.tracker.uri} stopped answering or refused a request: {err}\n"
                    f"Nothing computed is lost: finished folds are in {study.directory / 'folds'}, checkpoints in "
                    f"{study.storage}, maps in {study.directory / 'maps'}. Start the tracking server again and rerun "
                    "the same command: the study logs what it has and goes on."
                ) from err
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            for fold, run_id in study.state.fold_runs.items():
                if fold not in study.state.logged_folds:
                    self.tracker.end(run_id, status)
            self.tracker.end(study.state.parent_run, status)
            raise

    # -- helpers -------------------------------------------------------------------------------------------------

    def _weight_test(self, parent: str, test: PermutationTest, result: AttributionResult, classes: Classes,
                     log_map: Callable[[str, np.ndarray, str, str], None]) -> tuple[str, Figure]:
        """The linear baseline's weight test: its maps and metrics logged, its figure (caption, figure)."""
        method = LINEAR_BASELINE
        contrast = "_minus_".join(reversed(classes.names))
        log_map(parent, np.nan_to_num(test.t), f"{method}_weights_{contrast}", method)
        weights = np.nan_to_num(test.t)
        found = int((test.p < 0.05).sum()) if test.permutations else 0
        if test.permutations:
            log_map(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_weights_p_fwer", method)
            self.tracker.log_metrics(parent, {f"test_voxels_fwer05_{method}": float(found)})
        caption = (f"{TITLES[method]}: {classes.contrast}, the weights of one l2 logistic regression on all "
                   f"subjects (positive: a higher standardized intensity points to {classes.names[1]}), tested by "
                   f"refitting on {test.permutations} label permutations within families (FWER by the maximum "
                   f"statistic): {found} voxels at p < 0.05" + ("" if found else "; none survive, so the weights are "
                                                                  "shown unthresholded (top 10% of voxels)"))
        strongest = np.abs(weights) >= np.percentile(np.abs(weights), 90)
        shown = np.where(test.p < 0.05 if found else strongest, weights, 0)
        title = f"{TITLES[method]}: {classes.contrast} (weights{', p_FWER<0.05' if found else ''})"
        return caption, brain_figure(self._image(result, shown), title, "glass", symmetric=True)

    @staticmethod
    def _image(result: AttributionResult, values: np.ndarray) -> nib.Nifti1Image:
        return nib.Nifti1Image(result.volume(values), result.affine)

    @staticmethod
    def _subject_maps(result: AttributionResult, out: Path) -> None:
        """Each subject's map of each method as ``<out>/<method>/sub-<id>_<method>.nii.gz``."""
        store = result.store
        for method in store.methods:
            (out / method).mkdir(parents=True, exist_ok=True)
            for sid, finished in zip(store.subject_ids, store.done(method)):
                if finished:
                    nib.save(nib.Nifti1Image(store.read(method, [sid])[0], result.affine),
                             out / method / f"sub-{sid}_{method}.nii.gz")

    def _description(self, study: Study, evaluation: Evaluation) -> str:
        """The study run's description in the MLflow UI (markdown)."""
        return (f"**{self.config.name}**: {len(study.cohort.subjects)} subjects, {self.config.cv.outer_folds}-fold CV. "
                f"{evaluation.verdict}\n\n"
                "Open `report.html` under Artifacts for the maps, method agreement and sanity checks; "
                "expand this run to see one child run per outer fold and per fold of the linear baseline.")
