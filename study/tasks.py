"""Per-subject work in parallel: as Ray tasks, or one subject after another in this process.

Preprocessing, image checks and synthetic cohorts run one function per subject
through a :data:`TaskMap`: :func:`map_tasks` on Ray (the default of every
command), :func:`map_in_process` without Ray (the fast tests, small jobs). Both
yield each subject's outcome as it finishes and keep going past failures, so
every problem is seen at once and every success can be kept. Ray is imported
only when its tasks run: the command line sets how a local Ray listens before
that import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

# What a parallel map yields: (index into args, fn's result, the exception fn raised or None), as each finishes
Outcome = tuple[int, Any, Exception | None]
# map_tasks or map_in_process: ``tasks(fn, args, desc, shared=())`` yields an Outcome per call fn(*shared, *a)
TaskMap = Callable[..., Iterator[Outcome]]


def map_tasks(
    fn: Callable[..., Any], args: Sequence[tuple], desc: str, num_cpus: float = 1, shared: tuple = ()
) -> Iterator[Outcome]:
    """Run ``fn(*shared, *a)`` for each ``a`` in ``args`` as Ray tasks; yield as each finishes.

    Yields ``(index, result, error)``: an exception raised by ``fn`` comes back
    as ``error`` instead of stopping the other tasks, so every failure is seen
    at once and every success can be kept. ``shared`` arguments (e.g. a large
    array that every call reads) go to Ray's object store once, not once per task.
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_capture).options(name=desc)
    refs = tuple(ray.put(value) for value in shared)
    pending = {remote.remote(fn, *refs, *a): i for i, a in enumerate(args)}
    with tqdm(total=len(pending), desc=desc, unit="subject", disable=not pending) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            result, error = ray.get(done[0])
            bar.update(1)
            yield index, result, error


def map_in_process(
    fn: Callable[..., Any], args: Sequence[tuple], desc: str, num_cpus: float = 1, shared: tuple = ()
) -> Iterator[Outcome]:
    """:func:`map_tasks`' contract, one call after another in this process: no Ray (tests, small jobs)."""
    for index, a in enumerate(tqdm(args, desc=desc, unit="subject", disable=not args)):
        yield index, *_capture(fn, *shared, *a)


def _capture(fn: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None]:
    try:
        return fn(*args), None
    except Exception as err:  # noqa: BLE001 - returned to the caller, who reports it
        return None, err
