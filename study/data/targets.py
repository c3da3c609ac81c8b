"""What a study learns: two classes of a participants-table column, or a numeric column (a regression target).

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
    """What a study tells apart: a participants-table column and its two classes, in model order [0, 1].

    Class 1 is the positive class of every metric (sensitivity, ROC AUC) and the
    first term of every difference of maps (class 1 - class 0).
    """

    column: str = "sex"
    names: tuple[str, str] = SEX_CLASSES
    kind: ClassVar[str] = "classification"
    outputs: ClassVar[int] = 2  # the network's logits, one per class

    @property
    def prediction(self) -> str:
        """The prediction tables' column of what the model says of each subject: P(class 1)."""
        return self.p

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
        """``male - female``."""
        return f"{self.names[1]} - {self.names[0]}"

    @property
    def slug(self) -> str:
        """The contrast in file names: ``male_minus_female``."""
        return f"{self.names[1]}_minus_{self.names[0]}"

    def predictions(
        self, subject_ids: list[str], labels: np.ndarray, p: np.ndarray, log_odds: np.ndarray | None = None
    ) -> pd.DataFrame:
        """A held-out prediction table: subject_id, the true class, P(class 1), the predicted class and, when given,
        the model's log-odds of class 1 before calibration."""
        names = np.array(self.names)
        table = pd.DataFrame(
            {
                "subject_id": subject_ids,
                self.column: names[np.asarray(labels, int)],
                self.p: p,
                "predicted": names[(np.asarray(p) >= 0.5).astype(int)],
            }
        )
        return table if log_odds is None else table.assign(log_odds=log_odds)


@dataclass(frozen=True)
class Regression:
    """What a study predicts: a numeric participants-table column (``age``: brain age), in the column's unit.

    The network has one output: the target standardized on each fold's training subjects
    (:meth:`study.training.calibration.Calibration.standardizing`), which each fold maps back to the unit.
    """

    column: str = "age"
    kind: ClassVar[str] = "regression"
    outputs: ClassVar[int] = 1
    names: ClassVar[tuple[str, ...]] = ()  # no classes: group maps of everyone, tests of association
    bins: ClassVar[int] = 4  # folds balance the target's quartiles

    @property
    def prediction(self) -> str:
        """The prediction tables' column of the predicted value, e.g. ``predicted_age``."""
        return f"predicted_{self.column}"

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
