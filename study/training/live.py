"""Live curves: every training's per-epoch records, followed by the driver while the folds train.

Ray Train's reports are throttled (one per controller poll) and reach the
driver only when a training ends, so the training loop's rank 0 also appends
each epoch's record to a JSON-lines file (``<execution>/live/fold<k>.jsonl``);
the driver reads what is new every ``LIVE_POLL_S`` and hands it on (to the
fold's MLflow curves).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

LIVE_POLL_S = 2.0  # how often the driver looks for new epochs of the folds in training


class OnEpochs(Protocol):
    """A training fold's new per-epoch records (dicts of its history's columns), in the order they were trained."""

    def __call__(self, fold: int, records: list[dict[str, Any]]) -> None: ...


class LiveFiles:
    """The per-epoch records that training folds append to ``<directory>/fold<k>.jsonl``, read as they grow."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.read: dict[int, int] = {}  # fold -> bytes consumed

    def start(self, fold: int) -> Path:
        """A fresh live file for ``fold`` (a retried fold starts its curves again)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"fold{fold}.jsonl"
        path.write_text("")
        self.read[fold] = 0
        return path

    def stop(self, fold: int) -> None:
        """Stop following ``fold``'s file."""
        self.read.pop(fold, None)

    def new_records(self) -> dict[int, list[dict]]:
        """Every fold's complete lines written since the last call."""
        found = {}
        for fold, offset in self.read.items():
            with open(self.directory / f"fold{fold}.jsonl", "rb") as f:
                f.seek(offset)
                text = f.read()
            complete = text[: text.rfind(b"\n") + 1]
            if complete:
                self.read[fold] = offset + len(complete)
                found[fold] = [json.loads(line) for line in complete.decode().splitlines()]
        return found

    @contextlib.contextmanager
    def delivered(self, on_epochs: OnEpochs | None) -> Iterator[None]:
        """Hand new records to ``on_epochs`` every ``LIVE_POLL_S`` from a thread while the caller is busy
        (a fold's search blocks the driver; folds already training keep reaching MLflow meanwhile)."""
        if on_epochs is None:
            yield
            return
        stop, failed = threading.Event(), []

        def deliver() -> None:
            try:
                while not stop.wait(LIVE_POLL_S):
                    for fold, records in self.new_records().items():
                        on_epochs(fold, records)
            except Exception as err:  # noqa: BLE001 - raised again in the caller's thread below
                failed.append(err)

        thread = threading.Thread(target=deliver, name="live-curves", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if failed:
            raise failed[0]
