"""The ``base`` section: what every stage that draws randomness shares."""

from __future__ import annotations

from dataclasses import dataclass

from skinlesion.params.schema import bounded


@dataclass(frozen=True)
class BaseParams:
    seed: int = bounded(42, lo=0, hi=2**31 - 1)
