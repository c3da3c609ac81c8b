"""Why a recipe does or does not fit a weak effect: one outer fold, plain torch, the curve every few epochs.

A quick look before `benchmarks/recipe.py` runs whole studies: the study's own
cohort loading, cache, splits (3 outer folds, family-grouped), MriNet, augmentation,
learning-rate schedule and linear baseline, but one fold (``--fold``) trained in
this process without Ray Train, and held-out and fit scores printed every
``every`` epochs: fit ROC AUC and accuracy (eval mode, no augmentation, on the
training subjects) and the held-out ROC AUC. A recipe is the default with the
changes given as JSON, e.g. ``{"dropout": 0.5}``; keys: lr, weight_decay,
batch_size, epochs, warmup_epochs, clip_grad_norm, augment_strength, label_smoothing
(training), norm, head, dropout, width, blocks (model), seed, every.

    python benchmarks/recipe_diagnosis.py COHORT --linear                 # the linear baseline of the fold
    python benchmarks/recipe_diagnosis.py COHORT '{}' '{"dropout": 0.5}'  # each recipe in turn
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from study.config import TrainConfig
from study.data.cache import CachedVolumes, build_cache
from study.data.cohort import CohortConfig, load_cohort
from study.data.splits import make_splits
from study.data.volumes import Grid
from study.training.augment import augment
from study.training.baseline import fit_linear
from study.training.models import Architecture, BrainCNN
from study.training.phase import lr_factor

MODEL_KEYS = ("norm", "head", "dropout", "width", "blocks")


def scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """ROC AUC and accuracy (threshold 0.5) of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        p = torch.cat([torch.softmax(model(x[i : i + 32]), 1)[:, 1] for i in range(0, len(x), 32)]).numpy()
    return float(roc_auc_score(y.numpy(), p)), float(((p > 0.5) == y.numpy()).mean())


def train(
    changes: dict, train_set: CachedVolumes, test_set: CachedVolumes, shape: tuple[int, int, int], voxel_mm: float
) -> dict:
    """Train one recipe on the fold; print its curve; its last scores."""
    recipe = {"width": 8, "every": 5, "seed": 0, "label_smoothing": 0.0, **changes}
    train_keys = {k: v for k, v in recipe.items() if k in TrainConfig.model_fields}
    config = TrainConfig.model_validate({**train_keys, "augment": {"strength": recipe.get("augment_strength", 1.0)}})
    architecture = Architecture.model_validate({k: v for k, v in recipe.items() if k in MODEL_KEYS})
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
        if (epoch + 1) % recipe["every"] == 0 or epoch == config.epochs - 1:
            fit_auc, fit_accuracy = scores(model, x_train, y_train)
            test_auc, _ = scores(model, x_test, y_test)
            print(
                f"  epoch {epoch + 1:3d}: training loss {loss_sum / len(order):.3f}, fit ROC AUC {fit_auc:.3f}, "
                f"fit accuracy {fit_accuracy:.2f}, held-out ROC AUC {test_auc:.3f} "
                f"[{time.perf_counter() - started:.0f} s]",
                flush=True,
            )
    return {"recipe": changes, "fit_accuracy": fit_accuracy, "test_roc_auc": test_auc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path, help="a cohort folder (e.g. one of benchmarks/recipe.py's rungs)")
    parser.add_argument("recipes", nargs="*", default=["{}"], help="changes to the default recipe, as JSON")
    parser.add_argument("--linear", action="store_true", help="also fit the study's linear baseline on the fold")
    parser.add_argument("--subjects", type=int, default=None, help="the first N subjects only")
    parser.add_argument("--fold", type=int, default=0)
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
    fold = make_splits(ids, labels, families, 3, 3, 0)[args.fold]
    label = dict(zip(ids, labels.tolist()))
    train_set = CachedVolumes(cache, fold.train, np.array([label[s] for s in fold.train]))
    test_set = CachedVolumes(cache, fold.test, np.array([label[s] for s in fold.test]))
    print(
        f"{args.cohort}: fold {args.fold}, {len(fold.train)} training and {len(fold.test)} held-out subjects, "
        f"{args.voxel_size:g} mm grid {cache.shape}"
    )
    if args.linear:
        result = fit_linear(cache, cache.brain(), fold, label, cohort.classes)
        print(f"linear baseline: held-out ROC AUC {result.test_metrics['roc_auc']:.3f} (C {result.C:g})", flush=True)
    for recipe in args.recipes:
        print(f"recipe {recipe}:", flush=True)
        print(json.dumps(train(json.loads(recipe), train_set, test_set, cache.shape, grid.voxel_mm)), flush=True)


if __name__ == "__main__":
    main()
