"""Study configs: typos and wrong types are errors that name the key and the valid ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.config import ConfigError, load_config
from study.storage import join
from study.output.tracking import default_uri


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_unknown_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: x}\ncv: {outer_fold: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "cv.outer_fold: unknown key; valid keys here: inner_folds, outer_folds, seed" in str(err.value)


def test_wrong_type_and_missing_key(tmp_path):
    path = write(tmp_path, "name: s\npreprocess: {voxel_size: big}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "preprocess.voxel_size" in str(err.value) and "cohort: required key is missing" in str(err.value)


def test_overrides_and_defaults(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: data}\n")
    config = load_config(path, ["cv.outer_folds=3", "preprocess.shape=[58, 70, 58]"])
    assert config.cv.outer_folds == 3 and config.preprocess.grid.shape == (58, 70, 58)
    assert config.cohort.root.is_absolute()
    assert load_config(path).preprocess.grid.shape == (91, 109, 91)
    with pytest.raises(ConfigError, match="cv.folds: unknown key"):
        load_config(path, ["cv.folds=3"])


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"demo", "demo_search", "demo_gpu", "paper"}
    for path in configs:
        config = load_config(path)
        assert config.name == path.stem


def test_relative_paths_resolve_in_the_project_directory(tmp_path, monkeypatch):
    path = tmp_path / "study.yaml"
    path.write_text("name: s\ncohort: {root: cohort}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).cohort.root == tmp_path / "cohort"
    assert default_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A submitted Ray job runs in a temporary copy of its working dir: results go to ~/study instead ...
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert load_config(path).output_dir == Path.home() / "study" / "study_data" / "runs"
    # ... or to $STUDY_HOME, where a cluster's shared file system is.
    monkeypatch.setenv("STUDY_HOME", str(tmp_path / "shared"))
    assert load_config(path).cohort.root == tmp_path / "shared" / "cohort"
    assert default_uri() == f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"


def test_storage_locations_join_paths_and_cloud_uris():
    assert join("s3://bucket/ray", "demo", "run1") == "s3://bucket/ray/demo/run1"  # Path would give s3:/bucket
    assert join(Path("/data/runs"), "ray") == "/data/runs/ray"
