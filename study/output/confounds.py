"""What the named confounds explain, published: the confounds-only model and each model's confound tests."""

from __future__ import annotations

import pandas as pd

from study.data.adjustment import Adjustment
from study.training.evaluation import ConfoundCheck, format_p

CONFOUNDS = (
    "The confounds alone: a logistic regression on them, fitted on each outer fold's training subjects, predicting "
    "its held-out subjects. Full confound test (Spisak 2022): do a model's pooled held-out predictions carry "
    "information about the label beyond the confounds? Its null permutes the labels conditionally on the confounds "
    "(Berrett et al. 2020); a low p says yes, a high p that the model may have learned the confounds only. Partial "
    "confound test: are the predictions driven by the confounds beyond the label? Its null permutes them within each "
    "class; a low p says yes. Both low: the model learned the label and the confounds both, so its maps may mark "
    "either (their group test is adjusted for the confounds). R²: of labels and predictions (full), of predictions "
    "on the confounds (partial), with the null's median beside it."
)


def adjusted_images(adjustment: Adjustment, kept: str | None = None) -> str:
    """How a study's images were adjusted for the confounds (``cv.adjust``), in words (``kept``: cv.group_by)."""
    others = [c for c in adjustment.columns if c != adjustment.batch]
    what = (
        f"{adjustment.batch} harmonized by ComBat" + (f", {', '.join(others)} regressed out" if others else "")
        if adjustment.batch
        else f"{', '.join(others)} regressed out of every voxel"
    )
    left = f"; {kept} left in (each of its values is held out whole)" if kept else ""
    return f"{what}, inside each outer fold, fitted on its training subjects only{left}"


def confound_table(confounds: ConfoundCheck) -> pd.DataFrame:
    """The confounds-only model's ROC AUC and each model's two confound tests, one row each."""
    rows = [
        {
            "model": f"confounds alone ({confounds.listing})",
            "pooled ROC AUC [95% CI]": str(confounds.alone),
            "test": "",
            "R²": "",
            "R² expected by the confounds": "",
            "p": "",
        }
    ]
    for model, full, partial in [
        ("CNN", confounds.full, confounds.partial),
        ("linear baseline", confounds.baseline_full, confounds.baseline_partial),
    ]:
        for name, test in [("full: beyond the confounds?", full), ("partial: driven by them?", partial)]:
            if test is not None:
                rows.append(
                    {
                        "model": model,
                        "pooled ROC AUC [95% CI]": "",
                        "test": name,
                        "R²": f"{test.r2:.3f}",
                        "R² expected by the confounds": f"{test.null_median:.3f}",
                        "p": format_p(test.p),
                    }
                )
    return pd.DataFrame(rows)


def confound_metrics(confounds: ConfoundCheck) -> dict[str, float]:
    """The study run's metrics of the confound check."""
    metrics = {
        "confounds_pooled_roc_auc": confounds.alone.value,
        "confounds_pooled_roc_auc_ci_low": confounds.alone.low,
        "confounds_pooled_roc_auc_ci_high": confounds.alone.high,
        "full_confound_test_p": confounds.full.p,
        "partial_confound_test_p": confounds.partial.p,
    }
    if confounds.baseline_full is not None:
        metrics["baseline_full_confound_test_p"] = confounds.baseline_full.p
        metrics["baseline_partial_confound_test_p"] = confounds.baseline_partial.p
    return metrics
