"""Voxel-wise attribution maps of a 3D CNN: Grad-CAM, Guided Backpropagation,
Meaningful Perturbations and Guided Grad-CAM, all batched and on the model's device.

Every method takes a model in eval mode, volumes ``x`` [batch, 1, D, H, W] and
the target classes [batch] (or ``None`` for the male-minus-female contrast), and
returns non-negative maps [batch, D, H, W] on the input grid.
"""

from study.attribution.gradcam import gradcam
from study.attribution.guided_backprop import AttributionError, guided_backprop
from study.attribution.perturbation import meaningful_perturbation
from study.attribution.targets import select_targets

METHODS = ("gradcam", "guided_backprop", "perturbation", "guided_gradcam")

__all__ = ["METHODS", "AttributionError", "gradcam", "guided_backprop", "meaningful_perturbation", "select_targets"]
