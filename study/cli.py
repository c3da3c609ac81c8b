"""Command line: ``study run | predict | clean | validate | synth``. Parsing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from study.data.cohort import CohortConfig
from study.data.synth import SyntheticCohort
from study.errors import StudyError
from study.tasks import TaskMap


def _default(schema: type, key: str):
    """A key's default as the config schema declares it (the one source of defaults)."""
    return schema.model_fields[key].default


EPILOG = """\
examples:
  study synth study_data/synth --subjects 60 --voxel-size 4     # a synthetic cohort
  study validate /data/hcp --layout hcp --participants hcp.csv  # check every subject and image
  study validate tune_configs/paper.yaml                        # the cohort of a study config
  study run tune_configs/demo.yaml                              # the demo study, minutes on a laptop
  study run tune_configs/paper.yaml --set cv.outer_folds=5      # override any config key
  study predict models:/demo/1 new_scans/ --maps maps/          # apply a finished study to new images
  study clean tune_configs/demo.yaml --keep 2                   # list old executions; --yes deletes them

on a Ray cluster (joins it; see README "Run on a cluster"):
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- study run CONFIG

results: MLflow (default: mlflow.db in the project directory; `mlflow ui --backend-store-uri sqlite:///mlflow.db`)
and output_dir/<name>/latest/report.html (every execution keeps its own output_dir/<name>/<execution>/).
Relative config paths are relative to the current directory, or to $STUDY_HOME when set (in a submitted
Ray job, where the current directory is temporary: ~/study by default).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="study",
        description="Ray study runner for interpretable 3D CNNs on brain MRI: cross-validated training, "
        "architecture search and voxel-wise attribution maps, tracked in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a study end to end from its YAML config")
    run.add_argument("config", type=Path, help="study YAML, e.g. tune_configs/demo.yaml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted path, YAML value); repeatable",
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="start a new execution; by default an interrupted run of the same config resumes "
        "(finished folds and trials are kept, MLflow runs continued). Earlier executions are "
        "never deleted (see `study clean`)",
    )

    predict = commands.add_parser(
        "predict",
        help="apply a finished study's fold models (an ensemble) to new images",
        description="Predict the study's label (sex, unless its config set cohort.label) for new T1w images with "
        "its outer-fold models as an ensemble (mean probability of class 1, and each fold's), preprocessed exactly as "
        "the study's images were (read from the model, not retyped). Images get the same checks as `study "
        "validate`; a bad one is reported and skipped. Writes a table (for a sex study: subject_id, image, p_male, "
        "predicted_sex, p_male_fold<k>, problem); exit code 1 when any image could not be predicted.",
    )
    predict.add_argument(
        "model",
        help="models:/NAME/VERSION (printed at the end of `study run`), a study name "
        "(its newest registered version) or a study's MLflow run id",
    )
    predict.add_argument(
        "images",
        type=Path,
        nargs="+",
        help="NIfTI files, folders (searched for *.nii[.gz]) or participants tables (.tsv/.csv); a study that "
        "removed confounds from its images (cv.adjust) needs tables, with each subject's (columns such as site, tiv)",
    )
    predict.add_argument(
        "--out", type=Path, default=Path("predictions.tsv"), help="table to write (default %(default)s)"
    )
    predict.add_argument(
        "--maps",
        type=Path,
        metavar="DIR",
        help="also write each subject's maps (the study's methods, mean over fold models) as "
        "DIR/<method>/sub-<id>_<method>.nii.gz in MNI152 space, and DIR/sub-<id>_maps.html: the maps over the "
        "subject's own image, to explore in a browser",
    )
    predict.add_argument("--tracking-uri", help="MLflow of the study (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    predict.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a model whose fold networks are its author's own class (model.class): loading "
        "it imports and runs that code. The study's own CNN needs no trust: only its weights "
        "and JSON are read, never a pickle",
    )

    clean = commands.add_parser(
        "clean",
        help="list a study's executions and delete all but the newest (with --yes)",
        description="Every `study run` that starts afresh (a changed --set, --restart, a rerun of a finished "
        "study) is a new execution in output_dir/<name>/<execution>/ with its own checkpoints, maps and report; "
        "nothing deletes an earlier one. `study clean CONFIG` lists them (status, config, size, MLflow run) and "
        "which it would delete: all but the newest --keep, never the one `latest` points to (run or resumed "
        "last), and unfinished ones only with --unfinished. Nothing is deleted without --yes. MLflow runs and "
        "the preprocessing cache are kept. Do not clean a study while it runs.",
    )
    clean.add_argument("config", type=Path, help="the study's YAML (with the same --set values as its run)")
    clean.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, as for `study run` (name and output_dir find the study)",
    )
    clean.add_argument(
        "--keep", type=int, default=1, metavar="N", help="keep the newest N executions (default %(default)s)"
    )
    clean.add_argument(
        "--unfinished",
        action="store_true",
        help="also delete older unfinished executions (kept by default: a rerun resumes them)",
    )
    clean.add_argument("--yes", action="store_true", help="delete; without it, only list what would be deleted")

    validate = commands.add_parser(
        "validate",
        help="check a cohort: every problem at once, one line each (subject, file, problem)",
        description="Check a cohort's participants table and every image. Exit code 0 only when clean.",
    )
    validate.add_argument(
        "cohort", type=Path, help="cohort folder (BIDS, fMRIPrep derivatives, ClinicaDL CAPS or HCP) or a study YAML"
    )
    validate.add_argument("--participants", type=Path, help="participants table (default: COHORT/participants.tsv)")
    validate.add_argument(
        "--layout",
        choices=["auto", "bids", "fmriprep", "caps", "hcp", "column"],
        default=_default(CohortConfig, "layout"),
        help="auto: fMRIPrep's dataset_description.json or derivatives/fmriprep, CAPS's subjects/, "
        "BIDS's sub-*, else HCP (default %(default)s)",
    )
    validate.add_argument("--space", help="fMRIPrep: the space- entity to read (default: the one MNI152 space present)")
    validate.add_argument("--resolution", help="fMRIPrep: the res- entity to read (default: images without one)")
    validate.add_argument(
        "--session", help="first, last or ses-LABEL (default: the table's session column, else the first session)"
    )
    validate.add_argument(
        "--brain-mask",
        default=_default(CohortConfig, "brain_mask"),
        help="auto (fMRIPrep's desc-brain_mask; mni152 for CAPS; none otherwise), none, mni152, or "
        "a mask path per subject relative to COHORT with {subject} and {session} "
        "(default %(default)s)",
    )
    validate.add_argument("--subject-column", default=_default(CohortConfig, "subject_column"))
    validate.add_argument(
        "--label", default=_default(CohortConfig, "label"), help="column to learn (default %(default)s)"
    )
    validate.add_argument(
        "--task",
        choices=["classification", "regression"],
        default=_default(CohortConfig, "task"),
        help="regression: the label is a number per subject, e.g. --label age (default %(default)s)",
    )
    validate.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        default=_default(CohortConfig, "classes"),
        help="its classes, two or more (e.g. control mci ad); values are matched to them in any case (default "
        "%(default)s)",
    )
    validate.add_argument("--family-column", default=_default(CohortConfig, "family_column"))
    validate.add_argument("--path-column", help="column with each subject's image path (layout 'column')")

    synth = commands.add_parser(
        "synth",
        help="write a synthetic cohort with planted sex effects (from the MNI152 template)",
        description="Write a synthetic BIDS dataset from the MNI152 template: participants.tsv (and .json), "
        "dataset_description.json, README, sub-*/anat/*_T1w.nii.gz (brain-extracted, registered to MNI152, "
        "stored at mixed voxel sizes and orientations like real images) and derivatives/ground_truth/ (planted "
        "effect map, region labels, planted.json). Deterministic for a seed.",
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument(
        "--subjects",
        type=int,
        default=_default(SyntheticCohort, "subjects"),
        help="number of subjects (default %(default)s)",
    )
    synth.add_argument(
        "--voxel-size",
        dest="voxel_sizes",
        type=float,
        nargs="+",
        default=_default(SyntheticCohort, "voxel_sizes"),
        metavar="MM",
        help="isotropic voxel sizes in mm; each image gets one of them (default %(default)s)",
    )
    synth.add_argument(
        "--effect-size",
        type=float,
        default=_default(SyntheticCohort, "effect_size"),
        help="relative volume and intensity change in males in the planted regions (default %(default)s)",
    )
    synth.add_argument(
        "--regions",
        type=int,
        default=_default(SyntheticCohort, "regions"),
        help="planted regions, placed at random inside the brain (default %(default)s)",
    )
    synth.add_argument(
        "--distractor",
        type=float,
        default=_default(SyntheticCohort, "distractor"),
        help="sd over subjects of a sex-independent change in one more region (default %(default)s)",
    )
    synth.add_argument(
        "--confound",
        type=float,
        default=_default(SyntheticCohort, "confound"),
        help="males' brains larger overall by this fraction (default %(default)s)",
    )
    synth.add_argument(
        "--site-confound",
        type=float,
        default=_default(SyntheticCohort, "site_confound"),
        metavar="S",
        help="a second scanner, B (another contrast, more noise), scanning (1+S)/2 of males and (1-S)/2 of "
        "females, in column site; 0.6: 80%% of men and 20%% of women (default %(default)s: one scanner, no column)",
    )
    synth.add_argument(
        "--tiv-confound",
        type=float,
        default=_default(SyntheticCohort, "tiv_confound"),
        metavar="F",
        help="males' intracranial volume larger by this fraction, in column tiv (ml), leaving a diffuse cortical "
        "pattern in the registered images; 0.12: head size alone gives ROC AUC about 0.85 (default %(default)s: "
        "no column)",
    )
    synth.add_argument(
        "--age-effect",
        type=float,
        default=_default(SyntheticCohort, "age_effect"),
        metavar="F",
        help="brain age: ages 20 to 80 in column age, and atrophy growing with age in regions of its own, a "
        "relative loss of F at 80 (as much gain at 20); study it with cohort: {label: age, task: regression} "
        "(default %(default)s: ages 22 to 36, no effect)",
    )
    synth.add_argument(
        "--group-effect",
        type=float,
        default=_default(SyntheticCohort, "group_effect"),
        metavar="F",
        help="several classes: a column group of control, subtype_a and subtype_b (a third each), each subtype "
        "losing F of volume and intensity in regions of its own; study it with cohort: {label: group, classes: "
        "[control, subtype_a, subtype_b]} (default %(default)s: no column)",
    )
    synth.add_argument("--seed", type=int, default=_default(SyntheticCohort, "seed"))
    return parser


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray reads it once, at import


def _local_ray_on_loopback() -> None:
    """Make a local Ray (no ``RAY_ADDRESS`` to join) listen on 127.0.0.1 only.

    On Linux Ray binds its servers (GCS, raylets, workers, metrics exporters)
    to every interface, where the metrics answer without a token; on macOS and
    Windows it keeps them on loopback, and this variable asks for that here.
    Set before ``import ray``; a study that joins a cluster is left as it is.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(LOOPBACK_ONLY, "0")


def main(argv: list[str] | None = None, tasks: TaskMap | None = None) -> int:
    """Entry point of the ``study`` console script; returns the exit code.

    ``tasks``: how ``validate`` and ``synth`` run their per-subject work (default: Ray tasks; see
    :func:`study.commands.dispatch`).
    """
    args = _parser().parse_args(argv)
    _local_ray_on_loopback()
    from study import commands  # heavy imports (torch, ray) only once the arguments are valid

    try:
        return commands.dispatch(args, tasks)
    except StudyError as err:  # the user can fix it: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
