"""The confound adjustment of the images (``cv.adjust``): each method against its reference, and each fold's
adjustment fitted on its training subjects only, as the study reads its volumes (``Study.fold_cache``)."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from sklearn.linear_model import LinearRegression

from study.data.adjustment import fit_adjustment
from study.data.cache import CachedVolumes
from study.errors import StudyError


def _sites_and_heads(n: int = 60, voxels: int = 400, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Voxels with a site shift (B), a site scale (C) and a head-size slope, and their confounds."""
    rng = np.random.default_rng(seed)
    site = rng.choice(["A", "B", "C"], n)
    tiv = rng.normal(1450, 100, n)
    x = rng.normal(size=(n, voxels)) + 0.002 * (tiv[:, None] - 1450) * rng.normal(1, 0.3, voxels)
    x += np.where(site == "B", 0.5, 0.0)[:, None] * rng.normal(1, 0.2, voxels)
    x[site == "C"] *= 1.5
    return x, pd.DataFrame({"site": site, "tiv": tiv}, index=[f"sub-{i:02d}" for i in range(n)])


def _neurocombat(x: np.ndarray, covars: pd.DataFrame, **kwargs) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints each step
        return neuroCombat(x.T.copy(), covars, "site", **kwargs)


def test_combat_is_neurocombats_parametric_combat():
    x, table = _sites_and_heads()
    brain = np.ones(x.shape[1], bool)
    ours = fit_adjustment("combat", x, table[["site"]], brain).apply(x, table[["site"]])
    reference = _neurocombat(x, table[["site"]].reset_index(drop=True))["data"].T
    assert np.abs(ours - reference).max() < 1e-5 * np.abs(reference).max()
    # with head size: neuroCombat keeps a continuous covariate's effect (mod.mean), the study removes it too
    ours = fit_adjustment("combat", x, table, brain).apply(x, table)
    tiv = (table.tiv - table.tiv.mean()) / table.tiv.std()  # centred as the study's covariates are
    reference = _neurocombat(
        x, pd.DataFrame({"site": table.site, "tiv": tiv}).reset_index(drop=True), continuous_cols=["tiv"]
    )
    expected = reference["data"].T - reference["estimates"]["mod.mean"].T
    assert np.abs(ours - expected).max() < 1e-5 * np.abs(expected).max()
    assert np.abs(ours - x).max() > 0.3  # it did adjust


def test_residualizing_is_least_squares_on_the_confounds_keeping_the_training_mean():
    x, table = _sites_and_heads()
    ours = fit_adjustment("residualize", x, table, np.ones(x.shape[1], bool)).apply(x, table)
    design = pd.get_dummies(table, columns=["site"], drop_first=True).astype(float).to_numpy()
    fit = LinearRegression().fit(design, x)
    np.testing.assert_allclose(ours, x - fit.predict(design) + x.mean(0), atol=1e-6)


def test_a_site_no_training_subject_has_is_refused_naming_the_subjects():
    x, table = _sites_and_heads()
    adjustment = fit_adjustment("combat", x, table, np.ones(x.shape[1], bool))
    new = pd.DataFrame({"site": ["D", "A"], "tiv": [1400.0, 1500.0]}, index=["sub-new", "sub-ok"])
    with pytest.raises(StudyError, match=r"site 'D' of subject\(s\) sub-new .*\['A', 'B', 'C'\]"):
        adjustment.for_subjects(new)


def test_combat_refuses_what_it_cannot_estimate_before_any_training():
    """No site column, or a site too rare in a fold's training subjects (its variance would be 0/0, every image
    NaN), or only among a fold's held-out subjects: each refused naming the site, the subjects and the fold."""
    from study.data.adjustment import check_folds

    x, table = _sites_and_heads()
    with pytest.raises(StudyError, match="one site column"):
        fit_adjustment("combat", x, table[["tiv"]], np.ones(x.shape[1], bool))
    lonely = table.copy()
    lonely.loc[lonely.index[0], "site"] = "D"
    with pytest.raises(StudyError, match=r"'D' \(1\) has fewer"):
        fit_adjustment("combat", x, lonely, np.ones(x.shape[1], bool))
    ids = list(table.index)
    folds = [(ids[30:], ids[:30]), (ids[:30], ids[30:])]
    with pytest.raises(StudyError, match=r"site 'D' of subject\(s\) sub-00 is only among outer fold 0's held-out"):
        check_folds("residualize", lonely, folds)
    rare = lonely.copy()
    rare.loc[ids[40], "site"] = "D"  # fold 0 holds out sub-00 and trains on sub-40 alone; fold 1 the other way
    with pytest.raises(StudyError, match=r"'D' has 1 training subject\(s\) in outer fold 0: ComBat needs 2"):
        check_folds("combat", rare, folds)
    check_folds("residualize", rare, folds)  # regression needs no variance of its own per site


@pytest.mark.parametrize("method", ["residualize", "combat"])
def test_each_folds_adjustment_is_fitted_on_its_training_subjects_only(method, cohort_dir, tmp_path):
    """A fold's held-out subjects' images and confounds change: its adjustment and its training subjects'
    volumes do not, while the held-out subjects are adjusted by their own confounds. A training subject's image
    does change the adjustment (so that the first check can fail)."""
    from study.config import parse_config
    from study.data.prepare import make_or_load_splits, prepare_cohort
    from study.state import Study
    from study.tasks import map_in_process

    table = pd.read_csv(cohort_dir / "participants.tsv", sep="\t", dtype=str)
    table["site"] = ["AB"[i % 2] for i in range(len(table))]
    table["tiv"] = np.random.default_rng(1).normal(1450, 100, len(table)).round(1).astype(str)
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    cohort = {"root": str(cohort_dir), "participants": str(tmp_path / "participants.tsv"), "confounds": ["site", "tiv"]}
    config = parse_config(
        {
            "name": "adjusted",
            "cohort": cohort,
            "preprocess": {"voxel_size": 8.0, "cache_dir": str(tmp_path / "cache")},
            "cv": {"outer_folds": 2, "inner_folds": 2, "adjust": method},
        }
    )
    prepared = prepare_cohort(config.cohort, config.preprocess, map_in_process)
    folds = make_or_load_splits(config.cv, prepared.cohort, tmp_path / "splits.json")
    study = Study(config, prepared.cohort, prepared.cache, [], folds, None, False, tmp_path, str(tmp_path))
    train, test = folds[0].train, folds[0].test
    ids, n = train + test, len(train)

    def read(cache) -> np.ndarray:
        return CachedVolumes(cache, ids, np.zeros(len(ids))).__getitems__(list(range(len(ids))))[0].numpy()[:, 0]

    adjustment, before = study.fold_cache(0).adjustment, read(study.fold_cache(0))
    assert not np.allclose(before[:n], read(prepared.cache)[:n])  # it did adjust
    outside = tuple(np.argwhere(~study.brain)[0])  # a voxel outside every subject's brain

    def changed(rows: list[str], study: Study) -> Study:
        """The study with ``rows``' images (inside the brain, and one voxel outside every other brain) and head
        sizes changed."""
        shape = (len(prepared.cohort.ids), *prepared.cache.shape)
        volumes = np.memmap(prepared.cache.path, np.float16, "r+", shape=shape)
        for row in prepared.cache.rows(rows):
            volumes[row] = np.where(volumes[row] != 0, volumes[row] * 3 + 1, 0)
            volumes[(row, *outside)] = 5.0
        volumes.flush()
        subjects = [
            dataclasses.replace(s, confounds=(s.confounds[0], "2000.0")) if s.subject_id in rows else s
            for s in study.cohort.subjects
        ]
        return dataclasses.replace(study, cohort=dataclasses.replace(study.cohort, subjects=subjects))

    moved = changed(test, study)
    after = moved.fold_cache(0).adjustment
    assert moved.brain[outside] and not study.brain[outside]  # the held-out images grew the study's brain mask
    np.testing.assert_array_equal(after.offsets[:, study.brain[moved.brain]], adjustment.offsets)
    adjusted = read(moved.fold_cache(0))
    np.testing.assert_array_equal(adjusted[:n], before[:n])
    # the held-out subjects: adjusted by the same fit from their own new images and head sizes
    expected = after.apply(read(prepared.cache)[n:][:, moved.brain], moved.confounds.loc[test])
    np.testing.assert_allclose(adjusted[n:][:, moved.brain], expected, rtol=1e-5, atol=1e-5)
    assert (adjusted[(slice(n, None), *outside)] == 5.0).all()  # no training subject varies there: left as it is
    retrained = changed(train[:1], moved).fold_cache(0).adjustment
    assert not np.allclose(retrained.offsets, after.offsets)


def test_an_adjustment_without_confounds_or_combat_across_held_out_sites_is_refused_at_load():
    from study.config import parse_config
    from study.errors import ConfigError

    cohort = {"root": "/tmp", "confounds": ["site"]}
    with pytest.raises(ConfigError, match="adjust: residualize removes cohort.confounds from the images, and there"):
        parse_config({"name": "x", "cohort": {"root": "/tmp"}, "cv": {"adjust": "residualize"}})
    with pytest.raises(ConfigError, match="besides group_by 'site'"):
        parse_config({"name": "x", "cohort": cohort, "cv": {"adjust": "residualize", "group_by": "site"}})
    with pytest.raises(ConfigError, match="combat learns each site from its training subjects"):
        parse_config({"name": "x", "cohort": cohort, "cv": {"adjust": "combat", "group_by": "site"}})
    both = {"root": "/tmp", "confounds": ["site", "tiv"]}
    assert parse_config({"name": "x", "cohort": both, "cv": {"adjust": "residualize", "group_by": "site"}})


@pytest.mark.slow
def test_a_combat_study_reads_tests_explains_and_predicts_through_each_folds_adjustment(tmp_path, capsys):
    """``run_study`` with ``cv.adjust: combat`` on a scanner and head-size confounded cohort: the report says how
    the images were adjusted, and ``study predict`` on a participants table gives each held-out subject the
    probability its fold's model gave it in the study (so new images get the fold's adjustment from their own
    site and head size); a site no fold trained on, and images without their confounds, are named problems."""
    import mlflow

    from study.cli import main
    from study.pipeline import run_study, study_dir
    from study.tasks import map_in_process
    from tests.test_predict import held_out
    from tests.test_study import study_config

    root = tmp_path / "scanner"
    argv = ["synth", str(root), "--subjects", "32", "--voxel-size", "4", "--effect-size", "0", "--seed", "3"]
    assert main([*argv, "--site-confound", "0.9", "--tiv-confound", "0.12"], tasks=map_in_process) == 0
    config = study_config(
        tmp_path,
        root,
        cohort={"confounds": ["site", "tiv"]},
        cv={"adjust": "combat"},
        train={"epochs": 2},
        attribution={
            "methods": ["gradcam"],
            "permutations": 10,
            "sanity": {"subjects": 2, "label_randomization": False},
        },
    )
    run_id = run_study(config)
    report = (study_dir(config) / "latest" / "report.html").read_text()
    assert "site harmonized by ComBat, tiv regressed out, inside each outer fold, fitted on its training" in report
    assert "leave held-out subjects with a site pattern of the opposite sign" in report  # ComBat's caution

    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str)
    new = participants.head(4)[["participant_id", "site", "tiv"]].copy()
    new.loc[new.index[3], "site"] = "C"  # a scanner the study never saw
    new.to_csv(root / "new.tsv", sep="\t", index=False)  # beside the images it names
    capsys.readouterr()
    uri = config.tracking.uri
    assert (
        main(["predict", "tiny", str(root / "new.tsv"), "--out", str(tmp_path / "p.tsv"), "--tracking-uri", uri]) == 1
    )
    predicted = pd.read_csv(tmp_path / "p.tsv", sep="\t", dtype={"subject_id": str}, keep_default_na=False)
    predicted = predicted.set_index("subject_id")
    study = held_out(config, run_id, tmp_path).set_index("subject_id")
    for subject in new.participant_id.str.removeprefix("sub-")[:3]:
        fold = study.loc[subject, "fold"]
        assert float(predicted.loc[subject, f"p_male_fold{fold}"]) == pytest.approx(
            study.loc[subject, "p_male"], abs=1e-5
        )
    unseen = new.participant_id.iloc[3].removeprefix("sub-")
    assert "site 'C'" in predicted.loc[unseen, "problem"] and predicted.loc[unseen, "p_male"] == ""
    # images without a table: the study cannot adjust them, and says what to give instead
    image = next(root.glob("sub-*/anat/*_T1w.nii.gz"))
    capsys.readouterr()
    assert main(["predict", "tiny", str(image), "--out", str(tmp_path / "q.tsv"), "--tracking-uri", uri]) == 1
    assert "give the images as a participants table with column(s) site, tiv" in capsys.readouterr().err
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(run_id).data.params["cv.adjust"] == "combat"


def test_an_ensemble_keeps_each_folds_adjustment_and_names_images_it_cannot_adjust(tmp_path):
    """Saved and loaded, each fold's model sees the volume its fold's adjustment gives, from the subject's own
    confounds; a row without them, with an unknown site or a head size that is not a number is a named problem."""
    import torch

    from study.attribution import Perturbation
    from study.data.volumes import Grid
    from study.predict import Ensemble
    from study.training.models import Architecture, build_model

    shape = (6, 7, 6)
    brain = np.zeros(shape, bool)
    brain[1:5, 1:6, 1:5] = True
    x, table = _sites_and_heads(n=30, voxels=int(brain.sum()), seed=2)
    adjustments = {
        fold: fit_adjustment("combat", x[fold::2], table.iloc[fold::2].reset_index(drop=True), brain) for fold in (0, 1)
    }
    models = {fold: build_model(Architecture(width=2, blocks=1), shape).eval() for fold in (0, 1)}
    ensemble = Ensemble(models, Grid(shape, np.eye(4)), "zscore", ("gradcam",), "contrast", Perturbation().model_dump())
    loaded = Ensemble.load(dataclasses.replace(ensemble, adjustments=adjustments).save(tmp_path / "ensemble"))
    assert loaded.confounds == ["site", "tiv"]
    volumes = np.zeros((2, *shape), np.float32)
    volumes[:, brain] = x[:2]
    inputs = loaded.inputs(volumes, table.iloc[:2])
    for fold in (0, 1):
        expected = adjustments[fold].apply(x[:2], table.iloc[:2])
        np.testing.assert_allclose(inputs[fold].numpy()[:, 0][:, brain], expected, rtol=1e-6)
        assert (inputs[fold].numpy()[:, 0][:, ~brain] == 0).all()
    with torch.no_grad():
        assert loaded.fold_predictions(volumes, table.iloc[:2]).shape == (2, 2)

    rows = [{"subject_id": s, "problem": ""} for s in ("a", "b", "c", "d")]
    given = pd.DataFrame({"site": ["A", "D", "B", ""], "tiv": ["1400", "1400", "big", ""]})
    loaded._confounds(given, rows)
    assert [r["problem"] for r in rows][0] == ""
    assert "site 'D' of subject(s) b" in rows[1]["problem"] and "tiv 'big' is not a number" in rows[2]["problem"]
    assert "no site, tiv: the study removed site, tiv from its images" in rows[3]["problem"]


def test_a_confound_every_training_subject_shares_leaves_the_images_as_they_are():
    """One site among a fold's training subjects: nothing to regress, nothing removed (no error either)."""
    x, table = _sites_and_heads()
    one_site = table.assign(site="A")[["site"]]
    adjustment = fit_adjustment("residualize", x, one_site, np.ones(x.shape[1], bool))
    np.testing.assert_allclose(adjustment.apply(x, one_site), x)
