"""The group analysis of a study's maps: plain functions over arrays, with no Ray and no Study.

Per method: group maps per class, per fold and pooled, region rankings, and
localization against a synthetic cohort's planted effect; across methods:
agreement. A map is a row of brain voxels (``maps[subject, voxel]``), normalized
per subject; the held-out subjects come with their labels, folds and families
(:class:`HeldOut`). :mod:`.stage` reads the maps from the store and runs the
permutation tests where the hardware is; this module only computes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from study.attribution.group import group_means, localization, normalize, region_table, unmask
from study.attribution.methods import METHODS
from study.attribution.stats import PermutationTest
from study.attribution.store import MapStore
from study.data.bids import ground_truth_dir
from study.data.volumes import Grid, resample_to_grid


@dataclass(frozen=True)
class HeldOut:
    """The held-out subjects whose maps are analysed; every array in the order of ``subject_ids``."""

    subject_ids: list[str]
    labels: np.ndarray  # class index (1: the positive class, e.g. male)
    folds: np.ndarray  # the outer fold whose model held the subject out (and explained it)
    families: np.ndarray  # the permutation tests' exchangeability blocks: a family moves as a whole


@dataclass
class MethodMaps:
    """One method's group analysis; every map is over the brain mask's voxels."""

    method: str
    group: dict[str, np.ndarray]  # mean_all, mean_<class>, median_<class> (group_means)
    per_fold: dict[int, dict[str, np.ndarray]]  # the same, per outer fold's held-out subjects
    test: PermutationTest | None  # class 1 vs class 0; None when the maps explain different scores for each class
    localization: dict[str, float] | None  # scores against a synthetic cohort's planted effect
    regions: dict[str, pd.DataFrame]  # "planted" / "atlas" -> regions ranked by mean attribution
    versus_rest: dict[str, PermutationTest] = field(default_factory=dict)  # of several classes: class -> its test


@dataclass(frozen=True)
class GroundTruth:
    """A synthetic cohort's known answer on the study grid."""

    effect: np.ndarray  # bool [D, H, W]: where males differ (above half the planted effect's peak)
    distractor: np.ndarray  # bool [D, H, W]: the region that varies whatever the sex
    regions: np.ndarray  # int labels: effects 1..n, the distractor n+1
    names: dict[int, str]


@dataclass(frozen=True)
class Atlas:
    """A labelled atlas on the study grid, for the region tables."""

    labels: np.ndarray  # int [D, H, W]; 0 outside every region
    names: dict[int, str]  # label -> region name (a label without one is called by its number)


def ground_truth(root: Path, grid: Grid, effect: str = "") -> GroundTruth | None:
    """The planted effect, distractor and region labels on the study grid, for a synthetic cohort (else None):
    the sex effect's, or (``effect``) the age effect's (``age``: ``study synth --age-effect``) or the subtypes'
    (``group``: ``--group-effect``), None for a cohort without it."""
    truth_dir = ground_truth_dir(root)
    if not (truth_dir / "planted.json").exists():
        return None
    planted = json.loads((truth_dir / "planted.json").read_text())
    prefix = f"{effect}_" if effect else ""
    if f"{prefix}regions" not in planted:
        return None
    planted_regions, distractor = planted[f"{prefix}regions"], len(planted[f"{prefix}regions"]) + 1
    size = resample_to_grid(nib.load(truth_dir / f"{prefix}effect_map.nii.gz"), grid)
    regions = resample_to_grid(nib.load(truth_dir / f"{prefix}regions.nii.gz"), grid, order=0).astype(int)
    names = {r["label"]: r["name"] for r in planted_regions} | {distractor: planted["distractor"]["name"]}
    return GroundTruth(size > 0.5 * size.max(), regions == distractor, regions, names)


def read_atlas(atlas: Path | None, names: Path | None, grid: Grid) -> Atlas | None:
    """A labelled NIfTI resampled to the study grid (nearest neighbour), with names from a TSV or CSV table
    of columns ``label`` and ``name``; None without an atlas."""
    if atlas is None:
        return None
    labels = resample_to_grid(nib.load(atlas), grid, order=0).astype(int)
    if names is None:
        return Atlas(labels, {})
    table = pd.read_csv(names, sep="\t" if names.suffix == ".tsv" else ",")
    return Atlas(labels, dict(zip(table["label"].astype(int), table["name"].astype(str))))


def methods_with_group_test(methods: Iterable[str], target: str) -> list[str]:
    """The methods whose two classes' maps get the class 1 minus class 0 test: only under the contrast, which asks
    every subject the same question, and only those the table says compare (not Meaningful Perturbations)."""
    return [m for m in methods if target == "contrast" and METHODS[m].group_test]


def normalized_maps(store: MapStore, methods: Iterable[str], subject_ids: list[str], brain: np.ndarray) -> dict:
    """Each method's maps of the given subjects over the brain's voxels, each subject scaled to its 99.5th
    percentile (:func:`~study.attribution.group.normalize`): method -> [subject, voxel]."""
    return {method: normalize(store.read(method, subject_ids)[:, brain]) for method in methods}


def baseline_maps(weights: dict[int, np.ndarray], folds: np.ndarray) -> np.ndarray:
    """The linear baseline's weights as subject maps: each subject's map is the absolute weights of the fold model
    that held it out (the same for every subject of a fold), normalized as the methods' maps are."""
    return normalize(np.stack([np.abs(weights[int(fold)]) for fold in folds]))


def analyse_method(
    method: str,
    maps: np.ndarray,
    held_out: HeldOut,
    classes: tuple[str, ...],
    brain: np.ndarray,
    test: PermutationTest | None = None,
    truth: GroundTruth | None = None,
    atlas: Atlas | None = None,
    versus_rest: dict[str, PermutationTest] | None = None,
) -> MethodMaps:
    """One method's group maps (pooled and per fold), region tables and localization; ``test`` as given.

    Parameters
    ----------
    method : str
        Its name (a method of the table, or the linear baseline).
    maps : np.ndarray
        Normalized maps [subject, brain voxel] of the held-out subjects.
    held_out : HeldOut
        Their labels, folds and families, in the maps' order.
    classes : tuple of str
        The class names, class 0 first.
    brain : np.ndarray
        The brain mask [D, H, W] the maps' voxels come from.
    test, truth, atlas : optional
        The method's class 1 minus class 0 test, a synthetic cohort's planted effect, a labelled atlas.
    versus_rest : dict, optional
        Of several classes, each class's test against the rest (class name -> test), as given.
    """
    group = group_means(maps, held_out.labels, classes)
    per_fold = {
        int(fold): group_means(maps[held_out.folds == fold], held_out.labels[held_out.folds == fold], classes)
        for fold in np.unique(held_out.folds)
    }
    mean = unmask(group["mean_all"], brain)
    regions = {}
    if truth is not None:
        regions["planted"] = region_table(mean, truth.regions, truth.names)
    if atlas is not None:
        regions["atlas"] = region_table(mean, atlas.labels, atlas.names)
    scores = localization(maps, truth.effect[brain], truth.distractor[brain]) if truth is not None else None
    return MethodMaps(method, group, per_fold, test, scores, regions, versus_rest or {})
