"""What a whole study costs, stage by stage: the paper's protocol on a synthetic cohort, or scaled down.

Synthesizes a cohort once per size (cached under ``--cohort``), runs the real
study (`run_study`: Ray, Ray Train, the linear baseline, the attribution
actors, statistics, MLflow in a temporary SQLite store, the report) and prints
the study's own per-stage table (the one every study logs to MLflow as
``stage_times.tsv``) with the ratios that say where time is lost:

- training throughput through the real data path against pure compute
  (``benchmarks/training.py``'s loop, same device, threads, width and batch;
  on a GPU against the device's share that each of the concurrent folds has);
- Ray Train set-up (start of workers, reports, checkpoints) against training;
- attribution throughput (subject-maps per second, all methods together);
- the group statistics' seconds (tests, group maps, agreement, localization);
- the study's wall time against the sum of its stages (what running folds and
  actors side by side buys).

Several ``--subjects`` or ``--folds`` give the scaling curve: one study per
combination and a last table with one row each. The first study of a cohort
size also generates and preprocesses its cohort (the preprocessing row).

    python benchmarks/whole_study.py   # the paper: 1,113 subjects, 10 folds, MriNet, 58x70x58 (a GPU)
    python benchmarks/whole_study.py --subjects 120 --folds 3 --epochs 10 --width 8 --voxel-size 6 --iterations 30
    python benchmarks/whole_study.py --subjects 250 500 1113 --folds 2 --epochs 3 --width 4 --voxel-size 6 \\
        --iterations 10 --permutations 200                 # the scaling curve in cohort size, on CPU
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from training import throughput

from study.config import StudyConfig, parse_config
from study.pipeline import run_study

PAPER_VOXEL_MM, PAPER_SHAPE = 3.1379, (58, 70, 58)  # the paper's grid


def measure(subjects: int, folds: int, args: argparse.Namespace) -> tuple[StudyConfig, pd.Series, float]:
    """Run one study of ``subjects`` in ``folds`` outer folds; its config, seconds per stage and wall time."""
    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    grid = {"voxel_size": args.voxel_size or PAPER_VOXEL_MM, "shape": None if args.voxel_size else PAPER_SHAPE}
    config = parse_config(
        {
            "name": "bench",
            "cohort": {
                "root": str(args.cohort.resolve() / str(subjects)),
                "synthetic": {"subjects": subjects, "voxel_sizes": [2.0, 2.5, 3.0], "seed": 0},
            },
            "preprocess": grid | {"cache_dir": str(args.cohort.resolve() / "cache")},
            "cv": {"outer_folds": folds},
            "model": {"preset": "mrinet", "width": args.width},
            "train": {"epochs": args.epochs},
            "resources": {
                "use_gpu": gpu,
                "concurrent_folds": args.concurrent_folds,
                "gpus_per_worker": 1 / args.concurrent_folds,
            },
            "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
            "output_dir": str(work / "runs"),
            "attribution": {
                "methods": ["gradcam", "guided_backprop", "perturbation"],
                "gpus_per_actor": 1 / args.concurrent_folds,
                "permutations": args.permutations,
                "perturbation": {"iterations": args.iterations},
            },
        }
    )
    started = time.perf_counter()
    run_id = run_study(config)
    wall = time.perf_counter() - started
    mlflow.set_tracking_uri(config.tracking.uri)
    times = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="stage_times.tsv", dst_path=str(work)),
        sep="\t",
    ).set_index("stage")
    print(
        f"\n{subjects} subjects, {folds} outer folds, {args.epochs} epochs, MriNet width {args.width}, "
        f"{'x'.join(map(str, config.preprocess.grid.shape))} grid, {args.iterations} perturbation iterations, "
        f"{args.permutations} permutations, {args.concurrent_folds} concurrent folds; results in {work}"
    )
    return config, times["seconds"], wall


def report(
    config: StudyConfig, seconds: pd.Series, wall: float, subjects: int, folds: int, args: argparse.Namespace
) -> dict[str, float]:
    """Print a study's stage table and ratios; return them as one row of the scaling table."""
    gpu = torch.cuda.is_available()
    trained = subjects * (folds - 1) / folds * args.epochs * folds  # volumes seen in training
    per_fold = trained / seconds["training"]  # training seconds are summed over folds
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))  # as a training worker has them
    compute = throughput(
        config.preprocess.grid.shape, config.train.batch_size, bf16=gpu, channels_last=gpu, steps=10, width=args.width
    )
    torch.set_num_threads(threads)
    if gpu:  # concurrent folds share the device
        compute /= args.concurrent_folds
    maps = subjects * len(config.attribution.methods)
    stages = seconds.drop("whole study (wall)").sum()
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}")
    print(
        pd.DataFrame({"seconds": seconds, "share": seconds / seconds["whole study (wall)"]}).to_string(
            float_format=lambda v: f"{v:.2f}"
        )
    )
    row = {
        "subjects": subjects,
        "folds": folds,
        "wall_s": wall,
        **seconds.rename(lambda k: k + " s"),
        "training volumes/s per fold": per_fold,
        "pure compute volumes/s": compute,
        "real path / pure compute": per_fold / compute,
        "Ray Train set-up / training": seconds["Ray Train set-up"] / seconds["training"],
        "subject-maps/s": maps / seconds.get("attribution", float("nan")),
        "sum of stages / wall": stages / seconds["whole study (wall)"],
    }
    print(
        f"training, real data path:               {per_fold:.1f} volumes/s per fold "
        f"(pure compute on a fold's threads or device share: {compute:.1f}; ratio {per_fold / compute:.2f}; "
        "the real path also scores the training subjects after the last epoch)"
    )
    print(f"Ray Train set-up / training:            {row['Ray Train set-up / training']:.2f}")
    print(f"attribution throughput (all methods):   {row['subject-maps/s']:.2f} subject-maps/s")
    if "group statistics" in seconds:
        print(
            f"group statistics:                       {seconds['group statistics']:.1f} s "
            f"({args.permutations} permutations per tested method)"
        )
    print(
        f"sum of stages / study wall time:        {row['sum of stages / wall']:.2f}"
        f"  (above 1: folds and stages overlapped)"
    )
    print(f"study wall time:                        {wall:.0f} s (with Ray's start in the first study of a run)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[1113])
    parser.add_argument("--folds", type=int, nargs="+", default=[10])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=32, help="MriNet's first-block channels (the paper: 32)")
    parser.add_argument(
        "--voxel-size",
        type=float,
        default=None,
        help="study grid in mm (default: the paper's 58 x 70 x 58 at 3.1379 mm)",
    )
    parser.add_argument("--iterations", type=int, default=300, help="Meaningful Perturbations steps (the paper: 300)")
    parser.add_argument("--permutations", type=int, default=5000, help="of the group test (default 5,000)")
    parser.add_argument("--concurrent-folds", type=int, default=2)
    parser.add_argument(
        "--cohort",
        type=Path,
        default=Path("study_data/bench_cohort"),
        help="where each cohort size is generated once (default study_data/bench_cohort)",
    )
    args = parser.parse_args()
    rows = []
    for subjects, folds in itertools.product(args.subjects, args.folds):
        rows.append(report(*measure(subjects, folds, args), subjects, folds, args))
    if len(rows) > 1:
        curve = pd.DataFrame(rows).set_index(["subjects", "folds"])
        print("\nscaling (seconds; fold stages summed over folds):")
        print(curve.T.to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
