"""An outer fold as plain data: what the driver sends to train and test it, and what comes back.

A :class:`FoldJob` is one fold's training and test, as its Ray task receives it;
a :class:`FoldResult` is what the fold produced. A finished fold is kept as
JSON (:meth:`FoldResult.to_json`) in ``<execution>/folds/``: a rerun reads it
back instead of training the fold again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.fs
import ray.train

from study.config import TrainConfig
from study.data.targets import Target
from study.training.calibration import Calibration
from study.training.loop import TrainingData
from study.training.models import architecture_of
from study.training.trainer import TrainingSetup
from study.training.trials import SearchResult, Trial


@dataclass(frozen=True)
class FoldJob:
    """One outer fold to train and test: its setup, its training subjects and its held-out subjects."""

    fold: int
    setup: TrainingSetup  # after a search: the base setup with the best trial's params
    data: TrainingData  # the fold's first inner split and all of its training subjects
    test_ids: list[str]  # the held-out subjects, tested once
    test_labels: np.ndarray
    target: Target
    search: SearchResult | None = None  # the fold's search, when there was one
    search_seconds: float = 0.0  # how long it took


@dataclass
class FoldResult:
    """What an outer fold produced: the setup it trained, curves, the model, its held-out test results."""

    fold: int
    setup: TrainingSetup
    history: pd.DataFrame  # one row per epoch; column phase: select (inner split) or refit (all training subjects)
    checkpoint: ray.train.Checkpoint  # the final model: refit on all training subjects, else the selected one
    test_metrics: dict[str, float]
    # subject_id, the true class, P(class 1), predicted, log_odds (Classes.predictions); or the true and predicted
    # values and the network's standardized output (Regression.predictions)
    predictions: pd.DataFrame
    seconds: dict[str, float]  # training, Ray set-up, testing (and search, when there was one)
    search: SearchResult | None = None
    # its temperature and bias (train.calibration; the identity: none); a regression fold's standardization
    calibration: Calibration = Calibration()

    def epochs(self, phase: str) -> int:
        """Epochs trained in ``phase`` (select or refit)."""
        return int((self.history["phase"] == phase).sum()) if "phase" in self.history else 0

    @property
    def final_epochs(self) -> int:
        """Epochs the final model trained: its refit, or up to its best epoch on the inner split."""
        if self.epochs("refit"):
            return self.epochs("refit")
        select = self.history[self.history["phase"] == "select"]
        return int(select.loc[select["val_loss"].idxmin(), "epoch"]) + 1

    @property
    def fit_accuracy(self) -> float:
        """The final model's accuracy on its own training subjects (eval mode): did it fit them at all?"""
        return self.fit_score("fit_accuracy")

    def fit_score(self, name: str) -> float:
        """The final model's ``name`` (fit_accuracy; a regression's fit_r2) on its own training subjects."""
        return float(self.history[name].dropna().iloc[-1]) if name in self.history else float("nan")

    def to_json(self) -> str:
        """The fold as JSON: a rerun trusts this file, and JSON (unlike pickle) cannot run code when read."""
        search = (
            None
            if self.search is None
            else {
                "metric": self.search.metric,
                "best": self.search.best,
                "trials": [{**vars(t), "history": t.history.to_dict("records")} for t in self.search.trials],
            }
        )
        return json.dumps(
            {
                "fold": self.fold,
                "architecture": self.setup.architecture.model_dump(mode="json"),
                "train": self.setup.train.model_dump(mode="json"),
                "history": self.history.to_dict("records"),
                "checkpoint": self.checkpoint.path,  # within Ray storage's file system, given back to from_json
                "test_metrics": self.test_metrics,
                "predictions": self.predictions.to_dict("records"),
                "seconds": self.seconds,
                "search": search,
                "calibration": self.calibration.to_dict(),
            },
            indent=1,
            default=lambda value: value.item(),
        )

    @classmethod
    def from_json(cls, text: str, filesystem: pyarrow.fs.FileSystem | None = None) -> FoldResult:
        """The fold of :meth:`to_json`; ``filesystem``: that of the Ray storage holding its checkpoint (local if
        None)."""
        data = json.loads(text)
        search = data["search"] and SearchResult(
            data["search"]["metric"],
            data["search"]["best"],
            [Trial(**{**t, "history": pd.DataFrame(t["history"])}) for t in data["search"]["trials"]],
        )
        setup = TrainingSetup(architecture_of(data["architecture"]), TrainConfig.model_validate(data["train"]))
        return cls(
            data["fold"],
            setup,
            pd.DataFrame(data["history"]),
            ray.train.Checkpoint(data["checkpoint"], filesystem or pyarrow.fs.LocalFileSystem()),
            data["test_metrics"],
            pd.DataFrame(data["predictions"]).astype({"subject_id": str}),
            data["seconds"],
            search,
            Calibration.from_dict(data.get("calibration")),  # folds kept before 2026-12-07 have none
        )
