"""Where a synthetic cohort's effects are planted: spherical regions inside the MNI152 brain, their profiles
and displacement fields, and the planted answer (the ground truth) on a grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from study.data.volumes import Grid, resample_to_grid


@dataclass(frozen=True)
class PlantedRegion:
    """A spherical region (Gaussian profile) of the synthetic cohort, in MNI millimetres.

    ``direction`` +1: larger and brighter in males, -1: smaller and darker; 0 for
    the distractor, which changes with a random amplitude in every subject.
    """

    label: int
    name: str
    centre_mm: tuple[float, float, float]
    radius_mm: float
    direction: int


def brain_template(grid: Grid) -> np.ndarray:
    """nilearn's MNI152 T1 template times its brain mask, on ``grid``."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    resolution = 1 if grid.voxel_mm < 2 else 2
    template = resample_to_grid(load_mni152_template(resolution=resolution), grid)
    mask = resample_to_grid(load_mni152_brain_mask(resolution=resolution), grid) > 0.5
    return (template * mask).astype(np.float32)


def profiles(grid: Grid, regions: list[PlantedRegion]) -> tuple[np.ndarray, np.ndarray]:
    """Signed profile sum and signed displacement field of ``regions`` on ``grid`` (direction 0 counts as +1)."""
    voxels = np.indices(grid.shape, dtype=np.float32)
    inv = np.linalg.inv(grid.affine)
    weight = np.zeros(grid.shape, dtype=np.float32)
    displacement = np.zeros((3, *grid.shape), dtype=np.float32)
    for region in regions:
        centre = (inv @ np.array([*region.centre_mm, 1.0]))[:3].astype(np.float32).reshape(3, 1, 1, 1)
        offset = voxels - centre
        profile = np.exp(-0.5 * (np.sqrt((offset**2).sum(0)) * grid.voxel_mm / region.radius_mm) ** 2)
        sign = region.direction or 1
        weight += sign * profile
        displacement += sign * profile * offset
    return weight, displacement


def place_regions(rng: np.random.Generator, count: int) -> tuple[list[PlantedRegion], PlantedRegion]:
    """``count`` effect regions and one distractor, at random well inside the brain and apart from each other."""
    grid = Grid.mni(2.0)
    brain = brain_template(grid) > 0
    depth_mm = ndimage.distance_transform_edt(brain) * grid.voxel_mm
    placed: list[PlantedRegion] = []
    while len(placed) < count + 1:
        radius = float(rng.uniform(9.0, 13.0))
        candidates = np.argwhere(depth_mm > radius + 4)
        centre = (grid.affine @ np.array([*candidates[rng.integers(len(candidates))], 1.0]))[:3]
        if any(np.linalg.norm(centre - np.array(r.centre_mm)) < 2.2 * max(radius, r.radius_mm) for r in placed):
            continue
        label = len(placed) + 1
        side = "L" if centre[0] < 0 else "R"
        xyz = tuple(float(round(c)) for c in centre)
        if label <= count:
            direction = int(rng.choice([-1, 1]))
            placed.append(
                PlantedRegion(
                    label, f"effect {label} {side} ({xyz[0]:g}, {xyz[1]:g}, {xyz[2]:g})", xyz, radius, direction
                )
            )
        else:
            placed.append(
                PlantedRegion(label, f"distractor {side} ({xyz[0]:g}, {xyz[1]:g}, {xyz[2]:g})", xyz, radius, 0)
            )
    return placed[:count], placed[count]


def ground_truth(
    grid: Grid, effects: list[PlantedRegion], distractor: PlantedRegion, effect_size: float, spec: dict
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The planted answer on ``grid``: the effect's size per voxel, the regions' labels (effects 1..n, the
    distractor n+1) and what was planted (planted.json)."""
    regions = [*effects, distractor]
    each = np.stack([np.abs(profiles(grid, [r])[0]) for r in regions])
    effect = (each[: len(effects)].max(0) * effect_size).astype(np.float32)
    labels = np.zeros(grid.shape, dtype=np.int16)
    for index, region in enumerate(regions):
        labels[(each[index] > 0.5) & (each[index] >= each.max(0))] = region.label
    planted = {
        "spec": spec,
        "regions": [vars(r) for r in effects],
        "distractor": vars(distractor),
        "description": "males differ in the regions: direction +1 larger and brighter, -1 smaller and darker; "
        "the distractor changes in every subject by a random amount, whatever the sex",
    }
    return effect, labels, planted
