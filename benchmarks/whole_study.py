"""What a whole study costs, stage by stage: the paper's protocol on a synthetic cohort, or scaled down.

Synthesizes a cohort once (cached under ``--cohort``), runs the real study
(`run_study`: Ray, Ray Train, the linear baseline, the attribution actors,
statistics, MLflow in a temporary SQLite store, the report) and prints the
study's own per-stage table (the one every study logs to MLflow as
``stage_times.tsv``) with the ratios that say where time is lost:

- Ray Train set-up (start of workers, reports, checkpoints) against training;
- training throughput through the real data path (volumes per second);
- attribution throughput (subject-maps per second, all methods together);
- the study's wall time against the sum of its stages (what running folds and
  actors side by side buys).

    python benchmarks/whole_study.py                       # the paper: 1,113 subjects, 10 folds, MriNet, 58x70x58 (a GPU)
    python benchmarks/whole_study.py --subjects 120 --folds 3 --epochs 10 --width 8 --voxel-size 6 --iterations 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

from study.config import parse_config
from study.pipeline import run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=1113)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=32, help="MriNet's first-block channels (the paper: 32)")
    parser.add_argument("--voxel-size", type=float, default=3.1379, help="study grid (the paper: 58 x 70 x 58)")
    parser.add_argument("--iterations", type=int, default=300, help="Meaningful Perturbations steps (the paper: 300)")
    parser.add_argument("--concurrent-folds", type=int, default=2)
    parser.add_argument("--cohort", type=Path, default=Path("study_data/bench_cohort"),
                        help="where the cohort is generated once (default study_data/bench_cohort)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    root = args.cohort.resolve() / str(args.subjects)
    config = parse_config({
        "name": "bench",
        "cohort": {"root": str(root), "synthetic": {"subjects": args.subjects, "voxel_sizes": [2.0, 2.5, 3.0], "seed": 0}},
        "preprocess": {"voxel_size": args.voxel_size, "cache_dir": str(args.cohort.resolve() / "cache")},
        "cv": {"outer_folds": args.folds},
        "model": {"preset": "mrinet", "width": args.width},
        "train": {"epochs": args.epochs},
        "resources": {"use_gpu": gpu, "concurrent_folds": args.concurrent_folds,
                      "gpus_per_worker": 1 / args.concurrent_folds},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
        "output_dir": str(work / "runs"),
        "attribution": {"methods": ["gradcam", "guided_backprop", "perturbation"],
                        "gpus_per_actor": 1 / args.concurrent_folds,
                        "perturbation": {"iterations": args.iterations}},
    })
    started = time.perf_counter()
    run_id = run_study(config)
    wall = time.perf_counter() - started

    mlflow.set_tracking_uri(config.tracking.uri)
    times = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="stage_times.tsv",
                                                            dst_path=str(work)), sep="\t").set_index("stage")
    seconds = times["seconds"]
    trained = args.subjects * (args.folds - 1) / args.folds * args.epochs * args.folds  # volumes seen in training
    maps = args.subjects * len(config.attribution.methods)
    stages = seconds.drop("whole study (wall)").sum()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.subjects} subjects, {args.folds} outer folds, {args.epochs} epochs, MriNet width {args.width}, "
          f"{config.preprocess.voxel_size:g} mm grid, {args.iterations} perturbation iterations, "
          f"{args.concurrent_folds} concurrent folds; {device}; results in {work}")
    print(times.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"Ray Train set-up / training:            {seconds['Ray Train set-up'] / seconds['training']:.2f}")
    print(f"training throughput (real data path):   {trained / seconds['training']:.1f} volumes/s")
    if "attribution" in seconds:
        print(f"attribution throughput (all methods):   {maps / seconds['attribution']:.2f} subject-maps/s")
    print(f"sum of stages / study wall time:        {stages / seconds['whole study (wall)']:.2f}"
          f"  (above 1: folds and stages overlapped)")
    print(f"study wall time, Ray start included:    {wall:.0f} s")


if __name__ == "__main__":
    main()
