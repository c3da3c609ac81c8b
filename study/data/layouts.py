"""Where each layout keeps a subject's T1w image: BIDS, fMRIPrep derivatives, ClinicaDL's CAPS, HCP.

Every finder returns, per subject, the images it found (one per session) with
the brain mask that belongs to each, as :class:`Found`; the cohort then picks
one session per subject (:func:`choose_session`). The exact files each layout
reads are listed in the README's input contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from study.data.volumes import MNI152_MASK
from study.errors import LayoutError

NIFTI = re.compile(r"\.nii(\.gz)?$")
HCP_IMAGES = {
    "mni": "MNINonLinear/T1w_restore_brain.nii.gz",  # registered to MNI152, brain-extracted
    "acpc": "T1w/T1w_acpc_dc_restore_brain.nii.gz",  # native (ACPC) space
}
# ClinicaDL t1-linear: bias-corrected, affinely registered to MNI152NLin2009cSym, cropped (desc-Crop), skull on.
CAPS_IMAGE = "subjects/sub-*/ses-*/t1_linear/*_T1w.nii*"
SESSION_CHOICE = re.compile(r"^(first|last|ses-[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Found:
    """One T1w image of a subject: its session (None without sessions), the file, and its brain mask file."""

    session: str | None
    image: Path
    mask: Path | None = None  # a mask written beside the image (fMRIPrep's desc-brain_mask)


def entities(name: str) -> dict[str, str]:
    """The BIDS entities of a file name: ``sub-01_ses-1_space-X_desc-preproc_T1w.nii.gz`` -> {sub, ses, space, desc}."""
    return dict(part.split("-", 1) for part in NIFTI.sub("", name).split("_") if "-" in part)


def _session_of(path: Path, root: Path) -> str | None:
    return next((p[4:] for p in path.relative_to(root).parts if p.startswith("ses-")), None)


def bids_images(root: Path) -> dict[str, list[Found]]:
    """``sub-<id>/[ses-<s>/]anat/*_T1w.nii[.gz]`` of a raw BIDS dataset."""
    found: dict[str, list[Found]] = {}
    for path in sorted(root.glob("sub-*/**/anat/*_T1w.nii*")):
        if NIFTI.search(path.name):
            subject = path.relative_to(root).parts[0].removeprefix("sub-")
            found.setdefault(subject, []).append(Found(_session_of(path, root), path))
    return found


def fmriprep_images(root: Path, space: str | None, resolution: str | None) -> dict[str, list[Found]]:
    """fMRIPrep's ``sub-<id>/[ses-<s>/]anat/sub-<id>_[ses-<s>_]space-<space>_[res-<r>_]desc-preproc_T1w.nii.gz``
    with its ``..._desc-brain_mask.nii.gz``.

    ``space`` defaults to the one MNI152 space present (an error names the
    choices when there are several); native-space images (no ``space-``) and
    ``res-`` variants are left out unless ``resolution`` names one.
    """
    images = {
        p: entities(p.name) for p in sorted(root.glob("sub-*/**/anat/*_desc-preproc_T1w.nii*")) if NIFTI.search(p.name)
    }
    # The spaces at the asked resolution: fMRIPrep's common extra MNI152NLin6Asym comes as res-2 only.
    spaces = sorted({e.get("space") for e in images.values() if e.get("res") == resolution} - {None})
    if space is None:
        mni = [s for s in spaces if s.startswith("MNI152")]
        if len(mni) != 1:
            raise LayoutError(
                f"{root}: fMRIPrep images in {len(mni)} MNI152 spaces ({', '.join(mni) or 'none'}; all "
                f"spaces at resolution {resolution or '(none)'}: {', '.join(spaces) or 'none'}); set "
                "cohort.space to the one to use (and cohort.resolution for a res- variant)"
                + ("" if mni else ", or run fMRIPrep with --output-spaces MNI152NLin2009cAsym")
            )
        space = mni[0]
    elif space not in spaces:
        variants = sorted({f"{e.get('space')} res-{e['res']}" for e in images.values() if "res" in e})
        raise LayoutError(
            f"{root}: no fMRIPrep image in space {space!r} at resolution {resolution or '(none)'} "
            f"(cohort.space, cohort.resolution); spaces present: {', '.join(spaces) or 'none'}"
            + (f"; res- variants: {', '.join(variants)}" if variants else "")
        )
    found: dict[str, list[Found]] = {}
    for path, named in images.items():
        if named.get("space") != space or named.get("res") != resolution:
            continue
        mask = path.with_name(path.name.replace("_desc-preproc_T1w", "_desc-brain_mask"))
        found.setdefault(named["sub"], []).append(Found(_session_of(path, root), path, mask))
    return found


def caps_images(root: Path) -> dict[str, list[Found]]:
    """ClinicaDL's ``subjects/sub-<id>/ses-<s>/t1_linear/*_T1w.nii.gz`` (the cropped image when both are there)."""
    found: dict[str, dict[str | None, Path]] = {}
    for path in sorted(root.glob(CAPS_IMAGE)):
        if not NIFTI.search(path.name):
            continue
        subject, session = path.parts[-4].removeprefix("sub-"), path.parts[-3].removeprefix("ses-")
        kept = found.setdefault(subject, {}).get(session)
        if kept is None or ("desc-Crop" in path.name and "desc-Crop" not in kept.name):
            found[subject][session] = path
    return {
        s: [Found(session, path) for session, path in sorted(by_session.items())] for s, by_session in found.items()
    }


def hcp_images(root: Path, which: str) -> dict[str, list[Found]]:
    """HCP's ``<id>/MNINonLinear/T1w_restore_brain.nii.gz`` (or the ACPC image)."""
    relative = HCP_IMAGES[which]
    return {d.name: [Found(None, d / relative)] for d in sorted(root.iterdir()) if (d / relative).exists()}


def expected_image(layout: str, subject: str, hcp_image: str) -> str:
    """Where a layout looks for a subject's image, for the message when there is none."""
    return {
        "bids": f"sub-{subject}/[ses-*/]anat/*_T1w.nii[.gz]",
        "fmriprep": f"sub-{subject}/[ses-*/]anat/sub-{subject}_*space-<MNI152 space>_desc-preproc_T1w.nii.gz",
        "caps": f"subjects/sub-{subject}/ses-*/t1_linear/*_T1w.nii.gz",
        "hcp": f"{subject}/{HCP_IMAGES[hcp_image]}",
    }[layout]


def _generated_by(root: Path) -> str:
    """The pipeline a derivative dataset's dataset_description.json names ('' for a raw dataset or none)."""
    try:
        description = json.loads((root / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return ""
    if description.get("DatasetType") != "derivative":
        return ""
    return " ".join(str(g.get("Name", "")) for g in description.get("GeneratedBy", []) if isinstance(g, dict)).lower()


def detect_layout(root: Path) -> tuple[str, Path]:
    """The layout of a cohort folder, and the folder its images are in.

    fMRIPrep: a derivative dataset generated by fMRIPrep, or a raw dataset with
    ``derivatives/fmriprep`` (its images are read there). CAPS: ``subjects/sub-*``.
    BIDS: ``sub-*``. Anything else is read as HCP.
    """
    if "fmriprep" in _generated_by(root):
        return "fmriprep", root
    if (root / "derivatives" / "fmriprep").is_dir():
        return "fmriprep", root / "derivatives" / "fmriprep"
    if any((root / "subjects").glob("sub-*")):
        return "caps", root
    if any(root.glob("sub-*")):
        return "bids", root
    return "hcp", root


def find_images(
    root: Path, layout: str, path_column: bool, space: str | None, resolution: str | None, hcp_image: str
) -> tuple[str, dict[str, list[Found]]]:
    """The layout of a cohort folder (``auto`` detected, see :func:`detect_layout`) and each subject's images in
    it; none for the column layout (``path_column``: the table names them). Raises LayoutError."""
    if layout == "auto":
        layout, root = ("column", root) if path_column else detect_layout(root)
    elif layout == "fmriprep" and (root / "derivatives" / "fmriprep").is_dir():
        root = root / "derivatives" / "fmriprep"
    finders = {
        "column": lambda: {},
        "bids": lambda: bids_images(root),
        "fmriprep": lambda: fmriprep_images(root, space, resolution),
        "caps": lambda: caps_images(root),
        "hcp": lambda: hcp_images(root, hcp_image),
    }
    return layout, finders[layout]()


def brain_mask_of(found: Found, setting: str, layout: str, root: Path, subject: str) -> Path | str | None:
    """The brain mask of one image as ``cohort.brain_mask`` (``setting``) asks: ``auto`` (fMRIPrep's own mask,
    the MNI152 mask for CAPS, none otherwise), ``none``, ``mni152``, or a path under ``root`` with
    ``{subject}`` and ``{session}``."""
    if setting == "auto":
        return found.mask if layout == "fmriprep" else MNI152_MASK if layout == "caps" else None
    if setting in ("none", MNI152_MASK):
        return None if setting == "none" else MNI152_MASK
    return root / setting.format(subject=subject, session=found.session or "")


def choose_session(candidates: list[Found], wanted: str | None, table_session: str) -> Found:
    """One image per subject: the config's choice (``first``, ``last`` or ``ses-<label>``), else the session the
    table names, else the first. Sessions sort by their label. Raises LookupError when the asked one is missing."""
    ordered = sorted(candidates, key=lambda f: f.session or "")
    label = (wanted if wanted not in (None, "first", "last") else table_session or "").removeprefix("ses-")
    if wanted == "last":
        return ordered[-1]
    if label and wanted != "first":
        for found in ordered:
            if found.session == label:
                return found
        if wanted is not None:
            raise LookupError(
                f"no session ses-{label} (cohort.session); sessions: "
                f"{', '.join(f'ses-{f.session}' for f in ordered if f.session) or 'none'}"
            )
    return ordered[0]
