"""Several classes: does the CNN tell three classes apart as well as a multinomial logistic regression on the same
voxels, on a ladder of synthetic cohorts?

Each cohort is ``study synth --group-effect F`` (a column ``group`` of control, subtype_a and subtype_b, a third
each; each subtype loses F of volume and intensity in regions of its own, placed at random by the seed). One whole
study per cohort (``run_study``: Ray Train, the final fits, the baseline, the tests), the recipe of
``tune_configs/subtypes.yaml``; one line per cohort: the CNN's and the baseline's pooled held-out macro one-vs-rest
ROC AUC with their intervals, their difference (the issue's bar: at least -0.05), the CNN's balanced accuracy, the
test against chance, the paired test, the finding, the best map's voxel ROC AUC against all subtypes' planted
regions (Grad-CAM, Guided Backprop, Integrated Gradients, each explaining the subject's own class; the baseline's
weights beside them), each class's test against the rest scored against its own regions (per method, the share of
the top 1% of |t| of that class's test inside the class's planted regions, averaged over the classes; control's
regions are every subtype's: it differs from the rest where they lose volume), and the wall time.

    python benchmarks/subtypes.py --effects 0.3 0.15 --subjects 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
from brain_age import best_map, ladder_config, run_ladder
from nilearn.image import resample_to_img

from study.data.bids import ground_truth_dir
from study.pipeline import run_study

CLASSES = ["control", "subtype_a", "subtype_b"]


def study_config(effect: float, seed: int, args: argparse.Namespace, work: Path):
    """The subtypes example's recipe on one cohort of the ladder."""
    cohort = {"label": "group", "classes": CLASSES, "synthetic": {"group_effect": effect}}
    return ladder_config(f"subtypes-{effect:g}-{seed}", f"group{effect:g}", cohort, seed, args, work, {})


def class_tests(run_id: str, root: Path, methods: list[str], work: Path) -> str:
    """Each class's test against the rest scored against the class's own planted regions, per method: the share
    of the top 1% of |t| (over the voxels tested) inside them, averaged over the classes, and that share's chance
    (the regions' share of the voxels), e.g. ``integrated_gradients 0.29, gradcam 0.03 (chance 0.015)``."""
    truth = ground_truth_dir(root)
    regions = nib.load(truth / "group_regions.nii.gz")
    per_subtype = len(json.loads((truth / "planted.json").read_text())["group_regions"]) // (len(CLASSES) - 1)
    shares, chance = {m: [] for m in methods}, []
    for method in methods:
        for k, name in enumerate(CLASSES):
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"maps/{method}/{method}_t_{name}_minus_rest.nii.gz", dst_path=str(work)
            )
            t = nib.load(path).get_fdata()
            labels = resample_to_img(regions, nib.load(path), "nearest", force_resample=True, copy_header=True)
            labels = labels.get_fdata()
            first, last = (
                (1, per_subtype * (len(CLASSES) - 1)) if k == 0 else (per_subtype * (k - 1) + 1, per_subtype * k)
            )
            own = ((labels >= first) & (labels <= last))[t != 0]  # control's: every subtype's regions
            strength = np.abs(t[t != 0])
            top = np.argsort(-strength)[: max(1, round(0.01 * strength.size))]
            shares[method].append(own[top].mean())
            chance.append(own.mean())
    listed = ", ".join(f"{m} {np.mean(v):.2f}" for m, v in shares.items())
    return f"{listed} (chance {np.mean(chance):.3f})"


def study_row(effect: float, seed: int, args: argparse.Namespace, work: Path) -> tuple:
    """One study of one cohort; its table row."""
    config = study_config(effect, seed, args, work)
    started = time.perf_counter()
    run_id = run_study(config)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_id)
    m = run.data.metrics

    def interval(name: str) -> str:
        return f"{m[name]:.3f} [{m[name + '_ci_low']:.3f}, {m[name + '_ci_high']:.3f}]"

    return (
        f"{effect:g}",
        str(seed),
        interval("pooled_roc_auc"),
        interval("baseline_pooled_roc_auc"),
        f"{m['cnn_minus_baseline_roc_auc']:+.3f}",
        f"{m['pooled_balanced_accuracy']:.3f}",
        f"{m['pooled_roc_auc_p_vs_chance']:.4f}",
        f"{m['cnn_minus_baseline_p']:.3f}",
        run.data.tags["study.finding"],
        best_map(m),
        f"{m.get('localization_roc_auc_linear_baseline', float('nan')):.3f}",
        class_tests(run_id, config.cohort.root, list(config.attribution.methods), work / run_id),
        f"{time.perf_counter() - started:.0f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--effects", type=float, nargs="+", default=[0.3, 0.15], help="group effects (default 0.3 0.15)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="the cohorts' seeds (default 1)")
    parser.add_argument("--subjects", type=int, default=400, help="subjects per cohort (default 400)")
    parser.add_argument("--epochs", type=int, default=30, help="the example's budget (default 30)")
    parser.add_argument("--voxel-size", type=float, default=6.0, help="study grid (default 6 mm)")
    parser.add_argument("--cohorts", type=Path, default=Path("study_data/subtypes"), help="where cohorts are made")
    args = parser.parse_args()
    header = (
        "group effect",
        "seed",
        "CNN macro AUC [95% CI]",
        "baseline macro AUC [95% CI]",
        "CNN - baseline",
        "CNN balanced accuracy",
        "p vs chance",
        "p CNN - baseline",
        "finding",
        "best CNN map (voxel ROC AUC)",
        "baseline weights (voxel ROC AUC)",
        "each class vs the rest: top 1% of |t| in its regions",
        "seconds",
    )
    run_ladder(args, study_row, header, f"{args.subjects} subjects, {args.voxel_size:g} mm, {args.epochs} epochs")


if __name__ == "__main__":
    main()
