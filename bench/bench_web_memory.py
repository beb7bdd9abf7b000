"""Benchmark: peak memory of the web app under 8 concurrent worst-case uploads, with the pixel
budget and without it, side by side in one run.

A worst case is a small file that decodes to the most memory the pixel cap lets through, just
under the project's pixel cap, a few hundred KB on the wire: an RGBA PNG (the 8-bit mode that
costs the most per pixel: 4 bytes decoded plus the RGB copy) and a 16-bit grey PNG (scaled to 8
bits through numpy by skinlesion.core.images). Each run starts ``python -m serve.web`` in a fresh process
on 127.0.0.1 with the project's bundle; 8 clients post one such image each to
``POST /api/predict`` at the same moment. The server's own high-water mark (``VmHWM``: one
process, decoding on threads) is read after the 8 answers; its resident set before them is the
baseline. ``/healthz`` reports the most pixels the budget had in decoding at once.

Configurations: the defaults (pixel budget 2x the cap, one decode thread per core); the budget
with 8 decode threads (the budget alone bounds memory, whatever the pool); no budget with 8
decode threads (what the app did before: Starlette's pool of ~40 threads decoded all 8 at once).

    python -m bench.bench_web_memory            # writes bench/results/web_memory.md (~2.5 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

from bench.common import machine_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "web_memory.md"
OUT = REPO / "bench" / "out" / "web_memory"
CLIENTS = 8
DEFAULTS = ("budget (defaults)", [])
WIDE = ("budget, 8 decode threads", ["--decode-workers", "8"])
NO_BUDGET = ("no budget, 8 decode threads", ["--decode-workers", "8", "--pixel-budget-mp", "1000000"])
# (image kind, configuration): every configuration on the RGBA image, the two ends on the 16-bit one.
RUNS = [("rgba", DEFAULTS), ("rgba", WIDE), ("rgba", NO_BUDGET), ("grey16", DEFAULTS), ("grey16", NO_BUDGET)]
KINDS = {"rgba": "RGBA PNG", "grey16": "16-bit grey PNG"}


def _cap(bundle: Path) -> int:
    from serve.predictor import bundle_pixel_cap
    from skinlesion.model.bundle_json import read_bundle_json

    return bundle_pixel_cap(bundle, read_bundle_json(bundle).get("params"))


def _worst_png(cap: int, kind: str) -> Path:
    """A square PNG of at most ``cap`` pixels (the largest square under it) that compresses well."""
    import numpy as np
    from PIL import Image, ImageDraw

    side = math.isqrt(cap)
    path = OUT / f"{kind}_{side}x{side}.png"
    if path.is_file():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    if kind == "rgba":
        img = Image.new("RGBA", (side, side), (182, 120, 96, 255))
        box = (side // 3, side // 3, 2 * side // 3, 2 * side // 3)
        ImageDraw.Draw(img).ellipse(box, fill=(90, 50, 40, 255))
    else:  # a horizontal ramp over most of the 16-bit range
        ramp = np.linspace(8000, 50000, side).astype("<u2")
        img = Image.frombytes("I;16", (side, side), np.broadcast_to(ramp, (side, side)).tobytes())
    img.save(path, "PNG")
    return path


def _vm(pid: int, key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of a process, MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def _run(bundle: Path, png: bytes, name: str, opts: list[str]) -> dict:
    import httpx

    from bench.webapp import web_app

    with web_app(bundle, *opts, start_timeout_s=120) as app:
        url, server = app.url, app.process
        time.sleep(1.0)
        baseline = _vm(server.pid, "VmRSS")
        statuses: list[int] = []
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                start.wait()
                r = c.post(url + "/api/predict", files=[("files", (f"worst_{i}.png", png, "image/png"))])
                statuses.append(r.status_code)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        peak = _vm(server.pid, "VmHWM")
        limits = httpx.get(url + "/healthz", timeout=10).json()["limits"]
    print(
        f"{name}: baseline {baseline:.0f} MB, peak {peak:.0f} MB, {seconds:.1f} s, {sorted(statuses)}",
        flush=True,
    )
    return {"name": name, "opts": opts, "baseline": baseline, "peak": peak, "seconds": seconds,
            "statuses": sorted(statuses), "limits": limits}  # fmt: skip


def _write(runs: list[dict], cap: int, sizes_kb: dict[str, float], bundle: Path) -> None:

    side = math.isqrt(cap)
    rows = []
    for r in runs:
        lim = r["limits"]
        budget = "none" if lim["pixel_budget"] >= 10**12 else f"{lim['pixel_budget'] / 1e6:g} MP"
        ok = sum(s == 200 for s in r["statuses"])
        others = ", ".join(f"{s}" for s in r["statuses"] if s != 200) or "-"
        cells = [
            KINDS[r["kind"]], r["name"], lim["decode_workers"], budget, f"{lim['pixels_peak'] / 1e6:.0f} MP",
            f"{r['baseline']:.0f}", f"{r['peak']:.0f}", f"{r['peak'] - r['baseline']:.0f}",
            f"{ok}/{CLIENTS} ({others})", f"{r['seconds']:.1f}",
        ]  # fmt: skip
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")

    def run(kind: str, config: tuple[str, list[str]]) -> dict:
        return next(r for r in runs if r["kind"] == kind and r["name"] == config[0])

    def over(r: dict) -> float:
        return r["peak"] - r["baseline"]

    ratios = []
    for kind in KINDS:
        a, b = run(kind, DEFAULTS), run(kind, NO_BUDGET)
        ratios.append(
            f"{KINDS[kind]}: **{over(b) / over(a):.1f}x** ({over(b):.0f} MB / {over(a):.0f} MB; peak RSS "
            f"{b['peak']:.0f} / {a['peak']:.0f} MB = {b['peak'] / a['peak']:.2f}x)"
        )
    costs = {
        kind: max(over(r) * 2**20 / r["limits"]["pixels_peak"] for r in runs if r["kind"] == kind)
        for kind in KINDS
    }
    bpp = max(costs.values())
    defaults = run("rgba", DEFAULTS)
    wide = run("rgba", WIDE)
    budget_px = defaults["limits"]["pixel_budget"]
    decode_mb = budget_px * bpp / 2**20
    uploads = defaults["limits"]["upload_budget_bytes"] / 2**20
    busy = [r for r in runs if r["limits"]["pixel_budget"] < 10**12 and any(s != 200 for s in r["statuses"])]
    refused = f"{len(busy)} of the budget runs had some" if busy else "none did here"
    at_once = round(defaults["limits"]["pixels_peak"] / (side * side))
    shown = bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle
    head = (
        "| image | configuration | decode threads | pixel budget | pixels in decoding at once "
        "| baseline RSS (MB) | peak RSS (MB) | peak over baseline (MB) | answered 200 | seconds |"
    )
    per_kind = "; ".join(
        f"{KINDS[k]} ({sizes_kb[k]:.0f} KB on the wire): up to {costs[k]:.1f} B" for k in KINDS
    )
    paragraphs = [
        f"# Web app: peak memory under {CLIENTS} concurrent worst-case uploads",
        f"{CLIENTS} clients post at once, each one image to `POST /api/predict` of `python -m serve.web` "
        f"(a fresh process per run, bundle `{shown}`): a PNG of {side}x{side} = {side * side:,} pixels, "
        f"just under the project's pixel cap of {cap:,} (the stricter of the bundle's `validate.max_pixels` "
        "and `drift.max_pixels`), RGBA (the 8-bit mode that costs the most) or 16-bit grey (scaled to "
        "8 bits by skinlesion.core.images). Peak = the server process's `VmHWM` after the answers; "
        'baseline = its resident set before them (TensorFlow and the members loaded). "Pixels in decoding '
        'at once" is '
        "the budget's own high-water mark (`/healthz`).",
        "\n".join([head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]),
        "Peak over baseline without the budget / with it (defaults): " + "; ".join(ratios) + ". "
        f"With the budget and 8 decode threads: {over(wide):.0f} MB over baseline on the RGBA image "
        f"({wide['limits']['pixels_peak'] / 1e6:.0f} MP at once, as with "
        f"{defaults['limits']['decode_workers']} threads): the budget, not the size of the pool, is what "
        "bounds it.",
        f"Bytes per pixel in decoding (peak over baseline / pixels in decoding at once): {per_kind}. "
        "The app fixes glibc's mmap threshold at startup, so a decode thread does not keep the blocks "
        "of the last image it decoded (without that, 8 threads added ~300 MB). The documented bound of "
        f"the web app's memory is therefore: baseline + pixel budget x {math.ceil(bpp)} B + the upload "
        f"budget (the bytes of uploads held; default 2 full uploads = {uploads:.0f} MB), i.e. "
        f"{defaults['baseline']:.0f} + {decode_mb:.0f} + {uploads:.0f} = "
        f"{defaults['baseline'] + decode_mb + uploads:.0f} MB at the defaults for this bundle (pixel "
        f"budget {budget_px / 1e6:g} MP = 2x the cap). A request that cannot get its pixels waits in line "
        "(first come, first served, at most 15 s), then gets 503 with `Retry-After`; "
        f"{refused} ({CLIENTS} images of {cap / 1e6:g} MP, {at_once} at a time). Without the budget the "
        f"growth follows the number of uploads in flight: {CLIENTS} here, and nothing stopped 40 "
        "(Starlette's thread pool, which decoded them before) from going at once.",
        "Reproduce: `python -m bench.bench_web_memory` (or `python -m bench.run web_memory`); the images "
        "are made once under bench/out/web_memory/.",
        f"Machine: {machine_text()}. Load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(a shared machine: other jobs slow the times, not the memory).",
    ]
    RESULTS.write_text("\n\n".join(paragraphs) + "\n")
    (OUT / "runs.json").write_text(json.dumps(runs, indent=2))
    print(f"bound: {defaults['baseline']:.0f} + {decode_mb:.0f} + {uploads:.0f} MB; wrote {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_web_memory", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, default=REPO / "models" / "ensemble", help="bundle (default models/ensemble)"
    )
    args = ap.parse_args(argv)
    from skinlesion.model.bundle_json import BUNDLE_JSON, is_bundle

    if not is_bundle(args.bundle):
        print(f"error: {args.bundle}: no {BUNDLE_JSON} (run the pipeline, or give --bundle)", file=sys.stderr)
        return 1
    cap = _cap(args.bundle)
    pngs = {kind: _worst_png(cap, kind) for kind in KINDS}
    runs = []
    for kind, (name, opts) in RUNS:
        r = _run(args.bundle, pngs[kind].read_bytes(), f"{kind}: {name}", opts)
        runs.append({**r, "kind": kind, "name": name})
    _write(runs, cap, {k: p.stat().st_size / 1024 for k, p in pngs.items()}, args.bundle.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
