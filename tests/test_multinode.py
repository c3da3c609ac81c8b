"""A study on a real multi-node Ray on this machine: a head and two worker nodes, each its own `ray start`.

The head has no CPUs, so every training worker, attribution actor and
preprocessing task must run on a worker node, as on a cluster whose head only
coordinates. The study is started as `ray job submit` users start theirs: a
driver that joins the head (RAY_ADDRESS, token authentication).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import mlflow
import pytest
import yaml

from study.state import running
from study.training.folds import FoldResult
from tests.conftest import VOXEL_MM, free_port, ray_cli, stop_processes_of

STUDY = str(Path(sys.executable).parent / "study")


class LocalCluster:
    """A head (0 CPUs) and worker nodes (1 CPU each, labelled ``zone``) as separate ``ray start`` processes."""

    def __init__(self, workers: tuple[str, ...], autoscaling: dict | None = None):
        self.temp_dirs: dict[str, str] = {}
        port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        head = [
            "--head",
            "--num-cpus",
            "0",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
        ]
        extra_env = {}
        if autoscaling is not None:  # Ray's fake provider: the autoscaler adds worker nodes as local raylets
            config = Path(tempfile.mkdtemp(prefix="ray-autoscaling-", dir="/tmp")) / "cluster.json"
            autoscaling["provider"]["gcs_address"] = self.address
            config.write_text(json.dumps(autoscaling))
            head.append(f"--autoscaling-config={config}")
            extra_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        try:
            self._start("head", *head, extra_env=extra_env)
            for zone in workers:
                self.add(zone)
        except BaseException:  # no half-started cluster left running beside the next tests
            self.stop()
            raise

    def add(self, zone: str) -> None:
        """A worker node with 1 CPU, labelled ``zone``."""
        self._start(zone, "--address", self.address, "--num-cpus", "1", "--labels", f"zone={zone}")

    def _start(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> None:
        temp_dir = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
        ports = [
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ]
        self.temp_dirs[name] = temp_dir  # before it starts: stop() also stops a node that failed to start
        started = ray_cli(
            "start",
            *args,
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            temp_dir,
            *ports,
            "--disable-usage-stats",
            env={**self.env(), **(extra_env or {})},
        )
        assert started.returncode == 0, f"`ray start` of {name} failed:\n{started.stdout}{started.stderr}"

    def env(self) -> dict[str, str]:
        """A driver's environment for this cluster (as `ray job submit` gives a job)."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        return {**keep, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def _state(self, *args: str) -> list[dict]:
        """``ray list ...`` of this cluster (a subprocess: this test process is connected to another Ray)."""
        listed = ray_cli(
            "list",
            *args,
            "--address",
            self.dashboard,
            "--format",
            "json",
            "--detail",
            "--limit",
            "1000",
            env=self.env(),
        )
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)

    def nodes(self) -> dict[str, str]:
        """Node id -> ``head`` or the worker's zone, of the nodes alive."""
        return {
            n["node_id"]: "head" if n["is_head_node"] else n["labels"].get("zone", "autoscaled")
            for n in self._state("nodes", "--filter", "state=ALIVE")
        }

    def submit(self, config: Path, log: typing.IO, driver_env: dict[str, str] | None = None) -> subprocess.Popen:
        """``ray job submit -- python -m study run CONFIG`` to this cluster, as users submit a study, its output to
        ``log``; ``driver_env``: the job's environment variables (its runtime env).

        No --working-dir: the fake nodes share the head's session folder, where a removed node's runtime env would
        delete the package that the others run in (on a real cluster each node has its own disk)."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": driver_env})] if driver_env else []
        command = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            *runtime_env,
            "--",
            sys.executable,
            "-m",
            "study",
            "run",
            str(config),
        ]
        env = {k: v for k, v in self.env().items() if k != "RAY_ADDRESS"}
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def actors(self, class_name: str) -> list[dict]:
        return self._state("actors", "--filter", f"class_name={class_name}")

    def remove(self, name: str) -> None:
        """Take a node away, as a preempted spot instance goes (its raylet and everything of it stops)."""
        stop_processes_of(self.temp_dirs.pop(name))

    def stop(self) -> None:
        """Every node at once (each waits up to 5 s for its processes to end)."""
        stop_processes_of(*self.temp_dirs.values())
        self.temp_dirs.clear()


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster(("w1", "w2"))
    try:
        yield cluster
    finally:
        cluster.stop()


def write_config(project: Path, root: Path, **sections) -> Path:
    config = {
        "name": "multinode",
        "cohort": {"root": str(root)},
        "preprocess": {"voxel_size": VOXEL_MM},
        "cv": {"outer_folds": 2, "inner_folds": 2},
        "model": {"preset": "mrinet", "width": 4},
        "train": {"epochs": 3, "batch_size": 4},
        "attribution": None,
        **sections,
    }
    path = project / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def interrupt_the_training(
    cluster: LocalCluster, project: Path, lose: str = "node", stop_after_fold0: bool = False
) -> tuple[str, int, str]:
    """Run the study in ``project``; once fold 0 has a checkpoint (mid-fold: 1 s checkpoints, hundreds of epochs
    to go), remove the node that trains it (``lose="node"``, as a preempted instance goes) or kill the training
    worker's process (``"worker"``, found through Ray's state API); with ``stop_after_fold0``, Ctrl-C once fold 0
    is kept (what follows it is not this test's). Returns the node's zone, the study's exit code and its output."""
    log = project / "study.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [STUDY, "run", "study.yaml"], cwd=project, env=cluster.env(), stdout=output, stderr=subprocess.STDOUT
        )
        try:
            storage = project / "study_data" / "runs" / "multinode" / "latest" / "ray"
            deadline = time.time() + 300
            while not list(storage.glob("train/fold0/checkpoint_*/checkpoint.pt")) and time.time() < deadline:
                assert process.poll() is None, log.read_text()[-4000:]
                time.sleep(0.2)
            (training,) = [a for a in cluster.actors("RayTrainWorker") if a["state"] == "ALIVE"]
            lost = cluster.nodes()[training["node_id"]]
            if lose == "node":
                cluster.remove(lost)
            else:
                os.kill(training["pid"], signal.SIGKILL)
            fold0 = project / "study_data" / "runs" / "multinode" / "latest" / "folds" / "fold0.json"
            while stop_after_fold0 and not fold0.exists() and process.poll() is None and time.time() < deadline + 300:
                time.sleep(0.5)
            if stop_after_fold0 and process.poll() is None:
                process.send_signal(signal.SIGINT)
            code = process.wait(timeout=600)
        finally:  # a study left training would take the cluster's CPUs from the next test
            if process.poll() is None:
                process.kill()
                process.wait()
    return lost, code, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("lose", ["worker", "node"])  # the worker first: the node test leaves one worker node
def test_a_worker_or_node_lost_mid_fold_costs_only_the_epochs_since_its_checkpoint(
    cluster, tmp_path, synthetic_root, lose
):
    epochs = 600
    write_config(
        tmp_path,
        synthetic_root,
        train={"epochs": epochs, "batch_size": 4},
        resources={"max_failures": 1, "checkpoint_every_s": 1.0},
    )
    lost, code, output = interrupt_the_training(cluster, tmp_path, lose, stop_after_fold0=True)
    assert code == 130, output[-4000:]  # fold 0 went on after the loss and finished; then Ctrl-C
    folds = tmp_path / "study_data" / "runs" / "multinode" / "latest" / "folds"
    history = FoldResult.from_json((folds / "fold0.json").read_text()).history
    refit = history[history["phase"] == "refit"]
    assert sorted(refit["refit_epoch"]) == list(range(epochs))  # resumed: every epoch once, none more
    if lose == "node":
        survivor = {"w1": "w2", "w2": "w1"}[lost]
        alive = cluster.nodes()
        assert survivor in {alive.get(a["node_id"]) for a in cluster.actors("RayTrainWorker")}  # went on elsewhere
    live = [json.loads(line) for line in (folds.parent / "live" / "fold0.jsonl").read_text().splitlines()]
    repeated = len(live) - epochs  # epochs trained twice: those after the last checkpoint before the loss
    assert 0 <= repeated < epochs / 2, repeated


@pytest.mark.slow
def test_without_restarts_a_lost_node_stops_the_study_with_what_to_do_and_the_rerun_resumes(
    cluster, tmp_path, synthetic_root
):
    epochs = 300
    write_config(
        tmp_path,
        synthetic_root,
        train={"epochs": epochs, "batch_size": 4},
        resources={"max_failures": 0, "checkpoint_every_s": 1.0},
        attribution={
            "methods": ["gradcam"],
            "actors": 1,
            "permutations": 10,
            "sanity": {"subjects": 1, "label_randomization": False},
        },
    )
    _, code, output = interrupt_the_training(cluster, tmp_path)
    assert code == 2, output[-4000:]
    # One line of the study's own (Ray's controller may log the crash it saw, prefixed with its pid).
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line], output[-4000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: fold 0's training failed (a worker or its node was lost)"), last
    assert "run the same command again to resume" in last

    cluster.add("w3")  # a new node joins; the same command goes on
    again = subprocess.run(
        [STUDY, "run", "study.yaml"], cwd=tmp_path, env=cluster.env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming study multinode" in again.stdout
    history = FoldResult.from_json((tmp_path / "study_data/runs/multinode/latest/folds/fold0.json").read_text()).history
    assert sorted(history[history["phase"] == "refit"]["refit_epoch"]) == list(range(epochs))
    # A head that only coordinates: every training worker and attribution actor ran on a worker node.
    assert f"joined the Ray cluster at {cluster.address}" in again.stdout
    nodes = cluster.nodes()
    assert "head" in nodes.values() and "w3" in nodes.values()
    for kind in ("RayTrainWorker", "Explainer"):
        placed = {nodes.get(a["node_id"], "a node since removed") for a in cluster.actors(kind)}
        assert placed and "head" not in placed, (kind, placed)


def test_a_lost_worker_is_told_apart_from_a_failing_training_by_the_errors_ray_raises():
    import ray.exceptions
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from study.training.crossval import _failure_message

    def task_error(worker_failure: Exception) -> Exception:  # what ray.get raises for a fold's task
        group = ray.train.WorkerGroupError("Training failed due to worker errors:", {0: worker_failure})
        return ray.exceptions.RayTaskError("fold", "traceback", group).as_instanceof_cause()

    lost = _failure_message(
        2, task_error(WorkerHealthCheckFailedError("health check", ray.exceptions.ActorDiedError())), 1
    )
    assert lost.startswith("fold 2's training failed (a worker or its node was lost) after 1 restart(s)")
    failed = _failure_message(2, task_error(ValueError("input grid too small")), 1)
    assert failed.startswith("fold 2's training failed: ValueError: input grid too small. Finished folds are kept")
    assert "max_failures" not in failed  # restarting would not help


# What each of cluster.yaml's worker types has, scaled down to this machine (cluster.yaml lets Ray detect them).
FAKE_RESOURCES = {"worker.gpu1": {"CPU": 1, "GPU": 1}, "worker.gpu4": {"CPU": 2, "GPU": 4}}


def fake_autoscaling(cluster_yaml: Path) -> dict:
    """cluster.yaml's worker types, min 0, for Ray's fake multi-node provider (workers are local raylets)."""
    spec = yaml.safe_load(cluster_yaml.read_text())
    workers = {
        name: {
            "resources": {**FAKE_RESOURCES[name], "object_store_memory": 100_000_000},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        }
        for name in spec["available_node_types"]
        if name != spec["head_node_type"]
    }
    return {
        "cluster_name": "fake",
        "max_workers": 2,
        "upscaling_speed": spec["upscaling_speed"],
        "idle_timeout_minutes": 0.1,  # cluster.yaml: 10
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **workers,
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts_sync_continuously": False,
    }


@pytest.mark.slow
def test_an_autoscaling_cluster_adds_workers_for_a_study_and_removes_them_when_idle(tmp_path, cohort_dir):
    from tests.test_study import study_config

    cluster = LocalCluster((), autoscaling=fake_autoscaling(Path(__file__).parents[1] / "cluster.yaml"))
    try:
        assert cluster.nodes() == {next(iter(cluster.nodes())): "head"}  # min 0 workers: the head alone
        # As paper.yaml on cluster.yaml: the GPU nodes are not up yet; the study must not be refused for it.
        config = study_config(tmp_path, cohort_dir, resources={"wait_for_nodes": True})
        (tmp_path / "study.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        with (tmp_path / "job.log").open("w+") as log:
            job = cluster.submit(tmp_path / "study.yaml", log)
            added = set()
            while job.poll() is None:
                status = ray_cli("status", "--address", cluster.address, env=cluster.env()).stdout
                added |= set(re.findall(r"^\s*\d+ (worker\.\w+)", status.split("Pending:")[0], re.MULTILINE))
                time.sleep(4)  # each `ray status` takes most of a core for a second: the study needs the cores
            log.seek(0)
            output = log.read()
        assert job.returncode == 0, output[-4000:]
        assert added and added <= set(FAKE_RESOURCES), added  # the study's work brought cluster.yaml's workers
        deadline = time.time() + 120
        while len(cluster.nodes()) > 1 and time.time() < deadline:  # idle workers go (after 6 s here)
            time.sleep(2)
        assert list(cluster.nodes().values()) == ["head"]
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_study_lost_with_its_head_resumes_when_resubmitted(tmp_path, synthetic_root):
    # A head restart (no GCS fault tolerance) takes its jobs with it: Ray's job supervisor kills the study's
    # driver, and Ray forgets the job. The study's state is on disk, so the same `ray job submit` resumes it.
    config = write_config(
        tmp_path,
        synthetic_root,
        train={"epochs": 10, "batch_size": 4},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        output_dir=str(tmp_path / "runs"),
    )

    def submit(cluster: LocalCluster, log: Path, driver_env: dict[str, str] | None = None) -> subprocess.Popen:
        with log.open("w") as output:
            return cluster.submit(config, output, driver_env)

    cluster = LocalCluster(("w1",))
    first_fold = tmp_path / "runs" / "multinode" / "latest" / "folds" / "fold0.json"
    try:
        # The orphaned driver below waits this long for its lost head (Ray's default: 60 s), then ends
        job = submit(cluster, tmp_path / "first.log", {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"})
        deadline = time.time() + 300
        while not first_fold.exists() and time.time() < deadline:
            assert job.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            time.sleep(0.5)
        assert first_fold.exists(), (tmp_path / "first.log").read_text()[-4000:]
        before = first_fold.stat().st_mtime_ns
    finally:
        cluster.remove("head")  # the head goes first, mid-way through fold 1 (then its worker)
        cluster.stop()
    assert job.wait(timeout=120) != 0
    lost = (tmp_path / "first.log").read_text()
    # The job went with the head: `ray job submit` lost its connection; the study never got to say anything.
    assert "WebSocket closed" in lost and "error: fold" not in lost, lost[-4000:]
    state = json.loads((tmp_path / "runs" / "multinode" / "latest" / "state.json").read_text())
    assert not state["finished"]
    gone = submit(cluster, tmp_path / "gone.log")  # submitting while the head is away says so
    assert gone.wait(timeout=120) != 0
    assert f"Failed to connect to Ray at address: {cluster.dashboard}" in (tmp_path / "gone.log").read_text()
    # A driver whose supervisor was killed outright lives on until Ray's GCS reconnect timeout (10 s here) ends it,
    # and holds its execution until then: a resubmission meanwhile is refused, by design (issue 30). It must end.
    execution = (tmp_path / "runs" / "multinode" / "latest").resolve()
    deadline = time.time() + 120
    while running(execution) and time.time() < deadline:
        time.sleep(1)
    assert running(execution) is None, "the lost head's driver still holds its execution"

    cluster = LocalCluster(("w1",))  # the head is back (here at new ports)
    try:
        again = submit(cluster, tmp_path / "again.log")
        assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-4000:]
    finally:
        cluster.stop()
    output = (tmp_path / "again.log").read_text()
    assert "resuming study multinode" in output, output[-4000:]
    assert first_fold.stat().st_mtime_ns == before  # the finished fold was not trained again
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    studies = mlflow.search_runs(
        experiment_names=["multinode"], filter_string="tags.`study.level` = 'study'", output_format="list"
    )
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
