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
}


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(
    name: str, change: dict, cohort: Path, subjects: int, effect: float, args: argparse.Namespace, work: Path
) -> tuple[str, ...]:
    """One study of the recipe on one rung; its table row."""
    base = {
        "name": f"recipe-{subjects}-{effect:g}",
        "cohort": {
            "root": str(cohort),
            "synthetic": {
                "subjects": subjects,
                "voxel_sizes": [2.0, 2.5, 3.0],
                "effect_size": effect,
                "seed": args.seed,
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
    return (
        name,
        f"{effect:g}",
        str(subjects),
        f"{m['pooled_roc_auc']:.3f} [{m['pooled_roc_auc_ci_low']:.3f}, {m['pooled_roc_auc_ci_high']:.3f}]",
        f"{m['baseline_pooled_roc_auc']:.3f}",
        f"{m['cnn_minus_baseline_roc_auc']:+.3f}",
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
    parser.add_argument("--seed", type=int, default=7, help="the cohorts' seed (default 7)")
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
        "CNN AUC [95% CI]",
        "linear AUC",
        "CNN - linear",
        "fit acc.",
        "finding",
        "train s",
        "wall s",
    )
    rows = []
    for effect in args.effects:
        for subjects in args.subjects:
            cohort = args.cohorts / f"effect{effect:g}-n{subjects}-seed{args.seed}"
            for name in args.recipes:
                rows.append(run(name, RECIPES[name], cohort, subjects, effect, args, work))
                print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.folds} outer folds, {args.voxel_size:g} mm grid, MriNet width {args.width}, {args.epochs} epochs, "
        f"2 concurrent folds; cohorts seed {args.seed}; results in {work}"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
