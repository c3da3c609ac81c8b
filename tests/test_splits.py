"""Cross-validation splits: no subject or family on both sides, balanced classes, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from study.data.splits import load_splits, make_splits, save_splits


def random_cohort(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 200))
    ids = [f"s{i:03d}" for i in range(n)]
    labels = (rng.random(n) < rng.uniform(0.3, 0.7)).astype(int)
    families, f = [], 0
    while len(families) < n:
        size = int(rng.choice([1, 1, 2, 2, 3]))
        families += [f"f{f}"] * size
        f += 1
    return ids, labels, families[:n]


def within_one_of_ideal(subsets, ids, labels, k):
    label = dict(zip(ids, labels))
    for c in (0, 1):
        ideal = sum(1 for label_ in labels if label_ == c) / k
        for s in subsets:
            assert abs(sum(1 for sid in s if label[sid] == c) - ideal) < 1 + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_no_leaks_and_balanced(seed):
    ids, labels, families = random_cohort(seed)
    family = dict(zip(ids, families))
    k = 5
    folds = make_splits(ids, labels, families, outer_folds=k, inner_folds=3, seed=seed)
    assert sorted(sid for f in folds for sid in f.test) == sorted(ids)  # every subject tested once
    within_one_of_ideal([f.test for f in folds], ids, labels, k)
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert sorted(fold.train + fold.test) == sorted(ids)
        assert not {family[s] for s in fold.train} & {family[s] for s in fold.test}
        for inner in fold.inner:
            assert sorted(inner.train + inner.test) == sorted(fold.train)
            assert not {family[s] for s in inner.train} & {family[s] for s in inner.test}
            assert not set(inner.train + inner.test) & set(fold.test)  # the search never sees the test fold


def test_deterministic_and_saved(tmp_path):
    ids, labels, families = random_cohort(7)
    a = make_splits(ids, labels, families, 4, 3, seed=1)
    assert a == make_splits(ids, labels, families, 4, 3, seed=1)
    assert a != make_splits(ids, labels, families, 4, 3, seed=2)
    save_splits(a, tmp_path / "splits.json", "abc")
    assert load_splits(tmp_path / "splits.json") == ("abc", a)


def test_too_few_families_is_an_error():
    with pytest.raises(
        ValueError, match="5 female subjects in 3 families for 5 folds.*lower cv.outer_folds to at most 3"
    ):
        make_splits(list("abcdefghij"), np.array([0, 1] * 5), list("xxxxyyyzzz"), 5, 2, seed=0)


@st.composite
def cohorts(draw):
    """A participants table as splits see it: families of 1-6 subjects, some of one sex only, and CV settings."""
    families, labels = [], []
    for f in range(draw(st.integers(1, 40))):
        size = draw(st.integers(1, 6))
        kind = draw(st.sampled_from(["female", "male", "mixed"]))
        sexes = (
            [0] * size
            if kind == "female"
            else [1] * size
            if kind == "male"
            else draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
        )
        families += [f"fam{f}"] * size
        labels += sexes
    ids = [f"sub-{i:03d}" for i in range(len(labels))]
    return ids, np.array(labels), families, draw(st.integers(2, 6)), draw(st.integers(2, 4)), draw(st.integers(0, 99))


@settings(max_examples=300, deadline=None)
@given(cohorts())
def test_splits_are_leak_free_stratified_and_deterministic_or_refused_with_the_numbers(cohort):
    ids, labels, families, outer, inner, seed = cohort
    family = dict(zip(ids, families))
    try:
        folds = make_splits(ids, labels, families, outer, inner, seed)
    except ValueError as err:  # refused: with the numbers and the key to change
        message = str(err)
        assert any(ch.isdigit() for ch in message) and ("cv.outer_folds" in message or "cv.inner_folds" in message)
        holding = [len({f for f, label in zip(families, labels) if label == sex}) for sex in (0, 1)]
        assert min(holding) < outer or "outer fold" in message or "one class only" in message, message
        return
    assert folds == make_splits(ids, labels, families, outer, inner, seed)  # deterministic for a seed
    assert sorted(s for f in folds for s in f.test) == sorted(ids)
    largest = max(families.count(f) for f in set(families))
    for fold in folds:
        assert not {family[s] for s in fold.train} & {family[s] for s in fold.test}
        assert 0 < labels[[ids.index(s) for s in fold.test]].sum() < len(fold.test)  # both sexes held out
        for sex in (0, 1):  # within the largest family of the ideal count
            ideal = (labels == sex).sum() / outer
            assert abs(sum(labels[ids.index(s)] == sex for s in fold.test) - ideal) <= largest, (fold.fold, sex)
        for split in fold.inner:
            assert 0 < labels[[ids.index(s) for s in split.test]].sum() < len(split.test)
            assert sorted(split.train + split.test) == sorted(fold.train)
            assert not {family[s] for s in split.train} & {family[s] for s in split.test}


def test_leave_site_out_keeps_each_site_in_one_outer_fold_and_families_in_the_inner_ones():
    """cv.group_by: site with as many outer folds as sites is leave-site-out; a family across two sites (its
    members would land in two folds) is refused, as is a group_by that is not a confound."""
    ids, labels, families = random_cohort(3)
    site_of_family = {f: "ABC"[i % 3] for i, f in enumerate(dict.fromkeys(families))}
    sites = [site_of_family[f] for f in families]
    folds = make_splits(ids, labels, families, outer_folds=3, inner_folds=3, seed=0, outer_groups=sites)
    site, family = dict(zip(ids, sites)), dict(zip(ids, families))
    assert sorted(sorted({site[s] for s in f.test}) for f in folds) == [["A"], ["B"], ["C"]]
    for fold in folds:
        for split in fold.inner:
            assert not {family[s] for s in split.train} & {family[s] for s in split.test}
    sites[0], sites[1] = "A", "B"
    families[1] = families[0]  # one family, two sites
    with pytest.raises(ValueError, match=f"family {families[0]} has members in A, B of cv.group_by"):
        make_splits(ids, labels, families, outer_folds=3, inner_folds=3, seed=0, outer_groups=sites)
    with pytest.raises(ValueError, match="lower cv.outer_folds \\(cv.group_by\\) to at most 3"):
        make_splits(
            ids,
            labels,
            families[:],
            outer_folds=4,
            inner_folds=3,
            seed=0,
            outer_groups=[site_of_family[f] for f in families],
        )


def test_group_by_names_a_confound():
    from study.config import parse_config
    from study.errors import ConfigError

    with pytest.raises(ConfigError, match="group_by 'site' is not among cohort.confounds"):
        parse_config({"name": "x", "cohort": {"root": "/tmp"}, "cv": {"group_by": "site"}})
    config = parse_config({"name": "x", "cohort": {"root": "/tmp", "confounds": ["site"]}, "cv": {"group_by": "site"}})
    assert config.cv.group_by == "site"
