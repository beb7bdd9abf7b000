"""Near-duplicate detection: which images show the same lesion, whatever their ``lesion_id``.

Several images of one lesion, or one lesion catalogued under two ``lesion_id`` values, landing on
both sides of a split is the leakage that makes most published HAM10000 numbers meaningless. The
split stage finds such pictures in three steps (grouping them is :mod:`skinlesion.checks.leakage`):

1. Features (parallel, JPEG draft mode, grey only): a 64-bit pHash (imagehash) and a 72x72 grey
   thumbnail of the image centre (:func:`compute_features`).
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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from tqdm import tqdm

from skinlesion.core.parallel import in_order_on

HASH_BITS = 64
THUMB = 72  # side of the grey centre square kept per image for verification
# Draft/resize target (4:3 like HAM10000); the centre THUMB x THUMB square is kept.
THUMB_WH = (96, 72)
FINE_T, COARSE_T = 48, 24  # template sides: +-12 px of search at 72, +-6 px at 36
HIGHPASS_SIGMA = 1.0  # px at 72; removes the lesion's blob shape, keeps texture, hair, dots
HASH_CHUNK = 256  # images per worker task
VERIFY_CHUNK = 512  # candidate pairs per worker task


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


def search_plan(n: int, radius: int, bits: int = HASH_BITS) -> tuple[int, int] | None:
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

    ``method``: ``index`` (multi-index search, see :func:`search_plan`), ``brute``, or ``auto`` (the
    cheaper by a cost model). Returns (pairs (M, 2) int64 sorted, Hamming distances (M,)).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return _finish(h, [])
    plan = search_plan(n, radius)
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
