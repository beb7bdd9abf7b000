"""The ``validate`` section: what the data suites accept."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from skinlesion.core.schema import CLASSES, DX_TYPES, LOCALIZATIONS, SEXES
from skinlesion.params.schema import ParamsError, bounded


@dataclass(frozen=True)
class ValidateParams:
    image_id_pattern: str = r"^ISIC_\d{7}$"
    min_class_count: int = bounded(5, lo=0, hi=1_000_000)
    on_image_error: Literal["fail", "quarantine"] = "fail"
    on_non_rgb: Literal["convert", "reject"] = "convert"
    # A PNG (or other non-JPEG) named .jpg: convert = accept it (prepare decodes by content and
    # converts to RGB); reject = a failing image, like a grayscale one under on_non_rgb: reject.
    on_non_jpeg: Literal["convert", "reject"] = "convert"
    # The allowed metadata values; empty sex/localization are allowed (prepare reads "unknown").
    classes: tuple[str, ...] = CLASSES
    dx_types: tuple[str, ...] = DX_TYPES
    sexes: tuple[str, ...] = SEXES
    localizations: tuple[str, ...] = LOCALIZATIONS
    min_side: int = bounded(32, lo=1, hi=100_000)
    max_side: int = bounded(8192, lo=1, hi=100_000)
    # 100 MP; at most 1 GP: a larger cap would let one header allocate gigabytes (a bomb)
    max_pixels: int = bounded(100_000_000, lo=1, hi=1_000_000_000)
    fraction_tolerance: float = bounded(0.05, lo=0.0, hi=1.0)
    workers: int = bounded(0, lo=0, hi=256)

    def __post_init__(self) -> None:
        try:
            re.compile(self.image_id_pattern)
        except re.error as e:
            raise ParamsError(f"validate.image_id_pattern: not a valid regex: {e}") from None
        if self.min_side > self.max_side:
            raise ParamsError("validate.min_side must be <= validate.max_side")
        for name in ("classes", "dx_types", "sexes", "localizations"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ParamsError(f"validate.{name}: list each value once, at least one")
