"""An execution's state and lock: one driver at a time, and no file read back decides what is deleted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.errors import StudyError
from study.pipeline import study_dir
from study.state import LOCK_FILE, StudyState, list_executions, resume_or_start
from study.storage import release_held
from tests.test_study import study_config

HOLD = (
    "import sys, time; from pathlib import Path; from study.storage import hold_exclusive; "
    "assert hold_exclusive(Path(sys.argv[1]), 'pid 999 on the other host, since noon') is None; "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def config_file(tmp_path, synthetic_root):
    config = study_config(tmp_path, synthetic_root)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return config, path


def held_elsewhere(lock: Path) -> subprocess.Popen:
    """Another driver: a process that holds the execution's lock until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_driver_is_refused_and_clean_keeps_the_running_execution(config_file, capsys):
    config, path = config_file
    older, older_dir, _ = resume_or_start(config, study_dir(config), restart=False)
    release_held()  # this driver ended; another one runs the older execution now
    other = held_elsewhere(older_dir / LOCK_FILE)
    try:
        with pytest.raises(
            StudyError,
            match=f"execution {older.execution} of study tiny is being run by another "
            r"driver \(pid 999 on the other host, since noon\)",
        ):
            resume_or_start(config, study_dir(config), restart=False)
        newer, _, resumed = resume_or_start(config, study_dir(config), restart=True)  # beside it: allowed
        assert not resumed and newer.execution != older.execution
        release_held()
        assert main(["clean", str(path), "--unfinished", "--yes"]) == 0
        out = capsys.readouterr().out
        assert "keep (running now: pid 999 on the other host, since noon)" in out and older_dir.exists()
    finally:
        other.kill()
        other.wait()
    assert main(["clean", str(path), "--unfinished", "--yes"]) == 0  # no longer running: deleted
    assert not older_dir.exists(), capsys.readouterr().out


def test_a_forged_or_broken_state_file_is_named_and_deletes_nothing(config_file, tmp_path, capsys):
    config, path = config_file
    state, directory, _ = resume_or_start(config, study_dir(config), restart=False)
    release_held()
    victim = tmp_path / "victim"
    victim.mkdir()
    forged = json.loads(StudyState.path(directory).read_text()) | {"execution": "../../victim"}
    StudyState.path(directory).write_text(json.dumps(forged))
    with pytest.raises(StudyError, match=r"names execution '../../victim', not its folder"):
        list_executions(study_dir(config))
    assert main(["clean", str(path), "--unfinished", "--yes", "--keep", "1"]) == 2
    assert "names execution '../../victim'" in capsys.readouterr().err and victim.exists() and directory.exists()
    StudyState.path(directory).write_text("")  # what a power cut could leave without fsync
    assert main(["clean", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{StudyState.path(directory)}: unreadable execution state" in err and "Traceback" not in err


def test_a_finished_folds_checkpoint_of_another_network_class_is_refused(tmp_path, synthetic_root):
    """A checkpoint names the class its network is built from: a forged one would import code on resume."""
    from types import SimpleNamespace

    import pandas as pd
    import torch
    from ray.train import Checkpoint

    from study.training.checkpoint import CHECKPOINT_FILE
    from study.training.crossval import cross_validate
    from study.training.folds import FoldResult
    from study.training.models import Network, build_model, model_record
    from study.training.trainer import TrainingSetup

    config = study_config(tmp_path, synthetic_root)  # the study's CNN
    checkpoint = tmp_path / "ray" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    other = Network.model_validate({"class": "tests.networks:TinyNet"})
    torch.save(model_record(build_model(other, (23, 27, 23))), checkpoint / CHECKPOINT_FILE)
    fold = FoldResult(
        0,
        TrainingSetup(config.model, config.train),
        pd.DataFrame({"epoch": [0]}),
        Checkpoint(str(checkpoint)),
        {"roc_auc": 0.5},
        pd.DataFrame({"subject_id": ["0001"]}),
        {"training": 1.0},
        None,
    )
    (tmp_path / "folds").mkdir()
    (tmp_path / "folds" / "fold0.json").write_text(fold.to_json())
    study = SimpleNamespace(config=config, directory=tmp_path, storage=str(tmp_path / "ray"))
    with pytest.raises(
        StudyError,
        match="its checkpoint's network is tests.networks:TinyNet, the config's the "
        "study CNN: loading it would import code",
    ):
        next(cross_validate(study))
