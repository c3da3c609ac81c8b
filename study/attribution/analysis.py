"""The attribution stage of a study: explain every held-out subject, then analyse the maps.

Per method: group maps per sex, per fold and pooled, the male-minus-female
permutation test, region rankings and localization against a synthetic
cohort's planted effect; across methods: agreement; and the sanity checks.
Everything comes back in an :class:`AttributionResult`; publishing it is
:mod:`study.output.publish`'s job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import ray

from study.attribution.actors import Explanation, FoldModel, explain_cohort
from study.attribution.group import (group_means, localization, method_agreement, normalize, permutation_test,
                                     region_table, unmask)
from study.attribution.sanity import flagged_methods, label_randomization, parameter_randomization
from study.attribution.store import MapStore
from study.config import AttributionConfig
from study.data.cache import VolumeCache
from study.data.volumes import Grid, resample_to_grid
from study.state import Study
from study.storage import join
from study.training.crossval import FoldResult, TrainingSetup, fit, training_data


@dataclass
class MethodMaps:
    """One method's group analysis; every map is over the brain mask's voxels."""

    method: str
    group: dict[str, np.ndarray]  # mean_all, mean_male, median_male, mean_female, median_female
    per_fold: dict[int, dict[str, np.ndarray]]  # the same, per outer fold's held-out subjects
    t: np.ndarray  # male - female Welch t
    p: np.ndarray  # its FWER-corrected p value (NaN without permutations)
    localization: dict[str, float] | None  # scores against a synthetic cohort's planted effect
    regions: dict[str, pd.DataFrame]  # "planted" / "atlas" -> regions ranked by mean attribution


@dataclass
class AttributionResult:
    """What the attribution stage found."""

    maps: dict[str, MethodMaps]  # per method, in the configured order
    brain: np.ndarray  # bool [D, H, W]: the voxels the maps cover
    affine: np.ndarray  # of the study grid
    subjects: int  # held-out subjects explained
    permutations: int
    agreement: pd.DataFrame
    cascade: pd.DataFrame  # cascading parameter randomization: (step, method) -> similarity
    shuffled: pd.DataFrame  # model trained on shuffled labels: method -> similarity (empty if not run)
    flagged: list[str]  # methods whose maps survive randomization
    store: MapStore  # every subject's maps

    def volume(self, values: np.ndarray) -> np.ndarray:
        """Brain-voxel values back on the grid (zero outside the brain)."""
        return unmask(values, self.brain)

    @property
    def localization(self) -> pd.DataFrame:
        """One row per method with its localization scores (empty without a ground truth)."""
        return pd.DataFrame([{"method": m.method, **m.localization} for m in self.maps.values() if m.localization])


def brain_mask(cache: VolumeCache) -> np.ndarray:
    """Voxels inside the brain of any subject (non-zero after preprocessing)."""
    volumes = cache.volumes
    mask = np.zeros(cache.shape, dtype=bool)
    for start in range(0, len(volumes), 64):
        mask |= np.any(volumes[start:start + 64] != 0, axis=0)
    return mask


def _store_key(attribution: AttributionConfig, results: list[FoldResult]) -> str:
    """Maps are only reused for the same models and the same attribution settings."""
    parts = [attribution.model_dump_json()] + [r.checkpoint.path for r in sorted(results, key=lambda r: r.fold)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _ground_truth(root: Path, grid: Grid) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, str]]:
    """Planted effect mask and region labels on the study grid, for a synthetic cohort."""
    truth_dir = root / "ground_truth"
    if not (truth_dir / "planted.json").exists():
        return None, None, {}
    effect = resample_to_grid(nib.load(truth_dir / "effect_map.nii.gz"), grid)
    regions = resample_to_grid(nib.load(truth_dir / "regions.nii.gz"), grid, order=0).astype(int)
    planted = json.loads((truth_dir / "planted.json").read_text())
    names = {r["label"]: r["name"] for r in [*planted["regions"], planted["distractor"]]}
    return effect > 0.5 * effect.max(), regions, names


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


def explanation_of(attribution: AttributionConfig) -> Explanation:
    """What the config asks to compute for every subject."""
    return Explanation(tuple(attribution.methods), attribution.target, attribution.perturbation)


def _sanity(study: Study, first: FoldResult, store: MapStore, brain: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    attribution, resources = study.config.attribution, study.config.resources
    explanation = explanation_of(attribution)
    subjects = first.predictions.subject_id.tolist()[: attribution.sanity.subjects]
    labels = first.labels[: attribution.sanity.subjects]
    original = {m: store.read(m, subjects) for m in attribution.methods}
    task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor if resources.use_gpu else 0)
    cascade = ray.get(task(parameter_randomization).remote(
        first.checkpoint, study.cache, subjects, labels, original, brain, explanation))
    shuffled = pd.DataFrame()
    if attribution.sanity.label_randomization:
        fold = study.folds[first.fold]
        data = training_data(study, fold.validation.train, fold.validation.test)
        rng = np.random.default_rng(study.config.train.seed)
        data = replace(data, train_labels=rng.permutation(data.train_labels))
        result = fit(TrainingSetup(study.config.model, study.config.train), data, "label_randomized",
                     join(study.storage, "train"), resources)
        shuffled = ray.get(task(label_randomization).remote(
            result.checkpoint, study.cache, subjects, labels, original, brain, explanation))
    return cascade, shuffled


def explain_study(study: Study, results: list[FoldResult]) -> AttributionResult:
    """Explain all held-out subjects with every method and analyse the maps.

    Parameters
    ----------
    study : Study
        The execution (its config's ``attribution`` section says what to compute).
    results : list of FoldResult
        Every outer fold's model and held-out subjects, sorted by fold.

    Returns
    -------
    AttributionResult
        Group maps, statistics, agreement, localization and sanity checks. Maps
        are kept under the study directory, so a rerun computes only missing subjects.
    """
    attribution, resources = study.config.attribution, study.config.resources
    methods = list(attribution.methods)
    jobs = [FoldModel(r.fold, r.checkpoint, r.predictions.subject_id.tolist(),
                      study.labels(r.predictions.subject_id.tolist())) for r in results]
    store = MapStore(study.directory / "maps" / _store_key(attribution, results), study.cohort.ids,
                     study.cache.shape, methods)
    gpus_per_actor = attribution.gpus_per_actor if resources.use_gpu else 0
    if attribution.actors:
        actors = attribution.actors
    elif gpus_per_actor:
        actors = max(1, int(ray.cluster_resources().get("GPU", 0) / gpus_per_actor))
    else:
        actors = 2
    with study.times.stage("attribution"):
        explain_cohort(jobs, study.cache, store, explanation_of(attribution), attribution.batch_size, actors,
                       gpus_per_actor)

    with study.times.stage("group statistics"):
        grid = study.cache.grid
        brain = brain_mask(study.cache)
        tested = [s for job in jobs for s in job.subject_ids]
        sexes = study.labels(tested)
        fold_of = np.array([job.fold for job in jobs for _ in job.subject_ids])
        truth, planted, planted_names = _ground_truth(study.config.cohort.root, grid)
        atlas, atlas_names = _atlas(attribution, grid)
        normalized: dict[str, np.ndarray] = {}
        analysed: dict[str, MethodMaps] = {}
        for method in methods:
            maps = normalize(store.read(method, tested)[:, brain])
            normalized[method] = maps
            group = group_means(maps, sexes)
            per_fold = {job.fold: group_means(maps[fold_of == job.fold], sexes[fold_of == job.fold]) for job in jobs}
            t, p = permutation_test(maps, sexes, attribution.permutations, seed=study.config.cv.seed)
            regions = {}
            for labels, names, kind in ((planted, planted_names, "planted"), (atlas, atlas_names, "atlas")):
                if labels is not None:
                    regions[kind] = region_table(unmask(group["mean_all"], brain), labels, names)
            analysed[method] = MethodMaps(method, group, per_fold, t, p,
                                          localization(maps, truth[brain]) if truth is not None else None, regions)
        agreement = method_agreement(normalized)
    with study.times.stage("sanity checks"):
        cascade, shuffled = _sanity(study, results[0], store, brain)
    return AttributionResult(analysed, brain, study.cache.affine, len(tested), attribution.permutations, agreement,
                             cascade, shuffled, flagged_methods(cascade, shuffled), store)
