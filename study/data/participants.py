"""The participants table: read, merged over several files, and each row matched to its image and checked.

Tables are TSV or CSV, every column read as text. :func:`match_subjects` turns
each subject's row(s) into a :class:`Subject` (its image, session, label,
family and brain mask) or a :class:`Problem` that names the subject, the file
and the fix; every problem is found at once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from study.data.layouts import Found, brain_mask_of, choose_session, expected_image
from study.data.volumes import MNI152_MASK
from study.errors import CohortError

SEX_CLASSES = ("female", "male")
KNOWN_SEX_VALUES = {"m": "male", "f": "female"}  # besides the class names themselves
SUBJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # ids name files: no path separators, no ..
SESSION_COLUMNS = ("session", "session_id")  # BIDS participants tables; ClinicaDL's (one row per session)


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
    """One participant: id, label (class index, e.g. 1 male, 0 female; or the value of a regression target such as
    age; -1 unlabelled), family, and the T1w image."""

    subject_id: str
    label: int | float
    family_id: str
    image: Path
    session: str | None = None
    age: float | None = None
    site: str | None = None
    brain_mask: Path | str | None = None  # applied before the checks: a mask file, "mni152", or None
    confounds: tuple[str, ...] = ()  # the table's values of cohort.confounds, in that order

    def source_key(self) -> str:
        """Identity of the image file and its brain mask as they are now (path, size, mtime)."""
        parts = []
        for path in [self.image, *([Path(self.brain_mask)] if self.brain_mask not in (None, MNI152_MASK) else [])]:
            stat = path.stat()
            parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
        mask = f"|mask:{MNI152_MASK}" if self.brain_mask == MNI152_MASK else ""
        return hashlib.sha1(("|".join(parts) + mask).encode()).hexdigest()[:16]


def bare_id(value: str) -> str:
    """A subject id without its BIDS prefix: sub-01 -> 01."""
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
            raise CohortError(
                f"{path}: no column {subject_column!r}; columns are {list(table.columns)}. "
                "Set cohort.subject_column; every participants table needs it."
            )
        table[subject_column] = table[subject_column].str.strip()
        if merged is None:
            merged = table
            continue
        extra = [c for c in table.columns if c not in merged.columns]
        merged = merged.merge(
            table[[subject_column, *extra]].drop_duplicates(subject_column), on=subject_column, how="left"
        ).fillna("")
    return merged


def family_warnings(family_ids: list[str], family_column: str | None, where: str) -> list[str]:
    """What to know about families: none declared, or a declared column in which nobody has a relative."""
    if len(family_ids) < 2:
        return []
    if family_column is None:
        return [
            f"no family column in {where}: subjects are split as if unrelated; set cohort.family_column "
            "if the cohort has twins or siblings (HCP: Family_ID)"
        ]
    sizes = pd.Series(family_ids).value_counts()
    if (sizes == 1).all():
        return [
            f"every one of the {len(family_ids)} subjects is alone in its family in column {family_column!r} of "
            f"{where}: no twins or siblings are kept together; check the column"
        ]
    return []


@dataclass(frozen=True)
class Matching:
    """What matching rows to images needs: the cohort's layout and images, and how the config reads the table."""

    root: Path
    layout: str  # bids, fmriprep, caps, hcp or column (each subject's path in path_column)
    images: dict[str, list[Found]]  # subject -> its candidate images (one per session), from the layout
    table_name: str  # the table(s), as problems name them
    subject_column: str
    label_column: str | None  # None: new subjects to predict, with no label
    classes: tuple[str, ...] | None  # None: a regression target, a number per subject
    label_mapping: dict[str, str]  # table values -> class names
    family_column: str | None
    confound_columns: tuple[str, ...]  # cohort.confounds: each subject needs a value in each
    session_column: str | None  # a column of sessions: one row per session (ClinicaDL)
    session: str | None  # which session a subject contributes: first | last | ses-<label> (None: the table's)
    brain_mask: str  # auto | none | mni152 | a mask path pattern
    hcp_image: str
    path_column: str | None


def match_subjects(table: pd.DataFrame, matching: Matching) -> tuple[list[Subject], list[Problem]]:
    """Every subject of the table with its image, or the problem that keeps it out; and, for a labelled cohort,
    every image without a row."""
    rows, problems = _rows_by_subject(table, matching)
    subjects: list[Subject] = []
    owners: dict[Path, str] = {}  # image -> the subject it belongs to
    for sid, subject_rows in rows.items():
        read = _subject(matching, sid, subject_rows, owners)
        (subjects if isinstance(read, Subject) else problems).append(read)
    if matching.label_column is not None:  # new subjects to predict: the table chooses whom
        problems += [
            Problem(
                sid,
                str(found[0].image),
                f"image without a row in {matching.table_name}; add the subject or remove the image",
            )
            for sid, found in matching.images.items()
            if sid not in rows
        ]
    return subjects, problems


def _rows_by_subject(table: pd.DataFrame, matching: Matching) -> tuple[dict[str, list[pd.Series]], list[Problem]]:
    """Each subject's row(s) (one per session in a table of sessions), and the rows that name no usable subject."""
    rows: dict[str, list[pd.Series]] = {}
    problems, sessions, name = [], matching.session_column, matching.table_name
    for _, row in table.iterrows():
        sid = bare_id(row[matching.subject_column].strip())
        if not sid:
            problems.append(Problem("(blank)", name, "row without a subject id; fill or delete it"))
        elif not SUBJECT_ID.fullmatch(sid):
            problems.append(
                Problem(
                    sid,
                    name,
                    "a subject id of letters, digits, '.', '_' or '-' only, starting "
                    "with a letter or digit (ids name map files); rename it",
                )
            )
        elif sid in rows and (sessions is None or row[sessions] in {r[sessions] for r in rows[sid]}):
            per_session = f" (or per session, in column {sessions!r})" if sessions else ""
            problems.append(Problem(sid, name, f"duplicate subject id; keep one row per subject{per_session}"))
        else:
            rows.setdefault(sid, []).append(row)
    return rows, problems


def _subject(matching: Matching, sid: str, rows: list[pd.Series], owners: dict[Path, str]) -> Subject | Problem:
    """One subject from its row(s): its image (the session chosen), label, family and brain mask; or the first
    problem found."""
    found = _image_of(matching, sid, rows)
    if isinstance(found, Problem):
        return found
    sessions = matching.session_column
    row = (
        next((r for r in rows if r[sessions].removeprefix("ses-") == found.session), rows[0])
        if len(rows) > 1
        else rows[0]
    )
    label = _label_of(matching, sid, row)
    if isinstance(label, Problem):
        return label
    confounds = tuple(str(row[c]).strip() for c in matching.confound_columns)
    if missing := [c for c, value in zip(matching.confound_columns, confounds) if not value]:
        return Problem(
            sid,
            matching.table_name,
            f"missing value in confound column {missing[0]!r}; fill it in, or drop the row, or the column from "
            "cohort.confounds",
        )
    if (same := owners.setdefault(found.image.resolve(), sid)) != sid:  # train and test could both get it
        return Problem(
            sid,
            str(found.image),
            f"the same image as subject {same}; one scan is one subject: fix the table's path or drop one row",
        )
    mask = brain_mask_of(found, matching.brain_mask, matching.layout, matching.root, sid)
    if isinstance(mask, Path) and not mask.exists():
        return Problem(
            sid,
            str(mask),
            "no brain mask for this image (cohort.brain_mask); add it, or set cohort.brain_mask to mni152 or none",
        )
    family = (row.get(matching.family_column, "") if matching.family_column else "").strip() or f"self:{sid}"
    age, site = _float_or_none(row.get("age", "")), row.get("site") or None
    return Subject(sid, label, family, found.image, found.session, age, site, mask, confounds)


def _image_of(matching: Matching, sid: str, rows: list[pd.Series]) -> Found | Problem:
    """The subject's image: from its path column, or among the layout's images of the sessions its rows list."""
    sessions = matching.session_column
    if matching.layout == "column":
        path = Path(rows[0][matching.path_column].strip())
        candidates = [Found(None, path if path.is_absolute() else matching.root / path)]
    else:
        listed = {r[sessions].removeprefix("ses-") for r in rows} if len(rows) > 1 else set()
        candidates = [f for f in matching.images.get(sid, []) if not listed or f.session in listed]
    if not candidates:
        expected = matching.root / expected_image(matching.layout, sid, matching.hcp_image)
        return Problem(sid, str(expected), "no T1w image found for this subject; add it or drop the row")
    try:
        return choose_session(candidates, matching.session, rows[0][sessions] if sessions and len(rows) == 1 else "")
    except LookupError as err:
        return Problem(sid, str(candidates[0].image.parent), f"{err}; choose another or drop the row")


def _label_of(matching: Matching, sid: str, row: pd.Series) -> int | float | Problem:
    """The subject's class index or, for a regression target, value (-1 for a subject to predict); or why the
    table's value is not one."""
    column, classes = matching.label_column, matching.classes
    if column is None:
        return -1
    raw = row[column].strip()
    if not raw:
        return Problem(sid, matching.table_name, f"missing label in column {column!r}")
    if classes is None:
        value = _float_or_none(raw)
        if value is None or not np.isfinite(value):
            return Problem(
                sid, matching.table_name, f"{raw!r} in column {column!r} is not a number; task regression needs one"
            )
        return value
    label = parse_label(raw, classes, matching.label_mapping)
    if label is not None:
        return label
    known = " or ".join(["/".join(classes), *(["M/F"] if classes == SEX_CLASSES else [])])
    fix = (
        f"set cohort.classes to the classes of column {column!r} (e.g. [control, patient])"
        if classes == SEX_CLASSES and column.casefold() not in ("sex", "gender")
        else f"declare cohort.label_mapping (e.g. {{'{raw}': {classes[1]}}})"
    )
    if _float_or_none(raw) is not None and classes == SEX_CLASSES:  # a number where classes were expected
        fix += " (a number to predict, such as an age: cohort.task: regression)"
    return Problem(sid, matching.table_name, f"unknown label {raw!r} in column {column!r}; use {known}, or {fix}")


def parse_label(value: str, classes: tuple[str, ...], mapping: dict[str, str]) -> int | None:
    """The class index of a table value: declared in ``mapping``, a class name (any case), or M/F for sex."""
    known = {name.lower(): name for name in classes}
    if classes == SEX_CLASSES:
        known |= KNOWN_SEX_VALUES
    name = mapping.get(value) or known.get(value.strip().lower())
    return None if name is None else classes.index(name)


def _float_or_none(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def is_categorical(values: pd.Series) -> bool:
    """A confound column is numeric when every value reads as a number (age, TIV), else categorical (site)."""
    return bool(pd.to_numeric(values, errors="coerce").isna().any())


def confound_table(values: dict[str, list[str]]) -> pd.DataFrame:
    """Confound columns as a table: numeric columns as floats, categorical ones as strings."""
    table = pd.DataFrame(values)
    for column in table:
        if not is_categorical(table[column]):
            table[column] = pd.to_numeric(table[column]).astype(float)
    return table
