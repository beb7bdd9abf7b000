"""Train stage (``train@<backbone>``): one classifier per backbone from the prepared shards.

Reads ``data/prepared`` (TFRecord shards + manifest, see :mod:`skinlesion.model.tfdata`) and writes, for one
backbone:

* ``<out>/model.keras`` — takes raw uint8 RGB (augmentation and the family's preprocessing are
  inside), loads with ``safe_mode=True`` once :mod:`skinlesion.model.networks` is imported;
* ``<out>/config.json`` (everything the run was built from), ``<out>/history.csv`` / ``.json``;
* ``<metrics>`` — flat JSON for ``dvc metrics``: best val macro AUC / F1, epochs, wall time,
  images/s, which weights were used;
* ``<live>/`` — DVCLive per-epoch metrics and plots (``dvc plots``, :mod:`skinlesion.model.live`);
* ``<backup>/`` — the resume point a killed run continues from (:mod:`skinlesion.model.resume`);
  after a successful run it holds only a DONE marker.

Training runs in phases (:mod:`skinlesion.model.phases`): the new head alone on a frozen pretrained
backbone, then fine-tuning phases with more of the backbone unfrozen; the kept weights are those of
the best epoch by ``train.common.monitor``. :func:`run` reads as its parts, each in
:mod:`skinlesion.model.training`: build the model and data, find the resume point, fit each phase,
write the outputs. ``<out>`` is replaced atomically at the very end, so a failed or killed run
leaves the previous model untouched. Under ``train.strategy: multi_worker`` only the chief writes
the outputs (:mod:`skinlesion.model.workers`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.model.live import live_log, open_live
from skinlesion.model.resume import Backup
from skinlesion.model.traindata import read_prepared
from skinlesion.model.training import build_job, fit_phase, resume_point, write_outputs
from skinlesion.model.workers import worker_paths
from skinlesion.params.base import BaseParams
from skinlesion.params.schema import load_sections
from skinlesion.params.train import TrainParams

__all__ = ["TrainResult", "main", "run"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`run` did: the model written, its metrics and history, where it resumed."""

    backbone: str
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int
    chief: bool = True  # False: a non-chief worker, whose outputs went to a deleted temp folder


def run(
    params: TrainParams,
    *,
    backbone: str,
    prepared: Path,
    out: Path,
    metrics: Path,
    live: Path | None = None,
    backup: Path | None = None,
    seed: int = 42,
) -> TrainResult:
    """Train ``backbone`` on ``prepared``; write the model folder, metrics and DVCLive logs."""
    t_start = time.perf_counter()
    prepared, out, metrics = Path(prepared), Path(out), Path(metrics)
    backup = Path(backup) if backup is not None else out.with_name(out.name + ".ckpt")
    if backbone not in params.backbones:
        raise StageError(f"train.backbones: {backbone!r} is not listed ({list(params.backbones)})")
    from skinlesion.model.distribute import visible_gpus

    visible_gpus(params.device)  # a GPU run without a GPU stops here, before any data is read
    job = build_job(params, backbone, read_prepared(prepared), seed)
    # configure_runtime (in build_job) has checked TF_CONFIG already.
    tf_config = json.loads(os.environ["TF_CONFIG"]) if job.multi else None
    with worker_paths(tf_config, out=out, metrics=metrics, live=live, backup=backup) as where:
        store = Backup(where.backup)
        state = store.load_or_new(job.fingerprint)
        pending, resumed_from = resume_point(job, state, store)
        live_logger = open_live(where.live)
        for row in state.history:  # replay, so the DVCLive curves cover the whole training
            live_log(live_logger, row)
        for phase in pending:
            fit_phase(job, phase, state, store, live_logger)
        summary = write_outputs(job, state, store, where, live_logger, resumed_from, t_start)
    return TrainResult(backbone, out / "model.keras", summary, list(state.history), resumed_from, where.chief)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.train",
        description="Train one backbone's classifier on the prepared shards (DVC stage train@<backbone>).",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)"
    )
    ap.add_argument("--backbone", required=True, help="one of train.backbones, e.g. mobilenetv2")
    ap.add_argument("--prepared", type=Path, required=True, help="prepared folder (manifest.json + shards)")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write (replaced atomically)")
    ap.add_argument("--metrics", type=Path, required=True, help="flat metrics JSON to write")
    ap.add_argument("--live", type=Path, default=None, help="DVCLive folder for per-epoch metrics and plots")
    ap.add_argument(
        "--backup", type=Path, default=None,
        help="resume folder kept across killed runs (default: <out>.ckpt next to --out)",
    )  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def body() -> int:
        p = load_sections(args.params, base=BaseParams, train=TrainParams)
        run(
            p.train,
            backbone=args.backbone,
            prepared=args.prepared,
            out=args.out,
            metrics=args.metrics,
            live=args.live,
            backup=args.backup,
            seed=p.base.seed + p.train.seed_offset,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
