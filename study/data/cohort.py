"""Cohorts: a participants table plus one T1-weighted image per subject.

:func:`load_cohort` reads the table, finds the images (BIDS, HCP, or an
explicit path column) and checks everything that can be checked without
opening an image; :func:`check_images` opens every image in parallel. Each
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

from study.data.synth import SyntheticCohort
from study.data.volumes import Grid, preprocess_volume

SEX_CLASSES = ("female", "male")
KNOWN_SEX_VALUES = {"m": "male", "f": "female"}  # besides the class names themselves
RESERVED_COLUMNS = ("subject_id", "image", "predicted", "fold", "problem")  # columns of prediction tables
CLASS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # a class name becomes a column name (p_<class>) and a metric name
HCP_IMAGES = {
    "acpc": "T1w/T1w_acpc_dc_restore_brain.nii.gz",
    "mni": "MNINonLinear/T1w_restore_brain.nii.gz",
}


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
        return pd.DataFrame({"subject_id": subject_ids, self.column: names[np.asarray(labels, int)], self.p: p,
                             "predicted": names[(np.asarray(p) >= 0.5).astype(int)]})


class CohortConfig(BaseModel):
    """Where the images and the participants table are, and how to read them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    root: Path
    # The participants table (default: ROOT/participants.tsv), or several merged on the subject column:
    # HCP keeps Gender in its unrestricted table and Family_ID in its restricted one.
    participants: Path | list[Path] | None = None
    layout: Literal["auto", "bids", "hcp", "column"] = "auto"
    hcp_image: Literal["acpc", "mni"] = "mni"
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
        if classes[0].casefold() == classes[1].casefold() or not all(CLASS_NAME.match(name) for name in classes) \
                or "all" in (c.casefold() for c in classes):
            raise ValueError("two class names that differ in more than case, of letters, digits, _ or -, starting "
                             "with a letter, not 'all'; e.g. [control, patient]")
        return classes

    @field_validator("label")
    @classmethod
    def _label_is_not_a_study_column(cls, label: str) -> str:
        if label in RESERVED_COLUMNS:
            raise ValueError(f"{label!r} names a column of the study's own tables ({', '.join(RESERVED_COLUMNS)}); "
                             "rename it in the participants table")
        return label

    @model_validator(mode="after")
    def _mapping_names_classes(self) -> "CohortConfig":
        unknown = sorted({v for v in self.label_mapping.values() if v not in self.classes})
        if unknown:
            raise ValueError(f"label_mapping maps to {', '.join(unknown)}, which are not among the classes "
                             f"{list(self.classes)}; map each value of column {self.label!r} to one of them")
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


class CohortError(ValueError):
    """A cohort that cannot be used at all (no table, no subject column, ...)."""


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

    def source_key(self) -> str:
        """Identity of the image file as it is now (path, size, mtime)."""
        stat = self.image.stat()
        return hashlib.sha1(f"{self.image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


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

    def exclude(self, problems: list[Problem]) -> "Cohort":
        """The cohort without the subjects that ``problems`` name, problems appended."""
        bad = {p.subject for p in problems}
        return Cohort([s for s in self.subjects if s.subject_id not in bad], self.problems + problems, self.warnings,
                      self.classes)

    def fingerprint(self) -> str:
        """A hash of who is in the cohort, their labels and their image files."""
        rows = sorted((s.subject_id, s.label, s.family_id, s.source_key()) for s in self.subjects)
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]


def _bare_id(value: str) -> str:
    return value[4:] if value.startswith("sub-") else value


def read_table(path: Path) -> pd.DataFrame:
    """Read a BIDS ``participants.tsv`` or a CSV, every column as text."""
    if not path.exists():
        raise CohortError(f"participants table not found: {path}; set cohort.participants")
    sep = "\t" if path.suffix.lower() in {".tsv", ".txt"} else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CohortError(f"participants table {path} cannot be parsed: {err}") from None


def read_participants(paths: list[Path], subject_column: str) -> pd.DataFrame:
    """One table of the subjects of the first table, with the columns of every table (merged on the subject).

    A column that two tables share keeps the first table's values.
    """
    merged = None
    for path in paths:
        table = read_table(path)
        if subject_column not in table.columns:
            raise CohortError(f"{path}: no column {subject_column!r}; columns are {list(table.columns)}. "
                              "Set cohort.subject_column; every participants table needs it.")
        table[subject_column] = table[subject_column].str.strip()
        if merged is None:
            merged = table
            continue
        extra = [c for c in table.columns if c not in merged.columns]
        merged = merged.merge(table[[subject_column, *extra]].drop_duplicates(subject_column), on=subject_column,
                              how="left").fillna("")
    return merged


def _bids_images(root: Path) -> dict[str, list[tuple[str | None, Path]]]:
    """Subject -> [(session, T1w path)] for ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``."""
    found: dict[str, list[tuple[str | None, Path]]] = {}
    for path in sorted(root.glob("sub-*/**/anat/*_T1w.nii*")):
        if not re.search(r"\.nii(\.gz)?$", path.name):
            continue
        subject = _bare_id(path.relative_to(root).parts[0])
        session = next((p[4:] for p in path.relative_to(root).parts if p.startswith("ses-")), None)
        found.setdefault(subject, []).append((session, path))
    return found


def _hcp_images(root: Path, which: str) -> dict[str, list[tuple[str | None, Path]]]:
    relative = HCP_IMAGES[which]
    return {d.name: [(None, d / relative)] for d in sorted(root.iterdir()) if (d / relative).exists()}


def _detect_layout(config: CohortConfig) -> str:
    if config.layout != "auto":
        return config.layout
    if config.path_column:
        return "column"
    if any(config.root.glob("sub-*")):
        return "bids"
    return "hcp"


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
                + (" (HCP: Family_ID is in the restricted table; list both tables under cohort.participants)."
                   if column == config.family_column else ".")
            )
    family_column = config.family_column or ("family_id" if "family_id" in table.columns else None)
    layout = _detect_layout(config)
    images = {} if layout == "column" else (
        _bids_images(config.root) if layout == "bids" else _hcp_images(config.root, config.hcp_image)
    )
    problems: list[Problem] = []
    subjects: list[Subject] = []
    seen: set[str] = set()
    for _, row in table.iterrows():
        sid = _bare_id(row[config.subject_column].strip())
        if not sid:
            problems.append(Problem("(blank)", table_name, "row without a subject id; fill or delete it"))
            continue
        if sid in seen:
            problems.append(Problem(sid, table_name, "duplicate subject id; keep one row per subject"))
            continue
        seen.add(sid)
        raw = row[config.label].strip() if labelled else "-"
        label = _parse_label(raw, config) if labelled else -1
        if not raw:
            problems.append(Problem(sid, table_name, f"missing label in column {config.label!r}"))
            continue
        if label is None:
            known = " or ".join(["/".join(config.classes), *(["M/F"] if config.classes == SEX_CLASSES else [])])
            fix = (f"set cohort.classes to the two classes of column {config.label!r} (e.g. [control, patient])"
                   if config.classes == SEX_CLASSES and config.label.casefold() not in ("sex", "gender") else
                   f"declare cohort.label_mapping (e.g. {{'{raw}': {config.classes[1]}}})")
            problems.append(Problem(sid, table_name, f"unknown label {raw!r} in column {config.label!r}; use "
                                                     f"{known}, or {fix}"))
            continue
        if layout == "column":
            path = Path(row[config.path_column].strip())
            candidates = [(None, path if path.is_absolute() else config.root / path)]
        else:
            candidates = images.get(sid, [])
        if not candidates:
            expected = f"sub-{sid}/[ses-*/]anat/*_T1w.nii[.gz]" if layout == "bids" else f"{sid}/{HCP_IMAGES[config.hcp_image]}"
            problems.append(Problem(sid, str(config.root / expected), "no T1w image found for this subject; add it or drop the row"))
            continue
        session, image = _choose_session(candidates, row.get("session", ""))
        family = (row.get(family_column, "") if family_column else "").strip() or f"self:{sid}"
        subjects.append(Subject(
            subject_id=sid, label=label, family_id=family, image=image,
            session=session, age=_float_or_none(row.get("age", "")), site=row.get("site") or None,
        ))
    for sid, found in images.items():
        if labelled and sid not in seen:
            problems.append(Problem(sid, str(found[0][1]), f"image without a row in {table_name}; add the subject or remove the image"))
    return Cohort(subjects, problems, _family_warnings(subjects, family_column, where), config.task)


def _family_warnings(subjects: list[Subject], family_column: str | None, where: str) -> list[str]:
    """What to know about families: none declared, or a declared column in which nobody has a relative."""
    if len(subjects) < 2:
        return []
    if family_column is None:
        return [f"no family column in {where}: subjects are split as if unrelated; set cohort.family_column "
                "if the cohort has twins or siblings (HCP: Family_ID)"]
    sizes = pd.Series([s.family_id for s in subjects]).value_counts()
    if (sizes == 1).all():
        return [f"every one of the {len(subjects)} subjects is alone in its family in column {family_column!r} of "
                f"{where}: no twins or siblings are kept together; check the column"]
    return []


def _choose_session(candidates: list[tuple[str | None, Path]], wanted: str) -> tuple[str | None, Path]:
    """The image of the session named in the table, else the first session."""
    for session, path in candidates:
        if wanted and session == wanted.removeprefix("ses-"):
            return session, path
    return candidates[0]


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_one(path: Path) -> None:
    """Every check of ``study run``'s preprocessing (readable, 3D, finite, sane affine, in MNI space), on a 4 mm grid."""
    preprocess_volume(path, Grid.mni(4.0))


def check_images(cohort: Cohort) -> list[Problem]:
    """Open and check every image in parallel (Ray tasks); return one problem per bad file."""
    from study.runtime import map_tasks  # here, not at the top: the command line reads CohortConfig without Ray

    problems = []
    args = [(s.image,) for s in cohort.subjects]
    for index, _, error in map_tasks(_check_one, args, desc="checking images"):
        if error is not None:
            subject = cohort.subjects[index]
            problems.append(Problem(subject.subject_id, str(subject.image), str(error)))
    return sorted(problems, key=lambda p: p.subject)
