"""What each ``study`` command does, given its parsed arguments."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

from study.config import load_config
from study.data.bids import ground_truth_dir
from study.data.cohort import CohortConfig, Problem, check_images, load_cohort
from study.data.synth import SyntheticCohort, synthesize_cohort
from study.errors import CohortError, StudyError, WriteError
from study.output.tracking import tracking_uri
from study.runtime import start_ray
from study.storage import HOME_VARIABLE, join, project_dir, remove_tree, submitted_job_id
from study.tasks import TaskMap, map_tasks


def dispatch(args: argparse.Namespace, tasks: TaskMap | None = None) -> int:
    """Run the command named in ``args``; returns the exit code.

    ``tasks`` runs the per-subject work of ``validate`` and ``synth``: None starts (or joins) Ray and uses its
    tasks; :func:`~study.tasks.map_in_process` checks or writes one subject after another, without Ray.
    """
    if args.command in ("validate", "synth"):
        return {"validate": validate, "synth": synth}[args.command](args, tasks or _ray_tasks())
    return {"run": run, "predict": predict, "clean": clean}[args.command](args)


def _ray_tasks() -> TaskMap:
    """Ray tasks, on the cluster this process joins or a local Ray it starts."""
    start_ray()
    return map_tasks


def run(args: argparse.Namespace) -> int:
    from study.pipeline import run_study, study_dir

    if (job := submitted_job_id()) is not None:
        print(
            f"Ray job {job}: relative paths in {args.config} resolve under {project_dir()} "
            f"(${HOME_VARIABLE}), not in the job's temporary working directory"
        )
    config = load_config(args.config, args.overrides)
    again = shlex.join(["study", "run", str(args.config), *[part for o in args.overrides for part in ("--set", o)]])
    try:
        run_study(config, restart=args.restart)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished folds, search trials and maps are kept in {study_dir(config)}; "
            f"resume with: {again}",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        if (problem := write_failure(err, again)) is None:
            raise
        raise problem from None
    return 0


def write_failure(err: Exception, again: str) -> StudyError | None:
    """The one-line error for a file the study could not write (also inside a Ray task's error), else None."""
    cause = getattr(err, "cause", None) or err
    if not isinstance(cause, WriteError):
        return None
    return StudyError(
        f"could not write {cause.filename}: {cause.strerror}. Free space or fix the permissions "
        "there (or choose another output_dir / preprocess.cache_dir); finished folds, cached subjects "
        f"and maps are kept, and no file was left half-written. Resume with: {again}"
    )


def predict(args: argparse.Namespace) -> int:
    import tempfile

    import mlflow
    import nibabel as nib
    from tqdm.auto import tqdm

    from study.attribution.methods import title
    from study.new_images import find_images, maps_name, save_maps
    from study.output.models import download_ensemble, resolve_model
    from study.output.viewer import subject_page

    uri = tracking_uri(args.tracking_uri)
    model_uri = resolve_model(args.model, mlflow.MlflowClient(uri))
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = download_ensemble(model_uri, uri, Path(tmp), args.trust_code)
    regression = ensemble.outcome.kind == "regression"
    known = [ensemble.outcome.column] if regression else []  # the true value, when a table has it: the gap
    images, problems = find_images(args.images, ensemble.confounds, known)
    if images.empty:
        raise CohortError("no images to predict: " + "; ".join(p.message + f" ({p.file})" for p in problems))
    table = ensemble.predict(images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t" if args.out.suffix != ".csv" else ",", index=False)
    predicted = table[table.problem == ""]
    problems += [Problem(r.subject_id, r.image, r.problem) for r in table[table.problem != ""].itertuples()]
    if len(predicted):
        print(predicted[table.columns[[0, 2, 3]]].to_string(index=False, float_format="%.3f"))
    if args.maps is not None and len(predicted):
        masks = dict(zip(images.image, images.brain_mask))
        # each image's confounds, when the study adjusted for them (an image given twice: its first row)
        confounds = images.drop_duplicates("image").set_index("image")[ensemble.confounds]
        named: dict[str, str] = {}  # map file stem -> the image that writes it
        for row in predicted.itertuples():
            name = maps_name(Path(row.image), row.subject_id)
            if name in named:  # one subject's two images, or an id found twice: refused, never overwritten
                problems.append(
                    Problem(
                        row.subject_id,
                        row.image,
                        f"its maps would overwrite those of {named[name]} "
                        f"({name}); give the files distinct sub-/ses- names and predict it again",
                    )
                )
            else:
                named[name] = row.image
        for name, image in tqdm(named.items(), desc="explaining", unit="subject"):
            volume = ensemble.preprocess(Path(image), masks.get(image))
            adjusting = ensemble.read_confounds(confounds.loc[[image]]) if ensemble.confounds else None
            maps = ensemble.explain(volume, adjusting)
            save_maps(maps, ensemble.grid, args.maps, name)
            titled = {title(method): values for method, values in maps.items()}
            page = subject_page(titled, ensemble.grid.affine, nib.load(image), name, brain=volume != 0)
            (args.maps / f"{name}_maps.html").write_text(page)
        print(
            f"maps of {len(named)} images ({', '.join(ensemble.methods)}) in {args.maps}; "
            f"each image's maps over it, to explore in a browser: {args.maps}/<sub-id>_maps.html"
        )
    for problem in problems:
        print(problem, file=sys.stderr)
    print(
        f"{len(predicted)} subjects predicted with {model_uri}, {len(problems)} problems; table: {args.out}",
        file=sys.stderr,
    )
    return 1 if problems else 0


def _megabytes(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def clean(args: argparse.Namespace) -> int:
    from study.pipeline import study_dir
    from study.state import LATEST, config_hash, list_executions, running

    if args.keep < 1:
        raise StudyError(f"--keep {args.keep}: keep at least the newest execution (--keep 1)")
    config = load_config(args.config, args.overrides)
    directory = study_dir(config)
    executions = list_executions(directory)
    if not executions:
        print(f"study {config.name} has no executions in {directory}")
        return 0
    latest = (directory / LATEST).resolve()

    def verdict(index: int, path: Path, finished: bool) -> str:
        if (holder := running(path)) is not None:
            return f"keep (running now: {holder})"
        if index >= len(executions) - args.keep:
            return "keep"
        if path.resolve() == latest:
            return "keep (latest: run or resumed last)"
        return "delete" if finished or args.unfinished else "keep (unfinished: a rerun resumes it; --unfinished)"

    verdicts = [verdict(i, path, state.finished) for i, (path, state) in enumerate(executions)]
    doomed = [execution for execution, v in zip(executions, verdicts) if v == "delete"]
    this_config = config_hash(config)
    size = {path: _megabytes(path) for path, _ in executions}
    rows = [
        (
            path.name,
            "finished" if state.finished else "unfinished",
            "this config" if state.config_hash == this_config else "other config",
            f"{size[path]:.1f} MB",
            state.parent_run or "-",
            v,
        )
        for (path, state), v in zip(executions, verdicts)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"executions of study {config.name} in {directory} (oldest first; MLflow run of each):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not doomed:
        print(f"nothing to delete: {len(executions)} execution(s), --keep {args.keep}")
        return 0
    total = sum(size[path] for path, _ in doomed)
    if not args.yes:
        print(f"would delete {len(doomed)} execution(s), {total:.1f} MB; run again with --yes to delete them")
        return 0
    for path, _ in doomed:
        if config.storage_path:  # Ray storage in a bucket, outside the execution's directory
            remove_tree(join(config.storage_path, config.name, path.name))  # the folder's own name, never the file's
        remove_tree(path)
    print(
        f"deleted {len(doomed)} execution(s), {total:.1f} MB. Their MLflow runs, logged models and registered "
        f"versions are kept (delete them in the MLflow UI); the preprocessing cache in "
        f"{config.preprocess.cache_dir} is shared by studies of the cohort and kept"
    )
    return 0


def validate(args: argparse.Namespace, tasks: TaskMap) -> int:
    if args.cohort.suffix in {".yaml", ".yml"}:
        cohort_config = load_config(args.cohort).cohort
    else:
        # Paths on the command line are relative to the current directory; Ray workers run elsewhere.
        cohort_config = CohortConfig(
            root=args.cohort.resolve(),
            participants=args.participants.resolve() if args.participants else None,
            layout=args.layout,
            subject_column=args.subject_column,
            label=args.label,
            task=args.task,
            **({"classes": tuple(args.classes)} if args.task == "classification" else {}),
            family_column=args.family_column,
            path_column=args.path_column,
            space=args.space,
            resolution=args.resolution,
            session=args.session,
            brain_mask=args.brain_mask,
        )
    cohort = load_cohort(cohort_config)
    for warning in cohort.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    problems = cohort.problems + check_images(cohort, tasks)
    for problem in problems:
        print(problem)
    bad = {p.subject for p in problems}
    n_ok = sum(1 for s in cohort.subjects if s.subject_id not in bad)
    sessions = Counter(f"ses-{s.session}" for s in cohort.subjects if s.session)
    if sessions:  # which session each subject contributes: the images are listed by `study run`'s cohort table
        print("sessions: " + ", ".join(f"{k} ({n})" for k, n in sorted(sessions.items())), file=sys.stderr)
    print(f"{n_ok} subjects OK, {len(problems)} problems in {len(bad)} subjects", file=sys.stderr)
    return 1 if problems else 0


def synth(args: argparse.Namespace, tasks: TaskMap) -> int:
    spec = SyntheticCohort(
        subjects=args.subjects,
        voxel_sizes=tuple(args.voxel_sizes),
        effect_size=args.effect_size,
        regions=args.regions,
        distractor=args.distractor,
        confound=args.confound,
        site_confound=args.site_confound,
        tiv_confound=args.tiv_confound,
        age_effect=args.age_effect,
        group_effect=args.group_effect,
        seed=args.seed,
    )
    table = synthesize_cohort(args.out, spec, tasks=tasks)
    print(f"wrote {spec.subjects} subjects (a BIDS dataset): {table}; ground truth in {ground_truth_dir(args.out)}")
    return 0
