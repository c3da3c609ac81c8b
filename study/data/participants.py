"""Participants tables: read (TSV or CSV, every column as text), merged over several files, checked for families."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.errors import CohortError


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
