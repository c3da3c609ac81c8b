"""What a fold's search found: every trial and the best setup, as plain data.

A :class:`~study.training.crossval.FoldResult` carries its search, so these
types stay free of Ray Tune and Optuna, which only :mod:`study.training.search`
imports (a study without a search never loads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd


class TrialEvents(Protocol):
    """A fold's search trials as they happen: ``start``, ``result`` (an epoch's metrics), ``complete``, ``error``."""

    def __call__(self, event: str, trial_id: str, params: dict[str, Any], result: dict[str, Any]) -> None: ...


@dataclass
class Trial:
    """One finished (or stopped, or failed) trial of a search."""

    trial_id: str
    params: dict[str, Any]
    history: pd.DataFrame
    status: str  # completed | stopped_early | errored
    score: float


@dataclass
class SearchResult:
    """A fold's search: every trial, and the best sampled params under ``metric``."""

    metric: str
    best: dict[str, Any]
    trials: list[Trial]

    @property
    def best_trial(self) -> Trial:
        return next(t for t in self.trials if t.params == self.best)

    @property
    def best_score(self) -> float:
        return self.best_trial.score

    @property
    def best_epoch(self) -> int:
        """The epoch (0-based) of the best trial's lowest validation loss: what a refit trains up to."""
        history = self.best_trial.history
        return int(history.loc[history["val_loss"].idxmin(), "epoch"])
