"""How the input contract's threshold was chosen: MNI152 brain overlap of good and bad images.

Synthesizes a cohort (brain-extracted, registered to MNI152, with the
generator's subject-to-subject deformation and size variation, stored at mixed
voxel sizes and orientations), then measures the Dice overlap of each image's
brain with the MNI152 brain mask after resampling onto study grids of 2, 4 and
8 mm, as it is, and broken in the ways real inputs are broken: skull left on
(a simulated head: dark CSF and bone, bright scalp and muscle around the brain), native space
(shifted by 20 mm, or rotated by 15 degrees), and a wrong orientation in the
header (front and back swapped). Prints the range of each case.

    python benchmarks/mni_overlap.py --subjects 20
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from study.data.synth import SyntheticCohort, synthesize_cohort, with_skull
from study.data.volumes import MNI_OVERLAP_MIN, Grid, load_volume, mni_overlap, resample_to_grid
from study.runtime import start_ray


def moved(image: nib.Nifti1Image, transform: np.ndarray) -> nib.Nifti1Image:
    """The same voxels with a world transform applied to the header (what a missing registration looks like)."""
    return nib.Nifti1Image(np.asarray(image.dataobj), transform @ image.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=20)
    args = parser.parse_args()
    start_ray()
    shift = np.eye(4)
    shift[:3, 3] = [0, 20, 0]
    rotate = np.eye(4)
    rotate[:3, :3] = Rotation.from_euler("x", 15, degrees=True).as_matrix()
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    cases = {
        "registered, brain-extracted": lambda i: i,
        "skull left on": with_skull,
        "native space: shifted 20 mm": lambda i: moved(i, shift),
        "native space: rotated 15 deg": lambda i: moved(i, rotate),
        "header: front and back swapped": lambda i: moved(i, flip),
    }
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_cohort(Path(tmp), SyntheticCohort(subjects=args.subjects, seed=7))
        images = [load_volume(p) for p in sorted(Path(tmp).glob("sub-*/anat/*.nii.gz"))]
        print(
            f"Dice overlap with the MNI152 brain mask ({args.subjects} synthetic subjects; threshold {MNI_OVERLAP_MIN})"
        )
        for voxel in (2.0, 4.0, 8.0):
            grid = Grid.mni(voxel)
            for name, broken in cases.items():
                dice = np.array([mni_overlap(resample_to_grid(broken(i), grid), grid) for i in images])
                print(
                    f"  {voxel:.0f} mm grid  {name:<32} min {dice.min():.3f}  median {np.median(dice):.3f}  "
                    f"max {dice.max():.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
