"""A training's checkpoint: the weights worth keeping, the architecture, and how far the training got.

One file, ``checkpoint.pt``, in each checkpoint Ray Train keeps. Plain tensors
and builtins only, so it loads with ``torch.load(weights_only=True)`` (no
pickle of code; a user's network is rebuilt from its ``class`` and keyword
arguments). Its keys (docs/develop.md has the table):

- ``model``, ``arch``, ``input_shape``: the model (:func:`~study.training.models.model_record`);
- ``optimizer``, ``scheduler``: AdamW's and the learning-rate schedule's states (absent in a finished
  selection, whose refit starts afresh);
- :class:`Progress`'s fields: ``phase``, ``epoch``, ``best_epoch``, ``best_val_loss``, ``refit_epochs`` and
  ``history`` (every epoch's metrics so far) and ``calibration`` (the fold's temperature and bias, once the
  inner split has given them; absent in checkpoints from before 2026-12-07).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch

from study.training.calibration import Calibration
from study.training.models import model_from_record, model_record

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Progress:
    """How far one training got: what its checkpoint carries besides the model and the optimizer.

    A worker that restarts (a lost worker, a rerun of the study) reads it back
    and goes on from the epoch after ``epoch`` of ``phase``.
    """

    phase: str  # "select" (epochs on the inner split, early stopping) or "refit" (on all the final fit's subjects)
    epoch: int | None = None  # the phase's last finished epoch; None: the phase has not started
    best_epoch: int | None = None  # the selection's epoch of lowest validation loss so far
    best_val_loss: float = math.inf
    refit_epochs: int | None = None  # the refit's length: best_epoch + 1 after a selection, else as asked
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics so far, both phases
    calibration: dict[str, float] | None = None  # the fold's Calibration (to_dict), fitted on the inner split

    @property
    def next_epoch(self) -> int:
        """The first epoch of ``phase`` still to train."""
        return 0 if self.epoch is None else self.epoch + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Progress:
        """The progress in a checkpoint's record (whose other keys are the model's and the optimizer's); an epoch
        of -1, as checkpoints before 2026-12 wrote a refit that had not started, is None."""
        epoch = record.get("epoch")
        return cls(
            phase=record["phase"],
            epoch=None if epoch is None or epoch < 0 else int(epoch),
            best_epoch=record.get("best_epoch"),
            best_val_loss=record.get("best_val_loss", math.inf),
            refit_epochs=record.get("refit_epochs"),
            history=list(record.get("history", [])),
            calibration=record.get("calibration"),
        )


def save_checkpoint(
    directory: Path, model: torch.nn.Module, weights: dict, progress: Progress, optimizer: dict | None = None
) -> None:
    """Write ``checkpoint.pt``: ``weights`` (the state worth keeping) of ``model``'s architecture, the training's
    progress, and ``optimizer`` (the optimizer's and the schedule's states) when the phase goes on from here."""
    torch.save({**model_record(model, weights), **progress.to_dict(), **(optimizer or {})}, directory / CHECKPOINT_FILE)


def read_checkpoint(checkpoint: ray.train.Checkpoint | Path) -> dict[str, Any]:
    """A checkpoint's record, its tensors on the host (a directory, or a Ray Checkpoint anywhere Ray stores them)."""
    if isinstance(checkpoint, ray.train.Checkpoint):
        with checkpoint.as_directory() as directory:
            return read_checkpoint(Path(directory))
    return torch.load(Path(checkpoint) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def load_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics stored in a training checkpoint."""
    return Progress.from_dict(read_checkpoint(checkpoint)).history


def load_model(checkpoint: ray.train.Checkpoint | Path, calibrated: bool = False) -> torch.nn.Module:
    """The trained model of a checkpoint (directory or Ray Checkpoint), in eval mode, on the host
    (``Precision.model`` moves it to a device, in its memory format).

    ``calibrated``: with the fold's calibration on its logits (:class:`~study.training.calibration.CalibratedModel`),
    as the maps need it: their decided classes are then the ones the study reports.
    """
    record = read_checkpoint(checkpoint)
    model = model_from_record(record)
    return Calibration.from_dict(record.get("calibration")).applied_to(model) if calibrated else model


def network_class(checkpoint: ray.train.Checkpoint) -> str | None:
    """The ``model.class`` a checkpoint's network is built from (None: the study's own CNN), read without
    building it: building imports that class's module."""
    return read_checkpoint(checkpoint)["arch"].get("class")
