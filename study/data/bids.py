"""BIDS metadata: what makes a folder a BIDS dataset, and a synthetic cohort's ground truth as a derivative.

A synthetic cohort (:mod:`.synth`) is a raw BIDS dataset (a description, a
README, its columns' meanings) whose planted answer is a derivative dataset in
``derivatives/ground_truth/``; the npm ``bids-validator`` and pybids read both
(tests/test_synth.py).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import nibabel as nib

GROUND_TRUTH = Path("derivatives/ground_truth")  # the planted answer: a BIDS derivative of the cohort


def ground_truth_dir(root: Path) -> Path:
    """Where a synthetic cohort keeps its planted answer (``ground_truth/`` in cohorts written before BIDS)."""
    return root / GROUND_TRUTH if (root / GROUND_TRUTH).is_dir() else root / "ground_truth"


def dataset_description(name: str, dataset_type: str) -> str:
    """A ``dataset_description.json`` of a dataset this package generated (raw, or a derivative)."""
    return json.dumps(
        {
            "Name": name,
            "BIDSVersion": "1.9.0",
            "DatasetType": dataset_type,
            # the generator, and the authors of the template every image is made from
            "Authors": ["study synth", "Vladimir Fonov", "Alan C. Evans", "D. Louis Collins"],
            "GeneratedBy": [{"Name": "study synth", "Version": version("study")}],
        },
        indent=1,
    )


CONFOUND_COLUMNS = {
    "site": {"Description": "scanner; B has another contrast and more noise", "Levels": {"A": "A", "B": "B"}},
    "tiv": {"Description": "total intracranial volume (as FreeSurfer's eTIV)", "Units": "ml"},
    "group": {
        "Description": "diagnostic group; each subtype loses volume in regions of its own",
        "Levels": {"control": "no planted change", "subtype_a": "subtype A", "subtype_b": "subtype B"},
    },
}


def write_bids_metadata(out: Path, subjects: int, seed: int, confounds: list[str] = ()) -> None:
    """What makes a synthetic cohort's folder a valid BIDS dataset: its description, a README, and the columns'
    meanings."""
    (out / "dataset_description.json").write_text(dataset_description(f"study synthetic cohort (seed {seed})", "raw"))
    (out / "README").write_text(
        f"A synthetic T1w cohort written by `study synth`: {subjects} subjects made from the MNI152 template "
        "under random deformations, size changes, bias fields and noise, with sex effects planted in a few regions "
        "and a distractor region. Images are stored at mixed voxel sizes and orientations, registered to MNI152 "
        "in world space and brain-extracted. The planted answer is in derivatives/ground_truth/.\n"
    )
    (out / "participants.json").write_text(
        json.dumps(
            {
                "sex": {"Description": "sex of the participant", "Levels": {"M": "male", "F": "female"}},
                "family_id": {"Description": "family; siblings share part of their anatomy and stay in one fold"},
                "age": {"Description": "age of the participant", "Units": "year"},
                **{column: CONFOUND_COLUMNS[column] for column in confounds},
            },
            indent=1,
        )
    )


def write_ground_truth(
    directory: Path, effect: nib.Nifti1Image, regions: nib.Nifti1Image, planted: dict, prefix: str = ""
) -> None:
    """A synthetic cohort's planted answer as a derivative dataset: ``effect_map.nii.gz`` (the effect's size per
    voxel), ``regions.nii.gz`` (effect regions 1..n, the distractor n+1) and ``planted.json``; ``prefix``
    ``age_``: the age effect's maps beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    description = dataset_description("planted sex (and age) effects of the synthetic cohort", "derivative")
    (directory / "dataset_description.json").write_text(description)
    nib.save(effect, str(directory / f"{prefix}effect_map.nii.gz"))
    nib.save(regions, str(directory / f"{prefix}regions.nii.gz"))
    (directory / "planted.json").write_text(json.dumps(planted, indent=1))
