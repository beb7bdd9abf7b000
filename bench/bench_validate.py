"""Benchmark: the validate stage's full-decode image check vs a plain sequential Pillow loop.

On the 9,247 real thumbnails in ../shared/data/ham10000 (page cache warmed first), side by side:

* ``plain loop``: ``for p in paths: Image.open(p).load()``, one process: what a notebook does;
* ``check, 1 worker``: :func:`skinlesion.checks.imagefacts.inspect_images` in-process: the same full decode
  plus what the stage adds per file (read the bytes once, sha256, header size check);
* ``check, N workers``: the same over the stage's process pool (all cores), pool start included;
* ``stage end to end``: :func:`stages.validate.run` once (decode + GX suites + Data Docs).

Runs alternate between the modes and the best of ``--reps`` is kept (the machine is shared).

    python -m bench.bench_validate            # writes bench/results/validate.md
    python -m bench.bench_validate --reps 1
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from bench.common import machine_text, pillow_version

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "validate.md"
SHARED = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))


def plain_loop(paths: list[Path]) -> int:
    """The baseline: decode every image fully, one after the other; returns the failures."""
    bad = 0
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
        except OSError:
            bad += 1
    return bad


def _lesion_split(meta: pd.DataFrame) -> pd.DataFrame:
    """Any lesion-grouped split will do for timing the stage: 70/15/15 by lesion hash."""
    h = pd.util.hash_pandas_object(meta["lesion_id"], index=False) % 100
    split = pd.cut(h, [-1, 69, 84, 99], labels=["train", "val", "test"]).astype(str)
    return meta[["image_id", "lesion_id"]].assign(group_id=meta["lesion_id"], dx=meta["dx"], split=split)


def run_bench(*, data: Path = SHARED, reps: int = 3, workers: int = 0, out_md: Path | None = RESULTS) -> dict:
    """Time the modes on the real images; write ``out_md`` (markdown) and return the figures."""
    from skinlesion.checks.imagefacts import inspect_images
    from skinlesion.core.parallel import n_workers
    from skinlesion.params.load import parse_params
    from stages.validate import run

    images = data / "images_200x150"
    paths = sorted(images.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: no images in {images}; set HAM10000_DIR")
    for p in paths:  # warm the page cache: we time decoding, not the disk
        p.read_bytes()
    n, w = len(paths), n_workers(workers)
    params = parse_params({"validate": {"workers": w}})
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def cpu_now() -> float:  # this process and its finished children (the pool's workers)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def timed(name: str, fn) -> Any:
        c0, t0 = cpu_now(), time.perf_counter()
        out = fn()
        wall, used = time.perf_counter() - t0, cpu_now() - c0
        if wall < best.get(name, float("inf")):
            best[name], cpu[name] = wall, used
        return out

    load_before = os.getloadavg()[0]
    for _ in range(reps):
        assert timed("plain", lambda: plain_loop(paths)) == 0
        seq = timed("check1", lambda: inspect_images(paths, params.validate.max_pixels, 1, progress=False))
        par = timed("checkN", lambda: inspect_images(paths, params.validate.max_pixels, w, progress=False))
        assert seq == par and not any(f["error"] for f in par)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        (root / "raw" / "metadata.csv").write_bytes((data / "HAM10000_metadata.csv").read_bytes())
        (root / "raw" / "images").symlink_to(images)
        (root / "split").mkdir()
        meta = pd.read_csv(data / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
        _lesion_split(meta).to_csv(root / "split" / "split.csv", index=False)
        p = parse_params({"validate": {"workers": w, "fraction_tolerance": 0.1}})
        res = timed(
            "stage",
            lambda: run(p.validate, fractions=p.split.fractions, raw=root / "raw", split=root / "split",
                        out=root / "out", report=root / "report", metrics=root / "m.json", progress=False),
        )  # fmt: skip
        decode_s = res.metrics["decode_seconds"]

    figures = {
        "n_images": n,
        "workers": w,
        "reps": reps,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "images_per_s": {k: round(n / v) for k, v in best.items() if k != "stage"},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "speedup_parallel_vs_plain": round(best["plain"] / best["checkN"], 2),
        "speedup_parallel_vs_check1": round(best["check1"] / best["checkN"], 2),
        "stage_decode_seconds": decode_s,
        "stage_passed": res.passed,
        # other jobs on the machine take cores from the pool: the load average says how many
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "machine": machine_text(pillow=pillow_version()),
    }
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(_markdown(figures))
    return figures


def _markdown(f: dict) -> str:
    s, ips, c = f["seconds"], f["images_per_s"], f["cpu_seconds"]
    return "\n".join(
        [
            "# validate: full-decode image check",
            "",
            f"{f['n_images']:,} real HAM10000 thumbnails (200x150 JPEG), page cache warm, "
            f"best of {f['reps']}; {f['machine']}; 1-min load average before/after: "
            f"{f['load_average'][0]} / {f['load_average'][1]} (other jobs on the machine compete "
            "for the same cores). Reproduce: `python -m bench.bench_validate`.",
            "",
            "| mode | wall s | images/s | CPU s (all processes) |",
            "| --- | ---: | ---: | ---: |",
            f"| plain sequential loop: `Image.open(p).load()` | {s['plain']:.2f} | {ips['plain']:,} "
            f"| {c['plain']:.2f} |",
            f"| validate check, 1 worker (+ bytes, sha256, header check) | {s['check1']:.2f} "
            f"| {ips['check1']:,} | {c['check1']:.2f} |",
            f"| validate check, {f['workers']} workers (process pool) | {s['checkN']:.2f} "
            f"| {ips['checkN']:,} | {c['checkN']:.2f} |",
            f"| whole stage (`stages.validate.run`: decode + 9 GX validations + Data Docs) "
            f"| {s['stage']:.2f} | | {c['stage']:.2f} |",
            "",
            f"Parallel check vs plain loop: **{f['speedup_parallel_vs_plain']}x**; "
            f"vs the same check on 1 worker: {f['speedup_parallel_vs_check1']}x. "
            f"In the stage run, the image check took {f['stage_decode_seconds']:.2f} s; the rest is "
            "reading the CSVs, importing Great Expectations (~2-3 s), the suites and the Data Docs.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_validate", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per mode; the best is kept")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    ap.add_argument("--out-md", type=Path, default=RESULTS, help="results file")
    args = ap.parse_args(argv)
    figures = run_bench(reps=args.reps, workers=args.workers, out_md=args.out_md)
    s = figures["seconds"]
    print(
        f"{figures['n_images']} images: plain loop {s['plain']:.2f} s, check x1 {s['check1']:.2f} s, "
        f"check x{figures['workers']} {s['checkN']:.2f} s "
        f"({figures['speedup_parallel_vs_plain']}x vs plain), "
        f"load {figures['load_average']}, "
        f"stage {s['stage']:.2f} s -> {args.out_md}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
