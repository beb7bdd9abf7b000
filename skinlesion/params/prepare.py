"""The ``prepare`` section: image size, aspect handling, shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from skinlesion.params.schema import bounded


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = bounded(64, lo=16, hi=1024)
    aspect: Literal["pad", "crop"] = "crop"
    shard_size: int = bounded(2048, lo=1, hi=1_000_000)  # images per TFRecord shard
    # JPEG draft decoding keeps the final resampling step >= this factor (Pillow's reducing_gap):
    # 1 is fastest, 2 is close to a full-resolution resize, >= 3 indistinguishable from it.
    draft_gap: float = bounded(2.0, lo=1.0, hi=16.0)
    workers: int = bounded(0, lo=0, hi=256)  # 0 = all cores
