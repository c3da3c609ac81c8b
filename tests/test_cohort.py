"""Cohort loading and `study validate`: every bad-input kind is reported with subject and file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from study.cli import main
from study.data.cohort import CohortConfig, check_images, load_cohort
from study.errors import CohortError
from study.tasks import map_in_process


def image_of(root: Path, sid: str) -> Path:
    return root / f"sub-{sid}" / "anat" / f"sub-{sid}_T1w.nii.gz"


def edit_table(root: Path, fn) -> None:
    path = root / "participants.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def validate(root: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    code = main(["validate", str(root), *extra], tasks=map_in_process)
    return code, capsys.readouterr().out.splitlines()


def test_clean_cohort_validates(cohort_dir, capsys):
    code, lines = validate(cohort_dir, capsys)
    assert (code, lines) == (0, [])
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    assert len(cohort.subjects) == 12 and not cohort.problems
    assert set(cohort.labels) == {0, 1}
    assert len({s.family_id for s in cohort.subjects}) < 12  # siblings share a family id


def break_images(cohort_dir: Path) -> dict[str, tuple[str, str]]:
    """Break one image in each way `study validate` knows; returns subject -> (file, problem) expected."""
    raw = image_of(cohort_dir, "0001").read_bytes()
    image_of(cohort_dir, "0001").write_bytes(raw[: len(raw) // 2])  # truncated gzip
    image_of(cohort_dir, "0002").unlink()  # missing file
    img = nib.load(image_of(cohort_dir, "0003"))
    data = img.get_fdata().astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), image_of(cohort_dir, "0003"))  # 4D
    degenerate = nib.Nifti1Image(data.copy(), img.affine)
    degenerate.set_qform(None, code=0)
    degenerate.set_sform([[8, 0, 8, 0], [0, 8, 0, 0], [8, 0, 8, 0], [0, 0, 0, 1]], code=1)  # singular
    nib.save(degenerate, image_of(cohort_dir, "0005"))
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image_of(cohort_dir, "0004"))  # NaN
    image_of(cohort_dir, "0006").write_bytes(gzip.compress(b"this is not a nifti file" * 20))  # garbage
    orphan = image_of(cohort_dir, "0099")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(image_of(cohort_dir, "0007").read_bytes())  # image without a subject
    return {
        "0001": ("sub-0001_T1w.nii.gz", "truncated or corrupt gzip"),
        "0002": ("sub-0002/[ses-*/]anat/*_T1w.nii[.gz]", "no T1w image found"),
        "0003": ("sub-0003_T1w.nii.gz", "expected a 3D T1w volume"),
        "0004": ("sub-0004_T1w.nii.gz", "non-finite voxels"),
        "0005": ("sub-0005_T1w.nii.gz", "degenerate affine"),
        "0006": ("sub-0006_T1w.nii.gz", "not a readable NIfTI"),
        "0099": ("sub-0099_T1w.nii.gz", "image without a row"),
    }


def test_every_problem_is_reported_at_once(cohort_dir, capsys):
    # Break six images in six different ways, and the table in four more places.
    expect = break_images(cohort_dir)

    def table(lines):
        lines[8] = lines[8].replace("\tM\t", "\t\t").replace("\tF\t", "\t\t")  # sub-0008: missing label
        lines[9] = lines[9].replace("\tM\t", "\tX\t").replace("\tF\t", "\tX\t")  # sub-0009: unknown label
        return lines + [lines[10]]  # sub-0010 twice

    edit_table(cohort_dir, table)
    code, lines = validate(cohort_dir, capsys)
    assert code == 1
    by_subject = {}
    for line in lines:
        subject, file, message = line.split("\t")
        by_subject.setdefault(subject, []).append((file, message))
    expect |= {
        "0008": ("participants.tsv", "missing label"),
        "0009": ("participants.tsv", "unknown label 'X'"),
        "0010": ("participants.tsv", "duplicate subject id"),
    }
    assert set(by_subject) == set(expect)
    for subject, (file, message) in expect.items():
        ((got_file, got_message),) = by_subject[subject]
        assert got_file.endswith(file) and message in got_message, (subject, got_file, got_message)


def test_missing_image_for_a_subject(cohort_dir):
    import shutil

    shutil.rmtree(cohort_dir / "sub-0004")
    problems = load_cohort(CohortConfig(root=cohort_dir)).problems
    assert [(p.subject, p.message) for p in problems] == [
        ("0004", "no T1w image found for this subject; add it or drop the row")
    ]


def test_single_volume_4d_is_accepted(cohort_dir):
    img = nib.load(image_of(cohort_dir, "0003"))
    nib.save(nib.Nifti1Image(img.get_fdata()[..., None], img.affine), image_of(cohort_dir, "0003"))
    assert check_images(load_cohort(CohortConfig(root=cohort_dir)), map_in_process) == []


def test_numeric_sex_needs_a_declared_mapping(cohort_dir):
    edit_table(cohort_dir, lambda lines: [line.replace("\tM\t", "\t1\t").replace("\tF\t", "\t0\t") for line in lines])
    unmapped = load_cohort(CohortConfig(root=cohort_dir))
    assert len(unmapped.problems) == 12 and "cohort.label_mapping" in unmapped.problems[0].message
    mapped = load_cohort(CohortConfig(root=cohort_dir, label_mapping={"1": "male", "0": "female"}))
    assert not mapped.problems and mapped.subjects[1].label == 1 and mapped.target.names == ("female", "male")


def test_any_two_class_column_is_a_label(cohort_dir):
    """A diagnosis column: its own class names (any case, or mapped); M/F mean nothing there."""
    edit_table(
        cohort_dir,
        lambda lines: (
            [lines[0] + "\tdiagnosis"] + [line + ("\tPatient" if "\tM\t" in line else "\tCN") for line in lines[1:]]
        ),
    )
    config = dict(root=cohort_dir, label="diagnosis", classes=("control", "patient"))
    unmapped = load_cohort(CohortConfig(**config))
    assert {p.message for p in unmapped.problems} == {
        "unknown label 'CN' in column 'diagnosis'; use control/patient, or declare cohort.label_mapping "
        "(e.g. {'CN': patient})"
    }
    cohort = load_cohort(CohortConfig(**config, label_mapping={"CN": "control"}))
    sexes = load_cohort(CohortConfig(root=cohort_dir)).labels
    assert not cohort.problems and cohort.labels.tolist() == sexes.tolist()
    assert cohort.target.p == "p_patient" and cohort.target.contrast == "patient - control"
    with pytest.raises(ValueError, match="label_mapping maps to ad, which are not among the classes"):
        CohortConfig(**config, label_mapping={"AD": "ad"})
    for classes in [("a b", "c"), ("Control", "control"), ("all", "patient")]:
        with pytest.raises(ValueError, match="two or more class names that differ in more than case"):
            CohortConfig(root=cohort_dir, classes=classes)
    with pytest.raises(ValueError, match="'predicted' names a column of the study's own tables"):
        CohortConfig(root=cohort_dir, label="predicted")
    # A diagnosis column with the default classes (female, male): the fix is the classes, not a mapping to sexes.
    default = load_cohort(CohortConfig(root=cohort_dir, label="diagnosis"))
    assert "or set cohort.classes to the classes of column 'diagnosis'" in default.problems[0].message


def test_hcp_layout_and_path_column(cohort_dir, tmp_path):
    hcp = tmp_path / "hcp"
    rows = ["Subject,Gender,Family_ID"]
    for sid in ["100307", "100408"]:
        target = hcp / sid / "MNINonLinear" / "T1w_restore_brain.nii.gz"
        target.parent.mkdir(parents=True)
        target.write_bytes(image_of(cohort_dir, "0001").read_bytes())
        rows.append(f"{sid},{'M' if sid.endswith('7') else 'F'},fam1")
    (hcp / "subjects.csv").write_text("\n".join(rows))
    config = CohortConfig(
        root=hcp, participants=hcp / "subjects.csv", subject_column="Subject", label="Gender", family_column="Family_ID"
    )
    cohort = load_cohort(config)
    assert cohort.ids == ["100307", "100408"] and cohort.labels.tolist() == [1, 0]
    assert cohort.subjects[0].family_id == cohort.subjects[1].family_id == "fam1"

    (hcp / "paths.csv").write_text("id,sex,path\nA,F,100307/MNINonLinear/T1w_restore_brain.nii.gz\nB,M,gone.nii\n")
    column = load_cohort(
        CohortConfig(root=hcp, participants=hcp / "paths.csv", subject_column="id", path_column="path")
    )
    assert column.subjects[0].image.exists() and not column.problems
    (missing,) = check_images(column, map_in_process)
    assert (missing.subject, missing.file) == ("B", str(hcp / "gone.nii")) and "file not found" in missing.message
    # Ids name files; one scan under two ids could be in a fold's training and test subjects.
    (hcp / "bad.csv").write_text(
        "id,sex,path\n../../x,F,100307/MNINonLinear/T1w_restore_brain.nii.gz\n"
        "C,F,100307/MNINonLinear/T1w_restore_brain.nii.gz\n"
        "D,M,100307/MNINonLinear/../MNINonLinear/T1w_restore_brain.nii.gz\n"
    )
    bad = load_cohort(CohortConfig(root=hcp, participants=hcp / "bad.csv", subject_column="id", path_column="path"))
    assert bad.ids == ["C"] and [(p.subject, p.message.split(";")[0]) for p in bad.problems] == [
        (
            "../../x",
            "a subject id of letters, digits, '.', '_' or '-' only, starting with a letter or digit (ids name "
            "map files)",
        ),
        ("D", "the same image as subject C"),
    ]


def test_unusable_table_is_a_clear_error(cohort_dir):
    with pytest.raises(CohortError, match="no column 'subject'.*participant_id"):
        load_cohort(CohortConfig(root=cohort_dir, subject_column="subject"))
    with pytest.raises(CohortError, match="participants table not found"):
        load_cohort(CohortConfig(root=cohort_dir, participants=cohort_dir / "nope.tsv"))


def test_families_cannot_silently_vanish(cohort_dir, tmp_path):
    # A family column that is declared but absent is an error naming the column and the table.
    with pytest.raises(CohortError, match=r"participants.tsv: no column 'Family_ID'.*restricted table"):
        load_cohort(CohortConfig(root=cohort_dir, family_column="Family_ID"))
    # A declared column in which nobody has a relative is a warning with the count.
    edit_table(
        cohort_dir,
        lambda lines: [lines[0]] + [line.replace("\tfam", f"\tsolo{i}-fam") for i, line in enumerate(lines[1:])],
    )
    (warning,) = load_cohort(CohortConfig(root=cohort_dir, family_column="family_id")).warnings
    assert "every one of the 12 subjects is alone in its family in column 'family_id'" in warning
    # No family column at all: said once, with what to set.
    edit_table(cohort_dir, lambda lines: ["\t".join(line.split("\t")[:2] + line.split("\t")[3:]) for line in lines])
    (warning,) = load_cohort(CohortConfig(root=cohort_dir)).warnings
    assert "no family column" in warning and "Family_ID" in warning


def test_hcp_tables_merge_on_the_subject(cohort_dir, tmp_path):
    hcp = tmp_path / "hcp"
    for sid in ["100307", "100408", "101006"]:
        target = hcp / sid / "MNINonLinear" / "T1w_restore_brain.nii.gz"
        target.parent.mkdir(parents=True)
        target.write_bytes(image_of(cohort_dir, "0001").read_bytes())
    (hcp / "unrestricted.csv").write_text("Subject,Gender,Age\n100307,M,22-25\n100408,F,26-30\n101006,F,26-30\n")
    (hcp / "RESTRICTED.csv").write_text(
        "Subject,Family_ID,Age_in_Yrs\n101006,51488_81352,29\n100307,51488_81352,23\n100408,56037_85858,27\n"
    )
    cohort = load_cohort(
        CohortConfig(
            root=hcp,
            participants=[hcp / "unrestricted.csv", hcp / "RESTRICTED.csv"],
            subject_column="Subject",
            label="Gender",
            family_column="Family_ID",
        )
    )
    assert not cohort.problems and not cohort.warnings
    family = {s.subject_id: s.family_id for s in cohort.subjects}
    assert family["100307"] == family["101006"] != family["100408"]


def test_validate_refuses_images_that_are_not_in_mni_space(cohort_dir, capsys):
    img = nib.load(image_of(cohort_dir, "0002"))
    moved = img.affine.copy()
    moved[:3, 3] += [0, 40, 0]  # native space: 40 mm off
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), image_of(cohort_dir, "0002"))
    code, lines = validate(cohort_dir, capsys)
    assert code == 1 and len(lines) == 1
    subject, file, message = lines[0].split("\t")
    assert subject == "0002" and file.endswith("sub-0002_T1w.nii.gz")
    assert "overlaps the MNI152 brain mask by 0." in message and "registered to MNI152 and brain-extracted" in message


@pytest.mark.slow
def test_validate_reports_the_same_for_a_relative_path(tmp_path, cohort_dir, capsys, monkeypatch):
    """Paths on the command line are relative to where the user is; the Ray workers that open the images run in
    a directory of their own (here the tests' Ray, which `study validate` joins)."""
    bad = cohort_dir / "sub-0004/anat/sub-0004_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    monkeypatch.chdir(cohort_dir.parent)
    relative = (main(["validate", cohort_dir.name]), *capsys.readouterr())
    monkeypatch.chdir(tmp_path)
    absolute = (main(["validate", str(cohort_dir)]), *capsys.readouterr())
    assert relative[0] == absolute[0] == 1 and relative[1] == absolute[1], relative
    lines = relative[1].splitlines()
    assert len(lines) == 1 and lines[0].startswith("0004\t") and "truncated" in lines[0]
    assert "11 subjects OK, 1 problems in 1 subjects" in relative[2]
