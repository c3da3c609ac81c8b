"""The attribution stage of a study: explain every held-out subject, then analyse the maps.

Per method: group maps per sex, per fold and pooled (NIfTI), the male-minus-
female permutation test, region rankings, localization against a synthetic
cohort's planted effect; across methods: agreement; and sanity checks. The
results go to MLflow and into the HTML report.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import ray

from study.attribution.actors import FoldModel, explain_cohort
from study.attribution.store import MapStore
from study.cache import VolumeCache
from study.cohort import Cohort
from study.config import StudyConfig
from study.crossval import FoldResult, fit, training_data
from study.maps import group_means, localization, method_agreement, normalize, permutation_test, region_table
from study.report import METHOD_TITLES, Report, agreement_figure, brain_figure, sanity_figure
from study.sanity import FLAG_SPEARMAN, flagged_methods, label_randomization, parameter_randomization
from study.splits import OuterFold
from study.tracking import Tracker
from study.volumes import Grid, resample_to_grid


@dataclass
class Interpretation:
    """What the attribution stage found, for the summary and the tests."""

    store: MapStore
    agreement: pd.DataFrame
    localization: pd.DataFrame  # one row per method (synthetic cohorts), else empty
    cascade: pd.DataFrame
    label_randomization: pd.DataFrame
    flagged: list[str]


def brain_mask(cache: VolumeCache) -> np.ndarray:
    """Voxels inside the brain of any subject (non-zero after preprocessing)."""
    volumes = cache.volumes
    mask = np.zeros(cache.shape, dtype=bool)
    for start in range(0, len(volumes), 64):
        mask |= np.any(volumes[start:start + 64] != 0, axis=0)
    return mask


def _unmask(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    volume = np.zeros(brain.shape, dtype=np.float32)
    volume[brain] = values
    return volume


def _write_subject_nifti(store: MapStore, out: Path, affine: np.ndarray) -> None:
    """Each subject's map of each method as ``<out>/<method>/sub-<id>_<method>.nii.gz``."""
    for method in store.methods:
        (out / method).mkdir(parents=True, exist_ok=True)
        done = store.done(method)
        for sid, finished in zip(store.subject_ids, done):
            if finished:
                nib.save(nib.Nifti1Image(store.read(method, [sid])[0], affine),
                         out / method / f"sub-{sid}_{method}.nii.gz")


def _store_key(config: StudyConfig, results: list[FoldResult]) -> str:
    """Maps are only reused for the same models and the same attribution settings."""
    parts = [config.attribution.model_dump_json()] + [r.checkpoint.path for r in sorted(results, key=lambda r: r.fold)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _ground_truth(config: StudyConfig, grid: Grid) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, str]]:
    """Planted effect mask and region labels on the study grid, for a synthetic cohort."""
    truth_dir = config.cohort.root / "ground_truth"
    if not (truth_dir / "planted.json").exists():
        return None, None, {}
    effect = resample_to_grid(nib.load(truth_dir / "effect_map.nii.gz"), grid)
    regions = resample_to_grid(nib.load(truth_dir / "regions.nii.gz"), grid, order=0).astype(int)
    names = {r["label"]: r["name"] for r in json.loads((truth_dir / "planted.json").read_text())["regions"]}
    return effect > 0.5 * effect.max(), regions, names


def _atlas(config: StudyConfig, grid: Grid) -> tuple[np.ndarray | None, dict[int, str]]:
    attribution = config.attribution
    if attribution.atlas is None:
        return None, {}
    labels = resample_to_grid(nib.load(attribution.atlas), grid, order=0).astype(int)
    names = {}
    if attribution.atlas_names is not None:
        sep = "\t" if attribution.atlas_names.suffix == ".tsv" else ","
        table = pd.read_csv(attribution.atlas_names, sep=sep)
        names = dict(zip(table["label"].astype(int), table["name"].astype(str)))
    return labels, names


def _sanity(config: StudyConfig, first: FoldResult, fold: OuterFold, cohort: Cohort, cache: VolumeCache,
            store: MapStore, brain: np.ndarray, storage: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    attribution, use_gpu = config.attribution, config.resources.use_gpu
    subjects = first.predictions.subject_id.tolist()[: attribution.sanity.subjects]
    labels = first.labels[: attribution.sanity.subjects]
    original = {m: store.read(m, subjects) for m in attribution.methods}
    task = ray.remote(num_cpus=1, num_gpus=attribution.gpus_per_actor if use_gpu else 0)
    cascade = ray.get(task(parameter_randomization).remote(
        first.checkpoint, cache, subjects, labels, original, brain, attribution, use_gpu))
    shuffled = pd.DataFrame()
    if attribution.sanity.label_randomization:
        data = training_data(cohort, cache, fold.validation.train, fold.validation.test)
        rng = np.random.default_rng(config.train.seed)
        data = replace(data, train_labels=rng.permutation(data.train_labels))
        result = fit(config, config.model.arch(), data, "label_randomized", storage)
        shuffled = ray.get(task(label_randomization).remote(
            result.checkpoint, cache, subjects, labels, original, brain, attribution, use_gpu))
    return cascade, shuffled


def interpret_study(config: StudyConfig, results: list[FoldResult], folds: list[OuterFold], cohort: Cohort,
                    cache: VolumeCache, tracker: Tracker, parent_run: str, fold_runs: dict[int, str],
                    directory: Path, storage: str, report: Report) -> Interpretation:
    """Explain all held-out subjects with every method, analyse the maps, log everything.

    Maps are kept under ``directory`` (a rerun computes only missing subjects);
    the label-randomization sanity check trains its model in Ray ``storage``.
    """
    attribution = config.attribution
    methods = list(attribution.methods)
    label = dict(zip(cohort.ids, cohort.labels))
    jobs = [FoldModel(r.fold, r.checkpoint, r.predictions.subject_id.tolist(),
                      np.array([label[s] for s in r.predictions.subject_id])) for r in results]
    store = MapStore(directory / "maps" / _store_key(config, results), cohort.ids, cache.shape, methods)
    explain_cohort(jobs, cache, store, attribution, config.resources.use_gpu)

    if attribution.subject_nifti:
        _write_subject_nifti(store, directory / "maps" / "subjects", cache.affine)
    grid = Grid(cache.shape, cache.affine)
    brain = brain_mask(cache)
    tested = [s for job in jobs for s in job.subject_ids]
    sexes = np.array([label[s] for s in tested])
    fold_of = np.array([job.fold for job in jobs for _ in job.subject_ids])
    truth, planted, planted_names = _ground_truth(config, grid)
    atlas, atlas_names = _atlas(config, grid)
    normalized, scores, figures, region_tables = {}, [], [], []

    def image(values: np.ndarray) -> nib.Nifti1Image:
        return nib.Nifti1Image(_unmask(values, brain), cache.affine)

    with tempfile.TemporaryDirectory() as tmp:
        def log_map(run_id: str, values: np.ndarray, name: str, method: str) -> None:
            path = Path(tmp) / run_id / f"{name}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(image(values), path)
            tracker.log_file(run_id, path, f"maps/{method}")

        for method in methods:
            maps = normalize(store.read(method, tested)[:, brain])
            normalized[method] = maps
            title = METHOD_TITLES[method]
            group = group_means(maps, sexes)
            for name, values in group.items():
                log_map(parent_run, values, f"{method}_{name}", method)
            for job in jobs:
                rows = fold_of == job.fold
                for name, values in group_means(maps[rows], sexes[rows]).items():
                    log_map(fold_runs[job.fold], values, f"fold{job.fold}_{method}_{name}", method)
            t, p = permutation_test(maps, sexes, attribution.permutations, seed=config.cv.seed)
            log_map(parent_run, t, f"{method}_t_male_minus_female", method)
            log_map(parent_run, p, f"{method}_p_fwer", method)
            significant = np.where(p < 0.05, t, 0) if attribution.permutations else t
            figures += [
                (f"{title}: mean map, all held-out subjects (top 10% of voxels)",
                 brain_figure(image(group["mean_all"]), f"{title} (n={len(tested)})", "glass")),
                *[(f"{title}: mean map, {sex}s", brain_figure(image(group[f"mean_{sex}"]), f"{title}, {sex}s"))
                  for sex in ("male", "female") if f"mean_{sex}" in group],
                (f"{title}: male - female t, FWER p < 0.05",
                 brain_figure(image(significant), f"{title}: male - female (t, p_FWER<0.05)", "glass", symmetric=True)),
            ]
            if truth is not None:
                scores.append({"method": method, **localization(maps, truth[brain])})
            for labels, names, kind in ((planted, planted_names, "planted"), (atlas, atlas_names, "atlas")):
                if labels is not None:
                    table = region_table(_unmask(group["mean_all"], brain), labels, names)
                    tracker.log_table(parent_run, table, f"regions/{method}_{kind}.tsv")
                    region_tables.append((f"{title}: regions ({kind})", table.head(15)))
        agreement = method_agreement(normalized)
        tracker.log_table(parent_run, agreement, "agreement.tsv")
        local = pd.DataFrame(scores)
        if len(local):
            tracker.log_table(parent_run, local, "localization.tsv")
            for row in scores:
                tracker.log_metrics(parent_run, {f"localization_roc_auc_{row['method']}": row["roc_auc_group"],
                                                 f"localization_top1pct_{row['method']}": row["top1pct_in_effect_group"]})
        cascade, shuffled = _sanity(config, results[0], folds[results[0].fold], cohort, cache, store, brain, storage)
        flagged = flagged_methods(cascade, shuffled)
        tracker.log_table(parent_run, cascade, "sanity/parameter_randomization.tsv")
        if len(shuffled):
            tracker.log_table(parent_run, shuffled, "sanity/label_randomization.tsv")

    report.add_images("Where the network looks", figures,
                      "Normalized maps (each subject scaled to its 99.5th percentile) averaged over held-out subjects, "
                      "over the MNI152 template; the t maps show voxels where males and females differ after "
                      f"{attribution.permutations} label permutations (max-statistic FWER).")
    for heading, table in region_tables:
        report.add_table(heading, table, "Regions ranked by mean normalized attribution over all held-out subjects.")
    if len(local):
        report.add_table("Ground truth: localization of the planted effect", local,
                         "Voxel ROC AUC against the planted effect, and the share of the top 1% voxels inside it "
                         "(chance = the effect's share of the brain).")
    report.add_images("Method agreement", [("Spearman correlation", agreement_figure(agreement, methods))])
    report.add_table("Method agreement (table)", agreement)
    flag_note = (f"Flagged (Spearman > {FLAG_SPEARMAN} to the original maps after full randomization or "
                 f"shuffled-label training): " + ", ".join(METHOD_TITLES[m] for m in flagged)) if flagged \
        else "No method flagged: every method's maps change when the model or its labels are randomized."
    report.add_images("Sanity checks", [("Cascading randomization", sanity_figure(cascade))], flag_note)
    if len(shuffled):
        report.add_table("Sanity check: model trained on shuffled labels", shuffled,
                         "Similarity of maps from a model trained on shuffled labels to the real maps; high values "
                         "mean the method does not depend on what the model learned.")
    tracker.set_tags(parent_run, {"sanity.flagged": ",".join(flagged) or "none"})
    return Interpretation(store, agreement, local, cascade, shuffled, flagged)
