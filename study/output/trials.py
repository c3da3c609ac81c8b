"""A search's trials as MLflow runs under their fold's run: live as they train, complete when the fold ends."""

from __future__ import annotations

import pandas as pd

from study.output.console import say
from study.output.tracking import WALL_TIME, Tracker, is_tracking_failure
from study.state import Study
from study.training.crossval import OnTrial
from study.training.trials import SearchResult

TRIAL_METRICS = ("train_", "val_", "best_")  # what a search trial's run shows of each epoch


def trial_callback(tracker: Tracker, study: Study) -> OnTrial:
    """A callback for searches: each trial a run under its fold's run when it starts, its curves as it trains."""
    runs: dict[tuple[int, str], str] = {}
    epochs: dict[tuple[int, str], int] = {}

    def event(fold: int, kind: str, trial_id: str, params: dict, result: dict) -> None:
        try:  # live trials are a view: a tracking hiccup must not stop the search (its end logs every trial)
            key = (fold, trial_id)
            if key not in runs:
                runs[key] = _trial_run(tracker, fold, study.state.fold_runs[fold], trial_id, params)
            if kind == "result" and "epoch" in result:
                epochs[key] = epochs.get(key, 0) + 1
                row = {k: v for k, v in result.items() if k == "epoch" or k.startswith(TRIAL_METRICS)}
                tracker.log_history(runs[key], pd.DataFrame([row]), only_new=True)
            elif kind in ("complete", "error"):
                budget = params.get("epochs", study.config.train.epochs)
                status = (
                    "errored" if kind == "error" else "completed" if epochs.get(key, 0) >= budget else "stopped_early"
                )
                tracker.set_tags(runs[key], {"study.trial_status": status})
                tracker.end(runs[key], "FAILED" if kind == "error" else "FINISHED")
        except Exception as err:
            if not is_tracking_failure(err):
                raise

    return event


def _trial_run(
    tracker: Tracker, fold: int, fold_run: str, trial_id: str, params: dict, runs: list | None = None
) -> str:
    """The run of a search trial under its fold's run: found again by its tag, else started."""
    for run in runs if runs is not None else tracker.children(fold_run):
        if run.data.tags.get("study.trial") == trial_id:
            return run.info.run_id
    run_id = tracker.start_run(
        f"trial {trial_id}",
        {"study.level": "trial", "study.fold": str(fold), "study.trial": trial_id, "study.trial_status": "running"},
        parent=fold_run,
    )
    tracker.log_params(run_id, params)
    return run_id


def publish_search(tracker: Tracker, fold: int, fold_run: str, search: SearchResult) -> None:
    """Every trial's run complete (curves, status, score; trials whose run has its score are done) and the best."""
    children = tracker.children(fold_run)
    done = {r.data.tags.get("study.trial") for r in children if f"search_{search.metric}" in r.data.metrics}
    for trial in search.trials:
        if trial.trial_id in done:
            continue
        run_id = _trial_run(tracker, fold, fold_run, trial.trial_id, trial.params, children)
        if not trial.history.empty:
            tracker.log_history(
                run_id,
                trial.history[
                    [c for c in trial.history.columns if c.startswith(TRIAL_METRICS) or c in ("epoch", WALL_TIME)]
                ],
                only_new=True,
            )
        tracker.set_tags(run_id, {"study.trial_status": trial.status})
        if trial.score == trial.score:  # not NaN
            tracker.log_metrics(run_id, {f"search_{search.metric}": trial.score})
        tracker.end(run_id, "FAILED" if trial.status == "errored" else "FINISHED")
    tracker.log_params(fold_run, {"best": search.best})
    tracker.log_metrics(fold_run, {f"search_best_{search.metric}": search.best_score})
    say(f"searched {len(search.trials)} trials; best {search.best}")
