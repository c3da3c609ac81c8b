"""What every method shares: which class score a map explains (the true class, the predicted class, or class 1
minus class 0; a regression model's predicted value; of several classes, one class against the rest), and a model
whose parameters need no gradient while it is explained."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def select_targets(mode: str, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """Target class per subject (``None`` for the contrast, which has no single class); the predicted class is
    the argmax of ``logits``, the calibrated decision when the model carries its fold's calibration
    (:class:`~study.training.calibration.CalibratedModel`)."""
    if mode == "true_class":
        return labels
    if mode == "predicted_class":
        return logits.argmax(1)
    if mode == "contrast":
        return None
    raise ValueError(f"unknown attribution target {mode!r}; use true_class, predicted_class or contrast")


def class_score(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """The logit of each subject's target class, or the class 1 minus class 0 logit (a regression model's one
    output: the predicted value); [batch]."""
    if targets is None:
        if logits.shape[1] > 2:
            raise ValueError("the class 1 minus class 0 contrast is two classes'; explain a class of several instead")
        return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    return logits.gather(1, targets[:, None])[:, 0]


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No gradients for ``model``'s parameters inside the block; their flags restored after.

    A map needs gradients with respect to the input or a layer's activations only; with the parameters' flags
    on, autograd would also keep every activation that a weight's gradient needs, doubling a pass's memory.
    """
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


class VersusRest(torch.nn.Module):
    """A model of several classes asked one question of every subject: class ``k`` against the rest.

    Its two logits are the mean of the other classes' logits and class ``k``'s, so the class 1 minus class 0
    contrast that the methods explain without a target class is class ``k``'s logit minus the others' mean (with
    two classes and ``k`` = 1, the contrast itself). Each class's test between its subjects' maps and the rest's
    compares maps of this one score, as the two-class test compares maps of the contrast.
    """

    def __init__(self, model: torch.nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    @property
    def gradcam_layer(self) -> torch.nn.Module:
        """The network's Grad-CAM layer (:mod:`study.attribution.gradcam` hooks it)."""
        return self.model.gradcam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        others = torch.cat([logits[:, : self.k], logits[:, self.k + 1 :]], dim=1).mean(1)
        return torch.stack([others, logits[:, self.k]], dim=1)
