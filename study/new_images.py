"""The new images ``study predict`` is given: found in NIfTI files, folders and participants tables, and their
maps written back as NIfTI files in MNI152 space."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from study.data.cohort import Problem
from study.data.volumes import Grid

NIFTI = re.compile(r"\.nii(\.gz)?$")


def subject_id_of(image: Path) -> str:
    """A subject id from an image's name: the BIDS ``sub-<label>`` entity of the file name, else of the nearest
    folder (``sub-01/anat/T1w.nii.gz``), else the file name without extension."""
    for part in [image.name, *reversed(image.parent.parts)]:
        match = re.match(r"sub-([A-Za-z0-9]+)", part)
        if match:
            return match.group(1)
    return NIFTI.sub("", image.name)


def maps_name(image: Path, subject_id: str) -> str:
    """The stem of an image's map files: ``sub-<id>``, with ``_ses-<label>`` when the file name or its folder has
    one, so that two sessions of one subject do not write the same maps."""
    session = re.search(r"(?:^|_)ses-([A-Za-z0-9]+)", image.name) or next(
        (m for m in (re.fullmatch(r"ses-([A-Za-z0-9]+)", p) for p in reversed(image.parent.parts)) if m), None
    )
    return f"sub-{subject_id}" + (f"_ses-{session.group(1)}" if session else "")


def find_images(
    sources: list[Path], confounds: list[str] | None = None, known: list[str] | None = None
) -> tuple[pd.DataFrame, list[Problem]]:
    """The images to predict, as a table (subject_id, image, brain_mask, each of ``confounds`` and of ``known``),
    and sources that give none.

    Each source is a NIfTI file, a folder (its ``*.nii[.gz]`` files at any depth,
    leaving out a synthetic cohort's ``ground_truth/``), or a participants table
    (TSV/CSV) of a cohort in any layout ``study validate`` knows, with each
    image's brain mask as that layout has it (fMRIPrep's, CAPS's); new subjects
    need no label column. ``confounds``: the columns of a study that removed them
    from its images (:attr:`Ensemble.confounds`), read from the tables (files and
    folders have none: their images cannot be predicted by such a study). ``known``: columns read from the
    tables that have them, empty elsewhere (a regression study's true value, which gives the gap).
    """
    from study.data.cohort import CohortConfig, load_cohort
    from study.data.participants import read_table

    confounds, known = confounds or [], known or []
    rows, problems = [], []
    for source in sources:
        source = source.resolve()
        if not source.exists():
            problems.append(Problem("-", str(source), "no such file or folder"))
        elif source.suffix in {".tsv", ".csv"} and source.is_file():
            table = read_table(source)
            if missing := [c for c in confounds if c not in table.columns]:
                problems.append(
                    Problem(
                        "-",
                        str(source),
                        f"no column {', '.join(missing)}: the study removed {', '.join(confounds)} from its images "
                        "(cv.adjust), so its models need each new subject's values; add the column(s)",
                    )
                )
                continue
            config = CohortConfig(root=source.parent, participants=source, confounds=confounds)
            cohort = load_cohort(config, labelled=False)
            ids = table[config.subject_column].str.strip().str.removeprefix("sub-")
            values = {c: dict(zip(ids, table[c])) for c in known if c in table.columns}
            rows += [
                {
                    "subject_id": s.subject_id,
                    "image": str(s.image),
                    "brain_mask": str(s.brain_mask or ""),
                    **dict(zip(confounds, s.confounds)),
                    **{c: v.get(s.subject_id, "") for c, v in values.items()},
                }
                for s in cohort.subjects
            ]
            problems += cohort.problems
        elif source.is_dir():
            found = sorted(p for p in source.rglob("*.nii*") if NIFTI.search(p.name) and "ground_truth" not in p.parts)
            rows += [{"subject_id": subject_id_of(p), "image": str(p), "brain_mask": ""} for p in found]
            if not found:
                problems.append(Problem("-", str(source), "no .nii or .nii.gz file in this folder"))
        elif NIFTI.search(source.name):
            rows.append({"subject_id": subject_id_of(source), "image": str(source), "brain_mask": ""})
        else:
            problems.append(Problem("-", str(source), "not a NIfTI file, a folder or a participants table (.tsv/.csv)"))
    return pd.DataFrame(rows, columns=["subject_id", "image", "brain_mask", *confounds, *known]), problems


def save_maps(maps: dict[str, np.ndarray], grid: Grid, out: Path, name: str) -> list[Path]:
    """An image's maps as ``<out>/<method>/<name>_<method>.nii.gz`` on the study grid (MNI152 space); ``name`` is
    its :func:`maps_name`."""
    paths = []
    for method, values in maps.items():
        (out / method).mkdir(parents=True, exist_ok=True)
        paths.append(out / method / f"{name}_{method}.nii.gz")
        nib.save(nib.Nifti1Image(values.astype(np.float32), grid.affine), paths[-1])
    return paths
