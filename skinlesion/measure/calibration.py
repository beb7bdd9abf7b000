"""Calibration of an ensemble's logits, fitted on validation data (the ``calibrate`` stage's core).

Temperature scaling (``calibrate.method`` ``temperature``: one T) or ``temperature_bias`` (T and a
per-class bias: undoes the prior shift of class-weighted training), fitted on val NLL (never
worse than T = 1 there); the class decision (``argmax p`` or, with ``calibrate.decision:
balanced``, ``argmax p / prior``: the validation class shares); and the recall-first malignant
threshold on the calibrated P(mel) + P(bcc) + P(akiec). One :class:`Calibration` per input mode
(:func:`fit_modes`), each on the validation rows served in that mode. The report: the fitted
numbers on val, ECE and NLL before and after, and the served test report
(:func:`calibration_metrics`); the reliability diagram (:func:`write_reliability`).
NumPy, pandas and matplotlib only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.card import fmt
from skinlesion.measure.metrics import (
    apply_calibration,
    balanced_accuracy,
    balanced_decision,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_bias,
    malignant_score,
    malignant_truth,
    nll_with_calibration,
    recall_first_threshold,
    reliability_table,
)
from skinlesion.measure.predictions import (
    Served,
    complete_metadata,
    json_value,
    labels,
    logit_columns,
    prob_columns,
    served_report,
)
from skinlesion.measure.scoring import METADATA, OperatingPoint, mode_suffix
from skinlesion.params.calibrate import CalibrateParams
from skinlesion.params.evaluate import EvaluateParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """What is fitted on validation data: the only numbers the test split never influences."""

    temperature: float
    threshold: float
    val_recall: float
    val_recall_lower: float
    val_specificity: float
    bias: tuple[float, ...] | None = None  # per-class logit bias (method temperature_bias)
    prior: tuple[float, ...] | None = None  # the decision's class prior (decision balanced)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ensemble logits."""
        return apply_calibration(logits, self.temperature, self.bias)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted class index of each row of calibrated probabilities."""
        return balanced_decision(probs, self.prior)

    def point(self) -> OperatingPoint:
        """What the bundle stores for this mode."""
        return OperatingPoint(self.temperature, self.threshold, self.bias, self.prior)


# --------------------------------------------------------------------------- pure core


def fit_calibration(
    val_logits: np.ndarray,
    y_val: np.ndarray,
    groups_val: Sequence,
    params: CalibrateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> Calibration:
    """Temperature (and bias), then the recall-first threshold on the calibrated validation scores."""
    bias: tuple[float, ...] | None = None
    if params.method == "temperature_bias":
        t, b = fit_temperature_bias(val_logits, y_val)
        bias = tuple(round(float(v), 6) for v in b)
    else:
        t = fit_temperature(val_logits, y_val)
    prior = None
    if params.decision == "balanced":
        counts = np.bincount(np.asarray(y_val, dtype=np.int64), minlength=len(classes)).astype(np.float64)
        # the empirical shares; a class absent from val gets half a case instead of an infinite boost
        prior = tuple(round(float(v), 6) for v in np.maximum(counts, 0.5) / counts.sum())
    score = malignant_score(apply_calibration(val_logits, t, bias), classes)
    is_mal = malignant_truth(y_val, classes)
    if not is_mal.any():
        raise StageError(
            "validation split has no malignant case (mel, bcc, akiec): no threshold can be chosen"
        )
    choice = recall_first_threshold(
        is_mal,
        score,
        params.target_recall,
        bound=params.recall_bound,
        groups=np.asarray(groups_val),
        n_samples=params.bootstrap_samples,
        rng=rng,
        level=params.ci_level,
    )
    if choice.recall_lower < params.target_recall:
        log.warning(
            "the %s recall cannot reach %.3f on val even at the lowest threshold (%.3f)",
            params.recall_bound,
            params.target_recall,
            choice.recall_lower,
        )
    return Calibration(
        t, choice.threshold, choice.recall, choice.recall_lower, choice.specificity, bias=bias, prior=prior
    )


def calibration_metrics(
    cal: Calibration,
    val: pd.DataFrame,
    test: pd.DataFrame,
    served: Served,
    params: CalibrateParams,
    eval_params: EvaluateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The fitted calibration on val, and the served test report (:func:`served_report`).

    Validation numbers come from the fitted calibration; every test number comes from
    ``served``, the bundle's own answers for the test images
    (:func:`skinlesion.model.bundle.served_predictions`), and
    ``test`` (the ensemble's uncalibrated predictions) gives only the "before" values.
    """
    out: dict[str, Any] = {
        "temperature": cal.temperature,
        "threshold": cal.threshold,
        "target_recall": params.target_recall,
        "val_malignant_recall": cal.val_recall,
        "val_malignant_recall_bound": cal.val_recall_lower,
        "val_specificity": cal.val_specificity,
    }
    y = labels(val, classes)
    logits = val[logit_columns(classes)].to_numpy(dtype=np.float64)
    calibrated = cal.probs(logits)
    out["val_ece_before"] = expected_calibration_error(apply_calibration(logits, 1.0), y, params.ece_bins)
    out["val_ece_after"] = expected_calibration_error(calibrated, y, params.ece_bins)
    out["val_nll_before"] = nll_with_calibration(logits, y, 1.0)
    out["val_nll_after"] = nll_with_calibration(logits, y, cal.temperature, cal.bias)
    # the bundle's class decision on calibrated probabilities (calibrate.decision)
    out["val_balanced_accuracy_decision"] = balanced_accuracy(y, cal.decide(calibrated), len(classes))

    y = labels(test, classes)
    before = test[logit_columns(classes)].to_numpy(dtype=np.float64)
    out["ece_before"] = expected_calibration_error(apply_calibration(before, 1.0), y, params.ece_bins)
    out["nll_before"] = nll_with_calibration(before, y, 1.0)
    served_m, table = served_report(test, served, eval_params, rng, ece_bins=params.ece_bins, classes=classes)
    out.update(served_m)
    return out, table


def fit_modes(
    frames: dict[tuple[str, str], pd.DataFrame],
    modes: Sequence[str],
    params: CalibrateParams,
    rng: np.random.Generator,
    classes: Sequence[str],
) -> dict[str, Calibration]:
    """One calibration per input mode, each fitted on the validation rows served in that mode."""
    fits: dict[str, Calibration] = {}
    for mode in modes:
        val = frames["val", mode]
        if mode == METADATA:
            # Only rows with all three fields known are ever served with this operating point.
            val = val[complete_metadata(val)]
            if val.empty:
                raise StageError(
                    "calibrate: no validation image has age, sex and localization all known: the "
                    "metadata operating point cannot be fitted (train without fusion, or fix the metadata)"
                )
        log.info("%s: fitting on %d validation images", mode, len(val))
        fits[mode] = fit_calibration(
            val[logit_columns(classes)].to_numpy(dtype=np.float64),
            labels(val, classes),
            val["lesion_id"].to_numpy(),
            params,
            rng,
            classes,
        )
        c = fits[mode]
        log.info(
            "%s: temperature %.4f, threshold %.4f (val recall %.3f, bound %.3f, specificity %.3f)",
            mode, c.temperature, c.threshold, c.val_recall, c.val_recall_lower, c.val_specificity,
        )  # fmt: skip
    return fits


def report_params(recorded: dict[str, Any], params: CalibrateParams) -> EvaluateParams:
    """The served test report's settings: the ``evaluate`` section as the bundle records it."""
    eval_p = recorded.get("evaluate", {})
    return EvaluateParams(
        bootstrap_samples=int(eval_p.get("bootstrap_samples", params.bootstrap_samples)),
        ci_level=float(eval_p.get("ci_level", params.ci_level)),
        age_bands=tuple(eval_p.get("age_bands", (30, 45, 60, 75))),
        subgroup_min_malignant=int(eval_p.get("subgroup_min_malignant", 5)),
    )


@dataclass
class ServedReport:
    """Every mode's report: ``metrics`` (keys suffixed by mode), ``per_mode``, the served test
    predictions files (``frames``) and the first mode's subgroup table."""

    metrics: dict[str, Any] = field(default_factory=dict)
    per_mode: dict[str, dict[str, Any]] = field(default_factory=dict)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    subgroups: pd.DataFrame = field(default_factory=pd.DataFrame)


def report_modes(
    fits: dict[str, Calibration],
    frames: dict[tuple[str, str], pd.DataFrame],
    served: dict[str, Served],
    params: CalibrateParams,
    eval_params: EvaluateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> ServedReport:
    """:func:`calibration_metrics` of each mode (in ``served``'s order, the first the bundle's main
    mode): ``frames`` the ensemble's (split, mode) predictions, ``served`` the bundle's answers for
    the test rows in each mode."""
    modes = tuple(served)
    out = ServedReport()
    for k, mode in enumerate(modes):
        out.frames[mode] = served[mode].frame(frames["test", modes[0]], classes)
        m, table = calibration_metrics(
            fits[mode], frames["val", mode], frames["test", mode], served[mode], params, eval_params, rng,
            classes,
        )  # fmt: skip
        if k == 0:
            out.subgroups = table
        out.per_mode[mode] = {key: json_value(v) for key, v in m.items()}
        out.metrics.update({f"{key}{mode_suffix(mode, modes)}": v for key, v in out.per_mode[mode].items()})
        log.info(
            "test, served %s: malignant recall %s, specificity %s, %s referrals/100 lesions; "
            "macro AUC %s; ECE %s -> %s",
            mode, *(fmt(m.get(key)) for key in ("test_malignant_recall", "test_specificity",
            "referrals_per_100", "macro_auc", "ece_before", "ece_after")),
        )  # fmt: skip
    return out


def write_reliability(
    folder: Path,
    test: pd.DataFrame,
    served: pd.DataFrame,
    ece: tuple[float, float],
    bins: int,
    classes: Sequence[str] = CLASSES,
) -> None:
    """``reliability/{before,after}.csv`` and ``reliability.png`` in ``folder``: the test split's
    reliability before calibration (``test``: the ensemble's logits) and as served (``served``:
    the bundle's calibrated probabilities for the same rows); ``ece``: (before, after)."""
    y_test = labels(test, classes)
    before = reliability_table(
        apply_calibration(test[logit_columns(classes)].to_numpy(dtype=np.float64), 1.0), y_test, bins
    )
    after = reliability_table(served[prob_columns(classes)].to_numpy(), y_test, bins)
    (folder / "reliability").mkdir()
    for name, t in (("before", before), ("after", after)):
        path = folder / "reliability" / f"{name}.csv"
        pd.DataFrame(t).round(6).to_csv(path, index=False, lineterminator="\n")
    reliability_plot(folder / "reliability.png", before, after, ece)


def reliability_plot(
    path: Path, before: dict[str, np.ndarray], after: dict[str, np.ndarray], ece: tuple
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for name, t, e in (("before", before, ece[0]), ("after", after, ece[1])):
        used = t["count"] > 0
        ax.plot(t["confidence"][used], t["accuracy"][used], marker="o", label=f"{name} (ECE {e:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on test, calibration fitted on val")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
