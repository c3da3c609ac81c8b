"""Reading T1-weighted NIfTI images and bringing them onto the study grid.

One image is read once: :func:`load_volume` checks it (readable, complete, 3D,
finite, sane affine) and :func:`preprocess_volume` brings it to canonical RAS,
resamples it onto the MNI-like study grid and z-scores it inside the brain.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from study.errors import VolumeError

# The MNI152 bounding box (1 mm, 182 x 218 x 182) that every study grid covers, and its centre.
MNI_BOX_MM = (182.0, 218.0, 182.0)
MNI_BOX_CENTRE_MM = (0.0, -18.0, 18.0)
# The least Dice overlap between an image's brain and the MNI152 brain mask, after resampling, that
# passes as "registered to MNI152 and brain-extracted" (how it was chosen: README, "The input contract").
MNI_OVERLAP_MIN = 0.8
# The most voxels an image may declare: 512^3, 0.5 GB as float32 (a 0.5 mm whole head is 57 million). A header is
# read before its data, so a small crafted file declaring billions of voxels is refused instead of filling memory.
MAX_VOXELS = 512**3
MNI152_MASK = "mni152"  # a brain mask: nilearn's MNI152 brain mask, for images registered to MNI152 with the skull on


@dataclass(frozen=True)
class Grid:
    """A voxel grid in RAS+ millimetres: shape and the voxel-to-world affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def mni(cls, voxel_size: float, shape: tuple[int, int, int] | None = None) -> Grid:
        """An isotropic RAS grid centred on the MNI152 brain box.

        ``shape`` defaults to the box at ``voxel_size`` (91 x 109 x 91 at 2 mm).
        """
        if shape is None:
            shape = tuple(int(np.floor(b / voxel_size + 0.5)) for b in MNI_BOX_MM)
        half_extent = (np.asarray(shape) - 1) / 2 * voxel_size
        affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
        affine[:3, 3] = np.asarray(MNI_BOX_CENTRE_MM) - half_extent
        return cls(tuple(int(s) for s in shape), affine)  # type: ignore[arg-type]

    @property
    def voxel_mm(self) -> float:
        """The (isotropic) voxel size in millimetres."""
        return float(abs(self.affine[0, 0]))


def load_volume(path: Path) -> nib.Nifti1Image:
    """Read a 3D NIfTI fully into memory, raising :class:`VolumeError` on any defect.

    Checks: the file exists and is a NIfTI, the gzip stream is complete, the
    image is 3D (or 4D with a single volume), all voxels are finite and the
    affine is invertible. The returned image holds float32 data in canonical
    RAS orientation.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"file not found: {path}; fix the path or the participants table")
    try:
        img = nib.load(str(path))
        voxels = int(np.prod(img.shape, dtype=np.float64))
        if voxels > MAX_VOXELS:
            raise VolumeError(
                f"its header declares {img.shape} = {voxels:.3g} voxels, more than the {MAX_VOXELS:.3g} "
                f"a brain image has (study.data.volumes.MAX_VOXELS); check or re-export {path.name}"
            )
        data = np.asarray(img.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except MemoryError:
        raise VolumeError(
            f"not enough memory to read {path.name} ({img.shape}); free memory or use fewer parallel tasks"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise VolumeError(f"truncated or corrupt gzip ({err}); re-copy or re-export {path.name}") from None
    except (nib.filebasedimages.ImageFileError, ValueError, OSError) as err:
        raise VolumeError(f"not a readable NIfTI ({err}); re-export {path.name} as .nii or .nii.gz") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"expected a 3D T1w volume, got shape {data.shape}; extract the single T1w volume first")
    if min(data.shape) < 2:
        raise VolumeError(f"degenerate shape {data.shape}; this is not a brain volume")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise VolumeError(f"{bad} non-finite voxels (NaN/Inf); fix or re-export the image")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise VolumeError("degenerate affine (zero or non-finite voxel-to-world matrix); fix the header")
    image = nib.Nifti1Image(data, affine)
    return nib.as_closest_canonical(image)


def resample_to_grid(image: nib.Nifti1Image, grid: Grid, order: int = 1) -> np.ndarray:
    """Trilinear (``order=1``) resampling of ``image`` onto ``grid``; outside is 0."""
    vox_to_vox = np.linalg.inv(image.affine) @ grid.affine
    return ndimage.affine_transform(
        np.asarray(image.dataobj, dtype=np.float32),
        vox_to_vox[:3, :3],
        offset=vox_to_vox[:3, 3],
        output_shape=grid.shape,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def brain_mask(volume: np.ndarray) -> np.ndarray:
    """Voxels inside the brain: above 5% of the robust maximum of a brain-extracted image."""
    positive = volume[volume > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    return volume > 0.05 * np.percentile(positive, 99)


@functools.lru_cache(maxsize=8)
def _mni_brain(shape: tuple[int, int, int], affine: bytes) -> np.ndarray:
    from nilearn.datasets import load_mni152_brain_mask

    grid = Grid(shape, np.frombuffer(affine).reshape(4, 4))
    return resample_to_grid(load_mni152_brain_mask(resolution=2), grid) > 0.5


def mni_overlap(volume: np.ndarray, grid: Grid) -> float:
    """Dice overlap of the brain of ``volume`` (on ``grid``) with nilearn's MNI152 brain mask.

    Near 0.9 for a brain-extracted image registered to MNI152; a skull left on,
    an image in native space or a wrong orientation in its header give much less.
    """
    mni = _mni_brain(grid.shape, np.ascontiguousarray(grid.affine, dtype=np.float64).tobytes())
    brain = brain_mask(volume)
    return float(2 * (brain & mni).sum() / max(brain.sum() + mni.sum(), 1))


def zscore_in_brain(volume: np.ndarray) -> np.ndarray:
    """Z-score the intensities inside the brain mask and zero everything outside.

    Mean and standard deviation are taken in float64, so the float16 result does
    not depend on how numpy happens to sum (which varies with memory alignment).
    """
    mask = brain_mask(volume)
    if mask.sum() < 10:
        raise VolumeError("empty brain after resampling; is the image in a different space than the study grid?")
    inside = volume[mask].astype(np.float64)
    out = np.zeros_like(volume)
    out[mask] = (inside - inside.mean()) / max(float(inside.std()), 1e-6)
    return out


def apply_brain_mask(volume: np.ndarray, grid: Grid, mask: Path | str | None) -> np.ndarray:
    """``volume`` (on ``grid``) with everything outside a brain mask set to 0.

    ``mask`` is a mask file in the image's space (e.g. fMRIPrep's
    ``desc-brain_mask``, resampled by nearest neighbour), ``"mni152"`` for
    nilearn's MNI152 brain mask, or None for no masking (brain-extracted input).
    """
    if mask is None:
        return volume
    if mask == MNI152_MASK:
        inside = _mni_brain(grid.shape, np.ascontiguousarray(grid.affine, dtype=np.float64).tobytes())
    else:
        try:
            inside = resample_to_grid(load_volume(Path(mask)), grid, order=0) > 0
        except VolumeError as err:
            raise VolumeError(f"its brain mask {mask}: {err}") from None
    return np.where(inside, volume, 0).astype(np.float32)


def preprocess_volume(path: Path, grid: Grid, normalize: str = "zscore", mask: Path | str | None = None) -> np.ndarray:
    """Read, check, resample, mask and normalize one image; float16 on the study grid.

    Parameters
    ----------
    path : Path
        A 3D T1w NIfTI registered to MNI space: brain-extracted, or with the skull on and a ``mask``.
    grid : Grid
        The study grid to resample onto (trilinear).
    normalize : {"zscore", "none"}
        ``zscore``: intensities z-scored inside the brain, zero outside.
    mask : Path, "mni152" or None
        The brain mask applied before the check that the image's brain is in
        MNI space (see :func:`apply_brain_mask`).
    """
    volume = apply_brain_mask(resample_to_grid(load_volume(path), grid), grid, mask)
    overlap = mni_overlap(volume, grid)
    if overlap < MNI_OVERLAP_MIN:
        raise VolumeError(
            f"its brain overlaps the MNI152 brain mask by {overlap:.2f} (Dice) after resampling, below "
            f"{MNI_OVERLAP_MIN}: give images registered to MNI152 and brain-extracted (e.g. HCP's "
            "MNINonLinear/T1w_restore_brain), or with the skull on and a brain mask (cohort.brain_mask; fMRIPrep's "
            "desc-brain_mask and mni152 for ClinicaDL's t1-linear are the defaults of those layouts). A "
            "native-space image, a skull left on or a wrong orientation in the header all do this"
        )
    if normalize == "zscore":
        volume = zscore_in_brain(volume)
    return volume.astype(np.float16)
