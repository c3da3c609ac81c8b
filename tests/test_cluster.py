"""Running where users run: `ray job submit` to a token-protected head, and `cluster.yaml`.

`cluster.yaml` is checked with the Ray autoscaler's own config preparation and
schema (what `ray up` runs first), so a typo fails here rather than on AWS.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import requests
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import ray_cli


def submit(ray_head, job_dir: Path, *entrypoint: str, env: dict[str, str] | None = None):
    """``ray job submit --working-dir job_dir -- entrypoint`` from outside the cluster; waits for the end."""
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    return ray_cli(
        "job",
        "submit",
        "--address",
        ray_head.dashboard,
        "--working-dir",
        str(job_dir),
        "--",
        *entrypoint,
        env=env,
        timeout=900,
    )


@pytest.mark.slow
def test_job_api_refuses_requests_without_the_token(ray_head, tmp_path):
    assert requests.get(f"{ray_head.dashboard}/api/jobs/", timeout=10).status_code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    answer = requests.get(f"{ray_head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200
    # A client that does not send the token is refused, whatever it submits.
    (tmp_path / "hello.py").write_text("print('hello')\n")
    anonymous = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    refused = submit(ray_head, tmp_path, sys.executable, "hello.py", env=anonymous)
    assert refused.returncode != 0
    assert "Unauthorized" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_a_failing_study_fails_its_job_with_the_reason(ray_head, tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\ncohort: {root: nowhere}\ntrain: {epoch: 3}\n")
    job = submit(ray_head, tmp_path, str(Path(sys.executable).parent / "study"), "run", "typo.yaml")
    assert job.returncode != 0
    assert "train.epoch: unknown key" in job.stdout + job.stderr


def cluster_config() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text())


def validated(config: dict) -> dict:
    """The cluster config as `ray up` would use it: defaults filled in, checked against Ray's schema."""
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_autoscaler_validation():
    config = validated(cluster_config())
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")  # the pinned Ray
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert len(workers) >= 2 and all(w["min_workers"] == 0 for w in workers.values())  # GPUs only on demand
    assert all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers.values())
    # Secure by default: the token on every node, token mode for every Ray process, MLflow on loopback.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "mlflow server --host 127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert not re.search(r"AKIA|aws_secret|SecretAccessKey", (Path(__file__).parents[1] / "cluster.yaml").read_text())
    # Least privilege: no node has Ray's default profile (EC2 and S3 full access), no container is privileged.
    profiles = {k: v["node_config"]["IamInstanceProfile"]["Name"] for k, v in config["available_node_types"].items()}
    assert profiles == {"head.cpu": "study-head", "worker.gpu1": "study-worker", "worker.gpu4": "study-worker"}
    assert not any("--privileged" in option for option in config["docker"]["run_options"])
    assert any("mount -t nfs4" in c for c in config["initialization_commands"])  # EFS on the host


def test_the_instance_profiles_allow_the_study_bucket_and_this_cluster_only():
    root = Path(__file__).parents[1] / "iam"
    worker, head = (json.loads((root / f"{name}-policy.json").read_text())["Statement"] for name in ("worker", "head"))
    assert {a for s in worker for a in s["Action"]} == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:ListBucket",
    }
    assert all(s["Resource"].startswith("arn:aws:s3:::STUDY_BUCKET") for s in worker)
    assert not any("*" in a for s in head for a in s["Action"])  # no wildcard action
    stops = next(s for s in head if "ec2:TerminateInstances" in s["Action"])
    assert stops["Condition"] == {
        "StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster_config()["cluster_name"]}
    }
    passes = next(s for s in head if "iam:PassRole" in s["Action"])
    assert all(r.endswith("/study-worker") for r in passes["Resource"])


def test_cluster_yaml_typos_fail_validation():
    config = cluster_config()
    config["available_node_types"]["worker.gpu1"]["min_worker"] = 1  # for min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validated(config)
