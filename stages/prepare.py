"""Prepare stage: decode and resize every split image once into TFRecord shards.

Training reads the same images for many epochs and several backbones; decoding a 600x450 JPEG
and resizing it each time would dominate a CPU epoch. This stage does it once, in parallel:

* JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
  coefficients, so the full-size image is never built (a 600x450 original at 64 px: decoded at
  300x225, ~1.5x less time per image than a full decode + resize, on one core). The draft size is
  chosen so the final (antialiased bicubic) resize still shrinks by at least ``draft_gap``
  (Pillow's ``reducing_gap``: with a gap of 2 the result is close to a full-resolution resize;
  on the real 600x450 originals at 64x64 the mean absolute difference is below one grey level).
* All cores: images are decoded, resized, serialized and checksummed in worker processes, in
  chunks; the main process only appends finished records to the current shard. Results are
  consumed in submission order from a bounded window of chunks, so the output is deterministic
  and memory stays flat in the number of images (no image list is ever held).
* Rows are written in a fixed pseudo-random order (by a hash of ``image_id``), not in the order
  of ``split.csv``: training streams shards through a bounded shuffle buffer, which cannot mix
  a file sorted by class or lesion. The order does not depend on the input row order.

Images that cannot be decoded are never skipped: all of them are collected and reported by
name in one error (the validate stage normally stops them earlier). The record format lives in
:mod:`skinlesion.model.tfdata`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.images import PAD_COLOR, load_image
from skinlesion.core.outputs import atomic_dir, failpoint, write_json
from skinlesion.core.parallel import in_order, n_workers
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.core.splits import SPLIT_CSV, SPLITS, read_split
from skinlesion.core.tables import name_first, read_table
from skinlesion.model import tfdata
from skinlesion.params.prepare import PrepareParams
from skinlesion.params.schema import load_sections

log = logging.getLogger(__name__)

# Test hook (skinlesion.core.outputs.failpoint): "shard_open@N[:pause]" stops this stage as it opens its
# Nth shard inside the temp folder (tests/e2e/test_faults.py kills dvc repro right there).
FAILPOINT_ENV = "SKINLESION_PREPARE_FAILPOINT"

CSV_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "label", "age", "sex", "localization")
# The columns prepare reads from split.csv and from the metadata.
SPLIT_NEEDS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "split")
META_NEEDS: tuple[str, ...] = ("image_id", "age", "sex", "localization")
MAX_NAMED_FAILURES = 10
CHUNK_IMAGES = 32


# --------------------------------------------------------------------------- pure core


def ordered_rows(split_df: pd.DataFrame, meta_df: pd.DataFrame, *, split_name: str = SPLIT_CSV,
                 meta_name: str = "metadata.csv") -> pd.DataFrame:  # fmt: skip
    """Join the split rows with the metadata; check and encode; order rows for writing.

    The frames are as :func:`skinlesion.core.tables.read_table` returns them: the columns in
    :data:`SPLIT_NEEDS` and :data:`META_NEEDS` there, no image_id twice.
    Returns one row per image in train/val/test with columns ``image_id, lesion_id, dx, label,
    age (float, NaN = unknown), sex, localization, sex_idx, loc_idx, split``, grouped by split
    in :data:`skinlesion.core.splits.SPLITS` order and, within a split, ordered by a hash of ``image_id``.
    """
    rows = split_df.loc[split_df["split"].isin(SPLITS), list(SPLIT_NEEDS)]
    bad_dx = rows.loc[~rows["dx"].isin(CLASSES)]
    if len(bad_dx):
        r = bad_dx.iloc[0]
        raise StageError(
            f"{split_name}: image {r.image_id}: dx {r.dx!r} is not one of {list(CLASSES)} "
            f"({len(bad_dx)} row(s) affected)"
        )
    for s in SPLITS:
        if not (rows["split"] == s).any():
            raise StageError(f"{split_name}: no rows with split {s!r}; train, val and test are all needed")

    meta = meta_df[list(META_NEEDS)]
    df = rows.merge(meta, on="image_id", how="left", indicator=True, validate="one_to_one")
    absent = df.loc[df["_merge"] != "both", "image_id"].tolist()
    if absent:
        raise StageError(
            f"{meta_name}: no metadata row for image(s) of {split_name}: "
            + name_first(absent, MAX_NAMED_FAILURES)
        )
    df = df.drop(columns="_merge")

    age_text = df["age"].fillna("").astype(str).str.strip()
    age = pd.to_numeric(age_text.replace("", np.nan), errors="coerce")
    bad = df.loc[age.isna() & (age_text != ""), ["image_id", "age"]]
    if len(bad):
        raise StageError(
            f"{meta_name}: image {bad.iloc[0].image_id}: age {bad.iloc[0].age!r} is not a number"
        )
    df["age"] = age.astype(float)
    for col, allowed, idx_col in (("sex", SEXES, "sex_idx"), ("localization", LOCALIZATIONS, "loc_idx")):
        values = df[col].fillna("").astype(str).str.strip().replace("", "unknown")
        bad = df.loc[~values.isin(allowed)]
        if len(bad):
            raise StageError(
                f"{meta_name}: image {bad.iloc[0].image_id}: {col} {bad.iloc[0][col]!r} is not one "
                f"of {list(allowed)}"
            )
        df[col] = values
        df[idx_col] = values.map({v: i for i, v in enumerate(allowed)}).astype(int)
    df["label"] = df["dx"].map({c: i for i, c in enumerate(CLASSES)}).astype(int)

    df["_order"] = [SPLITS.index(s) for s in df["split"]]
    df["_hash"] = [hashlib.sha1(i.encode("utf-8")).hexdigest() for i in df["image_id"]]
    df = df.sort_values(["_order", "_hash", "image_id"], kind="mergesort").drop(columns=["_order", "_hash"])
    return df.reset_index(drop=True)


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of ceil(n / shard_size) shards of near-equal size."""
    k = max(1, math.ceil(n / shard_size))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


# --------------------------------------------------------------------------- workers

# A job: (path, image_id, lesion_id, label, age, sex index, localization index)
Job = tuple[str, str, str, int, float, int, int]


def encode_chunk(jobs: list[Job], size: int, aspect: str, draft_gap: float) -> tuple[list[bytes], list[str]]:
    """Worker: decode, resize, serialize and frame a chunk of images.

    Returns the framed records of the images that decoded and one message per image that did
    not. Runs in a worker process: it must not import TensorFlow.
    """
    payloads, failures = [], []
    for path, image_id, lesion_id, label, age, sex, loc in jobs:
        try:
            pixels = load_image(path, size, aspect, draft_gap)
        except Exception as e:  # any decoder error is reported by name, never skipped
            failures.append(f"{image_id} ({path}): {type(e).__name__}: {e}")
            continue
        values = {
            "image": pixels.tobytes(),
            "label": label,
            "image_id": image_id,
            "lesion_id": lesion_id,
            "age": age,
            "sex": sex,
            "localization": loc,
        }
        payloads.append(tfdata.encode_example(values))
    return tfdata.frame_records(payloads), failures


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    counts: dict[str, int]
    shards: dict[str, int]
    seconds: float


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in df.itertuples(index=False):
            age = "" if math.isnan(r.age) else f"{r.age:g}"
            w.writerow((r.image_id, r.lesion_id, r.dx, r.label, age, r.sex, r.localization))


def run(
    params: PrepareParams, *, raw_dir: str | Path, split_csv: str | Path, out_dir: str | Path
) -> PrepareResult:
    """Write ``out_dir`` (atomically): TFRecord shards, one CSV per split, manifest.json."""
    raw_dir, split_csv, out_dir = Path(raw_dir), Path(split_csv), Path(out_dir)
    t0 = time.perf_counter()
    df = ordered_rows(
        read_split(split_csv, SPLIT_NEEDS, unique=True),
        read_table(raw_dir / "metadata.csv", required=META_NEEDS, unique="image_id"),
        split_name=str(split_csv),
        meta_name=str(raw_dir / "metadata.csv"),
    )
    images = raw_dir / "images"
    size, aspect, gap = params.image_size, params.aspect, params.draft_gap
    workers = n_workers(params.workers)
    # Small chunks keep every worker busy on small sets; 32 images amortise the IPC on big ones.
    chunk = max(1, min(CHUNK_IMAGES, math.ceil(len(df) / (4 * workers))))
    by_split = {s: df[df["split"] == s].reset_index(drop=True) for s in SPLITS}
    bounds = {s: shard_bounds(len(part), params.shard_size) for s, part in by_split.items()}

    def tasks() -> Iterator[tuple[tuple[str, int], tuple[Any, ...]]]:
        # Chunks never straddle a shard: each result is tagged with the one shard it belongs to.
        for s in SPLITS:
            part = by_split[s]
            for k, (start, stop) in enumerate(bounds[s]):
                for i in range(start, stop, chunk):
                    jobs = [
                        (str(images / f"{r.image_id}.jpg"), r.image_id, r.lesion_id, int(r.label),
                         float(r.age), int(r.sex_idx), int(r.loc_idx))
                        for r in part.iloc[i : min(i + chunk, stop)].itertuples(index=False)
                    ]  # fmt: skip
                    yield (s, k), (jobs, size, aspect, gap)

    log.info(
        "preparing %d images (%s) at %dx%d, aspect=%s, %d worker(s)",
        len(df), ", ".join(f"{s}={len(p)}" for s, p in by_split.items()), size, size, aspect, workers,
    )  # fmt: skip
    failures: list[str] = []
    with atomic_dir(out_dir) as tmp:
        fh, open_key, shards_opened = None, None, 0
        try:
            with tqdm(total=len(df), unit="img", desc="prepare", mininterval=1.0) as bar:
                for key, (records, bad) in in_order(encode_chunk, tasks(), workers, window=4 * workers):
                    failures.extend(bad)
                    if not failures:  # after a failure nothing is written; decoding goes on to name all
                        if key != open_key:
                            if fh is not None:
                                fh.close()
                            split, k = key
                            fh = open(tmp / tfdata.shard_name(split, k, len(bounds[split])), "wb")  # noqa: SIM115
                            open_key = key
                            shards_opened += 1
                            failpoint(FAILPOINT_ENV, "shard_open", shards_opened)
                        fh.write(b"".join(records))
                    bar.update(len(records) + len(bad))
        finally:
            if fh is not None:
                fh.close()
        if failures:
            more = len(failures) - MAX_NAMED_FAILURES
            raise StageError(
                f"{len(failures)} of {len(df)} image(s) could not be decoded (the validate stage "
                "should have stopped them): " + "; ".join(failures[:MAX_NAMED_FAILURES])
                + (f" ... and {more} more" if more > 0 else "")
            )  # fmt: skip

        manifest: dict[str, Any] = {
            "format_version": tfdata.FORMAT_VERSION,
            "image_size": size,
            "aspect": aspect,
            "pad_color": list(PAD_COLOR),
            "resample": "bicubic",
            "draft_gap": gap,
            "classes": list(CLASSES),
            "sexes": list(SEXES),
            "localizations": list(LOCALIZATIONS),
            "features": dict(tfdata.FEATURES),
            "splits": {},
        }
        for s, part in by_split.items():
            _write_csv(tmp / f"{s}.csv", part)
            counts = part["dx"].value_counts()
            manifest["splits"][s] = {
                "n": len(part),
                "class_counts": {c: int(counts.get(c, 0)) for c in CLASSES},
                "shards": [tfdata.shard_name(s, k, len(bounds[s])) for k in range(len(bounds[s]))],
                "csv": f"{s}.csv",
            }
        write_json(tmp / tfdata.MANIFEST, manifest)

    seconds = time.perf_counter() - t0
    log.info(
        "prepared %d images in %.1f s (%.0f images/s) into %s", len(df), seconds, len(df) / seconds, out_dir
    )
    return PrepareResult(
        out_dir=out_dir,
        counts={s: len(p) for s, p in by_split.items()},
        shards={s: len(b) for s, b in bounds.items()},
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.prepare",
        description="Decode and resize every train/val/test image once (JPEG draft mode, all cores) "
        "into TFRecord shards, a CSV per split and manifest.json (format: skinlesion/model/tfdata.py).",
    )
    ap.add_argument("--params", default="params.yaml", help="params file; reads its 'prepare' section")
    ap.add_argument("--raw", required=True, help="raw data folder: metadata.csv + images/<image_id>.jpg")
    ap.add_argument("--split", required=True, help="split CSV (image_id, lesion_id, dx, split); "
                    "rows whose split is not train/val/test are skipped")  # fmt: skip
    ap.add_argument("--out", required=True, help="output folder, replaced atomically on success")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> None:
        params = load_sections(args.params, prepare=PrepareParams).prepare
        run(params, raw_dir=args.raw, split_csv=args.split, out_dir=args.out)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
