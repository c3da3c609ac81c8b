"""Cohorts: a participants table plus one T1-weighted image per subject.

:func:`load_cohort` reads the table (:mod:`.participants`), finds the images
(BIDS, fMRIPrep, CAPS, HCP: :mod:`.layouts`; or an explicit path column),
picks one session per subject and its brain mask, and checks everything that
can be checked without opening an image; :func:`check_images` opens every
image in parallel. Each
problem is a :class:`Problem` naming the subject, the file and the fix, and all
of them are reported at once.
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
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from study.data.layouts import SESSION_CHOICE, Found, brain_mask_of, choose_session, expected_image, find_images
from study.data.participants import bare_id, family_warnings, read_participants
from study.data.synth import SyntheticCohort
from study.data.volumes import MNI152_MASK, Grid, preprocess_volume
from study.errors import CohortError, LayoutError
from study.tasks import TaskMap, map_tasks

SEX_CLASSES = ("female", "male")
KNOWN_SEX_VALUES = {"m": "male", "f": "female"}  # besides the class names themselves
RESERVED_COLUMNS = ("subject_id", "image", "predicted", "fold", "problem")  # columns of prediction tables
CLASS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # a class name becomes a column name (p_<class>) and a metric name
SUBJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # ids name files: no path separators, no ..
SESSION_COLUMNS = ("session", "session_id")  # BIDS participants tables; ClinicaDL's (one row per session)


@dataclass(frozen=True)
class Classes:
    """What a study tells apart: a participants-table column and its two classes, in model order [0, 1].

    Class 1 is the positive class of every metric (sensitivity, ROC AUC) and the
    first term of every difference of maps (class 1 - class 0).
    """

    column: str = "sex"
    names: tuple[str, str] = SEX_CLASSES

    @property
    def positive(self) -> str:
        return self.names[1]

    @property
    def p(self) -> str:
        """The column of P(class 1) in prediction tables, e.g. ``p_male``."""
        return f"p_{self.names[1]}"

    @property
    def contrast(self) -> str:
        """``male - female``."""
        return f"{self.names[1]} - {self.names[0]}"

    def predictions(self, subject_ids: list[str], labels: np.ndarray, p: np.ndarray) -> pd.DataFrame:
        """A held-out prediction table: subject_id, the true class, P(class 1), the predicted class."""
        names = np.array(self.names)
        return pd.DataFrame(
            {
                "subject_id": subject_ids,
                self.column: names[np.asarray(labels, int)],
                self.p: p,
                "predicted": names[(np.asarray(p) >= 0.5).astype(int)],
            }
        )


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
    # The column to classify: any column with two classes (sex, diagnosis, site), sex by default.
    label: str = "sex"
    # Its classes in model order [0, 1]; class 1 is the positive class (sensitivity, ROC) and maps contrast 1 - 0.
    classes: tuple[str, str] = SEX_CLASSES
    # Values of the column -> class names; the class names (any case) and, for sex, M/F need no mapping.
    label_mapping: dict[str, str] = Field(default_factory=dict)
    family_column: str | None = None  # twins and siblings share a value; default: family_id when present
    path_column: str | None = None
    on_invalid: Literal["refuse", "exclude"] = "refuse"
    synthetic: SyntheticCohort | None = None  # generate a synthetic cohort into root when it is missing

    @field_validator("classes")
    @classmethod
    def _classes_are_names(cls, classes: tuple[str, str]) -> tuple[str, str]:
        # Values match class names in any case; "all" names the group map of everyone (mean_all).
        if (
            classes[0].casefold() == classes[1].casefold()
            or not all(CLASS_NAME.match(name) for name in classes)
            or "all" in (c.casefold() for c in classes)
        ):
            raise ValueError(
                "two class names that differ in more than case, of letters, digits, _ or -, starting "
                "with a letter, not 'all'; e.g. [control, patient]"
            )
        return classes

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

    @property
    def task(self) -> Classes:
        """What the study tells apart, as every stage names it."""
        return Classes(self.label, self.classes)

    @property
    def participants_paths(self) -> list[Path]:
        """The participants table(s), in merge order."""
        if self.participants is None:
            return [self.root / "participants.tsv"]
        return list(self.participants) if isinstance(self.participants, list) else [self.participants]


@dataclass(frozen=True)
class Problem:
    """One defect in a cohort, named by subject and file, with what to do about it."""

    subject: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}\t{self.file}\t{self.message}"


@dataclass(frozen=True)
class Subject:
    """One participant: id, label (class index, e.g. 1 male, 0 female; -1 unlabelled), family, and the T1w image."""

    subject_id: str
    label: int
    family_id: str
    image: Path
    session: str | None = None
    age: float | None = None
    site: str | None = None
    brain_mask: Path | str | None = None  # applied before the checks: a mask file, "mni152", or None

    def source_key(self) -> str:
        """Identity of the image file and its brain mask as they are now (path, size, mtime)."""
        parts = []
        for path in [self.image, *([Path(self.brain_mask)] if self.brain_mask not in (None, MNI152_MASK) else [])]:
            stat = path.stat()
            parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
        mask = f"|mask:{MNI152_MASK}" if self.brain_mask == MNI152_MASK else ""
        return hashlib.sha1(("|".join(parts) + mask).encode()).hexdigest()[:16]


@dataclass
class Cohort:
    """The usable subjects, the problems found in the rest, and what a researcher should know."""

    subjects: list[Subject]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    classes: Classes = Classes()

    @property
    def labels(self) -> np.ndarray:
        """Class index of each subject, in ``subjects`` order."""
        return np.array([s.label for s in self.subjects], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    def exclude(self, problems: list[Problem]) -> Cohort:
        """The cohort without the subjects that ``problems`` name, problems appended."""
        bad = {p.subject for p in problems}
        return Cohort(
            [s for s in self.subjects if s.subject_id not in bad], self.problems + problems, self.warnings, self.classes
        )

    def fingerprint(self) -> str:
        """A hash of who is in the cohort, their labels and their image files."""
        rows = sorted((s.subject_id, s.label, s.family_id, s.source_key()) for s in self.subjects)
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]


def _parse_label(value: str, config: CohortConfig) -> int | None:
    """The class index of a table value: declared in label_mapping, a class name (any case), or M/F for sex."""
    known = {name.lower(): name for name in config.classes}
    if config.classes == SEX_CLASSES:
        known |= KNOWN_SEX_VALUES
    name = config.label_mapping.get(value) or known.get(value.strip().lower())
    return None if name is None else config.classes.index(name)


def load_cohort(config: CohortConfig, labelled: bool = True) -> Cohort:
    """Read the participants table, match each row to its image, and list every problem.

    Image files are found but not opened here; :func:`check_images` opens them.
    ``labelled=False`` reads new subjects to predict: no label column is needed,
    every subject's label is -1, and images without a row are not a problem (the
    table chooses whom to predict).
    """
    if not config.root.is_dir():
        raise CohortError(f"cohort root is not a directory: {config.root}; set cohort.root")
    paths = config.participants_paths
    table = read_participants(paths, config.subject_column)
    table_name = " + ".join(p.name for p in paths)
    where = " + ".join(str(p) for p in paths)
    for column in [config.label if labelled else None, config.family_column, config.path_column]:
        if column is not None and column not in table.columns:
            raise CohortError(
                f"{where}: no column {column!r}; columns are {list(table.columns)}. "
                "Set cohort.label / family_column / path_column"
                + (
                    " (HCP: Family_ID is in the restricted table; list both tables under cohort.participants)."
                    if column == config.family_column
                    else "."
                )
            )
    family_column = config.family_column or ("family_id" if "family_id" in table.columns else None)
    try:
        layout, images = find_images(
            config.root,
            config.layout,
            config.path_column is not None,
            config.space,
            config.resolution,
            config.hcp_image,
        )
    except LayoutError as err:
        raise CohortError(str(err)) from None
    session_column = next((c for c in SESSION_COLUMNS if c in table.columns), None)
    problems: list[Problem] = []
    subjects: list[Subject] = []
    rows: dict[str, list[pd.Series]] = {}
    owners: dict[Path, str] = {}  # image -> the subject it belongs to
    for _, row in table.iterrows():
        sid = bare_id(row[config.subject_column].strip())
        if not sid:
            problems.append(Problem("(blank)", table_name, "row without a subject id; fill or delete it"))
        elif not SUBJECT_ID.fullmatch(sid):
            problems.append(
                Problem(
                    sid,
                    table_name,
                    "a subject id of letters, digits, '.', '_' or '-' only, starting "
                    "with a letter or digit (ids name map files); rename it",
                )
            )
        elif sid in rows and (session_column is None or row[session_column] in {r[session_column] for r in rows[sid]}):
            problems.append(
                Problem(
                    sid,
                    table_name,
                    "duplicate subject id; keep one row per subject"
                    + (f" (or per session, in column {session_column!r})" if session_column else ""),
                )
            )
        else:
            rows.setdefault(sid, []).append(row)
    for sid, subject_rows in rows.items():
        if layout == "column":
            path = Path(subject_rows[0][config.path_column].strip())
            candidates = [Found(None, path if path.is_absolute() else config.root / path)]
        else:
            candidates = images.get(sid, [])
            listed = {r[session_column].removeprefix("ses-") for r in subject_rows} if len(subject_rows) > 1 else set()
            candidates = [f for f in candidates if f.session in listed] if listed else candidates
        if not candidates:
            problems.append(
                Problem(
                    sid,
                    str(config.root / expected_image(layout, sid, config.hcp_image)),
                    "no T1w image found for this subject; add it or drop the row",
                )
            )
            continue
        try:
            found = choose_session(
                candidates,
                config.session,
                subject_rows[0][session_column] if session_column and len(subject_rows) == 1 else "",
            )
        except LookupError as err:
            problems.append(Problem(sid, str(candidates[0].image.parent), f"{err}; choose another or drop the row"))
            continue
        row = (
            next((r for r in subject_rows if r[session_column].removeprefix("ses-") == found.session), subject_rows[0])
            if len(subject_rows) > 1
            else subject_rows[0]
        )
        raw = row[config.label].strip() if labelled else "-"
        label = _parse_label(raw, config) if labelled else -1
        if not raw:
            problems.append(Problem(sid, table_name, f"missing label in column {config.label!r}"))
            continue
        if label is None:
            known = " or ".join(["/".join(config.classes), *(["M/F"] if config.classes == SEX_CLASSES else [])])
            fix = (
                f"set cohort.classes to the two classes of column {config.label!r} (e.g. [control, patient])"
                if config.classes == SEX_CLASSES and config.label.casefold() not in ("sex", "gender")
                else f"declare cohort.label_mapping (e.g. {{'{raw}': {config.classes[1]}}})"
            )
            problems.append(
                Problem(sid, table_name, f"unknown label {raw!r} in column {config.label!r}; use {known}, or {fix}")
            )
            continue
        if (same := owners.setdefault(found.image.resolve(), sid)) != sid:  # train and test could both get it
            problems.append(
                Problem(
                    sid,
                    str(found.image),
                    f"the same image as subject {same}; one scan is one subject: fix the table's path or drop one row",
                )
            )
            continue
        mask = brain_mask_of(found, config.brain_mask, layout, config.root, sid)
        if isinstance(mask, Path) and not mask.exists():
            problems.append(
                Problem(
                    sid,
                    str(mask),
                    "no brain mask for this image (cohort.brain_mask); add it, or set "
                    "cohort.brain_mask to mni152 or none",
                )
            )
            continue
        family = (row.get(family_column, "") if family_column else "").strip() or f"self:{sid}"
        subjects.append(
            Subject(
                subject_id=sid,
                label=label,
                family_id=family,
                image=found.image,
                session=found.session,
                age=_float_or_none(row.get("age", "")),
                site=row.get("site") or None,
                brain_mask=mask,
            )
        )
    for sid, found in images.items():
        if labelled and sid not in rows:
            problems.append(
                Problem(
                    sid,
                    str(found[0].image),
                    f"image without a row in {table_name}; add the subject or remove the image",
                )
            )
    warnings = family_warnings([s.family_id for s in subjects], family_column, where)
    if any(s.brain_mask == MNI152_MASK for s in subjects):
        warnings.append(
            "brain mask mni152: the MNI152 brain mask shapes every image like a brain in MNI space, so "
            "the check that an image is registered to MNI152 catches only gross errors (a wrong "
            "orientation); check the registration (ClinicaDL's quality check) before the study"
        )
    return Cohort(subjects, problems, warnings, config.task)


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
