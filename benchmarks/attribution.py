"""Attribution speed: subjects per second for each method of the table, batched vs one subject at a time.

Runs the paper's MriNet (random weights: speed does not depend on training) at
the paper's 58x70x58 grid and at the 2 mm default (91x109x91), on the GPU when
there is one. Prints one line per (grid, method, batch) and the projected time
for the HCP cohort (1,113 subjects).

    python benchmarks/attribution.py                 # all methods, both grids
    python benchmarks/attribution.py --iterations 300 --batch 32 --grids 58x70x58
"""

from __future__ import annotations

import argparse
import time

import torch

from study.attribution import METHODS, Batch, Perturbation
from study.runtime import Precision
from study.training.models import Architecture, BrainCNN

HCP_SUBJECTS = 1113


def timed(fn, repeats: int) -> float:
    """Seconds per call (after one warm-up call), synchronizing the GPU."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", nargs="+", default=["58x70x58", "91x109x91"])
    parser.add_argument("--batch", type=int, default=32, help="subjects per batch (default 32)")
    parser.add_argument("--iterations", type=int, default=300, help="Meaningful Perturbations iterations")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}; "
        f"float32 (no TF32), channels_last_3d: {cuda}"
    )
    config = Perturbation(iterations=args.iterations)
    for grid in args.grids:
        shape = tuple(int(s) for s in grid.split("x"))
        voxel_mm = 182 / shape[0]
        model = BrainCNN(Architecture(), shape).to(device).eval()
        mean = torch.zeros(shape, device=device)  # a z-scored cohort's mean, roughly
        if cuda:
            model = model.to(memory_format=torch.channels_last_3d)
        for name in args.methods:
            for batch in (1, args.batch):
                x = torch.randn(batch, 1, *shape, device=device)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                targets = torch.randint(0, 2, (batch,), device=device)

                def run():  # in float32, as the study explains (Precision.exact); each method on its own
                    with Precision.choose(device).exact():
                        Batch(model, x, targets, voxel_mm, config, mean).map(name)

                repeats = 1 if name == "perturbation" else args.repeats
                seconds = timed(run, repeats)
                rate = batch / seconds
                print(
                    f"{grid:>10} {name:>16} batch {batch:>3}: {rate:9.2f} subjects/s  "
                    f"({seconds / batch:.4f} s/subject; {HCP_SUBJECTS} subjects in {HCP_SUBJECTS / rate:8.1f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
