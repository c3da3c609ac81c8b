"""Shared fixtures: a real local Ray (2 CPUs) and small synthetic cohorts on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from study.config import CohortConfig, PreprocessConfig
from study.synth import synthesize_cohort

VOXEL_MM = 8.0  # 23 x 27 x 23 voxels: enough anatomy for the checks, fast on 2 cores


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    """One real local Ray for the whole test session.

    With its dashboard: Ray Train V2 finds dead training runs through the state
    API, and without it leaks their placement groups (and so their CPUs).
    """
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A pristine 12-subject synthetic cohort; copy it before changing it."""
    root = tmp_path_factory.mktemp("synthetic") / "cohort"
    synthesize_cohort(root, subjects=12, voxel_size=VOXEL_MM, seed=3)
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
