"""Attribution: explain every held-out subject, then analyse the maps as a group.

Owns the voxel-wise methods (Grad-CAM, Guided Backpropagation, Meaningful
Perturbations, Guided Grad-CAM: batched, on the model's device), the pool of
Ray actors that runs them over a cohort and the store that keeps their maps,
and the analysis of those maps (group maps, statistics, agreement, localization,
sanity checks), returned as values. It never writes to MLflow, the report or
the console: ``study.output`` publishes what it returns.

Every method takes a model in eval mode, volumes ``x`` [batch, 1, D, H, W] and
the target classes [batch] (or ``None`` for the class 1 minus class 0 contrast), and
returns non-negative maps [batch, D, H, W] on the input grid.
"""

from study.attribution.gradcam import gradcam
from study.attribution.guided_backprop import guided_backprop
from study.attribution.perturbation import Perturbation, meaningful_perturbation
from study.attribution.targets import select_targets

# Every method a study can run: config name -> the name researchers know.
METHODS = {
    "gradcam": "Grad-CAM",
    "guided_backprop": "Guided Backprop",
    "perturbation": "Meaningful Perturbations",
    "guided_gradcam": "Guided Grad-CAM",
}

__all__ = [
    "METHODS",
    "Perturbation",
    "gradcam",
    "guided_backprop",
    "meaningful_perturbation",
    "select_targets",
]
