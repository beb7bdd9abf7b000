"""The ``drift`` section: the reference table, the demo batch and the monitor's drift report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from skinlesion.params.schema import ParamsError, bounded, inside_repo

# Evidently's stat tests (evidently.legacy.calculations.stattests), by column kind.
NUM_STATTESTS = (
    "wasserstein", "ks", "psi", "kl_div", "jensenshannon", "hellinger", "anderson",
    "cramer_von_mises", "mannw", "ed", "t_test", "emperical_mmd",
)  # fmt: skip
CAT_STATTESTS = (
    "jensenshannon", "chisquare", "psi", "kl_div", "hellinger", "z", "TVD", "fisher_exact", "g_test",
)  # fmt: skip


@dataclass(frozen=True)
class DriftReferenceParams:
    """The reference table ``calibrate`` stores in the bundle: changing it rebuilds the bundle."""

    split: Literal["train", "val"] = "train"
    # A seeded sample of the split keeps the bundle small and the report fast on large sets.
    max_images: int = bounded(3000, lo=50, hi=10_000_000)
    # Long side (px) of the view brightness, colour and sharpness are measured on.
    stats_size: int = bounded(128, lo=16, hi=2048)


@dataclass(frozen=True)
class DemoBatchParams:
    """The demo's batch of "new" images: the synthetic source drawn with another device profile."""

    profile: Literal["default", "clinic_b", "clinic_c"] = "clinic_b"  # download.synthetic.profile choices
    n_images: int = bounded(300, lo=7, hi=100_000)
    seed: int = bounded(7, lo=0, hi=2**31 - 1)


@dataclass(frozen=True)
class DriftParams:
    # The batch the `drift` stage checks: a folder of images (relative to the repository root,
    # or absolute), optionally with a HAM10000 metadata CSV. Only read, never written.
    new_images: str = "data/incoming/demo-clinic-b"
    reference: DriftReferenceParams = field(default_factory=DriftReferenceParams)
    # Per-feature tests (Evidently's names) and their thresholds: for the distance tests
    # (wasserstein, jensenshannon) a feature drifts when the distance is >= the threshold; for
    # p-value tests (ks, chisquare ...) when p < the threshold.
    num_method: str = "wasserstein"
    num_threshold: float = bounded(0.2, lo=0.0, hi=100.0)
    cat_method: str = "jensenshannon"
    cat_threshold: float = bounded(0.1, lo=0.0, hi=1.0)
    # dataset_drift when at least this share of the per-image features drifted (Evidently's rule).
    drift_share: float = bounded(0.5, lo=0.0, hi=1.0)
    # A single feature whose whole distribution moved by >= this many reference standard
    # deviations (normed Wasserstein distance, whatever num_method is) also flags the batch: a
    # blur or a recompression moves one or two features a lot, not half of them a little.
    alarm_threshold: float = bounded(1.0, lo=0.0, hi=1000.0)
    # Evidently's EmbeddingsDrift method on the raw embedding: model (a classifier told to tell
    # the two apart; drift when its ROC AUC >= threshold), mmd, distance or ratio.
    embedding_method: Literal["model", "mmd", "distance", "ratio"] = "model"
    embedding_threshold: float = bounded(0.6, lo=0.0, hi=1.0)
    pca_components: int = bounded(5, lo=0, hi=64)  # embedding PCA components in the per-feature report
    max_pixels: int = bounded(40_000_000, lo=1_000, hi=1_000_000_000)  # refused from the header above
    workers: int = bounded(0, lo=0, hi=256)  # 0 = all cores
    # Every check is also a snapshot in this local Evidently workspace (`evidently ui --workspace`).
    workspace: str = "evidently_workspace"
    project: str = "skin-lesion drift"
    # The monitor flow: batches (sub-folders) dropped here are checked once each.
    inbox: str = "data/inbox"
    monitor_state: str = "data/monitor"
    # On drift the monitor emits skinlesion.drift.detected; false marks the event so the retrain
    # deployment's trigger ignores it (the check and its report still happen).
    trigger_retrain: bool = True
    demo_batch: DemoBatchParams = field(default_factory=DemoBatchParams)

    def __post_init__(self) -> None:
        if self.num_method not in NUM_STATTESTS:
            raise ParamsError(f"drift.num_method: {self.num_method!r} is not one of {list(NUM_STATTESTS)}")
        if self.cat_method not in CAT_STATTESTS:
            raise ParamsError(f"drift.cat_method: {self.cat_method!r} is not one of {list(CAT_STATTESTS)}")
        if not self.new_images:
            raise ParamsError("drift.new_images: empty; give the folder of new images to check")
        for key in ("workspace", "monitor_state"):
            inside_repo(f"drift.{key}", getattr(self, key))
