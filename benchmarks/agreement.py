"""Do a GPU's maps agree with the CPU's? The same model and subjects explained on both, per method.

Every map is computed in float32 on every device (``Precision.exact``), so the two should differ by
floating-point order only: a Spearman correlation near 1 and a maximum difference of a small fraction of
the map's maximum. MriNet with seeded random weights at the paper's 58x70x58 grid (agreement is about
arithmetic, not training), smoothed-noise volumes, through the study's own ``explain_batch`` (channels_last_3d
on the GPU). Without a GPU it compares the CPU with itself (a run of the script, not a measurement).

    python benchmarks/agreement.py                      # 4 subjects, 50 perturbation iterations
    python benchmarks/agreement.py --iterations 300 --grid 91x109x91
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from study.attribution import Perturbation
from study.attribution.actors import Explanation, explain_batch
from study.attribution.perturbation import gaussian_blur3d
from study.runtime import Precision
from study.training.models import Architecture, BrainCNN

METHODS = ("gradcam", "guided_backprop", "perturbation")


def maps_on(
    device: torch.device,
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    explanation: Explanation,
    voxel_mm: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Each method's maps [subjects, D, H, W] on ``device`` as the study computes them, and the seconds taken."""
    precision = Precision.choose(device)
    started = time.perf_counter()
    maps = explain_batch(
        precision.model(copy.deepcopy(model)), precision.volumes(x), labels.to(device), explanation, voxel_mm, precision
    )
    return maps, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="58x70x58")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=50, help="Meaningful Perturbations iterations")
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.grid.split("x"))
    voxel_mm = 182 / shape[0]
    torch.manual_seed(0)
    model = BrainCNN(Architecture(), shape).eval()
    noise = torch.randn(args.subjects, 1, *shape, generator=torch.Generator().manual_seed(1))
    x = gaussian_blur3d(noise, 1.5)
    x = (x - x.mean()) / x.std()
    labels = torch.arange(args.subjects) % 2
    explanation = Explanation(METHODS, "true_class", Perturbation(iterations=args.iterations, reference="blur"))
    gpu = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(
        f"{args.subjects} subjects, grid {args.grid}, MP {args.iterations} iterations; CPU against "
        f"{torch.cuda.get_device_name() if gpu.type == 'cuda' else 'the CPU (no GPU here)'}; torch {torch.__version__}"
    )
    cpu_maps, cpu_s = maps_on(torch.device("cpu"), model, x, labels, explanation, voxel_mm)
    gpu_maps, gpu_s = maps_on(gpu, model, x, labels, explanation, voxel_mm)
    print(f"seconds: CPU {cpu_s:.1f}, {gpu.type.upper()} {gpu_s:.1f}")
    print(f"{'method':<16} {'Spearman min':>12} {'mean':>8} {'max |diff| / max':>17}")
    for method in METHODS:
        a, b = cpu_maps[method].astype(np.float32), gpu_maps[method].astype(np.float32)
        rho = [spearmanr(s.ravel(), t.ravel()).statistic for s, t in zip(a, b)]
        relative = float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12))
        print(f"{method:<16} {min(rho):>12.4f} {np.mean(rho):>8.4f} {relative:>17.2e}")


if __name__ == "__main__":
    main()
