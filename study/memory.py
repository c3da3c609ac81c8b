"""What a study will need in memory, estimated before it starts, and refused when this machine cannot hold it.

A training worker holds the network's weights, gradients and AdamW's two
moments (float32), one batch, and the activations autograd keeps for the
backward pass, counted exactly by running the network on PyTorch's ``meta``
device (shapes, no data). An attribution actor holds its model and the
activations of one batch of subjects (Grad-CAM and Guided Backpropagation
differentiate through it; Meaningful Perturbations also keeps a mask, a
reference and Adam's moments per voxel). The group analysis holds every
method's maps of every held-out subject at once (float32, brain voxels) and the
linear weight test their standardized voxels (float64). GPU figures add a CUDA
context and allocator slack; activations are counted in float32, an upper bound
under bf16 autocast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB  # the CUDA context, cuDNN workspaces and the caching allocator's slack, per process
MASK_STATE_PER_VOXEL = 6  # Meaningful Perturbations: mask, its gradient, Adam's two moments, reference, blend


def saved_activation_bytes(model: torch.nn.Module, input_shape: tuple[int, int, int], batch: int) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass of ``batch`` volumes, and the logits.

    Counted on the meta device, so even a paper-sized network costs no memory
    here; equal to what a float32 pass on the CPU keeps (tests/test_memory.py).
    """
    meta = copy.deepcopy(model).to("meta").train()
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = meta(torch.zeros(batch, 1, *input_shape, device="meta"))
    return kept + logits.numel() * logits.element_size()


def parameter_bytes(model: torch.nn.Module) -> int:
    """The float32 weights of ``model``."""
    return sum(p.numel() for p in model.parameters()) * 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training worker, one attribution actor and the group analysis need (see the module)."""

    training: int  # one training worker's device (a GPU, or the CPU's RAM)
    attribution: int  # one attribution actor's device
    actors_per_device: int  # attribution actors sharing one GPU (1 / attribution.gpus_per_actor)
    analysis: int  # host memory of the group analysis, in the driver
    on_gpu: bool

    def describe(self) -> str:
        """One line for the console."""
        device = "GPU" if self.on_gpu else "memory"
        shared = (
            f" ({self.actors_per_device} per GPU: {self.attribution * self.actors_per_device / GIB:.1f} GiB)"
            if self.on_gpu and self.actors_per_device > 1
            else ""
        )
        return (
            f"memory (estimated): a training worker {self.training / GIB:.1f} GiB of {device}, an attribution "
            f"actor {self.attribution / GIB:.1f} GiB{shared}, the group analysis {self.analysis / GIB:.1f} GiB "
            "of the driver's memory"
        )


def estimate_memory(
    model: torch.nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    attribution_batch: int | None,
    methods: int,
    subjects: int,
    brain_voxels: int,
    on_gpu: bool,
    gpus_per_actor: float = 1.0,
) -> MemoryEstimate:
    """What a study of ``model`` on ``input_shape`` needs.

    Parameters
    ----------
    model : torch.nn.Module
        The network as the config builds it (a search's largest trial may need more).
    input_shape : tuple of int
        The study grid.
    batch_size, attribution_batch : int
        ``train.batch_size`` and ``attribution.batch_size`` (None: no attribution).
    methods : int
        Attribution methods, plus one for the linear baseline's map.
    subjects, brain_voxels : int
        The cohort's subjects, and the brain voxels of the study grid.
    on_gpu : bool
        Training and attribution on GPUs (``resources.use_gpu``).
    gpus_per_actor : float
        ``attribution.gpus_per_actor``.
    """
    context = CUDA_CONTEXT_BYTES if on_gpu else 0
    weights = parameter_bytes(model)
    voxels = 1
    for size in input_shape:
        voxels *= size
    training = 4 * weights + saved_activation_bytes(model, input_shape, batch_size) + batch_size * voxels * 4 + context
    attribution = 0
    if attribution_batch:
        attribution = (
            weights
            + saved_activation_bytes(model, input_shape, attribution_batch)
            + attribution_batch * voxels * 4 * (1 + MASK_STATE_PER_VOXEL)
            + context
        )
    analysis = subjects * brain_voxels * (4 * methods + 2 * 8) if attribution_batch else subjects * brain_voxels * 16
    return MemoryEstimate(training, attribution, max(1, int(round(1 / gpus_per_actor))), analysis, on_gpu)


def memory_problems(estimate: MemoryEstimate, host_bytes: int, device_bytes: int | None) -> list[str]:
    """What this machine cannot hold, each with the keys that lower it; ``device_bytes``: one GPU's memory
    (None when no GPU answered: the GPUs are then not checked)."""
    problems = []
    if estimate.analysis > 0.9 * host_bytes:
        problems.append(
            f"the group analysis needs {estimate.analysis / GIB:.1f} GiB, more than 90% of this "
            f"machine's {host_bytes / GIB:.1f} GiB: use a coarser grid (preprocess.voxel_size) or "
            "fewer attribution.methods, or run the driver on a larger node"
        )
    if device_bytes is not None and estimate.on_gpu:
        if estimate.training > 0.9 * device_bytes:
            problems.append(
                f"a training worker needs {estimate.training / GIB:.1f} GiB of its GPU's "
                f"{device_bytes / GIB:.1f} GiB: lower train.batch_size or model.width, or use a coarser "
                "preprocess.voxel_size"
            )
        if estimate.attribution * estimate.actors_per_device > 0.9 * device_bytes:
            problems.append(
                f"{estimate.actors_per_device} attribution actors per GPU need "
                f"{estimate.attribution * estimate.actors_per_device / GIB:.1f} GiB of its "
                f"{device_bytes / GIB:.1f} GiB: lower attribution.batch_size, or raise "
                "attribution.gpus_per_actor"
            )
    return problems
