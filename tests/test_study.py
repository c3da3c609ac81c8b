"""`study run` end to end on a local Ray, checked in a real MLflow SQLite store."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml

from study.cli import main
from study.config import parse_config
from study.data.cache import CachedVolumes
from study.data.cohort import CohortConfig, load_cohort
from study.data.prepare import prepare_cohort
from study.errors import StudyError, TrackingError
from study.output.publish import Publisher
from study.pipeline import run_study, study_dir
from study.predict import Ensemble
from study.training import crossval
from study.training import live as live_module
from study.training.calibration import Calibration, logit_difference
from study.training.folds import FoldResult
from tests.conftest import cache_for
from tests.test_cohort import break_images, image_of


def study_config(tmp_path: Path, cohort_root: Path, **sections):
    data = {
        "name": "tiny",
        "cohort": {"root": str(cohort_root)},
        "preprocess": {"voxel_size": 8.0, "cache_dir": str(tmp_path / "cache")},
        "cv": {"outer_folds": 2, "inner_folds": 2},
        "model": {"preset": "mrinet", "width": 4},
        "train": {"epochs": 3, "batch_size": 2, "patience": 3},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "output_dir": str(tmp_path / "runs"),
        "attribution": None,  # the attribution stage has its own tests (test_explain.py)
    }
    for key, value in sections.items():  # a section given as a dict is merged into the tiny one
        merge = isinstance(value, dict) and "class" not in value  # a network of one's own replaces the CNN
        data[key] = {**(data.get(key) or {}), **value} if merge else value
    return parse_config(data)


def assert_views_find(client, experiment_id: str, runs_of_view: dict[str, list]) -> None:
    """The MLflow UI's saved views of the experiment: each view's filter finds exactly its runs, and each column
    it shows (and sorts by) is on at least one of them (a conditional search key is not on every trial)."""
    tags = client.get_experiment(experiment_id).tags
    views = {
        k.removeprefix("mlflow.sharedViewState."): json.loads(v)
        for k, v in tags.items()
        if k.startswith("mlflow.sharedViewState.")
    }
    assert {v["name"] for v in views.values()} == {"study: executions", "study: outer folds", "study: search trials"}
    for view_id, runs in runs_of_view.items():
        state = json.loads(views[view_id]["state"])
        found = client.search_runs([experiment_id], state["searchFilter"])
        assert sorted(r.info.run_id for r in found) == sorted(r.info.run_id for r in runs)
        for column in [*state["selectedColumns"], state["orderByKey"]]:
            kind, key = column.split(".", 1)
            if kind != "attributes":
                assert any(key.strip("`") in getattr(r.data, kind) for r in runs), (view_id, column)


def runs_of(config, parent_id, level="fold"):
    """The study's run and its child runs of one level (fold, or baseline)."""
    mlflow.set_tracking_uri(config.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[config.name], output_format="list")
    parent = next(r for r in runs if r.info.run_id == parent_id)
    children = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent_id and r.data.tags.get("study.level") == level
    ]
    return parent, children


@pytest.mark.slow
def test_ddp_study_logs_the_run_tree_and_trains_on_disjoint_shards(tmp_path, cohort_dir):
    config = study_config(tmp_path, cohort_dir, resources={"num_workers": 2}, train={"final_fit": "early_stopped"})
    parent_id = run_study(config, audit=True)

    parent, children = runs_of(config, parent_id)
    assert parent.info.status == "FINISHED"
    assert {
        "test_roc_auc_mean",
        "test_roc_auc_std",
        "test_balanced_accuracy_mean",
        "pooled_roc_auc",
        "pooled_roc_auc_p_vs_chance",
        "baseline_pooled_roc_auc",
        "cnn_minus_baseline_p",
    } <= set(parent.data.metrics)
    assert parent.data.tags["study.finding"] in {"yes", "none", "below_baseline"}
    _, baselines = runs_of(config, parent_id, "baseline")  # the linear baseline, one run per fold, comparable
    assert sorted(b.data.tags["study.fold"] for b in baselines) == ["0", "1"]
    assert all({"test_roc_auc", "test_balanced_accuracy"} <= set(b.data.metrics) for b in baselines)
    assert parent.data.params["cv.outer_folds"] == "2"
    assert sorted(c.data.tags["study.fold"] for c in children) == ["0", "1"]
    client = mlflow.MlflowClient()
    assert_views_find(client, parent.info.experiment_id, {"study-executions": [parent], "study-folds": children})
    # The UI opens on training runs (not MLflow 3's GenAI overview); the study says how far it got and where
    # its time went.
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["study.progress"] == "finished"
    times = pd.read_csv(client.download_artifacts(parent_id, "stage_times.tsv", str(tmp_path)), sep="\t")
    assert {"preprocessing", "training"} <= set(times.stage) and (times.seconds >= 0).all(), times
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"test_roc_auc", "test_accuracy", "val_loss", "train_loss"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) >= 2  # a curve, not a point
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"predictions.tsv", "roc.png", "confusion.png"} <= artifacts

    # The logged model loads and gives the predictions that were logged.
    cohort = load_cohort(config.cohort)
    cache = cache_for(cohort, config.preprocess).cache
    models = [
        m
        for m in mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
        if m.name == "model"
    ]  # each fold's (the study's ensemble has tests of its own)
    assert len(models) == 2
    for logged in models:
        fold_run = next(c for c in children if c.info.run_id == logged.source_run_id)
        table = pd.read_csv(
            mlflow.artifacts.download_artifacts(
                run_id=fold_run.info.run_id,
                artifact_path="predictions.tsv",
                dst_path=str(tmp_path / fold_run.info.run_id),
            ),
            sep="\t",
            dtype={"subject_id": str},
        )
        model = mlflow.pytorch.load_model(f"models:/{logged.model_id}").eval()
        data = CachedVolumes(cache, list(table.subject_id), np.zeros(len(table)))
        with torch.no_grad():
            log_odds = logit_difference(model(data.__getitems__(list(range(len(table))))[0]))
        np.testing.assert_allclose(log_odds, table.log_odds, atol=1e-4)  # the model's, before calibration
        logged_metrics = fold_run.data.metrics  # none when the inner split was too small to calibrate
        calibration = Calibration(
            logged_metrics.get("calibration_temperature", 1.0), logged_metrics.get("calibration_bias", 0.0)
        )
        np.testing.assert_allclose(calibration.probabilities(log_odds), table.p_male, atol=1e-5)

    # DDP: the two workers read disjoint shards that cover the training side, and end identical. The
    # selection phase trains on the first inner split; the refit on all of the fold's training subjects.
    splits = json.loads((study_dir(config) / "latest" / "splits.json").read_text())["folds"]
    for fold in splits:
        audit = study_dir(config) / "latest" / "audit" / f"fold{fold['fold']}"
        ranks = [[json.loads(line) for line in (audit / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
        phases = {"select": fold["inner"][0]["train"], "refit": fold["train"]}
        val_ids = fold["inner"][0]["test"]
        assert {r["phase"] for r in ranks[0][:-1]} == {"select", "refit"}
        for epoch0, epoch1 in zip(ranks[0][:-1], ranks[1][:-1]):
            train_ids = phases[epoch0["phase"]]
            shard0, shard1 = (
                [s for s in epoch0["subjects"] if s not in val_ids],
                [s for s in epoch1["subjects"] if s not in val_ids],
            )
            if epoch0["phase"] == "refit":
                shard0, shard1 = epoch0["subjects"], epoch1["subjects"]
            assert len(shard0) == len(shard1) == (len(train_ids) + 1) // 2
            assert set(shard0) | set(shard1) == set(train_ids)
            assert len(set(shard0) & set(shard1)) == len(train_ids) % 2  # only DistributedSampler's padding
            assert not set(epoch0["subjects"]) & set(fold["test"])  # held-out subjects never read
        assert ranks[0][-1]["final_weights"] == ranks[1][-1]["final_weights"]


def test_curves_keep_coming_while_the_driver_is_busy_with_a_search(tmp_path, monkeypatch):
    """A search blocks the driver for minutes; the folds already training must still reach MLflow meanwhile."""
    monkeypatch.setattr(live_module, "LIVE_POLL_S", 0.05)
    live = live_module.LiveFiles(tmp_path / "live")
    path = live.start(0)
    delivered, arrived = [], threading.Event()

    def on_epochs(fold, records):
        delivered.append((fold, records, threading.current_thread().name))
        arrived.set()

    with live.delivered(on_epochs):  # the caller's thread is busy (here: writing and waiting)
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": 0, "train_loss": 0.7}) + "\n" + '{"epoch": 1, "tra')  # half a line
        assert arrived.wait(30)
    assert delivered == [(0, [{"epoch": 0, "train_loss": 0.7}], "live-curves")]  # whole lines only
    with open(path, "a") as f:
        f.write('in_loss": 0.6}\n')
    assert live.new_records() == {0: [{"epoch": 1, "train_loss": 0.6}]}  # the rest, once, after the search

    def broken(fold, records):
        raise ValueError("not a tracking hiccup")

    with pytest.raises(ValueError, match="not a tracking hiccup"):  # not lost in the thread
        with live.delivered(broken):
            path.write_text(path.read_text() + json.dumps({"epoch": 2}) + "\n")
            time.sleep(0.5)


@pytest.mark.slow
def test_fold_curves_reach_mlflow_while_the_fold_trains(tmp_path, cohort_dir, monkeypatch):
    monkeypatch.setattr(crossval, "LIVE_POLL_S", 0.1)
    config = study_config(tmp_path, cohort_dir, train={"epochs": 20})
    client = mlflow.MlflowClient(config.tracking.uri)
    seen = []  # (fold, records delivered, points MLflow has right after)
    live = Publisher.training

    def watched(self, study):
        log = live(self, study)

        def epochs(fold, records):
            log(fold, records)
            run_id = study.state.fold_runs[fold]
            seen.append(
                (
                    fold,
                    len(records),
                    len(client.get_metric_history(run_id, "refit_train_loss")),
                    client.get_run(run_id).info.status,
                )
            )

        return epochs

    monkeypatch.setattr(Publisher, "training", watched)
    parent_id = run_study(config)
    for fold in (0, 1):
        calls = [(n, points, status) for f, n, points, status in seen if f == fold]
        # The 20 epochs arrived in several pieces, each on the fold's (running) run as soon as it came.
        assert len(calls) >= 2 and sum(n for n, _, _ in calls) == 20, calls
        assert [points for _, points, _ in calls] == list(np.cumsum([n for n, _, _ in calls]))
        assert {status for _, _, status in calls} == {"RUNNING"}
    _, children = runs_of(config, parent_id)
    for child in children:  # the fold's end logs what was missing, not the curves again
        points = sorted(client.get_metric_history(child.info.run_id, "refit_train_loss"), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(20))
        # Each point has the time its epoch ended: inside the fold's run, in order, spread over the training
        # (MLflow's wall-time axes read them; a constant timestamp put every point at 1970).
        times = [m.timestamp for m in points]
        assert child.info.start_time <= times[0] and times[-1] <= child.info.end_time, (child.info, times)
        assert times == sorted(times)
        seconds = [
            m.value
            for m in sorted(client.get_metric_history(child.info.run_id, "refit_epoch_seconds"), key=lambda m: m.step)
        ]
        assert times[-1] - times[0] >= 0.9 * 1000 * sum(seconds[1:]), (times, seconds)


@pytest.mark.slow
def test_a_failed_fold_stops_the_training_beside_it(tmp_path, cohort_dir):
    from ray.util.state import list_actors

    # Two folds at once; fold 1 fails at its first batch while fold 0 has thousands of epochs to go.
    config = study_config(
        tmp_path,
        cohort_dir,
        model={"class": "tests.networks:FailsInOneRun"},
        train={"epochs": 5000},
        resources={"concurrent_folds": 2},
    )
    with pytest.raises(StudyError, match="fold 1's training failed: RuntimeError: fold1 fails, as the test asks"):
        run_study(config)
    training = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    deadline = time.time() + 30  # this process, the study's driver, lives on: fold 0 must not train on in it
    while (alive := list_actors(filters=training)) and time.time() < deadline:
        time.sleep(1)
    assert not alive, alive


def _controller_timeouts() -> int:
    """How often Ray Train's controllers on this Ray gave up waiting for a training's CPUs (their logs)."""
    from ray.util.state import get_log, list_logs

    node = ray.get_runtime_context().get_node_id()
    logs = list_logs(node_id=node, glob_filter="train/ray-train-sys-controller-*")
    files = [f for group in logs.values() for f in group]
    return sum(
        line.count("WorkerGroupStartupTimeoutError")
        for f in files
        for line in get_log(filename=f, node_id=node, tail=-1)
    )


class HoldsCpus:
    def ready(self) -> bool:
        return True


@pytest.mark.slow
def test_the_wait_for_cpus_is_the_one_ray_train_reads_and_a_users_own_wins(
    tmp_path, cohort_dir, preprocess_config, monkeypatch
):
    # More trainings than the cluster holds at once (concurrent folds beside the label-randomized model, or an
    # autoscaler adding a node) wait for CPUs. Ray Train's own limit gave up the wait after 60 s, printed a
    # traceback and asked again, every minute; the study sets a day (test_trainer.py), in the variable that Ray
    # Train's controller reads from the process that fits. Here a user's own 3 s wins: the controller gives up
    # every 3 s while the CPUs are held, and the training goes on once they are free.
    from study.config import ResourcesConfig, TrainConfig
    from study.training.loop import TrainingData
    from study.training.models import Architecture
    from study.training.trainer import TrainingSetup, fit

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache, labels = cache_for(cohort, preprocess_config).cache, cohort.labels
    data = TrainingData(cache, [], labels[:0], [], labels[:0], cohort.ids, labels)
    setup = TrainingSetup(Architecture(width=4, blocks=2), TrainConfig(batch_size=4))
    before = _controller_timeouts()
    holder = ray.remote(num_cpus=2)(HoldsCpus).remote()  # every CPU of the test head, for 10 s
    ray.get(holder.ready.remote())
    release = threading.Timer(10, ray.kill, args=[holder])
    release.start()
    try:
        fit(setup, data, "waits", str(tmp_path / "ray"), ResourcesConfig(), refit_epochs=1)
    finally:
        release.cancel()
        ray.kill(holder)
    assert _controller_timeouts() > before


@pytest.mark.slow
def test_concurrent_folds_share_one_sqlite_store_and_every_execution_is_kept(tmp_path, cohort_dir, capsys):
    config = study_config(tmp_path, cohort_dir, resources={"concurrent_folds": 2})
    parent_id = run_study(config)
    parent, children = runs_of(config, parent_id)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" and "test_roc_auc" in c.data.metrics for c in children)

    first = (study_dir(config) / "latest").resolve()
    before = sorted(p.relative_to(first) for p in first.rglob("*"))
    # --restart: a new execution with runs and a directory of its own; the finished one is left as it was.
    again = run_study(config, restart=True)
    assert again != parent_id
    assert runs_of(config, parent_id)[0].info.status == runs_of(config, again)[0].info.status == "FINISHED"
    assert len(runs_of(config, again)[1]) == 2
    second = (study_dir(config) / "latest").resolve()
    assert second != first and sorted(p.relative_to(first) for p in first.rglob("*")) == before
    assert (first / "report.html").is_file() and len(list(first.glob("folds/fold*.json"))) == 2

    # study clean lists both executions, deletes nothing without --yes, then the older one with it.
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["clean", str(path)]) == 0
    listing = capsys.readouterr().out
    assert f"{first.name}  finished  this config" in listing and parent_id in listing and again in listing
    assert "would delete 1 execution(s)" in listing and first.is_dir()
    assert main(["clean", str(path), "--keep", "0", "--yes"]) == 2 and first.is_dir()  # refused, nothing deleted
    assert main(["clean", str(path), "--yes"]) == 0
    assert "deleted 1 execution(s)" in capsys.readouterr().out
    assert not first.exists() and (study_dir(config) / "latest" / "report.html").is_file()
    assert runs_of(config, parent_id)[0].info.status == "FINISHED"  # MLflow keeps the deleted execution's runs


@pytest.mark.slow
def test_a_network_of_ones_own_is_trained_explained_and_predicts(tmp_path, cohort_dir):
    # How a search samples such a network: test_search.py, test_a_search_samples_a_network_of_ones_own...
    config = study_config(
        tmp_path,
        cohort_dir,
        model={"class": "tests.networks:TinyNet", "channels": 2},
        attribution={
            "methods": ["gradcam", "guided_backprop"],
            "permutations": 0,
            "batch_size": 4,
            "sanity": {"subjects": 2, "label_randomization": False},
        },
    )
    parent_id = run_study(config)
    parent, children = runs_of(config, parent_id)
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert parent.data.params["model.class"] == "tests.networks:TinyNet"
    latest = study_dir(config) / "latest"
    for path in sorted((latest / "folds").glob("fold*.json")):
        result = FoldResult.from_json(path.read_text())
        assert result.setup.architecture.factory == "tests.networks:TinyNet"
        assert result.setup.architecture.kwargs["channels"] == 2
    client = mlflow.MlflowClient(config.tracking.uri)
    assert {"maps/gradcam/gradcam_mean_all.nii.gz"} <= {
        a.path for a in client.list_artifacts(parent_id, "maps/gradcam")
    }
    # The ensemble rebuilds the network from its class and keyword arguments (no pickle) and predicts.
    ensemble = Ensemble.load(latest / "ensemble", trust_code=True)  # the test wrote TinyNet
    image = next(cohort_dir.glob("sub-*/anat/*_T1w.nii.gz"))
    table = ensemble.predict(pd.DataFrame({"image": [str(image)]}))
    assert table.problem.tolist() == [""] and 0 <= table.p_male[0] <= 1
    assert set(ensemble.explain(ensemble.preprocess(image))) == {"gradcam", "guided_backprop"}


@pytest.mark.slow
def test_every_kind_of_bad_image_refuses_the_run_and_exclude_is_opt_in(tmp_path, cohort_dir):
    config = study_config(tmp_path, cohort_dir)
    prepare_cohort(config.cohort, config.preprocess)  # every subject cached by an earlier run
    expect = break_images(cohort_dir)
    img = nib.load(image_of(cohort_dir, "0008"))
    moved = img.affine.copy()
    moved[:3, 3] += [0, 40, 0]  # not registered to MNI152
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), image_of(cohort_dir, "0008"))
    expect["0008"] = ("sub-0008_T1w.nii.gz", "overlaps the MNI152 brain mask")

    with pytest.raises(StudyError) as err:
        run_study(config)
    lines = str(err.value).splitlines()
    assert lines[-1].startswith("Fix them and run again") and "on_invalid: exclude" in lines[-1]
    for subject, (file, problem) in expect.items():  # every bad image named, with its file and problem
        assert any(line.strip().startswith(subject) and file in line and problem in line for line in lines), subject
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing started

    excluded = config.model_copy(deep=True)
    excluded.cohort.on_invalid = "exclude"
    prepared = prepare_cohort(excluded.cohort, excluded.preprocess)
    assert {p.subject for p in prepared.excluded} == set(expect)
    assert len(prepared.cohort.subjects) == 12 - 7 and prepared.preprocessed == 0  # nothing computed again


def test_unreachable_tracking_server_fails_fast(tmp_path, cohort_dir):
    config = study_config(tmp_path, cohort_dir, tracking={"uri": "http://127.0.0.1:9"})
    with pytest.raises(TrackingError, match="unreachable.*mlflow server"):
        run_study(config)


def test_run_reports_config_typos(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\ncohort: {root: .}\ntrain: {epoch: 3}\n")
    assert main(["run", str(path)]) == 2
    valid = "valid keys here: augment, batch_size, calibration, channels_last"
    assert f"train.epoch: unknown key; {valid}" in capsys.readouterr().err


@pytest.mark.slow
def test_folds_the_cohort_cannot_fill_are_one_error_line(tmp_path, cohort_dir, capsys):
    config = study_config(tmp_path, cohort_dir, cv={"outer_folds": 10})  # 12 subjects: some sex has fewer
    path = tmp_path / "many_folds.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cross-validation splits of 12 subjects: the cohort has"), err[-2000:]
    assert "lower cv.outer_folds to at most" in last and "Traceback" not in err


def test_a_finished_fold_is_kept_as_json_that_reads_back_whole(tmp_path):
    from ray.train import Checkpoint

    from study.config import TrainConfig
    from study.training.folds import FoldResult
    from study.training.models import Architecture
    from study.training.trainer import TrainingSetup
    from study.training.trials import SearchResult, Trial

    history = pd.DataFrame({"phase": ["select", "refit"], "epoch": [0.0, np.nan], "val_loss": [0.7, np.nan]})
    trial = Trial("t1", {"width": 8, "lr": 1e-3}, history, "stopped_early", 0.61)
    fold = FoldResult(
        3,
        TrainingSetup(Architecture(width=8), TrainConfig(epochs=5)),
        history,
        Checkpoint(str(tmp_path / "checkpoint_000001")),
        {"roc_auc": 0.8, "accuracy": np.float64(0.75)},
        pd.DataFrame({"subject_id": ["0003", "0010"], "sex": ["M", "F"], "p_male": [0.9, 0.2]}),
        {"training": 12.5},
        SearchResult("val_loss", {"width": 8, "lr": 1e-3}, [trial]),
    )
    text = fold.to_json()
    assert "pickle" not in text and json.loads(text)["fold"] == 3  # plain JSON, readable by anyone
    back = FoldResult.from_json(text)
    assert (back.fold, back.setup, back.test_metrics, back.seconds) == (3, fold.setup, fold.test_metrics, fold.seconds)
    assert back.checkpoint.path == str(tmp_path / "checkpoint_000001")
    pd.testing.assert_frame_equal(back.history, history)
    pd.testing.assert_frame_equal(back.predictions, fold.predictions)  # ids stay strings ("0003")
    (got,) = back.search.trials
    assert (got.trial_id, got.params, got.status, got.score) == ("t1", trial.params, "stopped_early", 0.61)
    assert back.search.best_trial.trial_id == "t1"


@pytest.mark.slow
def test_an_unwritable_output_dir_is_refused_before_any_work(tmp_path, cohort_dir, capsys):
    (tmp_path / "taken").write_text("a file where the study's folder should go")
    config = study_config(tmp_path, cohort_dir, output_dir=str(tmp_path / "taken" / "runs"))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write output_dir ({tmp_path / 'taken' / 'runs'}): Not a directory" in err, err[-2000:]
    assert "preprocessing" not in err and "Traceback" not in err
