"""The 3D CNN family, with the paper's MriNet as a named preset.

A model is built from a plain dict of architecture parameters (what Ray Tune
samples) and the input grid shape. Every model names its Grad-CAM target layer
(``gradcam_layer``: the last block's activation) and uses ``nn.ReLU`` modules,
so the attribution methods can hook it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The paper's network: 3 x (Conv3d k3, no padding + BatchNorm + ReLU + MaxPool 2), 32/64/128
# channels, dropout 0.5, linear layer to 2 classes on the flattened features.
MRINET: dict[str, Any] = {
    "blocks": 3,
    "width": 32,
    "growth": 2.0,
    "kernel_size": 3,
    "convs_per_block": 1,
    "norm": "batch",
    "dropout": 0.5,
    "head": "flatten",
    "padding": 0,
}
PRESETS: dict[str, dict[str, Any]] = {"mrinet": MRINET}
NUM_CLASSES = 2  # female (0), male (1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use batch, instance, group or none")


class BrainCNN(nn.Module):
    """A VGG-like 3D CNN: ``blocks`` x ([Conv3d + norm + ReLU] x convs, MaxPool3d(2)), then a head.

    ``head='flatten'`` (the paper's) flattens the last feature map into a linear
    layer; ``head='gap'`` averages it globally first (fewer parameters, any grid).
    """

    def __init__(self, input_shape: tuple[int, int, int], **arch: Any):
        super().__init__()
        arch = {**MRINET, **arch}
        unknown = set(arch) - set(MRINET)
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}; valid: {sorted(MRINET)}")
        self.arch = arch
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        channels_in = 1
        for block in range(arch["blocks"]):
            channels = int(round(arch["width"] * arch["growth"] ** block))
            for _ in range(arch["convs_per_block"]):
                layers += [
                    nn.Conv3d(channels_in, channels, arch["kernel_size"], padding=arch["padding"]),
                    _norm(arch["norm"], channels),
                    nn.ReLU(),
                ]
                channels_in = channels
            layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.gradcam_layer: nn.Module = layers[-2]  # the last block's activation, before pooling
        try:
            with torch.no_grad():
                feature_shape = self.features(torch.zeros(1, 1, *self.input_shape)).shape
        except RuntimeError as err:
            raise ValueError(f"input grid {self.input_shape} is too small for this architecture {arch}: {err}") from None
        if min(feature_shape[2:]) < 1:
            raise ValueError(f"input grid {self.input_shape} is too small for {arch['blocks']} blocks")
        flat = channels_in if arch["head"] == "gap" else int(torch.tensor(feature_shape[1:]).prod())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1) if arch["head"] == "gap" else nn.Identity(),
            nn.Flatten(),
            nn.Dropout(arch["dropout"]),
            nn.Linear(flat, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] (female, male) for volumes [batch, 1, D, H, W]."""
        return self.head(self.features(x))


def build_model(arch: dict[str, Any], input_shape: tuple[int, int, int]) -> BrainCNN:
    """A model from an architecture dict; a ``preset`` key starts from a named preset."""
    arch = dict(arch)
    preset = arch.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {sorted(PRESETS)}")
    return BrainCNN(input_shape, **{**PRESETS.get(preset, {}), **arch})
