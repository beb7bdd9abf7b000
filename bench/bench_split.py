"""Benchmark: the split stage's hashing + near-duplicate search vs a naive baseline.

Side by side in one run:

(a) On the 9,247 real thumbnails in ../shared/data/ham10000 (page cache warm):
    * ``naive``: ``Image.open(p).convert("L")`` (full decode) + ``imagehash.phash``, one process,
      then a Python loop over every pair (``h[i] - h[j] <= radius``). The pair loop is timed on
      the first ``--pair-sample`` images and extrapolated quadratically to all of them (the
      full loop is 42.7 M pairs); the figure says so.
    * ``split, 1 worker`` / ``split, N workers``: :func:`skinlesion.checks.duplicates.compute_features`
      (draft-mode decode, pHash and the verification thumbnail) +
      :func:`skinlesion.checks.duplicates.near_pairs`.
    * the whole stage once (:func:`stages.split.run`), with its hash / search / verify times.
(b) :func:`skinlesion.checks.duplicates.near_pairs` on 25k, 50k and 100k random 64-bit hashes at radius 4, 8
    (the default) and 10, with the growth from 25k to 100k (quadratic would be 16x), next to the
    blocked brute-force XOR-popcount (vectorised numpy, O(N^2)).
(c) The verifier's threshold on the real data: every candidate and every same-lesion pair scored,
    counted per threshold as same lesion / other lesion / other diagnosis.

    python -m bench.bench_split            # writes bench/results/split.md
    python -m bench.bench_split --reps 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_text, pillow_version

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "split.md"
SHARED = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))
SIZES = (25_000, 50_000, 100_000)
RADII = (4, 8, 10)


def naive_hashes(paths: list[Path]) -> list:
    """The baseline's hashing: full decode, then imagehash's pHash, one image after another."""
    import imagehash
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(imagehash.phash(im.convert("L")))
    return out


def naive_pairs(hashes: list, radius: int) -> list[tuple[int, int]]:
    """The baseline's search: every pair, in Python."""
    n = len(hashes)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if hashes[i] - hashes[j] <= radius]


def _threshold_table(data: Path, paths: list[Path], feats, candidates: np.ndarray, workers: int) -> dict:
    """Verified pairs by threshold: same lesion (true), other lesion, other diagnosis (false)."""
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    from skinlesion.checks.duplicates import score_candidates

    meta = pd.read_csv(data / "HAM10000_metadata.csv", dtype=str).set_index("image_id")
    meta = meta.loc[[p.stem for p in paths]]
    lesion, dx = meta["lesion_id"].to_numpy(), meta["dx"].to_numpy()
    codes = pd.factorize(lesion)[0]
    rows = np.argsort(codes, kind="stable")
    same = [
        (min(a, b), max(a, b))
        for g in np.split(rows, np.flatnonzero(np.diff(codes[rows])) + 1)
        for i, a in enumerate(g.tolist())
        for b in g[i + 1 :].tolist()
    ]
    pairs = np.unique(np.r_[candidates, np.array(same, dtype=np.int64).reshape(-1, 2)], axis=0)
    is_cand = np.isin(
        pairs[:, 0] * len(paths) + pairs[:, 1], candidates[:, 0] * len(paths) + candidates[:, 1]
    )
    with ProcessPoolExecutor(workers) as pool:
        score = score_candidates(feats.thumbs, pairs, -2.0, pool)
    a, b = pairs[:, 0], pairs[:, 1]
    same_l, cross_dx = lesion[a] == lesion[b], dx[a] != dx[b]
    table = {}
    for t in (0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8):
        ok = score >= t
        table[t] = {
            "same_lesion": int((ok & is_cand & same_l).sum()),
            "other_lesion_same_dx": int((ok & is_cand & ~same_l & ~cross_dx).sum()),
            "other_dx": int((ok & is_cand & cross_dx).sum()),
            "same_lesion_any_distance": int((ok & same_l).sum()),
        }
    return {
        "table": table,
        "n_candidates": int(is_cand.sum()),
        "n_same_lesion_pairs": int(same_l.sum()),
        "n_same_lesion_candidates": int((is_cand & same_l).sum()),
        "max_other_dx_score": float(score[is_cand & cross_dx].max()) if (is_cand & cross_dx).any() else None,
    }


def _best(reps: int, fn) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_bench(
    *,
    data: Path = SHARED,
    reps: int = 3,
    workers: int = 0,
    pair_sample: int = 2000,
    out_md: Path | None = RESULTS,
) -> dict:
    """Time everything; write ``out_md`` (markdown) and return the figures."""
    from concurrent.futures import ProcessPoolExecutor

    from skinlesion.checks.duplicates import compute_features, near_pairs, near_pairs_bruteforce
    from skinlesion.core.parallel import n_workers
    from skinlesion.params.load import parse_params
    from stages.split import run

    images = data / "images_200x150"
    paths = sorted(images.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: no images in {images}; set HAM10000_DIR")
    for p in paths:  # warm the page cache: we time decoding, not the disk
        p.read_bytes()
    n, w = len(paths), n_workers(workers)
    params = parse_params({"split": {"workers": w}})
    radius = params.split.hash_radius
    load_before = os.getloadavg()[0]

    # (a) real images
    t0 = time.perf_counter()
    hashes = naive_hashes(paths)
    naive_hash_s = time.perf_counter() - t0
    k = min(pair_sample, n)
    t0 = time.perf_counter()
    sample_pairs = naive_pairs(hashes[:k], radius)
    naive_pair_sample_s = time.perf_counter() - t0
    naive_pair_s = naive_pair_sample_s * (n * (n - 1)) / (k * (k - 1))

    def ours(pool) -> tuple:
        feats = compute_features(paths, pool)
        return feats, near_pairs(feats.hashes, radius)[0]

    ours1_s, (feats, p1) = _best(reps, lambda: ours(None))
    h1 = feats.hashes

    def ours_parallel():
        with ProcessPoolExecutor(w) as pool:  # pool start-up is part of the cost
            return ours(pool)

    oursn_s, (fn, pn) = _best(reps, ours_parallel)
    assert (h1 == fn.hashes).all() and (p1 == pn).all()
    # Exactness: on the sample, the index search returns the pairs of a plain Python loop over
    # the same (draft-decoded) hashes.
    ints = [int(x) for x in h1[:k]]
    ref = {(i, j) for i in range(k) for j in range(i + 1, k) if (ints[i] ^ ints[j]).bit_count() <= radius}
    assert {tuple(x) for x in p1.tolist() if x[1] < k} == ref, "search disagrees with the naive loop"
    # Draft decoding changes the pHash a little: how much, against the full-decode hash.
    full = np.array([int.from_bytes(np.packbits(x.hash.ravel()).tobytes(), "big") for x in hashes], np.uint64)
    drift = np.bitwise_count(full ^ h1)
    t_search, _ = _best(reps, lambda: near_pairs(h1, radius))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        (root / "raw" / "metadata.csv").write_bytes((data / "HAM10000_metadata.csv").read_bytes())
        (root / "raw" / "images").symlink_to(images)
        t0 = time.perf_counter()
        res = run(params.split, seed=42, raw_dir=root / "raw", out_dir=root / "split",
                  metrics_path=root / "m.json", plots_dir=root / "plots")  # fmt: skip
        stage_s = time.perf_counter() - t0

    # (c) the verifier's threshold: every candidate and every same-lesion pair, fully scored
    thresholds = _threshold_table(data, paths, feats, p1, w)

    # (b) random hashes
    rng = np.random.default_rng(0)
    search: dict[int, dict[int, float]] = {r: {} for r in RADII}
    brute: dict[int, float] = {}
    for size in SIZES:
        h = rng.integers(0, 2**64 - 1, size=size, dtype=np.uint64, endpoint=True)
        for r in RADII:
            search[r][size], _ = _best(reps, lambda h=h, r=r: near_pairs(h, r))
        brute[size], _ = _best(1, lambda h=h: near_pairs_bruteforce(h, radius))

    figures = {
        "n_images": n,
        "workers": w,
        "reps": reps,
        "radius": radius,
        "naive_hash_s": naive_hash_s,
        "naive_pair_sample": k,
        "naive_pair_sample_s": naive_pair_sample_s,
        "naive_pair_s": naive_pair_s,
        "naive_s": naive_hash_s + naive_pair_s,
        "ours1_s": ours1_s,
        "oursn_s": oursn_s,
        "search_real_s": t_search,
        "n_candidates": len(p1),
        "naive_sample_pairs": len(sample_pairs),
        "draft_hash_identical": float((drift == 0).mean()),
        "draft_hash_mean_bits": float(drift.mean()),
        "stage_s": stage_s,
        "stage_seconds": res.seconds,
        "stage_metrics": res.metrics,
        "thresholds": thresholds,
        "verify_threshold": params.split.verify_threshold,
        "random_search_s": search,
        "random_brute_s": brute,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "machine": machine_text(numpy=np.__version__, pillow=pillow_version()),
    }
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(_markdown(figures))
    return figures


def _markdown(f: dict) -> str:
    n = f["n_images"]
    m, sec, th = f["stage_metrics"], f["stage_seconds"], f["thresholds"]
    ips = lambda s: f"{n / s:,.0f}"  # noqa: E731
    lines = [
        "# split: hashing + near-duplicate search",
        "",
        f"Reproduce: `python -m bench.bench_split` (or `python -m bench.run split`). {f['machine']}; "
        f"1-min load average before/after: {f['load_average'][0]} / {f['load_average'][1]}; "
        f"best of {f['reps']} unless said otherwise.",
        "",
        f"## (a) {n:,} real HAM10000 thumbnails (200x150 JPEG), pHash radius {f['radius']}",
        "",
        "| method | wall s | images/s |",
        "| --- | ---: | ---: |",
        f"| naive: full decode + imagehash pHash, 1 process | {f['naive_hash_s']:.2f} "
        f"| {ips(f['naive_hash_s'])} |",
        f"| naive: Python pairwise loop (timed on {f['naive_pair_sample']:,} images: "
        f"{f['naive_pair_sample_s']:.2f} s, extrapolated x N^2) | {f['naive_pair_s']:.1f} | |",
        f"| **naive total** (1 run) | **{f['naive_s']:.1f}** | **{ips(f['naive_s'])}** |",
        f"| split, 1 worker: draft decode + pHash + thumbnail + index search | {f['ours1_s']:.2f} "
        f"| {ips(f['ours1_s'])} |",
        f"| **split, {f['workers']} workers** (pool start included) | **{f['oursn_s']:.2f}** "
        f"| **{ips(f['oursn_s'])}** |",
        "",
        f"Ratio (split, {f['workers']} workers vs naive): **{f['naive_s'] / f['oursn_s']:.0f}x**; "
        f"hashing alone {f['naive_hash_s'] / f['ours1_s']:.1f}x on one core (the split also makes the "
        f"verification thumbnail). The search itself takes {f['search_real_s'] * 1000:.0f} ms for "
        f"{f['n_candidates']:,} candidate pairs; on the first {f['naive_pair_sample']:,} images it "
        "returns exactly the pairs of a Python loop over the same hashes (checked). Draft-mode "
        f"decoding changes the pHash slightly: {f['draft_hash_identical']:.0%} of images get the "
        f"full-decode hash bit for bit, {f['draft_hash_mean_bits']:.2f} bits differ on average "
        f"(the naive loop found {f['naive_sample_pairs']} pairs on its sample).",
        "",
        f"Whole stage (`stages.split.run`, default params): {f['stage_s']:.1f} s = "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items())
        + f". Candidates {m['n_candidate_pairs']:,}, verified {m['n_near_duplicate_pairs']} "
        f"({m['n_cross_lesion_duplicate_pairs']} across lesion ids, "
        f"{m['n_cross_diagnosis_duplicate_pairs']} across diagnoses), same-lesion pair recall "
        f"{m['same_lesion_pair_recall']:.3f} of {m['same_lesion_pairs']:,}, largest group "
        f"{m['largest_group']}, leaking groups {m['leaking_groups']}.",
        "",
        "## (b) search on random 64-bit hashes",
        "",
        "| hashes | "
        + " | ".join(f"radius {r} s" for r in RADII)
        + f" | brute force (radius {f['radius']}) s |",
        "| ---: | " + " | ".join("---:" for _ in RADII) + " | ---: |",
    ]
    for size in SIZES:
        lines.append(
            f"| {size:,} | "
            + " | ".join(f"{f['random_search_s'][r][size]:.2f}" for r in RADII)
            + f" | {f['random_brute_s'][size]:.2f} |"
        )
    a, b = SIZES[0], SIZES[-1]
    lines.append(
        f"| growth {a // 1000}k -> {b // 1000}k (quadratic = 16x) | "
        + " | ".join(f"{f['random_search_s'][r][b] / f['random_search_s'][r][a]:.1f}x" for r in RADII)
        + f" | {f['random_brute_s'][b] / f['random_brute_s'][a]:.1f}x |"
    )
    lines += [
        "",
        "The index cuts each hash into bands and files it under every key within t bits of its "
        "band (pigeonhole: a pair within the radius is close on some band; t = 0 at radius 4, 1 at "
        "8 and 10); the number of bands is chosen per radius and N by a cost model, so the work is "
        "sorting ~N x bands x (1 + band bits) entries plus chance collisions. At radius 10 the "
        "collisions start to dominate and the growth moves towards quadratic; at 12+ the cost model "
        "picks the blocked brute force. Random hashes are the index's best case; real pHashes of "
        f"dermoscopy cluster ({f['n_candidates']:,} pairs within {f['radius']} bits among {n:,} "
        "images, where random hashes would give ~0), and the candidates then cost more to verify "
        "than to find.",
        "",
    ]
    lines += [
        f"## (c) the verifier's threshold on the real data (pHash radius {f['radius']})",
        "",
        f"Every candidate pair ({th['n_candidates']:,}, of which {th['n_same_lesion_candidates']} same "
        f"lesion) and every same-lesion pair ({th['n_same_lesion_pairs']:,}, at any hash distance) "
        "scored without the prefilter. A pair with two diagnoses is a proven false positive; a "
        "pair of two lesion ids with one diagnosis may be either (the two at the default were "
        "checked by eye: the same picture catalogued twice). Highest score of a cross-diagnosis "
        f"candidate: {th['max_other_dx_score']:.3f}. Default `split.verify_threshold`: "
        f"{f['verify_threshold']}.",
        "",
        "| threshold | verified: same lesion | other lesion, same dx | other dx | recall of same-lesion "
        "pairs | same-lesion pairs above it at any hash distance |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t, r in th["table"].items():
        lines.append(
            f"| {t} | {r['same_lesion']} | {r['other_lesion_same_dx']} | {r['other_dx']} "
            f"| {r['same_lesion'] / th['n_same_lesion_pairs']:.3f} | {r['same_lesion_any_distance']} |"
        )
    lines += [
        "",
        "Most same-lesion pairs are re-shots (zoomed, turned, re-lit) that score low: only the "
        "last column's pairs pass at all, while at a wider radius (14, measured while tuning) "
        "cross-diagnosis candidates reach 0.49. So the recall is low by design and the threshold "
        "sits where no cross-diagnosis pair passes, with margin. The last column is the ceiling a "
        "wider hash radius could reach with this verifier.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_split", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the fast modes; the best is kept")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    ap.add_argument("--pair-sample", type=int, default=2000, help="images in the timed naive pair loop")
    ap.add_argument("--out-md", type=Path, default=RESULTS, help="results file")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    f = run_bench(reps=args.reps, workers=args.workers, pair_sample=args.pair_sample, out_md=args.out_md)
    print(
        f"{f['n_images']} images: naive {f['naive_s']:.1f} s (pairs extrapolated), split x{f['workers']} "
        f"{f['oursn_s']:.2f} s ({f['naive_s'] / f['oursn_s']:.0f}x); stage {f['stage_s']:.1f} s; "
        f"random search radius {RADII[1]}: "
        + ", ".join(f"{s // 1000}k {f['random_search_s'][RADII[1]][s]:.2f} s" for s in SIZES)
        + f" -> {args.out_md}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
