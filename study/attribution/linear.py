"""The linear baseline's map as a finding: its weights, their permutation test, and what deleting them does.

A linear model's weight map is one map for every subject, so it gets no
class 1 minus class 0 test of subject maps. Instead its weights are tested
directly: an l2 logistic regression is fitted on all subjects (standardized
voxels, the folds' median C) and refitted on labels permuted within the study's
exchangeability blocks (families swapped with families of the same size,
siblings within their family); a voxel's p is the share of permutations whose
largest |weight| anywhere reaches its |weight| (FWER by the maximum statistic,
Nichols & Holmes 2002). The fits are exact: with far fewer subjects than voxels,
l2 logistic regression is solved in the subjects' space (the weights are
``X.T @ alpha``), by Newton's method on many labellings at once; a regression
target's ridge regression in closed form, ``alpha = (K + penalty I)^-1 (y - mean)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from study.attribution.stats import ExchangeabilityBlocks, PermutationTest, fwer_p
from study.training.baseline import BaselineResult


class LinearVoxelModel(nn.Module):
    """A fold's linear baseline as a network: logits [batch, 2] = (0, w . standardized brain voxels + b), or, for a
    regression target (``outputs`` 1), its predicted value [batch, 1]; of several classes the multinomial model's
    logits [batch, classes].

    Its softmax is the logistic regression's (1 - p, p), so checks written for the CNN (the deletion check)
    run on it unchanged.
    """

    def __init__(self, baseline: BaselineResult, brain: np.ndarray, outputs: int = 2):
        super().__init__()
        self.outputs = outputs
        # copies: a Ray task's arrays are read-only, which torch warns about on the console
        self.register_buffer("voxels", torch.tensor(np.flatnonzero(brain)))
        self.register_buffer("mean", torch.tensor(baseline.voxel_mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(baseline.voxel_scale, dtype=torch.float32))
        several = baseline.class_weights is not None
        weights = baseline.class_weights.T if several else baseline.weights
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        intercept = baseline.class_intercepts if several else baseline.intercept
        self.register_buffer("intercept", torch.tensor(intercept, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] (several classes: [batch, classes]) for volumes [batch, 1, D, H, W]."""
        v = x.reshape(len(x), -1)[:, self.voxels].float()
        logit = ((v - self.mean) / self.scale) @ self.weights + self.intercept
        if logit.ndim == 2:
            return logit
        return logit[:, None] if self.outputs == 1 else torch.stack([torch.zeros_like(logit), logit], dim=1)


def standardize(x: np.ndarray) -> np.ndarray:
    """Voxels scaled to mean 0 and sd 1 over subjects, as scikit-learn's StandardScaler (sd 0 left unscaled)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def logistic_dual(
    kernel: torch.Tensor, labels: torch.Tensor, C: float, iterations: int = 50, tol: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """l2 logistic regression fitted in the subjects' space, for many labellings at once.

    Minimizes ``C * sum(log-loss) + |w|^2 / 2`` with ``w = X.T @ alpha`` and an
    unpenalized intercept, as scikit-learn's ``LogisticRegression(C=C)``.

    Parameters
    ----------
    kernel : Tensor [n, n]
        ``X @ X.T`` of the (standardized) subjects, float64.
    labels : Tensor [labellings, n]
        0/1 labels, one labelling a row.
    C : float
        Inverse regularization strength.

    Returns
    -------
    alpha : Tensor [labellings, n]
    intercept : Tensor [labellings]
    """
    rows, n = labels.shape
    alpha = torch.zeros(rows, n, dtype=kernel.dtype, device=kernel.device)
    intercept = torch.zeros(rows, dtype=kernel.dtype, device=kernel.device)
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    for _ in range(iterations):
        p = torch.sigmoid(alpha @ kernel + intercept[:, None])
        weight = (p * (1 - p)).clamp_min(1e-12)
        residual = C * (p - labels) + alpha  # the gradient in alpha is kernel @ residual
        # Newton's system, its first n rows divided by the kernel: [C W K + I, C W 1; C 1'W K, C 1'W 1]
        system = torch.zeros(rows, n + 1, n + 1, dtype=kernel.dtype, device=kernel.device)
        system[:, :n, :n] = C * weight[:, :, None] * kernel + eye
        system[:, :n, n] = C * weight
        system[:, n, :n] = C * weight @ kernel
        system[:, n, n] = C * weight.sum(1)
        rhs = -torch.cat([residual, (C * (p - labels)).sum(1, keepdim=True)], dim=1)
        step = torch.linalg.solve(system, rhs)
        alpha, intercept = alpha + step[:, :n], intercept + step[:, n]
        if float(step.abs().max()) < tol:
            break
    return alpha, intercept


def weight_test(
    voxels: np.ndarray,
    labels: np.ndarray,
    C: float,
    permutations: int,
    families: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    chunk: int = 64,
    regression: bool = False,
) -> PermutationTest:
    """The weights of an l2 logistic regression (``regression``: a ridge regression) on all subjects, and their
    FWER-corrected p (max statistic).

    Parameters
    ----------
    voxels : ndarray [subjects, voxels]
        Each subject's brain voxels (standardized here).
    labels : ndarray [subjects]
        Class index: 1 (e.g. male), 0 (e.g. female); a regression target's values.
    C : float
        Inverse regularization strength (the baseline's, chosen on the inner splits; a ridge penalty's inverse).
    permutations : int
        Label permutations within the exchangeability blocks (0: weights only).
    families : ndarray [subjects], optional
        Each subject's family (default: every subject its own).
    seed : int
        Seed of the permutations.
    device : str
        Where the fits run.
    chunk : int
        Labellings fitted at once (memory: ``chunk * subjects**2`` floats).

    Returns
    -------
    PermutationTest
        ``t`` holds the weights on standardized voxels (positive: higher in class 1
        pushes towards class 1), ``p`` their FWER-corrected p values.
    """
    labels = np.asarray(labels)
    n = len(labels)
    families = np.arange(n).astype(str) if families is None else np.asarray(families).astype(str)
    x = standardize(voxels)
    varies = x.std(0) > 0
    xt = torch.from_numpy(x[:, varies]).to(device)
    kernel = xt @ xt.T
    blocks = ExchangeabilityBlocks(np.zeros(n, dtype=int), families)
    rng = np.random.default_rng(seed)
    labellings = np.stack([labels] + [labels[blocks.draw(rng)] for _ in range(permutations)])
    rows = torch.as_tensor(labellings, dtype=torch.float64, device=device)
    maxima = []
    for start in range(0, len(rows), chunk):
        labelling = rows[start : start + chunk]
        if regression:  # ridge with an unpenalized intercept on centred voxels: the centred labels' dual
            ridge = kernel + torch.eye(n, dtype=kernel.dtype, device=kernel.device) / C
            alpha = torch.linalg.solve(ridge, (labelling - labelling.mean(1, keepdim=True)).T).T
        else:
            alpha, _ = logistic_dual(kernel, labelling, C)
        weights = alpha @ xt
        if start == 0:
            observed = weights[0].cpu().numpy()
            weights = weights[1:]
        if len(weights):
            maxima.append(weights.abs().max(1).values.cpu().numpy())
    weights = np.full(x.shape[1], np.nan)
    weights[varies] = observed
    null_maxima = np.concatenate(maxima) if maxima else np.zeros(0)
    return PermutationTest(weights, fwer_p(weights, null_maxima), int((~varies).sum()), permutations)
