"""The synthetic cohort generator: deterministic, with a real, planted sex effect."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from study.cli import main
from study.data.cohort import CohortConfig, load_cohort


def test_same_seed_same_cohort(tmp_path, synthetic_root):
    assert main(["synth", str(tmp_path / "again"), "--subjects", "12", "--voxel-size", "8", "--seed", "3"]) == 0
    for sid in ["0001", "0007", "0012"]:
        rel = f"sub-{sid}/anat/sub-{sid}_T1w.nii.gz"
        a = np.asarray(nib.load(synthetic_root / rel).dataobj)
        b = np.asarray(nib.load(tmp_path / "again" / rel).dataobj)
        np.testing.assert_array_equal(a, b)
    assert (synthetic_root / "participants.tsv").read_text() == (tmp_path / "again/participants.tsv").read_text()


def test_ground_truth_and_planted_effect(tmp_path):
    root = tmp_path / "c"
    assert main(["synth", str(root), "--subjects", "16", "--voxel-size", "6", "--effect-size", "0.4"]) == 0
    planted = json.loads((root / "ground_truth/planted.json").read_text())
    assert len(planted["regions"]) == 4 and planted["effect_size"] == 0.4
    effect = nib.load(root / "ground_truth/effect_map.nii.gz")
    regions = np.asarray(nib.load(root / "ground_truth/regions.nii.gz").dataobj)
    assert effect.shape == (30, 36, 30) == regions.shape
    assert set(np.unique(regions)) == {0, 1, 2, 3, 4}

    cohort = load_cohort(CohortConfig(root=root))
    volumes = np.stack([np.asarray(nib.load(s.image).dataobj, dtype=float) for s in cohort.subjects])
    sex = cohort.labels
    amygdala = regions == 1  # direction +1: brighter in males
    putamen = regions == 2  # direction -1: darker in males
    male_minus_female = lambda mask: volumes[sex == 1][:, mask].mean() - volumes[sex == 0][:, mask].mean()
    assert male_minus_female(amygdala) > 0 > male_minus_female(putamen)
