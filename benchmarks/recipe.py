"""What the training recipe learns on a difficulty ladder of synthetic cohorts: CNN vs linear AUC per rung.

Each rung is a cohort of the generator (effects near the noise level, large
nuisance variation, a distractor region, families, mixed voxel sizes and
orientations) whose planted effect is scaled so that the study's linear baseline
reaches about 0.65, 0.75, 0.85 and 0.95 ROC AUC at 400 subjects; each at 200 and
400 subjects. Cohorts are generated once under ``--cohorts``. For each recipe
and rung, the real study runs (``run_study``: Ray Train, the final fits, the
linear baseline in the same folds; no maps) and one line is printed: the CNN's
pooled held-out ROC AUC with its DeLong interval, the linear baseline's, their
difference, how well the final models fit their own training subjects (mean
over folds), the verdict and the times. Every recipe is the default recipe with
one change, so each row says what that change does.

    python benchmarks/recipe.py    # the default recipe on every rung (about an hour on 2 cores)
    python benchmarks/recipe.py --recipes default "dropout 0.5" --effects 0.05 --subjects 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from study.config import parse_config
from study.pipeline import run_study

# The generator's effect_size of each rung; the linear baseline's AUC at 400 subjects (fold 0, 4 mm) was
# 0.667 at 0.03 and 0.854 at 0.05, and 0.986 at 0.08.
LADDER = (0.03, 0.04, 0.05, 0.065)
SUBJECTS = (200, 400)

RECIPES: dict[str, dict] = {
    "default": {},
    "dropout 0.5 (the default before the ladder)": {"model": {"dropout": 0.5}},
    "no_augmentation": {"train": {"augment": {"strength": 0}}},
    "instance norm": {"model": {"norm": "instance"}},
    "lr_3e-4": {"train": {"lr": 3e-4}},
    "epochs_20": {"train": {"epochs": 20}},
    "batch_4": {"train": {"batch_size": 4}},
    "cosine schedule": {"train": {"schedule": "cosine"}},
    "no calibration": {"train": {"calibration": "none"}},
    "temperature on the inner split": {"train": {"calibration": "temperature"}},
    # The same recipe from other initial weights and batch orders: how far fold ROC AUCs spread over trainings.
    "training seed 1": {"train": {"seed": 1}},
    "training seed 2": {"train": {"seed": 2}},
}


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def calibration_columns(predictions: pd.DataFrame) -> tuple[str, ...]:
    """From a study's pooled held-out predictions (fold, sex, p_male): the fold mean ROC AUC, pooled minus fold
    mean, the worst fold's gap between the share predicted male and the share that is, and the pooled Brier score
    (issue 38: folds shifted to one class lose pooled AUC)."""
    male = (predictions["sex"] == "male").to_numpy()
    p = predictions["p_male"].to_numpy()
    pooled = roc_auc_score(male, p)
    folds = [
        (roc_auc_score(male[i], p[i]), abs(np.mean(p[i] >= 0.5) - np.mean(male[i]))) for i in _fold_rows(predictions)
    ]
    mean = float(np.mean([auc for auc, _ in folds]))
    return (
        f"{mean:.3f}",
        f"{pooled - mean:+.3f}",
        f"{max(gap for _, gap in folds):.0%}",
        f"{np.mean((p - male) ** 2):.3f}",
    )


def _fold_rows(predictions: pd.DataFrame) -> list[np.ndarray]:
    return [np.flatnonzero(predictions["fold"].to_numpy() == f) for f in sorted(predictions["fold"].unique())]


def run(
    name: str, change: dict, cohort: Path, subjects: int, effect: float, args: argparse.Namespace, work: Path
) -> tuple[str, ...]:
    """One study of the recipe on one rung; its table row."""
    cohort_seed = int(cohort.name.rsplit("seed", 1)[1])
    base = {
        "name": f"recipe-{subjects}-{effect:g}",
        "cohort": {
            "root": str(cohort),
            "synthetic": {
                "subjects": subjects,
                "voxel_sizes": [2.0, 2.5, 3.0],
                "effect_size": effect,
                "regions": args.regions,
                "seed": cohort_seed,
            },
        },
        "preprocess": {"voxel_size": args.voxel_size, "cache_dir": str(args.cohorts / "cache")},
        "cv": {"outer_folds": args.folds, "inner_folds": 3},
        "model": {"preset": "mrinet", "width": args.width},
        "train": {"epochs": args.epochs},
        "resources": {"concurrent_folds": 2},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
        "output_dir": str(work / "runs"),
        "attribution": None,
    }
    config = parse_config(merged(base, change))
    started = time.perf_counter()
    run_id = run_study(config)
    wall = time.perf_counter() - started
    mlflow.set_tracking_uri(config.tracking.uri)
    parent = mlflow.get_run(run_id)
    m = parent.data.metrics
    folds = [
        r
        for r in mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            output_format="list",
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
        if r.data.tags.get("study.level") == "fold"
    ]
    fit = sum(f.data.metrics.get("fit_accuracy", float("nan")) for f in folds) / len(folds)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.tsv", dst_path=str(work))
    return (
        name,
        f"{effect:g}",
        str(subjects),
        str(cohort_seed),
        f"{m['pooled_roc_auc']:.3f} [{m['pooled_roc_auc_ci_low']:.3f}, {m['pooled_roc_auc_ci_high']:.3f}]",
        f"{m['baseline_pooled_roc_auc']:.3f}",
        f"{m['cnn_minus_baseline_roc_auc']:+.3f}",
        *calibration_columns(pd.read_csv(path, sep="\t")),
        f"{fit:.2f}",
        parent.data.tags["study.finding"],
        f"{m.get('time_training_s', 0):.0f}",
        f"{wall:.0f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["default"],
        choices=list(RECIPES),
        metavar="RECIPE",
        help=f"recipes to run (default: default); any of: {', '.join(RECIPES)}",
    )
    parser.add_argument(
        "--effects",
        nargs="+",
        type=float,
        default=list(LADDER),
        help=f"the rungs' effect sizes (default {' '.join(map(str, LADDER))})",
    )
    parser.add_argument("--subjects", nargs="+", type=int, default=list(SUBJECTS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="the demo's budget (default 30)")
    parser.add_argument("--voxel-size", type=float, default=4.0, help="study grid (default 4 mm: 46 x 55 x 46)")
    parser.add_argument("--width", type=int, default=8, help="MriNet's first-block channels (default 8, the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7], help="the cohorts' seeds (default 7)")
    parser.add_argument("--regions", type=int, default=3, help="planted regions per cohort (default 3)")
    parser.add_argument(
        "--cohorts",
        type=Path,
        default=Path("study_data/ladder"),
        help="where the cohorts are generated once (default study_data/ladder)",
    )
    args = parser.parse_args()
    args.cohorts = args.cohorts.resolve()
    work = Path(tempfile.mkdtemp(prefix="recipe-"))
    header = (
        "recipe",
        "effect",
        "subjects",
        "cohort seed",
        "CNN AUC [95% CI]",
        "linear AUC",
        "CNN - linear",
        "CNN fold mean AUC",
        "pooled - fold mean",
        "worst fold's share gap",
        "Brier",
        "fit acc.",
        "finding",
        "train s",
        "wall s",
    )
    rows = []
    for effect in args.effects:
        for subjects in args.subjects:
            for seed in args.seeds:
                cohort = args.cohorts / f"effect{effect:g}-n{subjects}-regions{args.regions}-seed{seed}"
                for name in args.recipes:
                    rows.append(run(name, RECIPES[name], cohort, subjects, effect, args, work))
                    print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.folds} outer folds, {args.voxel_size:g} mm grid, MriNet width {args.width}, {args.epochs} epochs, "
        f"2 concurrent folds; {args.regions} planted regions; results in {work}"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
