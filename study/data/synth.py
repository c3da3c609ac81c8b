"""Synthetic T1w cohorts with planted, known sex effects, stored the way real images are.

Built from the MNI152 template and brain mask that nilearn ships (no download):
each subject is the brain-extracted template under a smooth random deformation
(part of it shared within a family), a global size scaling, a bias field and
noise. Males differ from females in a few regions placed at random inside the
brain (by seed) by a local volume change and an intensity change; one more
region varies strongly from subject to subject whatever the sex (a distractor),
and males may have larger brains overall (a confound). Two confounds come with
their participants-table columns, as multi-site studies and FreeSurfer give
them: a scanner (``site``: scanner B has another contrast and more noise, and
scans more men than women) and intracranial volume (``tiv``, larger in men,
which leaves after registration to MNI152 not a size but a diffuse pattern: a
larger head has relatively less cortex, an allometry). Images are written as
real ones arrive: at mixed voxel sizes, in RAS, LAS or axis-permuted voxel
order and with shifted origins, all still registered to MNI152 in world space,
so that preprocessing is exercised rather than the identity. Other targets get
effects of their own: atrophy growing with age (brain age), and subtypes of a
three-class ``group`` column that each lose volume in regions of their own. The
planted effects are saved as a ground truth, which is what lets the project score
attribution methods.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from pydantic import Field
from scipy import ndimage

from study.data.bids import GROUND_TRUTH, write_bids_metadata, write_ground_truth
from study.data.regions import PlantedRegion, brain_template, ground_truth, place_regions, profiles
from study.data.volumes import Grid
from study.params import Params
from study.storage import replace_atomically
from study.tasks import TaskMap, map_tasks

MALE_FRACTION = 507 / 1113  # as in the HCP young-adult cohort
SCANNER_B_GAMMA, SCANNER_B_NOISE = 1.3, 1.5  # scanner B's contrast (intensity ** gamma) and noise (times A's)
TIV_ML, TIV_SD = 1450.0, 0.08  # intracranial volume: median (ml) and sd of its logarithm within a sex
ALLOMETRY = 1.0  # relative intensity change of the cortical shell per unit of log TIV (less cortex, relatively)
# Voxel orders images arrive in: RAS (FSL/ANTs outputs), LAS (radiological), and axis-permuted ones.
ORIENTATIONS = (("R", "A", "S"), ("L", "A", "S"), ("A", "S", "R"), ("P", "I", "R"))


class SyntheticCohort(Params):
    """A synthetic cohort: its size, how its images are stored, and how hard the task is.

    The defaults make a task of realistic difficulty: effects of a few percent,
    comparable to the noise and smaller than the subject-to-subject nuisance
    (deformation, size, bias field, distractor).
    """

    subjects: int = Field(60, ge=4)
    voxel_sizes: tuple[float, ...] = Field((1.0, 1.25, 2.0), min_length=1)  # each image at one of these, mm
    mixed_orientations: bool = True  # RAS, LAS and axis-permuted voxel orders, shifted origins
    regions: int = Field(3, ge=1)  # regions where males differ, placed at random inside the brain
    effect_size: float = Field(0.1, ge=0)  # relative volume and intensity change in those regions
    distractor: float = Field(0.15, ge=0)  # sd over subjects of a sex-independent change in one more region
    confound: float = Field(0.0, ge=0)  # males' brains larger overall by this fraction
    # Scanner B (another contrast, more noise) scans (1 + s) / 2 of males and (1 - s) / 2 of females; 0: one site
    site_confound: float = Field(0.0, ge=0, lt=1)
    tiv_confound: float = Field(0.0, ge=0)  # males' intracranial volume larger by this fraction; 0: no tiv column
    # Brain age: ages 20 to 80, and atrophy in regions of their own that grows with age: a relative volume and
    # intensity loss of this much at 80, as much gain at 20 (0 at 50); 0: ages 22 to 36, no effect
    age_effect: float = Field(0.0, ge=0)
    # Several classes: a column group of control, subtype_a and subtype_b (a third each); each subtype loses this
    # much volume and intensity in regions of its own (``regions`` each); 0: no column
    group_effect: float = Field(0.0, ge=0)
    deformation_mm: float = Field(2.0, ge=0)  # sd of the smooth deformation (half shared within a family)
    scale_sd: float = Field(0.04, ge=0)  # sd of the global size (drawn within 2 sd)
    bias: float = Field(0.1, ge=0)  # sd of the log bias field
    noise: float = Field(0.04, ge=0)  # sd of the noise relative to the brain's typical intensity
    seed: int = 0


@dataclass(frozen=True)
class _Fields:
    """Per-voxel fields of one voxel size, shared by every subject stored at that size."""

    grid: Grid
    template: np.ndarray  # brain-extracted intensities on the grid, 0 outside the brain
    weight: np.ndarray  # signed sum of the effect regions' profiles (0..1 each)
    displacement: np.ndarray  # (3, D, H, W) signed sum of profile x offset from each effect centre
    distractor_weight: np.ndarray
    distractor_displacement: np.ndarray
    others: tuple[tuple[np.ndarray, np.ndarray], ...]  # the same of each other effect's regions (Scan.changes)
    allometry: np.ndarray  # -1 in the outer 10 mm of the brain (cortex), +1 deeper, smoothed


def _fields(
    voxel_mm: float, effects: list[PlantedRegion], distractor: PlantedRegion, others: list[list[PlantedRegion]]
) -> _Fields:
    grid = Grid.mni(voxel_mm)
    template = brain_template(grid)
    depth_mm = ndimage.distance_transform_edt(template > 0) * voxel_mm
    allometry = ndimage.gaussian_filter(np.where(depth_mm < 10, -1.0, 1.0), 4 / voxel_mm).astype(np.float32)
    planted = (profiles(grid, effects), profiles(grid, [distractor]))  # (weight, displacement) each
    return _Fields(grid, template, *planted[0], *planted[1], tuple(profiles(grid, r) for r in others), allometry)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int, scale: float) -> np.ndarray:
    """A smooth random field: Gaussian control points upsampled to ``shape``."""
    coarse = rng.normal(0.0, scale, size=(control,) * 3).astype(np.float32)
    return ndimage.zoom(coarse, [s / control for s in shape], order=1, mode="nearest")[
        : shape[0], : shape[1], : shape[2]
    ]


def _subject_volume(
    fields: _Fields, spec: SyntheticCohort, male: bool, seed: int, family_seed: int, scan: Scan
) -> np.ndarray:
    """One subject's T1w intensities on ``fields.grid`` (RAS), brain-extracted, as ``scan`` saw it."""
    rng = np.random.default_rng(seed)
    family_rng = np.random.default_rng(family_seed)
    shape = fields.template.shape
    voxels = np.indices(shape, dtype=np.float32)
    centre = ((np.asarray(shape, dtype=np.float32) - 1) / 2).reshape(3, 1, 1, 1)
    # Global size within 2 sd: an image registered to MNI152 keeps only some of its size difference, and a
    # larger tail would fail the input check (a 3 sd subject overlaps the MNI152 brain by Dice 0.76).
    size = np.clip(rng.normal(1.0, spec.scale_sd), 1 - 2 * spec.scale_sd, 1 + 2 * spec.scale_sd)
    scale = size * (1 + spec.confound if male else 1.0)
    coords = centre + (voxels - centre) / scale
    jitter = spec.deformation_mm / np.sqrt(2) / fields.grid.voxel_mm
    for axis in range(3):  # smooth deformation: one part shared with the family, one individual
        coords[axis] += _smooth_field(family_rng, shape, 5, jitter) + _smooth_field(rng, shape, 5, jitter)
    effect = spec.effect_size if male else 0.0
    distractor = rng.normal(0.0, spec.distractor)
    # Sampling closer to a region's centre enlarges it (direction +1), farther shrinks it.
    coords -= effect * fields.displacement + distractor * fields.distractor_displacement
    changed = [(change, *field) for change, field in zip(scan.changes, fields.others) if change]
    for change, _, other_displacement in changed:
        coords -= change * other_displacement
    volume = ndimage.map_coordinates(fields.template, coords, order=1, mode="constant", cval=0.0)
    inside = volume > 0.05 * fields.template.max()
    factor = 1.0 + effect * fields.weight + distractor * fields.distractor_weight
    for change, other_weight, _ in changed:
        factor = factor + change * other_weight
    volume *= factor
    volume *= 1.0 + ALLOMETRY * scan.log_tiv * fields.allometry
    volume *= np.exp(_smooth_field(rng, shape, 4, spec.bias))
    typical = float(np.median(fields.template[fields.template > 0]))
    if scan.scanner_b:
        volume = typical * (np.clip(volume, 0, None) / typical) ** SCANNER_B_GAMMA
    noise = spec.noise * (SCANNER_B_NOISE if scan.scanner_b else 1.0)
    volume += rng.normal(0.0, noise * typical, size=shape).astype(np.float32)
    return (np.clip(volume, 0, None) * inside * 1000 / fields.template.max()).astype(np.int16)


@dataclass(frozen=True)
class Scan:
    """What a subject's confounds and other effects do to its image: the scanner, its log intracranial volume about
    the median, and the change of each other effect's regions (its age's atrophy, its subtype's)."""

    scanner_b: bool = False
    log_tiv: float = 0.0
    changes: tuple[float, ...] = ()  # relative volume and intensity change of each _Fields.others' regions


def _confounds(spec: SyntheticCohort, males: np.ndarray) -> list[Scan]:
    """Each subject's scanner and log TIV, drawn from a generator of their own: a cohort without confounds keeps
    its images."""
    rng = np.random.default_rng([spec.seed, 1])
    scanner_b = rng.random(len(males)) < np.where(males == 1, 1 + spec.site_confound, 1 - spec.site_confound) / 2
    log_tiv = rng.normal(0.0, TIV_SD, len(males)) + males * np.log1p(spec.tiv_confound)
    log_tiv -= np.log1p(spec.tiv_confound) * MALE_FRACTION  # about the cohort's median
    return [
        Scan(bool(b) and spec.site_confound > 0, float(t) if spec.tiv_confound > 0 else 0.0)
        for b, t in zip(scanner_b, log_tiv)
    ]


def _stored(volume: np.ndarray, grid: Grid, rng: np.random.Generator, mixed: bool) -> nib.Nifti1Image:
    """The image as a scanner or pipeline might store it: padded (shifted origin) and reoriented."""
    if not mixed:
        return _in_mm(nib.Nifti1Image(volume, grid.affine))
    before = rng.integers(0, 9, size=3)
    padded = np.pad(volume, [(int(b), int(a)) for b, a in zip(before, rng.integers(0, 9, size=3))])
    affine = grid.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ before
    target = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(target))
    return _in_mm(nib.Nifti1Image(apply_orientation(padded, ornt), affine @ inv_ornt_aff(ornt, padded.shape)))


def _in_mm(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image with its spatial unit (mm) in the header, as scanners' converters write it."""
    image.header.set_xyzt_units("mm")
    return image


def _write_subject(
    fields_by_size: dict[float, _Fields],
    voxel_size: float,
    spec: SyntheticCohort,
    path: Path,
    male: bool,
    seed: int,
    family_seed: int,
    scan: Scan,
) -> None:
    fields = fields_by_size[voxel_size]
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = _subject_volume(fields, spec, male, seed, family_seed, scan)
    nib.save(_stored(volume, fields.grid, np.random.default_rng(seed + 1), spec.mixed_orientations), str(path))


def synthesize_cohort(
    out: Path, spec: SyntheticCohort, sibling_fraction: float = 0.4, tasks: TaskMap = map_tasks
) -> Path:
    """Write a BIDS-like synthetic cohort to ``out`` and return its participants table.

    Parameters
    ----------
    out : Path
        The cohort folder (created).
    spec : SyntheticCohort
        Size, storage and difficulty; the same spec gives the same files.
    sibling_fraction : float
        Share of subjects with a sibling (families share part of their anatomy).
    tasks : callable
        How subjects are written: as Ray tasks (:func:`~study.tasks.map_tasks`), or one after another in this
        process (:func:`~study.tasks.map_in_process`).

    Returns
    -------
    Path
        ``out/participants.tsv`` (participant_id, sex, family_id, age; site and tiv when planted). Images are
        ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz``, with ``dataset_description.json``,
        ``README`` and ``participants.json`` (a valid BIDS dataset);
        ``derivatives/ground_truth/`` holds the planted effect
        (``effect_map.nii.gz``), the regions (``regions.nii.gz``, effect regions
        1..n, the distractor n+1) and ``planted.json``. Subjects are written by
        ``tasks``; the participants table is written last.
    """
    rng = np.random.default_rng(spec.seed)
    effects, distractor = place_regions(rng, spec.regions)
    # Other effects' regions from generators of their own: a cohort without them keeps its images. Atrophy: the
    # regions shrink and darken with age, or in a subtype.
    others = {
        name: [replace(r, direction=-1, name=r.name.replace("effect", name, 1)) for r in regions]
        for name, regions in _other_regions(spec).items()
    }
    n = spec.subjects
    sexes = (rng.random(n) < MALE_FRACTION).astype(int)
    sexes[:2] = [0, 1]  # both classes, whatever the size
    families = _families(rng, n, sibling_fraction)
    subject_seeds = rng.integers(0, 2**31, size=n)
    family_seeds = {f: int(s) for f, s in zip(sorted(set(families)), rng.integers(0, 2**31, size=n))}
    voxel_sizes = [spec.voxel_sizes[i] for i in rng.integers(len(spec.voxel_sizes), size=n)]
    ids = [f"{i + 1:04d}" for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)

    fields = {v: _fields(v, effects, distractor, list(others.values())) for v in sorted(set(voxel_sizes))}
    paths = [out / f"sub-{sid}/anat/sub-{sid}_T1w.nii.gz" for sid in ids]
    seeds = [(int(subject_seeds[i]), family_seeds[families[i]]) for i in range(n)]
    ages = np.random.default_rng([spec.seed, 3]).uniform(20, 80, size=n).round(1)
    groups = np.random.default_rng([spec.seed, 5]).permutation(np.arange(n) % len(GROUPS))
    changes = np.zeros((n, 0))
    if spec.age_effect:  # +effect at 20, 0 at 50, -effect at 80 (the regions' direction makes it atrophy)
        changes = np.column_stack([changes, spec.age_effect * (ages - 50) / 30])
    if spec.group_effect:  # each subtype its own regions' atrophy
        changes = np.column_stack([changes, spec.group_effect * (groups[:, None] == np.arange(1, len(GROUPS)))])
    scans = [replace(scan, changes=tuple(map(float, c))) for scan, c in zip(_confounds(spec, sexes), changes)]
    args = [(voxel_sizes[i], spec, paths[i], bool(sexes[i]), *seeds[i], scans[i]) for i in range(n)]
    for _, _, error in tasks(_write_subject, args, desc="synthesizing", shared=(fields,)):
        if error is not None:
            raise error

    if not spec.age_effect:
        ages = rng.integers(22, 37, size=n)
    columns = {"participant_id": [f"sub-{sid}" for sid in ids], "sex": ["M" if m else "F" for m in sexes]}
    columns |= {"family_id": families, "age": [str(a) for a in ages]}
    if spec.group_effect:
        columns["group"] = [GROUPS[g] for g in groups]
    if spec.site_confound > 0:
        columns["site"] = ["B" if scan.scanner_b else "A" for scan in scans]
    if spec.tiv_confound > 0:
        columns["tiv"] = [f"{TIV_ML * np.exp(scan.log_tiv):.0f}" for scan in scans]
    rows = ["\t".join(columns)] + ["\t".join(values) for values in zip(*columns.values())]
    write_bids_metadata(out, spec.subjects, spec.seed, [c for c in ("site", "tiv", "group") if c in columns])
    _write_ground_truth(out, spec, effects, distractor, others)
    # The table is what says the cohort is complete (prepare_cohort generates a cohort without one): last, whole.
    replace_atomically(out / "participants.tsv", lambda tmp: tmp.write_text("\n".join(rows) + "\n"))
    return out / "participants.tsv"


GROUPS = ("control", "subtype_a", "subtype_b")  # the classes of study synth --group-effect's column group


def _other_regions(spec: SyntheticCohort) -> dict[str, list[PlantedRegion]]:
    """The regions of the age effect (``age``) and of each subtype's (``subtype_a``, ...), where planted."""
    regions = {}
    if spec.age_effect:
        regions["age"] = place_regions(np.random.default_rng([spec.seed, 2]), spec.regions)[0]
    if spec.group_effect:
        placed = place_regions(np.random.default_rng([spec.seed, 4]), spec.regions * (len(GROUPS) - 1))[0]
        for index, name in enumerate(GROUPS[1:]):
            regions[name] = placed[index * spec.regions : (index + 1) * spec.regions]
    return regions


def _families(rng: np.random.Generator, subjects: int, sibling_fraction: float) -> list[str]:
    """Family ids: singletons, and pairs of siblings for ``sibling_fraction`` of subjects."""
    families: list[str] = []
    while len(families) < subjects:
        size = 2 if (rng.random() < sibling_fraction and len(families) + 1 < subjects) else 1
        families += [f"fam{len(set(families)) + 1:04d}"] * size
    return families


def with_skull(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """A brain-extracted image with a head around its brain, as a T1w before brain extraction looks (as fMRIPrep's
    and ClinicaDL's outputs are, for tests and benchmarks): a dark band of CSF and bone (4 to 9 mm from the
    brain) inside bright scalp, fat and muscle (out to 20 mm)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = data > 0
    distance_mm = ndimage.distance_transform_edt(~brain, sampling=image.header.get_zooms()[:3])
    tissue = (distance_mm > 0) & (distance_mm <= 20) & ~((distance_mm > 4) & (distance_mm <= 9))
    head = data.copy()
    head[tissue] = 0.7 * np.median(data[brain])
    return nib.Nifti1Image(head, image.affine)


def _write_ground_truth(
    out: Path,
    spec: SyntheticCohort,
    effects: list[PlantedRegion],
    distractor: PlantedRegion,
    others: dict[str, list[PlantedRegion]],
) -> None:
    """The planted answer, on the MNI grid of the finest voxel size, as the cohort's ground-truth derivative; the
    age and subtype effects, when planted, beside it: ``age_effect_map``, ``age_regions`` (regions 1..n, the same
    distractor n+1) and planted.json's ``age_regions``; ``group_...`` for all subtypes' regions."""
    grid = Grid.mni(min(spec.voxel_sizes))
    effect, labels, planted = ground_truth(grid, effects, distractor, spec.effect_size, spec.model_dump(mode="json"))
    ages, subtypes = others.get("age", []), [r for name in GROUPS[1:] for r in others.get(name, [])]
    for prefix, regions, size in (("age", ages, spec.age_effect), ("group", subtypes, spec.group_effect)):
        if regions:  # labelled 1..n as placed, the distractor n + 1
            planted[f"{prefix}_regions"] = [vars(r) for r in regions]
            values = ground_truth(grid, regions, replace(distractor, label=len(regions) + 1), size, {})[:2]
            images = [_in_mm(nib.Nifti1Image(v, grid.affine)) for v in values]
            write_ground_truth(out / GROUND_TRUTH, *images, planted, prefix=f"{prefix}_")
    images = [_in_mm(nib.Nifti1Image(values, grid.affine)) for values in (effect, labels)]
    write_ground_truth(out / GROUND_TRUTH, *images, planted)
