"""The attribution stage published: its maps (:mod:`.maps`), tables and metrics, report sections and console lines.

One function per artifact or report section, each with its caption templates
above it; the templates are filled with the study's own words (its classes, the
score the maps explain, the methods' titles).
"""

from __future__ import annotations

import pandas as pd

from study.attribution.methods import LINEAR_BASELINE, METHODS, title
from study.attribution.sanity import DELETED_SHARE, FLAG_DELETION_P, FLAG_SPEARMAN, RANDOM_BLOB_MM, SanityChecks
from study.attribution.stage import AttributionResult
from study.output.console import say
from study.output.figures import agreement_figure, sanity_figure
from study.output.maps import MapFigures, publish_maps, subject_maps, viewed_maps
from study.output.report import Report
from study.output.tracking import Tracker
from study.output.viewer import viewer_html
from study.state import Study
from study.training.evaluation import Evaluation, format_p

# The score the maps explain, in the study's words ({contrast}: e.g. male - female; {column}: e.g. sex)
TARGETS = {
    "contrast": "the {contrast} logit",
    "true_class": "each subject's true {column}'s logit",
    "predicted_class": "each subject's predicted {column}'s logit",
}
DELETES = {"cohort_mean": "towards the cohort's mean", "blur": "by blurring"}  # Meaningful Perturbations' reference


def publish_attribution(
    tracker: Tracker, report: Report, study: Study, result: AttributionResult, evaluation: Evaluation
) -> None:
    """Maps as NIfTI (study and fold runs), tables, figures, report sections and a console summary."""
    attribution, classes = study.config.attribution, study.cohort.target
    regression = classes.kind == "regression"
    target = f"the predicted {classes.column}" if regression else TARGETS[result.target]
    target = target.format(contrast=classes.contrast, column=classes.column)
    deletes = DELETES[attribution.perturbation.reference]

    def explains(method: str) -> str:
        """What one method's maps show of the score they explain (its table's caption, under the contrast)."""
        if regression and method == "perturbation":
            return f"{target}: what must be deleted, {deletes}, to move it to its fold's mean {classes.column}"
        if regression:
            return f"{target}: its magnitude, evidence for a higher or a lower {classes.column}"
        return METHODS[method].shows.format(target=target, deletion=deletes) if result.target == "contrast" else target

    if attribution.subject_nifti:
        subject_maps(result, study.directory / "maps" / "subjects")
    figures = publish_maps(tracker, study, result, explains)
    _log_tables(tracker, study.state.parent_run, result)
    _maps_sections(report, study, result, evaluation, figures, target)
    regions = (result.regions.labels, result.regions.names) if result.regions is not None else None
    names = "the study's atlas" if attribution.atlas else "the planted regions" if regions else ""
    viewer = viewer_html(viewed_maps(result, classes), result.affine, regions)
    report.add_html("Explore the maps", viewer, VIEWER.format(regions=f", the region of {names}" if names else ""))
    for method, maps in result.maps.items():
        for kind, table in maps.regions.items():
            report.add_table(f"{title(method)}: regions ({kind})", table.head(15), REGIONS)
    _localization_section(report, result.localization)
    report.add_images(
        "Method agreement", [("Spearman correlation", agreement_figure(result.agreement, list(result.maps)))]
    )
    titled = {column: [title(m) for m in result.agreement[column]] for column in ("method_a", "method_b")}
    report.add_table("Method agreement (table)", result.agreement.assign(**titled))
    mp_deletes_to_mean = "perturbation" in result.maps and attribution.perturbation.reference == "cohort_mean"
    _sanity_sections(report, result.sanity, mp_deletes_to_mean, classes.column if regression else None)
    _console(result)


def _log_tables(tracker: Tracker, parent: str, result: AttributionResult) -> None:
    """Region, agreement, localization and sanity tables in the study run; their headline metrics and tags."""
    for method, maps in result.maps.items():
        for kind, table in maps.regions.items():
            tracker.log_table(parent, table, f"regions/{method}_{kind}.tsv")
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
    sanity = result.sanity
    tracker.log_table(parent, sanity.cascade, "sanity/parameter_randomization.tsv")
    if len(sanity.shuffled):
        tracker.log_table(parent, sanity.shuffled, "sanity/label_randomization.tsv")
        tracker.log_metrics(parent, {"sanity_shuffled_labels_fit_accuracy": sanity.shuffled_fit_accuracy})
    tracker.log_table(parent, sanity.deletion, "sanity/deletion.tsv")
    summary = sanity.deletion_summary
    random = float(summary.random_change_mean[summary.method != LINEAR_BASELINE].mean())
    changes = {f"deletion_change_{row.method}": row.change_mean for row in summary.itertuples()}
    tracker.log_metrics(parent, changes | {"deletion_change_random": random})
    tracker.set_tags(
        parent,
        {
            "sanity.flagged": ",".join(sanity.flagged) or "none",
            "sanity.deletion_flagged": ",".join(sanity.deletion_flagged) or "none",
        },
    )


MAPS = (
    "Every map explains {target}. Normalized maps (each subject scaled to its 99.5th percentile) averaged over "
    "held-out subjects, over the MNI152 template. "
)
TESTED = (
    "The t maps show voxels where the maps of {positive} and {negative} differ (Welch t), FWER-corrected by the "
    "maximum statistic over {permutations} label permutations within outer folds, exchanging whole families "
    "(PALM-style exchangeability blocks); voxels with the same value in every subject are left out of the test."
)
ASSOCIATED = (
    "The t maps show voxels whose maps go with {column}: the t of {column} in a linear model of each voxel's map "
    "with an intercept, FWER-corrected by the maximum statistic over {permutations} Freedman-Lane permutations "
    "within outer folds, exchanging whole families (PALM-style exchangeability blocks); voxels with the same value "
    "in every subject are left out of the test."
)
ADJUSTED = (
    " Adjusted for the confounds ({confounds}): the t is that of the class in a linear model with them, and the "
    "permutations follow Freedman and Lane (the maps' residuals on the confounds are permuted), so a difference "
    "the confounds explain is not called one between the classes. The linear baseline's weight test is not adjusted."
)
UNTESTED = (
    "No {contrast} test: with target {target} the maps of each class explain different scores, so their "
    "difference would be there by construction; set attribution.target: contrast."
)
TESTED_SEVERAL = (
    "Each class's mean map shows where the network finds that class (target {target}: each subject's map explains "
    "its own class's score). The test between classes asks every subject one question per class: each class's t "
    "map compares the maps of that class's score against the rest (its logit minus the mean of the others') between "
    "its subjects and everyone else (Welch t), FWER-corrected by the maximum statistic over {permutations} label "
    "permutations within outer folds, exchanging whole families (PALM-style exchangeability blocks). The linear "
    "baseline's map is the root mean square of its classes' weights, not tested."
)
UNTESTED_SEVERAL = (
    "Each class's mean map shows where the network finds that class (target {target}: each subject's map explains "
    "its own class's score). No test between classes: Meaningful Perturbations deletes the evidence for each "
    "subject's own decision, so its classes' maps answer different questions; add a gradient method to test them."
)
GRADCAM_DETAIL = (
    " Grad-CAM shows no detail finer than {network}'s last feature map: {d}x{h}x{w} voxels, one every {spacing:.0f} "
    "mm on this grid."
)
BASELINE_FINDING = (
    "Only the linear baseline learned the task (see the banner): its weight map is the finding. The CNN's maps "
    "further down explain a model that learned nothing."
)


def _maps_sections(
    report: Report,
    study: Study,
    result: AttributionResult,
    evaluation: Evaluation,
    figures: dict[str, MapFigures],
    target: str,
) -> None:
    """The maps beside the linear baseline's (or the baseline's alone, when only it learned), then every map."""
    classes = study.cohort.target
    tests = [m.test for name, m in result.maps.items() if m.test is not None and name != LINEAR_BASELINE]
    if tests and classes.kind == "regression":
        how = ASSOCIATED.format(column=classes.column, permutations=tests[0].permutations)
    elif tests:
        how = TESTED.format(positive=classes.names[1], negative=classes.names[0], permutations=tests[0].permutations)
        if tests[0].adjusted_for:
            how += ADJUSTED.format(confounds=", ".join(tests[0].adjusted_for))
    elif classes.several:
        tested = any(m.versus_rest for m in result.maps.values())
        how = (TESTED_SEVERAL if tested else UNTESTED_SEVERAL).format(
            target=result.target, permutations=study.config.attribution.permutations
        )
    else:
        how = UNTESTED.format(contrast=classes.contrast, target=result.target)
    if "gradcam" in result.maps:
        (d, h, w), spacing = result.gradcam_grid
        network = "fold 0's network" if study.config.search else "the network"
        how += GRADCAM_DETAIL.format(network=network, d=d, h=h, w=w, spacing=spacing)
    main = {method: f.main for method, f in figures.items() if f.main is not None}
    if LINEAR_BASELINE in main and len(main) > 1:
        linear = main.pop(LINEAR_BASELINE)
        if evaluation.finding == "baseline_only":  # the finding to read comes first
            report.add_images("The finding: the linear baseline's weights", [linear], BASELINE_FINDING)
        else:
            report.add_images(
                "The CNN's maps beside the linear baseline's",
                [*main.values(), linear],
                f"Where both models look. {evaluation.verdict}",
            )
    learned = evaluation.finding in ("yes", "below_baseline")
    heading = "Where the network looks" + (
        ""
        if learned
        else f": explaining a model of the confounds ({evaluation.confounds.listing})"
        if evaluation.finding == "confounds"
        else ": explaining a model that did not learn the task"
    )
    every = [figure for f in figures.values() for figure in f.figures]
    report.add_images(heading, every, MAPS.format(target=target) + how)


VIEWER = (
    "Every group map above, over the MNI152 template: pick a map, click a slice to move the crosshair (it reads out "
    "the MNI coordinate, the map's value{regions}), move the threshold. It starts on the map's peak, coloured as "
    "its static figure is: a mean map in its top 10% of voxels, a t map from its smallest |t| at p_FWER < 0.05 "
    "(where none survives, its top 10%, as its name says)."
)
REGIONS = "Regions ranked by mean normalized attribution over all held-out subjects."
LOCALIZATION = (
    "Voxel ROC AUC against the planted effect, the share of the top 1% voxels inside it (chance: the effect's "
    "share of the brain), and the group map's top-1% share in the distractor, a region that varies whatever the "
    "label (chance: its share of the brain; a method above chance there follows the data, not the model's "
    "decision)."
)
LOCALIZATION_COLUMNS = {
    "roc_auc_subject_mean": "voxel AUC, subjects (mean)",
    "roc_auc_group": "voxel AUC, group map",
    "top1pct_in_effect_subject_mean": "top 1% in effect, subjects (mean)",
    "top1pct_in_effect_group": "top 1% in effect, group map",
    "chance_top1pct": "chance",
    "top1pct_in_distractor_group": "top 1% in distractor, group map",
    "chance_distractor": "chance (distractor)",
}


def _localization_section(report: Report, local: pd.DataFrame) -> None:
    """A synthetic cohort's ground truth: how well each map finds the planted effect (nothing without one)."""
    if len(local):
        shown = local.rename(columns=LOCALIZATION_COLUMNS).assign(method=[title(m) for m in local.method])
        report.add_table("Ground truth: localization of the planted effect", shown, LOCALIZATION)


FLAGGED = (
    "Flagged (Spearman > {threshold} to the original maps after full randomization or shuffled-label training): "
    "{methods}"
)
NOT_FLAGGED = "No method flagged: every method's maps change when the model or its labels are randomized."
DELETION = (
    "For every held-out subject, the {share:.0%} of brain voxels that a method's map ranks highest were replaced "
    "by the cohort's mean volume (of all subjects' images) and the fold's model decided again: the change of the "
    "probability of the class it had decided, against random blobs of as many brain voxels (noise smoothed by "
    "{blob_mm:.0f} mm), in a paired one-sided Wilcoxon test over subjects. A map that explains the model marks "
    "voxels its decision rests on. Methods whose maps move it no more surely than random blobs (e.g. of a model "
    "that ignores its input): {flagged}. The check says whether a map's top voxels matter to the model, not that "
    "the map is complete."
)
MP_OPTIMIZES_DELETION = " Meaningful Perturbations optimizes this very deletion, so its lead here is expected."
DELETION_COLUMNS = {
    "change_mean": "change of p(decision): mean",
    "change_median": "median",
    "random_change_mean": "random blobs: mean",
    "share_above_random": "subjects above random",
    "p_vs_random": "above random",
    "beats_random": f"above random (p < {FLAG_DELETION_P})",
}
SHUFFLED = (
    "Similarity of maps from a model trained on shuffled labels to the real maps; high values mean the method "
    "does not depend on what the model learned. The model had the first fold's architecture, subjects and "
    "number of epochs, with every label shuffled; its {score} on its own shuffled labels was {accuracy:.2f}: "
    "{memorized}."
)
DELETION_OF_VALUE = (
    " Here the change is that of the predicted {column}, in its unit (no class is decided), and the column names "
    "p(decision) hold it."
)
MEMORIZED = "it memorized them"
NOT_MEMORIZED = "it did not memorize them, so this check is weak: train longer or wider to make it strong"


def _sanity_sections(report: Report, sanity: SanityChecks, mp_deletes_to_mean: bool, predicted: str | None) -> None:
    """Cascading randomization, the deletion check and the shuffled-label model, each with what it says."""
    flagged = ", ".join(title(m) for m in sanity.flagged)
    note = FLAGGED.format(threshold=FLAG_SPEARMAN, methods=flagged) if sanity.flagged else NOT_FLAGGED
    report.add_images("Sanity checks", [("Cascading randomization", sanity_figure(sanity.cascade))], note)
    summary = sanity.deletion_summary
    shown = summary.assign(
        method=[title(m) for m in summary.method],
        p_vs_random=[format_p(p) for p in summary.p_vs_random],
        beats_random=["yes" if above else "no: flagged" for above in summary.beats_random],
    ).rename(columns=DELETION_COLUMNS)
    deletion_flagged = ", ".join(title(m) for m in sanity.deletion_flagged) or "none"
    note = DELETION.format(share=DELETED_SHARE, blob_mm=RANDOM_BLOB_MM, flagged=deletion_flagged)
    report.add_table(
        "Sanity check: deleting what each map marks",
        shown,
        note
        + (MP_OPTIMIZES_DELETION if mp_deletes_to_mean else "")
        + (DELETION_OF_VALUE.format(column=predicted) if predicted else ""),
    )
    if len(sanity.shuffled):
        memorized = MEMORIZED if sanity.shuffled_fit_accuracy >= 0.9 else NOT_MEMORIZED
        report.add_table(
            "Sanity check: model trained on shuffled labels",
            sanity.shuffled.assign(method=[title(m) for m in sanity.shuffled.method]),
            SHUFFLED.format(
                score="r" if predicted else "accuracy", accuracy=sanity.shuffled_fit_accuracy, memorized=memorized
            ),
        )


def _console(result: AttributionResult) -> None:
    """Agreement, localization and the sanity checks' verdict, on the console."""
    say("method agreement (Spearman, mean over subjects):")
    for row in result.agreement.itertuples():
        say(f"  {row.method_a:>20} ~ {row.method_b:<20} {row.spearman_subject_mean:.3f}")
    local = result.localization
    if len(local):
        say("localization of the planted effect (voxel ROC AUC of the group map):")
        for row in local.itertuples():
            say(f"  {row.method:>20} {row.roc_auc_group:.3f}")
    sanity = result.sanity
    say(
        f"sanity checks: flagged by randomization: {', '.join(sanity.flagged) or 'none'}; by deletion (no more "
        f"than random blobs): {', '.join(sanity.deletion_flagged) or 'none'}"
    )
