"""Split stage: duplicate-aware, lesion-grouped, class-stratified train/val/test split.

Leakage is the protocol error that makes most published HAM10000 numbers meaningless: several
images of one lesion, or one lesion catalogued under two ``lesion_id`` values, landing on both
sides of a split. So:

1. Features (parallel, JPEG draft mode, grey only): a 64-bit pHash (imagehash) and a 72x72 grey
   thumbnail of the image centre.
2. Candidates: all pairs whose pHash lies within ``split.hash_radius``, from an exact
   multi-index search (:func:`near_pairs`; hash bands, each probed with its 1-bit variants, so
   the work grows about linearly in the number of images, not quadratically).
3. Verification: a hash match is NOT a duplicate. On the 9,247 real thumbnails pHash <= 2 pairs
   up visibly different lesions, some with different diagnoses: a dark blob in the middle of
   skin hashes alike whatever the lesion. A candidate counts only when its fine structure
   matches: normalised cross-correlation of high-passed thumbnails, maximised over the 8
   flips/rotations and shifts up to 1/6 of the width (:func:`verify_scores`; a coarse pass at
   half resolution discards most candidates cheaply). Threshold ``split.verify_threshold``,
   tuned on the real data (see ``bench/results/split.md``).
4. Union-find joins the ``lesion_id`` groups, then verified pairs (strongest first). A merge
   that would exceed ``split.max_group_size`` images, or join two diagnoses (a proven false
   positive), is refused, listed in ``duplicates.csv`` and counted.
5. Groups go to splits per class (greedy, seeded: largest groups first, each to the split
   furthest below its share of that class), so every class is in every split with near-whole
   proportions. An independent check on the files written proves that no group, lesion or
   joined duplicate pair straddles two splits; otherwise the stage fails and writes nothing.

Outputs (``--out``): ``split.csv`` (image_id, lesion_id, group_id, dx, split, assigned_split;
sorted by image_id). ``split`` is ``train``/``val``/``test``, or ``dropped`` for an image an option
removed (``dedupe_majority_in_train``, ``eval_images: canonical``); ``assigned_split`` is the
split of its group in every row. ``duplicates.csv`` lists every verified pair; ``undecodable.csv``
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
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import in_order_on, n_workers, process_pool
from skinlesion.core.schema import CLASSES
from skinlesion.core.tables import read_table
from skinlesion.params.base import BaseParams
from skinlesion.params.schema import load_sections
from skinlesion.params.split import FractionsParams, SplitParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DROPPED = "dropped"
HASH_BITS = 64
THUMB = 72  # side of the grey centre square kept per image for verification
# Draft/resize target (4:3 like HAM10000); the centre THUMB x THUMB square is kept.
THUMB_WH = (96, 72)
FINE_T, COARSE_T = 48, 24  # template sides: +-12 px of search at 72, +-6 px at 36
HIGHPASS_SIGMA = 1.0  # px at 72; removes the lesion's blob shape, keeps texture, hair, dots
HASH_CHUNK = 256  # images per worker task
VERIFY_CHUNK = 512  # candidate pairs per worker task


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Features:
    hashes: np.ndarray  # (N,) uint64 pHash
    thumbs: np.ndarray  # (N, THUMB, THUMB) uint8 grey centre
    ok: np.ndarray  # (N,) bool: decoded
    errors: dict[int, str]  # row -> reason ("missing file", "cannot decode: ...")


def _features_one(path: str) -> tuple[int, np.ndarray] | str:
    import imagehash
    from PIL import Image

    from skinlesion.core.images import open_checked

    try:
        # The header's pixel count is checked before anything is decoded: split runs before
        # validate, so a decompression bomb must be refused here too.
        with open_checked(path) as im:
            # Draft mode: libjpeg decodes luminance only, at 1/2..1/8 scale, straight from the
            # DCT coefficients; pHash needs 32 px and the thumbnail 72, so the full image (and
            # its colour) is never built. No-op for non-JPEG files.
            im.draft("L", THUMB_WH)
            grey = im.convert("L")
    except FileNotFoundError:
        return "missing file"
    except Exception as e:  # any decoder failure is data damage, reported by name
        return f"cannot decode: {type(e).__name__}: {e}"
    h = imagehash.phash(grey, hash_size=8)
    value = int.from_bytes(np.packbits(h.hash.ravel()).tobytes(), "big")
    # Distorts non-4:3 images, but identically for both copies of a duplicate.
    small = np.asarray(grey.resize(THUMB_WH, Image.BOX), dtype=np.uint8)
    x0, y0 = (THUMB_WH[0] - THUMB) // 2, (THUMB_WH[1] - THUMB) // 2
    return value, small[y0 : y0 + THUMB, x0 : x0 + THUMB]


def _features_chunk(paths: list[str]) -> list[tuple[int, np.ndarray] | str]:
    return [_features_one(p) for p in paths]


def compute_features(paths: Sequence[Path], pool: Executor | None = None) -> Features:
    """pHash and thumbnail of every image, in chunks on ``pool`` (None: in this process), in
    input order."""
    n = len(paths)
    hashes = np.zeros(n, dtype=np.uint64)
    thumbs = np.zeros((n, THUMB, THUMB), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    tasks = ((i, ([str(p) for p in paths[i : i + HASH_CHUNK]],)) for i in range(0, n, HASH_CHUNK))
    with tqdm(total=n, desc="hash images", unit="img") as bar:
        for i, batch in in_order_on(pool, _features_chunk, tasks):
            for k, r in enumerate(batch, start=i):
                if isinstance(r, str):
                    errors[k] = r
                else:
                    hashes[k], thumbs[k], ok[k] = r[0], r[1], True
            bar.update(len(batch))
    return Features(hashes, thumbs, ok, errors)


# --------------------------------------------------------------------------- candidate search


def _ball(width: int, t: int) -> np.ndarray:
    """XOR masks of every ``width``-bit pattern with at most ``t`` bits set (the Hamming ball)."""
    masks = [0]
    for k in range(1, t + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def _plan(n: int, radius: int, bits: int = HASH_BITS) -> tuple[int, int] | None:
    """Cheapest (bands, probe radius) for the multi-index search, or None for brute force.

    With ``m`` bands, two hashes within ``radius`` are within ``radius // m`` on some band
    (pigeonhole), and two band keys within ``s`` share a key within ``ceil(s/2)`` of both. So each
    hash files itself under every key in its band's ball of radius ``t = ceil(s/2)``; hashes filed
    under one key are candidates. Cost model (uniform hashes): entries sorted, plus chance
    collisions per band; brute force costs ~N^2/2 cheap XOR-popcounts.
    """
    # Units: one sorted entry (~100 ns here); a brute-force pair costs ~7 ns (measured).
    best, best_cost = None, 0.075 * n * n / 2
    for m in range(1, min(radius + 1, bits) + 1):
        width = math.ceil(bits / m)
        t = math.ceil((radius // m) / 2)
        if t > 3:
            continue
        entries = n * sum(math.comb(width, k) for k in range(t + 1))
        collisions = entries * entries / 2 / 2.0 ** (bits // m)
        cost = m * (entries + 0.3 * collisions)
        if cost < best_cost:
            best, best_cost = (m, t), cost
    return best


def near_pairs_bruteforce(
    hashes: np.ndarray, radius: int, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Reference search: blocked XOR-popcount over all pairs (vectorised, but O(N^2))."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    found = []
    for lo in range(0, len(h), block):
        d = np.bitwise_count(h[lo : lo + block, None] ^ h[None, lo:])
        a, b = np.nonzero(d <= radius)
        keep = b > a  # b is offset by lo, as a is: strict upper triangle
        found.append(np.stack([a[keep] + lo, b[keep] + lo], 1))
    return _finish(h, found)


def _finish(h: np.ndarray, found: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not found or not sum(len(f) for f in found):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    return pairs, np.bitwise_count(h[pairs[:, 0]] ^ h[pairs[:, 1]]).astype(np.int64)


def near_pairs(
    hashes: np.ndarray, radius: int, *, method: str = "auto", max_block_pairs: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of 64-bit hashes within Hamming ``radius``, exactly.

    ``method``: ``index`` (multi-index search, see :func:`_plan`), ``brute``, or ``auto`` (the
    cheaper by a cost model). Returns (pairs (M, 2) int64 sorted, Hamming distances (M,)).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return _finish(h, [])
    plan = _plan(n, radius)
    if method == "brute" or (method == "auto" and plan is None) or radius >= HASH_BITS:
        return near_pairs_bruteforce(h, radius)
    # index forced where the model prefers brute force: exact match on one of radius+1 bands
    m, t = plan or (radius + 1, 0)
    edges = np.linspace(0, HASH_BITS, m + 1).round().astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        width = int(hi - lo)
        band = (h >> np.uint64(lo)) & np.uint64((1 << width) - 1)
        masks = _ball(width, t)
        keys = (band[:, None] ^ masks[None, :]).ravel()
        items = np.repeat(np.arange(n, dtype=np.int64), len(masks))
        order = np.argsort(keys, kind="stable")
        keys, items = keys[order], items[order]
        # Every pair of entries under one key is a candidate; entries of one item have distinct
        # keys, so no self-pairs. Enumerated vectorised, in slices that bound memory.
        start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        end = np.repeat(np.r_[start[1:], len(keys)], np.diff(np.r_[start, len(keys)]))
        partners = end - np.arange(len(keys)) - 1
        cum = np.cumsum(partners)
        p0 = 0
        while p0 < len(keys):
            p1 = int(np.searchsorted(cum, (cum[p0 - 1] if p0 else 0) + max_block_pairs, "right"))
            p1 = max(p1, p0 + 1)
            cnt = partners[p0:p1]
            left = np.repeat(np.arange(p0, p1), cnt)
            right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            a, b = items[left], items[right]
            close = np.bitwise_count(h[a] ^ h[b]) <= radius
            a, b = a[close], b[close]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
            p0 = p1
    return _finish(h, found)


# --------------------------------------------------------------------------- verification


def _highpass(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = x.astype(np.float32)
    return x - gaussian_filter(x, (0, sigma, sigma), mode="nearest")


def _dihedral_templates(sq: np.ndarray, t: int) -> np.ndarray:
    """(P, s, s) -> (P, 8, t, t): centre of each flip/rotation, zero mean, unit norm."""
    c = (sq.shape[-1] - t) // 2
    views = []
    for k in range(4):
        r = np.rot90(sq, k, axes=(1, 2))
        views += [r, r[:, :, ::-1]]
    tpl = np.stack(views, 1)[:, :, c : c + t, c : c + t]
    tpl = tpl - tpl.mean((2, 3), keepdims=True)
    return tpl / np.maximum(np.sqrt((tpl**2).sum((2, 3), keepdims=True)), 1e-6)


def _best_ncc(search: np.ndarray, tpl: np.ndarray) -> np.ndarray:
    """Max normalised cross-correlation of each pair's templates over every valid shift.

    Correlation by FFT (templates are zero-mean, so the window mean drops out); window norms
    from integral images. Windows flatter than ~0.5 grey levels cannot score high.
    """
    import scipy.fft as sfft

    p, s, _ = search.shape
    t = tpl.shape[-1]
    n = s - t + 1
    fa, fb = sfft.rfft2(search)[:, None], sfft.rfft2(tpl, s=(s, s))
    # fa * conj(fb) in real arithmetic: numpy's complex multiply fuses into FMA on CPUs that have
    # it (AVX2, AVX-512) and not on others, so its last bits (and, in a tie, a duplicate decision)
    # would depend on the machine; separate * + - round exactly everywhere. (scipy's FFT is one
    # compiled binary for every x86, without FMA or run-time CPU dispatch.)
    spectrum = np.empty(np.broadcast_shapes(fa.shape, fb.shape), dtype=np.result_type(fa, fb))
    spectrum.real = fa.real * fb.real + fa.imag * fb.imag
    spectrum.imag = fa.imag * fb.real - fa.real * fb.imag
    corr = sfft.irfft2(spectrum, s=(s, s))[:, :, :n, :n]
    pad = ((0, 0), (1, 0), (1, 0))
    i1 = np.pad(search.cumsum(1).cumsum(2), pad)
    i2 = np.pad((search * search).cumsum(1).cumsum(2), pad)

    def box(i: np.ndarray) -> np.ndarray:
        return i[:, t:, t:] - i[:, :-t, t:] - i[:, t:, :-t] + i[:, :-t, :-t]

    var = np.maximum(box(i2) - box(i1) ** 2 / (t * t), 0.25 * t * t)
    return np.clip(corr / np.sqrt(var)[:, None], -1, 1).reshape(p, -1).max(1)


def verify_scores(thumb_a: np.ndarray, thumb_b: np.ndarray, prefilter: float) -> np.ndarray:
    """Similarity in [-1, 1] of each pair of grey thumbnails (P, 72, 72) after alignment.

    A's centre (2/3 of the side, 8 flips/rotations) is slid over B; the score is the best
    normalised cross-correlation of the high-passed images. High-passing matters: raw grey
    thumbnails of two different dark lesions on skin correlate above 0.95. Pairs scoring below
    ``prefilter`` at half resolution are not scored at full resolution (score = NaN).
    """
    a = _highpass(thumb_a, HIGHPASS_SIGMA)
    b = _highpass(thumb_b, HIGHPASS_SIGMA)
    half = lambda x: x.reshape(len(x), THUMB // 2, 2, THUMB // 2, 2).mean((2, 4))  # noqa: E731
    coarse = _best_ncc(half(b), _dihedral_templates(half(a), COARSE_T))
    out = np.full(len(a), np.nan, dtype=np.float32)
    go = np.flatnonzero(coarse >= prefilter)
    if len(go):
        out[go] = _best_ncc(b[go], _dihedral_templates(a[go], FINE_T))
    return out


def score_candidates(
    thumbs: np.ndarray, pairs: np.ndarray, prefilter: float, pool: Executor | None = None
) -> np.ndarray:
    """:func:`verify_scores` for every candidate pair, in chunks on ``pool`` (None: in this
    process). A chunk's thumbnails are cut only when it is sent, so memory stays bounded."""
    scores = np.full(len(pairs), np.nan, dtype=np.float32)
    tasks = (
        (k, (thumbs[pairs[k : k + VERIFY_CHUNK, 0]], thumbs[pairs[k : k + VERIFY_CHUNK, 1]], prefilter))
        for k in range(0, len(pairs), VERIFY_CHUNK)
    )
    with tqdm(total=len(pairs), desc="verify pairs", unit="pair") as bar:
        for k, s in in_order_on(pool, verify_scores, tasks):
            scores[k : k + len(s)] = s
            bar.update(len(s))
    return scores


# --------------------------------------------------------------------------- grouping


class UnionFind:
    """Disjoint sets of rows with their size and diagnosis (-1 once a set mixes two)."""

    def __init__(self, dx_codes: np.ndarray):
        self.parent = np.arange(len(dx_codes))
        self.size = np.ones(len(dx_codes), dtype=np.int64)
        self.dx = np.asarray(dx_codes, dtype=np.int64).copy()

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int, max_size: int | None = None) -> str:
        """Join the sets of ``a`` and ``b``: "" when joined (or already one), else the refusal.

        Without ``max_size`` (lesion_id groups) the join is unconditional; with it (duplicate
        pairs) it is refused as "size" past the bound or "diagnosis" across two diagnoses."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ""
        if max_size is not None:
            if self.dx[ra] != self.dx[rb] or self.dx[ra] < 0:
                return "diagnosis"
            if self.size[ra] + self.size[rb] > max_size:
                return "size"
        if ra > rb:  # the smaller row is the root: the result does not depend on merge order
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        if self.dx[ra] != self.dx[rb]:
            self.dx[ra] = -1
        return ""


def build_groups(
    lesions: np.ndarray,
    dx: np.ndarray,
    pairs: np.ndarray,
    scores: np.ndarray,
    max_group_size: int,
) -> tuple[np.ndarray, list[str]]:
    """Union-find over lesion_id, then over ``pairs`` strongest first.

    Returns (root row of each row, refusal per pair: "" joined, "size" or "diagnosis")."""
    dx_codes = pd.factorize(dx, sort=True)[0]
    uf = UnionFind(dx_codes)
    les_codes = pd.factorize(lesions)[0]
    first = np.full(les_codes.max() + 1 if len(les_codes) else 0, -1)
    for i, c in enumerate(les_codes):
        if first[c] < 0:
            first[c] = i
        else:
            uf.union(int(first[c]), i)
    refused = [""] * len(pairs)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -scores)) if len(pairs) else []
    for k in order:
        refused[k] = uf.union(int(pairs[k, 0]), int(pairs[k, 1]), max_group_size)
    roots = np.array([uf.find(i) for i in range(len(dx))], dtype=np.int64)
    return roots, refused


# --------------------------------------------------------------------------- assignment


def assign_splits(groups: pd.DataFrame, fractions: FractionsParams, rng: np.random.Generator) -> pd.Series:
    """Split per group (``groups``: index group_id, columns dx and n images), stratified on dx
    and on group size.

    Per class: one of the smallest groups seeds each split (smallest fraction first), so every
    class is in every split. The rest go largest first (ties in seeded random order), each to
    the split whose images would then be the smallest multiple of its target share
    (proportional apportionment). Why not "the split furthest below its target": counted in
    images, that sends every large group to train (its gap is the largest), so val and test
    end up almost only single-image lesions, not the population the model will meet. Going
    proportionally, each split receives its share of the 6-image lesions, of the 2-image
    lesions and of the singles, and the singles at the end even out the image counts.
    """
    target = {"train": fractions.train, "val": fractions.val, "test": fractions.test}
    seed_order = sorted(SPLITS, key=lambda s: (target[s], SPLITS.index(s)))
    out = pd.Series(index=groups.index, dtype=object)
    for dx in sorted(groups["dx"].unique()):
        g = groups[groups["dx"] == dx].sort_index()
        if len(g) < len(SPLITS):
            raise StageError(
                f"split: class {dx!r} has only {len(g)} lesion group(s); at least {len(SPLITS)} are "
                "needed to put it in train, val and test (add images of it or drop the class)"
            )
        tie = rng.permutation(len(g))
        g = g.assign(_tie=tie).sort_values(["n", "_tie"], ascending=[False, True])
        ids, sizes = g.index.to_list(), g["n"].to_list()
        have = dict.fromkeys(SPLITS, 0)
        for s in seed_order:
            out[ids[-1]] = s
            have[s] += sizes[-1]
            ids, sizes = ids[:-1], sizes[:-1]
        for gid, n in zip(ids, sizes, strict=True):
            s = min(SPLITS, key=lambda s: ((have[s] + n) / target[s], -target[s]))
            out[gid] = s
            have[s] += n
    return out


# --------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class SplitTables:
    split: pd.DataFrame
    duplicates: pd.DataFrame
    metrics: dict


def split_dataset(
    meta: pd.DataFrame,
    feats: Features,
    params: SplitParams,
    rng: np.random.Generator,
    *,
    n_candidates: int,
    pairs: np.ndarray,
    dist: np.ndarray,
    scores: np.ndarray,
) -> SplitTables:
    """Metadata rows (sorted by image_id) + features + scored candidates -> split, duplicates."""
    n = len(meta)
    ids = meta["image_id"].to_numpy()
    lesions = meta["lesion_id"].to_numpy()
    dx = meta["dx"].to_numpy()

    verified = np.nan_to_num(scores, nan=-1.0) >= params.verify_threshold
    vp, vd, vs = pairs[verified], dist[verified], scores[verified]
    roots, refused = build_groups(lesions, dx, vp, vs, params.max_group_size)
    for (a, b), why in zip(vp.tolist(), refused, strict=True):
        if why:
            detail = f"{dx[a]} vs {dx[b]}" if why == "diagnosis" else f"over {params.max_group_size} images"
            log.warning("duplicate pair %s ~ %s not joined (%s: %s)", ids[a], ids[b], why, detail)
    # Group ids: dense, in order of each group's smallest image id (rows are sorted by id).
    group_id = pd.factorize(roots)[0]

    frame = pd.DataFrame({"group_id": group_id, "dx": dx})
    # A group's class is its majority dx; only a lesion_id with two dx can mix (validate's error).
    counts = frame.groupby(["group_id", "dx"]).size().unstack(fill_value=0)
    mixed = counts.index[(counts > 0).sum(1) > 1]
    for g in mixed[:20]:
        members = ", ".join(ids[group_id == g][:6])
        log.warning("group %d (%s) has several diagnoses; split by its majority dx", g, members)
    groups = pd.DataFrame({"dx": counts.idxmax(axis=1), "n": counts.sum(1)})
    split_of_group = assign_splits(groups, params.fractions, rng)
    assigned = split_of_group.loc[group_id].to_numpy()

    out = pd.DataFrame(
        {"image_id": ids, "lesion_id": lesions, "group_id": group_id, "dx": dx, "split": assigned}
    )
    # Options: keep one canonical image per group (smallest decodable image_id) where asked.
    rank_key = pd.Series(np.where(feats.ok, "0", "1")) + out["image_id"]
    canonical = rank_key.groupby(out["group_id"]).transform("min") == rank_key
    drop_train = np.zeros(n, dtype=bool)
    drop_eval = np.zeros(n, dtype=bool)
    if params.dedupe_majority_in_train:
        majority = meta["dx"].value_counts().sort_index().idxmax()
        drop_train = ((out["split"] == "train") & (out["dx"] == majority) & ~canonical).to_numpy()
    if params.eval_images == "canonical":
        drop_eval = (out["split"].isin(["val", "test"]) & ~canonical).to_numpy()
    out["assigned_split"] = out["split"]
    out.loc[drop_train | drop_eval, "split"] = DROPPED

    dups = pd.DataFrame(
        {
            "image_id_a": ids[vp[:, 0]],
            "image_id_b": ids[vp[:, 1]],
            "hamming": vd,
            "score": np.round(vs.astype(float), 4),
            "same_lesion": lesions[vp[:, 0]] == lesions[vp[:, 1]],
            "dx_a": dx[vp[:, 0]],
            "dx_b": dx[vp[:, 1]],
            "lesion_id_a": lesions[vp[:, 0]],
            "lesion_id_b": lesions[vp[:, 1]],
            "joined": [not r for r in refused],
            "refused": refused,
        }
    )

    ok = feats.ok
    sizes = pd.Series(lesions[ok]).value_counts()
    same_lesion_pairs = int((sizes * (sizes - 1) // 2).sum())
    cand_same = int((lesions[pairs[:, 0]] == lesions[pairs[:, 1]]).sum()) if len(pairs) else 0
    found_same = int(dups["same_lesion"].sum())
    kept = out[out["split"] != DROPPED]
    m: dict = {
        "n_images": n,
        "n_lesions": int(meta["lesion_id"].nunique()),
        "n_groups": int(out["group_id"].nunique()),
        "largest_group": int(out.groupby("group_id").size().max()) if n else 0,
        "n_candidate_pairs": int(n_candidates),
        "n_near_duplicate_pairs": len(dups),
        "n_cross_lesion_duplicate_pairs": int((~dups["same_lesion"]).sum()),
        "n_cross_diagnosis_duplicate_pairs": int((dups["dx_a"] != dups["dx_b"]).sum()),
        "n_merges_refused_size": refused.count("size"),
        "n_merges_refused_diagnosis": refused.count("diagnosis"),
        "same_lesion_pairs": same_lesion_pairs,
        "same_lesion_candidate_pairs": cand_same,
        "same_lesion_pair_recall": round(found_same / same_lesion_pairs, 4) if same_lesion_pairs else 0.0,
        "n_undecodable": len(feats.errors),
        "n_dropped": int(len(out) - len(kept)),
        "n_dropped_train_majority": int(drop_train.sum()),
        "n_dropped_eval_canonical": int((drop_eval & ~drop_train).sum()),
    }
    classes = list(CLASSES) + sorted(set(dx) - set(CLASSES))
    for s in SPLITS:
        part = kept[kept["split"] == s]
        m[f"{s}_n"] = len(part)
        m[f"{s}_fraction"] = round(len(part) / max(len(kept), 1), 4)
        m[f"{s}_n_groups"] = int(part["group_id"].nunique())
        for c in classes:
            m[f"{s}_n_{c}"] = int((part["dx"] == c).sum())
    m.update(population_metrics(kept, classes))
    return SplitTables(out, dups, m)


def population_profile(part: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    """What kind of cases a set of images holds: images per lesion, and each class's share
    counted per image and per lesion (a lesion's class is its most frequent dx)."""
    n_lesions = part["lesion_id"].nunique()
    lesion_dx = part.groupby("lesion_id")["dx"].agg(lambda d: d.value_counts().index[0])
    prof = {"images_per_lesion": len(part) / max(n_lesions, 1)}
    for c in classes:
        prof[f"image_share_{c}"] = float((part["dx"] == c).mean()) if len(part) else 0.0
        prof[f"lesion_share_{c}"] = float((lesion_dx == c).mean()) if n_lesions else 0.0
    return prof


def population_metrics(kept: pd.DataFrame, classes: Sequence[str]) -> dict[str, float | str]:
    """Each split's population profile beside the whole set's, and the largest relative gap.

    ``max_population_gap`` = max over splits and profile entries of |split - whole| / whole:
    0.05 means every split's images per lesion and every class share (per image and per
    lesion) are within 5% of the whole set's. Val and test decide checkpoints, weights, the
    temperature and the malignant threshold, so they must look like the population."""
    whole = population_profile(kept, classes)
    m: dict[str, float | str] = {k: round(v, 4) for k, v in whole.items()}
    worst, where = 0.0, ""
    for s in SPLITS:
        part = kept[kept["split"] == s]
        m[f"{s}_n_lesions"] = int(part["lesion_id"].nunique())
        for k, v in population_profile(part, classes).items():
            m[f"{s}_{k}"] = round(v, 4)
            if whole[k] > 0 and abs(v - whole[k]) / whole[k] > worst:
                worst, where = abs(v - whole[k]) / whole[k], f"{s} {k}"
    m["max_population_gap"] = round(worst, 4)
    m["max_population_gap_at"] = where
    return m


def leakage(split: pd.DataFrame, dups: pd.DataFrame) -> dict[str, int]:
    """Independent check on the split as written: units found in more than one split.

    Uses ``assigned_split`` when present (a dropped image still belongs to its group's split),
    and only joined duplicate pairs (a refused pair is reported, not claimed)."""
    col = "assigned_split" if "assigned_split" in split.columns else "split"
    where = split.set_index("image_id")[col]
    out = {
        "leaking_group_ids": int((split.groupby("group_id")[col].nunique() > 1).sum()),
        "leaking_lesions": int((split.groupby("lesion_id")[col].nunique() > 1).sum()),
        "leaking_duplicate_pairs": 0,
    }
    if len(dups):
        joined = dups[dups["joined"].astype(str).str.lower() == "true"] if "joined" in dups else dups
        a = where.reindex(joined["image_id_a"]).to_numpy()
        b = where.reindex(joined["image_id_b"]).to_numpy()
        out["leaking_duplicate_pairs"] = int((a != b).sum())
    out["leaking_groups"] = sum(out.values())
    return out


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
    with process_pool(workers, [__name__]) as pool:
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
        tables.split.to_csv(tmp / "split.csv", index=False, lineterminator="\n")
        tables.duplicates.to_csv(tmp / "duplicates.csv", index=False, lineterminator="\n")
        und.to_csv(tmp / "undecodable.csv", index=False, lineterminator="\n")
        # The guarantee is checked on the files as written, by code that shares nothing with
        # the assignment: a bug there fails the stage instead of leaking.
        leaks = leakage(
            pd.read_csv(tmp / "split.csv", dtype=str, keep_default_na=False),
            pd.read_csv(tmp / "duplicates.csv", dtype=str, keep_default_na=False),
        )
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
