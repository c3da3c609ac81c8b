"""Folders as fMRIPrep, ClinicaDL (CAPS) and HCP write them, made from synthetic images, read as they are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from study.cli import main
from study.config import PreprocessConfig
from study.data.cohort import CohortConfig, load_cohort
from study.data.prepare import prepare_cohort
from study.data.synth import with_skull
from study.data.volumes import MNI152_MASK
from study.errors import CohortError
from study.tasks import map_in_process
from tests.test_cohort import image_of

MNI = "MNI152NLin2009cAsym"


def subjects_of(root: Path) -> list[str]:
    return sorted(p.name.removeprefix("sub-") for p in root.glob("sub-*"))


def native(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image 30 mm off, as a native-space T1w is against MNI152."""
    affine = image.affine.copy()
    affine[:3, 3] += [0, 30, 0]
    return nib.Nifti1Image(np.asarray(image.dataobj), affine)


def fmriprep_folder(cohort: Path, out: Path, spaces: tuple[str, ...] = (MNI,)) -> Path:
    """fMRIPrep's anat outputs: the native-space preprocessed T1w (sorted first), the MNI152 T1w with the skull on,
    its brain mask and a res-2 variant; the raw dataset's participants.tsv beside them."""
    out.mkdir(parents=True)
    for sid in subjects_of(cohort):
        brain = nib.load(image_of(cohort, sid))
        anat = out / f"sub-{sid}" / "anat"
        anat.mkdir(parents=True)
        nib.save(with_skull(native(brain)), anat / f"sub-{sid}_desc-preproc_T1w.nii.gz")
        for space in spaces:
            nib.save(with_skull(brain), anat / f"sub-{sid}_space-{space}_desc-preproc_T1w.nii.gz")
            mask = nib.Nifti1Image((np.asarray(brain.dataobj) > 0).astype(np.uint8), brain.affine)
            nib.save(mask, anat / f"sub-{sid}_space-{space}_desc-brain_mask.nii.gz")
            nib.save(with_skull(native(brain)), anat / f"sub-{sid}_space-{space}_res-2_desc-preproc_T1w.nii.gz")
    (out / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "fMRIPrep outputs",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}],
            }
        )
    )
    shutil.copy(cohort / "participants.tsv", out / "participants.tsv")
    return out


def caps_folder(cohort: Path, out: Path) -> Path:
    """ClinicaDL's t1-linear in a CAPS: two sessions per subject, skull on, and its one-row-per-session table.
    Session M012 of each subject is a 4D file, so that reading it fails."""
    rows = ["participant_id\tsession_id\tsex"]
    sexes = {
        line.split("\t")[0]: line.split("\t")[1] for line in (cohort / "participants.tsv").read_text().splitlines()[1:]
    }
    for sid in subjects_of(cohort):
        brain = nib.load(image_of(cohort, sid))
        skull = with_skull(brain)
        later = nib.Nifti1Image(np.stack([np.asarray(skull.dataobj)] * 2, -1), brain.affine)
        for session, image in (("M000", skull), ("M012", later)):
            folder = out / "subjects" / f"sub-{sid}" / f"ses-{session}" / "t1_linear"
            folder.mkdir(parents=True)
            name = f"sub-{sid}_ses-{session}_T1w_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
            nib.save(image, folder / name)
            rows.append(f"sub-{sid}\tses-{session}\t{sexes[f'sub-{sid}']}")
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    return out


def validate(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(["validate", *args], tasks=map_in_process)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_fmriprep_derivatives_are_read_with_their_mni_image_and_brain_mask(synthetic_root, tmp_path, capsys):
    root = fmriprep_folder(synthetic_root, tmp_path / "fmriprep")
    cohort = load_cohort(CohortConfig(root=root))
    assert len(cohort.subjects) == 12 and not cohort.problems
    first = cohort.subjects[0]
    assert first.image.name == f"sub-{first.subject_id}_space-{MNI}_desc-preproc_T1w.nii.gz"
    assert first.brain_mask == first.image.with_name(f"sub-{first.subject_id}_space-{MNI}_desc-brain_mask.nii.gz")
    code, lines, err = validate([str(root)], capsys)
    assert (code, lines) == (0, []) and "12 subjects OK, 0 problems" in err
    # Without the mask the skull stays on: every image is refused by the MNI check, named with its file.
    code, lines, _ = validate([str(root), "--brain-mask", "none"], capsys)
    assert code == 1 and len(lines) == 12 and all("overlaps the MNI152 brain mask by 0." in line for line in lines)
    assert all(f"space-{MNI}_desc-preproc_T1w" in line.split("\t")[1] for line in lines)

    # Raw dataset with derivatives/fmriprep: auto reads the derivatives; the raw images are not it.
    raw = Path(shutil.copytree(synthetic_root, tmp_path / "raw"))
    shutil.move(str(root), raw / "derivatives" / "fmriprep")
    assert all(
        s.image.is_relative_to(raw / "derivatives" / "fmriprep") and s.brain_mask
        for s in load_cohort(CohortConfig(root=raw)).subjects
    )


def test_fmriprep_spaces_and_resolutions_are_chosen_by_name(synthetic_root, tmp_path):
    cohort = Path(
        shutil.copytree(
            synthetic_root,
            tmp_path / "cohort",
            ignore=lambda folder, names: [
                n
                for n in names
                if Path(folder) == synthetic_root and n.startswith("sub-") and n not in ("sub-0001", "sub-0002")
            ],
        )
    )
    (cohort / "participants.tsv").write_text("\n".join((cohort / "participants.tsv").read_text().splitlines()[:3]))
    root = fmriprep_folder(cohort, tmp_path / "fmriprep", spaces=(MNI, "MNI152NLin6Asym"))
    with pytest.raises(
        CohortError,
        match="fMRIPrep images in 2 MNI152 spaces \\(MNI152NLin2009cAsym, MNI152NLin6Asym; .*set cohort.space",
    ):
        load_cohort(CohortConfig(root=root))
    chosen = load_cohort(CohortConfig(root=root, space="MNI152NLin6Asym"))
    assert all("space-MNI152NLin6Asym_desc-preproc" in s.image.name for s in chosen.subjects)
    resolution = load_cohort(CohortConfig(root=root, space=MNI, resolution="2"))
    assert all("_res-2_" in s.image.name for s in resolution.subjects)
    assert [p.subject for p in resolution.problems] == ["0001", "0002"]  # fMRIPrep writes no res-2 mask here
    with pytest.raises(
        CohortError,
        match="no fMRIPrep image in space 'T1w' at resolution \\(none\\) "
        "\\(cohort.space, cohort.resolution\\); .*res- variants: MNI152NLin2009cAsym res-2",
    ):
        load_cohort(CohortConfig(root=root, space="T1w"))
    for extra in root.glob("sub-*/anat/*_space-MNI152NLin6Asym_desc-*"):  # as fMRIPrep often writes it: res-2 only
        extra.unlink()
    assert all(f"space-{MNI}_desc-preproc" in s.image.name for s in load_cohort(CohortConfig(root=root)).subjects)


def test_caps_t1_linear_is_brain_extracted_with_the_mni152_mask_and_sessions_are_chosen(
    synthetic_root, tmp_path, capsys
):
    root = caps_folder(synthetic_root, tmp_path / "caps")
    cohort = load_cohort(CohortConfig(root=root))  # one row per session in the table; the first session by default
    assert len(cohort.subjects) == 12 and not cohort.problems
    assert {s.session for s in cohort.subjects} == {"M000"} and {s.brain_mask for s in cohort.subjects} == {MNI152_MASK}
    assert load_cohort(CohortConfig(root=root, session="last")).subjects[0].session == "M012"
    code, lines, err = validate([str(root)], capsys)
    assert (code, lines) == (0, []) and "sessions: ses-M000 (12)" in err
    code, lines, err = validate([str(root), "--session", "ses-M012"], capsys)  # the 4D session: refused, named
    assert code == 1 and len(lines) == 12 and "ses-M012" in lines[0] and "expected a 3D T1w volume" in lines[0]
    assert "sessions: ses-M012 (12)" in err and "the MNI152 brain mask shapes every image" in err
    missing = load_cohort(CohortConfig(root=root, session="ses-M024"))
    assert (
        len(missing.problems) == 12
        and "no session ses-M024 (cohort.session); sessions: ses-M000, ses-M012" in missing.problems[0].message
    )
    code, lines, _ = validate([str(root), "--brain-mask", "none"], capsys)  # skull on, as ClinicaDL writes it
    assert code == 1 and len(lines) == 12


def test_a_study_prepares_fmriprep_outputs_as_they_are(synthetic_root, tmp_path):
    """The skull-on MNI images with their own brain masks: every subject preprocessed, none excluded, and the
    cached volumes are the brain-masked ones (what the study trains on; training is the same for any layout)."""
    root = fmriprep_folder(synthetic_root, tmp_path / "fmriprep")
    cohort = CohortConfig(root=root, layout="fmriprep", on_invalid="exclude")
    prepared = prepare_cohort(cohort, PreprocessConfig(voxel_size=8.0, cache_dir=tmp_path / "cache"), map_in_process)
    assert len(prepared.cohort.subjects) == 12 and prepared.preprocessed == 12 and not prepared.excluded
    bids = prepare_cohort(
        CohortConfig(root=synthetic_root), PreprocessConfig(voxel_size=8.0, cache_dir=tmp_path / "c"), map_in_process
    )
    # the same brains: the skull is masked away (inside the brain, fMRIPrep's image is the brain-extracted one)
    assert (prepared.cache.brain() == bids.cache.brain()).mean() > 0.97
