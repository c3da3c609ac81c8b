"""The commands as a new user types them: an empty HOME, no RAY_* or MLFLOW_* variables, no Ray to join.

Every test here runs the installed ``study`` command in a subprocess with such an
environment, because a fixture that prepares Ray or MLflow for the code hides
exactly the bug a user meets first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import VOXEL_MM, free_port

STUDY = str(Path(sys.executable).parent / "study")


def new_user(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh shell: a new HOME, this venv on PATH, nothing of Ray or MLflow."""
    home.mkdir(parents=True, exist_ok=True)
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in {"PATH", "LANG", "LC_ALL", "TMPDIR"} and not k.startswith(("RAY_", "MLFLOW_"))
    }
    return {
        **keep,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{keep.get('PATH', '/usr/bin:/bin')}",
        **extra,
    }


def run_as_user(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([STUDY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(root: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in process ``root`` or its descendants
    (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            pass  # a process that just ended
    tree, grew = {root}, True
    while grew:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        tree, grew = grown, len(grown) > len(tree)
    owner = {}  # socket inode -> process name
    for pid in tree:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = name
        except OSError:
            pass
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port, 16), owner[fields[9]]))
    return found


def test_a_dead_cluster_address_is_one_error_line(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("name: s\ncohort: {root: nowhere}\nattribution: null\n")
    address = f"127.0.0.1:{free_port()}"
    result = run_as_user(["run", str(config)], tmp_path, new_user(tmp_path / "home", RAY_ADDRESS=address), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no Ray cluster answers at {address}")
    assert "Traceback" not in result.stderr and "unset it to run on a local Ray" in result.stderr


@pytest.mark.slow
def test_a_cluster_that_wants_its_token_is_one_error_line(tmp_path, ray_head):
    config = tmp_path / "s.yaml"
    config.write_text("name: s\ncohort: {root: nowhere}\nattribution: null\n")
    env = new_user(tmp_path / "home", RAY_ADDRESS=ray_head.address)  # no token, no RAY_AUTH_MODE
    result = run_as_user(["run", str(config)], tmp_path, env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not join the Ray cluster at {ray_head.address}")
    assert "export RAY_AUTH_MODE=token" in last and "Traceback" not in result.stderr


@pytest.mark.slow
def test_resources_no_node_has_are_refused_at_once(tmp_path, ray_head, synthetic_root):
    config = tmp_path / "s.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "cohort": {"root": str(synthetic_root)},
                "resources": {"use_gpu": True},
                "attribution": None,
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
            }
        )
    )
    env = {**os.environ, "RAY_ADDRESS": ray_head.address}  # the tests' token-holding environment
    result = run_as_user(["run", str(config)], tmp_path, env, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "a training worker" in last and "asks for 1 CPU, 1 GPU on one node" in last and "0 GPU" in last
    assert "resources.use_gpu=false" in last


@pytest.mark.slow
def test_a_local_ray_refuses_callers_without_its_token(tmp_path):
    probe = (
        "import requests, ray; from study.runtime import start_ray; print(start_ray()); "
        "url = 'http://' + ray._private.worker.get_dashboard_url(); "
        "print('anonymous', requests.get(url + '/api/jobs/', timeout=10).status_code)"
    )
    env = new_user(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "started a local Ray" in result.stdout and "anonymous 401" in result.stdout


def assert_a_new_users_ray_listens_on_loopback_only(sockets: set[tuple[str, int, str]], home: Path) -> None:
    """What a new user's `study run` opened: a local Ray of its own, with its token, on loopback only."""
    # Nothing Ray starts for the study listens beyond loopback (on Linux it binds every interface unless told).
    assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
    exposed = {(ip, port, name) for ip, port, name in sockets if ip not in LOOPBACK}
    # The one exception, in the README: the rendezvous (torch's TCPStore) that rank 0 of each fold's training
    # opens for torch.distributed binds every interface, and torch has no setting to keep it on loopback. It is
    # opened by the Ray Train worker while it runs `execute(_setup_torch_process_group)`, and Ray retitles the
    # process for each call it runs, so the same socket may be seen under the actor's title or any call's
    # (`ray::execute._s...`, `ray::execute._p...`: 15 characters of /proc comm).
    titles = {name for _, _, name in exposed}
    assert all(name == "ray::RayTrainWo" or name.startswith("ray::execute.") for name in titles), exposed
    assert len({(ip, port) for ip, port, _ in exposed}) <= 2, exposed  # one per fold
    assert (home / ".ray" / "auth_token").is_file()  # Ray made its token: the local Ray requires it


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "killed"])
def test_a_study_stopped_during_attribution_keeps_its_maps_and_the_rerun_goes_on(tmp_path, synthetic_root, stop):
    """Ctrl-C: as a new user types it, a shell with an empty HOME and nothing of Ray or MLflow (the study starts
    a local Ray of its own, twice); killed: a driver that joins the tests' Ray (a killed driver cannot stop a Ray
    it started)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "cohort").symlink_to(synthetic_root)
    (project / "slow maps.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "maps",
                "cohort": {"root": "cohort"},
                "preprocess": {"voxel_size": VOXEL_MM},
                "cv": {"outer_folds": 2, "inner_folds": 2},
                "model": {"preset": "mrinet", "width": 4},
                "train": {"epochs": 2, "batch_size": 4},
                "attribution": {
                    "methods": ["perturbation"],
                    "batch_size": 1,
                    "actors": 1,
                    "permutations": 10,
                    "perturbation": {"iterations": 150},
                    "sanity": {"subjects": 1, "label_randomization": False},
                },
            }
        )
    )
    # A killed driver cannot stop a Ray it started: that one joins the tests' head (RAY_ADDRESS, the token).
    home = tmp_path / "home"
    env = (
        new_user(home)
        if stop == signal.SIGINT
        else {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "STUDY_HOME"}
    )
    log = tmp_path / "interrupted.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [STUDY, "run", "slow maps.yaml", "--set", "cv.seed=0"],
            cwd=project,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        done, sockets = [], set()  # every listening socket of the study and the Ray it starts, while it runs
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None:
            sockets |= listening_sockets(process.pid)
            done = list((project / "study_data/runs/maps/latest/maps").glob("*/perturbation.done.npy"))
            if done and np.load(done[0]).sum() >= 2:  # a few subjects explained, the rest to come
                break
            time.sleep(0.5)
        assert done and process.poll() is None, log.read_text()[-4000:]
        os.killpg(process.pid, stop)  # Ctrl-C in the terminal reaches the whole process group; or killed
        sent = time.time()
        code = process.wait(timeout=60)
    kept = int(np.load(done[0]).sum())
    output = log.read_text()
    if stop == signal.SIGINT:
        assert code == 130 and time.time() - sent < 30, output[-4000:]
        assert_a_new_users_ray_listens_on_loopback_only(sockets, home)
        assert "started a local Ray" in output  # not joined to the tests' head
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
        assert "PreemptionWatcher" not in output
        last = output.strip().splitlines()[-1]
        assert last.startswith("interrupted: finished folds, search trials and maps are kept in") and last.endswith(
            "resume with: study run 'slow maps.yaml' --set cv.seed=0"
        ), last

    again = run_as_user(["run", "slow maps.yaml", "--set", "cv.seed=0"], project, env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming study maps" in again.stdout
    assert "time per stage" in again.stdout and "whole study (wall)" in again.stdout
    assert (project / "study_data" / "runs" / "maps" / "latest" / "report.html").is_file()
    assert np.load(done[0]).all()
    # The kept subjects were not explained again: the progress bar counted only the rest.
    assert f"explaining: 100%|██████████| {12 - kept}/{12 - kept}" in again.stderr, again.stderr[-2000:]
    # One study run, continued, with its two fold runs: none duplicated by the rerun.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")  # the default store, in the project
    runs = mlflow.search_runs(experiment_names=["maps"], output_format="list")
    levels = sorted(r.data.tags.get("study.level", "") for r in runs)
    assert levels == ["baseline", "baseline", "fold", "fold", "study"], levels
    assert all(r.info.status == "FINISHED" for r in runs)
