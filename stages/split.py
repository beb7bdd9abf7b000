"""Split stage: duplicate-aware, lesion-grouped, class-stratified train/val/test split.

Leakage is the protocol error that makes most published HAM10000 numbers meaningless: several
images of one lesion, or one lesion catalogued under two ``lesion_id`` values, landing on both
sides of a split. So:

1. Every image gets three 64-bit perceptual hashes (average, difference, perceptual; imagehash)
   and its centre colour, decoded at reduced size (JPEG draft mode) in parallel.
2. Candidate pairs (pHash within ``hash_radius``) come from a multi-index search: the hash is
   cut into ``hash_radius + 1`` bands, and by the pigeonhole principle two hashes within the radius agree
   exactly on at least one band; only images sharing a band value are compared (vectorised
   popcount). No O(N^2) Python loop, and far below N^2 work on real hash distributions.
3. A hash match is NOT a duplicate: on dermoscopy, a 64-bit hash matches visibly different
   lesions (even of different diagnoses). Each pHash candidate is verified by the agreement of
   two more hashes (average, difference) and of the lesion's colour; only verified pairs join
   groups.
4. Union-find joins verified pairs with the ``lesion_id`` groups; a merge that would exceed
   ``max_group_size`` or join two diagnoses is refused and counted.
5. Groups are assigned to splits per class (greedy, seeded), so every class is in every split
   with near-whole proportions, and an independent check proves no group, lesion or verified
   duplicate pair straddles two splits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common import (
    CLASSES,
    StageError,
    atomic_dir,
    n_workers,
    run_main,
    setup_logging,
    write_json,
)
from stages.params import SplitParams, load_params

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HASHES = ("ahash", "dhash", "phash")


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Features:
    hashes: np.ndarray  # (N, 3) uint64: ahash, dhash, phash
    colour: np.ndarray  # (N, 3) float32 mean RGB of the centre
    ok: np.ndarray  # (N,) bool: decoded
    errors: dict[int, str]


def _hash_bits(h) -> int:
    return int("".join("1" if b else "0" for b in h.hash.flatten()), 2)


def _features_one(path: str) -> tuple[tuple[int, int, int], np.ndarray] | str:
    import imagehash
    from PIL import Image

    try:
        with Image.open(path) as im:
            # Draft mode: the JPEG decoder skips to 1/2..1/8 scale; the hashes only need 32 px.
            im.draft("RGB", (64, 64))
            im = im.convert("RGB")
            im.load()
    except FileNotFoundError:
        return "missing file"
    except Exception as e:  # any decoder failure is data damage, reported by name
        return f"cannot decode: {type(e).__name__}: {e}"
    grey = im.convert("L")
    hashes = (
        _hash_bits(imagehash.average_hash(grey)),
        _hash_bits(imagehash.dhash(grey)),
        _hash_bits(imagehash.phash(grey)),
    )
    rgb = np.asarray(im.resize((16, 16), Image.BILINEAR), dtype=np.float32)[4:12, 4:12]
    return hashes, rgb.reshape(-1, 3).mean(0)  # colour of the centre: the lesion, not the skin


def _features_chunk(paths: list[str]) -> list:
    return [_features_one(p) for p in paths]


def compute_features(paths: Sequence[Path], workers: int = 0) -> Features:
    """Hashes, thumbnails and colour of every image, in parallel, in input order."""
    n = len(paths)
    hashes = np.zeros((n, 3), dtype=np.uint64)
    colour = np.zeros((n, 3), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    chunk = 256
    jobs = [[str(p) for p in paths[i : i + chunk]] for i in range(0, n, chunk)]
    n_proc = min(n_workers(workers), max(1, len(jobs)))
    pool = ProcessPoolExecutor(n_proc) if n_proc > 1 else None
    try:
        results = pool.map(_features_chunk, jobs) if pool else map(_features_chunk, jobs)
        i = 0
        with tqdm(total=n, desc="hash images", unit="img") as bar:
            for batch in results:
                for r in batch:
                    if isinstance(r, str):
                        errors[i] = r
                    else:
                        hashes[i] = np.array(r[0], dtype=np.uint64)
                        colour[i], ok[i] = r[1], True
                    i += 1
                bar.update(len(batch))
    finally:
        if pool:
            pool.shutdown()
    return Features(hashes, colour, ok, errors)


# --------------------------------------------------------------------------- candidate search


def near_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of 64-bit hashes within Hamming ``radius``: multi-index search.

    The hash is cut into ``radius + 1`` bands; pairs within the radius agree on >= 1 band, so
    only rows sharing a band value are compared. Returns (pairs (M, 2) int64, distances (M,)).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    n_bands = min(radius + 1, 64)
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, n])
        # Compare every pair inside each bucket, vectorised over buckets of equal size.
        for size in np.unique(sizes[sizes > 1]):
            s = starts[sizes == size]
            a_idx, b_idx = np.triu_indices(int(size), 1)
            # Very large buckets (many identical bands) are done in blocks to bound memory.
            step = max(1, 4_000_000 // len(a_idx))
            for k in range(0, len(s), step):
                rows = order[s[k : k + step, None] + np.arange(size)]  # (B, size)
                a, b = rows[:, a_idx].ravel(), rows[:, b_idx].ravel()
                d = np.bitwise_count(h[a] ^ h[b])
                keep = d <= radius
                found.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], 1))
    if not found:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    dist = np.bitwise_count(h[pairs[:, 0]] ^ h[pairs[:, 1]]).astype(np.int64)
    return pairs, dist


def verify_pairs(feats: Features, pairs: np.ndarray, params: SplitParams) -> np.ndarray:
    """Which candidate pairs are duplicates: every hash agrees, and so does the lesion colour.

    Why several hashes: each alone matches unrelated lesions (a dark blob on skin is a common
    picture); measured on the 9,247 real thumbnails, pHash <= 4 alone gives 373 pairs of which
    102 are one lesion, while agreement of pHash, dHash, aHash and the centre colour gave 53
    pairs, 51 of one lesion and none across diagnoses.
    """
    if len(pairs) == 0:
        return np.zeros(0, dtype=bool)
    a, b = pairs[:, 0], pairs[:, 1]
    d = np.bitwise_count(feats.hashes[a] ^ feats.hashes[b])  # (M, 3): ahash, dhash, phash
    colour_gap = np.abs(feats.colour[a] - feats.colour[b]).max(1)
    return (
        (d[:, 0] <= params.verify_hash_radius)
        & (d[:, 1] <= params.verify_hash_radius)
        & (d[:, 2] <= params.hash_radius)
        & (colour_gap <= params.verify_colour_gap)
    )


# --------------------------------------------------------------------------- grouping


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int, max_size: int | None = None) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if max_size is not None and self.size[ra] + self.size[rb] > max_size:
            return False
        if ra > rb:  # the smaller index is the root: group ids do not depend on merge order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True


def assign_splits(groups: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[int, str]:
    """Greedy, seeded, per-class assignment of groups (columns group_id, dx, n) to splits.

    Within each class, groups are visited largest first (ties in seeded random order) and each
    goes to the split furthest below its target share of that class's images.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, str] = {}
    for dx in sorted(groups["dx"].unique()):
        g = groups[groups["dx"] == dx]
        if len(g) < len(SPLITS):
            raise StageError(
                f"split: class {dx!r} has only {len(g)} lesion group(s); at least {len(SPLITS)} "
                "are needed to put it in train, val and test (add images or drop the class)"
            )
        tie = rng.permutation(len(g))
        g = g.assign(_tie=tie).sort_values(["n", "_tie"], ascending=[False, True])
        total = g["n"].sum()
        have = dict.fromkeys(SPLITS, 0)
        # The first three groups seed one per split, so even a tiny class is in every split.
        for k, (gid, n) in enumerate(zip(g["group_id"], g["n"], strict=True)):
            if k < len(SPLITS):
                # smallest fractions first take the smaller groups at the end of the seed round
                target = sorted(SPLITS, key=lambda s: -fractions[s])[k]
            else:
                target = max(SPLITS, key=lambda s: (fractions[s] * total - have[s], fractions[s]))
            out[int(gid)] = target
            have[target] += int(n)
    return out


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class SplitResult:
    split: pd.DataFrame
    duplicates: pd.DataFrame
    metrics: dict


def split_dataset(meta: pd.DataFrame, feats: Features, params: SplitParams, seed: int) -> SplitResult:
    """The pure core: metadata rows + image features in, split table + duplicates + metrics out."""
    n = len(meta)
    ids = meta["image_id"].to_numpy()
    lesions = meta["lesion_id"].to_numpy()
    dx = meta["dx"].to_numpy()

    # 1. candidates: pHash within the radius, among decodable images
    good = np.flatnonzero(feats.ok)
    pairs, dist = near_pairs(feats.hashes[good, 2], params.hash_radius)
    pairs = good[pairs]
    # 2. verification
    verified = verify_pairs(feats, pairs, params)
    vp, vd = pairs[verified], dist[verified]
    vs = np.bitwise_count(feats.hashes[vp[:, 0]] ^ feats.hashes[vp[:, 1]]).sum(1) if len(vp) else vd

    # 3. union-find: lesions first, then verified duplicates (strongest first)
    uf = UnionFind(n)
    first_of_lesion: dict[str, int] = {}
    for i, les in enumerate(lesions):
        j = first_of_lesion.setdefault(les, i)
        uf.union(i, j)
    refused_size = refused_dx = 0
    for k in np.argsort(vs, kind="stable"):  # closest pairs first
        a, b = int(vp[k, 0]), int(vp[k, 1])
        if dx[a] != dx[b]:
            refused_dx += 1  # one image cannot carry two diagnoses: a false positive, never merged
            continue
        if not uf.union(a, b, params.max_group_size):
            refused_size += 1
    roots = np.array([uf.find(i) for i in range(n)])
    # Group ids: dense, in order of the group's smallest image id (stable under row order).
    first_id = pd.Series(ids).groupby(roots).transform("min").to_numpy()
    group_id = pd.factorize(first_id, sort=True)[0]

    # 4. split assignment
    gdf = pd.DataFrame({"group_id": group_id, "dx": dx})
    # A group's class: its majority dx (a lesion_id with two dx is the validate stage's error).
    gclass = gdf.groupby("group_id")["dx"].agg(lambda s: s.value_counts().sort_index().idxmax())
    gsize = gdf.groupby("group_id").size()
    groups = pd.DataFrame({"group_id": gclass.index, "dx": gclass.to_numpy(), "n": gsize.to_numpy()})
    fractions = {"train": params.fractions.train, "val": params.fractions.val, "test": params.fractions.test}
    assignment = assign_splits(groups, fractions, seed)
    split = np.array([assignment[g] for g in group_id], dtype=object)

    out = pd.DataFrame(
        {"image_id": ids, "lesion_id": lesions, "group_id": group_id, "dx": dx, "split": split}
    )
    # 5. options: keep one canonical image (smallest image_id) per group where asked
    canonical = out.groupby("group_id")["image_id"].transform("min") == out["image_id"]
    drop = np.zeros(n, dtype=bool)
    if params.dedupe_majority_in_train:
        majority = meta["dx"].value_counts().idxmax()
        drop |= (out["split"] == "train") & (out["dx"] == majority) & ~canonical
    if params.eval_images == "canonical":
        drop |= out["split"].isin(["val", "test"]) & ~canonical
    out["assigned_split"] = out["split"]
    out.loc[drop, "split"] = "dropped"
    out = out.sort_values("image_id", kind="stable").reset_index(drop=True)

    dups = pd.DataFrame(
        {
            "image_id_a": ids[vp[:, 0]] if len(vp) else [],
            "image_id_b": ids[vp[:, 1]] if len(vp) else [],
            "hamming": vd,
            "hash_distance_sum": vs,
            "same_lesion": lesions[vp[:, 0]] == lesions[vp[:, 1]] if len(vp) else [],
            "dx_a": dx[vp[:, 0]] if len(vp) else [],
            "dx_b": dx[vp[:, 1]] if len(vp) else [],
        }
    ).sort_values(["image_id_a", "image_id_b"], kind="stable")

    metrics = _metrics(out, dups, meta, feats, len(pairs), refused_size, refused_dx)
    return SplitResult(out, dups.reset_index(drop=True), metrics)


def leakage(split: pd.DataFrame, dups: pd.DataFrame) -> int:
    """Independent check on the written split: groups, lesions or verified pairs in > 1 split."""
    where = split.set_index("image_id")["assigned_split"]
    n = int((split.groupby("group_id")["assigned_split"].nunique() > 1).sum())
    n += int((split.groupby("lesion_id")["assigned_split"].nunique() > 1).sum())
    if len(dups):
        n += int((where[dups["image_id_a"]].to_numpy() != where[dups["image_id_b"]].to_numpy()).sum())
    return n


def _metrics(split, dups, meta, feats, n_candidates, refused_size, refused_dx) -> dict:
    sizes = meta.groupby("lesion_id").size()
    same_lesion_pairs = int((sizes * (sizes - 1) // 2).sum())
    found_same = int(dups["same_lesion"].sum()) if len(dups) else 0
    m: dict = {
        "n_images": len(split),
        "n_lesions": int(meta["lesion_id"].nunique()),
        "n_groups": int(split["group_id"].nunique()),
        "largest_group": int(split.groupby("group_id").size().max()),
        "n_candidate_pairs": int(n_candidates),
        "n_near_duplicate_pairs": len(dups),
        "n_cross_lesion_duplicate_pairs": int((~dups["same_lesion"]).sum()) if len(dups) else 0,
        "n_cross_diagnosis_duplicate_pairs": int((dups["dx_a"] != dups["dx_b"]).sum()) if len(dups) else 0,
        "n_merges_refused_size": int(refused_size),
        "n_merges_refused_diagnosis": int(refused_dx),
        "same_lesion_pairs": same_lesion_pairs,
        "same_lesion_pair_recall": round(found_same / same_lesion_pairs, 4) if same_lesion_pairs else 0.0,
        "n_undecodable": len(feats.errors),
        "n_dropped": int((split["split"] == "dropped").sum()),
        "leaking_groups": leakage(split, dups),
    }
    kept = split[split["split"] != "dropped"]
    for s in SPLITS:
        part = kept[kept["split"] == s]
        m[f"{s}_n"] = len(part)
        m[f"{s}_fraction"] = round(len(part) / max(len(kept), 1), 4)
        for c in CLASSES:
            m[f"{s}_n_{c}"] = int((part["dx"] == c).sum())
    return m


def _plot(split: pd.DataFrame, plots_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = split[split["split"] != "dropped"]
    table = (
        kept.groupby(["split", "dx"]).size().unstack(fill_value=0).reindex(index=list(SPLITS), fill_value=0)
    )
    shares = table.div(table.sum(1), axis=0)
    rows = [
        {
            "split": s,
            "dx": c,
            "count": int(table.loc[s].get(c, 0)),
            "share": round(float(shares.loc[s].get(c, 0)), 4),
        }
        for s in SPLITS
        for c in CLASSES
    ]
    pd.DataFrame(rows).to_csv(plots_dir / "class_distribution.csv", index=False, lineterminator="\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(CLASSES))
    for k, s in enumerate(SPLITS):
        vals = [shares.loc[s].get(c, 0) for c in CLASSES]
        ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=f"{s} (n={int(table.loc[s].sum())})")
    ax.set_xticks(x, CLASSES)
    ax.set_ylabel("share of the split's images")
    ax.set_title("Class distribution per split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "class_distribution.png", dpi=100)
    plt.close(fig)


def run(params: SplitParams, *, seed: int, raw_dir: Path, out_dir: Path, metrics_path: Path, plots_dir: Path):
    meta_path = raw_dir / "metadata.csv"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: not found; run the download stage first")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    missing = {"image_id", "lesion_id", "dx"} - set(meta.columns)
    if missing:
        raise StageError(f"{meta_path}: missing column(s) {sorted(missing)}")
    meta = meta.drop_duplicates("image_id", keep="first").reset_index(drop=True)
    paths = [raw_dir / "images" / f"{i}.jpg" for i in meta["image_id"]]
    feats = compute_features(paths, params.workers)
    for i, err in sorted(feats.errors.items())[:20]:
        log.warning("%s: %s (kept in its lesion group; the validate stage decides)", paths[i], err)
    if len(feats.errors) > 20:
        log.warning("... and %d more images that could not be read", len(feats.errors) - 20)

    res = split_dataset(meta, feats, params, seed)
    m = res.metrics
    if m["leaking_groups"]:
        raise StageError(
            f"split: {m['leaking_groups']} group(s) straddle splits; this is a bug, please report"
        )
    with atomic_dir(out_dir) as tmp:
        res.split.to_csv(tmp / "split.csv", index=False, lineterminator="\n")
        res.duplicates.to_csv(tmp / "duplicates.csv", index=False, lineterminator="\n")
        und = pd.DataFrame(
            {"image_id": [meta["image_id"][i] for i in sorted(feats.errors)],
             "error": [feats.errors[i] for i in sorted(feats.errors)]}
        )  # fmt: skip
        und.to_csv(tmp / "undecodable.csv", index=False, lineterminator="\n")
    with atomic_dir(plots_dir) as tmp:
        _plot(res.split, tmp)
    write_json(metrics_path, m)
    log.info(
        "split: %d images, %d groups (largest %d); %d candidate pairs, %d verified "
        "(%d cross-lesion, %d cross-diagnosis); same-lesion recall %.3f; train/val/test %d/%d/%d",
        m["n_images"], m["n_groups"], m["largest_group"], m["n_candidate_pairs"],
        m["n_near_duplicate_pairs"], m["n_cross_lesion_duplicate_pairs"],
        m["n_cross_diagnosis_duplicate_pairs"], m["same_lesion_pair_recall"],
        m["train_n"], m["val_n"], m["test_n"],
    )  # fmt: skip
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.split",
        description="Group images by lesion and verified near-duplicates, then split the groups "
        "into train/val/test stratified by diagnosis (params: split.*, base.seed).",
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--raw", type=Path, required=True, help="download output (metadata.csv + images/)")
    ap.add_argument("--out", type=Path, required=True, help="folder for split.csv, duplicates.csv")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--plots", type=Path, required=True, help="folder for the class-distribution plot")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        p = load_params(args.params)
        run(p.split, seed=p.base.seed, raw_dir=args.raw, out_dir=args.out, metrics_path=args.metrics,
            plots_dir=args.plots)  # fmt: skip
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
