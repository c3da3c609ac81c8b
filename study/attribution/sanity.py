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
and Petsiuk et al. 2018, in one step); a method whose top voxels move the
decision no more than random blobs of as many voxels is flagged. This catches
maps of a model that ignores its input, which randomization cannot (empty
before and after).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray.train
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import wilcoxon
from skimage.metrics import structural_similarity
from torch import nn

from study.attribution.actors import Explanation, explain_subjects
from study.attribution.group import normalize, spearman_rows, unmask
from study.data.cache import CachedVolumes, VolumeCache
from study.runtime import Precision, worker_device
from study.training.checkpoint import load_model

FLAG_SPEARMAN = 0.5  # fully randomized maps more similar than this are flagged
DELETED_SHARE = 0.05  # of the brain's voxels, deleted by the deletion check
FLAG_DELETION_P = 0.05  # a method whose deletions beat random ones less surely than this is flagged
RANDOM = "random"  # the deletion check's control: random blobs of brain voxels
RANDOM_BLOB_MM = 6.0  # the blobs' smoothing (Gaussian sigma)


def compare(
    original: dict[str, np.ndarray], other: dict[str, np.ndarray], brain: np.ndarray
) -> dict[str, tuple[float, float]]:
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
        norm = leaves[i + 1 : i + 2]
        steps.append(
            (
                f"conv{len(convs) - n}",
                [leaves[i]] + [m for m in norm if isinstance(m, NORMS) and hasattr(m, "reset_parameters")],
            )
        )
    return [step for step in steps if step[1]]


def randomized_cascade(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Copies of ``model`` with its layers randomized down to each step of :func:`cascade_steps`, in eval mode.

    The layers are re-initialized on the host, whatever device the maps are computed on: on a GPU,
    ``reset_parameters`` would draw from CUDA's generator and randomize other weights than a CPU run of the same
    seed. The draws come from a generator of ``seed`` of their own, whatever else draws between two steps;
    ``model`` itself is left as it is.
    """
    model, generator = copy.deepcopy(model).cpu(), torch.Generator().manual_seed(seed)
    for name, modules in cascade_steps(model):
        with torch.random.fork_rng(devices=[]):  # reset_parameters draws from the global generator: lend it ours
            torch.set_rng_state(generator.get_state())
            for module in modules:
                module.reset_parameters()
            generator.set_state(torch.get_rng_state())
        yield name, copy.deepcopy(model).eval()


def parameter_randomization(
    checkpoint: ray.train.Checkpoint,
    cache: VolumeCache,
    subject_ids: list[str],
    labels: np.ndarray,
    original: dict[str, np.ndarray],
    brain: np.ndarray,
    explanation: Explanation,
    batch_size: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Cascading randomization: one row per (step, method) with Spearman and SSIM to the original.

    Explained as the original maps were: on this task's device, ``batch_size`` subjects at a time."""
    precision = Precision.choose(worker_device())
    rows = []
    for step, (name, model) in enumerate(randomized_cascade(load_model(checkpoint, calibrated=True), seed), start=1):
        maps = explain_subjects(precision.model(model), cache, subject_ids, labels, explanation, precision, batch_size)
        for method, (rho, ssim) in compare(original, maps, brain).items():
            rows.append({"step": step, "randomized_down_to": name, "method": method, "spearman": rho, "ssim": ssim})
    return pd.DataFrame(rows)


def label_randomization(
    checkpoint: ray.train.Checkpoint,
    cache: VolumeCache,
    subject_ids: list[str],
    labels: np.ndarray,
    original: dict[str, np.ndarray],
    brain: np.ndarray,
    explanation: Explanation,
    batch_size: int,
) -> pd.DataFrame:
    """Maps of a model trained on shuffled labels, compared with the original maps."""
    precision = Precision.choose(worker_device())
    maps = explain_subjects(
        precision.model(load_model(checkpoint, calibrated=True)),
        cache,
        subject_ids,
        labels,
        explanation,
        precision,
        batch_size,
    )
    return pd.DataFrame(
        [{"method": m, "spearman": rho, "ssim": ssim} for m, (rho, ssim) in compare(original, maps, brain).items()]
    )


@dataclass
class SanityChecks:
    """What the sanity checks found of every method (and of the linear baseline's weights, by deletion)."""

    cascade: pd.DataFrame  # cascading parameter randomization: one row per (step, method), Spearman and SSIM
    shuffled: pd.DataFrame  # maps of the model trained on shuffled labels: one row per method (empty if not run)
    shuffled_fit_accuracy: float  # that model's accuracy on its own shuffled training labels (nan if not run)
    deletion: pd.DataFrame  # per (fold, subject, method or random): p of the decided class and its change
    deletion_summary: pd.DataFrame  # per method: its deletions against random blobs (deletion_summary)

    @property
    def flagged(self) -> list[str]:
        """Methods whose maps survive randomization (of the model's parameters or of its training labels)."""
        return flagged_methods(self.cascade, self.shuffled)

    @property
    def deletion_flagged(self) -> list[str]:
        """Methods whose top voxels move the model's decision no more surely than random blobs do."""
        return self.deletion_summary.loc[~self.deletion_summary.beats_random, "method"].tolist()


def flagged_methods(cascade: pd.DataFrame, shuffled: pd.DataFrame) -> list[str]:
    """Methods whose maps still resemble the original ones after full parameter
    randomization or after training on shuffled labels."""
    last = cascade[cascade.step == cascade.step.max()]
    flagged = set(last.loc[last.spearman > FLAG_SPEARMAN, "method"])
    if len(shuffled):
        flagged |= set(shuffled.loc[shuffled.spearman > FLAG_SPEARMAN, "method"])
    return sorted(flagged)


def top_voxels(maps: np.ndarray, brain: np.ndarray, share: float = DELETED_SHARE, seed: int = 0) -> np.ndarray:
    """Flat grid indices [subjects, k] (int32) of each map's top ``share`` of brain voxels.

    ``maps`` is [subjects, brain voxels]. Ties (a map's zeros, a saturated mask)
    are broken at random, not by position, so that an empty map deletes
    scattered voxels rather than the grid's first slices.
    """
    k = max(1, int(round(share * maps.shape[1])))
    rng, scores = np.random.default_rng(seed), np.array(maps, dtype=np.float32)
    scale = np.abs(scores).max(1, keepdims=True)
    scale[scale == 0] = 1.0
    scores += rng.random(scores.shape, dtype=np.float32) * scale * 1e-6
    return np.flatnonzero(brain)[np.argpartition(-scores, k - 1, axis=1)[:, :k]].astype(np.int32)


def random_blobs(
    subjects: int, brain: np.ndarray, sigma_voxels: float, share: float = DELETED_SHARE, seed: int = 0
) -> np.ndarray:
    """Flat grid indices [subjects, k] of random blobs covering ``share`` of the brain: the top voxels of
    Gaussian-smoothed white noise (``sigma_voxels``), contiguous like a map's top voxels, unlike scattered ones."""
    rng = np.random.default_rng(seed)
    noise = np.stack(
        [
            gaussian_filter(rng.standard_normal(brain.shape, dtype=np.float32), sigma_voxels)[brain]
            for _ in range(subjects)
        ]
    )
    return top_voxels(noise, brain, share, seed)


def deletion_changes(
    model: nn.Module, volumes: torch.Tensor, deleted: dict[str, np.ndarray], reference: torch.Tensor
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """How much replacing voxels by ``reference`` moves the model's decision, subject by subject.

    Parameters
    ----------
    model : nn.Module
        The fold's model, in eval mode, on the volumes' device; it runs in
        float32 (bf16 would round the probabilities to steps of about 0.002).
    volumes : torch.Tensor
        The subjects' volumes [subjects, 1, D, H, W].
    deleted : dict of str to np.ndarray
        Per method, the flat grid indices [subjects, k] of the voxels to delete (:func:`top_voxels`).
    reference : torch.Tensor
        What a deleted voxel becomes [D, H, W] (the cohort's mean volume).

    Returns
    -------
    decided : np.ndarray
        The probability of the class the model decides on the intact volumes, [subjects] (a regression
        model's predicted value).
    changes : dict of str to np.ndarray
        Per method, the absolute change of that class's probability (of the predicted value) after the
        deletion, [subjects]: a map of the magnitude (evidence for either class) may mark voxels whose deletion
        strengthens the decision.
    """

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outputs = model(x).float()
            return outputs if outputs.shape[1] == 1 else torch.softmax(outputs, dim=1)

    before = probabilities(volumes)
    decision = before.argmax(1, keepdim=True)
    decided = before.gather(1, decision)[:, 0]
    flat_reference = reference.reshape(-1).to(volumes.device, volumes.dtype)
    changes = {}
    for method, voxels in deleted.items():
        index = torch.as_tensor(voxels, dtype=torch.int64, device=volumes.device)
        x = volumes.reshape(len(volumes), -1).clone().scatter_(1, index, flat_reference[index])
        after = probabilities(x.reshape(volumes.shape)).gather(1, decision)[:, 0]
        changes[method] = (decided - after).abs().cpu().numpy()
    return decided.cpu().numpy(), changes


def deletion_check(
    model: ray.train.Checkpoint | nn.Module,
    cache: VolumeCache,
    subject_ids: list[str],
    deleted: dict[str, np.ndarray],
    reference: np.ndarray,
    batch_size: int,
) -> pd.DataFrame:
    """:func:`deletion_changes` for one fold's held-out subjects, in batches: one row per (subject, method).

    ``model`` is the fold's CNN checkpoint, or a network in eval mode (the linear baseline's)."""
    precision = Precision.choose(worker_device(), precision="fp32")
    model = precision.model(load_model(model, calibrated=True) if isinstance(model, ray.train.Checkpoint) else model)
    volumes, rows = CachedVolumes(cache, subject_ids, np.zeros(len(subject_ids))), []
    mean = torch.tensor(reference, device=precision.device)
    for start in range(0, len(subject_ids), batch_size):
        batch = list(range(start, min(start + batch_size, len(subject_ids))))
        x = precision.volumes(volumes.__getitems__(batch)[0])
        with precision.exact():  # p changes of a few thousandths are compared: no TF32 on a GPU either
            decided, changes = deletion_changes(model, x, {m: v[batch] for m, v in deleted.items()}, mean)
        rows += [
            {"subject_id": subject_ids[i], "method": m, "p_decision": float(decided[j]), "p_change": float(c[j])}
            for m, c in changes.items()
            for j, i in enumerate(batch)
        ]
    return pd.DataFrame(rows)


def deletion_tables(cnn: dict[int, pd.DataFrame], linear: dict[int, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The deletion check's rows of every fold (fold -> :func:`deletion_check`'s table), tagged with the fold and
    the model, and their summary: the CNN's methods against its random blobs, the linear baseline's weights
    against its own."""
    tagged = {
        model: pd.concat([table.assign(fold=fold, model=model) for fold, table in tables.items()], ignore_index=True)
        for model, tables in (("cnn", cnn), ("linear", linear))
        if tables
    }
    summary = pd.concat([deletion_summary(table) for table in tagged.values()], ignore_index=True)
    return pd.concat(list(tagged.values()), ignore_index=True), summary


def deletion_summary(changes: pd.DataFrame) -> pd.DataFrame:
    """Per method, over subjects: the mean and median change of the decided class's probability, the random
    blobs' mean, the share of subjects where the method's change is the larger, and a paired one-sided
    Wilcoxon signed-rank p (scipy; zero differences dropped). ``beats_random`` when p < FLAG_DELETION_P, which
    needs at least 5 subjects whose two changes differ."""
    by = changes.pivot(index="subject_id", columns="method", values="p_change")
    rows = []
    for method in [m for m in changes.method.unique() if m != RANDOM]:
        difference = (by[method] - by[RANDOM]).to_numpy()
        p = float(wilcoxon(difference, alternative="greater").pvalue) if np.any(difference != 0) else 1.0
        rows.append(
            {
                "method": method,
                "subjects": len(difference),
                "change_mean": float(by[method].mean()),
                "change_median": float(by[method].median()),
                "random_change_mean": float(by[RANDOM].mean()),
                "share_above_random": float((difference > 0).mean()),
                "p_vs_random": p,
                "beats_random": p < FLAG_DELETION_P,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "method",
            "subjects",
            "change_mean",
            "change_median",
            "random_change_mean",
            "share_above_random",
            "p_vs_random",
            "beats_random",
        ],
    )
