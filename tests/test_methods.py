"""The table of attribution methods: one call signature for every method, and Integrated Gradients through it."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from study.attribution.methods import INTEGRATED_GRADIENTS_STEPS, METHODS, Batch, integrated_gradients
from study.attribution.perturbation import Perturbation
from study.config import parse_config
from study.errors import ConfigError
from study.training.models import Architecture, BrainCNN
from tests.test_attribution import DISTRACTOR, REGION, SHAPE, ContrastNet, share, volumes


def batch(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor | None) -> Batch:
    return Batch(model, x, targets, voxel_mm=2.0, perturbation=Perturbation(iterations=5, reference="blur"))


def test_every_method_explains_a_batch_through_the_one_signature():
    model, x = ContrastNet().eval(), volumes()
    for targets in (None, torch.tensor([1, 0, 1])):
        explained = batch(model, x, targets)
        for name in METHODS:
            maps = explained.map(name)
            assert maps.shape == (3, *SHAPE) and torch.isfinite(maps).all() and (maps >= 0).all(), name
            assert all(p.requires_grad for p in model.parameters()), name  # the model is left as it was
        # Guided Grad-CAM is computed from the two maps it combines, not again
        torch.testing.assert_close(
            explained.map("guided_gradcam"), explained.map("gradcam") * explained.map("guided_backprop")
        )
    assert {m.name for m in METHODS.values() if not m.group_test} == {"perturbation"}
    assert {m.name for m in METHODS.values() if m.needs_relu} == {"guided_backprop", "guided_gradcam"}
    for method in METHODS.values():  # every caption names the score it explains
        assert "{target}" in method.shows and method.title


def test_integrated_gradients_are_captums():
    model, x = ContrastNet().eval(), volumes()

    def contrast(v: torch.Tensor) -> torch.Tensor:
        logits = model(v)
        return logits[:, 1] - logits[:, 0]

    for targets, forward in ((torch.tensor([1, 0, 1]), model), (None, contrast)):
        direct = IntegratedGradients(forward).attribute(x, target=targets, n_steps=INTEGRATED_GRADIENTS_STEPS)
        torch.testing.assert_close(integrated_gradients(model, x, targets), direct[:, 0].abs())


def test_integrated_gradients_are_complete_on_the_study_cnn_at_their_steps():
    """The attributions add up to the score's change from the all-zero volume (the method's completeness axiom):
    the number of steps is enough for the study's own CNN."""
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4), (30, 36, 30)).eval()
    x = torch.randn(3, 1, 30, 36, 30)

    def contrast(v: torch.Tensor) -> torch.Tensor:
        logits = model(v)
        return logits[:, 1] - logits[:, 0]

    attributions, delta = IntegratedGradients(contrast).attribute(
        x, n_steps=INTEGRATED_GRADIENTS_STEPS, return_convergence_delta=True
    )
    change = contrast(x) - contrast(torch.zeros_like(x))
    assert (change.abs() > 1e-3).all()
    assert (delta.abs() < 0.01 * change.abs()).all(), (delta, change)
    torch.testing.assert_close(attributions.flatten(1).sum(1), change, atol=0, rtol=0.01)


def test_integrated_gradients_find_the_contrasts_evidence_not_the_distractor():
    model, x = ContrastNet().eval(), volumes()
    contrast = integrated_gradients(model, x, None)
    assert (share(contrast, REGION) > 0.95).all() and (share(contrast, DISTRACTOR) < 0.02).all()
    one_class = integrated_gradients(model, x, torch.tensor([1, 1, 1]))  # one class's score: the distractor counts
    assert (share(one_class, DISTRACTOR) > 0.3).all()


def test_the_config_offers_every_method_of_the_table_and_nothing_else():
    config = parse_config(
        {"name": "s", "cohort": {"root": "x"}, "attribution": {"methods": ["integrated_gradients", "gradcam"]}}
    )
    assert config.attribution.methods == ["integrated_gradients", "gradcam"]
    with pytest.raises(ConfigError, match="attribution.methods.0"):
        parse_config({"name": "s", "cohort": {"root": "x"}, "attribution": {"methods": ["lime"]}})
