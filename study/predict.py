"""Apply a finished study to new scans: its fold models as one ensemble, with the study's own preprocessing.

A study saves its outer folds' models as an :class:`Ensemble` (each fold's
weights and architecture, the study grid, the intensity normalization and the
attribution settings) and logs it to MLflow as one pyfunc model
(:class:`StudyEnsemble`) that carries this package's code, registered in the
Model Registry under the study's name. ``study predict`` loads it by URI, so
nothing about preprocessing is retyped: a new image is checked, resampled and
normalized exactly as the study's images were, then every fold's model scores
it and the ensemble's probability is their mean. A study that removed confounds
from its images (``cv.adjust``) keeps each fold's adjustment: a new image gets
its fold's, from its own confound values (a participants table's columns),
before that fold's model sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from tqdm.auto import tqdm

from study.data.adjustment import Adjustment
from study.data.participants import SEX_CLASSES
from study.data.targets import Classes, Regression, Target
from study.data.volumes import Grid, preprocess_volume
from study.errors import StudyError, UntrustedCodeError, VolumeError
from study.new_images import subject_id_of
from study.training.calibration import Calibration
from study.training.models import model_from_record, model_record
from study.training.regression import bias_corrected_gap

SPEC_FILE, MEAN_FILE = "ensemble.json", "cohort_mean.npy"  # the spec; MP's reference, when it is the cohort's mean
ADJUSTMENT_FILE = "fold{fold}_adjustment.npz"  # a fold's confound adjustment, when the study made one


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
    outcome : Classes or Regression
        What the study learned (the label column and its classes, or a regression target), which names the
        output columns.
    cohort_mean : numpy.ndarray, optional
        The mean of the study cohort's class means on the grid (all its subjects, held-out ones included):
        Meaningful Perturbations' reference when its settings say ``reference: cohort_mean``.
    calibrations : dict of int to Calibration, optional
        Each fold's temperature and bias (:mod:`study.training.calibration`); a fold without one gives softmax's
        probabilities.
    adjustments : dict of int to Adjustment, optional
        Each fold's removal of the confounds from its images (``cv.adjust``, :mod:`study.data.adjustment`): a new
        image gets its fold's, from its own confound values, before that fold's model sees it.
    bias_lines : dict of int to (float, float), optional
        A regression study's line (slope, intercept) of each fold's predictions on its training subjects.
    """

    models: dict[int, torch.nn.Module]
    grid: Grid
    normalize: str
    methods: tuple[str, ...]
    target: str
    perturbation: dict
    outcome: Target = Classes()
    cohort_mean: np.ndarray | None = None
    calibrations: dict[int, Calibration] = field(default_factory=dict)
    adjustments: dict[int, Adjustment] = field(default_factory=dict)
    bias_lines: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def confounds(self) -> list[str]:
        """The confound columns each new image needs (the study removed them from its images); none without."""
        return list(dict.fromkeys(c for a in self.adjustments.values() for c in a.columns))

    def save(self, directory: Path) -> Path:
        """Write ``fold<k>.pt`` (weights, architecture), ``ensemble.json`` and any ``cohort_mean.npy`` there."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.cohort_mean is not None:
            np.save(directory / MEAN_FILE, self.cohort_mean.astype(np.float32))
        for fold, model in self.models.items():
            torch.save(model_record(model), directory / f"fold{fold}.pt")
        for fold, adjustment in self.adjustments.items():
            adjustment.save(directory / ADJUSTMENT_FILE.format(fold=fold))
        spec = {
            "folds": sorted(self.models),
            "shape": list(self.grid.shape),
            "affine": self.grid.affine.tolist(),
            "normalize": self.normalize,
            "methods": list(self.methods),
            "target": self.target,
            "perturbation": self.perturbation,
            "label": self.outcome.column,
            "task": self.outcome.kind,
            **({"classes": list(self.outcome.names)} if self.outcome.kind == "classification" else {}),
            "bias_lines": {str(fold): list(line) for fold, line in self.bias_lines.items()},
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
        label = spec.get("label", "sex")  # sex before labels
        regression = spec.get("task") == "regression"
        outcome = Regression(label) if regression else Classes(label, tuple(spec.get("classes", SEX_CLASSES)))
        spec["perturbation"].setdefault("reference", "blur")  # saved before MP had a choice of reference
        mean = Path(directory) / MEAN_FILE
        return cls(
            models,
            Grid(tuple(spec["shape"]), np.array(spec["affine"])),
            spec["normalize"],
            tuple(spec["methods"]),
            spec["target"],
            spec["perturbation"],
            outcome,
            np.load(mean) if mean.exists() else None,
            {int(fold): Calibration.from_dict(c) for fold, c in spec.get("calibration", {}).items()},
            {
                fold: Adjustment.load(path)
                for fold in spec["folds"]
                if (path := Path(directory) / ADJUSTMENT_FILE.format(fold=fold)).exists()
            },
            {int(fold): tuple(line) for fold, line in spec.get("bias_lines", {}).items()},
        )

    def preprocess(self, image: Path, mask: Path | str | None = None) -> np.ndarray:
        """One image on the study grid, masked (a mask file, "mni152" or None), checked and normalized as the
        study's were (float16; raises VolumeError)."""
        return preprocess_volume(Path(image), self.grid, self.normalize, mask or None)

    @property
    def calibrated_models(self) -> dict[int, torch.nn.Module]:
        """Each fold's model with its calibration on its logits: softmax says the calibrated P(class 1) (a
        regression model's output is its value, in the target's unit)."""
        return {fold: self.calibrations.get(fold, Calibration()).applied_to(m) for fold, m in self.models.items()}

    def inputs(self, volumes: np.ndarray, confounds: pd.DataFrame | None = None) -> dict[int, torch.Tensor]:
        """Each fold model's input [subjects, 1, D, H, W] from volumes [subjects, D, H, W] on the study grid:
        adjusted by the fold's adjustment for the subjects' ``confounds`` (a row each), when the study made one."""
        x = np.asarray(volumes, dtype=np.float32)[:, None]
        if self.adjustments and confounds is None:
            raise StudyError(f"the study removed {', '.join(self.confounds)} from its images: give each subject's")
        return {
            fold: torch.from_numpy(
                self.adjustments[fold].apply_to_volumes(x, confounds) if fold in self.adjustments else x
            )
            for fold in self.models
        }

    @torch.no_grad()
    def fold_predictions(self, volumes: np.ndarray, confounds: pd.DataFrame | None = None) -> np.ndarray:
        """Calibrated P(class 1) (e.g. P(male)), or a regression target's value (e.g. age), of each fold's model
        for volumes [subjects, D, H, W] (and their subjects' confounds, a row each, when the study adjusted its
        images for them): [subjects, folds]; of several classes P(each class), [subjects, folds, classes]."""
        inputs = self.inputs(volumes, confounds)
        outputs = [m(inputs[fold]) for fold, m in self.calibrated_models.items()]
        scores = [o[:, 0] if self.outcome.kind == "regression" else torch.softmax(o, 1) for o in outputs]
        p = np.stack([s.numpy() for s in scores], axis=1)  # [subjects, folds] of a regression
        return p[:, :, 1] if self.outcome.kind == "classification" and not self.outcome.several else p

    @property
    def columns(self) -> list[str]:
        """The columns of :meth:`predict`'s table, e.g. p_male, predicted_sex, p_male_fold0 for a sex study;
        predicted_age, corrected_gap, gap, predicted_age_fold0 for brain age."""
        scores, folds = self.outcome.columns, [f"_fold{f}" for f in self.models]
        end = ["corrected_gap", "gap"] if self.outcome.kind == "regression" else [f"predicted_{self.outcome.column}"]
        return ["subject_id", "image", *scores, *end, *[s + f for s in scores for f in folds], "problem"]

    def signature(self) -> ModelSignature:
        """The pyfunc's input and output columns."""
        inputs = Schema(
            [
                ColSpec("string", "image"),
                ColSpec("string", "subject_id", required=False),
                ColSpec("string", "brain_mask", required=False),
                *[ColSpec("string", column) for column in self.confounds],
                *([ColSpec("string", self.outcome.column, required=False)] if self.bias_lines else []),
            ]
        )
        strings = ("subject_id", "image", f"predicted_{self.outcome.column}", "problem")
        kinds = {c: "string" if c in strings else "double" for c in self.columns}
        return ModelSignature(inputs, Schema([ColSpec(kind, column) for column, kind in kinds.items()]))

    def predict(self, images: pd.DataFrame, batch_size: int = 8) -> pd.DataFrame:
        """Predict every image of a table with columns ``image`` (a NIfTI path), and optionally ``subject_id`` and
        ``brain_mask`` (a mask file, or ``mni152``, for images with the skull on); a study that removed confounds
        from its images (:attr:`confounds`) needs a column of each, such as ``site`` and ``tiv``.

        Returns one row per image (:attr:`columns`): ``subject_id``, ``image``, ``p_<class 1>`` (the ensemble's
        mean, e.g. ``p_male``), ``predicted_<label>``, ``p_<class 1>_fold<k>`` for each fold, and ``problem``: empty,
        or why the image was not predicted (then the probabilities are NaN); of several classes, a ``p_<class>``
        and ``p_<class>_fold<k>`` of each. A regression study gives ``predicted_<label>`` (the folds' mean, e.g.
        ``predicted_age``) and, where the table has the true value (a column ``age``), the brain-age gap and the gap
        each fold's bias line corrects (their mean).
        """
        paths = [str(p) for p in images["image"]]
        ids = [subject_id_of(Path(p)) for p in paths]
        ids = images["subject_id"].astype(str).tolist() if "subject_id" in images else ids
        masks = images["brain_mask"].fillna("").astype(str).tolist() if "brain_mask" in images else [""] * len(paths)
        rows = [{"subject_id": sid, "image": path, "problem": ""} for sid, path in zip(ids, paths)]
        confounds = self._confounds(images, rows)
        column = self.outcome.column
        truth = pd.to_numeric(images[column], errors="coerce").to_numpy() if column in images else None
        for start in tqdm(
            range(0, len(rows), batch_size), desc="predicting", unit="batch", disable=len(rows) <= batch_size
        ):
            ready, volumes = [], []
            for i in range(start, min(start + batch_size, len(rows))):
                if rows[i]["problem"]:
                    continue
                try:
                    volumes.append(self.preprocess(Path(rows[i]["image"]), masks[i]))
                    ready.append(i)
                except VolumeError as err:
                    rows[i]["problem"] = str(err)
            if volumes:
                adjusting = confounds.iloc[ready] if confounds is not None else None
                for i, by_fold in zip(ready, self.fold_predictions(np.stack(volumes), adjusting)):
                    rows[i] |= self._row(
                        by_fold.reshape(len(self.models), -1), truth[i] if truth is not None else np.nan
                    )
        return pd.DataFrame(rows, columns=self.columns)

    def _row(self, by_fold: np.ndarray, true: float) -> dict[str, float | str]:
        """An image's columns from its folds' scores [folds, scores]: their means, each fold's, and the predicted
        class; or a regression's gap (the folds' mean - the ``true`` value) and its correction, the mean over folds
        of each fold's prediction corrected by its bias line, minus the true value (NaN without one)."""
        mean, columns, folds = by_fold.mean(0), self.outcome.columns, np.array(list(self.models))
        row = dict(zip(columns, map(float, mean))) | {
            f"{c}_fold{f}": float(v) for k, c in enumerate(columns) for f, v in zip(folds, by_fold[:, k])
        }
        if self.outcome.kind == "regression":
            corrected = bias_corrected_gap(np.full(len(folds), true), by_fold[:, 0], folds, self.bias_lines)
            return row | {"gap": float(mean[0] - true), "corrected_gap": float(np.mean(corrected))}
        decided = int(mean.argmax()) if self.outcome.several else int(mean[0] >= 0.5)
        return row | {f"predicted_{self.outcome.column}": self.outcome.names[decided]}

    def read_confounds(self, given: pd.DataFrame) -> pd.DataFrame:
        """Confound values as given (strings, a row per subject) as the adjustments read them: a numeric
        confound's as numbers (NaN where one is not), a categorical one's as strings."""
        numeric = self._numeric_confounds
        return given.apply(lambda values: pd.to_numeric(values, errors="coerce") if values.name in numeric else values)

    @property
    def _numeric_confounds(self) -> list[str]:
        """The confounds the adjustments read as numbers (head size, age); the others are categories (site)."""
        return [c for c in self.confounds if not any(c in a.levels for a in self.adjustments.values())]

    def _confounds(self, images: pd.DataFrame, rows: list[dict]) -> pd.DataFrame | None:
        """The images' confounds as the adjustments read them (None: the study made none); a row that lacks
        one, or has a value no fold can remove (a site none of its training subjects had), gets its problem."""
        if not self.adjustments:
            return None
        given = pd.DataFrame({c: images[c] if c in images else "" for c in self.confounds}, index=images.index)
        given = given.fillna("").astype(str).apply(lambda column: column.str.strip())
        table = self.read_confounds(given.set_axis([row["subject_id"] for row in rows]))
        numeric = self._numeric_confounds
        for i, row in enumerate(rows):
            empty = [c for c in self.confounds if not given.iloc[i][c]]
            unreadable = [f"{c} {given.iloc[i][c]!r}" for c in numeric if c not in empty and pd.isna(table.iloc[i][c])]
            try:
                if empty:
                    raise StudyError(
                        f"no {', '.join(empty)}: the study removed {', '.join(self.confounds)} from its images "
                        "(cv.adjust), so each new image needs them too: give the images as a participants table "
                        f"with column(s) {', '.join(empty)}"
                    )
                if unreadable:
                    raise StudyError(
                        f"{', '.join(unreadable)} is not a number: give it as a number, as the study's participants "
                        "table did"
                    )
                for adjustment in self.adjustments.values():
                    adjustment.design(table.iloc[[i]])
            except StudyError as err:
                row["problem"] = row["problem"] or str(err)
        return table

    def explain(self, volume: np.ndarray, confounds: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
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
        inputs = self.inputs(volume[None], confounds)
        sums = {m: np.zeros(self.grid.shape, np.float32) for m in self.methods}
        for fold, model in self.calibrated_models.items():
            maps = explain_batch(
                model, inputs[fold], torch.zeros(1, dtype=torch.long), explanation, self.grid.voxel_mm, precision
            )
            for method, values in maps.items():
                sums[method] += normalize(values.astype(np.float32).reshape(1, -1))[0].reshape(self.grid.shape)
        return {m: s / len(self.models) for m, s in sums.items()}


class StudyEnsemble(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc of a study: NIfTI paths in, the ensemble's predictions out (see :meth:`Ensemble.predict`).

    Load it with ``mlflow.pyfunc.load_model("models:/<study name>/<version>")``; its input is a table with a
    column ``image`` (paths to NIfTI files readable where it runs) and optionally ``subject_id``.
    """

    def load_context(self, context) -> None:
        # Loading a pyfunc has already run its pickle and code: whoever loads it this way trusts the model's code.
        self.ensemble = Ensemble.load(Path(context.artifacts["ensemble"]), trust_code=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.ensemble.predict(model_input)
