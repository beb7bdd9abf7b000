"""The whole ``params.yaml`` with its cross-section rules: for flows, tools and tests (a DVC stage
reads only its own sections, :func:`skinlesion.params.schema.load_sections`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinlesion.params.base import BaseParams
from skinlesion.params.calibrate import CalibrateParams
from skinlesion.params.download import DownloadParams
from skinlesion.params.drift import DriftParams
from skinlesion.params.ensemble import EnsembleParams, check_members_trained
from skinlesion.params.evaluate import EvaluateParams
from skinlesion.params.prepare import PrepareParams
from skinlesion.params.promote import PromoteParams
from skinlesion.params.schema import ParamsError, build_section, read_params_file
from skinlesion.params.split import SplitParams
from skinlesion.params.train import TrainParams
from skinlesion.params.validate import ValidateParams

__all__ = ["Params", "ParamsError", "load_params", "parse_params"]


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    split: SplitParams = field(default_factory=SplitParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    drift: DriftParams = field(default_factory=DriftParams)
    promote: PromoteParams = field(default_factory=PromoteParams)

    def __post_init__(self) -> None:
        check_members_trained(self.ensemble, self.train.backbones)


def parse_params(raw: dict[str, Any] | None) -> Params:
    """Build :class:`Params` from an already-parsed mapping (tests feed dicts directly)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params: expected a mapping at the top level, got {type(raw).__name__}")
    return build_section(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole ``params.yaml``; raise :class:`ParamsError` naming the bad key."""
    raw = read_params_file(path)
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
