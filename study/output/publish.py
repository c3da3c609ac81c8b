"""The one place that publishes a study: MLflow runs, the HTML report and the console.

The stages compute and return values; a :class:`Publisher` turns each into
what researchers read: the MLflow run tree (study > fold > trial) with params,
curves, metrics, tables, NIfTI maps, figures and models; the sections of
``report.html``; and the lines printed on the console. It also records in the
study's state which results MLflow has, so that a study interrupted by a lost
tracking server logs the rest when it is run again.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from study.attribution import METHODS
from study.attribution.analysis import AttributionResult
from study.attribution.sanity import FLAG_SPEARMAN
from study.config import StudyConfig
from study.data.prepare import PreparedCohort
from study.output.figures import agreement_figure, brain_figure, confusion_figure, roc_figure, sanity_figure
from study.output.report import Report
from study.output.tracking import Tracker, TrackingError, is_tracking_failure, tracking_uri
from study.state import Study
from study.training.crossval import FoldResult, SearchResult
from study.training.loop import load_model
from study.training.metrics import SUMMARY_METRICS, cross_fold_summary

PACKAGES = ("study", "torch", "ray", "mlflow", "optuna", "nibabel", "nilearn", "numpy")


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
        self.report = Report(f"study {config.name}: sex classification from T1w MRI")
        self.started = time.perf_counter()

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
            tags = {"study.name": config.name, "study.cohort": study.cohort.fingerprint(), "study.level": "study",
                    "study.execution": state.execution, "git.commit": _git_commit(), **_versions()}
            state.parent_run = tracker.start_run(config.name, tags)
            tracker.log_params(state.parent_run, config.model_dump(mode="json"))
            tracker.log_text(state.parent_run, config_yaml(config), "config.yaml")
        else:
            tracker.reopen(state.parent_run)
            say(f"resuming study {config.name} (MLflow run {state.parent_run})")
        parent = state.parent_run
        for fold in study.folds:
            if fold.fold not in state.fold_runs:
                run_id = tracker.start_run(f"fold {fold.fold}", {"study.level": "fold", "study.fold": str(fold.fold)},
                                           parent=parent)
                tracker.log_params(run_id, {"fold": fold.fold, "n_train": len(fold.validation.train),
                                            "n_validation": len(fold.validation.test), "n_test": len(fold.test)})
                state.fold_runs[fold.fold] = run_id
            elif fold.fold not in state.logged_folds:
                tracker.reopen(state.fold_runs[fold.fold])
        study.save_state()
        tracker.log_file(parent, study.directory / "splits.json")
        if prepared.excluded:
            tracker.log_table(parent, pd.DataFrame([vars(p) for p in prepared.excluded]), "excluded_subjects.tsv")
        tracker.log_metrics(parent, {"n_subjects": len(study.cohort.subjects), "n_male": int(study.cohort.labels.sum()),
                                     "n_excluded": len(prepared.excluded)})
        done = len(list((study.directory / "folds").glob("fold*.pkl")))
        say(f"study {config.name}: {len(study.cohort.subjects)} subjects, {len(study.folds)} outer folds "
            f"({done} already done); MLflow run {parent} at {tracker.uri}; Ray storage {study.storage}")

    def fold(self, study: Study, result: FoldResult) -> None:
        """Log a finished fold (unless MLflow has it already) and end its run."""
        state, tracker = study.state, self.tracker
        for stage, seconds in result.seconds.items():
            study.times.add(stage, seconds)
        if result.fold in state.logged_folds:
            return
        run_id = state.fold_runs[result.fold]
        if result.search is not None:
            self._search(run_id, result.search)
        tracker.log_history(run_id, result.history)
        tracker.log_metrics(run_id, result.test_metrics, prefix="test_")
        tracker.log_table(run_id, result.predictions, "predictions.tsv")
        tracker.log_figure(run_id, roc_figure({f"fold {result.fold}": (result.labels, result.predictions["p_male"])},
                                              f"ROC, fold {result.fold}"), "roc.png")
        tracker.log_figure(run_id, confusion_figure(result.test_metrics, f"fold {result.fold}"), "confusion.png")
        with study.times.stage("MLflow model logging"):
            tracker.log_model(run_id, load_model(result.checkpoint), study.cache.shape)
        tracker.end(run_id)
        state.logged_folds.append(result.fold)
        study.save_state()
        m = result.test_metrics
        say(f"fold {result.fold} ({len(state.logged_folds)}/{len(study.folds)} done): {len(result.history)} epochs, "
            f"test ROC AUC {m['roc_auc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} "
            f"[{sum(result.seconds.values()):.0f} s]")

    def _search(self, fold_run: str, search: SearchResult) -> None:
        """One run per search trial under its fold's run (trials logged before are skipped), and the best params."""
        tracker = self.tracker
        logged = {r.data.tags.get("study.trial") for r in tracker.children(fold_run)}
        for trial in search.trials:
            if trial.trial_id in logged:
                continue
            run_id = tracker.start_run(f"trial {trial.trial_id}", {
                "study.level": "trial", "study.trial": trial.trial_id, "study.trial_status": trial.status},
                parent=fold_run)
            tracker.log_params(run_id, trial.params)
            if not trial.history.empty:
                tracker.log_history(run_id, trial.history[[c for c in trial.history.columns
                                                           if c.startswith(("train_", "val_", "best_")) or c == "epoch"]])
            if trial.score == trial.score:  # not NaN
                tracker.log_metrics(run_id, {f"search_{search.metric}": trial.score})
            tracker.end(run_id, "FAILED" if trial.status == "errored" else "FINISHED")
        tracker.log_params(fold_run, {"best": search.best})
        tracker.log_metrics(fold_run, {f"search_best_{search.metric}": search.best_score})
        say(f"searched {len(search.trials)} trials; best {search.best}")

    def classification(self, study: Study, results: list[FoldResult]) -> dict[str, float]:
        """The cross-fold test metrics: console table, study run metrics, pooled predictions, ROC; returns them."""
        parent, tracker = study.state.parent_run, self.tracker
        summary = cross_fold_summary([r.test_metrics for r in results])
        tracker.log_metrics(parent, summary)
        tracker.log_table(parent, pd.concat([r.predictions.assign(fold=r.fold) for r in results]), "predictions.tsv")
        roc = roc_figure({f"fold {r.fold}": (r.labels, r.predictions["p_male"]) for r in results}, "ROC per outer fold")
        tracker.log_figure(parent, roc, "roc.png")
        say(f"{'fold':>6} " + " ".join(f"{m:>18}" for m in SUMMARY_METRICS))
        for r in results:
            say(f"{r.fold:>6} " + " ".join(f"{r.test_metrics[m]:>18.3f}" for m in SUMMARY_METRICS))
        say(f"{'all':>6} " + " ".join(
            f"{summary[f'test_{m}_mean']:>10.3f} ± {summary[f'test_{m}_std']:.3f}" for m in SUMMARY_METRICS))

        report = self.report
        report.summary = [
            ("subjects", f"{len(study.cohort.subjects)} ({int(study.cohort.labels.sum())} male)"),
            ("outer folds", str(len(results))),
            ("test ROC AUC", f"{summary['test_roc_auc_mean']:.3f} ± {summary['test_roc_auc_std']:.3f}"),
            ("balanced accuracy",
             f"{summary['test_balanced_accuracy_mean']:.3f} ± {summary['test_balanced_accuracy_std']:.3f}"),
            ("MLflow run", parent[:12]),
        ]
        table = pd.DataFrame([{"fold": r.fold, "test subjects": len(r.predictions), "epochs": len(r.history),
                               **{m: r.test_metrics[m] for m in SUMMARY_METRICS}} for r in results])
        report.add_table("Held-out test metrics per outer fold", table,
                         "Each fold's model was selected on an inner validation split and tested once on its "
                         "held-out subjects.")
        report.add_images("ROC curves", [("ROC per outer fold (male = positive)", roc)])
        if self.config.search:
            chosen = pd.DataFrame([{"fold": r.fold, **{k: str(v) for k, v in sorted(r.search.best.items())}}
                                   for r in results if r.search])
            tracker.log_table(parent, chosen, "search_best_configs.tsv")
            report.add_table("Architecture search: the best configuration of each outer fold", chosen,
                             "Each fold searched on its own training subjects only; stable choices across folds "
                             "mean the architecture does not depend on which subjects were held out.")
        tracker.set_tags(parent, {"mlflow.note.content": self._description(study, summary)})
        return summary

    def attribution(self, study: Study, result: AttributionResult) -> None:
        """Maps as NIfTI (study and fold runs), tables, figures, report sections and a console summary."""
        attribution, parent, tracker = self.config.attribution, study.state.parent_run, self.tracker
        if attribution.subject_nifti:
            self._subject_maps(result, study.directory / "maps" / "subjects")
        figures, region_tables = [], []
        with tempfile.TemporaryDirectory() as tmp:
            def log_map(run_id: str, values: np.ndarray, name: str, method: str) -> None:
                path = Path(tmp) / run_id / f"{name}.nii.gz"
                path.parent.mkdir(exist_ok=True)
                nib.save(self._image(result, values), path)
                tracker.log_file(run_id, path, f"maps/{method}")

            for method, maps in result.maps.items():
                title = METHODS[method]
                for name, values in maps.group.items():
                    log_map(parent, values, f"{method}_{name}", method)
                for fold, group in maps.per_fold.items():
                    for name, values in group.items():
                        log_map(study.state.fold_runs[fold], values, f"fold{fold}_{method}_{name}", method)
                log_map(parent, maps.t, f"{method}_t_male_minus_female", method)
                log_map(parent, maps.p, f"{method}_p_fwer", method)
                significant = np.where(maps.p < 0.05, maps.t, 0) if result.permutations else maps.t
                figures += [
                    (f"{title}: mean map, all held-out subjects (top 10% of voxels)",
                     brain_figure(self._image(result, maps.group["mean_all"]), f"{title} (n={result.subjects})",
                                  "glass")),
                    *[(f"{title}: mean map, {sex}s",
                       brain_figure(self._image(result, maps.group[f"mean_{sex}"]), f"{title}, {sex}s"))
                      for sex in ("male", "female") if f"mean_{sex}" in maps.group],
                    (f"{title}: male - female t, FWER p < 0.05",
                     brain_figure(self._image(result, significant), f"{title}: male - female (t, p_FWER<0.05)",
                                  "glass", symmetric=True)),
                ]
                for kind, table in maps.regions.items():
                    tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
                    region_tables.append((f"{title}: regions ({kind})", table.head(15)))
        tracker.log_table(parent, result.agreement, "agreement.tsv")
        local = result.localization
        if len(local):
            tracker.log_table(parent, local, "localization.tsv")
            for row in local.itertuples():
                tracker.log_metrics(parent, {f"localization_roc_auc_{row.method}": row.roc_auc_group,
                                             f"localization_top1pct_{row.method}": row.top1pct_in_effect_group})
        tracker.log_table(parent, result.cascade, "sanity/parameter_randomization.tsv")
        if len(result.shuffled):
            tracker.log_table(parent, result.shuffled, "sanity/label_randomization.tsv")
        tracker.set_tags(parent, {"sanity.flagged": ",".join(result.flagged) or "none"})

        report, methods = self.report, list(result.maps)
        report.add_images("Where the network looks", figures,
                          "Normalized maps (each subject scaled to its 99.5th percentile) averaged over held-out "
                          "subjects, over the MNI152 template; the t maps show voxels where males and females differ "
                          f"after {result.permutations} label permutations (max-statistic FWER).")
        for heading, table in region_tables:
            report.add_table(heading, table, "Regions ranked by mean normalized attribution over all held-out subjects.")
        if len(local):
            report.add_table("Ground truth: localization of the planted effect", local,
                             "Voxel ROC AUC against the planted effect, and the share of the top 1% voxels inside it "
                             "(chance = the effect's share of the brain).")
        report.add_images("Method agreement", [("Spearman correlation", agreement_figure(result.agreement, methods))])
        report.add_table("Method agreement (table)", result.agreement)
        flag_note = (f"Flagged (Spearman > {FLAG_SPEARMAN} to the original maps after full randomization or "
                     f"shuffled-label training): " + ", ".join(METHODS[m] for m in result.flagged)) if result.flagged \
            else "No method flagged: every method's maps change when the model or its labels are randomized."
        report.add_images("Sanity checks", [("Cascading randomization", sanity_figure(result.cascade))], flag_note)
        if len(result.shuffled):
            report.add_table("Sanity check: model trained on shuffled labels", result.shuffled,
                             "Similarity of maps from a model trained on shuffled labels to the real maps; high "
                             "values mean the method does not depend on what the model learned.")

        say("method agreement (Spearman, mean over subjects):")
        for row in result.agreement.itertuples():
            say(f"  {row.method_a:>16} ~ {row.method_b:<16} {row.spearman_subject_mean:.3f}")
        if len(local):
            say("localization of the planted effect (voxel ROC AUC of the group map):")
            for row in local.itertuples():
                say(f"  {row.method:>16} {row.roc_auc_group:.3f}")
        say(f"sanity checks: flagged methods: {', '.join(result.flagged) or 'none'}")

    def finish(self, study: Study) -> None:
        """Stage times, the report, and the end of the study's run."""
        parent, tracker = study.state.parent_run, self.tracker
        times = self._stage_times(study)
        tracker.log_table(parent, times, "stage_times.tsv")
        tracker.log_metrics(parent, {"time_" + re.sub(r"\W+", "_", row.stage).strip("_") + "_s": row.seconds
                                     for row in times.itertuples()})
        self.report.add_table("Where the time went", times,
                              "Seconds per stage; fold stages are summed over folds, which may run at once.")
        report_path = study.directory / "report.html"
        report_path.write_text(self.report.html())
        tracker.log_file(parent, report_path)
        tracker.end(parent)
        study.state.finished = True
        study.save_state()
        say("time per stage (seconds; fold stages summed over folds):")
        for row in times.itertuples():
            say(f"  {row.stage:<24} {row.seconds:>8.1f}  {row.share:>6.1%}")
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

    def _description(self, study: Study, summary: dict[str, float]) -> str:
        """The study run's description in the MLflow UI (markdown)."""
        return (f"**{self.config.name}**: {len(study.cohort.subjects)} subjects, {self.config.cv.outer_folds}-fold CV, "
                f"test ROC AUC {summary['test_roc_auc_mean']:.3f} ± {summary['test_roc_auc_std']:.3f}.\n\n"
                "Open `report.html` under Artifacts for the maps, method agreement and sanity checks; "
                "expand this run to see one child run per outer fold.")
