"""The attribution stage of a study: explain every held-out subject, then analyse the maps.

Per method: group maps per class, per fold and pooled, the class 1 minus class 0
permutation test, region rankings and localization against a synthetic
cohort's planted effect; across methods: agreement; and the sanity checks.
Everything comes back in an :class:`AttributionResult`; publishing it is
:mod:`study.output.publish`'s job.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import ray

from study.attribution.actors import Explanation, FoldModel, explain_cohort
from study.attribution.gradcam import feature_grid
from study.attribution.group import group_means, localization, method_agreement, normalize, region_table, unmask
from study.attribution.linear import LinearVoxelModel, weight_test
from study.attribution.methods import LINEAR_BASELINE, METHODS
from study.attribution.sanity import (
    RANDOM,
    RANDOM_BLOB_MM,
    deletion_check,
    deletion_summary,
    flagged_methods,
    label_randomization,
    parameter_randomization,
    random_blobs,
    top_voxels,
)
from study.attribution.stats import PermutationTest, permutation_test_on_device
from study.attribution.store import MapStore
from study.config import AttributionConfig, ResourcesConfig
from study.data.synth import ground_truth_dir
from study.data.volumes import Grid, resample_to_grid
from study.state import Study
from study.storage import join
from study.training.baseline import BaselineResult, brain_voxels
from study.training.crossval import FoldResult, driving_task
from study.training.loop import TrainingData, load_history
from study.training.models import build_model
from study.training.trainer import TrainingSetup, fit

# Raised when a method computes different maps for the same settings, so that a rerun does not reuse old maps
# (2: under the contrast, Grad-CAM's magnitude and Meaningful Perturbations signed by each subject's decision).
MAPS_VERSION = "2"


@dataclass
class MethodMaps:
    """One method's group analysis; every map is over the brain mask's voxels."""

    method: str
    group: dict[str, np.ndarray]  # mean_all, mean_<class>, median_<class> (group_means)
    per_fold: dict[int, dict[str, np.ndarray]]  # the same, per outer fold's held-out subjects
    test: PermutationTest | None  # class 1 vs class 0; None when the maps explain different scores for each class
    localization: dict[str, float] | None  # scores against a synthetic cohort's planted effect
    regions: dict[str, pd.DataFrame]  # "planted" / "atlas" -> regions ranked by mean attribution


@dataclass
class AttributionResult:
    """What the attribution stage found."""

    maps: dict[str, MethodMaps]  # per method, in the configured order
    brain: np.ndarray  # bool [D, H, W]: the voxels the maps cover
    affine: np.ndarray  # of the study grid
    subjects: int  # held-out subjects explained
    target: str  # the score every map explains (config attribution.target)
    agreement: pd.DataFrame
    cascade: pd.DataFrame  # cascading parameter randomization: (step, method) -> similarity
    shuffled: pd.DataFrame  # model trained on shuffled labels: method -> similarity (empty if not run)
    shuffled_fit_accuracy: float  # that model's accuracy on its own shuffled training labels
    flagged: list[str]  # methods whose maps survive randomization
    deletion: pd.DataFrame  # per (fold, subject, method or random): p of the decided class and its change
    deletion_summary: pd.DataFrame  # per method: its deletions against random blobs (sanity.deletion_summary)
    store: MapStore  # every subject's maps
    gradcam_grid: tuple[tuple[int, int, int], float]  # fold 0's Grad-CAM layer: voxels per axis, spacing in mm

    def volume(self, values: np.ndarray) -> np.ndarray:
        """Brain-voxel values back on the grid (zero outside the brain)."""
        return unmask(values, self.brain)

    @property
    def localization(self) -> pd.DataFrame:
        """One row per method with its localization scores (empty without a ground truth)."""
        return pd.DataFrame([{"method": m.method, **m.localization} for m in self.maps.values() if m.localization])

    @property
    def deletion_flagged(self) -> list[str]:
        """Methods whose top voxels move the model's decision no more surely than random blobs do."""
        return self.deletion_summary.loc[~self.deletion_summary.beats_random, "method"].tolist()


def _store_key(attribution: AttributionConfig, results: list[FoldResult]) -> str:
    """Maps are only reused for the same models, the same attribution settings and the same methods' code."""
    checkpoints = [r.checkpoint.path for r in sorted(results, key=lambda r: r.fold)]
    parts = [MAPS_VERSION, attribution.model_dump_json(), *checkpoints]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GroundTruth:
    """A synthetic cohort's known answer on the study grid."""

    effect: np.ndarray  # bool [D, H, W]: where males differ (above half the planted effect's peak)
    distractor: np.ndarray  # bool [D, H, W]: the region that varies whatever the sex
    regions: np.ndarray  # int labels: effects 1..n, the distractor n+1
    names: dict[int, str]


def _ground_truth(root: Path, grid: Grid) -> GroundTruth | None:
    """The planted effect, distractor and region labels on the study grid, for a synthetic cohort."""
    truth_dir = ground_truth_dir(root)
    if not (truth_dir / "planted.json").exists():
        return None
    planted = json.loads((truth_dir / "planted.json").read_text())
    effect = resample_to_grid(nib.load(truth_dir / "effect_map.nii.gz"), grid)
    regions = resample_to_grid(nib.load(truth_dir / "regions.nii.gz"), grid, order=0).astype(int)
    names = {r["label"]: r["name"] for r in [*planted["regions"], planted["distractor"]]}
    return GroundTruth(effect > 0.5 * effect.max(), regions == planted["distractor"]["label"], regions, names)


def _atlas(attribution: AttributionConfig, grid: Grid) -> tuple[np.ndarray | None, dict[int, str]]:
    if attribution.atlas is None:
        return None, {}
    labels = resample_to_grid(nib.load(attribution.atlas), grid, order=0).astype(int)
    names = {}
    if attribution.atlas_names is not None:
        sep = "\t" if attribution.atlas_names.suffix == ".tsv" else ","
        table = pd.read_csv(attribution.atlas_names, sep=sep)
        names = dict(zip(table["label"].astype(int), table["name"].astype(str)))
    return labels, names


def explanation_of(attribution: AttributionConfig, study: Study) -> Explanation:
    """What ``attribution`` asks to compute for every subject (with the study's cohort mean when MP needs it)."""
    needs_mean = "perturbation" in attribution.methods and attribution.perturbation.reference == "cohort_mean"
    return Explanation(
        tuple(attribution.methods),
        attribution.target,
        attribution.perturbation,
        study.cohort_mean if needs_mean else None,
    )


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
    data = TrainingData(study.cache, [], shuffled_labels[:0], [], shuffled_labels[:0], train_ids, shuffled_labels)
    return driving_task(_shuffled_label_fit).remote(
        first.setup, data, study.storage, study.config.resources, first.final_epochs
    )


def _sanity(
    study: Study, first: FoldResult, store: MapStore, brain: np.ndarray, shuffled_fit: ray.ObjectRef | None
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Cascading randomization of the first fold's model, and the maps of the model ``shuffled_fit`` trains.

    The shuffled model's accuracy on its own shuffled labels says whether it could
    memorize them (a check that cannot fit its data proves little).
    """
    attribution, resources = study.config.attribution, study.config.resources
    explanation = explanation_of(attribution, study)
    subjects = first.predictions.subject_id.tolist()[: attribution.sanity.subjects]
    labels = study.labels(subjects)
    original = {m: store.read(m, subjects) for m in attribution.methods}
    task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor if resources.use_gpu else 0)
    cascade = task(parameter_randomization).remote(
        first.checkpoint, study.cache, subjects, labels, original, brain, explanation, attribution.batch_size
    )
    shuffled, fit_accuracy = pd.DataFrame(), float("nan")
    if shuffled_fit is not None:
        checkpoint, seconds = ray.get(shuffled_fit)
        history = pd.DataFrame(load_history(checkpoint))
        training = float(history.filter(like="epoch_seconds").sum().sum())
        study.times.add("label-randomized training", training)  # the rest, as for a fold, is Ray Train set-up
        study.times.add("Ray Train set-up", max(seconds - training, 0.0))
        fit_accuracy = float(history["fit_accuracy"].dropna().iloc[-1])
        shuffled = ray.get(
            task(label_randomization).remote(
                checkpoint, study.cache, subjects, labels, original, brain, explanation, attribution.batch_size
            )
        )
    return ray.get(cascade), shuffled, fit_accuracy


def _deletion(
    study: Study, jobs: list[FoldModel], baselines: list[BaselineResult], store: MapStore, brain: np.ndarray
) -> tuple[list[ray.ObjectRef], dict[int, ray.ObjectRef]]:
    """The deletion check on every held-out subject: each fold's model, with its subjects' maps' top voxels and
    random blobs of as many voxels replaced by the cohort's mean, one Ray task per fold (its table, when done);
    and the same for each fold's linear baseline with its own weights' top voxels (by fold)."""
    attribution, resources = study.config.attribution, study.config.resources
    task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor if resources.use_gpu else 0)(deletion_check)
    reference, refs, linear = ray.put(study.cohort_mean), [], {}
    sigma = RANDOM_BLOB_MM / study.cache.grid.voxel_mm
    baseline_of = {b.fold: b for b in baselines}
    for job in jobs:
        seed = study.config.cv.seed + job.fold
        deleted = {
            m: top_voxels(store.read(m, job.subject_ids)[:, brain], brain, seed=seed) for m in attribution.methods
        }
        blobs = deleted[RANDOM] = random_blobs(len(job.subject_ids), brain, sigma, seed=seed)
        refs.append(
            task.remote(job.checkpoint, study.cache, job.subject_ids, deleted, reference, attribution.batch_size)
        )
        if (baseline := baseline_of.get(job.fold)) is not None:
            weights = np.broadcast_to(np.abs(baseline.weights), (len(job.subject_ids), len(baseline.weights)))
            linear[job.fold] = task.remote(
                LinearVoxelModel(baseline, brain).eval(),
                study.cache,
                job.subject_ids,
                {LINEAR_BASELINE: top_voxels(weights, brain, seed=seed), RANDOM: blobs},
                reference,
                attribution.batch_size,
            )
    return refs, linear


def explain_study(
    study: Study,
    results: list[FoldResult],
    baselines: list[BaselineResult],
    shuffled_fit: ray.ObjectRef | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AttributionResult:
    """Explain all held-out subjects with every method and analyse the maps.

    Parameters
    ----------
    study : Study
        The execution (its config's ``attribution`` section says what to compute).
    results : list of FoldResult
        Every outer fold's model and held-out subjects, sorted by fold.
    baselines : list of BaselineResult
        The linear baseline of every fold: its weights are analysed as one more
        map (a subject's map is the weights of the model that held it out).
    shuffled_fit : ray.ObjectRef, optional
        The label-randomization check's training, from :func:`start_label_randomization`
        (without it, no label randomization).
    on_progress : callable, optional
        ``on_progress(done, total)`` after each batch of subjects explained.

    Returns
    -------
    AttributionResult
        Group maps, statistics, agreement, localization and sanity checks. Maps
        are kept under the study directory, so a rerun computes only missing subjects.
    """
    attribution, resources = study.config.attribution, study.config.resources
    methods = list(attribution.methods)
    jobs = [
        FoldModel(
            r.fold, r.checkpoint, r.predictions.subject_id.tolist(), study.labels(r.predictions.subject_id.tolist())
        )
        for r in results
    ]
    store = MapStore(
        study.directory / "maps" / _store_key(attribution, results), study.cohort.ids, study.cache.shape, methods
    )
    gpus_per_actor = attribution.gpus_per_actor if resources.use_gpu else 0
    if attribution.actors:
        actors = attribution.actors
    elif gpus_per_actor:
        actors = max(1, int(ray.cluster_resources().get("GPU", 0) / gpus_per_actor))
    else:
        actors = 2
    total = len(store.missing([s for job in jobs for s in job.subject_ids]))
    with study.times.stage("attribution"):
        explain_cohort(
            jobs,
            study.cache,
            store,
            explanation_of(attribution, study),
            attribution.batch_size,
            actors,
            gpus_per_actor,
            on_batch=(lambda done: on_progress(done, total)) if on_progress else None,
        )

    with study.times.stage("group statistics"):
        grid = study.cache.grid
        brain = study.brain
        tested = [s for job in jobs for s in job.subject_ids]
        labels = study.labels(tested)
        classes = study.cohort.classes.names
        fold_of = np.array([job.fold for job in jobs for _ in job.subject_ids])
        family = {s.subject_id: s.family_id for s in study.cohort.subjects}
        families = np.array([family[s] for s in tested])
        truth = _ground_truth(study.config.cohort.root, grid)
        atlas, atlas_names = _atlas(attribution, grid)
        normalized: dict[str, np.ndarray] = {}
        analysed: dict[str, MethodMaps] = {}
        weights = {b.fold: np.abs(b.weights) for b in baselines}
        for method in [*methods, *([LINEAR_BASELINE] if baselines else [])]:
            raw = (
                np.stack([weights[f] for f in fold_of])
                if method == LINEAR_BASELINE
                else store.read(method, tested)[:, brain]
            )
            normalized[method] = normalize(raw)
        # One question for every subject: with GPUs, the tests run side by side, each on a GPU share; on CPUs in
        # this process, whose threads all work on each test's sums.
        arguments = {
            method: (maps, labels, attribution.permutations, fold_of, families, study.config.cv.seed)
            for method, maps in normalized.items()
            if attribution.target == "contrast" and method in METHODS and METHODS[method].group_test
        }
        if resources.use_gpu:
            task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor)(permutation_test_on_device)
            tests = dict(zip(arguments, ray.get([task.remote(*a) for a in arguments.values()])))
        else:
            tests = {method: permutation_test_on_device(*a) for method, a in arguments.items()}
        if baselines:  # the linear model's weights, refitted on all subjects and on permuted labels
            C = float(np.median([b.C for b in baselines]))
            tests[LINEAR_BASELINE] = weight_test(
                brain_voxels(study.cache, tested, brain),
                labels,
                C,
                attribution.permutations,
                families,
                study.config.cv.seed,
            )
        for method, maps in normalized.items():
            group = group_means(maps, labels, classes)
            per_fold = {
                job.fold: group_means(maps[fold_of == job.fold], labels[fold_of == job.fold], classes) for job in jobs
            }
            test = tests.get(method)
            regions = {}
            if truth is not None:
                regions["planted"] = region_table(unmask(group["mean_all"], brain), truth.regions, truth.names)
            if atlas is not None:
                regions["atlas"] = region_table(unmask(group["mean_all"], brain), atlas, atlas_names)
            scores = localization(maps, truth.effect[brain], truth.distractor[brain]) if truth is not None else None
            analysed[method] = MethodMaps(method, group, per_fold, test, scores, regions)
        agreement = method_agreement(normalized)
    with study.times.stage("sanity checks"):
        deleting, deleting_linear = _deletion(study, jobs, baselines, store, brain)  # beside the randomization
        cascade, shuffled, shuffled_accuracy = _sanity(study, results[0], store, brain, shuffled_fit)
        deletion = pd.concat(
            [table.assign(fold=job.fold, model="cnn") for job, table in zip(jobs, ray.get(deleting))], ignore_index=True
        )
        summary = deletion_summary(deletion)
        if deleting_linear:  # the linear model's own random blobs are its control
            linear = pd.concat(
                [
                    table.assign(fold=fold, model="linear")
                    for fold, table in zip(deleting_linear, ray.get(list(deleting_linear.values())))
                ],
                ignore_index=True,
            )
            summary = pd.concat([summary, deletion_summary(linear)], ignore_index=True)
            deletion = pd.concat([deletion, linear], ignore_index=True)
    features, spacing = feature_grid(
        build_model(results[0].setup.architecture, study.cache.shape).eval(), study.cache.shape
    )
    return AttributionResult(
        analysed,
        brain,
        study.cache.affine,
        len(tested),
        attribution.target,
        agreement,
        cascade,
        shuffled,
        shuffled_accuracy,
        flagged_methods(cascade, shuffled),
        deletion,
        summary,
        store,
        (features, spacing[0] * study.cache.grid.voxel_mm),
    )
