"""Where work runs: Ray start-up, the checks of what a cluster can run, and the device policy.

Owns every decision about processes and devices: joining or starting Ray (and
turning its failures into one sentence), checking that the cluster can ever
run what a study asks for, and the one rule for device, bf16 autocast and
memory format that training, testing and attribution all follow. It knows
nothing about studies, configs or MLflow.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from study.errors import RayStartError

# Lines of Ray's own processes that tell a study's user nothing, at every training: the PreemptionWatcher
# actor's error-level warning that its arguments live in the object store, and each epoch's report, which
# Ray Train 2.60 logs under a logger named after its file, past its own LoggingConfig.
_NOISE = ("has constructor arguments in the object store and max_restarts > 0", "Reporting training result ")
# Actors whose output is only Ray's own business: Ray Train 2.60's PlacementGroupCleaner looks its cluster up
# without an address and prints a traceback at every training whenever a second Ray runs on the machine.
_NOISY_ACTORS = ("PlacementGroupCleaner",)


def start_ray(num_cpus: int | None = None) -> str:
    """Join the cluster a job runs in (``RAY_ADDRESS``) or start a local Ray; once per process.

    Parameters
    ----------
    num_cpus : int, optional
        CPUs of a local Ray (default: all). Ignored on a cluster, whose
        resources are its own.

    Returns
    -------
    str
        One line that says which Ray this is and what it has.

    Notes
    -----
    A local Ray requires its token: Ray 2.60's ``ray.init()`` turns token
    authentication on when ``RAY_AUTH_MODE`` is unset, creating
    ``~/.ray/auth_token`` if it is missing. Ray reads that variable once, at
    ``import ray``, so nothing here sets it: a driver that imported Ray in
    ``disabled`` mode would start a GCS that inherits ``token`` and cannot talk to it.
    """
    if ray.is_initialized():
        return _describe("this Ray")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_listening(address)
        try:
            ray.init(address=address)
        except (ConnectionError, ray.exceptions.AuthenticationError) as err:
            raise RayStartError(
                f"could not join the Ray cluster at {address} (RAY_ADDRESS): {_first_line(err)}. "
                "If the cluster requires its token, export RAY_AUTH_MODE=token so that this process sends "
                "~/.ray/auth_token (or set RAY_AUTH_TOKEN); to run on a local Ray instead, unset RAY_ADDRESS."
            ) from None
        description = _describe(f"joined the Ray cluster at {address}")
    else:
        try:
            ray.init(num_cpus=num_cpus)
        except Exception as err:  # noqa: BLE001 - any failure to start is reported the same way
            raise RayStartError(
                f"could not start a local Ray: {_first_line(err)}. Its logs are under /tmp/ray/session_latest/logs; "
                "`ray stop` ends a Ray left over from an earlier run."
            ) from None
        description = _describe("started a local Ray")
    _hide_worker_lines(_NOISE, _NOISY_ACTORS)
    return description


def _describe(what: str) -> str:
    resources = ray.cluster_resources()
    return f"{what}: " + ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _check_listening(address: str) -> None:
    """Fail at once, not after minutes of retries, when nothing listens at a ``host:port`` address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray:// and other forms: leave them to ray.init
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise RayStartError(
            f"no Ray cluster answers at {address} (RAY_ADDRESS): {err.strerror or err}. Start it "
            "(ray start --head), fix RAY_ADDRESS, or unset it to run on a local Ray."
        ) from None


def _hide_worker_lines(needles: Sequence[str], actors: Sequence[str]) -> None:
    """Drop from the console the forwarded worker lines that contain one of ``needles`` or come from ``actors``.

    Ray prints its workers' output through one handler of the driver
    (``ray._private.worker``, Ray 2.60); this wraps that handler. The lines stay
    in the session's log files.
    """
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:  # log_to_driver is off
        return

    def filtered(data: dict[str, Any]) -> None:
        if data.get("actor_name") in actors:
            return
        lines = [line for line in data.get("lines", []) if not any(n in line for n in needles)]
        if lines:
            printers[0]({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def unsatisfiable(bundle: dict[str, float], what: str) -> str | None:
    """Why no node of this Ray can ever run ``bundle`` (e.g. ``{"CPU": 1, "GPU": 1}``), or None.

    Checked against the nodes the cluster has now and the node types its
    autoscaler may add (an autoscaling cluster may start with no worker at
    all); on a local Ray that is final. ``what`` names the request in the message.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    # The node types an autoscaler may add: v2 publishes them in the GCS (Ray Train reads them the same way).
    # A v1 autoscaler does not: there resources.wait_for_nodes says that nodes will come.
    autoscaling = ray._private.state.state.get_cluster_config()
    if autoscaling is not None:
        nodes += [dict(group.resources) for group in autoscaling.node_group_configs if group.max_count != 0]
    if any(all(node.get(k, 0) >= v for k, v in bundle.items() if v) for node in nodes):
        return None
    largest = {k: max((node.get(k, 0) for node in nodes), default=0) for k in bundle}
    asked = ", ".join(f"{v:g} {k}" for k, v in bundle.items() if v)
    has = ", ".join(f"{v:g} {k}" for k, v in largest.items())
    where = "this Ray and the node types its autoscaler may add" if autoscaling is not None else "this Ray"
    return f"{what} asks for {asked} on one node, but the largest node of {where} has {has}"


def gpu_memory(timeout_s: float = 60.0) -> int | None:
    """Bytes of memory of a GPU as Ray gives one to a task; None when none is free within ``timeout_s``.

    Asked of a one-GPU task, not read in the driver: the driver's machine may have no GPU, or another one
    than the workers', and reading it there would keep a CUDA context, and its memory, on GPU 0 for the whole
    study. A GPU that does not come in time (all busy, an autoscaler still adding one) leaves it unknown.
    """
    ref = ray.remote(num_cpus=0, num_gpus=1)(_gpu_memory).remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return ray.get(ref)


def _gpu_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def worker_device() -> torch.device:
    """The device of this Ray task or actor: its GPU when Ray gave it one, else the CPU."""
    on_gpu = ray.is_initialized() and bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


@dataclass(frozen=True)
class Precision:
    """How tensors run on a device: bf16 autocast and the channels-last 3D memory format.

    On a GPU both are on (channels_last_3d is what makes 3D convolutions fast there), on a CPU both off,
    unless asked otherwise. bf16 autocast is for training steps only: every number the study reports
    (probabilities, maps, the deletion check) is computed under :meth:`exact`. Bit-for-bit repeatable GPU
    runs are not on offer: ``torch.use_deterministic_algorithms`` raises there, in the backward passes of
    adaptive average pooling and trilinear interpolation (``model.head: gap``, Meaningful Perturbations' mask).
    """

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def choose(cls, device: torch.device, precision: str = "auto", channels_last: bool | None = None) -> Precision:
        """``precision`` is ``auto`` (bf16 on GPU), ``bf16`` or ``fp32``; ``channels_last`` None follows the device."""
        gpu = device.type == "cuda"
        bf16 = precision == "bf16" or (precision == "auto" and gpu)
        return cls(device, bf16, gpu if channels_last is None else channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def training(self) -> contextlib.AbstractContextManager:
        """The context of whole training steps, backward passes included: without bf16 (``precision: fp32``),
        float32 as in :meth:`exact`, not cuDNN's default TF32 convolutions (a 10-bit mantissa)."""
        return contextlib.nullcontext() if self.bf16 else self.exact()

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """float32 as a CPU computes it: no autocast (even inside one), no TF32 in cuDNN's convolutions (on by
        default on GPUs) nor in matrix products (off by default, on after a user's module calls
        ``torch.set_float32_matmul_precision("high")``). For every number the study reports from a model:
        probabilities, maps, the deletion check."""
        cudnn, matmul = torch.backends.cudnn, torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            with (
                torch.autocast(self.device.type, enabled=False),
                cudnn.flags(
                    enabled=cudnn.enabled,
                    benchmark=cudnn.benchmark,
                    deterministic=cudnn.deterministic,
                    allow_tf32=False,
                ),
            ):
                yield
        finally:
            torch.set_float32_matmul_precision(matmul)

    @property
    def pinned(self) -> bool:
        """Whether data loaders should hand out batches in page-locked memory: on a GPU, so that
        :meth:`volumes`' non-blocking copy is asynchronous (from pageable memory it waits for the copy)."""
        return self.device.type == "cuda"

    def volumes(self, x: torch.Tensor) -> torch.Tensor:
        """A batch [batch, 1, D, H, W] on the device, in the memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved to the device, in the memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    before = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Ctrl-C stops the block even when it lands in a garbage-collection callback.

    CPython cannot raise from a weakref callback or ``__del__`` (SQLAlchemy's run when MLflow's objects are
    collected): it hands the ``KeyboardInterrupt`` to ``sys.unraisablehook``, prints "Exception ignored in
    ...", and goes on, so a study went on after that Ctrl-C. Inside this block such an interrupt is raised
    again in the main thread 50 ms later, once the callback has returned (raised at once, it would be raised in
    the callback again).
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            again = threading.Timer(0.05, _thread.interrupt_main)
            again.daemon = True
            again.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
