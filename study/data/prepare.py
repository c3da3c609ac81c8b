"""A study's cohort made ready: generated if synthetic and missing, checked, preprocessed, split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from study.config import CVConfig, PreprocessConfig
from study.data.cache import VolumeCache, build_cache
from study.data.cohort import Cohort, CohortConfig, Problem, load_cohort
from study.data.splits import OuterFold, load_splits, make_splits, save_splits
from study.data.synth import synthesize_cohort
from study.errors import StudyError
from study.storage import exclusive
from study.tasks import TaskMap, map_tasks


@dataclass
class PreparedCohort:
    """The usable subjects, their cache, and the subjects left out (with reasons)."""

    cohort: Cohort
    cache: VolumeCache
    excluded: list[Problem]
    preprocessed: int  # subjects preprocessed now (the rest came from the cache)
    synthesized: bool  # the cohort was generated now


def prepare_cohort(
    cohort_config: CohortConfig, preprocess: PreprocessConfig, tasks: TaskMap = map_tasks
) -> PreparedCohort:
    """Load, check and preprocess the cohort; refuse or exclude bad subjects as configured.

    Every problem is reported at once. Subjects preprocessed before a refusal
    stay in the cache, so the rerun after a fix only redoes what changed.
    ``tasks`` runs the per-subject work (Ray tasks by default; see :data:`study.tasks.TaskMap`).
    """
    synthetic, synthesized = cohort_config.synthetic, False
    if synthetic is not None:  # two studies started together must not both write it (their cache keys would differ)
        root = cohort_config.root
        root.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(root.parent / f".{root.name}.lock", f"synthetic cohort {root}"):
            synthesized = not cohort_config.participants_paths[0].exists()
            if synthesized:
                synthesize_cohort(root, synthetic, tasks=tasks)
    cohort = load_cohort(cohort_config)
    # held while this study runs: another study's build leaves it alone
    build = build_cache(cohort, preprocess.grid, preprocess.cache_dir, preprocess.normalize, hold=True, tasks=tasks)
    problems = cohort.problems + build.problems
    if problems and cohort_config.on_invalid == "refuse":
        listing = "\n".join(f"  {p}" for p in problems)
        raise StudyError(
            f"{len(problems)} problems in the cohort (subject, file, problem):\n{listing}\n"
            "Fix them and run again (finished subjects stay cached), or set cohort.on_invalid: exclude "
            "to leave these subjects out."
        )
    if build.cache is None:
        raise StudyError("no subject could be preprocessed; see the problems above")
    cached = set(build.cache.subject_ids)
    kept = [s for s in cohort.subjects if s.subject_id in cached]
    usable = Cohort(kept, warnings=cohort.warnings, target=cohort.target, confounds=cohort.confounds)
    return PreparedCohort(usable, build.cache, problems, len(build.computed), synthesized)


def make_or_load_splits(cv: CVConfig, cohort: Cohort, path: Path) -> list[OuterFold]:
    """The study's splits: reused from ``path`` (``splits.json``) when made for this very cohort and CV."""
    made_for = f"{cohort.fingerprint()} outer={cv.outer_folds} inner={cv.inner_folds} seed={cv.seed}"
    made_for += f" group_by={cv.group_by}" if cv.group_by else ""
    if path.exists():
        saved_for, folds = load_splits(path)
        if saved_for == made_for:
            return folds
    families = [s.family_id for s in cohort.subjects]
    groups = cohort.confound_table(cohort.ids)[cv.group_by].astype(str).tolist() if cv.group_by else None
    strata, names = cohort.target.strata(cohort.labels)  # classes, or a regression target's quartiles
    try:
        folds = make_splits(cohort.ids, strata, families, cv.outer_folds, cv.inner_folds, cv.seed, names, groups)
    except ValueError as err:
        raise StudyError(f"cross-validation splits of {len(cohort.ids)} subjects: {err}") from None
    save_splits(folds, path, made_for)
    return folds
