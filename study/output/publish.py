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
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

from study.attribution.stage import AttributionResult, explanation_of
from study.config import AttributionConfig, StudyConfig
from study.data.prepare import PreparedCohort
from study.errors import TrackingError
from study.output.attribution import publish_attribution
from study.output.classification import publish_classification
from study.output.console import say
from study.output.folds import live_curves, open_fold_runs, publish_fold
from study.output.models import log_ensemble
from study.output.multiclass import publish_multiclass
from study.output.provenance import config_yaml, git_commit, shareable, source_tags, versions
from study.output.regression import publish_regression
from study.output.report import Report
from study.output.tracking import Tracker, is_tracking_failure, tracking_uri, without_credentials
from study.output.trials import trial_callback
from study.predict import Ensemble
from study.state import StageTimes, Study
from study.storage import replace_atomically
from study.training.baseline import BaselineResult
from study.training.checkpoint import load_model
from study.training.crossval import OnTrial
from study.training.evaluation import Evaluation
from study.training.folds import FoldResult
from study.training.live import OnEpochs


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
        target = config.cohort.target
        self.report = Report(f"study {config.name}: {target.column} {target.kind} from T1w MRI")
        self.started = time.perf_counter()
        self.times = StageTimes()  # what publishing itself takes (logging models to MLflow)
        self.underfit: str | None = None  # what classification found of folds that did not fit their subjects
        for view_id, (name, level, columns, order_by, ascending) in self.views().items():
            self.tracker.save_view(view_id, name, f"tags.`study.level` = '{level}'", columns, order_by, ascending)

    def views(self) -> dict[str, tuple[str, str, list[str], str | None, bool]]:
        """The MLflow UI's saved views of a study's runs: id -> (name, study.level, columns, sort column,
        ascending). Executions newest first; folds and trials as flat lists (by fold; best trial first)."""
        search = self.config.search
        searched = [f"params.{k}" for k in search.space] if search else []
        methods = self.config.attribution.methods if self.config.attribution else []
        score, fold_scores = (  # a regression target's mean absolute error, else ROC AUC
            ("mae", ["metrics.test_mae", "metrics.test_r", "metrics.fit_r"])
            if self.config.cohort.task == "regression"
            else ("roc_auc", ["metrics.test_roc_auc", "metrics.test_balanced_accuracy", "metrics.fit_accuracy"])
        )
        return {
            "study-executions": (
                "study: executions",
                "study",
                [
                    "tags.study.execution",
                    "tags.study.finding",
                    f"metrics.pooled_{score}",
                    f"metrics.pooled_{score}_ci_low",
                    f"metrics.pooled_{score}_ci_high",
                    f"metrics.baseline_pooled_{score}",
                    "metrics.cnn_minus_baseline_p",
                    *[f"metrics.localization_roc_auc_{m}" for m in methods],
                    "tags.study.progress",
                    "metrics.time_whole_study_wall_s",
                ],
                None,
                False,
            ),
            "study-folds": (
                "study: outer folds",
                "fold",
                [
                    "tags.study.execution",
                    "tags.study.fold",
                    *fold_scores,
                    *[f"params.best.{k.removeprefix('params.')}" for k in searched],
                ],
                "tags.study.fold",
                True,
            ),
            "study-trials": (
                "study: search trials",
                "trial",
                [  # ranked by the score the search ranks by
                    "tags.study.fold",
                    "tags.study.trial_status",
                    f"metrics.search_{search.metric if search else 'val_loss'}",
                    "metrics.best_val_loss",
                    *searched,
                ],
                f"metrics.search_{search.metric if search else 'val_loss'}",
                search is None or search.mode == "min",
            ),
        }

    # -- the run tree ------------------------------------------------------------------------------------------

    def start(self, study: Study, prepared: PreparedCohort, ray_description: str, memory: str) -> None:
        """Open (or reopen) the study's runs; log the cohort, its exclusions and the splits; say what the study
        will hold in memory."""
        config, state, tracker = self.config, study.state, self.tracker
        say(ray_description)
        if prepared.synthesized:
            say(f"generated a synthetic cohort of {config.cohort.synthetic.subjects} subjects in {config.cohort.root}")
        reused = len(prepared.cohort.subjects) - prepared.preprocessed
        say(
            f"cohort: {len(prepared.cohort.subjects)} subjects with images; preprocessed {prepared.preprocessed}, "
            f"reused {reused} from the cache"
        )
        for problem in prepared.excluded:
            say(f"excluded: {problem}")
        for warning in prepared.cohort.warnings:
            say(f"warning: {warning}")
        say(memory)
        if state.parent_run is None:
            commit = git_commit()
            tags = {
                "study.name": config.name,
                "study.cohort": study.cohort.fingerprint(),
                "study.level": "study",
                "study.execution": state.execution,
                "study.directory": shareable(str(study.directory)),
                "git.commit": commit,
                **versions(),
                **source_tags(commit),
            }
            state.parent_run = tracker.start_run(config.name, tags)
            tracker.log_params(state.parent_run, shareable(config.model_dump(mode="json")))
            tracker.log_text(state.parent_run, config_yaml(config), "config.yaml")
        else:
            tracker.reopen(state.parent_run)
            say(f"resuming study {config.name} (MLflow run {state.parent_run})")
        parent = state.parent_run
        open_fold_runs(tracker, study)
        tracker.log_file(parent, study.directory / "splits.json")
        if prepared.excluded:
            tracker.log_table(parent, pd.DataFrame([vars(p) for p in prepared.excluded]), "excluded_subjects.tsv")
        tracker.log_metrics(
            parent,
            {
                "n_subjects": len(study.cohort.subjects),
                **(
                    {f"n_{c}": int((study.cohort.labels == k).sum()) for k, c in enumerate(target.names)}
                    if (target := study.cohort.target).several
                    else {f"n_{target.positive}": int(study.cohort.labels.sum())}
                    if target.kind == "classification"
                    else {}
                ),
                "n_excluded": len(prepared.excluded),
            },
        )
        done = len(list((study.directory / "folds").glob("fold*.json")))
        say(
            f"study {config.name}: {len(study.cohort.subjects)} subjects, {len(study.folds)} outer folds "
            f"({done} already done); execution {state.execution} in {study.directory}; MLflow run {parent} at "
            f"{without_credentials(tracker.uri)}" + (f"; Ray storage {study.storage}" if config.storage_path else "")
        )

    def fold(self, study: Study, result: FoldResult) -> None:
        """Log a finished fold (unless MLflow has it already) and end its run."""
        publish_fold(self.tracker, study, result, self.times)

    def training(self, study: Study) -> OnEpochs:
        """A callback for the cross-validation stage: each fold's new epochs on its run's curves, as they train."""
        return live_curves(self.tracker, study)

    def explaining(self, study: Study):
        """A callback for the attribution stage: the study run's progress tag, as subjects are explained."""

        def progress(done: int, total: int) -> None:
            try:  # a cosmetic tag: a tracking hiccup must not stop a long attribution stage
                self.tracker.set_tags(study.state.parent_run, {"study.progress": f"{done}/{total} subjects explained"})
            except Exception as err:  # only a tracking failure is swallowed
                if not is_tracking_failure(err):
                    raise

        return progress

    def searching(self, study: Study) -> OnTrial:
        """A callback for searches: each trial a run under its fold's run when it starts, its curves as it trains."""
        return trial_callback(self.tracker, study)

    # -- the stages' results -----------------------------------------------------------------------------------

    def classification(
        self, study: Study, results: list[FoldResult], baselines: list[BaselineResult], evaluation: Evaluation
    ) -> None:
        """The held-out results of the CNN and the linear baseline, and whether they are a finding."""
        target = study.cohort.target
        publish = (
            publish_regression
            if target.kind == "regression"
            else publish_multiclass
            if target.several
            else publish_classification
        )
        self.underfit = publish(self.tracker, self.report, study, results, baselines, evaluation)

    def attribution(self, study: Study, result: AttributionResult, evaluation: Evaluation) -> None:
        """Maps as NIfTI (study and fold runs), tables, figures, report sections and a console summary."""
        publish_attribution(self.tracker, self.report, study, result, evaluation)

    def ensemble(self, study: Study, results: list[FoldResult]) -> None:
        """The folds' models as one pyfunc (see :mod:`study.predict`), logged to the study run and registered."""
        state, target = study.state, study.cohort.target
        if state.ensemble is None:
            # maps on request, even if none here (of several classes: each subject's class, as a study's would)
            attribution = self.config.attribution or AttributionConfig(
                target="true_class" if target.several else "contrast"
            )
            ensemble = Ensemble(
                {r.fold: load_model(r.checkpoint) for r in results},
                study.cache.grid,
                self.config.preprocess.normalize,
                tuple(attribution.methods),
                attribution.target,
                attribution.perturbation.model_dump(),
                study.cohort.target,
                explanation_of(attribution, study).cohort_mean,
                {r.fold: r.calibration for r in results},
                {r.fold: a for r in results if (a := study.fold_cache(r.fold).adjustment) is not None},
                {r.fold: (r.fit_score("fit_slope"), r.fit_score("fit_intercept")) for r in results}
                if study.cohort.target.kind == "regression"
                else {},
            )
            with self.times.stage("MLflow model logging"):
                _, version = log_ensemble(
                    self.tracker,
                    state.parent_run,
                    ensemble.save(study.directory / "ensemble"),
                    ensemble.signature(),
                    self.config.name,
                    f"{target.column} ({target.contrast if target.kind == 'classification' else 'regression'})",
                )
            state.ensemble = f"models:/{self.config.name}/{version}"
            study.save_state()
        say(
            f"model: the {len(results)} fold models as one ensemble, registered as {state.ensemble}; apply it to "
            f"new images with: study predict {state.ensemble} IMAGES..."
        )

    def finish(self, study: Study, evaluation: Evaluation, stages: StageTimes) -> None:
        """Stage times (the stages', then this publisher's own), the report, the verdict again, and the end of the
        study's run."""
        parent, tracker = study.state.parent_run, self.tracker
        times = self._stage_times(stages)
        tracker.log_table(parent, times, "stage_times.tsv")
        tracker.log_metrics(
            parent,
            {"time_" + re.sub(r"\W+", "_", row.stage).strip("_") + "_s": row.seconds for row in times.itertuples()},
        )
        shown = times.assign(seconds=times.seconds.map("{:.1f}".format), share=times.share.map("{:.1%}".format))
        self.report.add_table(
            "Where the time went",
            shown,
            "Seconds per stage. Fold stages are summed over folds, which may train side by side, "
            "and some stages run beside others: the rows can add up to more than the wall time.",
        )
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

    def _stage_times(self, stages: StageTimes) -> pd.DataFrame:
        wall = time.perf_counter() - self.started
        seconds = stages.seconds | {k: stages.seconds.get(k, 0.0) + v for k, v in self.times.seconds.items()}
        rows = [{"stage": k, "seconds": v, "share": v / wall} for k, v in seconds.items()]
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
                    f"MLflow at {without_credentials(self.tracker.uri)} stopped answering or refused a request: {err}\n"
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
