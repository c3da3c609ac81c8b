"""Attribution: explain every held-out subject, then analyse the maps as a group.

Owns the voxel-wise methods (one table, :mod:`.methods`: Grad-CAM, Guided
Backpropagation, Meaningful Perturbations, Guided Grad-CAM, Integrated
Gradients; batched, on the model's device), the pool of Ray actors that runs
them over a cohort and the store that keeps their maps, and the analysis of
those maps (group maps, statistics, agreement, localization, sanity checks),
returned as values. It never writes to MLflow, the report or the console:
``study.output`` publishes what it returns.
"""

from study.attribution.gradcam import gradcam
from study.attribution.guided_backprop import guided_backprop
from study.attribution.methods import METHODS, Batch, Method, integrated_gradients
from study.attribution.perturbation import Perturbation, meaningful_perturbation
from study.attribution.targets import select_targets

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "Perturbation",
    "gradcam",
    "guided_backprop",
    "integrated_gradients",
    "meaningful_perturbation",
    "select_targets",
]
