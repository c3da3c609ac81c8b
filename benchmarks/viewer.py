"""What the report's map viewer costs: the seconds it adds to a study and the bytes it adds to report.html, beside
nilearn's ``view_img`` (one self-contained brainsprite viewer per map) for the same maps.

The demo's grid (6 mm) and its number of group maps by default: four methods, each with its mean map, one per
class and a t map, and the linear baseline's mean |weights| and weight map (18). The maps are smoothed noise, so
that their gzipped size is that of real maps rather than of empty ones.

    python benchmarks/viewer.py
    python benchmarks/viewer.py --voxel-size 2 --maps 18     # the paper's grid
"""

from __future__ import annotations

import argparse
import time
import warnings

import nibabel as nib
import numpy as np
from nilearn import plotting
from scipy import ndimage

from study.data.volumes import Grid
from study.output.figures import top_threshold
from study.output.viewer import ViewedMap, viewer_html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxel-size", type=float, default=6.0, help="study grid in mm (default 6, the demo's)")
    parser.add_argument("--maps", type=int, default=18, help="group maps in the report (default 18, the demo's)")
    args = parser.parse_args()
    grid = Grid.mni(args.voxel_size)
    rng = np.random.default_rng(0)
    maps = []
    for index in range(args.maps):
        values = ndimage.gaussian_filter(rng.normal(size=grid.shape), 2).astype(np.float32)
        signed = index % 4 == 3
        values = values if signed else np.abs(values)
        maps.append(ViewedMap(f"map {index}", values, top_threshold(values), signed))

    started = time.perf_counter()
    ours = viewer_html(maps, grid.affine)
    first = time.perf_counter() - started  # the template resampled to the display grid, once per process
    started = time.perf_counter()
    viewer_html(maps, grid.affine)
    again = time.perf_counter() - started

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [
            plotting.view_img(nib.Nifti1Image(m.values, grid.affine), threshold=m.threshold).get_iframe() for m in maps
        ]
    nilearn_seconds = time.perf_counter() - started
    nilearn_bytes = sum(len(page.encode()) for page in theirs)

    print(f"{args.maps} group maps on a {args.voxel_size:g} mm grid {grid.shape}")
    print(f"study viewer: {len(ours.encode()) / 1e6:.2f} MB, {first:.2f} s (first, template included), {again:.2f} s")
    print(f"nilearn view_img, one per map: {nilearn_bytes / 1e6:.2f} MB, {nilearn_seconds:.2f} s")
    ratio = nilearn_bytes / len(ours.encode()), nilearn_seconds / first
    print(f"ratio (view_img / ours): {ratio[0]:.1f}x the bytes, {ratio[1]:.1f}x the time")


if __name__ == "__main__":
    main()
