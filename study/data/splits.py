"""Leak-free cross-validation splits: stratified by class (e.g. sex), grouped by family.

No family ever spans the two sides of a split (HCP has twins and siblings),
each fold's class counts are as close to ideal as families allow, and inner
folds inside each outer training set serve the search and early stopping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from study.storage import replace_atomically


@dataclass(frozen=True)
class Split:
    """One partition of subject ids into a training and a held-out side."""

    train: list[str]
    test: list[str]


@dataclass(frozen=True)
class OuterFold:
    """An outer fold: its split and the inner splits of its training side."""

    fold: int
    train: list[str]
    test: list[str]
    inner: list[Split]

    @property
    def validation(self) -> Split:
        """The split used for early stopping of the final model (first inner split)."""
        return self.inner[0]


def group_kfold(ids: list[str], labels: np.ndarray, groups: list[str], k: int, seed: int) -> list[list[str]]:
    """Assign whole groups to ``k`` folds so that each fold's class counts are near ideal.

    Greedy placement of groups (largest first, random tie-break) followed by
    moves and swaps of groups between folds that reduce the squared deviation
    from the ideal class counts. Returns the held-out ids of each fold.
    """
    classes = np.unique(labels)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < k:
        raise ValueError(
            f"cannot make {k} folds from {len(members)} families: whole families stay in one fold; "
            "lower cv.outer_folds or cv.inner_folds"
        )
    names = list(members)
    counts = np.array([[np.sum(labels[members[g]] == c) for c in classes] for g in names], dtype=float)
    target = counts.sum(0) / k
    rng = np.random.default_rng(seed)
    order = sorted(range(len(names)), key=lambda g: (-counts[g].sum(), rng.random()))

    fold_of = np.empty(len(names), dtype=int)
    totals = np.zeros((k, len(classes)))
    for g in order:
        cost = ((totals + counts[g] - target) ** 2).sum(1) - ((totals - target) ** 2).sum(1)
        best = int(np.argmin(cost + 1e-9 * rng.random(k)))
        fold_of[g] = best
        totals[best] += counts[g]
    _improve(fold_of, totals, counts, target)
    folds = [[] for _ in range(k)]
    for g, f in enumerate(fold_of):
        folds[f].extend(ids[i] for i in members[names[g]])
    return [sorted(f) for f in folds]


def _improve(fold_of: np.ndarray, totals: np.ndarray, counts: np.ndarray, target: np.ndarray) -> None:
    """Move or swap groups between folds while that lowers the squared imbalance."""

    def cost() -> float:
        return float(((totals - target) ** 2).sum())

    def exchange(a: int, b: int, delta: np.ndarray) -> bool:
        """Shift class counts ``delta`` from fold a to fold b if that lowers the cost."""
        before = cost()
        totals[a] -= delta
        totals[b] += delta
        if cost() < before - 1e-9:
            return True
        totals[a] += delta
        totals[b] -= delta
        return False

    improved = True
    while improved:
        improved = False
        for g in range(len(fold_of)):
            for b in range(len(totals)):
                a = fold_of[g]
                if b == a:
                    continue
                if exchange(a, b, counts[g]):
                    fold_of[g] = b
                    improved = True
                    continue
                for h in np.flatnonzero(fold_of == b):
                    if exchange(a, b, counts[g] - counts[h]):
                        fold_of[g], fold_of[h] = b, a
                        improved = True
                        break


def _check_classes(
    labels: np.ndarray, groups: list[str], k: int, where: str, key: str, classes: tuple[str, ...], unit: str
) -> None:
    """Refuse folds that cannot all hold both classes (a test fold without one has no ROC AUC).

    Whole groups (``unit``: families, or cv.group_by's values) stay in one fold, so a class present in fewer than
    ``k`` groups cannot reach every fold.
    """
    for code, name in enumerate(classes):
        holding = {g for g, label in zip(groups, labels) if label == code}
        if len(holding) < k:
            raise ValueError(
                f"{where} has {int((labels == code).sum())} {name} subjects in {len(holding)} {unit} "
                f"for {k} folds: whole {unit} stay in one fold, so at most {len(holding)} folds can "
                f"hold a {name}; lower {key} to at most {len(holding)} or add subjects"
            )


def _kfold_with_both_classes(
    ids: list[str],
    labels: np.ndarray,
    groups: list[str],
    k: int,
    seed: int,
    where: str,
    key: str,
    classes: tuple[str, ...],
    unit: str = "families",
) -> list[list[str]]:
    """:func:`group_kfold`, checked before (enough ``unit`` of each class) and after (each fold holds both)."""
    _check_classes(labels, groups, k, where, key, classes, unit)
    folds = group_kfold(ids, labels, groups, k, seed)
    label = dict(zip(ids, labels))
    for i, fold in enumerate(folds):
        if len({label[s] for s in fold}) < 2:
            raise ValueError(
                f"{where}: fold {i} of {k} got {len(fold)} subjects of one class only ({unit} are "
                f"too few or too large to spread); lower {key}"
            )
    return folds


def make_splits(
    ids: list[str],
    labels: np.ndarray,
    families: list[str],
    outer_folds: int,
    inner_folds: int,
    seed: int,
    classes: tuple[str, ...] = ("female", "male"),
    outer_groups: list[str] | None = None,
) -> list[OuterFold]:
    """Outer folds over the cohort and inner folds inside each outer training set.

    ``labels`` are class indices into ``classes`` (the names errors use; for a regression target, its quartiles:
    :meth:`~study.data.cohort.Regression.strata`). ``outer_groups`` (e.g. each subject's
    site; cv.group_by) keeps its values whole in the outer folds instead of families. Raises
    ValueError, with the numbers, when the cohort cannot give every fold both
    classes or enough families.
    """
    labels = np.asarray(labels)
    position = {sid: i for i, sid in enumerate(ids)}
    folds = []
    groups, key, unit = (
        (families, "cv.outer_folds", "families")
        if outer_groups is None
        else (outer_groups, "cv.outer_folds (cv.group_by)", "groups of cv.group_by")
    )
    group_of: dict[str, set[str]] = {}
    for family, group in zip(families, groups):
        group_of.setdefault(family, set()).add(group)
    if spanning := sorted(f for f, g in group_of.items() if len(g) > 1):  # its members would land in two folds
        raise ValueError(
            f"family {spanning[0]} has members in {', '.join(sorted(group_of[spanning[0]]))} of cv.group_by "
            f"({len(spanning)} such families); relatives must stay in one fold: fix the table or drop cv.group_by"
        )
    outer = _kfold_with_both_classes(ids, labels, groups, outer_folds, seed, "the cohort", key, classes, unit)
    for k, test in enumerate(outer):
        held_out = set(test)
        train = [sid for sid in ids if sid not in held_out]
        rows = [position[s] for s in train]
        inner_tests = _kfold_with_both_classes(
            train,
            labels[rows],
            [families[r] for r in rows],
            inner_folds,
            seed + 1 + k,
            f"outer fold {k}'s training side",
            "cv.inner_folds",
            classes,
        )
        inner = [Split(sorted(set(train) - set(t)), t) for t in inner_tests]
        folds.append(OuterFold(k, sorted(train), test, inner))
    return folds


def save_splits(folds: list[OuterFold], path: Path, made_for: str) -> None:
    """Write ``splits.json``: the folds and what they were made for (cohort fingerprint and CV settings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"cohort": made_for, "folds": [asdict(f) for f in folds]}, indent=1)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_splits(path: Path) -> tuple[str, list[OuterFold]]:
    """Read ``splits.json`` back: (what they were made for, folds)."""
    data = json.loads(path.read_text())
    folds = [OuterFold(f["fold"], f["train"], f["test"], [Split(**s) for s in f["inner"]]) for f in data["folds"]]
    return data["cohort"], folds
