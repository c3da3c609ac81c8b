"""Apply a finished study to new scans: its fold models as one ensemble, with the study's own preprocessing.

A study saves its outer folds' models as an :class:`Ensemble` (each fold's
weights and architecture, the study grid, the intensity normalization and the
attribution settings) and logs it to MLflow as one pyfunc model
(:class:`StudyEnsemble`) that carries this package's code, registered in the
Model Registry under the study's name. ``study predict`` loads it by URI, so
nothing about preprocessing is retyped: a new image is checked, resampled and
normalized exactly as the study's images were, then every fold's model scores
it and the ensemble's probability is their mean.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from tqdm.auto import tqdm

from study.data.cohort import SEX_CLASSES, Classes, Problem
from study.data.volumes import Grid, preprocess_volume
from study.errors import ModelNotFoundError, UntrustedCodeError, VolumeError
from study.training.calibration import Calibration
from study.training.models import model_from_record, model_record

SPEC_FILE = "ensemble.json"
MEAN_FILE = "cohort_mean.npy"  # Meaningful Perturbations' reference, when the study used the cohort's mean
NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass
class Ensemble:
    """The outer folds' models of a study and how its images were preprocessed.

    Parameters
    ----------
    models : dict of int to torch.nn.Module
        Each outer fold's final model, in eval mode.
    grid : Grid
        The study grid every image is resampled onto.
    normalize : str
        The intensity normalization (``zscore`` inside the brain, or ``none``).
    methods : tuple of str
        The attribution methods of the study (its config's, else the default ones).
    target : str
        The score its maps explain (``contrast``, ``true_class``, ``predicted_class``).
    perturbation : dict
        Meaningful Perturbations' settings, as the study's config gives them.
    classes : Classes
        What the study told apart (the label column and its two classes), which names the output columns.
    cohort_mean : numpy.ndarray, optional
        The mean of the study cohort's two class means on the grid (all its subjects, held-out ones included):
        Meaningful Perturbations' reference when its settings say ``reference: cohort_mean``.
    calibrations : dict of int to Calibration, optional
        Each fold's temperature and bias (:mod:`study.training.calibration`); a fold without one gives softmax's
        probabilities.
    """

    models: dict[int, torch.nn.Module]
    grid: Grid
    normalize: str
    methods: tuple[str, ...]
    target: str
    perturbation: dict
    classes: Classes = Classes()
    cohort_mean: np.ndarray | None = None
    calibrations: dict[int, Calibration] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write ``fold<k>.pt`` (weights and architecture), ``ensemble.json`` and, when there is one, the
        cohort's mean volume ``cohort_mean.npy`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.cohort_mean is not None:
            np.save(directory / MEAN_FILE, self.cohort_mean.astype(np.float32))
        for fold, model in self.models.items():
            torch.save(model_record(model), directory / f"fold{fold}.pt")
        spec = {
            "folds": sorted(self.models),
            "shape": list(self.grid.shape),
            "affine": self.grid.affine.tolist(),
            "normalize": self.normalize,
            "methods": list(self.methods),
            "target": self.target,
            "perturbation": self.perturbation,
            "label": self.classes.column,
            "classes": list(self.classes.names),
            "calibration": {str(fold): c.to_dict() for fold, c in self.calibrations.items()},
        }
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path, trust_code: bool = False) -> Ensemble:
        """The ensemble saved by :meth:`save` (CPU, eval mode): weights and JSON, no pickle.

        A fold whose network is a researcher's own class (``model.class``) is
        rebuilt by importing that class's module, which runs its code: refused
        unless ``trust_code``. The study's own CNN needs no code but this package's.
        """
        spec = json.loads((Path(directory) / SPEC_FILE).read_text())
        models = {}
        for fold in spec["folds"]:
            record = torch.load(Path(directory) / f"fold{fold}.pt", map_location="cpu", weights_only=True)
            if "class" in record["arch"] and not trust_code:
                raise UntrustedCodeError(
                    f"fold {fold}'s network is {record['arch']['class']}, a class of the study author's code: "
                    "loading it imports that module, which runs its code. Pass --trust-code if you trust them"
                )
            models[fold] = model_from_record(record)
        classes = Classes(spec.get("label", "sex"), tuple(spec.get("classes", SEX_CLASSES)))  # sex before labels
        spec["perturbation"].setdefault("reference", "blur")  # saved before MP had a choice of reference
        mean = Path(directory) / MEAN_FILE
        return cls(
            models,
            Grid(tuple(spec["shape"]), np.array(spec["affine"])),
            spec["normalize"],
            tuple(spec["methods"]),
            spec["target"],
            spec["perturbation"],
            classes,
            np.load(mean) if mean.exists() else None,
            {int(fold): Calibration.from_dict(c) for fold, c in spec.get("calibration", {}).items()},
        )

    def preprocess(self, image: Path, mask: Path | str | None = None) -> np.ndarray:
        """One image on the study grid, masked (a mask file, "mni152" or None), checked and normalized as the
        study's were (float16; raises VolumeError)."""
        return preprocess_volume(Path(image), self.grid, self.normalize, mask or None)

    @property
    def calibrated_models(self) -> dict[int, torch.nn.Module]:
        """Each fold's model with its calibration on its logits: softmax says the calibrated P(class 1)."""
        return {fold: self.calibrations.get(fold, Calibration()).applied_to(m) for fold, m in self.models.items()}

    @torch.no_grad()
    def probabilities(self, volumes: np.ndarray) -> np.ndarray:
        """Calibrated P(class 1) (e.g. P(male)) of each fold's model for volumes [subjects, D, H, W]:
        [subjects, folds]."""
        x = torch.from_numpy(np.asarray(volumes, dtype=np.float32)[:, None])
        return np.stack([torch.softmax(m(x), 1)[:, 1].numpy() for m in self.calibrated_models.values()], axis=1)

    @property
    def columns(self) -> list[str]:
        """The columns of :meth:`predict`'s table, e.g. p_male, predicted_sex, p_male_fold0 for a sex study."""
        p, column = self.classes.p, self.classes.column
        return ["subject_id", "image", p, f"predicted_{column}", *[f"{p}_fold{f}" for f in self.models], "problem"]

    def signature(self) -> ModelSignature:
        """The pyfunc's input and output columns."""
        inputs = Schema(
            [
                ColSpec("string", "image"),
                ColSpec("string", "subject_id", required=False),
                ColSpec("string", "brain_mask", required=False),
            ]
        )
        kinds = {c: "double" if c.startswith(self.classes.p) else "string" for c in self.columns}
        return ModelSignature(inputs, Schema([ColSpec(kind, column) for column, kind in kinds.items()]))

    def predict(self, images: pd.DataFrame, batch_size: int = 8) -> pd.DataFrame:
        """Predict every image of a table with columns ``image`` (a NIfTI path), and optionally ``subject_id`` and
        ``brain_mask`` (a mask file, or ``mni152``, for images with the skull on).

        Returns one row per image (:attr:`columns`): ``subject_id``, ``image``,
        ``p_<class 1>`` (the ensemble's mean, e.g. ``p_male``), ``predicted_<label>``,
        ``p_<class 1>_fold<k>`` for each fold, and ``problem``: empty, or why the
        image was not predicted (then the probabilities are NaN).
        """
        ids = (
            images["subject_id"].astype(str).tolist()
            if "subject_id" in images
            else [subject_id_of(Path(p)) for p in images["image"]]
        )
        columns = self.columns
        p, predicted, folds = columns[2], columns[3], columns[4:-1]
        paths = [str(p) for p in images["image"]]
        masks = images["brain_mask"].fillna("").astype(str).tolist() if "brain_mask" in images else [""] * len(paths)
        rows = [{"subject_id": sid, "image": path, "problem": ""} for sid, path in zip(ids, paths)]
        for start in tqdm(
            range(0, len(rows), batch_size), desc="predicting", unit="batch", disable=len(rows) <= batch_size
        ):
            ready, volumes = [], []
            for row, mask in zip(rows[start : start + batch_size], masks[start : start + batch_size]):
                try:
                    volumes.append(self.preprocess(Path(row["image"]), mask))
                    ready.append(row)
                except VolumeError as err:
                    row["problem"] = str(err)
            if volumes:
                for row, p_folds in zip(ready, self.probabilities(np.stack(volumes))):
                    row |= {
                        p: float(p_folds.mean()),
                        predicted: self.classes.names[int(p_folds.mean() >= 0.5)],
                        **dict(zip(folds, map(float, p_folds))),
                    }
        return pd.DataFrame(rows, columns=columns)

    def explain(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        """Each of the study's methods' map of one volume [D, H, W]: the mean over folds of each fold model's
        map, each scaled to its 99.5th percentile as the study's group maps are. A study that explained the true
        class explains the predicted class here (a new subject's label is not known)."""
        from study.attribution.actors import Explanation, explain_batch
        from study.attribution.group import normalize
        from study.attribution.perturbation import Perturbation
        from study.runtime import Precision

        target = "predicted_class" if self.target == "true_class" else self.target
        explanation = Explanation(self.methods, target, Perturbation(**self.perturbation), self.cohort_mean)
        precision = Precision.choose(torch.device("cpu"))
        x = torch.from_numpy(np.asarray(volume, dtype=np.float32)[None, None])
        sums = {m: np.zeros(self.grid.shape, np.float32) for m in self.methods}
        for model in self.calibrated_models.values():
            maps = explain_batch(model, x, torch.zeros(1, dtype=torch.long), explanation, self.grid.voxel_mm, precision)
            for method, values in maps.items():
                sums[method] += normalize(values.astype(np.float32).reshape(1, -1))[0].reshape(self.grid.shape)
        return {m: s / len(self.models) for m, s in sums.items()}


def subject_id_of(image: Path) -> str:
    """A subject id from an image's name: the BIDS ``sub-<label>`` entity of the file name, else of the nearest
    folder (``sub-01/anat/T1w.nii.gz``), else the file name without extension."""
    for part in [image.name, *reversed(image.parent.parts)]:
        match = re.match(r"sub-([A-Za-z0-9]+)", part)
        if match:
            return match.group(1)
    return NIFTI.sub("", image.name)


def maps_name(image: Path, subject_id: str) -> str:
    """The stem of an image's map files: ``sub-<id>``, with ``_ses-<label>`` when the file name or its folder has
    one, so that two sessions of one subject do not write the same maps."""
    session = re.search(r"(?:^|_)ses-([A-Za-z0-9]+)", image.name) or next(
        (m for m in (re.fullmatch(r"ses-([A-Za-z0-9]+)", p) for p in reversed(image.parent.parts)) if m), None
    )
    return f"sub-{subject_id}" + (f"_ses-{session.group(1)}" if session else "")


def find_images(sources: list[Path]) -> tuple[pd.DataFrame, list[Problem]]:
    """The images to predict, as a table (subject_id, image), and sources that give none.

    Each source is a NIfTI file, a folder (its ``*.nii[.gz]`` files at any depth,
    leaving out a synthetic cohort's ``ground_truth/``), or a participants table
    (TSV/CSV) of a cohort in any layout ``study validate`` knows, with each
    image's brain mask as that layout has it (fMRIPrep's, CAPS's); new subjects
    need no label column.
    """
    from study.data.cohort import CohortConfig, load_cohort

    rows, problems = [], []
    for source in sources:
        source = source.resolve()
        if not source.exists():
            problems.append(Problem("-", str(source), "no such file or folder"))
        elif source.suffix in {".tsv", ".csv"} and source.is_file():
            cohort = load_cohort(CohortConfig(root=source.parent, participants=source), labelled=False)
            rows += [
                {"subject_id": s.subject_id, "image": str(s.image), "brain_mask": str(s.brain_mask or "")}
                for s in cohort.subjects
            ]
            problems += cohort.problems
        elif source.is_dir():
            found = sorted(p for p in source.rglob("*.nii*") if NIFTI.search(p.name) and "ground_truth" not in p.parts)
            rows += [{"subject_id": subject_id_of(p), "image": str(p), "brain_mask": ""} for p in found]
            if not found:
                problems.append(Problem("-", str(source), "no .nii or .nii.gz file in this folder"))
        elif NIFTI.search(source.name):
            rows.append({"subject_id": subject_id_of(source), "image": str(source), "brain_mask": ""})
        else:
            problems.append(Problem("-", str(source), "not a NIfTI file, a folder or a participants table (.tsv/.csv)"))
    return pd.DataFrame(rows, columns=["subject_id", "image", "brain_mask"]), problems


def save_maps(maps: dict[str, np.ndarray], grid: Grid, out: Path, name: str) -> list[Path]:
    """An image's maps as ``<out>/<method>/<name>_<method>.nii.gz`` on the study grid (MNI152 space); ``name`` is
    its :func:`maps_name`."""
    paths = []
    for method, values in maps.items():
        (out / method).mkdir(parents=True, exist_ok=True)
        paths.append(out / method / f"{name}_{method}.nii.gz")
        nib.save(nib.Nifti1Image(values.astype(np.float32), grid.affine), paths[-1])
    return paths


def download_ensemble(model_uri: str, tracking_uri: str, directory: Path, trust_code: bool = False) -> Ensemble:
    """A registered or logged study model's :class:`Ensemble`, read from its files into ``directory``.

    Only the ensemble's weights (``weights_only``) and JSON are read: the
    pyfunc's pickle and code, which ``mlflow.pyfunc.load_model`` would run, are
    not (MLflow serving still loads the pyfunc).
    """
    from study.runtime import environment

    mlflow.set_tracking_uri(tracking_uri)  # a models:/ URI is resolved through the global registry
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # a bar per file, over the table it prints
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(directory)))
    return Ensemble.load(local / "artifacts" / "ensemble", trust_code)


def resolve_model(name: str, client: mlflow.MlflowClient) -> str:
    """A model URI for ``name``: a ``models:/`` or ``runs:/`` URI as given, a registered study name (its newest
    version), or a study's MLflow run id (the ensemble it logged)."""
    if name.startswith(("models:/", "runs:/")):
        return name
    versions = client.search_model_versions(f"name = '{name}'")
    if versions:
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    if re.fullmatch(r"[0-9a-f]{32}", name):
        try:
            run = client.get_run(name)
        except mlflow.MlflowException:
            run = None
        if run is not None:
            logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{name}'")
            ensembles = [m for m in logged if m.name == "ensemble"]
            if ensembles:
                return f"models:/{ensembles[0].model_id}"
    known = sorted({m.name for m in client.search_registered_models()})
    raise ModelNotFoundError(
        f"no study model {name!r} in {client.tracking_uri}: give models:/NAME/VERSION, a study name "
        f"({', '.join(known) or 'none registered yet: run a study first'}) or a study's run id; set --tracking-uri "
        "(or MLFLOW_TRACKING_URI) if the study logged elsewhere"
    )


class StudyEnsemble(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc of a study: NIfTI paths in, the ensemble's predictions out (see :meth:`Ensemble.predict`).

    Load it with ``mlflow.pyfunc.load_model("models:/<study name>/<version>")``; its
    input is a table with a column ``image`` (paths to NIfTI files readable where
    it runs) and optionally ``subject_id``.
    """

    def load_context(self, context) -> None:
        # Loading a pyfunc has already run its pickle and code: whoever loads it this way trusts the model's code.
        self.ensemble = Ensemble.load(Path(context.artifacts["ensemble"]), trust_code=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.ensemble.predict(model_input)
