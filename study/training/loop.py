"""Training one model on Ray Train (data-parallel, DDP) and predicting with it.

``train_loop_per_worker`` is what every Ray Train worker runs. A training has
up to two phases, in one Ray Train run (its set-up is paid once):

- **select**: train on an inner training split and validate on its inner
  validation split after every epoch; stop early when the validation loss no
  longer improves, and remember the best epoch.
- **calibrate** instead of select, when the epochs are chosen already (the
  default final fit trains all of ``train.epochs``): train that many epochs on
  the inner training split and predict its validation subjects, which
  calibrates the fold (:mod:`.calibration`).
- **refit**: train a fresh model on all the subjects of the final fit for the
  selected number of epochs (or a given number), and keep the last state: the
  model that is tested and explained sees every training subject of its fold.

Each epoch's metrics are reported to Ray Train, with a checkpoint whenever the
state worth keeping changes, so a training that loses a worker resumes from there:
the checkpoint carries the training's :class:`~study.training.checkpoint.Progress`
(its phase, epoch, best epoch and history), which :func:`_select` and
:func:`_refit` read and write.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from study.config import TrainConfig
from study.data.cache import CachedVolumes, VolumeCache, collate
from study.runtime import Precision
from study.training.calibration import MIN_SLOPE, Calibration, logit_difference
from study.training.checkpoint import CHECKPOINT_FILE, Progress, save_checkpoint
from study.training.metrics import epoch_scores
from study.training.models import Architecture, Network
from study.training.phase import Phase, cpu_state


@dataclass(frozen=True)
class TrainingData:
    """The subjects of one training.

    ``train_*``/``val_*`` are the selection phase's split (no validation
    subjects: no selection phase); ``refit_*`` the subjects of the final fit
    (none: the selected model is the final one).
    """

    cache: VolumeCache
    train_ids: list[str]
    train_labels: np.ndarray
    val_ids: list[str]
    val_labels: np.ndarray
    refit_ids: list[str] = field(default_factory=list)
    refit_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # A regression target: the labels are standardized by this map of the fold's training subjects, which takes
    # the network's outputs back to the target's unit; None for classes.
    standardization: Calibration | None = None
    outputs: int = 2  # the network's: one per class, or 1 for a regression target (Target.outputs)

    def selection_only(self) -> TrainingData:
        """The same subjects without the final fit (what a search trial trains)."""
        return replace(self, refit_ids=[], refit_labels=self.refit_labels[:0])

    def refit_only(self) -> TrainingData:
        """The same subjects without the selection split (when the epochs are already chosen)."""
        return replace(self, val_ids=[], val_labels=self.val_labels[:0])


@torch.no_grad()
def predict_log_odds(
    model: torch.nn.Module, dataset: CachedVolumes, batch_size: int, precision: Precision
) -> np.ndarray:
    """The log-odds of class 1 (logit 1 - logit 0; e.g. of male) for every subject of ``dataset``, in order (of
    several classes, [subjects, classes] logits about their mean; of a regression network, its output).

    Softmax's P(class 1) is their sigmoid; a fold's :class:`~study.training.calibration.Calibration` maps them to
    calibrated probabilities. In float32 whatever the training's precision (``Precision.exact``): bf16 logits would
    round test probabilities to steps of up to 0.03 and tie subjects in the ROC curve.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, pin_memory=precision.pinned)
    log_odds = []
    for x, _ in loader:
        with precision.exact():
            logits = model(precision.volumes(x))
        log_odds.append(logit_difference(logits.float().cpu()))
    return np.concatenate(log_odds) if log_odds else np.zeros(0)


def _fit_scores(
    phase: Phase, worker: _Worker, progress: Progress, standardization: Calibration | None
) -> dict[str, float]:
    """The final model's scores on its own training subjects (eval mode): did it fit them at all? With
    ``train.calibration: recenter``, they also set the fold's calibration (:meth:`Calibration.recentered`).

    Scored before that calibration: a threshold set on these very subjects would make a model that learned
    nothing look as if it had fitted them. A regression fold (``standardization``) is scored as it predicts,
    after its calibration: the line of its predictions on these subjects' true values (``fit_raw_slope``,
    ``fit_raw_intercept``) undone with ``recenter`` (:meth:`Calibration.corrected_by`).
    """
    z = predict_log_odds(phase.model, phase.dataset, phase.train.batch_size, worker.precision)
    labels, loss = phase.dataset.labels.numpy(), phase.train.loss
    if standardization is None:
        if phase.train.calibration == "recenter":
            progress.calibration = Calibration.recentered(z, labels).to_dict()
        return epoch_scores(z, labels, "fit", None, loss)
    raw = epoch_scores(z, labels, "fit", standardization, loss)
    calibration = standardization
    if phase.train.calibration == "recenter" and raw["fit_slope"] >= MIN_SLOPE:  # else not a line to undo
        calibration = standardization.corrected_by(raw["fit_slope"], raw["fit_intercept"])
    progress.calibration = calibration.to_dict()
    predicted = standardization.standardized(calibration.values(z))
    line = {"fit_raw_slope": raw["fit_slope"], "fit_raw_intercept": raw["fit_intercept"]}
    return epoch_scores(predicted, labels, "fit", standardization, loss) | line


def _audit(directory: str | None, record: dict[str, Any]) -> None:
    """Append one JSON line to this worker's data-access audit (which subjects it read)."""
    if directory:
        rank = ray.train.get_context().get_world_rank()
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _report_due(last_report: float, every_s: float, device: torch.device) -> bool:
    """True when ``every_s`` seconds have passed on any worker: all of them must report together.

    Each report waits for Ray Train's controller to take it (one per poll; see
    :data:`study.training.trainer.CONTROLLER_POLL_S`) and a checkpoint costs a save and an upload, so the
    final fit reports (with a checkpoint, for restarts) every ``resources.checkpoint_every_s`` and at its end;
    the selection phase reports every epoch, which Tune's schedulers need.
    """
    due = torch.tensor([float(time.monotonic() - last_report >= every_s)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(due, op=torch.distributed.ReduceOp.MAX)
    return bool(due.item())


def _live(path: str | None, record: dict[str, Any], rank: int) -> None:
    """Append an epoch's record to the training's live file (rank 0), which the driver follows for MLflow."""
    if path and rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class _Worker:
    """What one Ray Train worker needs besides the model and its data: where it runs and what it records."""

    rank: int
    precision: Precision
    audit_dir: str | None  # where to record which subjects this worker read (tests prove no leak with it)
    live_path: str | None  # rank 0 appends every epoch's metrics there as soon as they exist
    checkpoint_every_s: float  # how often the refit reports with a checkpoint


def _report(
    worker: _Worker, metrics: dict, model: torch.nn.Module, weights: dict | None, progress: Progress, optimizer: dict
) -> None:
    """Report an epoch's metrics; with a checkpoint of ``weights`` (written by rank 0 only) when there is state to
    keep (``weights`` not None)."""
    if weights is not None and worker.rank == 0:
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory), model, weights, progress, optimizer)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    else:
        ray.train.report(metrics)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: select the epoch count on the inner split, then refit; report as it goes.

    ``loop_config`` holds ``architecture`` (:class:`Architecture` or :class:`Network`), ``train``
    (the validated :class:`TrainConfig`), ``data`` (:class:`TrainingData`),
    ``refit_epochs`` (the refit's epochs when there is no selection phase),
    ``audit_dir`` (None, or where to record which subjects this worker read) and
    ``live_path`` (None, or a JSON-lines file that gets every epoch's metrics as
    soon as they exist: Ray Train's reports are throttled, this is not) and
    ``checkpoint_every_s`` (how often the final fit reports with a checkpoint).
    """
    architecture: Architecture | Network = loop_config["architecture"]
    train: TrainConfig = loop_config["train"]
    data: TrainingData = loop_config["data"]
    precision = Precision.choose(ray.train.torch.get_device(), train.precision, train.channels_last)
    worker = _Worker(
        ray.train.get_context().get_world_rank(),
        precision,
        loop_config.get("audit_dir"),
        loop_config.get("live_path"),
        loop_config["checkpoint_every_s"],
    )
    resumed = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            # To the host: restoring copies the weights and the optimizer's state into the phase's own tensors.
            resumed = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if resumed is not None:
        progress = Progress.from_dict(resumed)
    else:
        progress = Progress("select" if data.val_ids else "refit", refit_epochs=loop_config.get("refit_epochs"))
    final = None
    if progress.phase == "select":
        final, progress = _select(architecture, train, data, worker, progress, resumed)
        resumed = None  # what the refit restores is its own checkpoint's, not the selection's
    if progress.phase == "refit" and data.refit_ids:
        final = None  # the selection's model, optimizer and DDP buffers go before the refit's are built
        final = _refit(architecture, train, data, worker, progress, resumed)
    weights = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in final.bare.parameters()))
    _audit(worker.audit_dir, {"final_weights": weights.hexdigest()})


def _select(
    architecture: Architecture | Network,
    train: TrainConfig,
    data: TrainingData,
    worker: _Worker,
    progress: Progress,
    resumed: dict | None,
) -> tuple[Phase, Progress]:
    """The selection phase on the inner split: it chooses the epoch count, or (given one) only calibrates.

    Without ``progress.refit_epochs``, every epoch is validated and the phase stops when the validation loss no
    longer improves; the best epoch's validation predictions calibrate the fold (as ``train.calibration`` says).
    With it, the phase trains that many epochs and validates the last one, whose predictions calibrate the fold.
    Either way, BatchNorm's statistics are re-estimated on the un-augmented training subjects before each
    validation. Returns the phase (holding the best epoch's weights when there is no refit) and the progress the
    refit starts from.
    """
    fixed = progress.refit_epochs  # the epochs are chosen already: the inner split only calibrates
    epochs = fixed or train.epochs
    current = Phase(
        architecture, train, data.cache, data.train_ids, data.train_labels, epochs, worker.precision, data.outputs
    )
    val_set = CachedVolumes(data.cache, data.val_ids, data.val_labels)
    if resumed is not None:
        current.restore(resumed)
    best_state, stale, last_report = cpu_state(current.bare), 0, time.monotonic()
    for epoch in range(progress.next_epoch, epochs):
        started = time.perf_counter()
        metrics, seen = current.epoch(epoch)
        _audit(worker.audit_dir, {"phase": "select", "epoch": epoch, "subjects": seen + data.val_ids})
        metrics = {"epoch": epoch, **metrics}
        improved = False
        if not fixed or epoch == epochs - 1:
            current.reestimate_batchnorm()
            z = predict_log_odds(current.model, val_set, train.batch_size, worker.precision)
            metrics |= epoch_scores(z, data.val_labels, "val", data.standardization, train.loss)
            improved = fixed is not None or metrics["val_loss"] < progress.best_val_loss - 1e-4
            if improved:
                progress.best_val_loss, progress.best_epoch = metrics["val_loss"], epoch
                progress.calibration = _calibration(z, data.val_labels, train.calibration)
                stale, best_state = 0, cpu_state(current.bare)
            else:
                stale += 1
        last = epoch == epochs - 1 or (not fixed and stale >= train.patience)
        if last and not data.refit_ids:  # the selected model is the final one: its fit to its own subjects
            current.bare.load_state_dict(best_state)
            metrics |= _fit_scores(current, worker, progress, data.standardization)
        metrics |= {
            "best_val_loss": progress.best_val_loss,
            "epoch_seconds": time.perf_counter() - started,
            "wall_time": time.time(),
        }
        if fixed:  # its own curves: a search's best trial may have logged the selection's already
            metrics = {(k if k == "wall_time" else f"calibration_{k}"): v for k, v in metrics.items()}
        progress.history.append({"phase": "calibrate" if fixed else "select", **metrics})
        _live(worker.live_path, progress.history[-1], worker.rank)
        progress.epoch = epoch
        # What a resumed run needs: at the end, to start the refit; before, to go on with this phase.
        kept, optimizer = (_refit_from(progress), {}) if last and data.refit_ids else (progress, current.progress())
        # A checkpoint when the state worth keeping changes (fault tolerance) and at the end (the full history).
        if fixed:
            due = last or _report_due(last_report, worker.checkpoint_every_s, worker.precision.device)
            weights = cpu_state(current.bare) if due else None
        else:
            weights = best_state if improved or last else None
        _report(worker, metrics, current.bare, weights, kept, optimizer)
        last_report = time.monotonic() if weights is not None else last_report
        if last:
            break
    return current, _refit_from(progress)


def _refit_from(progress: Progress) -> Progress:
    """The progress a refit starts from after the selection ``progress``: its epochs chosen, or given."""
    return replace(progress, phase="refit", epoch=None, refit_epochs=progress.refit_epochs or progress.best_epoch + 1)


def _calibration(log_odds: np.ndarray, labels: np.ndarray, kind: str) -> dict[str, float] | None:
    """The fold's calibration from the inner split's validation predictions (``train.calibration``: temperature
    or platt), as its checkpoint keeps it; None for the kinds that do not use them."""
    if kind not in ("temperature", "platt"):
        return None
    return Calibration.fit(log_odds, labels, bias=kind == "platt").to_dict()


def _refit(
    architecture: Architecture | Network,
    train: TrainConfig,
    data: TrainingData,
    worker: _Worker,
    progress: Progress,
    resumed: dict | None,
) -> Phase:
    """The refit: a fresh model on all of the final fit's subjects for ``progress.refit_epochs`` epochs, reporting
    with a checkpoint every ``checkpoint_every_s`` and at its end; returns its phase, holding the final model,
    whose BatchNorm statistics are those of its un-augmented training subjects."""
    epochs = progress.refit_epochs
    current = Phase(
        architecture, train, data.cache, data.refit_ids, data.refit_labels, epochs, worker.precision, data.outputs
    )
    if resumed is not None and progress.epoch is not None:
        current.restore(resumed)
    last_report = time.monotonic()
    for epoch in range(progress.next_epoch, epochs):
        started = time.perf_counter()
        metrics, seen = current.epoch(epoch)
        _audit(worker.audit_dir, {"phase": "refit", "epoch": epoch, "subjects": seen})
        metrics = {"refit_epoch": epoch, **{f"refit_{k}": v for k, v in metrics.items()}}
        if epoch == epochs - 1:
            current.reestimate_batchnorm()
            metrics |= _fit_scores(current, worker, progress, data.standardization)
        metrics |= {"refit_epoch_seconds": time.perf_counter() - started, "wall_time": time.time()}
        progress.history.append({"phase": "refit", **metrics})
        _live(worker.live_path, progress.history[-1], worker.rank)
        progress.epoch = epoch
        if epoch == epochs - 1 or _report_due(last_report, worker.checkpoint_every_s, worker.precision.device):
            _report(worker, metrics, current.bare, cpu_state(current.bare), progress, current.progress())
            last_report = time.monotonic()
    return current
