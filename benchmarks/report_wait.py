"""What Ray Train's controller poll costs a training that reports every epoch (a search trial does).

Ray Train V2's controller takes a worker's report once per poll
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default) and a worker's next
report waits for it. A search trial reports every epoch (ASHA decides on
epochs), so short epochs pay up to the poll interval each. This runs the same
TorchTrainer (one CPU worker, ``--epochs`` epochs of ``--epoch-s`` seconds of
work, one report each) under Ray's default poll and under the study's
(:data:`study.training.trainer.CONTROLLER_POLL_S`), side by side in one run.

    python benchmarks/report_wait.py --epochs 20 --epoch-s 0.5
"""

from __future__ import annotations

import argparse
import time

import ray
import ray.train
from ray.train import LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from study.runtime import environment
from study.training.trainer import CONTROLLER_POLL_S


def _epochs(config: dict) -> None:
    for epoch in range(config["epochs"]):
        deadline = time.perf_counter() + config["epoch_s"]
        while time.perf_counter() < deadline:  # an epoch's work, on the CPU
            pass
        ray.train.report({"epoch": epoch})


def wall(poll_s: float, epochs: int, epoch_s: float, storage: str) -> float:
    """Seconds from the trainer's start to its end, its controller polling every ``poll_s``."""
    trainer = TorchTrainer(
        _epochs,
        train_loop_config={"epochs": epochs, "epoch_s": epoch_s},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(
            name=f"poll{poll_s}", storage_path=storage, logging_config=LoggingConfig(log_level="WARNING")
        ),
    )
    started = time.perf_counter()
    with environment(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(poll_s)):
        trainer.fit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epoch-s", type=float, default=0.5, help="seconds of work per epoch")
    parser.add_argument("--storage", default="/tmp/report_wait")
    args = parser.parse_args()
    ray.init(num_cpus=2)
    work = args.epochs * args.epoch_s
    print(f"{args.epochs} epochs of {args.epoch_s} s work ({work:.0f} s), one report each")
    print(f"{'controller poll':>16} {'wall s':>8} {'wall - work s':>14} {'per epoch s':>12}")
    wall(CONTROLLER_POLL_S, 2, 0.1, args.storage)  # warm-up: the first trainer also pays Ray's cold worker start
    walls = {}
    for poll_s in (2.0, CONTROLLER_POLL_S):
        walls[poll_s] = wall(poll_s, args.epochs, args.epoch_s, args.storage)
        print(
            f"{poll_s:>16} {walls[poll_s]:>8.1f} {walls[poll_s] - work:>14.1f} "
            f"{(walls[poll_s] - work) / args.epochs:>12.2f}"
        )
    print(f"ratio of walls (Ray's default / the study's): {walls[2.0] / walls[CONTROLLER_POLL_S]:.2f}")


if __name__ == "__main__":
    main()
