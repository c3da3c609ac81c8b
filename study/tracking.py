"""Everything MLflow: the run tree (study > fold > trial), params, metrics, models, artifacts.

Only the driver writes to MLflow, one call at a time, so concurrent folds can
never corrupt or lock a SQLite store. Runs carry tags (study name, fold) by
which they are found again.
"""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import matplotlib.figure
import mlflow
import numpy as np
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.config import StudyConfig
from study.storage import project_dir

PACKAGES = ("study", "torch", "ray", "mlflow", "optuna", "nibabel", "nilearn", "numpy")


class TrackingError(RuntimeError):
    """MLflow cannot be used (server unreachable, bad URI); the message says what to do."""


def default_uri() -> str:
    """``mlflow.db`` (SQLite) in the project directory: the current one, or ``$STUDY_HOME``."""
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


def tracking_uri(config: StudyConfig) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else :func:`default_uri`."""
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


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


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            found[f"version.{package}"] = "not installed"
    return found


class Tracker:
    """The MLflow side of one study execution."""

    def __init__(self, config: StudyConfig):
        self.uri = tracking_uri(config)
        _check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        name = config.tracking.experiment or config.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # Local stores keep artifacts beside the database, in mlartifacts/; servers choose their own.
            location = None if self.uri.startswith(("http", "databricks")) else _local_artifacts(self.uri)
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id

    def start_study(self, config: StudyConfig, cohort_fingerprint: str) -> str:
        """Create the parent run: resolved config (params and YAML), versions, commit."""
        tags = {"study.name": config.name, "study.cohort": cohort_fingerprint, "study.level": "study",
                "git.commit": _git_commit(), **_versions()}
        run = self.client.create_run(self.experiment_id, run_name=config.name, tags=tags)
        run_id = run.info.run_id
        params = _flatten(config.model_dump(mode="json"))
        self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        self.client.log_text(run_id, config_yaml(config), "config.yaml")
        return run_id

    def start_child(self, parent_id: str, name: str, tags: dict[str, str]) -> str:
        """A run nested under ``parent_id`` (a fold under the study, a trial under a fold)."""
        tags = {"mlflow.parentRunId": parent_id, **tags}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_history(self, run_id: str, history: pd.DataFrame) -> None:
        """Per-epoch curves, one step per epoch."""
        metrics = []
        for _, row in history.iterrows():
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float, np.number)) and np.isfinite(value):
                    metrics.append(Metric(key, float(value), 0, step))
        for start in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[start:start + 900])

    def log_metrics(self, run_id: str, metrics: dict[str, float], prefix: str = "") -> None:
        finite = [Metric(prefix + k, float(v), 0, 0) for k, v in metrics.items() if np.isfinite(v)]
        self.client.log_batch(run_id, metrics=finite)

    def log_params(self, run_id: str, params: dict[str, Any], prefix: str = "") -> None:
        flat = _flatten(params)
        self.client.log_batch(run_id, params=[Param(prefix + k, v[:6000]) for k, v in flat.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_table(self, run_id: str, table: pd.DataFrame, path: str) -> None:
        self.client.log_text(run_id, table.to_csv(index=False, sep="\t" if path.endswith(".tsv") else ","), path)

    def log_figure(self, run_id: str, figure: matplotlib.figure.Figure, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def log_file(self, run_id: str, local_path: Path, directory: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), directory)

    def log_model(self, run_id: str, model: Any, input_shape: tuple[int, ...]) -> str:
        """Log a torch model (pickle format, so its modules stay hookable); returns its model id."""
        example = np.zeros((2, 1, *input_shape), dtype=np.float32)  # batch 2: a free batch dimension
        # Declared requirements: MLflow's own inference starts a subprocess and costs ~15 s a model.
        requirements = [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}"]
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(model.cpu(), name="model", input_example=example,
                                            serialization_format="pickle", pip_requirements=requirements)
        return info.model_id

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run as running again (a resumed study)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_trials(self, fold_run: str, trials: list, metric: str) -> None:
        """One run per search trial under its fold's run; trials logged before are skipped."""
        logged = {r.data.tags.get("study.trial") for r in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{fold_run}'")}
        for trial in trials:
            if trial.trial_id in logged:
                continue
            run_id = self.start_child(fold_run, f"trial {trial.trial_id}", {
                "study.level": "trial", "study.trial": trial.trial_id, "study.trial_status": trial.status})
            self.log_params(run_id, trial.params)
            if not trial.history.empty:
                self.log_history(run_id, trial.history[[c for c in trial.history.columns
                                                        if c.startswith(("train_", "val_", "best_")) or c == "epoch"]])
            if trial.score == trial.score:  # not NaN
                self.log_metrics(run_id, {f"search_{metric}": trial.score})
            self.end(run_id, "FAILED" if trial.status == "errored" else "FINISHED")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (then open http://127.0.0.1:5000)"


def config_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML, as a researcher would write it."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
