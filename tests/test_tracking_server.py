"""A study against a real `mlflow server` (SQLite backend, proxied artifacts), which goes away mid-study."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
import yaml

from tests.conftest import free_port
from tests.test_cluster import submit
from tests.test_study import study_config


class TrackingServer:
    """``mlflow server`` on 127.0.0.1 that a test can stop and start again (same port, same stores)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root}/server.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        os.killpg(self.process.pid, how)
        self.process.wait(timeout=60)


@pytest.fixture
def tracking_server(tmp_path) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)  # nothing left to keep: not the 10 s of a graceful shutdown


@pytest.mark.slow
def test_study_logs_through_a_server_survives_its_outage_and_resumes_as_a_job(
    tmp_path, cohort_dir, tracking_server, ray_head
):
    """The study starts on this machine; the server goes away; `ray job submit` of the same command resumes it on
    the cluster (the tests' head, token-protected), as a researcher would go on."""
    config = study_config(tmp_path, cohort_dir, tracking={"uri": tracking_server.uri})
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "study.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [str(Path(sys.executable).parent / "study"), "run", str(job_dir / "study.yaml")]
    # Fail at the first refused request instead of retrying for minutes, as MLflow does by default.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    study = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in study.stdout:
        output.append(line)
        if line.startswith("fold 0 (1/2 done)"):
            tracking_server.stop()  # while fold 1 trains
    assert study.wait(timeout=60) == 2, "".join(output[-40:])
    message = "".join(output)
    assert "stopped answering" in message and "Nothing computed is lost" in message
    fold1 = config.output_dir / config.name / "latest" / "folds" / "fold1.json"
    assert fold1.exists()  # computed while the server was down, kept
    computed_at = fold1.stat().st_mtime_ns

    tracking_server.start()
    job = submit(ray_head, job_dir, sys.executable, "-m", "study", "run", "study.yaml")
    resumed = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in resumed, resumed[-3000:]
    port = ray_head.address.rsplit(":", 1)[1]
    assert re.search(rf"joined the Ray cluster at [\d.]+:{port}", resumed)  # not a Ray of its own
    assert "(2 already done)" in resumed
    assert fold1.stat().st_mtime_ns == computed_at  # logged, not recomputed

    # Everything is found through the server's API: the run tree, metrics, artifacts and models.
    client = mlflow.MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name(config.name)
    runs = client.search_runs([experiment.experiment_id])
    studies = [r for r in runs if r.data.tags["study.level"] == "study"]
    folds = [r for r in runs if r.data.tags["study.level"] == "fold"]
    assert len(studies) == 1 and len(folds) == 2
    assert sorted(r.data.tags["study.level"] for r in runs) == ["baseline", "baseline", "fold", "fold", "study"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "test_roc_auc_mean" in studies[0].data.metrics
    assert {"report.html", "predictions.tsv", "roc.png"} <= {
        a.path for a in client.list_artifacts(studies[0].info.run_id)
    }
    for fold in folds:
        assert "test_roc_auc" in fold.data.metrics
        assert {"predictions.tsv", "roc.png"} <= {a.path for a in client.list_artifacts(fold.info.run_id)}
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.name for m in models) == ["ensemble", "model", "model"]  # each fold's, and the ensemble
    (version,) = client.search_model_versions(f"name = '{config.name}'")  # registered through the server
    assert version.run_id == studies[0].info.run_id
    assert any((tmp_path / "artifacts").rglob("report.html"))  # stored by the server, not by the study


def test_credentials_in_a_tracking_uri_are_never_logged(monkeypatch):
    """A URI with user:password@ would be a param, a line of config.yaml, the run's source tag and console text."""
    from study.config import parse_config
    from study.output.provenance import config_yaml, source_tags
    from study.output.tracking import without_credentials

    uri = "http://alice:s3cret@mlflow.lab:5000"
    config = parse_config({"name": "s", "cohort": {"root": "x"}, "tracking": {"uri": uri}})
    monkeypatch.setattr("sys.argv", ["study", "run", "s.yaml", "--set", f"tracking.uri={uri}"])
    logged = [
        config_yaml(config),
        source_tags("unknown")["mlflow.source.name"],
        str(without_credentials(config.model_dump(mode="json"))),
    ]
    assert all("s3cret" not in text and "alice" not in text and "http://mlflow.lab:5000" in text for text in logged)
    assert without_credentials("sqlite:////home/a/mlflow.db") == "sqlite:////home/a/mlflow.db"


def test_paths_in_the_project_are_logged_relative_to_it(tmp_path, monkeypatch):
    """Params and config.yaml showed /home/<user>/... of whoever ran the study."""
    from study.config import load_config
    from study.output.provenance import config_yaml, shareable

    monkeypatch.setenv("STUDY_HOME", str(tmp_path))
    (tmp_path / "s.yaml").write_text("name: s\ncohort: {root: cohorts/hcp}\n")
    config = load_config(tmp_path / "s.yaml")
    assert config.cohort.root == tmp_path / "cohorts/hcp"  # the study itself uses absolute paths
    logged = shareable(config.model_dump(mode="json"))
    assert logged["cohort"]["root"] == "cohorts/hcp" and logged["output_dir"] == "study_data/runs"
    assert str(tmp_path) not in config_yaml(config)
    assert shareable("/elsewhere/cohort") == "/elsewhere/cohort"  # outside the project: as it is
