"""The attribution methods a study can run: one table, one call signature.

A method is one :class:`Method` record in :data:`METHODS`: its config name, the
name researchers know, the function that computes its maps, and what the rest
of the study needs to know of it: whether its two classes' maps get the group
test, whether it is defined for ReLU networks only, and what its maps show. The
config's choices, the actors, the group analysis, the report, MLflow and
``study predict`` all iterate over this table, so adding a method is one record
here (and its function, here or in a module of its own) plus its test.

Every method gets a :class:`Batch`: a model in eval mode, volumes ``x``
[batch, 1, D, H, W] on its device and the target class of each subject
(``None`` for the class 1 minus class 0 contrast); it returns non-negative maps
[batch, D, H, W] on the input grid. Methods run in float32 (the actors'
``Precision.exact``) and leave the model's parameters as they found them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from study.attribution.gradcam import gradcam
from study.attribution.guided_backprop import guided_backprop
from study.attribution.perturbation import Perturbation, meaningful_perturbation
from study.attribution.targets import class_score, frozen

# Integrated Gradients' steps along the path from the all-zero volume: Gauss-Legendre quadrature (Captum's
# default rule) brings the completeness error of the study's CNNs below 1% of the score's change at 32 steps
# (tests/test_attribution.py), where the paper's Riemann sums need 20 to 300.
INTEGRATED_GRADIENTS_STEPS = 32


@dataclass
class Batch:
    """One batch to explain, as every method receives it."""

    model: nn.Module  # in eval mode, on the device of x
    x: torch.Tensor  # volumes [batch, 1, D, H, W]
    targets: torch.Tensor | None  # class index per subject; None: the class 1 minus class 0 contrast
    voxel_mm: float  # the grid's voxel size (Meaningful Perturbations' blur width is in mm)
    perturbation: Perturbation  # Meaningful Perturbations' settings (config attribution.perturbation)
    cohort_mean: torch.Tensor | None = None  # [D, H, W] on x's device: what MP deletes towards (reference)
    computed: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, method: str) -> torch.Tensor:
        """``method``'s maps of this batch, computed once (Guided Grad-CAM reuses Grad-CAM's and Guided
        Backprop's)."""
        if method not in self.computed:
            self.computed[method] = METHODS[method].explain(self)
        return self.computed[method]


@dataclass(frozen=True)
class Method:
    """One attribution method and what the study needs to know of it."""

    name: str  # its name in the config (attribution.methods), in file and metric names
    title: str  # the name researchers know, in the report and the figures
    explain: Callable[[Batch], torch.Tensor]  # maps [batch, D, H, W], non-negative
    group_test: bool  # under the contrast, class 1 and class 0 maps are compared (the permutation test)
    needs_relu: bool  # defined for ReLU networks only: a user's network is checked when the config is read
    shows: str  # what its maps show of the contrast, for captions: {target} the score, {deletion} MP's reference


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, steps: int = INTEGRATED_GRADIENTS_STEPS
) -> torch.Tensor:
    """Absolute Integrated Gradients (Sundararajan et al. 2017) of the target score, from the all-zero volume.

    Captum's implementation. Zero is the background and the mean brain intensity
    of the z-scored volumes, so a voxel's attribution is its share of the score's
    change from a volume with no contrast at all; the absolute value is evidence
    for either class. Each of the ``steps`` points of the path is one pass over
    the batch, so memory is that of one gradient pass.
    """
    from captum.attr import IntegratedGradients  # here: half a second of imports a study without IG does not pay

    def score(volumes: torch.Tensor) -> torch.Tensor:
        return class_score(model(volumes), None)

    with frozen(model):
        if targets is None:
            attributions = IntegratedGradients(score).attribute(x, n_steps=steps, internal_batch_size=len(x))
        else:
            attributions = IntegratedGradients(model).attribute(
                x, target=targets, n_steps=steps, internal_batch_size=len(x)
            )
    return attributions[:, 0].abs().detach()


def _perturbation(batch: Batch) -> torch.Tensor:
    return meaningful_perturbation(
        batch.model, batch.x, batch.targets, batch.perturbation, batch.voxel_mm, cohort_mean=batch.cohort_mean
    )


MAGNITUDE = "{target}: its magnitude, evidence for either class"

METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("gradcam", "Grad-CAM", lambda b: gradcam(b.model, b.x, b.targets), True, False, MAGNITUDE),
        Method(
            "guided_backprop",
            "Guided Backprop",
            lambda b: guided_backprop(b.model, b.x, b.targets),
            True,
            True,
            MAGNITUDE,
        ),
        Method(
            "perturbation",
            "Meaningful Perturbations",
            _perturbation,
            # It deletes the evidence for each subject's own decision, so its two classes' maps answer different
            # questions: their difference would be there by construction.
            group_test=False,
            needs_relu=False,
            shows="{target}: what must be deleted, {deletion}, to undo the model's decision on each subject (no t "
            "map: the two classes' maps answer different questions)",
        ),
        Method(
            "guided_gradcam",
            "Guided Grad-CAM",
            lambda b: b.map("gradcam") * b.map("guided_backprop"),
            True,
            True,
            MAGNITUDE,
        ),
        Method(
            "integrated_gradients",
            "Integrated Gradients",
            lambda b: integrated_gradients(b.model, b.x, b.targets),
            True,
            False,
            "{target}: each voxel's share of the score's change from an all-zero volume, its magnitude (evidence "
            "for either class)",
        ),
    ]
}

# The linear baseline's weights, analysed beside the methods' maps (one map per fold model); not a method
LINEAR_BASELINE = "linear_baseline"


def title(name: str) -> str:
    """What researchers call a method's maps (or the linear baseline's weights)."""
    return "Linear baseline weights" if name == LINEAR_BASELINE else METHODS[name].title
