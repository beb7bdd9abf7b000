"""Split stage: duplicate-aware, lesion-grouped, class-stratified train/val/test split.

Leakage is the protocol error that makes most published HAM10000 numbers meaningless: several
images of one lesion, or one lesion catalogued under two ``lesion_id`` values, landing on both
sides of a split. So:

1. Every image gets a pHash and a grey thumbnail; hash candidates within ``split.hash_radius``
   are verified by their aligned fine structure (:mod:`skinlesion.checks.duplicates`).
2. Union-find joins the ``lesion_id`` groups, then verified pairs (strongest first), refusing a
   merge past ``split.max_group_size`` images or across two diagnoses; the groups go to splits
   per class, seeded, so every class is in every split with near-whole proportions
   (:mod:`skinlesion.checks.leakage`).
3. An independent check on the files written proves that no group, lesion or joined duplicate
   pair straddles two splits; otherwise the stage fails and writes nothing.

Outputs (``--out``): ``split.csv`` (the contract: :mod:`skinlesion.core.splits`; image_id,
lesion_id, group_id, dx, split, assigned_split; sorted by image_id). ``split`` is
``train``/``val``/``test``, or ``dropped`` for an image an option removed
(``dedupe_majority_in_train``, ``eval_images: canonical``); ``assigned_split`` is the split of
its group in every row. ``duplicates.csv`` lists every verified pair; ``undecodable.csv``
every image that could not be read (a missing file included), each of which stays in its
lesion's group and is split like any other (the validate stage decides what to do with it).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.checks.duplicates import HASH_CHUNK, compute_features, near_pairs, score_candidates
from skinlesion.checks.leakage import leakage, split_dataset
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import n_workers, process_pool
from skinlesion.core.schema import CLASSES
from skinlesion.core.splits import (
    COLUMNS,
    DROPPED,
    DUPLICATES_CSV,
    SPLIT_CSV,
    SPLITS,
    UNDECODABLE_CSV,
    read_split,
)
from skinlesion.core.tables import read_table
from skinlesion.params.base import BaseParams
from skinlesion.params.schema import load_sections
from skinlesion.params.split import SplitParams

log = logging.getLogger(__name__)


def _plot(split: pd.DataFrame, plots_dir: Path) -> None:
    """Class distribution per split: a PNG and a CSV (split, dx, count, share, class_split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = split[split["split"] != DROPPED]
    classes = list(CLASSES) + sorted(set(kept["dx"]) - set(CLASSES))
    table = kept.groupby(["split", "dx"]).size().unstack(fill_value=0)
    table = table.reindex(index=list(SPLITS), columns=classes, fill_value=0)
    shares = table.div(table.sum(1).replace(0, 1), axis=0)
    # ``class_split`` ("mel val") is the label dvc plots draws one bar per (class, split) with;
    # sorted alphabetically it puts a class's three splits side by side.
    rows = [
        {
            "split": s,
            "dx": c,
            "count": int(table.loc[s, c]),
            "share": round(float(shares.loc[s, c]), 4),
            "class_split": f"{c} {s}",
        }
        for s in SPLITS
        for c in classes
    ]
    pd.DataFrame(rows).to_csv(plots_dir / "class_distribution.csv", index=False, lineterminator="\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(classes))
    for k, s in enumerate(SPLITS):
        ax.bar(x + (k - 1) * 0.27, shares.loc[s], 0.27, label=f"{s} (n={int(table.loc[s].sum())})")
    ax.set_xticks(x, classes)
    ax.set_ylabel("share of the split's images")
    ax.set_title("Class distribution per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "class_distribution.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class SplitResult:
    split: pd.DataFrame
    duplicates: pd.DataFrame
    metrics: dict
    seconds: dict[str, float] = field(default_factory=dict)


def run(
    params: SplitParams,
    *,
    seed: int,
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
) -> SplitResult:
    raw_dir, out_dir, plots_dir = Path(raw_dir), Path(out_dir), Path(plots_dir)
    meta = read_table(
        raw_dir / "metadata.csv",
        required=("image_id", "lesion_id", "dx"),
        unique="image_id",
        hint="run the download stage first",
    )
    # Rows in image_id order: the split must not depend on the order the sources listed them in.
    meta = meta.sort_values("image_id", kind="stable").reset_index(drop=True)
    paths = [raw_dir / "images" / f"{i}.jpg" for i in meta["image_id"]]
    rng = np.random.default_rng(seed)
    seconds: dict[str, float] = {}
    workers = min(n_workers(params.workers), max(1, math.ceil(len(paths) / HASH_CHUNK)))
    # One pool for both passes: hashing, then verifying the candidates it finds.
    with process_pool(workers, [compute_features.__module__]) as pool:
        t0 = time.perf_counter()
        feats = compute_features(paths, pool)
        seconds["hash"] = time.perf_counter() - t0
        for i, err in sorted(feats.errors.items()):
            log.warning("%s: %s (kept in its lesion group; listed in undecodable.csv)", paths[i], err)

        t0 = time.perf_counter()
        good = np.flatnonzero(feats.ok)
        pairs, dist = near_pairs(feats.hashes[good], params.hash_radius)
        pairs = good[pairs]
        seconds["search"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = score_candidates(feats.thumbs, pairs, params.verify_prefilter, pool)
        seconds["verify"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tables = split_dataset(
        meta, feats, params, rng, n_candidates=len(pairs), pairs=pairs, dist=dist, scores=scores
    )
    und = pd.DataFrame(
        {"image_id": meta["image_id"].to_numpy()[sorted(feats.errors)],
         "error": [feats.errors[i] for i in sorted(feats.errors)]}
    )  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        tables.split.to_csv(tmp / SPLIT_CSV, columns=list(COLUMNS), index=False, lineterminator="\n")
        tables.duplicates.to_csv(tmp / DUPLICATES_CSV, index=False, lineterminator="\n")
        und.to_csv(tmp / UNDECODABLE_CSV, index=False, lineterminator="\n")
        # The guarantee is checked on the files as written, by code that shares nothing with
        # the assignment: a bug there fails the stage instead of leaking.
        leaks = leakage(read_split(tmp / SPLIT_CSV, COLUMNS), read_table(tmp / DUPLICATES_CSV))
        if leaks["leaking_groups"]:
            raise StageError(f"split: leakage across splits {leaks}; this is a bug, please report it")
    metrics = {**tables.metrics, **leaks}
    with atomic_dir(plots_dir) as tmp:
        _plot(tables.split, tmp)
    write_json(metrics_path, metrics)
    seconds["split_and_write"] = time.perf_counter() - t0
    m = metrics
    log.info(
        "split: %d images, %d groups (largest %d), %d undecodable; %d candidate pairs, %d verified "
        "(%d cross-lesion, %d cross-diagnosis, %d refused); same-lesion recall %.3f; "
        "train/val/test %d/%d/%d; %s",
        m["n_images"], m["n_groups"], m["largest_group"], m["n_undecodable"], m["n_candidate_pairs"],
        m["n_near_duplicate_pairs"], m["n_cross_lesion_duplicate_pairs"],
        m["n_cross_diagnosis_duplicate_pairs"],
        m["n_merges_refused_size"] + m["n_merges_refused_diagnosis"], m["same_lesion_pair_recall"],
        m["train_n"], m["val_n"], m["test_n"],
        ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
    )  # fmt: skip
    return SplitResult(tables.split, tables.duplicates, metrics, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.split",
        description="Group images by lesion_id and verified near-duplicates, then split the groups "
        "into train/val/test stratified by diagnosis (params: split.*, base.seed).",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)"
    )
    ap.add_argument("--raw", type=Path, required=True, help="download output: metadata.csv + images/")
    ap.add_argument(
        "--out", type=Path, required=True, help="folder for split.csv, duplicates.csv, undecodable.csv"
    )
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--plots", type=Path, required=True, help="folder for the class-distribution PNG and CSV")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        p = load_sections(args.params, base=BaseParams, split=SplitParams)
        run(p.split, seed=p.base.seed, raw_dir=args.raw, out_dir=args.out, metrics_path=args.metrics,
            plots_dir=args.plots)  # fmt: skip
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
