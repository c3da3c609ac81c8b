"""Brain age (``cohort.task: regression``): does the CNN predict age as well as a ridge regression on the same
voxels, on a ladder of synthetic cohorts?

Each cohort is ``study synth --age-effect F`` (ages 20 to 80, atrophy growing with age in regions placed at
random by the seed; F the relative loss at 80). One whole study per cohort (``run_study``: Ray Train, the
final fits, the ridge baseline, the tests), the recipe of ``tune_configs/brain_age.yaml``; one line per cohort:
the CNN's and the ridge baseline's pooled held-out MAE with their intervals, the CNN's MAE as a share of the
baseline's (the issue's bar: at most 1.05), Pearson r, the test against chance, the paired test, the finding,
the spread of the brain-age gap before and after its correction, the best map's voxel ROC AUC against the
planted age regions (Grad-CAM, Guided Backprop, Integrated Gradients; the ridge weights beside them), and the wall
time.

    python benchmarks/brain_age.py --effects 0.3 0.15 --subjects 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow

from study.config import parse_config
from study.pipeline import run_study


def study_config(effect: float, seed: int, args: argparse.Namespace, work: Path):
    """The brain-age example's recipe on one cohort of the ladder."""
    cohort = {"label": "age", "task": "regression", "synthetic": {"age_effect": effect}}
    return ladder_config(
        f"brain-age-{effect:g}-{seed}", f"age{effect:g}", cohort, seed, args, work, {"loss": args.loss}
    )


def ladder_config(name: str, folder: str, cohort: dict, seed: int, args: argparse.Namespace, work: Path, train: dict):
    """A ladder's recipe (the examples' in tune_configs/) on one of its synthetic cohorts: ``cohort`` adds the label
    and the planted effect to what every rung shares."""
    synthetic = {"subjects": args.subjects, "voxel_sizes": [2.0, 2.5, 3.0], "seed": seed} | cohort.pop("synthetic")
    root = str(args.cohorts / f"{folder}-n{args.subjects}-seed{seed}")
    return parse_config(
        {
            "name": name,
            "cohort": {"root": root, **cohort, "synthetic": synthetic},
            "preprocess": {"voxel_size": args.voxel_size, "cache_dir": str(args.cohorts / "cache")},
            "cv": {"outer_folds": 3, "inner_folds": 3},
            "model": {"preset": "mrinet", "width": 8},
            "train": {"epochs": args.epochs, **train},
            "resources": {"concurrent_folds": 2},
            "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
            "output_dir": str(work / "runs"),
            "attribution": {
                "methods": ["gradcam", "guided_backprop", "integrated_gradients"],
                "permutations": 200,
                "sanity": {"subjects": 2, "label_randomization": False},
            },
        }
    )


def best_map(metrics: dict[str, float]) -> str:
    """The CNN map whose group mean finds the planted regions best, and its voxel ROC AUC."""
    located = [
        (v, k.removeprefix("localization_roc_auc_"))
        for k, v in metrics.items()
        if k.startswith("localization_roc_auc_") and not k.endswith("linear_baseline")
    ]
    return f"{max(located)[1]} {max(located)[0]:.3f}"


def run_ladder(args: argparse.Namespace, study_row: Callable, header: tuple, setting: str) -> None:
    """One study per effect and seed of ``args``, a line each as it ends; then the ladder's table in markdown,
    under a line that says its setting."""
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for effect in args.effects:
            for seed in args.seeds:
                rows.append(study_row(effect, seed, args, Path(work)))
                print(" | ".join(rows[-1]), flush=True)
    print(f"\n{setting}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def study_row(effect: float, seed: int, args: argparse.Namespace, work: Path) -> tuple:
    """One study of one cohort; its table row."""
    config = study_config(effect, seed, args, work)
    started = time.perf_counter()
    run_id = run_study(config)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    located = best_map(m)

    def interval(name: str) -> str:
        return f"{m[name]:.2f} [{m[name + '_ci_low']:.2f}, {m[name + '_ci_high']:.2f}]"

    return (
        f"{effect:g}",
        str(seed),
        interval("pooled_mae"),
        interval("baseline_pooled_mae"),
        f"{m['pooled_mae'] / m['baseline_pooled_mae']:.3f}",
        f"{m['pooled_r']:.3f}",
        f"{m['pooled_mae_p_vs_chance']:.4f}",
        f"{m['cnn_minus_baseline_p']:.3f}",
        run.data.tags["study.finding"],
        f"{m['gap_sd']:.2f} -> {m['corrected_gap_sd']:.2f}",
        located,
        f"{m.get('localization_roc_auc_linear_baseline', float('nan')):.3f}",
        f"{time.perf_counter() - started:.0f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--effects", type=float, nargs="+", default=[0.3, 0.15], help="age effects (default 0.3 0.15)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="the cohorts' seeds (default 1)")
    parser.add_argument("--subjects", type=int, default=400, help="subjects per cohort (default 400)")
    parser.add_argument("--epochs", type=int, default=30, help="the example's budget (default 30)")
    parser.add_argument("--loss", choices=["l1", "huber"], default="l1", help="train.loss (default l1)")
    parser.add_argument("--voxel-size", type=float, default=6.0, help="study grid (default 6 mm)")
    parser.add_argument("--cohorts", type=Path, default=Path("study_data/brain_age"), help="where cohorts are made")
    args = parser.parse_args()
    header = (
        "age effect",
        "seed",
        "CNN MAE [95% CI]",
        "ridge MAE [95% CI]",
        "CNN / ridge",
        "CNN r",
        "p vs chance",
        "p CNN - ridge",
        "finding",
        "gap sd (corrected)",
        "best CNN map (voxel ROC AUC)",
        "ridge weights (voxel ROC AUC)",
        "seconds",
    )
    setting = f"{args.subjects} subjects, {args.voxel_size:g} mm, {args.epochs} epochs, train.loss {args.loss}"
    run_ladder(args, study_row, header, setting)


if __name__ == "__main__":
    main()
