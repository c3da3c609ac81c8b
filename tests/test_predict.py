"""`study predict` and the registered ensemble of a finished study, in a real MLflow SQLite store.

The study classifies a diagnosis column (patient / control), not sex: the label
is a config key, and every table names its classes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from study.attribution import Perturbation
from study.cli import main
from study.data.volumes import Grid
from study.pipeline import run_study, study_dir
from study.predict import Ensemble
from study.training.models import Architecture, build_model
from tests.test_study import study_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_root, ray_head):
    """A tiny finished study of a diagnosis (2 outer folds) and its MLflow run id; on the session's Ray head (set up
    before each test asks for it: else, run alone, this module's study started a Ray of its own first)."""
    tmp_path = tmp_path_factory.mktemp("predict")
    table = pd.read_csv(synthetic_root / "participants.tsv", sep="\t", dtype=str)
    table["diagnosis"] = np.where(table.sex == "M", "Patient", "CN")  # the planted effect, as a diagnosis
    table.to_csv(tmp_path / "participants_dx.tsv", sep="\t", index=False)
    config = study_config(
        tmp_path,
        synthetic_root,
        name="dxpred",
        cohort={
            "participants": str(tmp_path / "participants_dx.tsv"),
            "label": "diagnosis",
            "classes": ["control", "patient"],
            "label_mapping": {"CN": "control"},
        },
        attribution={
            "batch_size": 8,
            "actors": 1,
            "permutations": 10,
            "perturbation": {"iterations": 5},
            # the label-randomized model trains beside fold 1
            "sanity": {"subjects": 2, "label_randomization": True},
        },
        resources={"concurrent_folds": 2},
    )
    return config, run_study(config)


@pytest.mark.slow
def test_a_diagnosis_study_names_its_classes_in_metrics_maps_and_report(finished):
    config, run_id = finished
    client = mlflow.MlflowClient(config.tracking.uri)
    run = client.get_run(run_id)
    patients = (pd.read_csv(config.cohort.participants, sep="\t").diagnosis == "Patient").sum()
    assert run.data.metrics["n_patient"] == patients and "n_male" not in run.data.metrics
    maps = {Path(a.path).name for a in client.list_artifacts(run_id, "maps/gradcam")}
    assert {
        "gradcam_mean_patient.nii.gz",
        "gradcam_mean_control.nii.gz",
        "gradcam_t_patient_minus_control.nii.gz",
        "gradcam_p_fwer.nii.gz",
    } <= maps, maps
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert "Grad-CAM: mean map, patient; explains the patient - control logit" in report
    assert (
        "Grad-CAM: patient - control t, FWER p &lt; 0.05" in report
        or "Grad-CAM: patient - control t, FWER p < 0.05" in report
    )
    assert " male" not in report and "female" not in report
    # the model trained on shuffled diagnoses: its maps compared, its training timed, said in the report
    sanity = {a.path for a in client.list_artifacts(run_id, "sanity")}
    assert "sanity/label_randomization.tsv" in sanity, sanity
    times = pd.read_csv(client.download_artifacts(run_id, "stage_times.tsv", str(study_dir(config))), sep="\t")
    assert "label-randomized training" in set(times.stage), times
    assert "Sanity check: model trained on shuffled labels" in report


def held_out(config, run_id: str, tmp_path: Path) -> pd.DataFrame:
    client = mlflow.MlflowClient(config.tracking.uri)
    path = client.download_artifacts(run_id, "predictions.tsv", str(tmp_path))
    return pd.read_csv(path, sep="\t", dtype={"subject_id": str})


@pytest.mark.slow
def test_registered_ensemble_loads_in_a_fresh_process_and_repeats_the_held_out_predictions(finished, tmp_path):
    config, run_id = finished
    client = mlflow.MlflowClient(config.tracking.uri)
    (version,) = client.search_model_versions("name = 'dxpred'")
    experiment = client.get_run(run_id).info.experiment_id
    (logged,) = [m for m in client.search_logged_models([experiment]) if m.name == "ensemble"]
    assert version.run_id == run_id == logged.source_run_id and version.source == logged.artifact_location
    state = json.loads((study_dir(config) / "latest" / "state.json").read_text())
    assert state["ensemble"] == "models:/dxpred/1"
    # A shared model does not say where it was made: no path of the study's machine in its MLmodel.
    mlmodel = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/MLmodel", dst_path=str(tmp_path)))
    assert "artifacts/ensemble" in mlmodel.read_text() and str(config.output_dir) not in mlmodel.read_text()

    images = sorted(str(p) for p in config.cohort.root.glob("sub-*/anat/*_T1w.nii.gz"))
    script = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        f"mlflow.set_tracking_uri({config.tracking.uri!r})\n"
        "model = mlflow.pyfunc.load_model('models:/dxpred/1')\n"
        f"model.predict(pd.DataFrame({{'image': {images!r}}})).to_csv(sys.argv[1], sep='\\t', index=False)\n"
        "import study; print(study.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "p.tsv")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The code that predicted is the copy the model carries, not this checkout (which need not be installed).
    loaded_from = Path(done.stdout.strip().splitlines()[-1])
    assert not loaded_from.is_relative_to(Path(__file__).parents[1]) and "code" in loaded_from.parts, loaded_from
    predicted = pd.read_csv(tmp_path / "p.tsv", sep="\t", dtype={"subject_id": str}).set_index("subject_id")
    assert len(predicted) == 12 and predicted.problem.isna().all()
    assert list(predicted.columns) == [
        "image",
        "p_patient",
        "predicted_diagnosis",
        "p_patient_fold0",
        "p_patient_fold1",
        "problem",
    ]
    # Each fold's model gives its held-out subjects the probability the study logged for them.
    study = held_out(config, run_id, tmp_path)
    assert len(study) == 12 and set(study.diagnosis) == {"control", "patient"}
    for row in study.itertuples():
        assert predicted.loc[row.subject_id, f"p_patient_fold{row.fold}"] == pytest.approx(row.p_patient, abs=1e-5)
    np.testing.assert_allclose(
        predicted.p_patient, predicted[["p_patient_fold0", "p_patient_fold1"]].mean(1), atol=1e-6
    )


@pytest.mark.slow
def test_study_predict_writes_the_table_and_maps_and_names_bad_images(finished, tmp_path, capsys, monkeypatch):
    config, run_id = finished
    monkeypatch.chdir(tmp_path)
    scans = Path(shutil.copytree(config.cohort.root, tmp_path / "new_scans"))
    broken = scans / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:500])  # a truncated download
    moved = scans / "sub-0008" / "anat" / "sub-0008_T1w.nii.gz"
    image = nib.load(moved)
    affine = image.affine.copy()
    affine[:3, 3] += [0, 40, 0]  # not registered to MNI152: a scan straight from the scanner
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), moved)
    second = scans / "sub-0002" / "ses-2" / "anat" / "sub-0002_ses-2_T1w.nii.gz"  # a subject's second session
    twin = scans / "sub-batch7" / "sub-0002_T1w.nii.gz"  # the same name elsewhere: its maps would overwrite
    for path in (second, twin):
        path.parent.mkdir(parents=True)
        shutil.copy(scans / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz", path)
    # The model's pickle is never run: study predict reads the ensemble's weights and JSON only.
    (version,) = mlflow.MlflowClient(config.tracking.uri).search_model_versions("name = 'dxpred'")
    source = version.source
    pickle = Path(source.removeprefix("file://")) / "python_model.pkl"
    saved = pickle.read_bytes()
    pickle.write_bytes(b"not a pickle: loading it would fail")

    # By the study's name (its newest version), a folder of images, the tracking URI given.
    try:
        code = main(["predict", "dxpred", str(scans), "--maps", "maps", "--tracking-uri", config.tracking.uri])
    finally:
        pickle.write_bytes(saved)
    out, err = capsys.readouterr()
    assert code == 1  # two images could not be predicted, with the same checks as study validate
    table = pd.read_csv(tmp_path / "predictions.tsv", sep="\t", dtype={"subject_id": str}, keep_default_na=False)
    good = ~table.subject_id.isin(["0001", "0008"])
    assert len(table) == 14 and set(table.predicted_diagnosis[good]) <= {"patient", "control"}
    bad = table.set_index("subject_id").loc[["0001", "0008"]]
    assert (bad.p_patient == "").all() and "overlaps the MNI152 brain mask" in bad.problem["0008"], bad.problem
    assert "truncated or corrupt gzip" in bad.problem["0001"]
    assert f"0001\t{broken}\t" in err and f"0008\t{moved}\t" in err
    assert "12 subjects predicted with models:/dxpred/1" in err
    assert f"0002\t{twin}\tits maps would overwrite those of " in err
    assert "ground_truth" not in " ".join(table.image)  # a synthetic cohort's answer is not a scan
    ensemble = study_dir(config) / "latest" / "ensemble"
    assert np.load(ensemble / "cohort_mean.npy").shape == (23, 27, 23)  # MP's reference travels with the models
    for method in ("gradcam", "guided_backprop", "perturbation"):
        maps = sorted((tmp_path / "maps" / method).glob("*.nii.gz"))
        assert len(maps) == 11 and tmp_path / "maps" / method / f"sub-0002_ses-2_{method}.nii.gz" in maps
        image = nib.load(maps[0])
        assert image.shape == (23, 27, 23) and abs(image.affine[0, 0]) == 8.0
        assert np.isfinite(image.get_fdata()).all() and image.get_fdata().max() > 0
    pages = sorted((tmp_path / "maps").glob("*_maps.html"))  # each image's maps over it, to explore
    assert (
        len(pages) == 11
        and "Guided Backprop: sub-0002_ses-2" in (tmp_path / "maps" / "sub-0002_ses-2_maps.html").read_text()
    )

    # By the study's run id, one file; then a model that does not exist.
    image = scans / "sub-0002" / "anat" / "sub-0002_T1w.nii.gz"
    assert main(["predict", run_id, str(image), "--out", "one.csv", "--tracking-uri", config.tracking.uri]) == 0
    assert pd.read_csv(tmp_path / "one.csv", dtype={"subject_id": str}).subject_id.tolist() == ["0002"]
    capsys.readouterr()
    assert main(["predict", "nosuchstudy", str(image), "--tracking-uri", config.tracking.uri]) == 2
    err = capsys.readouterr().err
    assert "error: no study model 'nosuchstudy'" in err and "(dxpred)" in err
    # A participants table of new subjects: whom to predict, no diagnosis column needed.
    (scans / "new.tsv").write_text("participant_id\nsub-0002\nsub-0003\n")
    assert (
        main(["predict", "dxpred", str(scans / "new.tsv"), "--out", "new.tsv", "--tracking-uri", config.tracking.uri])
        == 0
    )
    assert pd.read_csv(tmp_path / "new.tsv", sep="\t", dtype={"subject_id": str}).subject_id.tolist() == [
        "0002",
        "0003",
    ]
    capsys.readouterr()
    assert main(["predict", "dxpred", "missing.nii.gz", "--tracking-uri", config.tracking.uri]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_an_ensemble_saved_before_the_cohort_mean_reference_still_explains(tmp_path):
    shape = (12, 14, 12)
    model = build_model(Architecture(width=2, blocks=1), shape).eval()
    mean = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ensemble = Ensemble(
        {0: model},
        Grid(shape, np.diag([8.0, 8.0, 8.0, 1.0])),
        "zscore",
        ("perturbation",),
        "contrast",
        Perturbation(iterations=2).model_dump(),
        cohort_mean=mean,
    )
    directory = ensemble.save(tmp_path / "ensemble")
    np.testing.assert_array_equal(Ensemble.load(directory).cohort_mean, mean)  # the reference travels along
    spec = json.loads((directory / "ensemble.json").read_text())  # as saved before there was a choice
    del spec["perturbation"]["reference"]
    (directory / "ensemble.json").write_text(json.dumps(spec))
    (directory / "cohort_mean.npy").unlink()
    old = Ensemble.load(directory)
    assert old.perturbation["reference"] == "blur" and old.cohort_mean is None
    assert old.explain(mean)["perturbation"].shape == shape


def test_an_ensemble_of_a_researchers_own_network_loads_only_when_its_code_is_trusted(tmp_path):
    from study.errors import UntrustedCodeError
    from study.new_images import maps_name, subject_id_of
    from study.training.models import Network

    shape = (12, 14, 12)
    model = build_model(Network.model_validate({"class": "tests.networks:TinyNet", "channels": 2}), shape).eval()
    directory = Ensemble(
        {0: model},
        Grid(shape, np.diag([8.0, 8.0, 8.0, 1.0])),
        "zscore",
        ("gradcam",),
        "contrast",
        Perturbation().model_dump(),
    ).save(tmp_path / "ensemble")
    with pytest.raises(
        UntrustedCodeError,
        match="fold 0's network is tests.networks:TinyNet, a class of the study author's code: .* Pass --trust-code",
    ):
        Ensemble.load(directory)
    assert isinstance(Ensemble.load(directory, trust_code=True).models[0], type(model))
    # Map names come from the file name, not from any sub- folder above it.
    for path, expected in {
        "sub-batch7/sub-01_ses-2_T1w.nii.gz": ("01", "sub-01_ses-2"),
        "sub-02/ses-1/anat/T1w.nii.gz": ("02", "sub-02_ses-1"),
        "scans/x.nii.gz": ("x", "sub-x"),
    }.items():
        assert (subject_id_of(Path(path)), maps_name(Path(path), subject_id_of(Path(path)))) == expected


def test_an_ensemble_gives_each_folds_calibrated_probabilities_and_keeps_its_calibration_when_saved(tmp_path):
    import torch
    from scipy.special import expit

    from study.training.calibration import Calibration

    shape = (12, 14, 12)
    models = {}
    for fold in (0, 1):
        torch.manual_seed(fold)
        models[fold] = build_model(Architecture(width=2, blocks=1), shape).eval()
    ensemble = Ensemble(
        models,
        Grid(shape, np.diag([8.0, 8.0, 8.0, 1.0])),
        "zscore",
        ("gradcam",),
        "contrast",
        Perturbation().model_dump(),
        calibrations={0: Calibration(0.5, 2.0, 30)},  # fold 1 has none: softmax's probabilities
    )
    loaded = Ensemble.load(ensemble.save(tmp_path / "ensemble"))
    assert loaded.calibrations == {0: Calibration(0.5, 2.0, 30)}
    volumes = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        logits = {fold: m(torch.from_numpy(volumes)[:, None]) for fold, m in models.items()}
    p = loaded.fold_predictions(volumes)
    z0 = (logits[0][:, 1] - logits[0][:, 0]).numpy()
    np.testing.assert_allclose(p[:, 0], expit(0.5 * z0 + 2.0), rtol=1e-5)
    np.testing.assert_allclose(p[:, 1], torch.softmax(logits[1], 1)[:, 1].numpy(), rtol=1e-5)
