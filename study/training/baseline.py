"""The linear baseline: l2 logistic regression (multinomial, of several classes; ridge regression, for a
regression target) on the same preprocessed voxels, in the same folds.

At a few hundred subjects a linear model on voxels often matches or beats a 3D
CNN; a CNN below it is a warning, not a finding. It reads each fold's volumes as
the CNN does (adjusted for the confounds with ``cv.adjust``). Each outer fold standardizes
the voxels inside the brain, chooses the regularization on the fold's inner
splits (the ones the CNN used) by ROC AUC (macro one-vs-rest; by mean absolute error), refits on all of its training
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
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from study.data.cache import VolumeCache
from study.data.splits import OuterFold
from study.data.targets import Target
from study.state import Study
from study.training.metrics import classification_metrics, regression_metrics

C_GRID = tuple(np.logspace(-5, 1, 7))  # inverse regularization strengths tried on the inner splits
ALPHA_GRID = tuple(np.logspace(-1, 5, 7))  # ridge penalties tried on the inner splits (a regression target)


@dataclass
class BaselineResult:
    """One outer fold of the linear baseline."""

    fold: int
    C: float  # the chosen inverse regularization strength (ridge: 1 / its penalty)
    test_metrics: dict[str, float]
    predictions: pd.DataFrame  # subject_id, the true class, P(class 1), predicted (Target.predictions)
    weights: np.ndarray  # [brain voxels] on standardized voxels (several classes: the root mean square of theirs)
    seconds: float
    intercept: float = 0.0
    voxel_mean: np.ndarray | None = None  # [brain voxels]: the standardization of the fold's training subjects
    voxel_scale: np.ndarray | None = None
    class_weights: np.ndarray | None = None  # several classes: [classes, brain voxels], the multinomial model's
    class_intercepts: np.ndarray | None = None  # [classes]


def fit_linear(
    cache: VolumeCache, brain: np.ndarray, fold: OuterFold, labels: dict[str, float], target: Target, seed: int = 0
) -> BaselineResult:
    """Fit, choose the penalty on ``fold``'s inner splits, refit on its training side, test on its held-out side."""
    started = time.perf_counter()
    train = fold.train
    x, y = cache.brain_voxels(train, brain), np.array([labels[s] for s in train])
    position = {s: i for i, s in enumerate(train)}
    inner = [
        (np.array([position[s] for s in split.train]), np.array([position[s] for s in split.test]))
        for split in fold.inner
    ]
    regression, several = target.kind == "regression", target.several
    linear, grid, scoring = (
        (Ridge(), {"ridge__alpha": list(ALPHA_GRID)}, "neg_mean_absolute_error")
        if regression
        else (  # multinomial for several classes (scikit-learn's lbfgs default)
            LogisticRegression(max_iter=5000, random_state=seed),
            {"logisticregression__C": list(C_GRID)},
            "roc_auc_ovr" if several else "roc_auc",
        )
    )
    # Standardization is part of the model, so each inner split scales by its own training subjects.
    search = GridSearchCV(make_pipeline(StandardScaler(), linear), grid, cv=inner, scoring=scoring, refit=True)
    search.fit(x, y)
    model = search.best_estimator_
    best = search.best_params_
    C = 1 / float(best["ridge__alpha"]) if regression else float(best["logisticregression__C"])
    test_labels = np.array([labels[s] for s in fold.test])
    x_test = cache.brain_voxels(fold.test, brain)
    p = model.predict(x_test) if regression else model.predict_proba(x_test)
    p = p if regression or several else p[:, 1]
    scaler, linear = model[0], model[-1]
    weights = np.sqrt(np.mean(linear.coef_**2, axis=0)) if several else np.ravel(linear.coef_)
    return BaselineResult(
        fold.fold,
        C,
        (regression_metrics if regression else classification_metrics)(test_labels, p),
        target.predictions(fold.test, test_labels, p),
        weights.astype(np.float32),
        time.perf_counter() - started,
        float(np.ravel(linear.intercept_)[0]),
        scaler.mean_.astype(np.float32),
        scaler.scale_.astype(np.float32),
        linear.coef_.astype(np.float32) if several else None,
        linear.intercept_.astype(np.float32) if several else None,
    )


def fit_baselines(study: Study, brain: np.ndarray) -> list[BaselineResult]:
    """The linear baseline of every outer fold, as Ray tasks (one CPU each); sorted by fold."""
    labels = dict(zip(study.cohort.ids, study.cohort.labels.tolist()))
    task = ray.remote(num_cpus=1)(fit_linear)
    refs = [
        task.remote(study.fold_cache(fold.fold), brain, fold, labels, study.cohort.target, study.config.cv.seed)
        for fold in study.folds
    ]
    return sorted(ray.get(refs), key=lambda r: r.fold)
