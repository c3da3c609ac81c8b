"""Shared fixtures: small synthetic cohorts on disk and, for the slow tier only, a real Ray head on 127.0.0.1.

Two tiers: ``python -m pytest`` runs the fast one (plain functions, real NIfTI files and MLflow stores, no Ray);
``python -m pytest -m slow`` the end-to-end one (real Ray, real MLflow, ``study`` as users type it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Ray reads its authentication mode once, at import: the tests' driver must send the token.
os.environ["RAY_AUTH_MODE"] = "token"
import ray  # noqa: E402

from study.config import PreprocessConfig
from study.data.cache import CacheBuild, build_cache
from study.data.cohort import Cohort, CohortConfig
from study.data.synth import SyntheticCohort, synthesize_cohort
from study.tasks import map_in_process

VOXEL_MM = 8.0  # the study grid of most tests, 23 x 27 x 23 voxels: enough anatomy for the checks, fast on 2 cores
SOURCE_MM = (4.0, 5.0)  # the synthetic images: coarse for speed, fine enough to pass the MNI overlap check


@dataclass(frozen=True)
class RayHead:
    """The test session's Ray head: its GCS address and its dashboard (the job API)."""

    address: str
    dashboard: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this environment's ``ray`` command line; the result keeps its output."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run(
        [ray_bin, *args], env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout
    )


def pytest_collection_modifyitems(config, items) -> None:
    """A fast test that asks for the Ray head is refused at collection, before any Ray starts."""
    fast_with_ray = [
        item.nodeid for item in items if "ray_head" in item.fixturenames and not item.get_closest_marker("slow")
    ]
    if fast_with_ray:
        raise pytest.UsageError("these tests use the Ray head but are not marked slow: " + ", ".join(fast_with_ray))


@pytest.fixture(autouse=True)
def _ray_in_slow_tests_only(request, monkeypatch) -> None:
    """Two tiers: a slow test gets the session's Ray head; a fast one may not start Ray at all.

    The fast tier (the README's ``python -m pytest``) tests the plain functions under the stages and answers in
    minutes; a fast test that started Ray (``ray.init``, or a ``.remote`` call that starts one on its own) would
    pay Ray's start-up and hide a missing seam, so it fails and says what to do.
    """
    if request.node.get_closest_marker("slow"):
        request.getfixturevalue("ray_head")
    elif not ray.is_initialized():

        def refused(*args, **kwargs):
            raise AssertionError(
                f"{request.node.nodeid} started Ray: mark it @pytest.mark.slow (the end-to-end tier), or test the "
                "plain function under the stage without Ray"
            )

        monkeypatch.setattr(ray, "init", refused)
        # A `study` subprocess would start a Ray of its own: it gets an address that names this rule instead.
        monkeypatch.setenv("RAY_ADDRESS", "no-ray-in-fast-tests:6379")


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One real Ray for the whole session, started as users start a cluster head.

    ``ray start --head`` on 127.0.0.1 with 2 CPUs, token authentication and the
    dashboard (the job API; Ray Train V2 also needs it, or it leaks the
    placement groups of dead runs). The tests' driver joins it, as do the
    ``study run`` subprocesses that get ``RAY_ADDRESS``. Its files live in a
    private temp dir, so a command run as a new user would run it (no
    ``RAY_ADDRESS``) does not find it and starts a Ray of its own. At the end
    only its own processes are stopped (``ray stop`` would stop every Ray on
    the machine, a researcher's running study included).
    """
    ray_cli("get-auth-token", "--generate").check_returncode()
    port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Every port its own, so that a Ray a researcher runs on this machine keeps its defaults (a second
    # dashboard agent on the default port fails to start, and jobs then have no agent to run them).
    agent_ports = [
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
    ]
    started = ray_cli(
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        *agent_ports,
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    )
    assert started.returncode == 0, started.stdout + started.stderr
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    os.environ["RAY_ADDRESS"] = head.address
    try:
        ray.init(address=head.address, log_to_driver=False)
        wait_for_job_agent()
        yield head
    finally:
        ray.shutdown()
        stop_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_agent(timeout: float = 120) -> None:
    """Wait until the head's dashboard agent has registered: before that, a job submission fails
    ("No available agent to submit job") when the machine is slow to start it."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    key = f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{ray.get_runtime_context().get_node_id()}"
    deadline = time.time() + timeout
    while not _internal_kv_get(key, namespace=KV_NAMESPACE_DASHBOARD):
        assert time.time() < deadline, f"the head's dashboard agent did not start in {timeout} s"
        time.sleep(0.5)


def stop_processes_of(*temp_dirs: str) -> None:
    """Stop the Ray processes whose command line names one of ``temp_dirs`` (those of ``ray start``s), together.

    A head's GCS and raylet outlive SIGTERM by 20 s or more, so what is left after 5 s is killed.
    """
    import psutil  # Ray puts its own copy on the path

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in " ".join(process.info["cmdline"] or []) for temp_dir in temp_dirs):
            mine.append(process)
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=5)
    for process in alive:
        process.kill()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A pristine 12-subject synthetic cohort; copy it before changing it."""
    root = tmp_path_factory.mktemp("synthetic") / "cohort"
    synthesize_cohort(root, SyntheticCohort(subjects=12, voxel_sizes=SOURCE_MM, seed=3), tasks=map_in_process)
    return root


@pytest.fixture
def cohort_dir(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic cohort that a test may corrupt."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "cohort"))


@pytest.fixture
def preprocess_config(tmp_path) -> PreprocessConfig:
    return PreprocessConfig(voxel_size=VOXEL_MM, cache_dir=tmp_path / "cache")


def cohort_config(root: Path, **overrides) -> CohortConfig:
    return CohortConfig(root=root, **overrides)


def cache_for(cohort: Cohort, preprocess: PreprocessConfig) -> CacheBuild:
    """``build_cache`` with a config's preprocessing section, in this process (no Ray)."""
    return build_cache(cohort, preprocess.grid, preprocess.cache_dir, preprocess.normalize, tasks=map_in_process)
