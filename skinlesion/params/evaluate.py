"""The ``evaluate`` section: how members are scored on val/test."""

from __future__ import annotations

from dataclasses import dataclass

from skinlesion.params.schema import ParamsError, bounded


@dataclass(frozen=True)
class EvaluateParams:
    # Lesion-level bootstrap replicates for the 95% CIs (0 = no CIs).
    bootstrap_samples: int = bounded(1000, lo=0, hi=100_000)
    ci_level: float = bounded(0.95, lo=0.5, hi=0.999)
    tta: bool = False  # average over the 4 flips (none, left-right, up-down, both)
    batch_size: int = bounded(64, lo=1, hi=4096)
    # Upper-exclusive edges of the age bands of the subgroup report: [30, 45] -> <30, 30-44, 45+.
    age_bands: tuple[int, ...] = (30, 45, 60, 75)
    # A subgroup is a candidate for "worst subgroup" only with at least this many malignant cases.
    subgroup_min_malignant: int = bounded(5, lo=1, hi=1_000_000)

    def __post_init__(self) -> None:
        if list(self.age_bands) != sorted(set(self.age_bands)):
            raise ParamsError(f"evaluate.age_bands: must be strictly increasing, got {list(self.age_bands)}")
