"""Sanity checks of attribution maps (Adebayo et al. 2018).

A map that explains the model must change when the model does. Model-parameter
randomization re-initializes the layers one after another from the top (the
head first, then each convolution from the last), and label randomization
trains a model on shuffled labels; each method's maps are compared with the
originals by Spearman rank correlation and windowed SSIM. A method whose maps
stay similar is flagged.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import ray.train
import torch
from skimage.metrics import structural_similarity
from torch import nn

from study.attribution.actors import Explanation, explain_subjects
from study.attribution.group import normalize, spearman_rows, unmask
from study.data.cache import VolumeCache
from study.runtime import Precision, worker_device
from study.training.loop import load_model

FLAG_SPEARMAN = 0.5  # fully randomized maps more similar than this are flagged


def compare(original: dict[str, np.ndarray], other: dict[str, np.ndarray], brain: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per method: (mean Spearman over brain voxels, mean windowed SSIM of the volumes) between two sets of
    maps of the same subjects, each normalized to [0, 1].

    SSIM is scikit-image's ``structural_similarity`` (7-voxel windows, data range 1),
    as in the sanity-check literature (Adebayo et al. 2018).
    """
    out = {}
    for method, maps in original.items():
        a, b = normalize(maps[:, brain]), normalize(other[method][:, brain].astype(np.float32))
        ssim = [structural_similarity(unmask(x, brain), unmask(y, brain), data_range=1.0) for x, y in zip(a, b)]
        out[method] = (float(spearman_rows(a, b).mean()), float(np.mean(ssim)))
    return out


NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def cascade_steps(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Layers in randomization order: the classifier (every linear layer), then each convolution from the last,
    with a normalization registered right after it.

    Any network's layers, in module registration order (ours, or a user's own
    that registers its modules in the order they run).
    """
    leaves = [m for m in model.modules() if not list(m.children())]
    steps = [("classifier", [m for m in leaves if isinstance(m, nn.Linear)])]
    convs = [i for i, m in enumerate(leaves) if isinstance(m, nn.Conv3d)]
    for n, i in enumerate(reversed(convs)):
        norm = leaves[i + 1:i + 2]
        steps.append((f"conv{len(convs) - n}",
                       [leaves[i]] + [m for m in norm if isinstance(m, NORMS) and hasattr(m, "reset_parameters")]))
    return [step for step in steps if step[1]]


def parameter_randomization(checkpoint: ray.train.Checkpoint, cache: VolumeCache, subject_ids: list[str],
                            labels: np.ndarray, original: dict[str, np.ndarray], brain: np.ndarray,
                            explanation: Explanation, seed: int = 0) -> pd.DataFrame:
    """Cascading randomization: one row per (step, method) with Spearman and SSIM to the original."""
    precision = Precision.choose(worker_device())
    model = load_model(checkpoint, precision.device)
    torch.manual_seed(seed)
    rows = []
    for step, (name, modules) in enumerate(cascade_steps(model), start=1):
        for module in modules:
            module.reset_parameters()
        maps = explain_subjects(copy.deepcopy(model).eval(), cache, subject_ids, labels, explanation, precision)
        for method, (rho, ssim) in compare(original, maps, brain).items():
            rows.append({"step": step, "randomized_down_to": name, "method": method, "spearman": rho, "ssim": ssim})
    return pd.DataFrame(rows)


def label_randomization(checkpoint: ray.train.Checkpoint, cache: VolumeCache, subject_ids: list[str],
                        labels: np.ndarray, original: dict[str, np.ndarray], brain: np.ndarray,
                        explanation: Explanation) -> pd.DataFrame:
    """Maps of a model trained on shuffled labels, compared with the original maps."""
    precision = Precision.choose(worker_device())
    maps = explain_subjects(load_model(checkpoint, precision.device), cache, subject_ids, labels, explanation,
                            precision)
    return pd.DataFrame([{"method": m, "spearman": rho, "ssim": ssim}
                         for m, (rho, ssim) in compare(original, maps, brain).items()])


def flagged_methods(cascade: pd.DataFrame, shuffled: pd.DataFrame) -> list[str]:
    """Methods whose maps still resemble the original ones after full parameter
    randomization or after training on shuffled labels."""
    last = cascade[cascade.step == cascade.step.max()]
    flagged = set(last.loc[last.spearman > FLAG_SPEARMAN, "method"])
    if len(shuffled):
        flagged |= set(shuffled.loc[shuffled.spearman > FLAG_SPEARMAN, "method"])
    return sorted(flagged)
