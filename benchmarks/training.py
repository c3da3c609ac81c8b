"""Training throughput of MriNet: volumes per second per precision and memory format.

Times forward + backward + Adam steps on random volumes (speed does not depend
on the data), without Ray and without data loading: the ceiling that the
training loop can reach on this device.

    python benchmarks/training.py --grid 58x70x58 --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from study.training.models import Architecture, BrainCNN


def throughput(
    shape: tuple[int, ...],
    batch: int,
    bf16: bool,
    channels_last: bool,
    steps: int,
    width: int = 32,
    cudnn_benchmark: bool = False,
) -> float:
    """Volumes per second of MriNet (``width`` channels in its first block) training on random volumes;
    ``cudnn_benchmark``: cuDNN times its convolution algorithms first (the study leaves it off)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BrainCNN(Architecture(width=width), shape).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, *shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.backends.cudnn.flags(enabled=True, benchmark=cudnn_benchmark, deterministic=False, allow_tf32=True):
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", nargs="+", default=["58x70x58", "91x109x91"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    for grid in args.grids:
        shape = tuple(int(s) for s in grid.split("x"))
        for bf16, channels_last in ((False, False), (True, False), (False, True), (True, True)):
            rate = throughput(shape, args.batch, bf16, channels_last, args.steps)
            print(
                f"{grid:>10} batch {args.batch}: {'bf16' if bf16 else 'fp32'} "
                f"{'channels_last_3d' if channels_last else 'contiguous':>16}: {rate:8.1f} volumes/s",
                flush=True,
            )
        if torch.cuda.is_available():  # whether the study should turn cudnn.benchmark on
            rate = throughput(shape, args.batch, True, True, args.steps, cudnn_benchmark=True)
            print(
                f"{grid:>10} batch {args.batch}: bf16 channels_last_3d, cudnn.benchmark: {rate:8.1f} volumes/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
