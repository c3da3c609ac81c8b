"""Grad-CAM (Selvaraju et al. 2017) in 3D at the model's declared target layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from study.attribution.targets import class_score


def gradcam(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """ReLU of the gradient-weighted activations of ``model.gradcam_layer``, upsampled
    trilinearly to the input grid; [batch, D, H, W]."""
    captured: list[torch.Tensor] = []
    hook = model.gradcam_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            activations = captured[0]
            grads = torch.autograd.grad(class_score(logits, targets).sum(), activations)[0]
    finally:
        hook.remove()
    weights = grads.float().mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * activations.float()).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0].detach()
