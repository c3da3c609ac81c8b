"""Guided Backpropagation (Springenberg et al. 2015): only positive gradients pass back
through ReLUs that were active.

Every ReLU call is intercepted while the map is computed, module (``nn.ReLU``)
or functional (``F.relu``, ``torch.relu``, ``Tensor.relu``) alike, so models that
use functional ReLUs are explained correctly. Models with other activations
are refused, since guided backprop is only defined for ReLU networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from study.attribution.targets import class_score, frozen
from study.errors import AttributionError

_RELUS = {F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_}
_OTHER_ACTIVATIONS = {
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.selu: "selu",
    F.softplus: "softplus",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.prelu: "prelu",
}


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _GuidedMode(TorchFunctionMode):
    """Routes every ReLU through :class:`_GuidedReLU` and refuses other activations."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return _GuidedReLU.apply(args[0])
        if func in _OTHER_ACTIVATIONS:
            raise AttributionError(
                f"guided backprop needs ReLU activations; this model uses {_OTHER_ACTIVATIONS[func]}"
            )
        return func(*args, **kwargs)


def guided_backprop(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Absolute guided gradient of the target class score w.r.t. the input; [batch, D, H, W].

    ``model``'s parameters' ``requires_grad`` flags are restored afterwards."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), frozen(model), _GuidedMode():
        logits = model(x)
        score = class_score(logits, targets).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad[:, 0].abs().float()


def check_relu_only(model: torch.nn.Module, input_shape: tuple[int, int, int], name: str) -> None:
    """Guided Backpropagation of ``model`` on one volume: ReLU activations only. Raises ValueError saying what
    to change; ``name`` (the network's ``class``) is what it names."""
    try:
        guided_backprop(model, torch.zeros(1, 1, *input_shape), None)
    except AttributionError as err:
        raise ValueError(
            f"{name}: {err}; use nn.ReLU, or leave guided_backprop and guided_gradcam out of attribution.methods"
        ) from None
