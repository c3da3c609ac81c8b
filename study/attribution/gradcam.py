"""Grad-CAM (Selvaraju et al. 2017) in 3D, placed on the input grid by the network's own geometry.

The target layer's feature voxel ``j`` looks at the input around voxel
``start + jump * j`` along each axis, where ``start`` and ``jump`` follow from
the kernels, strides, padding and dilation of every layer before it (a
convolution without padding shifts the grid by half its kernel; floor pooling
drops a border). Stretching the feature map to fill the input grid, as a plain
trilinear resize does, misplaces the map by up to several voxels at the edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from study.attribution.targets import class_score, frozen


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, tuple) else (value, value, value)  # type: ignore[return-value]


def feature_geometry(model: nn.Module, layer: nn.Module) -> tuple[list[float], list[float]]:
    """Per input axis, ``(start, jump)``: the input voxel that ``layer``'s output voxel ``j`` is centred on
    is ``start + jump * j``.

    Walks the model's modules in order up to ``layer`` (inclusive); every
    convolution and pooling moves the centre by ``(dilation * (kernel - 1) / 2 -
    padding) * jump`` and multiplies ``jump`` by its stride. Other modules
    (normalization, activations) keep the grid.
    """
    start, jump = [0.0] * 3, [1.0] * 3
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            kernel, padding = _triple(module.kernel_size), _triple(module.padding)
            stride = _triple(module.stride if module.stride is not None else module.kernel_size)
            dilation = _triple(getattr(module, "dilation", 1))
            for axis in range(3):
                start[axis] += (dilation[axis] * (kernel[axis] - 1) / 2 - padding[axis]) * jump[axis]
                jump[axis] *= stride[axis]
        if module is layer:
            return start, jump
    raise ValueError("the Grad-CAM layer is not a module of the model")


def feature_grid(model: nn.Module, shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], list[float]]:
    """Grad-CAM's own resolution for inputs of ``shape``: the target layer's voxels per axis, and their
    spacing in input voxels. A Grad-CAM map can show no detail finer than this."""
    sizes: list[tuple[int, int, int]] = []
    hook = model.gradcam_layer.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[2:])))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, *shape, device=next(model.parameters()).device))
    finally:
        hook.remove()
    return sizes[0], feature_geometry(model, model.gradcam_layer)[1]


def check_placement(model: nn.Module, input_shape: tuple[int, int, int], name: str) -> None:
    """Raise ValueError when Grad-CAM would place ``model``'s feature voxels off its input grid.

    The geometry follows the convolutions and poolings registered before
    ``model.gradcam_layer``, in registration order: a parallel branch registered
    first would count its stride twice. ``name`` (the network's ``class``) is
    what the message names.
    """
    sizes, _ = feature_grid(model, tuple(input_shape))
    start, jump = feature_geometry(model, model.gradcam_layer)
    for axis, (n, size) in enumerate(zip(sizes, input_shape)):
        last = start[axis] + jump[axis] * (n - 1)
        if start[axis] < -jump[axis] or last > size - 1 + jump[axis]:
            raise ValueError(
                f"{name}: Grad-CAM would place its {n} feature voxels of axis {axis} at "
                f"input voxels {start[axis]:.0f} to {last:.0f} of a grid of {size}: the convolutions and "
                "poolings registered before gradcam_layer are not the ones that run before it, in that "
                "order (a parallel shortcut registered first?). Register modules in the order they run"
            )


def place_on_input(
    cam: torch.Tensor, shape: tuple[int, int, int], start: list[float], jump: list[float]
) -> torch.Tensor:
    """Resample feature-grid maps [batch, 1, d, h, w] onto the input grid ``shape`` by the geometry.

    Input voxel ``i`` takes the value at feature coordinate ``(i - start) / jump``
    (trilinear between feature centres, the nearest centre's value beyond the
    first and last, where the network dropped the border).
    """
    coords = []
    for axis in range(3):
        n = cam.shape[2 + axis]
        position = (torch.arange(shape[axis], dtype=torch.float32, device=cam.device) - start[axis]) / jump[axis]
        coords.append(position / max(n - 1, 1) * 2 - 1 if n > 1 else torch.zeros_like(position))
    d, h, w = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack([w, h, d], dim=-1).expand(cam.shape[0], *shape, 3)  # grid_sample orders (x=w, y=h, z=d)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)


def gradcam(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """ReLU of the gradient-weighted activations of ``model.gradcam_layer``, on the input grid; [batch, D, H, W].

    For the contrast (``targets`` None) the magnitude instead of the ReLU: the
    class 1 - class 0 score is positive where the layer sees evidence for class 1
    and negative where it sees evidence for class 0, and the ReLU would keep only
    class 1's, leaving a subject the model calls class 0 a map of what it lacks. ``model``'s parameters'
    ``requires_grad`` flags are restored afterwards.
    """
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        # With the parameters frozen the layers before this one keep nothing for a backward pass: only the
        # layer's activations and what follows them need a gradient.
        captured.append(out if out.requires_grad else out.requires_grad_())

    hook = model.gradcam_layer.register_forward_hook(capture)
    try:
        with torch.enable_grad(), frozen(model):
            logits = model(x)
            activations = captured[0]
            grads = torch.autograd.grad(class_score(logits, targets).sum(), activations)[0]
    finally:
        hook.remove()
    with torch.no_grad():
        weights = grads.float().mean(dim=(2, 3, 4), keepdim=True)
        cam = (weights * activations.float()).sum(1, keepdim=True)
        cam = cam.abs() if targets is None else F.relu(cam)
        start, jump = feature_geometry(model, model.gradcam_layer)
        return place_on_input(cam, tuple(x.shape[2:]), start, jump)[:, 0]
