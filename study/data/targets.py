"""What a study learns: two or more classes of a participants-table column, or a numeric column (a regression
target).

:class:`Classes` and :class:`Regression` name the column, the network's outputs, the prediction tables'
columns, and what the folds balance; every stage reads the study's one :data:`Target`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from study.data.participants import SEX_CLASSES


@dataclass(frozen=True)
class Classes:
    """What a study tells apart: a participants-table column and its classes, in model order [0, 1, ...].

    Of two classes, class 1 is the positive class of every metric (sensitivity, ROC AUC) and the first term of
    every difference of maps (class 1 - class 0). Of more (:attr:`several`), each class is scored against the
    rest (macro one-vs-rest ROC AUC) and every subject gets a probability of each.
    """

    column: str = "sex"
    names: tuple[str, ...] = SEX_CLASSES
    kind: ClassVar[str] = "classification"

    @property
    def outputs(self) -> int:
        """The network's logits, one per class."""
        return len(self.names)

    @property
    def several(self) -> bool:
        """More than two classes: probabilities of each, one-vs-rest scores, no single contrast."""
        return len(self.names) > 2

    @property
    def prediction(self) -> str:
        """The prediction tables' column of what the model says of each subject: P(class 1) (of several classes,
        the predicted class)."""
        return "predicted" if self.several else self.p

    @property
    def columns(self) -> list[str]:
        """The prediction tables' probability columns: ``p_male``; of several classes, one per class."""
        return [f"p_{name}" for name in self.names] if self.several else [self.p]

    def probabilities(self, table: pd.DataFrame) -> np.ndarray:
        """A prediction table's P(class 1) [subjects], or of several classes P(each class) [subjects, classes]."""
        return table[self.columns].to_numpy(np.float64) if self.several else table[self.p].to_numpy(np.float64)

    def strata(self, labels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        """What folds balance: the classes, with their names."""
        return np.asarray(labels, dtype=np.int64), self.names

    @property
    def positive(self) -> str:
        return self.names[1]

    @property
    def p(self) -> str:
        """The column of P(class 1) in prediction tables, e.g. ``p_male``."""
        return f"p_{self.names[1]}"

    @property
    def contrast(self) -> str:
        """``male - female``; of several classes, each against the rest."""
        return "each class - the rest" if self.several else f"{self.names[1]} - {self.names[0]}"

    @property
    def slug(self) -> str:
        """The contrast in file names: ``male_minus_female``."""
        return "each_class_minus_rest" if self.several else f"{self.names[1]}_minus_{self.names[0]}"

    def predictions(
        self, subject_ids: list[str], labels: np.ndarray, p: np.ndarray, log_odds: np.ndarray | None = None
    ) -> pd.DataFrame:
        """A held-out prediction table: subject_id, the true class, P(class 1), the predicted class and, when given,
        the model's log-odds of class 1 before calibration. Of several classes ``p`` is [subjects, classes]: a
        column of each class's probability, and the most probable class."""
        names, p = np.array(self.names), np.asarray(p)
        predicted = p.argmax(1) if self.several else (p >= 0.5).astype(int)
        table = pd.DataFrame({"subject_id": subject_ids, self.column: names[np.asarray(labels, int)]})
        table = table.assign(**dict(zip(self.columns, p.T if self.several else [p])), predicted=names[predicted])
        return table if log_odds is None or self.several else table.assign(log_odds=log_odds)


@dataclass(frozen=True)
class Regression:
    """What a study predicts: a numeric participants-table column (``age``: brain age), in the column's unit.

    The network has one output: the target standardized on each fold's training subjects
    (:meth:`study.training.calibration.Calibration.standardizing`), which each fold maps back to the unit.
    """

    column: str = "age"
    kind: ClassVar[str] = "regression"
    outputs: ClassVar[int] = 1
    several: ClassVar[bool] = False  # not several classes
    names: ClassVar[tuple[str, ...]] = ()  # no classes: group maps of everyone, tests of association
    bins: ClassVar[int] = 4  # folds balance the target's quartiles

    @property
    def prediction(self) -> str:
        """The prediction tables' column of the predicted value, e.g. ``predicted_age``."""
        return f"predicted_{self.column}"

    @property
    def columns(self) -> list[str]:
        """The prediction tables' score columns: the predicted value's."""
        return [self.prediction]

    @property
    def contrast(self) -> str:
        """What the maps' tests ask, in captions: their association with ``age``."""
        return self.column

    @property
    def slug(self) -> str:
        """The tests' maps in file names: ``age``."""
        return self.column

    @property
    def positive(self) -> str:
        """Where a positive t or weight points: ``higher age``."""
        return f"higher {self.column}"

    def strata(self, values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
        """What folds balance: the target's quartiles (fewer where values repeat: each stratum holds subjects), with
        their ranges as names (``age 20 to 34.5``)."""
        values = np.asarray(values, dtype=np.float64)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, self.bins + 1)[1:-1]))
        strata = np.unique(np.searchsorted(edges, values, side="right"), return_inverse=True)[1]
        ranges = [values[strata == k] for k in range(strata.max() + 1)]
        return strata, tuple(f"{self.column} {r.min():g} to {r.max():g}" for r in ranges)

    def predictions(
        self, subject_ids: list[str], values: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None = None
    ) -> pd.DataFrame:
        """A held-out prediction table: subject_id, the true value, the predicted value and, when given, the
        network's standardized output."""
        table = pd.DataFrame({"subject_id": subject_ids, self.column: values, self.prediction: predicted})
        return table if scores is None else table.assign(standardized=scores)


Target = Classes | Regression
