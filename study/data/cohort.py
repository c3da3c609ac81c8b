"""Cohorts: a participants table plus one T1-weighted image per subject.

:func:`load_cohort` reads the table and finds the images (BIDS, fMRIPrep, CAPS,
HCP: :mod:`.layouts`; or an explicit path column), then matches each row to its
image, session, label and brain mask (:mod:`.participants`), checking
everything that can be checked without opening an image; :func:`check_images`
opens every image in parallel. Each problem is a :class:`Problem` naming the
subject, the file and the fix, and all of them are reported at once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from study.data.layouts import SESSION_CHOICE, find_images
from study.data.participants import (
    SESSION_COLUMNS,
    SEX_CLASSES,
    Matching,
    Problem,
    Subject,
    confound_table,
    family_warnings,
    match_subjects,
    read_participants,
)
from study.data.synth import SyntheticCohort
from study.data.targets import Classes, Regression, Target
from study.data.volumes import MNI152_MASK, Grid, preprocess_volume
from study.errors import CohortError
from study.tasks import TaskMap, map_tasks

RESERVED_COLUMNS = ("subject_id", "image", "predicted", "fold", "problem")  # columns of prediction tables
CLASS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # a class name becomes a column name (p_<class>) and a metric name


class CohortConfig(BaseModel):
    """Where the images and the participants table are, and how to read them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    root: Path
    # The participants table (default: ROOT/participants.tsv), or several merged on the subject column:
    # HCP keeps Gender in its unrestricted table and Family_ID in its restricted one.
    participants: Path | list[Path] | None = None
    layout: Literal["auto", "bids", "fmriprep", "caps", "hcp", "column"] = "auto"
    hcp_image: Literal["acpc", "mni"] = "mni"
    space: str | None = None  # fMRIPrep's space- entity; default: the one MNI152 space present
    resolution: str | None = None  # fMRIPrep's res- entity; default: the images without one
    # Which session a subject contributes: first | last | ses-<label>; default: the table's session column, else first
    session: str | None = Field(None, pattern=SESSION_CHOICE.pattern)
    # auto: fMRIPrep's desc-brain_mask, mni152 for CAPS (t1-linear keeps the skull), none for BIDS, HCP and column;
    # none: the images are brain-extracted; mni152: nilearn's MNI152 brain mask; else a mask file per subject,
    # relative to root, with {subject} and {session}, e.g. masks/sub-{subject}_mask.nii.gz
    brain_mask: str = "auto"
    subject_column: str = "participant_id"
    # The column to learn: any column with two or more classes (sex, diagnosis, site), sex by default; with task
    # regression a numeric column (age: brain age).
    label: str = "sex"
    task: Literal["classification", "regression"] = "classification"
    # Its classes in model order [0, 1, ...]; of two, class 1 is the positive class (sensitivity, ROC) and maps
    # contrast 1 - 0; of more, each class is scored against the rest.
    classes: tuple[str, ...] = Field(SEX_CLASSES, min_length=2)
    # Values of the column -> class names; the class names (any case) and, for sex, M/F need no mapping.
    label_mapping: dict[str, str] = Field(default_factory=dict)
    # Columns that could explain the label instead of the brain (site, tiv, age): numeric when every value is a
    # number, else categorical; the verdict asks whether the result goes beyond them (study.training.confounds).
    confounds: list[str] = Field(default_factory=list)
    family_column: str | None = None  # twins and siblings share a value; default: family_id when present
    path_column: str | None = None
    on_invalid: Literal["refuse", "exclude"] = "refuse"
    synthetic: SyntheticCohort | None = None  # generate a synthetic cohort into root when it is missing

    @field_validator("classes")
    @classmethod
    def _classes_are_names(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        # Values match class names in any case; "all" names the group map of everyone (mean_all).
        if (
            len({c.casefold() for c in classes}) < len(classes)
            or not all(CLASS_NAME.match(name) for name in classes)
            or "all" in (c.casefold() for c in classes)
        ):
            raise ValueError(
                "two or more class names that differ in more than case, of letters, digits, _ or -, starting "
                "with a letter, not 'all'; e.g. [control, patient] or [control, mci, ad]"
            )
        return classes

    @field_validator("confounds")
    @classmethod
    def _confounds_are_other_columns(cls, confounds: list[str], info: ValidationInfo) -> list[str]:
        if len(set(confounds)) < len(confounds) or info.data.get("label") in confounds:
            raise ValueError(f"{confounds}: each confound once, and not the label {info.data.get('label')!r}")
        return confounds

    @field_validator("brain_mask")
    @classmethod
    def _mask_pattern_formats(cls, value: str) -> str:
        try:
            value.format(subject="01", session="1")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"auto, none, mni152, or a path with {{subject}} and {{session}} only ({err!r})") from None
        return value

    @field_validator("label")
    @classmethod
    def _label_is_not_a_study_column(cls, label: str) -> str:
        if label in RESERVED_COLUMNS:
            raise ValueError(
                f"{label!r} names a column of the study's own tables ({', '.join(RESERVED_COLUMNS)}); "
                "rename it in the participants table"
            )
        return label

    @model_validator(mode="after")
    def _mapping_names_classes(self) -> CohortConfig:
        unknown = sorted({v for v in self.label_mapping.values() if v not in self.classes})
        if unknown:
            raise ValueError(
                f"label_mapping maps to {', '.join(unknown)}, which are not among the classes "
                f"{list(self.classes)}; map each value of column {self.label!r} to one of them"
            )
        return self

    @model_validator(mode="after")
    def _regression_has_no_classes(self) -> CohortConfig:
        if self.task == "regression" and (self.label_mapping or "classes" in self.model_fields_set):
            raise ValueError(
                f"task regression learns the numbers in column {self.label!r}: remove cohort.classes and "
                "cohort.label_mapping"
            )
        return self

    @property
    def target(self) -> Target:
        """What the study learns, as every stage names it."""
        return Regression(self.label) if self.task == "regression" else Classes(self.label, self.classes)

    @property
    def participants_paths(self) -> list[Path]:
        """The participants table(s), in merge order."""
        if self.participants is None:
            return [self.root / "participants.tsv"]
        return list(self.participants) if isinstance(self.participants, list) else [self.participants]


@dataclass
class Cohort:
    """The usable subjects, the problems found in the rest, and what a researcher should know."""

    subjects: list[Subject]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    target: Target = Classes()
    confounds: tuple[str, ...] = ()  # the columns each subject's ``confounds`` holds, in this order

    @property
    def labels(self) -> np.ndarray:
        """Each subject's class index (int), or value (float, for regression), in ``subjects`` order."""
        dtype = np.float64 if self.target.kind == "regression" else np.int64
        return np.array([s.label for s in self.subjects], dtype=dtype)

    @property
    def ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    def exclude(self, problems: list[Problem]) -> Cohort:
        """The cohort without the subjects that ``problems`` name, problems appended."""
        bad = {p.subject for p in problems}
        kept = [s for s in self.subjects if s.subject_id not in bad]
        return Cohort(kept, self.problems + problems, self.warnings, self.target, self.confounds)

    def confound_table(self, subject_ids: list[str]) -> pd.DataFrame:
        """The confounds of ``subject_ids`` (rows in that order): numeric columns as floats, others as strings."""
        values = {s.subject_id: s.confounds for s in self.subjects}
        return confound_table({c: [values[s][k] for s in subject_ids] for k, c in enumerate(self.confounds)})

    def fingerprint(self) -> str:
        """A hash of who is in the cohort, their labels and their image files."""
        rows = sorted((s.subject_id, s.label, s.family_id, s.source_key()) for s in self.subjects)
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]


def load_cohort(config: CohortConfig, labelled: bool = True) -> Cohort:
    """Read the participants table, match each row to its image, and list every problem.

    Image files are found but not opened here; :func:`check_images` opens them.
    ``labelled=False`` reads new subjects to predict: no label column is needed,
    every subject's label is -1, and images without a row are not a problem (the
    table chooses whom to predict); they need the confounds of a study that
    removed them from its images.
    """
    if not config.root.is_dir():
        raise CohortError(f"cohort root is not a directory: {config.root}; set cohort.root")
    paths = config.participants_paths
    table = read_participants(paths, config.subject_column)
    confounds = tuple(config.confounds)
    where = " + ".join(str(p) for p in paths)
    _check_columns(table, config, labelled, where)
    layout, images = find_images(
        config.root, config.layout, config.path_column is not None, config.space, config.resolution, config.hcp_image
    )
    family_column = config.family_column or ("family_id" if "family_id" in table.columns else None)
    matching = Matching(
        root=config.root,
        layout=layout,
        images=images,
        table_name=" + ".join(p.name for p in paths),
        subject_column=config.subject_column,
        label_column=config.label if labelled else None,
        classes=None if config.task == "regression" else config.classes,
        label_mapping=config.label_mapping,
        family_column=family_column,
        confound_columns=confounds,
        session_column=next((c for c in SESSION_COLUMNS if c in table.columns), None),
        session=config.session,
        brain_mask=config.brain_mask,
        hcp_image=config.hcp_image,
        path_column=config.path_column,
    )
    subjects, problems = match_subjects(table, matching)
    warnings = family_warnings([s.family_id for s in subjects], family_column, where)
    if any(s.brain_mask == MNI152_MASK for s in subjects):
        warnings.append(MNI152_MASK_WARNING)
    return Cohort(subjects, problems, warnings, config.target, confounds)


MNI152_MASK_WARNING = (
    "brain mask mni152: the MNI152 brain mask shapes every image like a brain in MNI space, so the check that an "
    "image is registered to MNI152 catches only gross errors (a wrong orientation); check the registration "
    "(ClinicaDL's quality check) before the study"
)


def _check_columns(table: pd.DataFrame, config: CohortConfig, labelled: bool, where: str) -> None:
    """Every column the config names is in the table (the label only when the subjects are labelled)."""
    for column in [config.label if labelled else None, config.family_column, config.path_column, *config.confounds]:
        if column is not None and column not in table.columns:
            hcp = " (HCP: Family_ID is in the restricted table; list both tables under cohort.participants)"
            raise CohortError(
                f"{where}: no column {column!r}; columns are {list(table.columns)}. Set cohort.label / "
                f"family_column / path_column / confounds{hcp if column == config.family_column else ''}."
            )


def _check_one(path: Path, mask: Path | str | None) -> None:
    """Every check of ``study run``'s preprocessing (readable, 3D, finite, sane affine, in MNI space), on a
    4 mm grid."""
    preprocess_volume(path, Grid.mni(4.0), mask=mask)


def check_images(cohort: Cohort, tasks: TaskMap = map_tasks) -> list[Problem]:
    """Open and check every image in parallel (``tasks``: Ray tasks by default); return one problem per bad file."""
    problems = []
    args = [(s.image, s.brain_mask) for s in cohort.subjects]
    for index, _, error in tasks(_check_one, args, desc="checking images"):
        if error is not None:
            subject = cohort.subjects[index]
            problems.append(Problem(subject.subject_id, str(subject.image), str(error)))
    return sorted(problems, key=lambda p: p.subject)
