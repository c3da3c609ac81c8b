"""The 3D CNN family, with the paper's MriNet as a named preset.

A model is built from an :class:`Architecture` (what the config's ``model``
section and a search's sampled keys resolve to) and the input grid shape.
Every model names its Grad-CAM target layer (``gradcam_layer``: the last
block's activation) and uses ``nn.ReLU`` modules, so the attribution methods
can hook it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from study.params import Params


class Architecture(Params):
    """A VGG-like 3D CNN: ``blocks`` x ([Conv3d + norm + ReLU] x ``convs_per_block``, MaxPool3d(2)), then a head.

    The defaults are the paper's MriNet: 3 blocks of Conv3d k3 without padding,
    BatchNorm, ReLU and max pooling, 32/64/128 channels, dropout 0.5 and a linear
    layer on the flattened features. ``head='gap'`` averages the last feature map
    globally first (fewer parameters, any grid).
    """

    blocks: int = Field(3, ge=1)
    width: int = Field(32, ge=1)  # channels of the first block
    growth: float = Field(2.0, gt=0)  # channel factor from one block to the next
    kernel_size: int = Field(3, ge=1)
    convs_per_block: int = Field(1, ge=1)
    norm: Literal["batch", "instance", "group", "none"] = "batch"
    dropout: float = Field(0.5, ge=0, lt=1)
    head: Literal["flatten", "gap"] = "flatten"
    padding: int = Field(0, ge=0)

    def channels(self, block: int) -> int:
        """Output channels of ``block`` (0-based)."""
        return int(round(self.width * self.growth**block))


PRESETS: dict[str, Architecture] = {"mrinet": Architecture()}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class BrainCNN(nn.Module):
    """The network of an :class:`Architecture` on a fixed input grid; logits [batch, 2] (class 0, class 1)."""

    def __init__(self, architecture: Architecture, input_shape: tuple[int, int, int]):
        super().__init__()
        self.architecture = architecture
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        channels_in = 1
        for block in range(architecture.blocks):
            channels = architecture.channels(block)
            for _ in range(architecture.convs_per_block):
                layers += [
                    nn.Conv3d(channels_in, channels, architecture.kernel_size, padding=architecture.padding),
                    _norm(architecture.norm, channels),
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
            raise ValueError(f"input grid {self.input_shape} is too small for {architecture}: {err}") from None
        if min(feature_shape[2:]) < 1:
            raise ValueError(f"input grid {self.input_shape} is too small for {architecture.blocks} blocks")
        flat = channels_in if architecture.head == "gap" else int(torch.tensor(feature_shape[1:]).prod())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1) if architecture.head == "gap" else nn.Identity(),
            nn.Flatten(),
            nn.Dropout(architecture.dropout),
            nn.Linear(flat, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] (class 0, class 1, e.g. female, male) for volumes [batch, 1, D, H, W]."""
        return self.head(self.features(x))


def model_record(model: BrainCNN, weights: dict[str, torch.Tensor] | None = None) -> dict:
    """What rebuilds a model: weights (``model``'s own unless given), architecture and input grid shape.

    Plain tensors and builtins only, so a saved record loads with
    ``torch.load(weights_only=True)`` (no pickle of code).
    """
    return {"model": model.state_dict() if weights is None else weights, "arch": model.architecture.model_dump(),
            "input_shape": model.input_shape}


def model_from_record(record: dict) -> BrainCNN:
    """The model of a :func:`model_record`, in eval mode, on the device of its weights."""
    model = BrainCNN(Architecture(**record["arch"]), tuple(record["input_shape"]))
    model.load_state_dict(record["model"])
    return model.eval()
