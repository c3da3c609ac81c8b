"""Which class score a map explains: the true class, the predicted class, or class 1 minus class 0."""

from __future__ import annotations

import torch


def select_targets(mode: str, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """Target class per subject (``None`` for the contrast, which has no single class)."""
    if mode == "true_class":
        return labels
    if mode == "predicted_class":
        return logits.argmax(1)
    if mode == "contrast":
        return None
    raise ValueError(f"unknown attribution target {mode!r}; use true_class, predicted_class or contrast")


def class_score(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """The logit of each subject's target class, or the class 1 minus class 0 logit; [batch]."""
    if targets is None:
        return logits[:, 1] - logits[:, 0]
    return logits.gather(1, targets[:, None])[:, 0]
