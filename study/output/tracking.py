"""MLflow through its client: runs, params, metrics, artifacts and logged models of one experiment.

Only the driver writes to MLflow, one call at a time, so concurrent folds can
never corrupt or lock a SQLite store. Every call names its run explicitly (no
active-run state), and runs carry tags (study name, fold, trial) by which they
are found again.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import matplotlib.figure
import numpy as np
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.errors import TrackingError
from study.storage import project_dir

WALL_TIME = "wall_time"  # a history column: when the row's epoch ended, seconds since 1970 (the points' timestamps)
SAVED_VIEW_TAG = "mlflow.sharedViewState."  # the experiment tag prefix of the MLflow UI's saved views


def now_ms() -> int:
    """The wall clock in milliseconds, as MLflow timestamps its metrics."""
    return int(time.time() * 1000)


def default_uri() -> str:
    """``mlflow.db`` (SQLite) in the project directory: the current one, or ``$STUDY_HOME``."""
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URI


def without_credentials(value: Any) -> Any:
    """``value`` (a string, or a config's dump) with every URI's ``user:password@`` removed: a run's params, tags
    and console are read by everyone with access to the tracking server. Give MLflow credentials as
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead."""
    if isinstance(value, str):
        return CREDENTIALS.sub("", value)
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    return value


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else :func:`default_uri`."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def is_tracking_failure(err: BaseException) -> bool:
    """True when ``err`` comes from MLflow or the connection to its server (not from the study)."""
    return isinstance(err, (MlflowException, requests.RequestException))


def _check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}). Start it "
            f"(mlflow server --host 127.0.0.1 --port 5000), fix tracking.uri / MLFLOW_TRACKING_URI, "
            f"or unset both to log to {default_uri()}."
        ) from None


def _local_artifacts(uri: str) -> str:
    """``mlartifacts/`` beside a ``sqlite:///`` database file (else in the project directory)."""
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    folder = Path(database).resolve().parent if database else project_dir()
    return (folder / "mlartifacts").as_uri()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``a.b.c`` keys with text values (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class Tracker:
    """One MLflow experiment, written through ``MlflowClient``.

    Parameters
    ----------
    uri : str
        Tracking URI: ``sqlite:///...``, a server ``http://...``, ...
    experiment : str
        Experiment name; created (with local artifacts in ``mlartifacts/`` beside
        a SQLite file) when missing.
    """

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        _check_reachable(uri)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # Local stores keep artifacts beside the database, in mlartifacts/; servers choose their own.
            location = None if uri.startswith(("http", "databricks")) else _local_artifacts(uri)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        # MLflow 3 opens an experiment on its GenAI overview unless told it holds model training.
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")

    def save_view(
        self,
        view_id: str,
        name: str,
        search_filter: str,
        columns: list[str],
        order_by: str | None = None,
        ascending: bool = True,
    ) -> None:
        """A saved view of the experiment's runs table (MLflow 3.15+: the "Views" menu, or the page
        ``#/experiments/<id>/runs?viewStateShareKey=<view_id>``): runs matching ``search_filter`` with
        ``columns`` shown (``metrics.NAME``, ``params.NAME``, ``tags.NAME``).

        Sorted by ``order_by`` (a column as above) the runs are a flat list; without it, newest first
        with child runs folded under their parents (the UI nests only when sorted by start time).
        MLflow keeps saved views as experiment tags; writing one again replaces it.
        """

        def key(column: str) -> str:
            kind, _, name = column.partition(".")
            return f"{kind}.`{name}`"

        now = int(time.time() * 1000)
        state = {
            "searchFilter": search_filter,
            "orderByKey": key(order_by) if order_by else "attributes.start_time",
            "orderByAsc": ascending if order_by else False,
            "selectedColumns": [key(c) for c in columns],
            "columnOrder": [key(c) for c in columns],
        }
        self.client.set_experiment_tag(
            self.experiment_id,
            f"{SAVED_VIEW_TAG}{view_id}",
            json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}),
        )

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """A new run (nested under ``parent`` when given); returns its id."""
        tags = ({"mlflow.parentRunId": parent} if parent else {}) | tags
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def children(self, parent: str) -> list:
        """The runs nested directly under ``parent``."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")

    def log_history(self, run_id: str, history: pd.DataFrame, step: str = "epoch", only_new: bool = False) -> None:
        """Per-epoch curves: every numeric column, one MLflow step per value of column ``step``.

        Each point carries the time its epoch ended (column ``wall_time``, seconds since the epoch, as the
        training loop records it; now when a row has none), so MLflow's wall-time axes show when it trained.
        ``only_new`` leaves out the points the run already has (curves logged live as a fold trained).
        """
        columns = [k for k in history.columns if k not in (step, WALL_TIME)]
        logged = {k: {m.step for m in self.client.get_metric_history(run_id, k)} for k in columns} if only_new else {}
        metrics, now = [], now_ms()
        for _, row in history.iterrows():
            wall = row.get(WALL_TIME)
            timestamp = int(wall * 1000) if isinstance(wall, (int, float, np.number)) and np.isfinite(wall) else now
            for key in columns:
                value = row[key]
                if (
                    isinstance(value, (int, float, np.number))
                    and np.isfinite(value)
                    and int(row[step]) not in logged.get(key, ())
                ):
                    metrics.append(Metric(key, float(value), timestamp, int(row[step])))
        for start in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[start : start + 900])

    def log_metrics(self, run_id: str, metrics: dict[str, float], prefix: str = "") -> None:
        timestamp = now_ms()
        finite = [Metric(prefix + k, float(v), timestamp, 0) for k, v in metrics.items() if np.isfinite(v)]
        self.client.log_batch(run_id, metrics=finite)

    def log_params(self, run_id: str, params: dict[str, Any], prefix: str = "") -> None:
        flat = flatten(params)
        params = [Param(prefix + k, v[:6000]) for k, v in flat.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_table(self, run_id: str, table: pd.DataFrame, path: str) -> None:
        self.log_text(run_id, table.to_csv(index=False, sep="\t" if path.endswith(".tsv") else ","), path)

    def log_figure(self, run_id: str, figure: matplotlib.figure.Figure, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def log_file(self, run_id: str, local_path: Path, directory: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), directory)

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run as running again (a resumed study)."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return f"{without_credentials(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (then open http://127.0.0.1:5000)"
