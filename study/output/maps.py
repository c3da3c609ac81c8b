"""The attribution maps published: NIfTI files in the study's and the folds' MLflow runs, and their figures.

Per method: the group maps (mean and median per class, mean of all) in the
study run and each fold's in its fold run, the class 1 minus class 0 t map and
its FWER p map; for the linear baseline, its mean weights and their own test.
Each comes back as the report's figures, with the caption templates beside them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from study.attribution.analysis import MethodMaps
from study.attribution.methods import LINEAR_BASELINE, title
from study.attribution.stage import AttributionResult
from study.attribution.stats import PermutationTest
from study.data.targets import Target
from study.output.figures import brain_figure, top_threshold
from study.output.tracking import Tracker
from study.output.viewer import ViewedMap
from study.state import Study

# Captions; {explains}: what the method's maps show of the score they explain
MEAN_MAP = "{title}: mean map, all held-out subjects (top 10% of voxels); explains {explains}"
CLASS_MAP = "{title}: mean map, {name}; explains {explains}"
T_MAP = "{title}: {contrast} t, FWER p < 0.05 ({constant} constant voxels left out)"
WEIGHTS_MAP = "{title}: |weights| on standardized voxels{classes}, mean over folds (top 10% of voxels)"
WEIGHT_TEST = (
    "{title}: {contrast}, the weights of one {model} on all subjects (positive: a higher "
    "standardized intensity points to {positive}), tested by refitting on {permutations} label permutations "
    "within families (FWER by the maximum statistic): {found} voxels at p < 0.05"
)
NONE_SURVIVE = "; none survive, so the weights are shown unthresholded (top 10% of voxels)"

Captioned = tuple[str, Figure]


@dataclass
class MapFigures:
    """One method's figures for the report, and its main one: the map shown beside the other models' maps."""

    figures: list[Captioned]
    main: Captioned | None


class _Logged:
    """Writes maps as NIfTI files in a temporary folder and logs each to a run's ``maps/<method>/``."""

    def __init__(self, tracker: Tracker, folder: Path, result: AttributionResult):
        self.tracker, self.folder, self.result = tracker, folder, result

    def __call__(self, run_id: str, values: np.ndarray, name: str, method: str) -> None:
        path = self.folder / run_id / f"{name}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(image(self.result, values), path)
        self.tracker.log_file(run_id, path, f"maps/{method}")


def publish_maps(
    tracker: Tracker, study: Study, result: AttributionResult, explains: Callable[[str], str]
) -> dict[str, MapFigures]:
    """Every method's maps logged to MLflow; their figures, by method. ``explains(method)`` says what a method's
    maps show of the score they explain (for the captions)."""
    with tempfile.TemporaryDirectory() as folder:
        log = _Logged(tracker, Path(folder), result)
        return {
            method: _baseline(log, study, result, maps)
            if method == LINEAR_BASELINE
            else _method(log, study, result, maps, explains(method))
            for method, maps in result.maps.items()
        }


def _method(log: _Logged, study: Study, result: AttributionResult, maps: MethodMaps, explains: str) -> MapFigures:
    """A method's group maps (study run) and per-fold maps (fold runs); its mean maps and t map as figures."""
    method, name, classes = maps.method, title(maps.method), study.cohort.target
    for group, values in maps.group.items():
        log(study.state.parent_run, values, f"{method}_{group}", method)
    for fold, groups in maps.per_fold.items():
        for group, values in groups.items():
            log(study.state.fold_runs[fold], values, f"fold{fold}_{method}_{group}", method)
    mean = (
        MEAN_MAP.format(title=name, explains=explains),
        brain_figure(image(result, maps.group["mean_all"]), f"{name} (n={result.subjects})", "glass"),
    )
    figures = [mean] + [
        (
            CLASS_MAP.format(title=name, name=label, explains=explains),
            brain_figure(image(result, maps.group[f"mean_{label}"]), f"{name}, {label}"),
        )
        for label in reversed(classes.names)
        if f"mean_{label}" in maps.group
    ]
    if maps.test is not None:
        figures.append(_t_map(log, study.state.parent_run, method, maps.test, result, classes.contrast, classes.slug))
    for label, test in maps.versus_rest.items():  # of several classes: each class against the rest
        contrast, slug = f"{label} - the rest", f"{label}_minus_rest"
        figures.append(_t_map(log, study.state.parent_run, method, test, result, contrast, slug, f"_{label}"))
    return MapFigures(figures, main=mean)


def _t_map(
    log: _Logged,
    parent: str,
    method: str,
    test: PermutationTest,
    result: AttributionResult,
    contrast: str,
    slug: str,
    suffix: str = "",
) -> Captioned:
    """A test's t map (``contrast``: ``male - female``, in file names ``slug``) and its FWER p map logged, with
    their voxel counts (metric names end in ``suffix``: ``_<class>`` of one class against the rest); the t map's
    figure, thresholded at p < 0.05."""
    log(parent, np.nan_to_num(test.t), f"{method}_t_{slug}", method)
    if test.permutations:
        log(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_p_fwer{suffix}", method)
        tested = ~np.isnan(test.p)
        log.tracker.log_metrics(
            parent,
            {
                f"test_voxels_fwer05_{method}{suffix}": float((test.p[tested] < 0.05).sum()),
                f"test_constant_voxels_{method}{suffix}": test.constant,
            },
        )
    significant = np.where(test.p < 0.05, np.nan_to_num(test.t), 0) if test.permutations else np.nan_to_num(test.t)
    name = title(method)
    return (
        T_MAP.format(title=name, contrast=contrast, constant=test.constant),
        brain_figure(image(result, significant), f"{name}: {contrast} (t, p_FWER<0.05)", "glass", symmetric=True),
    )


def _baseline(log: _Logged, study: Study, result: AttributionResult, maps: MethodMaps) -> MapFigures:
    """The linear baseline's mean |weights| (one map per fold model, the same for every subject) and their test."""
    method, name = maps.method, title(maps.method)
    log(study.state.parent_run, maps.group["mean_all"], f"{method}_mean_all", method)
    mean = (
        WEIGHTS_MAP.format(
            title=name, classes=" (the root mean square of each class's)" if study.cohort.target.several else ""
        ),
        brain_figure(image(result, maps.group["mean_all"]), name, "glass"),
    )
    if maps.test is None:
        return MapFigures([mean], main=None)
    tested = _weight_test(log, study.state.parent_run, maps.test, result, study.cohort.target)
    return MapFigures([mean, tested], main=tested)


def _weight_test(
    log: _Logged, parent: str, test: PermutationTest, result: AttributionResult, classes: Target
) -> Captioned:
    """The linear baseline's weight test: its maps and metrics logged, its figure."""
    method, name = LINEAR_BASELINE, title(LINEAR_BASELINE)
    weights = np.nan_to_num(test.t)
    log(parent, weights, f"{method}_weights_{classes.slug}", method)
    found = int((test.p < 0.05).sum()) if test.permutations else 0
    if test.permutations:
        log(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_weights_p_fwer", method)
        log.tracker.log_metrics(parent, {f"test_voxels_fwer05_{method}": float(found)})
    caption = WEIGHT_TEST.format(
        title=name,
        contrast=classes.contrast,
        model="ridge regression" if classes.kind == "regression" else "l2 logistic regression",
        positive=classes.positive,
        permutations=test.permutations,
        found=found,
    ) + ("" if found else NONE_SURVIVE)
    strongest = np.abs(weights) >= np.percentile(np.abs(weights), 90)
    shown = np.where(test.p < 0.05 if found else strongest, weights, 0)
    heading = f"{name}: {classes.contrast} (weights{', p_FWER<0.05' if found else ''})"
    return caption, brain_figure(image(result, shown), heading, "glass", symmetric=True)


def viewed_maps(result: AttributionResult, classes: Target) -> list[ViewedMap]:
    """Every group map the report's static figures show, for its viewer: per method its mean map, each class's,
    and its tests' t maps (coloured at first from the smallest |t| with FWER p < 0.05); the linear baseline's."""
    viewed = []
    for method, maps in result.maps.items():
        name = title(method)
        means = ["mean_all"] if method == LINEAR_BASELINE else [g for g in maps.group if g.startswith("mean_")]
        for group in means:
            shown = "all held-out subjects" if group == "mean_all" else group.removeprefix("mean_")
            shown = "|weights|, mean over folds" if method == LINEAR_BASELINE else f"mean, {shown}"
            volume = result.volume(maps.group[group])
            viewed.append(ViewedMap(f"{name}: {shown}", volume, top_threshold(volume), signed=False))
        tests = {classes.contrast: maps.test} if maps.test is not None else {}
        tests |= {f"{label} - the rest": test for label, test in maps.versus_rest.items()}
        for contrast, test in tests.items():
            kind = "weights" if method == LINEAR_BASELINE else "t"
            survive = np.abs(test.t[test.p < 0.05]) if test.permutations else np.array([])
            shown = "p_FWER < 0.05" if survive.size else "none at p_FWER < 0.05; top 10% shown"
            volume = result.volume(np.nan_to_num(test.t))
            threshold = float(survive.min()) if survive.size else top_threshold(volume)
            viewed.append(ViewedMap(f"{name}: {contrast} ({kind}, {shown})", volume, threshold, signed=True))
    return viewed


def image(result: AttributionResult, values: np.ndarray) -> nib.Nifti1Image:
    """Brain-voxel values as a NIfTI image on the study grid."""
    return nib.Nifti1Image(result.volume(values), result.affine)


def subject_maps(result: AttributionResult, out: Path) -> None:
    """Each subject's map of each method as ``<out>/<method>/sub-<id>_<method>.nii.gz``."""
    store = result.store
    for method in store.methods:
        (out / method).mkdir(parents=True, exist_ok=True)
        for sid, finished in zip(store.subject_ids, store.done(method)):
            if finished:
                nib.save(
                    nib.Nifti1Image(store.read(method, [sid])[0], result.affine),
                    out / method / f"sub-{sid}_{method}.nii.gz",
                )
