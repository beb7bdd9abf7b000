"""The ``split`` section: lesion-grouped, duplicate-aware split fractions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from skinlesion.params.schema import ParamsError, bounded


@dataclass(frozen=True)
class FractionsParams:
    train: float = bounded(0.70, lo=0.0, hi=1.0)
    val: float = bounded(0.15, lo=0.0, hi=1.0)
    test: float = bounded(0.15, lo=0.0, hi=1.0)

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamsError(f"split.fractions: train+val+test must be 1.0, got {total:g}")
        if min(self.train, self.val, self.test) <= 0:
            raise ParamsError("split.fractions: every fraction must be > 0")


@dataclass(frozen=True)
class SplitParams:
    # pHash Hamming radius for *candidate* retrieval only; candidates are verified before grouping.
    hash_radius: int = bounded(8, lo=0, hi=32)
    # Verification: best normalised cross-correlation of the two high-passed grey thumbnails
    # over flips, rotations and shifts; a pair is a duplicate at or above the threshold.
    verify_threshold: float = bounded(0.55, lo=-1.0, hi=1.0)
    # Candidates scoring below this at half resolution skip the full-resolution pass.
    verify_prefilter: float = bounded(0.3, lo=-1.0, hi=1.0)
    max_group_size: int = bounded(12, lo=1, hi=1000)
    fractions: FractionsParams = field(default_factory=FractionsParams)
    dedupe_majority_in_train: bool = False
    eval_images: Literal["all", "canonical"] = "all"
    workers: int = bounded(0, lo=0, hi=256)  # 0 = all cores
