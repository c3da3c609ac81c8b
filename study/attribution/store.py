"""Where attribution maps are kept: one float16 memmap per method, like the volume cache.

``<directory>/<method>.f16`` holds [subjects, D, H, W]; ``<method>.done.npy``
marks the rows written. Rows are flushed before they are marked, so after a
crash every row marked done is complete, and a rerun computes only the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from study.storage import allocate, replace_atomically


class MapStore:
    """Per-subject maps of several methods on the study grid."""

    def __init__(self, directory: Path, subject_ids: list[str], shape: tuple[int, int, int], methods: list[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.subject_ids = list(subject_ids)
        self.row = {sid: i for i, sid in enumerate(self.subject_ids)}
        self.shape = tuple(shape)
        self.methods = list(methods)
        for method in self.methods:
            if not self._done_path(method).exists():  # written last: it exists only beside a whole maps file
                # Disk space reserved now: a full disk fails here, not with a SIGBUS when a map is written.
                replace_atomically(
                    self._maps_path(method),
                    lambda tmp: allocate(tmp, int(np.prod(self._full_shape)) * np.dtype(np.float16).itemsize),
                )
                replace_atomically(
                    self._done_path(method), lambda tmp: np.save(tmp, np.zeros(len(self.subject_ids), dtype=bool))
                )

    @property
    def _full_shape(self) -> tuple[int, ...]:
        return (len(self.subject_ids), *self.shape)

    def _maps_path(self, method: str) -> Path:
        return self.directory / f"{method}.f16"

    def _done_path(self, method: str) -> Path:
        return self.directory / f"{method}.done.npy"

    def done(self, method: str) -> np.ndarray:
        """Which subjects (in store order) have a finished map of ``method``."""
        return np.load(self._done_path(method))

    def missing(self, subject_ids: list[str]) -> list[str]:
        """The given subjects that lack a map of at least one method."""
        done = np.logical_and.reduce([self.done(m) for m in self.methods])
        return [s for s in subject_ids if not done[self.row[s]]]

    def write(self, subject_ids: list[str], maps: dict[str, np.ndarray]) -> None:
        """Store one batch of maps (``{method: [batch, D, H, W]}``) and mark it done."""
        rows = np.array([self.row[s] for s in subject_ids])
        for method, values in maps.items():
            store = np.memmap(self._maps_path(method), dtype=np.float16, mode="r+", shape=self._full_shape)
            store[rows] = values
            store.flush()
            del store
            done = self.done(method)
            done[rows] = True
            replace_atomically(self._done_path(method), lambda tmp: np.save(tmp, done))

    def read(self, method: str, subject_ids: list[str] | None = None) -> np.ndarray:
        """Maps of ``method`` as float32 [subjects, D, H, W], in the order asked for."""
        store = np.memmap(self._maps_path(method), dtype=np.float16, mode="r", shape=self._full_shape)
        rows = np.arange(len(self.subject_ids)) if subject_ids is None else np.array([self.row[s] for s in subject_ids])
        return np.asarray(store[rows], dtype=np.float32)
