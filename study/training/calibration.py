"""Probabilities that mean what they say: normalization statistics of the images tested, then Platt scaling.

Two steps, in the order a fold's final model takes them:

1. :func:`reestimate_batchnorm`: a network trained on augmented volumes keeps
   BatchNorm running statistics of *augmented* volumes (resampled, hence
   smoother, with jittered intensities), and applies them at test time to
   volumes that are not. On weak effects that shifts every logit of a fold the
   same way: the fold ranks its subjects well but calls most of them one class
   (issue 38; ``benchmarks/recipe_diagnosis.py --diagnose`` measures it). The
   fix re-estimates the statistics on the training subjects as they are tested,
   un-augmented ("precise BatchNorm", Wu & Johnson 2021).
2. :class:`Calibration`: what is left is corrected on the logit difference.
   By default (:meth:`Calibration.recentered`) the 0.5 threshold moves to
   midway between the classes' median log-odds on the final model's own
   training subjects: on weak effects a training ends leaning to one class, by
   an amount its training subjects show as well as its held-out ones. A
   temperature (Guo et al. 2017), or a temperature and a bias (Platt 1999),
   can instead be fitted on predictions for the first inner split's
   validation subjects by a model that did not train on them (see
   :mod:`.loop`); that model is another training, whose confidence and lean
   need not be the final model's. Never on held-out subjects. Of several
   classes the same, on each class's logit about the mean of the logits, with
   a bias per class (vector scaling's biases; Guo et al. 2017).

The scores the field reports for calibration are :func:`brier_score` and
:func:`reliability_bins` (a reliability diagram's points).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit, log_softmax, softmax
from torch.optim.swa_utils import update_bn


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm layer's running mean and variance by those of ``batches`` (un-augmented volumes).

    Each statistic becomes the plain average over the batches, not an exponential one, and no weight changes:
    PyTorch's ``swa_utils.update_bn`` (written for weight averaging, which needs the same), without building an
    autograd graph. The model ends in eval mode.
    """
    update_bn(batches, model)
    model.eval()


def logit_difference(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """The class-1 minus class-0 logit of [subjects, 2] logits: the log-odds of class 1 that softmax implies (of
    [subjects, 1] outputs, a regression network's, the output itself; of [subjects, classes] logits of several
    classes, each logit minus their mean, [subjects, classes]: softmax's log-probabilities up to a constant)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] > 2:
        return logits - logits.mean(1, keepdims=True)
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


# A regression fold's predictions on its own training subjects must move at least this much per unit of the
# target for their line to be undone: below it the model learned too little, and undoing it would blow up noise.
MIN_SLOPE = 0.2


@dataclass(frozen=True)
class Calibration:
    """P(class 1) = sigmoid(``temperature`` x (logit 1 - logit 0) + ``bias``): Platt scaling of a fold's model.

    The identity (1, 0) leaves softmax's probability as it is. ``subjects`` is how many predictions it was
    fitted on (0: not fitted). For a regression target the same affine map takes the network's standardized
    output back to the target's unit (:meth:`values`; :meth:`standardizing`). Of several classes, P(each class)
    = softmax(``temperature`` x logits + ``class_bias``), the biases summing to 0 (``bias`` unused).
    """

    temperature: float = 1.0
    bias: float = 0.0
    subjects: int = 0
    class_bias: tuple[float, ...] = ()  # several classes: one bias per class (empty: the identity's)

    def probabilities(self, log_odds: np.ndarray) -> np.ndarray:
        """Calibrated P(class 1) for the model's log-odds (:func:`logit_difference`); of several classes'
        [subjects, classes] logits, P(each class)."""
        z = np.asarray(log_odds, dtype=np.float64)
        if z.ndim == 2:
            return softmax(self.temperature * z + (np.asarray(self.class_bias) if self.class_bias else 0.0), axis=1)
        return expit(self.temperature * z + self.bias)

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """A regression target's predicted values (e.g. ages) for the network's standardized ``outputs``."""
        return self.temperature * np.asarray(outputs, dtype=np.float64) + self.bias

    @classmethod
    def standardizing(cls, values: np.ndarray) -> Calibration:
        """The map from standardized values back to ``values``' unit: their sd and mean (a training fold's, never
        a held-out subject's; an sd of 0 counts as 1)."""
        values = np.asarray(values, dtype=np.float64)
        return cls(float(values.std()) or 1.0, float(values.mean()), len(values))

    def corrected_by(self, slope: float, intercept: float) -> Calibration:
        """This map followed by undoing the line ``value = slope x true + intercept`` of its values: a regression
        fold's predictions corrected as brain-age studies correct them (de Lange & Cole 2020), by the line of the
        final model's predictions on its own training subjects (``slope`` at least :data:`MIN_SLOPE`)."""
        return Calibration(self.temperature / slope, (self.bias - intercept) / slope, self.subjects)

    def standardized(self, values: np.ndarray) -> np.ndarray:
        """``values`` in this map's standard units: what a regression network learns."""
        return (np.asarray(values, dtype=np.float64) - self.bias) / self.temperature

    @classmethod
    def fit(cls, log_odds: np.ndarray, labels: np.ndarray, bias: bool = True) -> Calibration:
        """The temperature and bias (or, ``bias=False``, the temperature alone: Guo et al.'s temperature scaling,
        which keeps every decision) of least log loss on ``labels`` (0/1), the temperature kept positive.

        Maximum likelihood with a weak Gaussian prior (sd 2 on the bias and on the log-temperature, around the
        identity) so that a few subjects, or perfectly separated ones, give finite values. Fewer than 4 subjects,
        or one class only: the identity.
        """
        z, y = np.asarray(log_odds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        if len(z) < 4 or y.min() == y.max():
            return cls(subjects=0)
        if z.ndim == 2:
            return cls._fit_several(z, y.astype(int), bias)

        def loss(params: np.ndarray) -> float:
            log_t, b = params if bias else (params[0], 0.0)
            s = np.exp(log_t) * z + b
            return -np.sum(y * log_expit(s) + (1 - y) * log_expit(-s)) + (log_t**2 + b**2) / (2 * 2.0**2)

        start = np.zeros(2 if bias else 1)
        result = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
        return cls(float(np.exp(result.x[0])), float(result.x[1]) if bias else 0.0, len(z))

    @classmethod
    def _fit_several(cls, z: np.ndarray, y: np.ndarray, bias: bool) -> Calibration:
        """:meth:`fit` of several classes' centred logits [subjects, classes]: a temperature and (``bias``) a bias
        per class, summing to 0, of least multinomial log loss, with the same prior."""
        classes = z.shape[1]

        def unpack(params: np.ndarray) -> tuple[float, np.ndarray]:
            b = params[1:] - params[1:].mean() if bias else np.zeros(classes)
            return params[0], b

        def loss(params: np.ndarray) -> float:
            log_t, b = unpack(params)
            log_p = log_softmax(np.exp(log_t) * z + b, axis=1)
            return -log_p[np.arange(len(y)), y].sum() + (log_t**2 + np.sum(b**2)) / (2 * 2.0**2)

        start = np.zeros(1 + (classes if bias else 0))
        result = minimize(loss, start, method="L-BFGS-B")
        log_t, b = unpack(result.x)  # b: zeros without a bias, which keep the classes' count for CalibratedModel
        return cls(float(np.exp(log_t)), 0.0, len(z), tuple(float(v) for v in b))

    @classmethod
    def recentered(cls, log_odds: np.ndarray, labels: np.ndarray) -> Calibration:
        """The bias that moves the 0.5 threshold to midway between the two classes' median log-odds.

        Fitted on the final model's own training subjects, this corrects which way that training leans, the
        part of a fold's shift that another training's predictions cannot tell (docs/results.md,
        "Calibration"); medians, unlike a likelihood fit, are not fooled by how sure a model is of subjects it
        trained on. Of several classes, one bias per class does the same for that class against the rest, on its
        centred logit (of two classes it is the same correction). Fewer than 4 subjects, or a class missing: the
        identity.
        """
        z, y = np.asarray(log_odds, dtype=np.float64), np.asarray(labels)
        if z.ndim == 2:
            if len(z) < 4 or len(np.unique(y)) < z.shape[1]:
                return cls(subjects=0)
            b = np.array([-(np.median(z[y == k, k]) + np.median(z[y != k, k])) / 2 for k in range(z.shape[1])])
            return cls(1.0, 0.0, len(z), tuple(float(v) for v in b - b.mean()))
        if len(z) < 4 or y.min() == y.max():
            return cls(subjects=0)
        return cls(1.0, float(-(np.median(z[y == 1]) + np.median(z[y == 0])) / 2), len(z))

    def applied_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with this calibration on its logits (:class:`CalibratedModel`), or itself for the identity."""
        identity = (self.temperature, self.bias) == (1.0, 0.0) and not any(self.class_bias)
        return model if identity else CalibratedModel(model, self)

    def to_dict(self) -> dict:
        record = {"temperature": self.temperature, "bias": self.bias, "subjects": self.subjects}
        return record | ({"class_bias": list(self.class_bias)} if self.class_bias else {})

    @classmethod
    def from_dict(cls, record: dict | None) -> Calibration:
        """The calibration of :meth:`to_dict`; None (a checkpoint from before calibration) is the identity."""
        if not record:
            return cls()
        biases = tuple(float(b) for b in record.get("class_bias", ()))
        return cls(float(record["temperature"]), float(record["bias"]), int(record["subjects"]), biases)


class CalibratedModel(torch.nn.Module):
    """A two-class model whose logits carry its fold's calibration, for whatever reads its logits (a regression
    model's one output: its value in the target's unit).

    Each logit is multiplied by the temperature, and half the bias is added to class 1's and taken from class
    0's: softmax then gives the calibrated probability, argmax the calibrated decision, and the gradient of
    either logit, or of their difference, is the network's times the (positive) temperature. So maps have their
    shapes and signs, while the decisions a method starts from (``predicted_class``, Meaningful Perturbations'
    and the deletion check's decided class) are those the study reports. Of several classes, each class's bias
    is added to its logit.
    """

    def __init__(self, model: torch.nn.Module, calibration: Calibration):
        super().__init__()
        self.model, self.temperature, self.bias = model, calibration.temperature, calibration.bias
        offset = calibration.class_bias or (-calibration.bias / 2, calibration.bias / 2)
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))

    @property
    def gradcam_layer(self) -> torch.nn.Module:
        """The network's Grad-CAM layer (:mod:`study.attribution.gradcam` hooks it)."""
        return self.model.gradcam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.shape[1] == 1:  # a regression target's value, in its unit
            return logits * self.temperature + self.bias
        return logits * self.temperature + self.offset.to(logits.dtype)


def brier_score(labels: np.ndarray, p: np.ndarray) -> float:
    """The mean squared difference between P(class 1) and the 0/1 truth (0 is perfect; 0.25 is a coin)."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def reliability_bins(labels: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reliability diagram's points: per bin of P(class 1) on [0, 1] in ``bins`` equal widths, the mean
    predicted probability, the observed share of class 1 and the number of subjects (empty bins left out).

    The same bins as scikit-learn's ``calibration_curve(strategy="uniform")``, with the counts it does not give.
    """
    p, y = np.asarray(p, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    index = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p)
    counts = np.bincount(index, minlength=bins)
    kept = counts > 0
    predicted = np.bincount(index, weights=p, minlength=bins)[kept] / counts[kept]
    observed = np.bincount(index, weights=y, minlength=bins)[kept] / counts[kept]
    return predicted, observed, counts[kept]
