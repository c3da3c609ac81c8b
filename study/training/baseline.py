"""The linear baseline: l2 logistic regression on the same preprocessed voxels, in the same folds.

At a few hundred subjects a linear model on voxels often matches or beats a 3D
CNN; a CNN below it is a warning, not a finding. It reads each fold's volumes as
the CNN does (adjusted for the confounds with ``cv.adjust``). Each outer fold standardizes
the voxels inside the brain, chooses the regularization on the fold's inner
splits (the ones the CNN used) by ROC AUC, refits on all of its training
subjects and predicts its held-out subjects. Its weights (standardized voxels)
are a map like the others; note that a linear model's weights show what it
uses, not where the groups differ (Haufe et al. 2014).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from study.data.cache import VolumeCache
from study.data.cohort import Classes
from study.data.splits import OuterFold
from study.state import Study
from study.training.metrics import classification_metrics

C_GRID = tuple(np.logspace(-5, 1, 7))  # inverse regularization strengths tried on the inner splits


@dataclass
class BaselineResult:
    """One outer fold of the linear baseline."""

    fold: int
    C: float  # the chosen inverse regularization strength
    test_metrics: dict[str, float]
    predictions: pd.DataFrame  # subject_id, the true class, P(class 1), predicted (Classes.predictions)
    weights: np.ndarray  # [brain voxels] on standardized voxels
    seconds: float
    intercept: float = 0.0
    voxel_mean: np.ndarray | None = None  # [brain voxels]: the standardization of the fold's training subjects
    voxel_scale: np.ndarray | None = None


def fit_linear(
    cache: VolumeCache, brain: np.ndarray, fold: OuterFold, labels: dict[str, int], classes: Classes, seed: int = 0
) -> BaselineResult:
    """Fit, choose C on ``fold``'s inner splits, refit on its training side, test on its held-out side."""
    started = time.perf_counter()
    train = fold.train
    x, y = cache.brain_voxels(train, brain), np.array([labels[s] for s in train])
    position = {s: i for i, s in enumerate(train)}
    inner = [
        (np.array([position[s] for s in split.train]), np.array([position[s] for s in split.test]))
        for split in fold.inner
    ]
    # Standardization is part of the model, so each inner split scales by its own training subjects.
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed)),
        {"logisticregression__C": list(C_GRID)},
        cv=inner,
        scoring="roc_auc",
        refit=True,
    )
    search.fit(x, y)
    model, C = search.best_estimator_, float(search.best_params_["logisticregression__C"])
    test_labels = np.array([labels[s] for s in fold.test])
    p = model.predict_proba(cache.brain_voxels(fold.test, brain))[:, 1]
    scaler, linear = model[0], model[-1]
    return BaselineResult(
        fold.fold,
        C,
        classification_metrics(test_labels, p),
        classes.predictions(fold.test, test_labels, p),
        linear.coef_[0].astype(np.float32),
        time.perf_counter() - started,
        float(linear.intercept_[0]),
        scaler.mean_.astype(np.float32),
        scaler.scale_.astype(np.float32),
    )


def fit_baselines(study: Study, brain: np.ndarray) -> list[BaselineResult]:
    """The linear baseline of every outer fold, as Ray tasks (one CPU each); sorted by fold."""
    labels = dict(zip(study.cohort.ids, study.cohort.labels.tolist()))
    task = ray.remote(num_cpus=1)(fit_linear)
    refs = [
        task.remote(study.fold_cache(fold.fold), brain, fold, labels, study.cohort.classes, study.config.cv.seed)
        for fold in study.folds
    ]
    return sorted(ray.get(refs), key=lambda r: r.fold)
