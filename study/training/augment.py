"""Augmentations of volume batches, on the device, that respect anatomy.

Small random rotations, translations and scalings (one affine per subject,
applied with ``grid_sample``) and intensity jitter. No left-right flip unless
asked: a flip would erase lateralized effects, which are what a sex study is
looking for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from study.params import Params


class Augmentation(Params):
    """Random transforms of each training volume. Left-right flips are off by default:
    they would erase lateralized effects. ``strength`` scales the four magnitudes together (0: none), so
    a search can tune augmentation with one key (``augment_strength``)."""

    rotation_deg: float = Field(3.0, ge=0)
    translation_mm: float = Field(3.0, ge=0)
    scaling: float = Field(0.03, ge=0)  # relative size change
    intensity: float = Field(0.1, ge=0)  # gain and offset jitter
    flip_lr: bool = False
    strength: float = Field(1.0, ge=0)


def random_affine(
    batch: int,
    augmentation: Augmentation,
    voxel_mm: float,
    extent_vox: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """[batch, 3, 4] affines in ``affine_grid``'s normalized coordinates."""

    def uniform(*shape: int, scale: float) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator) * 2 - 1) * scale

    k = augmentation.strength
    angles = uniform(batch, 3, scale=math.radians(augmentation.rotation_deg * k))
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones(batch), torch.zeros(batch)
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1)
    rotation = rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)
    scale = 1 + uniform(batch, 1, 1, scale=augmentation.scaling * k)
    # Normalized coordinates span 2 units over the grid's extent along each axis.
    shift = uniform(batch, 3, scale=augmentation.translation_mm * k) / voxel_mm * 2 / extent_vox
    matrix = torch.cat([rotation * scale, shift.unsqueeze(-1)], dim=2)
    return matrix.to(device, non_blocking=True)


def augment(x: torch.Tensor, augmentation: Augmentation, voxel_mm: float, generator: torch.Generator) -> torch.Tensor:
    """A randomly transformed copy of volumes ``x`` [batch, 1, D, H, W]."""
    batch = x.shape[0]
    # affine_grid orders coordinates (W, H, D); reverse the extents to match.
    extent = torch.tensor(x.shape[2:][::-1], dtype=torch.float32)
    theta = random_affine(batch, augmentation, voxel_mm, extent, generator, x.device).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    intensity = augmentation.intensity * augmentation.strength
    gain = 1 + (torch.rand(batch, 1, 1, 1, 1, generator=generator) * 2 - 1) * intensity
    bias = (torch.rand(batch, 1, 1, 1, 1, generator=generator) * 2 - 1) * intensity
    # Drawn on the host (the same draws on every device); non_blocking: a blocking copy to a GPU waits for
    # every step queued before it.
    gain, bias = (v.to(x.device, x.dtype, non_blocking=True) for v in (gain, bias))
    out = out * gain + bias * (out != 0)
    if augmentation.flip_lr:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device, non_blocking=True)
        out = torch.where(flip.view(-1, 1, 1, 1, 1), out.flip(2), out)  # axis 0 of the RAS grid is left-right
    return out
