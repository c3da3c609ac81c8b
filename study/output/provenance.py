"""Where a study's runs came from: package versions, the git commit, who ran what command, the resolved config."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import yaml

from study.config import StudyConfig
from study.output.tracking import without_credentials
from study.storage import project_dir

PACKAGES = ("study", "torch", "ray", "mlflow", "optuna", "nibabel", "nilearn", "numpy")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in PACKAGES:
        try:
            found[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            found[f"version.{package}"] = "not installed"
    return found


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own tags for who ran the study and from what, shown in its run list (User, Source)."""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": without_credentials(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a name
        pass
    return tags


def shareable(value: Any) -> Any:
    """``value`` (a path, text, or a config's dump) as a run may show it to everyone who reads the tracking
    server: no URI credentials, and paths inside the project directory relative to it (a home directory
    says who ran the study and where)."""
    value = without_credentials(value)
    if isinstance(value, dict):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path, project = Path(value), project_dir()
        return str(path.relative_to(project)) if path.is_relative_to(project) else value
    return value


def config_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML, as a researcher would write it (:func:`shareable`: relative to the project)."""
    return yaml.safe_dump(shareable(config.model_dump(mode="json")), sort_keys=False)
