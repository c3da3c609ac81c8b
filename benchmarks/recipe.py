"""What each default of the training recipe costs: CNN vs linear AUC on a cohort that is hard like real data.

Synthesizes (once) a cohort with effects near the noise level and large
nuisance variation (the generator's defaults: a linear model reaches AUC about
0.9 at 200 subjects), then runs the real study (`run_study`: Ray Train, refit,
the linear baseline; no maps) once per recipe and prints, per recipe: the
CNN's pooled held-out ROC AUC with its DeLong interval, the linear baseline's,
how well the final models fit their own training subjects, and the
training and wall time. Every recipe is the default recipe with one change, so
each row says what that default buys.

    python benchmarks/recipe.py                      # all recipes, 200 subjects, 3 folds, 4 mm
    python benchmarks/recipe.py --recipes default no_augmentation --subjects 120
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow

from study.config import parse_config
from study.pipeline import run_study

RECIPES: dict[str, dict] = {
    "default": {},
    "no_augmentation": {"train": {"augment": {"rotation_deg": 0, "translation_mm": 0, "scaling": 0, "intensity": 0}}},
    "early_stopped (epochs chosen on the inner split)": {"train": {"final_fit": "early_stopped"}},
    "inner_split (2/3 of the training subjects)": {"train": {"final_fit": "inner_split"}},
    "no_warmup": {"train": {"warmup_epochs": 0}},
    "cosine decay after the warm-up": {"train": {"schedule": "cosine"}},
    "no_clipping": {"train": {"clip_grad_norm": None}},
    "no_dropout": {"model": {"dropout": 0.0}},
    "lr_3e-4": {"train": {"lr": 3e-4}},
    "epochs_20": {"train": {"epochs": 20}},
    "batch_4": {"train": {"batch_size": 4}},
    "width_16": {"model": {"width": 16}},
    "previous demo recipe": {"train": {"final_fit": "inner_split", "schedule": "constant", "warmup_epochs": 0, "clip_grad_norm": None,
                                       "batch_size": 4, "lr": 1e-3, "epochs": 15, "patience": 5,
                                       "augment": {"rotation_deg": 3, "translation_mm": 3, "scaling": 0.03,
                                                   "intensity": 0.1}}},
}


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="RECIPE")
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--voxel-size", type=float, default=4.0, help="study grid (default 4 mm: 46 x 55 x 46)")
    parser.add_argument("--width", type=int, default=8, help="MriNet's first-block channels (default 8)")
    parser.add_argument("--cohort", type=Path, default=Path("study_data/recipe_cohort"),
                        help="where the cohort is generated once (default study_data/recipe_cohort)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recipe-"))
    base = {
        "name": "recipe", "cohort": {"root": str(args.cohort.resolve()), "synthetic": {
            "subjects": args.subjects, "voxel_sizes": [2.0, 2.5, 3.0], "seed": 1}},
        "preprocess": {"voxel_size": args.voxel_size, "cache_dir": str(args.cohort.resolve().parent / "cache")},
        "cv": {"outer_folds": args.folds, "inner_folds": 3},
        "model": {"preset": "mrinet", "width": args.width},
        "resources": {"concurrent_folds": 2},
        "tracking": {"uri": f"sqlite:///{work}/mlflow.db"},
        "output_dir": str(work / "runs"),
        "attribution": None,
    }
    rows = []
    for name in args.recipes:
        config = parse_config(merged(base, {"name": name.split(" ")[0], **RECIPES[name]}))
        started = time.perf_counter()
        run_id = run_study(config)
        wall = time.perf_counter() - started
        mlflow.set_tracking_uri(config.tracking.uri)
        run = mlflow.get_run(run_id)
        m = run.data.metrics
        folds = [r for r in mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                               filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
                 if r.data.tags.get("study.level") == "fold"]
        fit = sum(f.data.metrics.get("fit_accuracy", float("nan")) for f in folds) / len(folds)
        rows.append((name, f"{m['pooled_roc_auc']:.3f} [{m['pooled_roc_auc_ci_low']:.3f}, "
                           f"{m['pooled_roc_auc_ci_high']:.3f}]", f"{m['baseline_pooled_roc_auc']:.3f}",
                     f"{m['cnn_minus_baseline_roc_auc']:+.3f}", f"{fit:.2f}", run.data.tags["study.finding"],
                     f"{m.get('time_training_s', 0):.0f}", f"{wall:.0f}"))
        print(" | ".join(rows[-1]), flush=True)
    header = ("recipe", "CNN AUC [95% CI]", "linear AUC", "CNN - linear", "fit acc.", "finding", "train s", "wall s")
    print(f"\n{args.subjects} subjects, {args.folds} outer folds, {args.voxel_size:g} mm grid, MriNet width "
          f"{args.width}, 2 concurrent folds; results in {work}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
