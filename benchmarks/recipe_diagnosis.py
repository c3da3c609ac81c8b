"""Why a recipe does or does not fit a weak effect: one outer fold, plain torch, the curve every few epochs.

A quick look before `benchmarks/recipe.py` runs whole studies: the study's own
cohort loading, cache, splits (3 outer folds, family-grouped), MriNet, augmentation,
learning-rate schedule and linear baseline, but one fold (``--fold``) trained in
this process without Ray Train, and held-out and fit scores printed every
``every`` epochs: fit ROC AUC and accuracy (eval mode, no augmentation, on the
training subjects) and the held-out ROC AUC. A recipe is the default with the
changes given as JSON, e.g. ``{"dropout": 0.5}``; keys: lr, weight_decay,
batch_size, epochs, warmup_epochs, clip_grad_norm, augment_strength, label_smoothing,
average_last (the weights averaged over that many last epochs, SWA; training), norm, head,
dropout, width, blocks (model), seed, every.

    python benchmarks/recipe_diagnosis.py COHORT --linear                 # the linear baseline of the fold
    python benchmarks/recipe_diagnosis.py COHORT '{}' '{"dropout": 0.5}'  # each recipe in turn
    python benchmarks/recipe_diagnosis.py COHORT '{"seed": 0}' '{"seed": 1}' --folds 0 1 2 --diagnose

``--diagnose`` asks why a fold's probabilities sit on one side (issue 38): after
training it prints the mean log-odds of class 1 on the training subjects in
train mode (batch statistics) with and without augmentation and in eval mode
(running statistics) with and without it, how far the first BatchNorm layer's
running statistics are from those of un-augmented volumes, and the held-out
ROC AUC, balanced accuracy, share predicted class 1 and median P(class 1),
before and after re-estimating BatchNorm on the un-augmented training subjects
(:func:`study.training.calibration.reestimate_batchnorm`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from study.config import TrainConfig
from study.data.cache import CachedVolumes, build_cache
from study.data.cohort import CohortConfig, load_cohort
from study.data.splits import make_splits
from study.data.volumes import Grid
from study.training.augment import augment
from study.training.baseline import fit_linear
from study.training.calibration import Calibration, logit_difference, reestimate_batchnorm
from study.training.models import Architecture, BrainCNN
from study.training.phase import lr_factor

MODEL_KEYS = ("norm", "head", "dropout", "width", "blocks")


def scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """ROC AUC and accuracy (threshold 0.5) of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(x[i : i + 32]), 1)[:, 1] for i in range(0, len(x), 32)]).numpy()
    return float(roc_auc_score(y.numpy(), p)), float(((p > 0.5) == y.numpy()).mean())


def log_odds(model: torch.nn.Module, x: torch.Tensor, train_mode: bool, augmented: dict | None = None) -> np.ndarray:
    """Log-odds of class 1 for volumes ``x`` in batches of 8, in train mode (batch statistics) or eval mode,
    optionally augmented (``augmented``: augment's keyword arguments); the model is left as it was."""
    model = copy.deepcopy(model).train(train_mode)
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 8):
            batch = augment(x[i : i + 8], **augmented) if augmented else x[i : i + 8]
            out.append(logit_difference(model(batch)))
    return np.concatenate(out)


def first_batchnorm_gap(model: torch.nn.Module, x: torch.Tensor) -> str:
    """How far the first BatchNorm layer's running statistics are from those of the un-augmented volumes ``x``:
    the mean over channels of |running mean - mean| / sd and of running variance / variance."""
    norm = next((m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)), None)
    if norm is None:
        return "no BatchNorm"
    seen = []
    hook = norm.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].transpose(0, 1).flatten(1)))
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 8):
            model(x[i : i + 8])
    hook.remove()
    features = torch.cat(seen, 1)
    mean, var = features.mean(1), features.var(1)
    mean_gap = ((norm.running_mean - mean).abs() / var.sqrt()).mean().item()
    var_ratio = (norm.running_var / var).mean().item()
    return f"first BatchNorm: |running mean - mean| {mean_gap:.2f} sd, running variance / variance {var_ratio:.2f}"


def center(z: np.ndarray, y: np.ndarray) -> float:
    """Where a model's log-odds put the boundary between the classes: the midpoint of the two classes' medians
    (0 for a model whose 0.5 threshold sits between them)."""
    return float((np.median(z[y == 1]) + np.median(z[y == 0])) / 2)


def summary(z: np.ndarray, y: np.ndarray, p: np.ndarray | None = None) -> dict:
    """A fold's held-out ROC AUC, balanced accuracy, share predicted class 1, Brier score and centre."""
    p = 1 / (1 + np.exp(-z)) if p is None else p
    return {
        "auc": float(roc_auc_score(y, z)),
        "balanced_accuracy": float(balanced_accuracy_score(y, p >= 0.5)),
        "share": float(np.mean(p >= 0.5)),
        "brier": float(np.mean((p - y) ** 2)),
        "center": center(z, y),
    }


def reestimated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are those of the un-augmented volumes ``x``."""
    model = copy.deepcopy(model)
    reestimate_batchnorm(model, (x[i : i + 8] for i in range(0, len(x), 8)))
    return model


def diagnose(
    model: torch.nn.Module, data: tuple[torch.Tensor, ...], augmented: dict, inner: tuple | None = None
) -> dict:
    """Print where the held-out probabilities' shift comes from (see the module's docstring).

    ``inner``: (a model of the same recipe trained on the fold's inner training split, the inner split's
    validation volumes and labels), whose calibration is then applied to ``model``, as the study does.
    """
    x_train, y_train, x_test, y_test = data
    y = y_train.numpy()
    modes = {
        "train mode, augmented": log_odds(model, x_train, True, augmented),
        "train mode": log_odds(model, x_train, True),
        "eval mode, augmented": log_odds(model, x_train, False, augmented),
        "eval mode": log_odds(model, x_train, False),
    }
    print(f"  training subjects, share predicted class 1 (truth {y.mean():.0%}) and centre:")
    for mode, z in modes.items():
        print(f"    {mode:22s} {np.mean(z >= 0):4.0%}  centre {center(z, y):+.2f}")
    print("  " + first_batchnorm_gap(model, x_train))
    fixed = reestimated(model, x_train)
    z_fixed = log_odds(fixed, x_train, False)
    print(f"    {'eval, BN re-estimated':22s} {np.mean(z_fixed >= 0):4.0%}  centre {center(z_fixed, y):+.2f}")
    y_test = y_test.numpy()
    rows = {"as trained": summary(log_odds(model, x_test, False), y_test)}
    z_test = log_odds(fixed, x_test, False)
    rows["BatchNorm re-estimated"] = summary(z_test, y_test)
    if inner is not None:
        inner_model, x_inner, x_val, y_val = inner
        inner_fixed = reestimated(inner_model, x_inner)
        z_val = log_odds(inner_fixed, x_val, False)
        calibration = Calibration.fit(z_val, y_val.numpy())
        rows["+ inner split's Platt"] = summary(z_test, y_test, calibration.probabilities(z_test))
        temperature = Calibration.fit(z_val, y_val.numpy(), bias=False)
        rows["+ inner temperature only"] = summary(z_test, y_test, temperature.probabilities(z_test))
        print(
            f"  inner split's calibration: temperature {calibration.temperature:.2f}, bias {calibration.bias:+.2f}; "
            f"temperature alone {temperature.temperature:.2f}; inner model's validation: "
            f"predicted class 1 {np.mean(z_val >= 0):.0%}, centre {center(z_val, y_val.numpy()):+.2f}"
        )
    for name, row in rows.items():
        print(
            f"  held out, {name:24s}: ROC AUC {row['auc']:.3f}, balanced accuracy {row['balanced_accuracy']:.3f}, "
            f"predicted class 1 {row['share']:.0%} (truth {y_test.mean():.0%}), Brier {row['brier']:.3f}, "
            f"centre {row['center']:+.2f}"
        )
    return {"held_out": rows}


def recipe_config(changes: dict) -> tuple[dict, TrainConfig, Architecture]:
    """The default recipe with ``changes``: the whole recipe, its training config and its architecture."""
    recipe = {"width": 8, "every": 5, "seed": 0, "label_smoothing": 0.0, **changes}
    train_keys = {k: v for k, v in recipe.items() if k in TrainConfig.model_fields}
    config = TrainConfig.model_validate({**train_keys, "augment": {"strength": recipe.get("augment_strength", 1.0)}})
    return recipe, config, Architecture.model_validate({k: v for k, v in recipe.items() if k in MODEL_KEYS})


def train(
    changes: dict, train_set: CachedVolumes, test_set: CachedVolumes, shape: tuple[int, int, int], voxel_mm: float
) -> tuple[torch.nn.Module, dict]:
    """Train one recipe on ``train_set``; print its curve against ``test_set``; the model and its last scores."""
    recipe, config, architecture = recipe_config(changes)
    torch.manual_seed(recipe["seed"])
    model = BrainCNN(architecture, shape)
    x_train, y_train = train_set.__getitems__(list(range(len(train_set))))
    x_test, y_test = test_set.__getitems__(list(range(len(test_set))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train_set) / config.batch_size)
    total, warmup = config.epochs * per_epoch, round(config.warmup_epochs * per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, config.schedule))
    generator = torch.Generator().manual_seed(recipe["seed"])
    started = time.perf_counter()
    averaged = None  # the weights averaged over the last ``average_last`` epochs (SWA), when asked
    for epoch in range(config.epochs):
        model.train()
        order, loss_sum = torch.randperm(len(train_set), generator=generator), 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = augment(x_train[batch], config.augment, voxel_mm, generator)
            loss = F.cross_entropy(model(x), y_train[batch], label_smoothing=recipe["label_smoothing"])
            optimizer.zero_grad()
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
        if epoch >= config.epochs - recipe.get("average_last", 0):
            averaged = averaged or torch.optim.swa_utils.AveragedModel(model)
            averaged.update_parameters(model)
        if epoch == config.epochs - 1 and averaged is not None:
            model = averaged.module
            reestimate_batchnorm(model, (x_train[i : i + 8] for i in range(0, len(x_train), 8)))
        if (epoch + 1) % recipe["every"] == 0 or epoch == config.epochs - 1:
            fit_auc, fit_accuracy = scores(model, x_train, y_train)
            test_auc, _ = scores(model, x_test, y_test)
            print(
                f"  epoch {epoch + 1:3d}: training loss {loss_sum / len(order):.3f}, fit ROC AUC {fit_auc:.3f}, "
                f"fit accuracy {fit_accuracy:.2f}, held-out ROC AUC {test_auc:.3f} "
                f"[{time.perf_counter() - started:.0f} s]",
                flush=True,
            )
    print(f"  last learning rate {optimizer.param_groups[0]['lr']:.2e}")
    return model, {"recipe": changes, "fit_accuracy": fit_accuracy, "test_roc_auc": test_auc}


def subjects(cache, ids: list[str], label: dict[str, int]) -> CachedVolumes:
    return CachedVolumes(cache, ids, np.array([label[s] for s in ids]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path, help="a cohort folder (e.g. one of benchmarks/recipe.py's rungs)")
    parser.add_argument("recipes", nargs="*", default=["{}"], help="changes to the default recipe, as JSON")
    parser.add_argument("--linear", action="store_true", help="also fit the study's linear baseline on the fold")
    parser.add_argument("--subjects", type=int, default=None, help="the first N subjects only")
    parser.add_argument("--folds", type=int, nargs="+", default=[0], help="outer folds to train (default 0)")
    parser.add_argument("--diagnose", action="store_true", help="say why held-out probabilities are shifted")
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="with --diagnose: also train on the inner split and apply its calibration to the fold's model",
    )
    parser.add_argument("--voxel-size", type=float, default=4.0)
    parser.add_argument("--cache", type=Path, default=Path("study_data/cache"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the cache is built by Ray tasks
    cohort = load_cohort(CohortConfig(root=args.cohort))
    grid = Grid.mni(args.voxel_size)
    cache = build_cache(cohort, grid, args.cache).cache
    n = args.subjects or len(cohort.ids)
    ids, labels = cohort.ids[:n], cohort.labels[:n]
    families = [s.family_id for s in cohort.subjects][:n]
    label = dict(zip(ids, labels.tolist()))
    for number in args.folds:
        fold = make_splits(ids, labels, families, 3, 3, 0)[number]
        train_set, test_set = subjects(cache, fold.train, label), subjects(cache, fold.test, label)
        print(
            f"{args.cohort}: fold {number}, {len(fold.train)} training and {len(fold.test)} held-out subjects, "
            f"{args.voxel_size:g} mm grid {cache.shape}"
        )
        if args.linear:
            result = fit_linear(cache, cache.brain(), fold, label, cohort.target)
            print(
                f"linear baseline: held-out ROC AUC {result.test_metrics['roc_auc']:.3f} (C {result.C:g})", flush=True
            )
        for recipe in args.recipes:
            print(f"recipe {recipe}:", flush=True)
            model, outcome = train(json.loads(recipe), train_set, test_set, cache.shape, grid.voxel_mm)
            if args.diagnose:
                _, config, _ = recipe_config(json.loads(recipe))
                augmented = {"augmentation": config.augment, "voxel_mm": grid.voxel_mm}
                augmented["generator"] = torch.Generator().manual_seed(1)
                x_train, y_train = train_set.__getitems__(list(range(len(train_set))))
                x_test, y_test = test_set.__getitems__(list(range(len(test_set))))
                inner = None
                if args.transfer:
                    print("  the same recipe on the inner split:", flush=True)
                    inner_train = subjects(cache, fold.validation.train, label)
                    validation = subjects(cache, fold.validation.test, label)
                    inner_model, _ = train(json.loads(recipe), inner_train, validation, cache.shape, grid.voxel_mm)
                    x_inner = inner_train.__getitems__(list(range(len(inner_train))))[0]
                    inner = (inner_model, x_inner, *validation.__getitems__(list(range(len(validation)))))
                outcome |= diagnose(model, (x_train, y_train, x_test, y_test), augmented, inner)
            print(json.dumps({"fold": number, **outcome}, default=float), flush=True)


if __name__ == "__main__":
    main()
