"""Class-imbalance helpers for training: class weights, output-bias priors, focal / weighted CE.

HAM10000 is dominated by ``nv`` (about two thirds of the images) while ``df`` and ``vasc`` have a
hundred-odd each, so an unweighted cross-entropy learns "always nv". Two remedies are offered
(``train.common.loss``): the categorical focal loss with a per-class alpha taken from inverse
frequency, and cross-entropy weighted by the same class weights.

The numpy helpers are pure and cheap; the Keras losses are registered serializable so a
``model.keras`` saved with its compile config loads with ``safe_mode=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

__all__ = [
    "class_weights",
    "log_priors",
    "CategoricalFocalLoss",
    "WeightedCrossEntropy",
    "make_loss",
]

_EPS = 1e-7


def class_weights(counts: Sequence[int], *, power: float = 1.0, max_weight: float = 0.0) -> np.ndarray:
    """Per-class weights from class counts: ``(N / (K * n_c)) ** power``, rescaled to mean 1 per image.

    ``power=1`` is sklearn's "balanced" weighting, ``0.5`` its softer square root (HAM10000's
    nv:df ratio is ~58:1, and full inverse frequency makes the rare classes' few images dominate
    the gradient). The rescaling makes the count-weighted mean weight 1, so the loss keeps the
    scale of an unweighted loss and the learning rates stay comparable between the two.
    ``max_weight > 0`` caps a weight (after rescaling). A class with no images gets weight 0.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or np.any(n < 0):
        raise ValueError(f"class counts must be a non-empty list of non-negative numbers, got {counts}")
    total = n.sum()
    if total <= 0:
        raise ValueError("class counts are all zero: no training images")
    present = n > 0
    w = np.zeros_like(n)
    w[present] = (total / (present.sum() * n[present])) ** power
    w /= (n * w).sum() / total
    if max_weight > 0:
        w = np.minimum(w, max_weight)
    return w


def log_priors(counts: Sequence[int], *, smoothing: float = 1.0) -> np.ndarray:
    """Log class priors (Laplace-smoothed) for the output bias.

    With the bias set to log p(c), the untrained softmax already predicts the class frequencies,
    so the first epochs are not spent unlearning a uniform guess (an initial loss near the
    entropy of the labels instead of log K), which matters most for the rare classes.
    """
    n = np.asarray(counts, dtype=np.float64) + smoothing
    return np.log(n / n.sum())


def _smooth(y_true, label_smoothing: float):
    if not label_smoothing:
        return y_true
    k = ops.cast(ops.shape(y_true)[-1], y_true.dtype)
    return y_true * (1.0 - label_smoothing) + label_smoothing / k


@keras.saving.register_keras_serializable(package="skinlesion")
class CategoricalFocalLoss(keras.losses.Loss):
    """Focal loss ``-sum_c alpha_c * y_c * (1 - p_c)**gamma * log p_c`` on softmax probabilities.

    ``alpha`` is a per-class weight vector (see :func:`class_weights`), not the scalar 0.25 of the
    detection paper: here it carries the class-frequency correction and ``gamma`` the
    easy-example down-weighting. ``gamma=0`` and ``alpha=None`` is plain cross-entropy.
    """

    def __init__(
        self,
        alpha: Sequence[float] | None = None,
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
        name: str = "focal_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = None if alpha is None else [float(a) for a in alpha]
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.clip(ops.cast(y_pred, "float32"), _EPS, 1.0 - _EPS)
        y_true = _smooth(ops.cast(y_true, "float32"), self.label_smoothing)
        ce = -y_true * ops.log(y_pred)
        w = ops.power(1.0 - y_pred, self.gamma)
        if self.alpha is not None:
            w = w * ops.convert_to_tensor(self.alpha, dtype="float32")
        return ops.sum(w * ce, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "gamma": self.gamma,
            "label_smoothing": self.label_smoothing,
        }


@keras.saving.register_keras_serializable(package="skinlesion")
class WeightedCrossEntropy(keras.losses.Loss):
    """Cross-entropy on probabilities with each image weighted by its true class's weight.

    Done in the loss rather than through ``fit(class_weight=...)`` because Keras's class_weight
    does not apply under a custom distributed training step (multi-worker) nor at validation.
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        name: str = "weighted_ce",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.weights = None if weights is None else [float(a) for a in weights]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.clip(ops.cast(y_pred, "float32"), _EPS, 1.0 - _EPS)
        y_true = ops.cast(y_true, "float32")
        ce = -ops.sum(_smooth(y_true, self.label_smoothing) * ops.log(y_pred), axis=-1)
        if self.weights is None:
            return ce
        w = ops.sum(y_true * ops.convert_to_tensor(self.weights, dtype="float32"), axis=-1)
        return w * ce

    def get_config(self):
        return {**super().get_config(), "weights": self.weights, "label_smoothing": self.label_smoothing}


def make_loss(
    kind: str, weights: Sequence[float], *, gamma: float = 2.0, label_smoothing: float = 0.0, reduction=None
) -> keras.losses.Loss:
    """The training loss named by ``train.common.loss`` (``focal`` or ``weighted_ce``)."""
    kw = {} if reduction is None else {"reduction": reduction}
    if kind == "focal":
        return CategoricalFocalLoss(alpha=list(weights), gamma=gamma, label_smoothing=label_smoothing, **kw)
    if kind == "weighted_ce":
        return WeightedCrossEntropy(weights=list(weights), label_smoothing=label_smoothing, **kw)
    raise ValueError(f"unknown loss {kind!r}; use 'focal' or 'weighted_ce'")
