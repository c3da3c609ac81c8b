"""The attribution stage of a study: explain every held-out subject, analyse the maps, check them.

The one attribution module that reads the :class:`~study.state.Study` and its
config and talks to Ray: it sends the fold models to the actor pool
(:mod:`.actors`), reads the maps from their store, runs the permutation tests
where the hardware is (GPU shares as Ray tasks, else this process), the sanity
checks as Ray tasks beside each other, and hands the arrays to the plain
functions of :mod:`.analysis` and :mod:`.sanity`. Everything comes back in an
:class:`AttributionResult`, with the seconds each part took; publishing it is
:mod:`study.output`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from study.attribution.actors import Explanation, FoldModel, explain_cohort, pool_size
from study.attribution.analysis import (
    Atlas,
    HeldOut,
    MethodMaps,
    analyse_method,
    baseline_maps,
    ground_truth,
    methods_with_group_test,
    normalized_maps,
    read_atlas,
)
from study.attribution.gradcam import feature_grid
from study.attribution.group import method_agreement, unmask
from study.attribution.linear import LinearVoxelModel, weight_test
from study.attribution.methods import LINEAR_BASELINE
from study.attribution.sanity import (
    RANDOM,
    RANDOM_BLOB_MM,
    SanityChecks,
    deletion_check,
    deletion_tables,
    label_randomization,
    parameter_randomization,
    random_blobs,
    top_voxels,
)
from study.attribution.stats import PermutationTest, permutation_test_on_device
from study.attribution.store import MapStore
from study.config import AttributionConfig
from study.state import StageTimes, Study
from study.training.baseline import BaselineResult
from study.training.checkpoint import load_history
from study.training.confounds import confound_design
from study.training.folds import FoldResult
from study.training.metrics import FIT_SCORE
from study.training.models import build_model

# Raised when a method computes different maps for the same settings, so that a rerun does not reuse old maps
# (2: under the contrast, Grad-CAM's magnitude and Meaningful Perturbations signed by each subject's decision;
# 3: the decisions are the calibrated ones).
MAPS_VERSION = "3"


@dataclass
class AttributionResult:
    """What the attribution stage found, and how long each of its parts took."""

    maps: dict[str, MethodMaps]  # per method in the configured order, then the linear baseline's weights
    agreement: pd.DataFrame  # every pair of methods: Spearman and top-voxel Dice, over subjects
    sanity: SanityChecks
    brain: np.ndarray  # bool [D, H, W]: the voxels the maps cover
    affine: np.ndarray  # of the study grid
    subjects: int  # held-out subjects explained
    target: str  # the score every map explains (config attribution.target)
    store: MapStore  # every subject's maps
    gradcam_grid: tuple[tuple[int, int, int], float]  # fold 0's Grad-CAM layer: voxels per axis, spacing in mm
    regions: Atlas | None  # what the report's viewer names: the study's atlas, else a cohort's planted regions
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (attribution, ...)

    def volume(self, values: np.ndarray) -> np.ndarray:
        """Brain-voxel values back on the grid (zero outside the brain)."""
        return unmask(values, self.brain)

    @property
    def localization(self) -> pd.DataFrame:
        """One row per method with its localization scores (empty without a ground truth)."""
        return pd.DataFrame([{"method": m.method, **m.localization} for m in self.maps.values() if m.localization])


def explanation_of(attribution: AttributionConfig, study: Study) -> Explanation:
    """What ``attribution`` asks to compute for every subject (with the study's cohort mean when MP needs it)."""
    needs_mean = "perturbation" in attribution.methods and attribution.perturbation.reference == "cohort_mean"
    mean = study.cohort_mean if needs_mean else None
    return Explanation(tuple(attribution.methods), attribution.target, attribution.perturbation, mean)


def explain_study(
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    shuffled_fit: ray.ObjectRef | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AttributionResult:
    """Explain all held-out subjects with every method, analyse the maps and check them.

    Parameters
    ----------
    study : Study
        The execution (its config's ``attribution`` section says what to compute).
    results : list of FoldResult
        Every outer fold's model and held-out subjects, sorted by fold.
    baselines : list of BaselineResult
        Every fold's linear baseline: its weights are one more map (a subject's: its fold model's weights).
    shuffled_fit : ray.ObjectRef, optional
        The label-randomization check's training (:func:`~.shuffled.start_label_randomization`), if any.
    on_progress : callable, optional
        ``on_progress(done, total)`` after each batch of subjects explained.

    Returns
    -------
    AttributionResult
        Group maps, tests, agreement, localization and sanity checks. Maps are kept under the study directory: a
        rerun computes only missing subjects.
    """
    attribution, times = study.config.attribution, StageTimes()
    jobs = [
        FoldModel(r.fold, r.checkpoint, ids, study.labels(ids), study.fold_cache(r.fold))
        for r in results
        for ids in [r.predictions.subject_id.tolist()]  # its held-out subjects
    ]
    folder = study.directory / "maps" / _store_key(attribution, results)
    store = MapStore(folder, study.cohort.ids, study.cache.shape, list(attribution.methods))
    gpus_per_actor = attribution.gpus_per_actor if study.config.resources.use_gpu else 0.0
    actors = pool_size(attribution.actors, gpus_per_actor)
    explanations = [(store, explanation_of(attribution, study), "explaining"), *_versus_rest(study, folder)]
    ids = [s for job in jobs for s in job.subject_ids]
    total, done = sum(len(where.missing(ids)) for where, _, _ in explanations), 0
    with times.stage("attribution"):
        for where, explanation, desc in explanations:  # each subject's own maps, then each class against the rest
            on_batch = (lambda n, before=done: on_progress(before + n, total)) if on_progress else None
            batch = attribution.batch_size
            done += explain_cohort(jobs, where, explanation, batch, actors, gpus_per_actor, on_batch, desc)
    with times.stage("group statistics"):
        versus_rest = {explanation.versus_rest: where for where, explanation, _ in explanations[1:]}
        maps, agreement, regions = _group_analysis(study, jobs, baselines, store, versus_rest)
    with times.stage("sanity checks"):
        sanity, training = _sanity_checks(study, jobs, results[0], baselines, store, shuffled_fit)
    times.merge(training)
    return AttributionResult(
        maps=maps,
        agreement=agreement,
        sanity=sanity,
        brain=study.brain,
        affine=study.cache.affine,
        subjects=sum(len(job.subject_ids) for job in jobs),
        target=attribution.target,
        store=store,
        gradcam_grid=_gradcam_grid(results[0], study),
        regions=regions,
        seconds=times.seconds,
    )


def _versus_rest(study: Study, folder: Path) -> list[tuple[MapStore, Explanation, str]]:
    """Of several classes, each class's score against the rest explained for every subject, by the methods the
    table tests (:class:`~study.attribution.targets.VersusRest`), for its test between its subjects and the rest:
    where its maps go, what to compute, what the progress bar says. None of one target class or a regression's."""
    tested = methods_with_group_test(study.config.attribution.methods, "contrast")
    if not (study.cohort.target.several and tested):
        return []
    perturbation, ids, shape = study.config.attribution.perturbation, study.cohort.ids, study.cache.shape
    return [
        (
            MapStore(folder / f"versus_rest_{name}", ids, shape, tested),
            Explanation(tuple(tested), "contrast", perturbation, versus_rest=k),
            f"{name} vs rest",
        )
        for k, name in enumerate(study.cohort.target.names)
    ]


def _gradcam_grid(first: FoldResult, study: Study) -> tuple[tuple[int, int, int], float]:
    """Grad-CAM's resolution: the first fold's network's last feature map, voxels per axis and their spacing in mm."""
    features, spacing = feature_grid(build_model(first.setup.architecture, study.cache.shape).eval(), study.cache.shape)
    return features, spacing[0] * study.cache.grid.voxel_mm


def _store_key(attribution: AttributionConfig, results: list[FoldResult]) -> str:
    """Maps are only reused for the same models, the same attribution settings and the same methods' code."""
    checkpoints = [r.checkpoint.path for r in sorted(results, key=lambda r: r.fold)]
    parts = [MAPS_VERSION, attribution.model_dump_json(), *checkpoints]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _group_analysis(
    study: Study,
    jobs: list[FoldModel],
    baselines: list[BaselineResult],
    store: MapStore,
    versus_rest: dict[int, MapStore],
) -> tuple[dict[str, MethodMaps], pd.DataFrame, Atlas | None]:
    """Every method's group analysis (and the linear baseline's weights as one more map), their agreement, and the
    regions that name a voxel (the atlas, else a synthetic cohort's planted ones)."""
    attribution, brain = study.config.attribution, study.brain
    ids = [s for job in jobs for s in job.subject_ids]
    family = {s.subject_id: s.family_id for s in study.cohort.subjects}
    folds = np.array([job.fold for job in jobs for _ in job.subject_ids])
    held_out = HeldOut(ids, study.labels(ids), folds, np.array([family[s] for s in ids]))
    normalized = normalized_maps(store, attribution.methods, ids, brain)
    if baselines:
        normalized[LINEAR_BASELINE] = baseline_maps({b.fold: b.weights for b in baselines}, held_out.folds)
    tests, per_class = _group_tests(study, normalized, held_out, baselines, jobs, versus_rest)
    target, grid = study.cohort.target, study.cache.grid
    effect = "age" if target.kind == "regression" else "group" if target.several else ""
    truth = ground_truth(study.config.cohort.root, grid, effect)
    atlas = read_atlas(attribution.atlas, attribution.atlas_names, grid)
    classes = study.cohort.target.names
    maps = {
        method: analyse_method(
            method, values, held_out, classes, brain, tests.get(method), truth, atlas, per_class.get(method, {})
        )
        for method, values in normalized.items()
    }
    planted = Atlas(truth.regions, truth.names) if truth is not None else None
    return maps, method_agreement(normalized), atlas or planted


def _group_tests(
    study: Study,
    normalized: dict[str, np.ndarray],
    held_out: HeldOut,
    baselines: list[BaselineResult],
    jobs: list[FoldModel],
    versus_rest: dict[int, MapStore],
) -> tuple[dict[str, PermutationTest], dict[str, dict[str, PermutationTest]]]:
    """The class 1 minus class 0 test of each method that gets one (a regression target's: the association of
    the maps with it, an OLS t in a model with an intercept, under Freedman-Lane permutations), and the linear
    baseline's weight test; of several classes, each class's test against the rest instead, by method and class.

    One question for every subject: with GPUs, the tests run side by side, each on a GPU share; on CPUs in this
    process, whose threads all work on each test's sums.
    """
    attribution, resources, seed = study.config.attribution, study.config.resources, study.config.cv.seed
    names = study.cohort.confounds  # the test adjusts for them (Freedman-Lane)
    confounds = confound_design(study.cohort.confound_table(held_out.subject_ids)) if names else None
    regression = study.cohort.target.kind == "regression"
    if regression:  # no confounds: the design is the intercept alone
        confounds = np.zeros((len(held_out.subject_ids), 0))
    design = (attribution.permutations, held_out.folds, held_out.families, seed, confounds)
    arguments = {
        method: (normalized[method], held_out.labels, *design)
        for method in methods_with_group_test(attribution.methods, attribution.target)
    }
    classes = study.cohort.target.names
    for k, store in versus_rest.items():  # the class's subjects against the rest, maps of its score against the rest
        maps = normalized_maps(store, store.methods, held_out.subject_ids, study.brain)
        arguments |= {(m, classes[k]): (maps[m], (held_out.labels == k).astype(int), *design) for m in maps}
    if resources.use_gpu:
        task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor)(permutation_test_on_device)
        tests = dict(zip(arguments, ray.get([task.remote(*a) for a in arguments.values()])))
    else:
        tests = {key: permutation_test_on_device(*a) for key, a in arguments.items()}
    tests = {key: replace(test, adjusted_for=names) for key, test in tests.items()}
    per_class: dict[str, dict[str, PermutationTest]] = {}
    for key in [key for key in tests if isinstance(key, tuple)]:
        per_class.setdefault(key[0], {})[key[1]] = tests.pop(key)
    if baselines and not study.cohort.target.several:  # the linear model's weights, refitted on permuted labels
        # each subject as its fold's models read it: with cv.adjust, adjusted by its fold's adjustment
        voxels = np.concatenate([job.cache.brain_voxels(job.subject_ids, study.brain) for job in jobs])
        C = float(np.median([b.C for b in baselines]))
        tests[LINEAR_BASELINE] = weight_test(
            voxels, held_out.labels, C, attribution.permutations, held_out.families, seed, regression=regression
        )
    return tests, per_class


def _sanity_checks(
    study: Study,
    jobs: list[FoldModel],
    first: FoldResult,
    baselines: list[BaselineResult],
    store: MapStore,
    shuffled_fit: ray.ObjectRef | None,
) -> tuple[SanityChecks, dict[str, float]]:
    """The deletion check of every fold, beside the randomization checks of the first fold's model; and the
    seconds of the label-randomized training (its training, and its Ray Train set-up, as for a fold)."""
    attribution, resources = study.config.attribution, study.config.resources
    task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor if resources.use_gpu else 0)
    deleting, deleting_linear = _deletion(study, task(deletion_check), jobs, baselines, store)
    explanation = explanation_of(attribution, study)
    subjects = first.predictions.subject_id.tolist()[: attribution.sanity.subjects]
    on_subjects = (
        study.fold_cache(first.fold),
        subjects,
        study.labels(subjects),
        {m: store.read(m, subjects) for m in attribution.methods},
        study.brain,
        explanation,
        attribution.batch_size,
    )
    cascade = task(parameter_randomization).remote(first.checkpoint, *on_subjects)
    shuffled, fit_accuracy, seconds = pd.DataFrame(), float("nan"), {}
    if shuffled_fit is not None:
        checkpoint, wall = ray.get(shuffled_fit)
        history = pd.DataFrame(load_history(checkpoint))
        training = float(history.filter(like="epoch_seconds").sum().sum())
        seconds = {"label-randomized training": training, "Ray Train set-up": max(wall - training, 0.0)}
        fit_accuracy = float(history[FIT_SCORE[study.cohort.target.kind]].dropna().iloc[-1])
        shuffled = ray.get(task(label_randomization).remote(checkpoint, *on_subjects))
    cnn = dict(zip((job.fold for job in jobs), ray.get(deleting)))
    linear = dict(zip(deleting_linear, ray.get(list(deleting_linear.values()))))
    deletion, summary = deletion_tables(cnn, linear)
    return SanityChecks(ray.get(cascade), shuffled, fit_accuracy, deletion, summary), seconds


def _deletion(
    study: Study,
    task: ray.remote_function.RemoteFunction,
    jobs: list[FoldModel],
    baselines: list[BaselineResult],
    store: MapStore,
) -> tuple[list[ray.ObjectRef], dict[int, ray.ObjectRef]]:
    """The deletion check on every held-out subject: each fold's model, with its subjects' maps' top voxels and
    random blobs of as many voxels replaced by the cohort's mean, one Ray task per fold (its table, when done);
    and the same for each fold's linear baseline with its own weights' top voxels (by fold)."""
    attribution, brain = study.config.attribution, study.brain
    reference, refs, linear = ray.put(study.cohort_mean), [], {}
    sigma = RANDOM_BLOB_MM / study.cache.grid.voxel_mm
    baseline_of = {b.fold: b for b in baselines}
    for job in jobs:
        seed = study.config.cv.seed + job.fold
        maps = {m: store.read(m, job.subject_ids)[:, brain] for m in attribution.methods}
        deleted = {m: top_voxels(values, brain, seed=seed) for m, values in maps.items()}
        blobs = deleted[RANDOM] = random_blobs(len(job.subject_ids), brain, sigma, seed=seed)
        refs.append(task.remote(job.checkpoint, job.cache, job.subject_ids, deleted, reference, attribution.batch_size))
        if (baseline := baseline_of.get(job.fold)) is not None:
            weights = np.broadcast_to(np.abs(baseline.weights), (len(job.subject_ids), len(baseline.weights)))
            linear[job.fold] = task.remote(
                LinearVoxelModel(baseline, brain, study.cohort.target.outputs).eval(),
                job.cache,
                job.subject_ids,
                {LINEAR_BASELINE: top_voxels(weights, brain, seed=seed), RANDOM: blobs},
                reference,
                attribution.batch_size,
            )
    return refs, linear
