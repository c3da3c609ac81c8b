"""The group test's cost at the paper's size: voxel-wise Welch t with FWER by 5,000 permutations.

Builds maps of the paper's cohort (1,113 subjects in families of 1 to 4, 10
outer folds) over the brain voxels of the paper's grid (58x70x58, nilearn's
MNI152 mask) and times :func:`study.attribution.stats.permutation_test` on the
CPU with all threads (as a CPU study runs it, in its driver) and, where there is
one, on the GPU (as a GPU study runs it, in a Ray task), and on its own the
drawing of the design-respecting permutations that each run includes.

    python benchmarks/group_test.py                        # 1,113 subjects, 5,000 permutations
    python benchmarks/group_test.py --subjects 250 --permutations 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from study.attribution.stats import ExchangeabilityBlocks, permutation_test
from study.data.volumes import Grid, _mni_brain


def cohort(subjects: int, folds: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, outer folds and families (whole families in one fold, 1 to 4 members) like HCP's."""
    sizes = []
    while sum(sizes) < subjects:
        sizes.append(int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1])))
    sizes[-1] -= sum(sizes) - subjects
    families = np.repeat(np.arange(len(sizes)), sizes).astype(str)
    fold_of_family = rng.permutation(len(sizes)) % folds
    return rng.integers(0, 2, subjects), np.repeat(fold_of_family, sizes), families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=1113)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--permutations", type=int, default=5000)
    parser.add_argument(
        "--voxel-size",
        type=float,
        default=None,
        help="study grid in mm (default: the paper's 58 x 70 x 58 at 3.1379 mm)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    grid = Grid.mni(args.voxel_size) if args.voxel_size else Grid.mni(3.1379, (58, 70, 58))
    voxels = int(_mni_brain(grid.shape, np.ascontiguousarray(grid.affine).tobytes()).sum())
    labels, folds, families = cohort(args.subjects, args.folds, rng)
    maps = rng.standard_normal((args.subjects, voxels), dtype=np.float32)
    maps[labels == 1, : voxels // 20] += 0.3  # an effect in 5% of the voxels
    print(
        f"{args.subjects} subjects in {len(set(families))} families, {args.folds} folds; "
        f"{voxels} brain voxels of the {'x'.join(map(str, grid.shape))} grid; {args.permutations} permutations"
    )

    start = time.perf_counter()
    blocks = ExchangeabilityBlocks(folds, families)
    for _ in range(args.permutations):
        blocks.draw(rng)
    drawing = time.perf_counter() - start
    print(f"drawing the permutations (part of each run below): {drawing:6.1f} s")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        start = time.perf_counter()
        test = permutation_test(maps, labels, args.permutations, folds, families, device=device)
        seconds = time.perf_counter() - start
        significant = int((test.p <= 0.05).sum())
        print(
            f"{name:>32}: {seconds:7.1f} s, {args.permutations / seconds:8.1f} permutations/s "
            f"({significant} voxels at FWER p <= 0.05; {voxels // 20} carry the effect)"
        )


if __name__ == "__main__":
    main()
