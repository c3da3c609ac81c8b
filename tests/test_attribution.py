"""Attribution methods on networks with a known answer, which see the whole volume.

The test network's male - female logit depends on one region only, while each
logit alone also depends, strongly, on a bright distractor elsewhere: a method
that explains the wrong score, or leaks past the evidence, shows the distractor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from study.attribution import Perturbation, gradcam, guided_backprop, meaningful_perturbation
from study.attribution.perturbation import gaussian_blur3d
from study.errors import AttributionError

SHAPE = (20, 24, 20)
REGION = (slice(4, 10), slice(12, 19), slice(8, 14))
DISTRACTOR = (slice(12, 18), slice(2, 8), slice(2, 8))


def box(where: tuple[slice, ...], margin: int = 0) -> torch.Tensor:
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    inside[tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in where)] = True
    return inside


class ContrastNet(nn.Module):
    """Sees everything through one convolution; evidence in REGION moves the male - female logit, the
    DISTRACTOR moves both logits together (so it drives each class score, not their difference)."""

    def __init__(self, functional_relu: bool = False, activation=None):
        super().__init__()
        self.register_buffer("region", box(REGION).float()[None, None])
        self.register_buffer("distractor", box(DISTRACTOR).float()[None, None])
        self.conv = nn.Conv3d(1, 4, 3, padding=1, bias=False)
        nn.init.uniform_(self.conv.weight, 0.05, 0.15)
        self.relu = nn.ReLU()
        self.gradcam_layer = self.relu
        self.functional_relu, self.activation = functional_relu, activation

    def forward(self, x):
        h = self.conv(x)
        h = self.activation(h) if self.activation else (F.relu(h) if self.functional_relu else self.relu(h))
        channels = h.shape[1]
        evidence = ((h * self.region).flatten(1).sum(1, keepdim=True) / self.region.sum() / channels - 1.5) * 3
        context = (h * self.distractor).flatten(1).sum(1, keepdim=True) / self.distractor.sum() / channels * 3
        return torch.cat([context - evidence, context + evidence], dim=1)


def volumes(batch=3):
    torch.manual_seed(0)
    x = torch.rand(batch, 1, *SHAPE) * 0.1
    x[(slice(None), 0, *REGION)] += 1.0  # bright evidence in the region
    x[(slice(None), 0, *DISTRACTOR)] += 1.0  # and an equally bright distractor
    return x


def share(maps: torch.Tensor, where: tuple[slice, ...], margin: int = 1) -> torch.Tensor:
    """Share of each map's mass within ``margin`` voxels of ``where``."""
    return maps[:, box(where, margin)].sum(1) / maps.flatten(1).sum(1)


def test_guided_backprop_explains_the_contrast_not_each_class():
    model, x = ContrastNet().eval(), volumes()
    contrast = guided_backprop(model, x, None)
    assert contrast.shape == (3, *SHAPE) and (contrast >= 0).all()
    assert (share(contrast, REGION) > 0.95).all() and (share(contrast, DISTRACTOR) < 0.02).all()
    male_logit = guided_backprop(model, x, torch.tensor([1, 1, 1]))  # one class's score: the distractor counts
    assert (share(male_logit, DISTRACTOR) > 0.3).all()


@pytest.mark.parametrize("variant", ["deletion", "preservation"])
def test_meaningful_perturbation_finds_the_evidence_and_ignores_the_distractor(variant):
    model, x = ContrastNet().eval(), volumes()
    config = Perturbation(variant=variant, iterations=150, mask_scale=2, reference="blur", blur_sigma_mm=6.0)
    maps = meaningful_perturbation(model, x, None, config, voxel_mm=2.0)
    assert maps.shape == (3, *SHAPE) and maps.min() >= 0 and maps.max() <= 1
    # The mask is coarse and smoothed by its TV term, so the map spills around the region;
    # it must still rank the region's voxels first, fill the region, and leave the distractor alone.
    region = box(REGION).flatten().numpy()
    for subject in maps:
        assert roc_auc_score(region, subject.flatten().numpy()) > 0.9
        assert subject[REGION].mean() > 0.9 and subject[DISTRACTOR].mean() < 0.2
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_perturbation_masks_are_independent_across_the_batch():
    model, x = ContrastNet().eval(), volumes(4)
    config = Perturbation(iterations=20, mask_scale=2, reference="blur", jitter_voxels=0)
    together = meaningful_perturbation(model, x, torch.tensor([1, 0, 1, 0]), config, voxel_mm=2.0)
    alone = meaningful_perturbation(model, x[2:3], torch.tensor([1]), config, voxel_mm=2.0)
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=1e-4)


class TwoWayNet(nn.Module):
    """Evidence for either class in REGION: brighter than mid-grey for class 1, darker for class 0.

    One 1x1 convolution splits each voxel into a bright part and a dark part;
    the class 1 - class 0 logit is their difference averaged over the region, so
    a class-0 subject's evidence is negative, as a patient's atrophy or a
    female's smaller region is evidence against the other class.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("region", box(REGION).float()[None, None])
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([-0.5, 0.5])
        self.relu = nn.ReLU()
        self.gradcam_layer = self.relu

    def forward(self, x):
        h = self.relu(self.conv(x))
        bright, dark = ((h * self.region).flatten(2).sum(2) / self.region.sum()).unbind(1)
        contrast = 8 * (bright - dark)
        return torch.stack([-contrast / 2, contrast / 2], dim=1)


def two_way_volumes() -> torch.Tensor:
    """Two subjects on mid-grey: class 1 with a bright REGION, class 0 with a dark one."""
    torch.manual_seed(0)
    x = 0.5 + 0.02 * torch.randn(2, 1, *SHAPE)
    x[(0, 0, *REGION)] = 1.0
    x[(1, 0, *REGION)] = 0.0
    return x


def test_maps_of_the_contrast_show_the_evidence_for_either_class():
    """Under the contrast target a class-0 subject's map must show its own evidence (the dark region),
    not be empty: Grad-CAM's ReLU kept only class 1's evidence, and Meaningful Perturbations minimized a
    score already at its minimum for a subject the model calls class 0."""
    model, x = TwoWayNet().eval(), two_way_volumes()
    logits = model(x)
    assert logits[0].argmax() == 1 and logits[1].argmax() == 0
    region = box(REGION).flatten().numpy()
    config = Perturbation(iterations=150, mask_scale=2, reference="blur", blur_sigma_mm=6.0)
    for name, maps in {
        "gradcam": gradcam(model, x, None),
        "perturbation": meaningful_perturbation(model, x, None, config, voxel_mm=2.0),
    }.items():
        for subject, m in zip(("class 1", "class 0"), maps):
            assert m[REGION].mean() > 0.5 * m.max() > 0, (name, subject)
            assert roc_auc_score(region, m.flatten().numpy()) > 0.9, (name, subject)


def test_the_cohort_mean_deletes_evidence_that_blurring_cannot():
    """A region uniformly brighter or darker than typical stays so when blurred (the blur is narrow next
    to the region): deleting towards the blur cannot undo either decision, deleting towards the cohort's
    mean volume can, and its map is the region."""
    model, x = TwoWayNet().eval(), two_way_volumes()
    mean = x.mean(0)[0]  # the cohort: one bright, one dark region, mid-grey on average
    region = box(REGION).flatten().numpy()
    blur = Perturbation(iterations=150, mask_scale=2, reference="blur", blur_sigma_mm=2.0)
    cohort_mean = Perturbation(iterations=150, mask_scale=2, reference="cohort_mean")

    def own_class_probability(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Each subject's probability of its own class once what its map marks is deleted."""
        with torch.no_grad():
            p = torch.softmax(model(x * (1 - maps[:, None]) + reference * maps[:, None]), 1)
        return torch.stack([p[0, 1], p[1, 0]])

    blurred = meaningful_perturbation(model, x, None, blur, voxel_mm=2.0)
    assert (own_class_probability(blurred, gaussian_blur3d(x, 1.0)) > 0.9).all()
    to_mean = meaningful_perturbation(model, x, None, cohort_mean, voxel_mm=2.0, cohort_mean=mean)
    assert (own_class_probability(to_mean, mean) < 0.6).all()
    for subject in to_mean:
        assert roc_auc_score(region, subject.flatten().numpy()) > 0.9 and subject[REGION].mean() > 0.5
    with pytest.raises(ValueError, match="cohort_mean"):
        meaningful_perturbation(model, x, None, cohort_mean, voxel_mm=2.0)


def test_guided_backprop_handles_functional_relu_and_refuses_other_activations():
    module, functional = ContrastNet().eval(), ContrastNet(functional_relu=True).eval()
    functional.load_state_dict(module.state_dict())
    x, t = volumes(), torch.tensor([1, 0, 1])
    torch.testing.assert_close(guided_backprop(module, x, t), guided_backprop(functional, x, t))
    # The guided rule really applies: plain gradients differ from guided ones for the female class.
    plain = torch.autograd.grad(functional(x.requires_grad_())[:, 0].sum(), x)[0][:, 0].abs()
    assert not torch.allclose(plain, guided_backprop(functional, x.detach(), torch.tensor([0, 0, 0])))
    with pytest.raises(AttributionError, match="uses gelu"):
        guided_backprop(ContrastNet(activation=F.gelu).eval(), x.detach(), t)


def test_gaussian_blur_keeps_mass_and_smooths():
    x = torch.zeros(1, 1, 15, 15, 15)
    x[0, 0, 7, 7, 7] = 1
    y = gaussian_blur3d(x, 1.5)
    assert torch.isclose(y.sum(), torch.tensor(1.0), atol=1e-4) and y.max() < 0.05


def bright_blob(shape: tuple[int, int, int], centre: tuple[float, float, float], sigma: float = 1.5) -> torch.Tensor:
    grid = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    distance2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return torch.exp(-distance2 / (2 * sigma**2))[None, None]


def brightness_detector(architecture, shape):
    """A network whose every feature map is a blurred copy of the input brightness, and whose male logit
    adds them up: its last feature map peaks where the input is brightest."""
    from study.training.models import BrainCNN

    model = BrainCNN(architecture, shape).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                module.bias.zero_()
        linear = model.head[-1]
        linear.weight.zero_()
        linear.weight[1].fill_(1.0)
        linear.bias.zero_()
    return model


@pytest.mark.parametrize(
    ("architecture", "shape", "feature"),
    [
        ({}, (46, 55, 46), (7, 9, 2)),  # MriNet: no padding, floor pooling; feature j sits at input 4j + 8.5
        ({"blocks": 2, "padding": 1, "kernel_size": 3}, (45, 53, 47), (19, 3, 11)),  # a searched one with padding
    ],
)
def test_gradcam_peaks_where_the_network_looks(architecture, shape, feature):
    from study.attribution.gradcam import feature_geometry
    from study.training.models import Architecture

    model = brightness_detector(Architecture(width=2, **architecture), shape)
    start, jump = feature_geometry(model, model.gradcam_layer)
    centre = tuple(s + j * f for s, j, f in zip(start, jump, feature))  # a feature voxel's centre, in input voxels
    cam = gradcam(model, bright_blob(shape, centre), torch.tensor([1]))[0]
    assert cam.shape == shape
    peak = np.unravel_index(int(cam.argmax()), shape)
    assert all(abs(p - c) <= 1.0 for p, c in zip(peak, centre)), (peak, centre)


def test_feature_geometry_of_mrinet():
    from study.attribution.gradcam import feature_geometry
    from study.training.models import Architecture, BrainCNN

    model = BrainCNN(Architecture(width=2), (46, 55, 46))
    assert feature_geometry(model, model.gradcam_layer) == ([8.5] * 3, [4.0] * 3)


def test_gradcam_resolution_is_the_last_feature_map():
    # The demo's 6 mm grid leaves MriNet 4x5x4 feature voxels, 4 input voxels (24 mm) apart: the report says so.
    from study.attribution.gradcam import feature_grid
    from study.training.models import Architecture, BrainCNN

    model = BrainCNN(Architecture(width=2), (30, 36, 30)).eval()
    assert feature_grid(model, (30, 36, 30)) == ((4, 5, 4), [4.0] * 3)


def test_gradcam_keeps_nothing_for_backward_before_its_layer_and_gives_the_plain_map():
    # Grad-CAM needs gradients of the layer's activations only. With the parameters' flags on, autograd kept every
    # earlier layer's input for weight gradients nobody uses (the volume itself, the first convolution's output).
    from study.attribution.gradcam import feature_geometry, place_on_input
    from study.training.models import Architecture, BrainCNN

    shape = (30, 36, 30)
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=2), shape).eval()
    x, targets = torch.randn(2, 1, *shape), torch.tensor([0, 1])
    layer_out: list[torch.Tensor] = []
    hook = model.gradcam_layer.register_forward_hook(lambda _m, _i, out: layer_out.append(out))
    logits = model(x)  # the plain computation, parameters' flags on
    grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), layer_out[0])[0]
    cam = F.relu((grads.mean(dim=(2, 3, 4), keepdim=True) * layer_out[0]).sum(1, keepdim=True))
    plain = place_on_input(cam, shape, *feature_geometry(model, model.gradcam_layer))[:, 0].detach()

    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        maps = gradcam(model, x, targets)
    hook.remove()
    torch.testing.assert_close(maps, plain)
    assert max(saved) <= layer_out[-1].numel() < x.numel()
    assert all(p.requires_grad for p in model.parameters())


def test_sanity_checks_flag_maps_that_do_not_follow_the_model():
    # Adebayo et al. 2018: a map that only reflects the input (here the input itself, as an edge detector's
    # would) looks plausible and survives randomizing every layer; the cascade must flag it. Guided Backprop
    # is flagged too, as the paper found (Spearman about 0.6 here); Grad-CAM, which follows the weights, is not.
    import pandas as pd

    from study.attribution.sanity import cascade_steps, compare, flagged_methods
    from study.training.models import Architecture, BrainCNN

    shape = (30, 36, 30)
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4), shape).eval()
    x = F.avg_pool3d(torch.randn(4, 1, *shape), 5, stride=1, padding=2)

    def maps(m):
        return {
            "input": x.abs()[:, 0].numpy(),
            "gradcam": gradcam(m, x, None).numpy(),
            "guided_backprop": guided_backprop(m, x, None).numpy(),
        }

    original, rows = maps(model), []
    for step, (_, modules) in enumerate(cascade_steps(model), start=1):
        for module in modules:
            module.reset_parameters()
        rows += [
            {"step": step, "method": method, "spearman": rho, "ssim": ssim}
            for method, (rho, ssim) in compare(original, maps(model), np.ones(shape, bool)).items()
        ]
    assert flagged_methods(pd.DataFrame(rows), pd.DataFrame()) == ["guided_backprop", "input"]


class IgnoresInput(nn.Module):
    """Logits that do not depend on the volume (e.g. a training that collapsed to the class prior)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.relu = nn.ReLU()
        self.gradcam_layer = self.relu
        self.bias = nn.Parameter(torch.tensor([0.2, -0.2]))

    def forward(self, x):
        return self.bias + 0 * self.relu(self.conv(x)).flatten(1).mean(1, keepdim=True)


def test_deleting_what_a_map_marks_undoes_the_decision_and_random_blobs_do_not():
    # The deletion check: TwoWayNet decides from REGION only. A map marking REGION must move every decision
    # (back to p = 0.5 when the region becomes the mid-grey reference), far more than random blobs of as many
    # voxels; a map marking the distractor box must not; and no map of a model that ignores its input can.
    import pandas as pd

    from study.attribution.sanity import RANDOM, deletion_changes, deletion_summary, random_blobs, top_voxels

    torch.manual_seed(0)
    x = 0.5 + 0.02 * torch.randn(8, 1, *SHAPE)
    x[(slice(0, 4), 0, *REGION)] = 1.0  # four subjects of class 1 (bright region)
    x[(slice(4, 8), 0, *REGION)] = 0.0  # four of class 0 (dark region)
    brain, share_of_region = np.ones(SHAPE, bool), float(box(REGION).float().mean())
    marks = {
        "right": np.tile(box(REGION).numpy().ravel(), (8, 1)),
        "wrong": np.tile(box(DISTRACTOR, margin=1).numpy().ravel(), (8, 1)),
    }
    deleted = {m: top_voxels(v, brain, share_of_region) for m, v in marks.items()}
    deleted[RANDOM] = random_blobs(8, brain, sigma_voxels=1.5, share=share_of_region)
    assert np.array_equal(np.sort(deleted["right"][0]), np.flatnonzero(box(REGION).numpy()))

    def table(model):
        decided, changes = deletion_changes(model.eval(), x, deleted, torch.full(SHAPE, 0.5))
        rows = [
            {"subject_id": f"sub-{i}", "method": m, "p_decision": decided[i], "p_change": c[i]}
            for m, c in changes.items()
            for i in range(8)
        ]
        return decided, changes, deletion_summary(pd.DataFrame(rows)).set_index("method")

    decided, changes, summary = table(TwoWayNet())
    assert (decided > 0.95).all() and (changes["right"] > 0.45).all()  # p back to 0.5: the evidence is gone
    assert np.all(changes["wrong"] == 0) and np.abs(changes[RANDOM]).max() < 0.3, changes
    assert summary.beats_random.to_dict() == {"right": True, "wrong": False}
    assert summary.loc["right", "p_vs_random"] == pytest.approx(1 / 2**8)  # exact: every subject's change is larger
    assert summary.loc["right", "share_above_random"] == 1.0
    _, changes, summary = table(IgnoresInput())
    assert all(np.all(c == 0) for c in changes.values()) and not summary.beats_random.any()


def test_the_deletion_checks_voxels_are_blobs_and_an_empty_map_deletes_no_slab():
    from scipy import ndimage

    from study.attribution.sanity import random_blobs, top_voxels

    brain = np.zeros((30, 36, 30), bool)
    brain[3:27, 3:33, 3:27] = True
    k = int(round(0.05 * brain.sum()))
    blobs = random_blobs(2, brain, sigma_voxels=2.0, seed=1)
    assert blobs.shape == (2, k) and brain.ravel()[blobs].all() and len(np.unique(blobs[0])) == k
    mask = np.zeros(brain.size, bool)
    mask[blobs[0]] = True
    _, pieces = ndimage.label(mask.reshape(brain.shape))
    assert pieces < k / 20  # a few contiguous blobs, not k scattered voxels
    empty = top_voxels(np.zeros((1, brain.sum())), brain)[0]  # ties broken at random, not by position
    slices = np.unravel_index(empty, brain.shape)[0]
    assert len(np.unique(slices)) == 24  # every slice of the brain, not its first few


class ThreeClassNet(ContrastNet):
    """Three logits: class 2's carries the REGION's evidence, all three the DISTRACTOR's context alike, so only
    class 2 against the rest (its logit minus the others' mean) is free of the distractor."""

    def forward(self, x):
        two = super().forward(x)  # context - evidence, context + evidence
        context = two.mean(1, keepdim=True)
        return torch.cat([context, context, two[:, 1:]], dim=1)


def test_each_class_against_the_rest_is_one_score_for_every_subject():
    from study.attribution.actors import Explanation, explain_batch
    from study.attribution.targets import VersusRest
    from study.runtime import Precision

    x = volumes()
    two = ContrastNet().eval()
    torch.testing.assert_close(VersusRest(two, 1)(x).diff(dim=1), two(x).diff(dim=1))  # the contrast itself
    for method in (gradcam, guided_backprop):
        torch.testing.assert_close(method(VersusRest(two, 1), x, None), method(two, x, None))

    three = ThreeClassNet().eval()
    logits = three(x)
    for k in range(3):
        rest = torch.cat([logits[:, :k], logits[:, k + 1 :]], dim=1).mean(1)
        torch.testing.assert_close(VersusRest(three, k)(x).diff(dim=1)[:, 0], logits[:, k] - rest)
    explanation = Explanation(("guided_backprop",), "contrast", Perturbation(), versus_rest=2)
    labels = torch.zeros(len(x), dtype=torch.long)
    versus = explain_batch(three, x, labels, explanation, 2.0, Precision.choose(torch.device("cpu")))
    own = guided_backprop(three, x, torch.full((len(x),), 2))  # class 2's own logit: the distractor too
    versus_maps = torch.tensor(versus["guided_backprop"], dtype=torch.float32)
    assert (share(versus_maps, REGION) > 0.9).all() and (share(versus_maps, DISTRACTOR) < 0.05).all()
    assert (share(own, DISTRACTOR) > 0.3).all()
