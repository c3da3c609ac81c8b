"""Synthetic T1w cohorts with planted, known sex effects.

Built from the MNI152 template that nilearn ships (no download): each subject
is the template under a smooth random deformation (part of it shared within a
family), a global size scaling, a bias field and noise. Males differ from
females in a few named regions by a local volume change and an intensity
change of a chosen effect size. The planted effect is saved as a ground-truth
map, which is what lets the project score attribution methods.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import Field
from scipy import ndimage

from study.data.volumes import Grid, resample_to_grid
from study.params import Params

MALE_FRACTION = 507 / 1113  # as in the HCP young-adult cohort
DEFORMATION_MM = 1.5  # standard deviation of each of the family and individual deformations


class SyntheticCohort(Params):
    """The size and strength of a synthetic cohort (``study synth``, or ``cohort.synthetic``)."""

    subjects: int = Field(60, ge=4)
    voxel_size: float = Field(2.0, gt=0)  # isotropic voxel size of the written images, mm
    shape: tuple[int, int, int] | None = None  # default: the MNI box at voxel_size
    effect_size: float = Field(0.25, ge=0)  # relative volume and intensity change in the planted regions
    seed: int = 0


@dataclass(frozen=True)
class PlantedRegion:
    """A spherical region where males differ from females.

    ``direction`` +1 makes the region larger and brighter in males, -1 smaller
    and darker; the size of the change is the cohort's effect size.
    """

    name: str
    centre_mm: tuple[float, float, float]
    radius_mm: float
    direction: int


PLANTED_REGIONS = (
    PlantedRegion("left_amygdala", (-24.0, -4.0, -18.0), 12.0, +1),
    PlantedRegion("right_putamen", (26.0, 4.0, 2.0), 12.0, -1),
    PlantedRegion("right_cerebellum", (26.0, -66.0, -34.0), 14.0, +1),
    PlantedRegion("left_precuneus", (-8.0, -60.0, 42.0), 12.0, -1),
)


@dataclass(frozen=True)
class _Fields:
    """Per-voxel fields shared by all subjects of a synthetic cohort."""

    template: np.ndarray  # intensities on the grid, 0 outside the brain
    weight: np.ndarray  # signed sum of the regions' smooth 0..1 profiles
    displacement: np.ndarray  # (3, D, H, W) signed sum of profile x offset from each centre
    voxel_mm: float


def _region_fields(grid: Grid, regions: tuple[PlantedRegion, ...]) -> tuple[np.ndarray, np.ndarray]:
    voxels = np.indices(grid.shape, dtype=np.float32)
    inv = np.linalg.inv(grid.affine)
    voxel_size = grid.voxel_mm
    profiles, offsets = [], []
    for region in regions:
        centre = (inv @ np.array([*region.centre_mm, 1.0]))[:3]
        offset = voxels - centre.reshape(3, 1, 1, 1).astype(np.float32)
        dist_mm = np.sqrt((offset**2).sum(0)) * voxel_size
        profiles.append(np.exp(-0.5 * (dist_mm / region.radius_mm) ** 2).astype(np.float32))
        offsets.append(offset)
    return np.stack(profiles), np.stack(offsets)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int, scale: float) -> np.ndarray:
    """A smooth random field: Gaussian control points upsampled to ``shape``."""
    coarse = rng.normal(0.0, scale, size=(control,) * 3).astype(np.float32)
    return ndimage.zoom(coarse, [s / control for s in shape], order=1, mode="nearest")[
        : shape[0], : shape[1], : shape[2]
    ]


def _subject_volume(fields: _Fields, sex: int, effect_size: float, seed: int, family_seed: int) -> np.ndarray:
    """One subject's T1w intensities on the grid (males: ``sex == 1``)."""
    rng = np.random.default_rng(seed)
    family_rng = np.random.default_rng(family_seed)
    shape = fields.template.shape
    voxels = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    scale = rng.normal(1.0, 0.03)
    coords = centre.reshape(3, 1, 1, 1) + (voxels - centre.reshape(3, 1, 1, 1)) / scale
    jitter = DEFORMATION_MM / fields.voxel_mm
    for axis in range(3):  # smooth deformation: one part shared with the family, one individual
        coords[axis] += _smooth_field(family_rng, shape, 5, jitter) + _smooth_field(rng, shape, 5, jitter)
    if sex == 1:
        # Sampling closer to a region's centre enlarges it (direction +1), farther shrinks it.
        coords -= effect_size * fields.displacement
    volume = ndimage.map_coordinates(fields.template, coords, order=1, mode="constant", cval=0.0)
    inside = volume > 0.05 * volume.max()
    if sex == 1:
        volume *= 1.0 + effect_size * fields.weight
    volume *= np.exp(_smooth_field(rng, shape, 4, 0.08))  # bias field
    volume += rng.normal(0.0, 0.03, size=shape).astype(np.float32) * inside
    return (np.clip(volume, 0, None) * inside * 1000).astype(np.int16)


def _write_subject(
    fields: _Fields, affine: np.ndarray, path: Path, sex: int, effect_size: float, seed: int, family_seed: int
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = _subject_volume(fields, sex, effect_size, seed, family_seed)
    nib.save(nib.Nifti1Image(volume, affine), str(path))


def synthesize_cohort(out: Path, spec: SyntheticCohort, sibling_fraction: float = 0.4) -> Path:
    """Write a BIDS-like synthetic cohort to ``out`` and return its participants table.

    Writes ``participants.tsv`` (participant_id, sex, family_id, age),
    ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz``, and under ``ground_truth/`` the
    planted effect map (``effect_map.nii.gz``) and ``planted.json``. The same
    arguments give the same files. Subjects are written by Ray tasks.
    """
    import ray  # here, not at the top: the command line reads SyntheticCohort's defaults without Ray
    from nilearn.datasets import load_mni152_template

    from study.runtime import map_tasks

    subjects, voxel_size, effect_size, seed = spec.subjects, spec.voxel_size, spec.effect_size, spec.seed
    grid = Grid.mni(voxel_size, spec.shape)
    template = resample_to_grid(load_mni152_template(resolution=1 if voxel_size < 2 else 2), grid)
    profile, offset = _region_fields(grid, PLANTED_REGIONS)
    directions = np.array([r.direction for r in PLANTED_REGIONS], dtype=np.float32)
    fields = _Fields(
        template.astype(np.float32),
        np.einsum("r,rdhw->dhw", directions, profile),
        np.einsum("r,rdhw,rcdhw->cdhw", directions, profile, offset),
        voxel_size,
    )

    rng = np.random.default_rng(seed)
    sexes = (rng.random(subjects) < MALE_FRACTION).astype(int)
    sexes[:2] = [0, 1]  # both classes, whatever the size
    families = _families(rng, subjects, sibling_fraction)
    subject_seeds = rng.integers(0, 2**31, size=subjects)
    family_seeds = {f: int(s) for f, s in zip(sorted(set(families)), rng.integers(0, 2**31, size=subjects))}
    ids = [f"{i + 1:04d}" for i in range(subjects)]
    out.mkdir(parents=True, exist_ok=True)

    fields_ref = ray.put(fields)
    args = [
        (fields_ref, grid.affine, out / f"sub-{sid}/anat/sub-{sid}_T1w.nii.gz", int(sexes[i]), effect_size,
         int(subject_seeds[i]), family_seeds[families[i]])
        for i, sid in enumerate(ids)
    ]
    for _, _, error in map_tasks(_write_subject, args, desc="synthesizing"):
        if error is not None:
            raise error

    ages = rng.integers(22, 37, size=subjects)
    rows = ["participant_id\tsex\tfamily_id\tage"] + [
        f"sub-{sid}\t{'M' if sexes[i] else 'F'}\t{families[i]}\t{ages[i]}" for i, sid in enumerate(ids)
    ]
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    _write_ground_truth(out / "ground_truth", grid, profile, effect_size, seed)
    return out / "participants.tsv"


def _families(rng: np.random.Generator, subjects: int, sibling_fraction: float) -> list[str]:
    """Family ids: singletons, and pairs of siblings for ``sibling_fraction`` of subjects."""
    families: list[str] = []
    while len(families) < subjects:
        size = 2 if (rng.random() < sibling_fraction and len(families) + 1 < subjects) else 1
        families += [f"fam{len(set(families)) + 1:04d}"] * size
    return families


def _write_ground_truth(directory: Path, grid: Grid, profile: np.ndarray, effect_size: float, seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    effect = (profile.max(0) * effect_size).astype(np.float32)
    nib.save(nib.Nifti1Image(effect, grid.affine), str(directory / "effect_map.nii.gz"))
    labels = np.zeros(grid.shape, dtype=np.int16)
    for index in range(len(PLANTED_REGIONS)):
        labels[(profile[index] > 0.5) & (profile[index] >= profile.max(0))] = index + 1
    nib.save(nib.Nifti1Image(labels, grid.affine), str(directory / "regions.nii.gz"))
    planted = {
        "effect_size": effect_size,
        "seed": seed,
        "regions": [{"label": i + 1, **asdict(r)} for i, r in enumerate(PLANTED_REGIONS)],
        "description": "males differ in these regions: direction +1 larger and brighter, -1 smaller and darker",
    }
    (directory / "planted.json").write_text(json.dumps(planted, indent=1))
