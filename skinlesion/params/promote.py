"""The ``promote`` section: the retrain flow's promotion gate (no DVC stage reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from skinlesion.params.schema import bounded


@dataclass(frozen=True)
class PromoteParams:
    """The retrain flow's promotion gate (flows/gate.py). No DVC stage reads this section, so
    changing it reruns nothing."""

    # The candidate may lose at most this much malignant_auc and macro_auc against production;
    # a negative value demands an improvement of at least that much.
    max_auc_drop: float = bounded(0.01, lo=-1.0, hi=1.0)
    # The test malignant recall a candidate must reach; null = calibrate.target_recall (the
    # recall the threshold was tuned for on val).
    min_test_recall: float | None = bounded(None, lo=0.0, hi=1.0)
    # In a git repository: commit the pipeline record (dvc.lock, params, metrics,
    # models/production.dvc) and tag it model-<UTC time>, so `dvc metrics diff <tag>` works.
    git_tag: bool = True
