"""Ray Train's fixed cost per training: a TorchTrainer whose loop only reports once, timed from fit() to its end.

Every fold, search trial and the label-randomized model is one such fit, so this
is the floor of the stage table's "Ray Train set-up" row: the controller, the
state actor and the worker start as new processes and import Ray Train and
torch before the loop's first line. Runs a plain loop, then one that imports
what the study's training loop imports, each ``--repeats`` times.

    python benchmarks/ray_train_setup.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from study.training.trainer import CONTROLLER_POLL_S


def plain(config: dict) -> None:
    config["queue"].put(time.time() - config["t0"])
    ray.train.report({"done": 1})


def with_study_imports(config: dict) -> None:
    import study.training.loop  # noqa: F401  the study's training loop and everything it imports

    plain(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))  # as the study's fits
    ray.init(include_dashboard=False, log_to_driver=False)
    from ray.util.queue import Queue

    storage = tempfile.mkdtemp(prefix="ray-train-setup-")
    queue = Queue()  # the loops tell when their first line ran; started (and answering) before any timing
    queue.size()
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPU; one worker per fit")
    for name, loop in [("plain loop", plain), ("study's imports", with_study_imports)]:
        for repeat in range(args.repeats):
            t0 = time.time()
            TorchTrainer(
                loop,
                train_loop_config={"t0": t0, "queue": queue},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=storage, name=f"{loop.__name__}{repeat}"),
            ).fit()
            print(f"{name:>16}: loop's first line {queue.get():5.1f} s after fit(), fit() {time.time() - t0:5.1f} s")


if __name__ == "__main__":
    main()
