"""Sanity checks of attribution maps (Adebayo et al. 2018).

A map that explains the model must change when the model does. Model-parameter
randomization re-initializes the layers one after another from the top (the
head first, then each convolution from the last), and label randomization
trains a model on shuffled labels; each method's maps are compared with the
originals by Spearman rank correlation and windowed SSIM. A method whose maps
stay similar is flagged.

The deletion check asks the converse: does the model's decision rest on the
voxels a map marks? Each map's top voxels are replaced by the cohort's mean
volume and the model decides again (the deletion metric of Samek et al. 2017
and Petsiuk et al. 2018, in one step); a method whose top voxels weaken the
decision no more than as many random voxels is flagged. This catches maps of
a model that ignores its input, which randomization cannot (empty before and
after).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import ray.train
import torch
from scipy.stats import wilcoxon
from skimage.metrics import structural_similarity
from torch import nn

from study.attribution.actors import Explanation, explain_subjects
from study.attribution.group import normalize, spearman_rows, unmask
from study.data.cache import CachedVolumes, VolumeCache
from study.runtime import Precision, worker_device
from study.training.loop import load_model

FLAG_SPEARMAN = 0.5  # fully randomized maps more similar than this are flagged
DELETED_SHARE = 0.05  # of the brain's voxels, deleted by the deletion check
FLAG_DELETION_P = 0.05  # a method whose deletions beat random ones less surely than this is flagged


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


def top_voxels(maps: np.ndarray, brain: np.ndarray, share: float = DELETED_SHARE) -> np.ndarray:
    """Flat grid indices [subjects, k] of each map's top ``share`` of brain voxels (maps: [subjects, brain voxels])."""
    k = max(1, int(round(share * maps.shape[1])))
    return np.flatnonzero(brain)[np.argpartition(-maps.astype(np.float32), k - 1, axis=1)[:, :k]]


def random_voxels(subjects: int, brain: np.ndarray, share: float = DELETED_SHARE, seed: int = 0) -> np.ndarray:
    """Flat grid indices [subjects, k] of a random ``share`` of brain voxels per subject: what any map must beat."""
    rng, inside = np.random.default_rng(seed), np.flatnonzero(brain)
    k = max(1, int(round(share * len(inside))))
    return np.stack([rng.choice(inside, k, replace=False) for _ in range(subjects)])


def deletion_drops(model: nn.Module, volumes: torch.Tensor, deleted: dict[str, np.ndarray], reference: torch.Tensor,
                   precision: Precision) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """How much replacing voxels by ``reference`` weakens the model's decision, subject by subject.

    Parameters
    ----------
    model : nn.Module
        The fold's model, in eval mode, on ``precision.device``.
    volumes : torch.Tensor
        The subjects' volumes [subjects, 1, D, H, W], on the device.
    deleted : dict of str to np.ndarray
        Per method, the flat grid indices [subjects, k] of the voxels to delete (:func:`top_voxels`).
    reference : torch.Tensor
        What a deleted voxel becomes [D, H, W] (the cohort's mean volume).
    precision : Precision
        How the model runs.

    Returns
    -------
    decided : np.ndarray
        The probability of the class the model decides on the intact volumes, [subjects].
    drops : dict of str to np.ndarray
        Per method, that probability minus the same class's probability after the deletion, [subjects].
    """
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            return torch.softmax(model(x).float(), dim=1)

    before = probabilities(volumes)
    decision = before.argmax(1, keepdim=True)
    decided = before.gather(1, decision)[:, 0]
    flat_reference = reference.reshape(-1).to(volumes.device, volumes.dtype)
    drops = {}
    for method, voxels in deleted.items():
        index = torch.as_tensor(voxels, device=volumes.device)
        x = volumes.reshape(len(volumes), -1).clone().scatter_(1, index, flat_reference[index])
        after = probabilities(x.reshape(volumes.shape)).gather(1, decision)[:, 0]
        drops[method] = (decided - after).cpu().numpy()
    return decided.cpu().numpy(), drops


def deletion_check(checkpoint: ray.train.Checkpoint, cache: VolumeCache, subject_ids: list[str],
                   deleted: dict[str, np.ndarray], reference: np.ndarray, batch_size: int) -> pd.DataFrame:
    """:func:`deletion_drops` for one fold's held-out subjects, in batches: one row per (subject, method)."""
    precision = Precision.choose(worker_device())
    model = precision.model(load_model(checkpoint, precision.device))
    volumes, rows = CachedVolumes(cache, subject_ids, np.zeros(len(subject_ids))), []
    for start in range(0, len(subject_ids), batch_size):
        batch = list(range(start, min(start + batch_size, len(subject_ids))))
        x = precision.volumes(volumes.__getitems__(batch)[0])
        decided, drops = deletion_drops(model, x, {m: v[batch] for m, v in deleted.items()},
                                        torch.tensor(reference), precision)
        rows += [{"subject_id": subject_ids[i], "method": m, "p_decision": float(decided[j]), "p_drop": float(d[j])}
                 for m, d in drops.items() for j, i in enumerate(batch)]
    return pd.DataFrame(rows)


def deletion_summary(drops: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean drop of the decided class's probability, the random deletion's, and a paired one-sided
    Wilcoxon signed-rank p (the method's drop greater than the random one's, over subjects); ``faithful`` when
    the method's deletions beat random ones (p < FLAG_DELETION_P)."""
    by = drops.pivot(index="subject_id", columns="method", values="p_drop")
    rows = []
    for method in [m for m in drops.method.unique() if m != "random"]:
        difference = (by[method] - by["random"]).to_numpy()
        p = float(wilcoxon(difference, alternative="greater").pvalue) if np.any(difference != 0) else 1.0
        rows.append({"method": method, "drop_mean": float(by[method].mean()),
                     "random_drop_mean": float(by["random"].mean()), "p_vs_random": p,
                     "faithful": bool(p < FLAG_DELETION_P and difference.mean() > 0)})
    return pd.DataFrame(rows, columns=["method", "drop_mean", "random_drop_mean", "p_vs_random", "faithful"])
