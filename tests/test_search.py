"""Architecture search nested in the CV: Optuna space, no leaks, MLflow trial runs, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref

import mlflow
import optuna
import pandas as pd
import pytest
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.config import SearchConfig, parse_config
from study.errors import ConfigError
from study.output.publish import Publisher
from study.pipeline import run_study, study_dir
from study.runtime import environment, interrupts_kept
from study.training.search import DefineByRun, _restorable
from tests.test_study import assert_views_find, runs_of, study_config

SPACE = {
    "width": {"choice": [2, 4]},
    "blocks": {"choice": [2, 3]},
    "kernel_size": {"choice": [1, 3], "when": "blocks > 2"},  # any choice fits the 8 mm test grid
    "lr": {"loguniform": [0.0005, 0.005]},
    "epochs": {"choice": [2, 3]},  # recipe keys beside the architecture's: the inner CV chooses them too
    "augment_strength": {"uniform": [0.5, 1.5]},
}


def test_space_is_define_by_run_with_conditionals():
    define = DefineByRun(SearchConfig(space=SPACE).space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        define(trial)
        assert ("kernel_size" in trial.params) == (trial.params["blocks"] > 2)
        assert 0.0005 <= trial.params["lr"] <= 0.005 and trial.params["width"] in (2, 4)


def test_recipe_keys_of_a_search_set_the_training_recipe():
    from study.config import TrainConfig
    from study.training.models import Architecture
    from study.training.trainer import TrainingSetup

    setup = TrainingSetup(Architecture(), TrainConfig()).with_params(
        {"width": 4, "lr": 0.01, "weight_decay": 0.1, "epochs": 7, "augment_strength": 0.5}
    )
    assert setup.architecture.width == 4 and setup.train.lr == 0.01 and setup.train.weight_decay == 0.1
    assert setup.train.epochs == 7 and setup.train.augment.strength == 0.5
    assert setup.train.augment.rotation_deg == TrainConfig().augment.rotation_deg  # the rest of the recipe stays
    with pytest.raises(ConfigError, match="augment_strength: value -1.0 is not valid"):
        parse_config(
            {"name": "s", "cohort": {"root": "x"}, "search": {"space": {"augment_strength": {"uniform": [-1, 1]}}}}
        )


def test_a_search_samples_a_network_of_ones_own_through_its_keyword_arguments(tmp_path):
    """What a search trial and the fold after it train, for a network of a researcher's own (``model.class``):
    the sampled keys are the network's keyword arguments (recipe keys go to the recipe), checked against its
    signature when the config is read, and the setup reads back whole from the fold's JSON."""
    from ray.train import Checkpoint

    from study.config import TrainConfig
    from study.training.folds import FoldResult
    from study.training.trainer import TrainingSetup

    config = parse_config(
        {
            "name": "s",
            "cohort": {"root": "x"},
            "preprocess": {"voxel_size": 8.0},
            "model": {"class": "tests.networks:TinyNet", "channels": 2},
            "search": {"space": {"channels": {"choice": [2, 3]}, "lr": {"choice": [0.01]}}},
        }
    )
    setup = TrainingSetup(config.model, config.train).with_params({"channels": 3, "lr": 0.01})
    assert setup.architecture.factory == "tests.networks:TinyNet" and setup.architecture.kwargs["channels"] == 3
    assert setup.train.lr == 0.01 and "lr" not in setup.architecture.kwargs
    predictions = pd.DataFrame({"subject_id": ["01"]})
    fold = FoldResult(0, setup, pd.DataFrame({"epoch": [0]}), Checkpoint(str(tmp_path)), {}, predictions, {})
    assert FoldResult.from_json(fold.to_json()).setup == setup
    with pytest.raises(ConfigError, match="width"):  # not a keyword argument of TinyNet
        parse_config({**config.model_dump(mode="json"), "search": {"space": {"width": {"choice": [2, 3]}}}})
    assert TrainConfig() == config.train


def test_unsearchable_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"search.space: cannot search 'patience'; searchable keys: blocks, width"):
        parse_config({"name": "s", "cohort": {"root": "x"}, "search": {"space": {"patience": {"choice": [1, 2]}}}})
    with pytest.raises(ConfigError, match="exactly one of choice"):
        parse_config(
            {"name": "s", "cohort": {"root": "x"}, "search": {"space": {"lr": {"choice": [1], "uniform": [0, 1]}}}}
        )


def _loss(config):
    tune.report({"loss": config["x"]})


def _two_trial_search(storage) -> tune.ResultGrid:
    searcher = OptunaSearch(space={"x": tune.uniform(0, 1)}, metric="loss", mode="min")
    tuner = tune.Tuner(
        _loss,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=1), num_samples=2, metric="loss", mode="min"
        ),
        run_config=tune.RunConfig(name="fold1", storage_path=str(storage), verbose=0),
    )
    with environment(TUNE_DISABLE_SIGINT_HANDLER="1"):  # as the study runs Tune: else Tune's Ctrl-C handler stays
        return tuner.fit()


@pytest.mark.slow
def test_search_stopped_before_tune_saved_its_trials_starts_over_with_all_trials(tmp_path):
    path = tmp_path / "fold1"
    _two_trial_search(tmp_path)
    assert _restorable(str(path))  # a search that saved its trials continues
    # What Ctrl-C leaves when it lands before Tune's first save: the tuner's file and a searcher
    # checkpoint that counts trials, but no experiment state. Restored, it ran 1 trial of 2.
    for item in path.iterdir():
        if item.name.startswith("experiment_state-") or item.is_dir():
            os.remove(item) if item.is_file() else shutil.rmtree(item)
    assert (path / "tuner.pkl").exists()
    assert not _restorable(str(path))
    assert not any(path.iterdir())
    assert len(_two_trial_search(tmp_path)) == 2


def search_config(tmp_path, cohort_dir, num_samples: int = 2):
    return study_config(
        tmp_path,
        cohort_dir,
        train={"epochs": 3, "patience": 3},
        search={"space": SPACE, "num_samples": num_samples, "max_concurrent": 1, "grace_period": 1},
    )


def trial_runs(config, parent_id):
    _, folds = runs_of(config, parent_id)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(config.name).experiment_id
    return {
        f.data.tags["study.fold"]: client.search_runs([experiment], f"tags.mlflow.parentRunId = '{f.info.run_id}'")
        for f in folds
    }


@pytest.mark.slow
def test_search_never_reads_held_out_subjects_and_logs_trials(tmp_path, cohort_dir, monkeypatch):
    config = search_config(tmp_path, cohort_dir)
    client = mlflow.MlflowClient(config.tracking.uri)
    seen = []  # each trial epoch as it came: (fold, trial, the trial run's status and val_loss points right after)
    live = Publisher.searching

    def watched(self, study):
        log = live(self, study)

        def event(fold, kind, trial_id, params, result):
            log(fold, kind, trial_id, params, result)
            if kind == "result":
                (run,) = client.search_runs(
                    [client.get_experiment_by_name(config.name).experiment_id], f"tags.`study.trial` = '{trial_id}'"
                )
                seen.append(
                    (fold, trial_id, run.info.status, len(client.get_metric_history(run.info.run_id, "val_loss")))
                )

        return event

    monkeypatch.setattr(Publisher, "searching", watched)
    parent_id = run_study(config, audit=True)
    splits = json.loads((study_dir(config) / "latest" / "splits.json").read_text())["folds"]
    for fold in splits:
        audit = study_dir(config) / "latest" / "audit" / f"fold{fold['fold']}_search"
        trials = list(audit.iterdir())
        assert len(trials) == 2
        for trial in trials:
            read = {
                s
                for line in (trial / "rank0.jsonl").read_text().splitlines()
                for s in json.loads(line).get("subjects", [])
            }
            assert read and not read & set(fold["test"])  # the search never saw the test fold
            assert read <= set(fold["train"])
    by_fold = trial_runs(config, parent_id)
    assert sorted(by_fold) == ["0", "1"]
    # Trials were runs while they trained: each epoch on its running trial's curve as it came.
    for fold, trial in {(f, t) for f, t, _, _ in seen}:
        points = [(status, n) for f, t, status, n in seen if (f, t) == (fold, trial)]
        assert points == [("RUNNING", i + 1) for i in range(len(points))], points
    for runs in by_fold.values():
        assert len(runs) == 2
        for run in runs:  # the search's end added nothing twice
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
            assert len(steps) == len(set(steps)) == len([s for s in seen if s[1] == run.data.tags["study.trial"]])
        assert all(r.data.tags["study.trial_status"] in {"completed", "stopped_early"} for r in runs)
        assert all({"width", "blocks", "lr", "epochs", "augment_strength"} <= set(r.data.params) for r in runs)
        for run in runs:  # each trial trained for its own sampled number of epochs at most
            points = client.get_metric_history(run.info.run_id, "val_loss")
            assert 1 <= len(points) <= int(run.data.params["epochs"]), run.data.params
    parent, folds = runs_of(config, parent_id)
    assert all(any(k.startswith("best.") for k in f.data.params) for f in folds)
    trials = [run for runs in by_fold.values() for run in runs]
    assert_views_find(client, parent.info.experiment_id, {"study-folds": folds, "study-trials": trials})
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id)}
    assert "search_best_configs.tsv" in artifacts


def test_a_ctrl_c_that_lands_in_a_garbage_collector_callback_still_stops_the_study():
    # CI once saw the test below fail: its Ctrl-C arrived while SQLAlchemy's weakref callback ran, CPython
    # printed "Exception ignored in: <function _collection_gced ...> KeyboardInterrupt" and the study went on.
    class Collected:
        pass

    def interrupted_while_running(ref: weakref.ref) -> None:  # as if Ctrl-C arrived during this callback
        raise KeyboardInterrupt

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, as a study's driver has it
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_kept():
                collected = Collected()
                ref = weakref.ref(collected, interrupted_while_running)
                del collected  # the callback runs and its exception is unraisable
                for _ in range(100):  # the study's next lines: the interrupt must reach them
                    time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert ref() is None


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "killed"])
def test_interrupted_search_study_resumes_without_duplicates(tmp_path, cohort_dir, stop):
    # One trial per fold: the stop lands as fold 1's first trial starts, so a second would only add time; a
    # search restored with fewer trials than configured (or a trial run twice) still shows as a count other than 1.
    config = search_config(tmp_path, cohort_dir, num_samples=1)
    (tmp_path / "config.json").write_text(config.model_dump_json())
    script = (
        "import sys; from study.config import StudyConfig; from study.pipeline import run_study; "
        f"run_study(StudyConfig.model_validate_json(open({str(tmp_path / 'config.json')!r}).read()))"
    )
    # The study's driver joins the test's Ray head (RAY_ADDRESS, set by conftest), as `ray job submit`
    # would, so that killing it leaves the cluster (and its dashboard, which Ray Train needs) running.
    log = tmp_path / "interrupted.log"  # the interrupted study's output, so that a failure explains itself
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", script], start_new_session=True, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            first_fold = study_dir(config) / "latest" / "folds" / "fold0.json"
            deadline = time.time() + 600
            while not first_fold.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(1)
            assert first_fold.exists(), "the first fold never finished:\n" + log.read_text()[-3000:]
            before = first_fold.stat().st_mtime_ns
            os.killpg(process.pid, stop)  # Ctrl-C, or a killed driver, during the second fold's search
            try:
                code = process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the study went on for 180 s after {stop.name}:\n" + log.read_text()[-5000:])
        finally:  # a driver left running would hold the test head's CPUs, and every later study would wait
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert code != 0, f"the study ignored {stop.name} (exit {code}):\n" + log.read_text()[-5000:]

    state = json.loads((study_dir(config) / "latest" / "state.json").read_text())
    assert not state["finished"]
    parent_id = run_study(config)
    assert parent_id == state["parent_run"]  # the same MLflow run, continued
    assert first_fold.stat().st_mtime_ns == before  # the finished fold was not redone
    parent, folds = runs_of(config, parent_id)
    assert parent.info.status == "FINISHED" and len(folds) == 2
    studies = mlflow.search_runs(
        experiment_names=[config.name], filter_string="tags.`study.level` = 'study'", output_format="list"
    )
    assert len(studies) == 1
    for fold, runs in trial_runs(config, parent_id).items():
        ids = [r.data.tags["study.trial"] for r in runs]
        assert len(ids) == len(set(ids)) == 1, (fold, ids)  # as configured, none duplicated
