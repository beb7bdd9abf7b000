"""The ``ensemble`` section: members and how their weights are fitted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from skinlesion.params.schema import ParamsError


@dataclass(frozen=True)
class EnsembleParams:
    members: tuple[str, ...] = ("mobilenetv2", "custom_cnn")
    # equal | fitted (weights on the simplex minimising validation log-loss; test never used)
    weights: Literal["equal", "fitted"] = "fitted"

    def __post_init__(self) -> None:
        if not self.members:
            raise ParamsError("ensemble.members: list at least one member")
        if len(set(self.members)) != len(self.members):
            raise ParamsError(f"ensemble.members: listed twice: {list(self.members)}")


def check_members_trained(ensemble: EnsembleParams, backbones: tuple[str, ...]) -> None:
    """Every ensemble member must be a trained backbone (a rule across two sections)."""
    unknown = set(ensemble.members) - set(backbones)
    if unknown:
        raise ParamsError(f"ensemble.members: {sorted(unknown)} not in train.backbones {list(backbones)}")
