"""Meaningful Perturbations (Fong & Vedaldi 2017) in 3D, many subjects at once.

A mask at 1/``mask_scale`` of the grid is upsampled trilinearly and blends each
volume with a reference, what a deleted voxel becomes. Adam optimizes all masks
of the batch together, on the device, with no host transfer inside the loop:

    deletion:      min  score(x * m + r * (1 - m)) + l1 * mean|1 - m| + tv * TV(m)
    preservation:  min -score(x * m + r * (1 - m)) + l1 * mean|m|     + tv * TV(m)

The reference ``r`` is the paper's Gaussian-blurred copy of the volume
(``blur``), or the cohort's mean volume (``cohort_mean``). Blurring deletes fine
structure only: a smooth difference (a region a little larger, or a little
darker, than typical, as in atrophy) survives it, and a region smaller than
typical cannot be deleted by blurring at all. On registered images the cohort's
mean is the volume with no individual difference, so replacing voxels by it
deletes whatever makes the subject differ there.

The score is the softmax probability of the target class. For the contrast it
is class 1 minus class 0 probability signed by the model's own decision for the
subject (p1 - p0 where the model favours class 1, p0 - p1 where it favours
class 0), so every mask deletes (or preserves) the evidence for what the model
decided: unsigned, the score of a subject called class 0 is already near its
minimum and its mask stays empty. A regression model's score is the same for
its prediction: tanh of the network's standardized output (0: the mean of its
fold's training subjects, 1: their sd), signed by the side of that mean the
subject is predicted on, so deletion moves each prediction towards the mean
target (a young brain predicted older, an old one younger), on a bounded scale
like a probability's. The map is what the mask says matters: 1 - m for
deletion, m for preservation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from study.attribution.targets import frozen
from study.params import Params


class Perturbation(Params):
    """Settings of Meaningful Perturbations; the defaults follow the paper, except the reference (module docstring)."""

    variant: Literal["deletion", "preservation"] = "deletion"
    iterations: int = Field(300, ge=1)  # Adam steps per batch
    lr: float = Field(0.1, gt=0)
    l1: float = Field(0.01, ge=0)  # weight of the mask's area term
    tv: float = Field(0.2, ge=0)  # weight of the total-variation term (3 axes)
    tv_beta: float = Field(3.0, gt=0)
    mask_scale: int = Field(4, ge=1)  # the mask lives at 1/mask_scale of the grid (the paper: a quarter)
    reference: Literal["cohort_mean", "blur"] = "cohort_mean"  # what a deleted voxel becomes (blur: the paper's)
    blur_sigma_mm: float = Field(10.0, gt=0)  # the blur reference's width
    jitter_voxels: int = Field(1, ge=0)  # random shift of the perturbed volume at each step

    @model_validator(mode="after")
    def _blur_width_needs_the_blur(self) -> Perturbation:
        """A config written when blurring was the only reference would silently stop blurring: ask."""
        if "blur_sigma_mm" in self.model_fields_set and "reference" not in self.model_fields_set:
            raise ValueError(
                "blur_sigma_mm is the width of the blur reference, and deleted voxels now become the "
                "cohort's mean by default: set reference: blur to delete by blurring (the paper's), "
                "or drop blur_sigma_mm"
            )
        return self


def gaussian_blur3d(x: torch.Tensor, sigma_voxels: float) -> torch.Tensor:
    """Separable Gaussian blur of [batch, 1, D, H, W] volumes (three 1D convolutions), in float32 even
    under autocast (a bf16 kernel no longer sums to 1)."""
    radius = max(1, int(math.ceil(3 * sigma_voxels)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma_voxels) ** 2)
    kernel = kernel / kernel.sum()
    out = x.float()
    with torch.autocast(x.device.type, enabled=False):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            padding = [0, 0, 0]
            padding[axis] = radius
            out = F.conv3d(out, kernel.view(shape), padding=tuple(padding))
    return out


def _total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-subject mean of |finite difference|^beta along the three axes; [batch]."""
    tv = 0
    for axis in (2, 3, 4):
        tv = tv + mask.diff(dim=axis).abs().pow(beta).flatten(1).mean(1)
    return tv


def _score(
    logits: torch.Tensor, targets: torch.Tensor | None, decision: torch.Tensor | None, model: torch.nn.Module
) -> torch.Tensor:
    """The probability of each subject's target class, or the decision-signed contrast; of a regression model
    (one output), tanh of its standardized output signed by the decision (the module docstring)."""
    if logits.shape[1] == 1:
        return decision * torch.tanh(_standardized(model, logits[:, 0].float()))
    if targets is None and logits.shape[1] > 2:
        raise ValueError("the class 1 minus class 0 contrast is two classes'; explain a class of several instead")
    p = torch.softmax(logits.float(), dim=1)
    return decision * (p[:, 1] - p[:, 0]) if targets is None else p.gather(1, targets[:, None])[:, 0]


def _standardized(model: torch.nn.Module, values: torch.Tensor) -> torch.Tensor:
    """A regression model's outputs in the units its network learned (the fold's training targets standardized):
    a model that carries its fold's map to the target's unit (``CalibratedModel``) has it undone."""
    temperature, bias = getattr(model, "temperature", 1.0), getattr(model, "bias", 0.0)
    return (values - bias) / temperature


def meaningful_perturbation(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | None,
    config: Perturbation,
    voxel_mm: float,
    seed: int = 0,
    cohort_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimized perturbation masks, as saliency on the input grid.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier in eval mode, [batch, 1, D, H, W] -> logits [batch, 2] (a
        regression model's [batch, 1]); its parameters' ``requires_grad`` flags are
        restored afterwards.
    x : torch.Tensor
        Volumes [batch, 1, D, H, W] on the model's device.
    targets : torch.Tensor or None
        Class index per subject [batch]; None explains class 1 minus class 0
        probability, signed by the model's decision for each subject.
    config : Perturbation
        The optimization's settings.
    voxel_mm : float
        Voxel size, which turns ``blur_sigma_mm`` into voxels.
    seed : int
        Seed of the jitter.
    cohort_mean : torch.Tensor, optional
        The cohort's mean volume [D, H, W] on the same grid and device; required
        when ``config.reference`` is ``cohort_mean``.

    Returns
    -------
    torch.Tensor
        Maps [batch, D, H, W] in [0, 1]: 1 - mask for deletion, the mask for preservation.
    """
    x = x.detach()
    if config.reference == "blur":
        reference = gaussian_blur3d(x, config.blur_sigma_mm / voxel_mm)
    elif cohort_mean is None or tuple(cohort_mean.shape) != tuple(x.shape[2:]):
        raise ValueError(
            f"perturbation.reference cohort_mean needs the cohort's mean volume of shape "
            f"{tuple(x.shape[2:])}, got {None if cohort_mean is None else tuple(cohort_mean.shape)}"
        )
    else:
        reference = cohort_mean.to(x.device, x.dtype).expand_as(x)
    with frozen(model):
        return _optimize(model, x, reference, targets, config, seed)


def _optimize(
    model: torch.nn.Module,
    x: torch.Tensor,
    reference: torch.Tensor,
    targets: torch.Tensor | None,
    config: Perturbation,
    seed: int,
) -> torch.Tensor:
    size = x.shape[2:]
    coarse = [max(1, s // config.mask_scale) for s in size]
    deletion = config.variant == "deletion"
    mask = torch.full((x.shape[0], 1, *coarse), 1.0 if deletion else 0.0, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([mask], lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    j = config.jitter_voxels
    decision = None  # for the contrast: +1 where the model favours class 1, -1 where class 0 (a regression
    # model's: above or below its fold's mean)
    if targets is None:
        with torch.no_grad():
            logits = model(x)
        favoured = _standardized(model, logits[:, 0].float()) if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        decision = torch.where(favoured >= 0, 1.0, -1.0)
    with torch.enable_grad():
        for _ in range(config.iterations):
            m = F.interpolate(mask, size=size, mode="trilinear", align_corners=False)
            perturbed = x * m + reference * (1 - m)
            if j:
                shifts = torch.randint(-j, j + 1, (3,), generator=generator).tolist()  # CPU, no device sync
                perturbed = torch.roll(perturbed, shifts=shifts, dims=(2, 3, 4))
            score = _score(model(perturbed), targets, decision, model)
            area = (1 - mask if deletion else mask).abs().flatten(1).mean(1)
            loss = (
                (score if deletion else -score) + config.l1 * area + config.tv * _total_variation(mask, config.tv_beta)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
    final = F.interpolate(mask.detach(), size=size, mode="trilinear", align_corners=False)[:, 0]
    return 1 - final if deletion else final
