"""Paired comparison of two bundles' answers on the same images (NumPy only).

Two runs are compared on the images both scored, lesion by lesion: each bootstrap replicate
draws lesions with replacement and measures *both* runs on that draw, so the CI is of the
difference B - A and the variation of the test images themselves cancels out. The headline
metrics are the few numbers a user compares runs by; ``metrics/headline.json`` holds them.

A served frame is what the calibrate stage writes to ``data/served/test*.csv`` (and
``serve.evaluate`` could): ``image_id``, ``lesion_id``, ``dx``, ``prob_<class>``, ``refer`` and
``predicted``, one row per image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import (
    balanced_accuracy,
    binary_auc,
    lesion_bootstrap_indices,
    macro_auc,
    malignant_score,
    malignant_truth,
    operating_point,
    percentile_ci,
)

# The headline of one input mode, in the order they are shown. The served test metrics of
# metrics/calibration.json under the same names (image-only mode: the same names + "_image_only").
HEADLINE_KEYS: tuple[str, ...] = (
    "macro_auc",
    "malignant_auc",
    "test_malignant_recall",
    "test_specificity",
    "referrals_per_100",
    "balanced_accuracy_decision",
    "ece_after",
)
# The ones a paired bootstrap measures from a served frame (ECE needs no pairing to be read,
# and its bootstrap is dominated by the binning).
PAIRED_KEYS: tuple[str, ...] = HEADLINE_KEYS[:-1]
# Larger is better for all but these.
LOWER_IS_BETTER: frozenset[str] = frozenset({"ece_after", "referrals_per_100"})


def headline(calibration: Mapping[str, Any], suffixes: Sequence[str] = ("",)) -> dict[str, Any]:
    """The headline subset of the calibrate stage's metrics (at most 15 keys: 7 per mode)."""
    return {k + s: calibration.get(k + s) for s in suffixes for k in HEADLINE_KEYS}


def served_statistics(frame: pd.DataFrame, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """:data:`PAIRED_KEYS` of one served frame, as the calibrate stage defines them: AUCs from the
    calibrated probabilities, recall/specificity/referrals from each row's own ``refer`` flag,
    balanced accuracy of the bundle's ``predicted`` class."""
    return _statistics(_Arrays.of(frame, classes))


@dataclass(frozen=True)
class _Arrays:
    y: np.ndarray
    probs: np.ndarray
    refer: np.ndarray
    predicted: np.ndarray
    lesions: np.ndarray
    k: int

    @staticmethod
    def of(frame: pd.DataFrame, classes: Sequence[str]) -> _Arrays:
        index = {c: i for i, c in enumerate(classes)}
        return _Arrays(
            y=frame["dx"].map(index).to_numpy(np.int64),
            probs=frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64),
            refer=_as_bool(frame["refer"]),
            predicted=frame["predicted"].map(index).fillna(-1).to_numpy(np.int64),
            lesions=frame["lesion_id"].astype(str).to_numpy(),
            k=len(classes),
        )

    def take(self, idx: np.ndarray) -> _Arrays:
        return _Arrays(
            self.y[idx], self.probs[idx], self.refer[idx], self.predicted[idx], self.lesions[idx], self.k
        )


def _as_bool(col: pd.Series) -> np.ndarray:
    if col.dtype == bool:
        return col.to_numpy()
    return col.astype(str).str.strip().str.lower().isin(("true", "1")).to_numpy()


def _statistics(a: _Arrays) -> dict[str, float]:
    mal = malignant_truth(a.y)
    # the flag is the row's own refer (each row against its mode's threshold), as calibrate counts it
    op = operating_point(mal, a.refer.astype(np.float64), 0.5, a.lesions)
    return {
        "macro_auc": macro_auc(a.y, a.probs),
        "malignant_auc": binary_auc(mal, malignant_score(a.probs)),
        "test_malignant_recall": op["recall"],
        "test_specificity": op["specificity"],
        "referrals_per_100": op["referrals_per_100"],
        "balanced_accuracy_decision": balanced_accuracy(a.y, a.predicted, a.k),
    }


@dataclass(frozen=True)
class PairedDiff:
    """One metric of a paired comparison: A, B, B - A and the percentile CI of B - A."""

    key: str
    a: float
    b: float
    diff: float
    lo: float
    hi: float

    def ci_excludes_zero(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)

    def significant(self, band: float | None) -> bool:
        """Beyond chance on these images (the CI excludes 0) *and* beyond the run-to-run noise
        of training (``band``, from ``make noise``; None: not measured, the CI alone decides)."""
        return self.ci_excludes_zero() and (band is None or abs(self.diff) > band)

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass(frozen=True)
class Pairing:
    """The images two served frames have in common, aligned row by row."""

    a: pd.DataFrame
    b: pd.DataFrame
    only_a: int  # images only A scored
    only_b: int

    @property
    def n_images(self) -> int:
        return len(self.a)

    @property
    def n_lesions(self) -> int:
        return int(self.b["lesion_id"].nunique())


def pair(a: pd.DataFrame, b: pd.DataFrame) -> Pairing:
    """Align two served frames on ``image_id``; the truth (``dx``) must agree on every common image."""
    common = pd.Index(a["image_id"]).intersection(pd.Index(b["image_id"]), sort=False)
    a2 = a.set_index("image_id").loc[common].reset_index()
    b2 = b.set_index("image_id").loc[common].reset_index()
    clash = (a2["dx"].to_numpy() != b2["dx"].to_numpy()).nonzero()[0]
    if clash.size:
        first = a2["image_id"].iloc[clash[0]]
        raise ValueError(
            f"{clash.size} common images have another label in the two runs (first: {first}, "
            f"{a2['dx'].iloc[clash[0]]} vs {b2['dx'].iloc[clash[0]]}): not the same test images"
        )
    return Pairing(a2, b2, only_a=len(a) - len(common), only_b=len(b) - len(common))


def paired_bootstrap(
    pairing: Pairing,
    *,
    n_samples: int,
    rng: np.random.Generator,
    level: float = 0.95,
    classes: Sequence[str] = CLASSES,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> dict[str, PairedDiff]:
    """:data:`PAIRED_KEYS` of A and B on the paired images, with the lesion-bootstrap CI of B - A.

    Replicates where a difference is undefined (a class not drawn) are skipped for that key."""
    if pairing.n_images == 0:
        raise ValueError("the two runs have no test image in common")
    arr_a, arr_b = _Arrays.of(pairing.a, classes), _Arrays.of(pairing.b, classes)
    point_a, point_b = _statistics(arr_a), _statistics(arr_b)
    draws: dict[str, list[float]] = {k: [] for k in PAIRED_KEYS}
    it = lesion_bootstrap_indices(pairing.b["lesion_id"].to_numpy(), n_samples, rng)
    for idx in progress(it) if progress is not None else it:
        sa, sb = _statistics(arr_a.take(idx)), _statistics(arr_b.take(idx))
        for k in PAIRED_KEYS:
            draws[k].append(sb[k] - sa[k])
    out = {}
    for k in PAIRED_KEYS:
        lo, hi = percentile_ci(draws[k], level)
        out[k] = PairedDiff(k, point_a[k], point_b[k], point_b[k] - point_a[k], lo, hi)
    return out
