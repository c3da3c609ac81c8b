"""Cross-validation splits: no subject or family on both sides, balanced classes, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

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
        ideal = sum(1 for l in labels if l == c) / k
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
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 families"):
        make_splits(list("abcdef"), np.array([0, 1] * 3), list("xxyyzz"), 5, 2, seed=0)
