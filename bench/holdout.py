"""Carve an external-validation hold-out out of a HAM10000 folder, before any training.

A model trained with ``make real DATA=OUT/pool`` has never seen a lesion of ``OUT/external``: not
in its train, val or test split, not under another ``lesion_id`` (a near-duplicate picture of it).
So ``OUT/external`` measures the model on new lesions, the way a clinic's next batch would.

The grouping is the split stage's, called the same way (:mod:`skinlesion.checks.leakage`, the defaults of
:class:`skinlesion.params.split.SplitParams`): the source is imported with the download stage's public
reader (:func:`skinlesion.sources.local.import_folder`), every image gets its pHash and thumbnail, hash
candidates are verified, and union-find joins each ``lesion_id`` group with its verified
near-duplicates. Whole groups are held out, stratified by the group's diagnosis (its majority
dx, as the split stage stratifies): within each dx the groups are ordered by
``sha256(f"{seed}:{smallest image_id of the group}")`` and the first ``round(fraction * n)`` are
held out. The order depends only on the seed and the group, not on the row order or the other
groups, so adding images to the source leaves every other group's side unchanged.

Writes (``--out``, refused when it exists and is not empty; replaced in one rename on success):

* ``pool/`` and ``external/``: HAM10000 layout, ``HAM10000_metadata.csv`` (the source's rows in the
  source's order, filtered; written as the download stage writes ``data/raw/metadata.csv``) and
  ``images/<image_id>.jpg`` (real files, the bytes the download stage would import);
* ``holdout.json``: how the hold-out was chosen (seed, fraction, grouping params, the source, the
  near-duplicate merges) and the counts per part and dx, with the md5 of each metadata csv.

    python -m bench.holdout --data ../shared/data/ham10000 --out /work/holdout --fraction 0.08 --seed 19
    make real DATA=/work/holdout/pool
    python -m serve.evaluate /work/holdout/external
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion.checks import duplicates
from skinlesion.checks.duplicates import HASH_CHUNK, compute_features, near_pairs, score_candidates
from skinlesion.checks.leakage import build_groups
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import n_workers, process_pool
from skinlesion.core.schema import CLASSES, HAM_COLUMNS, MALIGNANT
from skinlesion.core.tables import name_first, read_table
from skinlesion.params.split import SplitParams
from skinlesion.sources.local import import_folder, write_metadata_csv

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTS = ("pool", "external")
METADATA_NAME = "HAM10000_metadata.csv"
# The split params that decide the groups (the rest are about train/val/test).
GROUPING_KEYS = ("hash_radius", "verify_threshold", "verify_prefilter", "max_group_size")
# Below this many groups of a class the split stage refuses to split the pool.
MIN_GROUPS_TO_SPLIT = 3


# --------------------------------------------------------------------------- core


@dataclass(frozen=True)
class Grouping:
    group_id: np.ndarray  # (N,) dense ids, in order of each group's smallest image_id
    stats: dict[str, int]  # candidate and verified pairs, merges across lesion ids, refusals
    joined_pairs: list[tuple[str, str]]  # verified pairs that were joined (image ids)


def group_rows(
    image_ids: np.ndarray,
    lesions: np.ndarray,
    dx: np.ndarray,
    pairs: np.ndarray,
    scores: np.ndarray,
    params: SplitParams,
) -> Grouping:
    """The split stage's groups: ``lesion_id`` joined with verified near-duplicate ``pairs``.

    Rows must be sorted by image_id (as the split stage sorts them), so a group's id follows its
    smallest image_id and does not depend on the order the source listed its rows in."""
    verified = np.nan_to_num(scores, nan=-1.0) >= params.verify_threshold
    vp, vs = pairs[verified], scores[verified]
    roots, refused = build_groups(lesions, dx, vp, vs, params.max_group_size)
    for (a, b), why in zip(vp.tolist(), refused, strict=True):
        if why:
            log.warning("duplicate pair %s ~ %s not joined (%s)", image_ids[a], image_ids[b], why)
    group_id = pd.factorize(roots)[0]
    lesions_per_group = pd.Series(lesions).groupby(group_id).nunique()
    joined = [(a, b) for (a, b), why in zip(vp.tolist(), refused, strict=True) if not why]
    stats = {
        "n_lesions": int(pd.Series(lesions).nunique()),
        "n_groups": int(len(lesions_per_group)),
        "n_candidate_pairs": len(pairs),
        "n_verified_pairs": len(vp),
        "n_joined_pairs_across_lesions": int(sum(lesions[a] != lesions[b] for a, b in joined)),
        # how many lesion_id groups disappeared into another: n_lesions - n_groups
        "n_lesion_groups_joined": int((lesions_per_group - 1).sum()),
        "n_groups_of_several_lesions": int((lesions_per_group > 1).sum()),
        "n_merges_refused_size": refused.count("size"),
        "n_merges_refused_diagnosis": refused.count("diagnosis"),
    }
    return Grouping(group_id, stats, [(str(image_ids[a]), str(image_ids[b])) for a, b in joined])


def group_table(image_ids: np.ndarray, dx: np.ndarray, group_id: np.ndarray) -> pd.DataFrame:
    """One row per group (index group_id): its dx (the majority, ties to the first class name,
    as the split stage decides it), its image count and its smallest image_id."""
    frame = pd.DataFrame({"group_id": group_id, "dx": dx, "image_id": image_ids})
    counts = frame.groupby(["group_id", "dx"]).size().unstack(fill_value=0)
    return pd.DataFrame(
        {
            "dx": counts.idxmax(axis=1),
            "n": counts.sum(1),
            "first_image_id": frame.groupby("group_id")["image_id"].min(),
        }
    )


def holdout_key(seed: int, first_image_id: str) -> str:
    """A group's place in the hold-out order: a hash of the seed and the group's smallest id."""
    return hashlib.sha256(f"{seed}:{first_image_id}".encode()).hexdigest()


def n_to_hold(n_groups: int, fraction: float) -> int:
    """``fraction`` of ``n_groups``, rounded half up: within half a group of the target."""
    return math.floor(n_groups * fraction + 0.5)


def choose_external(groups: pd.DataFrame, fraction: float, seed: int) -> set[int]:
    """The group ids held out: per dx, the first ``n_to_hold`` groups in :func:`holdout_key`
    order (``groups`` as :func:`group_table` returns it)."""
    held: set[int] = set()
    for _dx, g in groups.groupby("dx", sort=True):
        keys = g["first_image_id"].map(lambda i: holdout_key(seed, i))
        order = g.assign(_key=keys).sort_values(["_key", "first_image_id"])
        held.update(int(x) for x in order.index[: n_to_hold(len(g), fraction)])
    return held


def part_counts(meta: pd.DataFrame, group_of: pd.Series) -> dict:
    """Images, lesions and groups per dx of one part (``meta`` rows, ``group_of`` image_id ->
    group_id), and the malignant (mel + bcc + akiec) totals."""
    groups = meta["image_id"].map(group_of)
    classes = list(CLASSES) + sorted(set(meta["dx"]) - set(CLASSES))
    per_dx = {
        c: {
            "images": int((meta["dx"] == c).sum()),
            "lesions": int(meta.loc[meta["dx"] == c, "lesion_id"].nunique()),
            "groups": int(groups[meta["dx"] == c].nunique()),
        }
        for c in classes
    }
    malignant = meta["dx"].isin(MALIGNANT)
    return {
        "n_images": len(meta),
        "n_lesions": int(meta["lesion_id"].nunique()),
        "n_groups": int(groups.nunique()),
        "n_malignant_images": int(malignant.sum()),
        "n_malignant_lesions": int(meta.loc[malignant, "lesion_id"].nunique()),
        "per_dx": per_dx,
    }


def crossings(pool: pd.DataFrame, external: pd.DataFrame, joined_pairs: Sequence[tuple[str, str]]) -> dict:
    """Independent check on the two metadata tables as written: lesion ids and joined duplicate
    pairs found on both sides (both must be 0)."""
    side = {**dict.fromkeys(pool["image_id"], "pool"), **dict.fromkeys(external["image_id"], "external")}
    return {
        "lesions_in_both": len(set(pool["lesion_id"]) & set(external["lesion_id"])),
        "image_ids_in_both": len(set(pool["image_id"]) & set(external["image_id"])),
        "duplicate_pairs_across": sum(side.get(a) != side.get(b) for a, b in joined_pairs),
    }


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class HoldoutResult:
    out_dir: Path
    record: dict
    seconds: dict[str, float]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _check_out(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise StageError(f"--out {out_dir}: exists and is not a folder; give a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise StageError(f"--out {out_dir}: exists and is not empty; give a new folder (nothing was written)")


def _write_part(part_dir: Path, meta: pd.DataFrame, images: Path, bar: tqdm) -> None:
    """A HAM10000-layout folder: the metadata rows and their images, moved out of our own import
    (``images``: a private copy of the source, so the output holds real files, not links)."""
    (part_dir / "images").mkdir(parents=True)
    write_metadata_csv(meta, part_dir / METADATA_NAME)
    for image_id in meta["image_id"]:
        src = images / f"{image_id}.jpg"
        if src.is_file():
            os.replace(src, part_dir / "images" / src.name)
        bar.update()


def _group(rows: pd.DataFrame, images: Path, params: SplitParams, workers: int) -> tuple[Grouping, dict]:
    """Features, candidate search and verification on ``images``, exactly as the split stage's
    ``run`` does them (``rows`` sorted by image_id); returns the grouping and the feature errors."""
    paths = [images / f"{i}.jpg" for i in rows["image_id"]]
    n_proc = min(n_workers(workers), max(1, math.ceil(len(paths) / HASH_CHUNK)))
    with process_pool(n_proc, [duplicates.__name__]) as pool:
        feats = compute_features(paths, pool)
        for i, err in sorted(feats.errors.items()):
            log.warning("%s: %s (kept in its lesion group)", paths[i], err)
        good = np.flatnonzero(feats.ok)
        pairs, _dist = near_pairs(feats.hashes[good], params.hash_radius)
        pairs = good[pairs]
        scores = score_candidates(feats.thumbs, pairs, params.verify_prefilter, pool)
    grouping = group_rows(
        rows["image_id"].to_numpy(),
        rows["lesion_id"].to_numpy(),
        rows["dx"].to_numpy(),
        pairs,
        scores,
        params,
    )
    return grouping, feats.errors


def run(
    data: Path,
    out_dir: Path,
    *,
    fraction: float,
    seed: int,
    params: SplitParams | None = None,
    workers: int = 0,
) -> HoldoutResult:
    """Split the HAM10000 folder ``data`` into ``out_dir/pool`` and ``out_dir/external``."""
    params = params or SplitParams()
    data, out_dir = Path(data), Path(out_dir)
    if not 0.0 < fraction < 1.0:
        raise StageError(f"--fraction {fraction}: must be between 0 and 1 (exclusive)")
    if not data.is_dir():
        raise StageError(f"--data {data}: not a folder (give a HAM10000-layout folder)")
    _check_out(out_dir)
    if out_dir.resolve().is_relative_to(data.resolve()):
        raise StageError(f"--out {out_dir}: inside --data {data}; write the hold-out elsewhere")
    seconds: dict[str, float] = {}
    with atomic_dir(out_dir) as tmp:
        # The download stage's own import: the same metadata parsing and the same choice of file
        # when an image_id is in several folders, so pool/ imports to exactly what we grouped.
        t0 = time.perf_counter()
        raw = tmp / ".import"
        raw.mkdir()
        imported = import_folder(data, raw)
        meta = read_table(raw / "metadata.csv", required=HAM_COLUMNS, unique="image_id")
        meta = meta[list(HAM_COLUMNS)].reset_index(drop=True)  # the source's row order
        seconds["import"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = meta.sort_values("image_id", kind="stable").reset_index(drop=True)
        grouping, errors = _group(rows, raw / "images", params, workers)
        groups = group_table(rows["image_id"].to_numpy(), rows["dx"].to_numpy(), grouping.group_id)
        held = choose_external(groups, fraction, seed)
        group_of = pd.Series(grouping.group_id, index=rows["image_id"].to_numpy())
        is_ext = meta["image_id"].map(group_of).isin(held)
        parts = {"pool": meta[~is_ext], "external": meta[is_ext]}
        seconds["group"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        orphans = sorted({p.stem for p in (raw / "images").iterdir()} - set(meta["image_id"]))
        if orphans:
            log.warning("%d image(s) without a metadata row left out: %s", len(orphans), name_first(orphans))
        with tqdm(total=len(meta), desc="write parts", unit="img") as bar:
            for name, part in parts.items():
                _write_part(tmp / name, part, raw / "images", bar)
        shutil.rmtree(raw)
        seconds["write"] = time.perf_counter() - t0

        written = {
            name: read_table(tmp / name / METADATA_NAME, required=HAM_COLUMNS, unique="image_id")
            for name in PARTS
        }
        check = crossings(written["pool"], written["external"], grouping.joined_pairs)
        if any(check.values()):
            raise StageError(f"holdout: pool and external overlap {check}; this is a bug, please report it")
        record = {
            "format_version": FORMAT_VERSION,
            "source": str(data.resolve()),
            "seed": seed,
            "fraction": fraction,
            "selection": "per dx (a group's majority dx), groups ordered by "
            "sha256(f'{seed}:{smallest image_id of the group}'); the first "
            "floor(fraction * groups + 0.5) are external",
            "grouping_params": {k: asdict(params)[k] for k in GROUPING_KEYS},
            "n_images_imported": imported.n_images,
            "n_metadata_rows": imported.n_rows,
            "n_undecodable": len(errors),
            "n_rows_without_image": sum(e == "missing file" for e in errors.values()),
            "n_images_without_metadata": len(orphans),
            **grouping.stats,
            "parts": {
                name: {"metadata_md5": _md5(tmp / name / METADATA_NAME), **part_counts(parts[name], group_of)}
                for name in PARTS
            },
        }
        write_json(tmp / "holdout.json", record)
    _warn_thin_classes(record)
    return HoldoutResult(out_dir, record, seconds)


def _warn_thin_classes(record: dict) -> None:
    ext, pool = record["parts"]["external"]["per_dx"], record["parts"]["pool"]["per_dx"]
    none = [c for c, v in ext.items() if not v["images"] and pool[c]["images"]]
    if none:
        log.warning("external holds no image of %s (too few groups for the fraction)", ", ".join(none))
    thin = [c for c, v in pool.items() if 0 < v["groups"] < MIN_GROUPS_TO_SPLIT]
    if thin:
        log.warning("pool has fewer than %d groups of %s: the split stage will refuse it",
                    MIN_GROUPS_TO_SPLIT, ", ".join(thin))  # fmt: skip


def summary_table(record: dict) -> str:
    """Images / lesions per dx in each part, and the malignant totals, as aligned text."""
    per = {p: record["parts"][p] for p in PARTS}
    lines = [f"{'dx':<10}{'pool img':>10}{'pool les':>10}{'ext img':>10}{'ext les':>10}"]
    for c in per["pool"]["per_dx"]:
        cells = [per[p]["per_dx"][c][k] for p in PARTS for k in ("images", "lesions")]
        lines.append(f"{c:<10}" + "".join(f"{v:>10}" for v in cells))
    for label, img, les in (("malignant", "n_malignant_images", "n_malignant_lesions"),
                            ("all", "n_images", "n_lesions")):  # fmt: skip
        lines.append(f"{label:<10}" + "".join(f"{per[p][k]:>10}" for p in PARTS for k in (img, les)))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.holdout",
        description="Hold out whole lesion groups (lesion_id joined with verified near-duplicates, "
        "as the split stage groups them) of a HAM10000 folder, stratified by diagnosis: OUT/pool "
        "to train on (make real DATA=OUT/pool), OUT/external to validate on, OUT/holdout.json.",
    )
    ap.add_argument("--data", type=Path, required=True, help="HAM10000-layout folder (read only)")
    ap.add_argument("--out", type=Path, required=True, help="new (or empty) folder to write")
    ap.add_argument("--fraction", type=float, default=0.08, help="share of each dx's groups held out "
                    "(default: %(default)s)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=19, help="orders the groups (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=0, help="processes for hashing (0: all cores)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        t0 = time.perf_counter()
        res = run(args.data, args.out, fraction=args.fraction, seed=args.seed, workers=args.workers)
        r = res.record
        log.info(
            "%d groups (%d lesions, %d joined by %d verified near-duplicate pairs); external %d images "
            "of %d groups; %s; %.1f s",
            r["n_groups"], r["n_lesions"], r["n_lesion_groups_joined"], r["n_verified_pairs"],
            r["parts"]["external"]["n_images"], r["parts"]["external"]["n_groups"],
            ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()), time.perf_counter() - t0,
        )  # fmt: skip
        log.info("per dx:\n%s", summary_table(r))
        log.info("wrote %s/{pool,external,holdout.json}", res.out_dir)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
