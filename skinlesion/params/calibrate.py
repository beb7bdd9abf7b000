"""The ``calibrate`` section: temperature scaling and the recall-first threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from skinlesion.params.schema import bounded


@dataclass(frozen=True)
class CalibrateParams:
    target_recall: float = bounded(0.95, lo=0.0, hi=1.0)
    # point: the validation recall meets the target; lower_ci: the lower end of its lesion
    # bootstrap CI does (a safety margin for small validation sets).
    recall_bound: Literal["point", "lower_ci"] = "point"
    # temperature: one T; temperature_bias: T and a per-class logit bias, fitted on val NLL (undoes
    # the prior shift of class-weighted training; see metrics.fit_temperature_bias)
    method: Literal["temperature", "temperature_bias"] = "temperature_bias"
    # the predicted class: argmax of the calibrated probabilities, or balanced: argmax p / prior
    # (val class shares), the decision that maximises balanced accuracy
    decision: Literal["argmax", "balanced"] = "balanced"
    ece_bins: int = bounded(15, lo=2, hi=1000)
    bootstrap_samples: int = bounded(1000, lo=10, hi=100_000)  # for recall_bound: lower_ci
    ci_level: float = bounded(0.95, lo=0.5, hi=0.999)
