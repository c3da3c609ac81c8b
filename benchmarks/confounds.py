"""Does the verdict tell a brain difference from a confound? The confound tests, then whole studies.

``--tests``: the full and partial confound tests on simulated predictions (labels, a confound that goes with
them, predictions made of label and confound signal), side by side with ``mlconfound`` 0.21.3 when it imports
(its p values and time), and the rate at which a model of the confound alone is called "beyond the
confounds" over many seeds (the false-positive rate; cheap: the tests run on predictions).

``--studies``: the real study (``run_study``: Ray Train, the final fits, the linear baseline, the confound
check; Guided Backprop, Integrated Gradients and Grad-CAM maps) on cohorts of ``study synth`` with a planted
scanner or head-size confound, without and with a sex effect, ``cohort.confounds: [site, tiv]``; one line
per cohort: the confounds alone, the linear baseline, the CNN, its confound tests, the finding and the best
map's voxel ROC AUC against the planted effect. ``--adjust residualize combat``: each cohort once per
adjustment of the images (``cv.adjust``).

``--images``: what is left of the confound in the adjusted images, without training a CNN: on the same
cohorts and folds, a linear classifier (l2 logistic regression on the brain voxels) of the site, or of sex,
fitted on each fold's adjusted training subjects and scored on its adjusted held-out subjects (ROC AUC per
fold), for each adjustment; then the same on simulated voxels (3,000 independent Gaussian features, 160
subjects in two sites at random, 107 training and 53 held out) with no site effect, a shift, and a shift and a
scale.

    python benchmarks/confounds.py --tests
    python benchmarks/confounds.py --studies --seeds 1 2 --adjust none combat
    python benchmarks/confounds.py --images --seeds 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from study.config import parse_config
from study.pipeline import run_study
from study.training.confounds import full_confound_test, partial_confound_test

# (name, sex effect, site confound, TIV confound): the confound-only cohorts and the ones with a real effect.
COHORTS = (
    ("scanner only", 0.0, 0.6, 0.0),
    ("head size only", 0.0, 0.0, 0.12),
    ("effect + scanner", 0.1, 0.6, 0.0),
    ("effect + head size", 0.1, 0.0, 0.12),
)


def simulated(n: int, seed: int, label: float, confound: float) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Labels, a numeric confound shifted by the label, and predictions of ``label`` x label + ``confound`` x
    confound + noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    c = y + rng.normal(size=n)
    return y, label * y + confound * c + rng.normal(size=n), pd.DataFrame({"tiv": c})


def tests(args: argparse.Namespace) -> None:
    try:
        from mlconfound.stats import full_confound_test as reference_full
        from mlconfound.stats import partial_confound_test as reference_partial
    except ImportError as err:
        print(f"mlconfound does not import here ({err}); only this project's tests")
        reference_full = reference_partial = None
    print(
        "| sample (n=300) | full p | partial p | s | mlconfound full p | partial p | s |\n|---|---|---|---|---|---|---|"
    )
    for name, label, confound in [("confound only", 0, 1), ("label only", 1, 0), ("both", 0.5, 1), ("neither", 0, 0)]:
        y, yhat, table = simulated(300, 1, label, confound)
        started = time.perf_counter()
        ours = full_confound_test(y, yhat, table, 1000, 1).p, partial_confound_test(y, yhat, table, 1000, 1).p
        row = [name, f"{ours[0]:.3f}", f"{ours[1]:.3f}", f"{time.perf_counter() - started:.1f}"]
        if reference_full is not None:
            started = time.perf_counter()
            options = {"cat_y": True, "num_perms": 1000, "random_state": 1, "progress": False, "n_jobs": 1}
            full = reference_full(y, yhat, table.tiv.to_numpy(), cond_dist_method="linear", **options).p
            partial = reference_partial(y, yhat, table.tiv.to_numpy(), cond_dist_method="linear", **options).p
            row += [f"{full:.3f}", f"{partial:.3f}", f"{time.perf_counter() - started:.1f}"]
        print("| " + " | ".join(row) + " |")
    print("\nfalse-positive rate of 'beyond the confounds' (full test p < 0.05) on confound-only predictions")
    print("| subjects | samples | rate | power with label signal 0.5 |\n|---|---|---|---|")
    for n in (150, 400):
        rate = np.mean([full_confound_test(*simulated(n, s, 0, 2), 500, s).p < 0.05 for s in range(args.samples)])
        power = np.mean([full_confound_test(*simulated(n, s, 0.5, 2), 500, s).p < 0.05 for s in range(50)])
        print(f"| {n} | {args.samples} | {rate:.3f} | {power:.2f} |", flush=True)


def study_config(name: str, effect: float, site: float, tiv: float, seed: int, adjust: str, args, work: Path):
    """The demo's recipe on one confounded cohort, adjusted as ``adjust`` says."""
    confounds = [c for c, planted in (("site", site), ("tiv", tiv)) if planted]
    return parse_config(
        {
            "name": f"confounds-{name.replace(' ', '-').replace('+', 'and')}-{seed}-{adjust}",
            "cohort": {
                "root": str(args.cohorts / f"{name.replace(' ', '_')}-seed{seed}"),
                "confounds": confounds,
                "synthetic": {
                    "subjects": args.subjects,
                    "voxel_sizes": [2.0, 2.5, 3.0],
                    "effect_size": effect,
                    "site_confound": site,
                    "tiv_confound": tiv,
                    "seed": seed,
                },
            },
            "preprocess": {"voxel_size": args.voxel_size, "cache_dir": str(args.cohorts / "cache")},
            "cv": {"outer_folds": 3, "inner_folds": 3, "adjust": adjust},
            "model": {"preset": "mrinet", "width": 8},
            "train": {"epochs": args.epochs},
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


def study_row(name: str, effect: float, site: float, tiv: float, seed: int, adjust: str, args, work: Path) -> tuple:
    """One study of one cohort; its table row."""
    config = study_config(name, effect, site, tiv, seed, adjust, args, work)
    started = time.perf_counter()
    run_id = run_study(config)
    mlflow.set_tracking_uri(config.tracking.uri)
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    located = [
        (v, k.removeprefix("localization_roc_auc_"))
        for k, v in m.items()
        if k.startswith("localization_roc_auc_") and not k.endswith("linear_baseline")
    ]
    best = f"{max(located)[1]} {max(located)[0]:.3f}" if located else ""  # no planted effect: nothing to find
    return (
        name,
        str(seed),
        adjust,
        f"{m['confounds_pooled_roc_auc']:.3f}",
        f"{m['baseline_pooled_roc_auc']:.3f}",
        f"{m['pooled_roc_auc']:.3f} [{m['pooled_roc_auc_ci_low']:.3f}, {m['pooled_roc_auc_ci_high']:.3f}]",
        f"{m['full_confound_test_p']:.3f}",
        f"{m['partial_confound_test_p']:.3f}",
        f"{m['baseline_full_confound_test_p']:.3f}",
        run.data.tags["study.finding"],
        best,
        f"{time.perf_counter() - started:.0f}",
    )


def image_rows(name: str, effect: float, site: float, tiv: float, seed: int, args, work: Path) -> list[tuple]:
    """Per adjustment: ROC AUC per fold of a linear classifier of the site (the planted confound, when it is the
    scanner) and of sex on the adjusted voxels of one cohort, in the study's folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from study.data.prepare import make_or_load_splits, prepare_cohort
    from study.state import Study
    from study.tasks import map_in_process

    rows = []
    for adjust in ("none", "residualize", "combat") if site else ("none", "residualize"):
        config = study_config(name, effect, site, tiv, seed, adjust, args, work)
        prepared = prepare_cohort(config.cohort, config.preprocess, map_in_process)
        folds = make_or_load_splits(config.cv, prepared.cohort, work / f"splits-{name}-{seed}.json")
        study = Study(config, prepared.cohort, prepared.cache, [], folds, None, False, work, str(work))
        targets = {"sex": lambda ids: study.labels(ids)}
        if site:
            targets["site"] = lambda ids: (prepared.cohort.confound_table(ids).site == "B").to_numpy(int)
        scores = {target: [] for target in targets}
        for fold in folds:
            cache = study.fold_cache(fold.fold)
            train, test = (cache.brain_voxels(ids, study.brain) for ids in (fold.train, fold.test))
            for target, of in targets.items():
                model = LogisticRegression(C=1.0, max_iter=3000).fit(train, of(fold.train))
                scores[target].append(roc_auc_score(of(fold.test), model.decision_function(test)))
        rows.append(
            (name, str(seed), adjust, *[", ".join(f"{a:.2f}" for a in scores.get(t, [])) for t in ("site", "sex")])
        )
    return rows


def simulated_rows(repeats: int = 4) -> list[tuple]:
    """ROC AUC of a linear classifier of the site on simulated voxels, adjusted as in a fold (mean over repeats)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from study.data.adjustment import fit_adjustment

    rng, rows = np.random.default_rng(0), []
    for name, shift, scale in (("no site effect", 0.0, 1.0), ("B shifted", 0.3, 1.0), ("B shifted, x1.5", 0.3, 1.5)):
        for adjust in ("none", "residualize", "combat"):
            aucs = []
            for _ in range(repeats):
                site = np.where(rng.random(160) < 0.5, "B", "A")
                x = rng.normal(size=(160, 3000))
                x[site == "B"] = x[site == "B"] * scale + rng.normal(shift, 0.2, 3000) * (shift != 0)
                table, y, train = pd.DataFrame({"site": site}), (site == "B").astype(int), np.arange(107)
                if adjust != "none":
                    x = fit_adjustment(adjust, x[train], table.iloc[train], np.ones(3000, bool)).apply(x, table)
                model = LogisticRegression(C=1.0, max_iter=3000).fit(x[train], y[train])
                aucs.append(roc_auc_score(y[107:], model.decision_function(x[107:])))
            rows.append((f"simulated: {name}", "-", adjust, ", ".join(f"{a:.2f}" for a in aucs), ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", action="store_true", help="the confound tests on simulated predictions")
    parser.add_argument("--samples", type=int, default=200, help="samples of the false-positive rate (default 200)")
    parser.add_argument("--studies", action="store_true", help="whole studies on confounded synthetic cohorts")
    parser.add_argument("--adjust", nargs="+", default=["none"], help="cv.adjust of each study (default none)")
    parser.add_argument("--images", action="store_true", help="the confound left in the adjusted images")
    parser.add_argument("--cohorts-only", nargs="+", choices=[c[0] for c in COHORTS], help="only these cohorts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="the cohorts' seeds (default 1)")
    parser.add_argument("--subjects", type=int, default=160, help="subjects per cohort (default 160)")
    parser.add_argument("--epochs", type=int, default=30, help="the demo's budget (default 30)")
    parser.add_argument("--voxel-size", type=float, default=4.0, help="study grid (default 4 mm)")
    parser.add_argument("--cohorts", type=Path, default=Path("study_data/confounds"), help="where cohorts are made")
    args = parser.parse_args()
    if args.tests:
        tests(args)
    args.cohorts = args.cohorts.resolve()
    work = Path(tempfile.mkdtemp(prefix="confounds-"))
    cohorts = [c for c in COHORTS if not args.cohorts_only or c[0] in args.cohorts_only]
    if args.images:
        rows = [row for seed in args.seeds for cohort in cohorts for row in image_rows(*cohort, seed, args, work)]
        rows += simulated_rows()
        print(f"\n{args.subjects} subjects, {args.voxel_size:g} mm; ROC AUC per outer fold, on its held-out subjects")
        print("| cohort | seed | cv.adjust | linear model of the site | of sex |\n|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    if args.studies:
        header = ("cohort", "seed", "cv.adjust", "confounds alone", "linear", "CNN [95% CI]", "full p", "partial p")
        header += ("linear full p", "finding", "best CNN map (voxel AUC)", "wall s")
        rows = []
        for seed in args.seeds:
            for cohort in cohorts:
                for adjust in args.adjust:
                    rows.append(study_row(*cohort, seed, adjust, args, work))
                    print(" | ".join(rows[-1]), flush=True)
        print(f"\n{args.subjects} subjects, {args.voxel_size:g} mm, MriNet width 8, {args.epochs} epochs; in {work}")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
