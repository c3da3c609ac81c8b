"""Ray start-up and a parallel map with a progress bar, shared by every stage."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from tqdm.auto import tqdm


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job runs in (``RAY_ADDRESS``) or start a local Ray once.

    ``num_cpus`` limits a local Ray (tests use 2); it is ignored on a cluster,
    whose resources are its own. A local Ray requires its token: Ray 2.60's
    ``ray.init()`` turns token authentication on by itself when ``RAY_AUTH_MODE``
    is unset, creating ``~/.ray/auth_token`` if missing. The mode is read once, at
    ``import ray``, so it must never be set here: a driver that imported Ray in
    ``disabled`` mode would start a GCS that inherits ``token`` and cannot talk to it.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        print(f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}: {_describe(ray.cluster_resources())}")
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU")) + " now (more if it autoscales)"


def map_tasks(
    fn: Callable[..., Any], args: Sequence[tuple], desc: str, num_cpus: float = 1
) -> Iterator[tuple[int, Any, Exception | None]]:
    """Run ``fn(*a)`` for each ``a`` in ``args`` as Ray tasks; yield as each finishes.

    Yields ``(index, result, error)``: an exception raised by ``fn`` comes back
    as ``error`` instead of stopping the other tasks, so every failure is seen
    at once and every success can be kept.
    """
    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_capture).options(name=desc)
    pending = {remote.remote(fn, *a): i for i, a in enumerate(args)}
    with tqdm(total=len(pending), desc=desc, unit="subject", disable=not pending) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            result, error = ray.get(done[0])
            bar.update(1)
            yield index, result, error


def _capture(fn: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None]:
    try:
        return fn(*args), None
    except Exception as err:  # noqa: BLE001 - returned to the caller, who reports it
        return None, err
