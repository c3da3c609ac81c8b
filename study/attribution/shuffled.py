"""The label-randomization check's model (Adebayo et al. 2018): the first fold's training again, on shuffled
labels, started as soon as that fold is done so that it trains while later folds do; its maps are compared in
:mod:`.sanity`."""

from __future__ import annotations

import time

import numpy as np
import ray
import ray.train

from study.config import ResourcesConfig
from study.state import Study
from study.storage import join
from study.training.calibration import Calibration
from study.training.crossval import driving_task
from study.training.folds import FoldResult
from study.training.loop import TrainingData
from study.training.trainer import TrainingSetup, fit


def _shuffled_label_fit(
    setup: TrainingSetup, data: TrainingData, storage: str, resources: ResourcesConfig, epochs: int
) -> tuple[ray.train.Checkpoint, float]:
    """Train the label-randomized model (a Ray task); its checkpoint and wall seconds (waiting included)."""
    started = time.perf_counter()
    checkpoint = fit(setup, data, "label_randomized", join(storage, "train"), resources, refit_epochs=epochs).checkpoint
    return checkpoint, time.perf_counter() - started


def start_label_randomization(study: Study, first: FoldResult) -> ray.ObjectRef | None:
    """Start training the label-randomization check's model, so that it trains while later folds do.

    The shuffled model trains like the first fold's final model (same setup, same
    subjects, same number of epochs) on labels shuffled across all of them, so it
    can learn nothing about the label. None when the study does not ask for it.
    """
    attribution = study.config.attribution
    if attribution is None or not attribution.sanity.label_randomization:
        return None
    train_ids = study.folds[first.fold].train
    shuffled_labels = np.random.default_rng(study.config.train.seed).permutation(study.labels(train_ids))
    standardization = None
    if study.cohort.target.kind == "regression":  # learned as the folds learn it: standardized
        standardization = Calibration.standardizing(shuffled_labels)
        shuffled_labels = standardization.standardized(shuffled_labels)
    cache = study.fold_cache(first.fold)  # its volumes as the first fold's model read them
    none = shuffled_labels[:0]
    data = TrainingData(
        cache, [], none, [], none, train_ids, shuffled_labels, standardization, study.cohort.target.outputs
    )
    return driving_task(_shuffled_label_fit).remote(
        first.setup, data, study.storage, study.config.resources, first.final_epochs
    )
