"""The attribution stage published: maps as NIfTI, tables, figures, report sections and a console summary."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from study.attribution.analysis import AttributionResult
from study.attribution.methods import LINEAR_BASELINE, METHODS
from study.attribution.methods import title as method_title
from study.attribution.sanity import DELETED_SHARE, FLAG_DELETION_P, FLAG_SPEARMAN, RANDOM_BLOB_MM
from study.attribution.stats import PermutationTest
from study.config import AttributionConfig
from study.data.cohort import Classes
from study.output.console import say
from study.output.figures import agreement_figure, brain_figure, sanity_figure
from study.output.report import Report
from study.output.tracking import Tracker
from study.state import Study
from study.training.evaluation import Evaluation, format_p

TARGETS = {
    "contrast": "the {contrast} logit",
    "true_class": "each subject's true {column}'s logit",
    "predicted_class": "each subject's predicted {column}'s logit",
}  # formatted with the study's Classes


def publish_attribution(
    tracker: Tracker, report: Report, study: Study, result: AttributionResult, evaluation: Evaluation
) -> None:
    """Maps as NIfTI (study and fold runs), tables, figures, report sections and a console summary."""
    attribution, parent = study.config.attribution, study.state.parent_run
    if attribution.subject_nifti:
        _subject_maps(result, study.directory / "maps" / "subjects")
    figures, region_tables = [], []
    beside: dict[str, tuple[str, Figure]] = {}  # each method's main map, for the CNN-beside-linear section
    classes = study.cohort.classes
    target = TARGETS[result.target].format(contrast=classes.contrast, column=classes.column)
    deletion = {"cohort_mean": "towards the cohort's mean", "blur": "by blurring"}[
        (study.config.attribution or AttributionConfig()).perturbation.reference
    ]

    def explains(method: str) -> str:
        """What one method's maps show of the target, for its captions."""
        if result.target != "contrast":
            return target
        return METHODS[method].shows.format(target=target, deletion=deletion)

    with tempfile.TemporaryDirectory() as tmp:

        def log_map(run_id: str, values: np.ndarray, name: str, method: str) -> None:
            path = Path(tmp) / run_id / f"{name}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(_image(result, values), path)
            tracker.log_file(run_id, path, f"maps/{method}")

        for method, maps in result.maps.items():
            title = method_title(method)
            if method == LINEAR_BASELINE:  # one map per fold model, the same for every subject
                log_map(parent, maps.group["mean_all"], f"{method}_mean_all", method)
                figures.append(
                    (
                        f"{title}: |weights| on standardized voxels, mean over folds (top 10% of voxels)",
                        brain_figure(_image(result, maps.group["mean_all"]), title, "glass"),
                    )
                )
                if maps.test is not None:
                    figures.append(_weight_test(tracker, parent, maps.test, result, classes, log_map))
                    beside[method] = figures[-1]
                for kind, table in maps.regions.items():
                    tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
                    region_tables.append((f"{title}: regions ({kind})", table.head(15)))
                continue
            for name, values in maps.group.items():
                log_map(parent, values, f"{method}_{name}", method)
            for fold, group in maps.per_fold.items():
                for name, values in group.items():
                    log_map(study.state.fold_runs[fold], values, f"fold{fold}_{method}_{name}", method)
            figures += [
                (
                    f"{title}: mean map, all held-out subjects (top 10% of voxels); explains {explains(method)}",
                    brain_figure(_image(result, maps.group["mean_all"]), f"{title} (n={result.subjects})", "glass"),
                ),
                *[
                    (
                        f"{title}: mean map, {name}; explains {explains(method)}",
                        brain_figure(_image(result, maps.group[f"mean_{name}"]), f"{title}, {name}"),
                    )
                    for name in reversed(classes.names)
                    if f"mean_{name}" in maps.group
                ],
            ]
            beside[method] = next(f for f in figures if f[0].startswith(f"{title}: mean map, all held-out"))
            if maps.test is not None:
                test = maps.test
                log_map(parent, np.nan_to_num(test.t), f"{method}_t_{'_minus_'.join(reversed(classes.names))}", method)
                if test.permutations:
                    log_map(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_p_fwer", method)
                    tested = ~np.isnan(test.p)
                    tracker.log_metrics(
                        parent,
                        {
                            f"test_voxels_fwer05_{method}": float((test.p[tested] < 0.05).sum()),
                            f"test_constant_voxels_{method}": test.constant,
                        },
                    )
                significant = (
                    np.where(test.p < 0.05, np.nan_to_num(test.t), 0) if test.permutations else np.nan_to_num(test.t)
                )
                figures.append(
                    (
                        f"{title}: {classes.contrast} t, FWER p < 0.05 ({test.constant} constant voxels left out)",
                        brain_figure(
                            _image(result, significant),
                            f"{title}: {classes.contrast} (t, p_FWER<0.05)",
                            "glass",
                            symmetric=True,
                        ),
                    )
                )
            for kind, table in maps.regions.items():
                tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
                region_tables.append((f"{title}: regions ({kind})", table.head(15)))
    tracker.log_table(parent, result.agreement, "agreement.tsv")
    local = result.localization
    if len(local):
        tracker.log_table(parent, local, "localization.tsv")
        for row in local.to_dict("records"):
            tracker.log_metrics(
                parent,
                {
                    f"localization_roc_auc_{row['method']}": row["roc_auc_group"],
                    f"localization_top1pct_{row['method']}": row["top1pct_in_effect_group"],
                    f"localization_top1pct_distractor_{row['method']}": row.get(
                        "top1pct_in_distractor_group", float("nan")
                    ),
                },
            )
    tracker.log_table(parent, result.cascade, "sanity/parameter_randomization.tsv")
    if len(result.shuffled):
        tracker.log_table(parent, result.shuffled, "sanity/label_randomization.tsv")
        tracker.log_metrics(parent, {"sanity_shuffled_labels_fit_accuracy": result.shuffled_fit_accuracy})
    deletions = result.deletion_summary
    tracker.log_table(parent, result.deletion, "sanity/deletion.tsv")
    tracker.log_metrics(
        parent,
        {f"deletion_change_{row.method}": row.change_mean for row in deletions.itertuples()}
        | {"deletion_change_random": float(deletions.random_change_mean[deletions.method != LINEAR_BASELINE].mean())},
    )
    tracker.set_tags(
        parent,
        {
            "sanity.flagged": ",".join(result.flagged) or "none",
            "sanity.deletion_flagged": ",".join(result.deletion_flagged) or "none",
        },
    )

    methods = list(result.maps)
    tests = [m.test for name, m in result.maps.items() if m.test is not None and name != LINEAR_BASELINE]
    if tests:
        how = (
            f"The t maps show voxels where the maps of {classes.names[1]} and {classes.names[0]} differ "
            f"(Welch t), FWER-corrected by the maximum statistic over {tests[0].permutations} label "
            "permutations within outer folds, exchanging whole families (PALM-style exchangeability blocks); "
            "voxels with the same value in every subject are left out of the test."
        )
    else:
        how = (
            f"No {classes.contrast} test: with target {result.target} the maps of each class explain different "
            "scores, so their difference would be there by construction; set attribution.target: contrast."
        )
    heading = (
        "Where the network looks"
        if evaluation.finding in ("yes", "below_baseline")
        else "Where the network looks: explaining a model that did not learn the task"
    )
    if "gradcam" in result.maps:
        (d, h, w), spacing = result.gradcam_grid
        network = "fold 0's network" if study.config.search else "the network"
        how += (
            f" Grad-CAM shows no detail finer than {network}'s last feature map: {d}x{h}x{w} voxels, one "
            f"every {spacing:.0f} mm on this grid."
        )
    if LINEAR_BASELINE in beside and len(beside) > 1:
        linear = beside.pop(LINEAR_BASELINE)
        if evaluation.finding == "baseline_only":  # the finding to read comes first
            report.add_images(
                "The finding: the linear baseline's weights",
                [linear],
                "Only the linear baseline learned the task (see the banner): its weight map is the "
                "finding. The CNN's maps further down explain a model that learned nothing.",
            )
        else:
            report.add_images(
                "The CNN's maps beside the linear baseline's",
                [*beside.values(), linear],
                f"Where both models look. {evaluation.verdict}",
            )
    report.add_images(
        heading,
        figures,
        f"Every map explains {target}. Normalized maps (each subject scaled to its 99.5th "
        "percentile) averaged over held-out subjects, over the MNI152 template. " + how,
    )
    for heading, table in region_tables:
        report.add_table(heading, table, "Regions ranked by mean normalized attribution over all held-out subjects.")
    if len(local):
        columns = {
            "roc_auc_subject_mean": "voxel AUC, subjects (mean)",
            "roc_auc_group": "voxel AUC, group map",
            "top1pct_in_effect_subject_mean": "top 1% in effect, subjects (mean)",
            "top1pct_in_effect_group": "top 1% in effect, group map",
            "chance_top1pct": "chance",
            "top1pct_in_distractor_group": "top 1% in distractor, group map",
            "chance_distractor": "chance (distractor)",
        }
        shown = local.rename(columns=columns).assign(method=[method_title(m) for m in local.method])
        report.add_table(
            "Ground truth: localization of the planted effect",
            shown,
            "Voxel ROC AUC against the planted effect, the share of the top 1% voxels inside it "
            "(chance: the effect's share of the brain), and the group map's top-1% share in the "
            "distractor, a region that varies whatever the class (chance: its share of the brain; a "
            "method above chance there follows the data, not the model's decision).",
        )
    report.add_images("Method agreement", [("Spearman correlation", agreement_figure(result.agreement, methods))])
    report.add_table("Method agreement (table)", result.agreement)
    flag_note = (
        (
            f"Flagged (Spearman > {FLAG_SPEARMAN} to the original maps after full randomization or "
            f"shuffled-label training): " + ", ".join(method_title(m) for m in result.flagged)
        )
        if result.flagged
        else "No method flagged: every method's maps change when the model or its labels are randomized."
    )
    report.add_images("Sanity checks", [("Cascading randomization", sanity_figure(result.cascade))], flag_note)
    shown = deletions.assign(
        method=[method_title(m) for m in deletions.method],
        p_vs_random=[format_p(p) for p in deletions.p_vs_random],
        beats_random=["yes" if above else "no: flagged" for above in deletions.beats_random],
    ).rename(
        columns={
            "change_mean": "change of p(decision): mean",
            "change_median": "median",
            "random_change_mean": "random blobs: mean",
            "share_above_random": "subjects above random",
            "p_vs_random": "above random",
            "beats_random": f"above random (p < {FLAG_DELETION_P})",
        }
    )
    optimized = (
        " Meaningful Perturbations optimizes this very deletion, so its lead here is expected."
        if "perturbation" in result.maps and attribution.perturbation.reference == "cohort_mean"
        else ""
    )
    report.add_table(
        "Sanity check: deleting what each map marks",
        shown,
        f"For every held-out subject, the {DELETED_SHARE:.0%} of brain voxels that a method's map "
        "ranks highest were replaced by the cohort's mean volume (of all subjects' images) and the "
        "fold's model decided again: the change of the probability of the class it had decided, "
        f"against random blobs of as many brain voxels (noise smoothed by {RANDOM_BLOB_MM:.0f} mm), "
        "in a paired one-sided Wilcoxon test over subjects. A map that explains the model marks "
        "voxels its decision rests on. Methods whose maps move it no more surely than random blobs "
        f"(e.g. of a model that ignores its input): "
        f"{', '.join(method_title(m) for m in result.deletion_flagged) or 'none'}. The check says whether "
        f"a map's top voxels matter to the model, not that the map is complete.{optimized}",
    )
    if len(result.shuffled):
        memorized = (
            "it memorized them"
            if result.shuffled_fit_accuracy >= 0.9
            else "it did not memorize them, so this check is weak: train longer or wider to make it strong"
        )
        report.add_table(
            "Sanity check: model trained on shuffled labels",
            result.shuffled,
            "Similarity of maps from a model trained on shuffled labels to the real maps; high "
            "values mean the method does not depend on what the model learned. The model had the "
            "first fold's architecture, subjects and number of epochs, with every label shuffled; "
            f"its accuracy on its own shuffled labels was {result.shuffled_fit_accuracy:.2f}: "
            f"{memorized}.",
        )

    say("method agreement (Spearman, mean over subjects):")
    for row in result.agreement.itertuples():
        say(f"  {row.method_a:>16} ~ {row.method_b:<16} {row.spearman_subject_mean:.3f}")
    if len(local):
        say("localization of the planted effect (voxel ROC AUC of the group map):")
        for row in local.itertuples():
            say(f"  {row.method:>16} {row.roc_auc_group:.3f}")
    say(
        f"sanity checks: flagged by randomization: {', '.join(result.flagged) or 'none'}; by deletion (no more "
        f"than random blobs): {', '.join(result.deletion_flagged) or 'none'}"
    )


def _weight_test(
    tracker: Tracker,
    parent: str,
    test: PermutationTest,
    result: AttributionResult,
    classes: Classes,
    log_map: Callable[[str, np.ndarray, str, str], None],
) -> tuple[str, Figure]:
    """The linear baseline's weight test: its maps and metrics logged, its figure (caption, figure)."""
    method = LINEAR_BASELINE
    contrast = "_minus_".join(reversed(classes.names))
    log_map(parent, np.nan_to_num(test.t), f"{method}_weights_{contrast}", method)
    weights = np.nan_to_num(test.t)
    found = int((test.p < 0.05).sum()) if test.permutations else 0
    if test.permutations:
        log_map(parent, np.nan_to_num(test.p, nan=1.0), f"{method}_weights_p_fwer", method)
        tracker.log_metrics(parent, {f"test_voxels_fwer05_{method}": float(found)})
    caption = (
        f"{method_title(method)}: {classes.contrast}, the weights of one l2 logistic regression on all "
        f"subjects (positive: a higher standardized intensity points to {classes.names[1]}), tested by "
        f"refitting on {test.permutations} label permutations within families (FWER by the maximum "
        f"statistic): {found} voxels at p < 0.05"
        + ("" if found else "; none survive, so the weights are shown unthresholded (top 10% of voxels)")
    )
    strongest = np.abs(weights) >= np.percentile(np.abs(weights), 90)
    shown = np.where(test.p < 0.05 if found else strongest, weights, 0)
    title = f"{method_title(method)}: {classes.contrast} (weights{', p_FWER<0.05' if found else ''})"
    return caption, brain_figure(_image(result, shown), title, "glass", symmetric=True)


def _image(result: AttributionResult, values: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(result.volume(values), result.affine)


def _subject_maps(result: AttributionResult, out: Path) -> None:
    """Each subject's map of each method as ``<out>/<method>/sub-<id>_<method>.nii.gz``."""
    store = result.store
    for method in store.methods:
        (out / method).mkdir(parents=True, exist_ok=True)
        for sid, finished in zip(store.subject_ids, store.done(method)):
            if finished:
                nib.save(
                    nib.Nifti1Image(store.read(method, [sid])[0], result.affine),
                    out / method / f"sub-{sid}_{method}.nii.gz",
                )
