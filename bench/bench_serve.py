"""Benchmark: using the model bundle (serve/) vs the naive per-image Keras loop.

Side by side in one run, on real HAM10000 thumbnails (../shared/data/ham10000/images_200x150),
for a 2-member bundle and a 3-member bundle:

* **bundle load**: ``Predictor.load`` (every member with ``safe_mode=True``, md5 checked), and the
  TensorFlow import before it;
* **single image, CLI path**: one image through ``Predictor.predict_paths`` (decode with JPEG draft
  mode, every member, temperature, threshold, risk) with the bundle already loaded: p50 / p95;
  and the cold start of the whole command ``python -m serve.predict IMAGE`` (process, imports,
  load, one prediction);
* **single image, web endpoint**: ``POST /api/predict`` with one image to ``python -m serve.web``
  running as its own process on 127.0.0.1 (multipart upload, checks, decode, model, JSON), without
  and with the Grad-CAM overlay: p50 / p95 over HTTP, measured by the client;
* **batch throughput**: images/s through ``predict_paths`` at batch 1, 32 and 256 (decode in the
  main process, so the figures are the model's and the pipeline's, not extra cores');
* **naive**: what published notebooks do, a Python loop over the files with
  ``np.asarray(Image.open(p).convert("RGB").resize((S, S)))[None]`` and ``model.predict(x)`` per
  image and per member, the same weights and image-only calibration applied in numpy afterwards.

Every measurement runs in a fresh child process (timed inside the child, after imports, except
the cold start); images are distinct (no result cache hit: the predictor's cache is off), the
first call of each kind is a warm-up and not counted.

The bundle: ``--bundle DIR`` (default: ``models/production``, else ``models/ensemble`` when the
pipeline has made one), else a bundle of the demo's shape is built (mobilenetv2 + custom_cnn at
64 px, untrained weights: latency does not depend on what the weights are). The 3-member bundle is
made from it by copying a member folder and editing ``bundle.json`` (see :func:`three_members`).

    python -m bench.bench_serve                   # writes bench/results/serve.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.md"
SHARED = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))
BATCHES = (1, 32, 256)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _images(n: int, offset: int = 0) -> list[Path]:
    files = sorted((SHARED / "images_200x150").glob("*.jpg"))
    if len(files) < offset + n:
        raise SystemExit(
            f"error: need {offset + n} images in {SHARED / 'images_200x150'}, found {len(files)}"
        )
    return files[offset : offset + n]


# --------------------------------------------------------------------------- bundles


def demo_shaped_bundle(root: Path, size: int = 64) -> Path:
    """A bundle with the demo's members (mobilenetv2 + custom_cnn at ``size`` px), untrained."""
    import keras

    from skinlesion.core.schema import CLASSES
    from skinlesion.measure.scoring import IMAGE_ONLY, OperatingPoint
    from skinlesion.model.bundle_json import file_md5, write_bundle_json
    from skinlesion.model.networks import ModelSpec, build_backbone, build_model

    keras.utils.set_random_seed(0)
    members = []
    for name, weight in (("mobilenetv2", 0.6), ("custom_cnn", 0.4)):
        bb, _ = build_backbone(name, size, "none")
        model = build_model(ModelSpec(backbone=name, image_size=size), bb, pretrained=False)
        path = root / "members" / name / "model.keras"
        path.parent.mkdir(parents=True)
        model.save(path)
        members.append(
            {"name": name, "weight": weight, "path": f"members/{name}/model.keras", "md5": file_md5(path)}
        )
    meta = {
        "created": "bench", "classes": list(CLASSES),
        "malignant": ["akiec", "bcc", "mel"], "image_size": size, "aspect": "crop", "members": members,
        "operating_points": {IMAGE_ONLY: OperatingPoint(1.2, 0.3).to_json()},
        "data_version": {"path": "bench", "md5": None}, "params": {"prepare": {"draft_gap": 2.0}},
    }  # fmt: skip
    write_bundle_json(root, meta)
    return root


def three_members(src: Path, dest: Path) -> Path:
    """A 3-member bundle from any bundle: copy the folder, copy member folders until there are 3
    (``members/<name>`` -> ``members/<name>_copy<k>``), list them in bundle.json with equal weights
    and their md5. The copies have the same weights as their source, so the ensemble's output
    equals the source's; what changes is the work per image, which is what is measured."""
    from skinlesion.model.bundle_json import file_md5, read_bundle_json, write_bundle_json

    shutil.copytree(src, dest)
    meta = read_bundle_json(dest)
    members = [m for m in meta["members"] if float(m["weight"]) > 0]
    k = 0
    while len(members) < 3:
        base = members[k % len(members)]
        name = f"{base['name']}_copy{k + 1}"
        shutil.copytree(dest / Path(base["path"]).parent, dest / "members" / name)
        path = f"members/{name}/model.keras"
        members.append({**base, "name": name, "path": path, "md5": file_md5(dest / path)})
        k += 1
    for m in members:
        m["weight"] = 1.0 / len(members)
    meta["members"] = members[:3] if len(members) > 3 else members
    write_bundle_json(dest, meta)
    return dest


# --------------------------------------------------------------------------- child side


def _child_ours(bundle: Path, n_single: int, n_batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import keras  # noqa: F401  (TensorFlow's import, timed apart from the bundle's load)

    from serve.predictor import Predictor

    t1 = time.perf_counter()
    predictor = Predictor.load(bundle, cache_size=0)
    t2 = time.perf_counter()
    single = _images(n_single + 1)
    items = [(p.name, str(p), None) for p in single]
    times = []
    for i, item in enumerate(items):
        s = time.perf_counter()
        (pred,) = list(predictor.predict_paths([item], batch_size=1, workers=1, progress=False))
        assert pred.ok, pred.error
        if i:  # the first call builds Keras's call path: a warm-up
            times.append(time.perf_counter() - s)
    throughput = {}
    batch_items = [(p.name, str(p), None) for p in _images(n_batch, offset=n_single + 1)]
    for b in BATCHES:
        list(predictor.predict_paths(batch_items[:b], batch_size=b, workers=1, progress=False))  # warm-up
        s = time.perf_counter()
        n = sum(
            1 for x in predictor.predict_paths(batch_items, batch_size=b, workers=1, progress=False) if x.ok
        )
        throughput[b] = n / (time.perf_counter() - s)
    return {
        "import_s": t1 - t0, "load_s": t2 - t1, "members": len(predictor.bundle.members),
        "single_ms": [1000 * t for t in times], "throughput": throughput,
    }  # fmt: skip


def _child_naive(bundle: Path, n: int) -> dict[str, Any]:
    import keras  # noqa: F401
    from PIL import Image

    from skinlesion.measure.metrics import apply_calibration
    from skinlesion.measure.scoring import IMAGE_ONLY, OperatingPoint, model_inputs
    from skinlesion.model.bundle_json import read_bundle_json
    from skinlesion.model.networks import load_model

    meta = read_bundle_json(bundle)  # format 1 or 2: its image-only operating point either way
    members = [
        (load_model(bundle / m["path"]), float(m["weight"])) for m in meta["members"] if m["weight"] > 0
    ]
    point = OperatingPoint.from_json(meta["operating_points"][IMAGE_ONLY], len(meta["classes"]), str(bundle))
    size = int(meta["image_size"])
    paths = _images(n + 1)
    times = []
    for i, p in enumerate(paths):
        s = time.perf_counter()
        x = np.asarray(Image.open(p).convert("RGB").resize((size, size)))[None]
        # a fusion member gets its metadata inputs, all unknown (the image-only mode)
        mixed = sum(
            w * model.predict(model_inputs(x, None, len(model.inputs) > 1), verbose=0) for model, w in members
        )
        probs = apply_calibration(np.log(np.clip(mixed, 1e-12, 1.0)), point.temperature, point.class_bias)
        assert abs(float(probs.sum()) - 1.0) < 1e-6
        if i:
            times.append(time.perf_counter() - s)
    return {"single_ms": [1000 * t for t in times]}


# --------------------------------------------------------------------------- parent side


def _child(mode: str, bundle: Path, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_serve", "--child", mode, "--bundle", str(bundle), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cold_cli(bundle: Path, reps: int) -> list[float]:
    image = _images(1)[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = []
    for _ in range(reps):
        s = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "serve.predict", str(image), "--bundle", str(bundle), "--no-progress"],
            cwd=REPO, env=env, capture_output=True, check=True,
        )  # fmt: skip
        out.append(time.perf_counter() - s)
    return out


def _web(bundle: Path, n: int) -> dict[str, list[float]]:
    """Client-side latency of POST /api/predict against a real server process on 127.0.0.1."""
    import httpx

    from bench.webapp import web_app

    with web_app(bundle) as app:
        images = _images(2 * n + 2)
        out: dict[str, list[float]] = {"api": [], "api_gradcam": []}
        with httpx.Client(timeout=60) as client:
            for key, query, part in (
                ("api", "", images[: n + 1]),
                ("api_gradcam", "?explain=true", images[n + 1 :]),
            ):
                for i, p in enumerate(part):
                    files = [("files", (p.name, p.read_bytes(), "image/jpeg"))]
                    s = time.perf_counter()
                    r = client.post(f"{app.url}/api/predict{query}", files=files)
                    dt = time.perf_counter() - s
                    r.raise_for_status()
                    if i:
                        out[key].append(1000 * dt)
        return out


def _machine() -> dict[str, str]:
    import keras

    from bench.common import machine

    return machine(keras=keras.__version__)


def run_bench(
    *, bundle: Path | None, n_single: int, n_batch: int, n_naive: int, n_web: int
) -> dict[str, Any]:
    from skinlesion.model.bundle_json import choose_bundle, is_bundle, read_bundle_json

    if not (SHARED / "images_200x150").is_dir():
        raise SystemExit(f"error: real HAM10000 data not found at {SHARED}")
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        if bundle is None:
            chosen = choose_bundle(REPO / "models" / "production", REPO / "models" / "ensemble")
            bundle = chosen if is_bundle(chosen) else None
        origin = str(bundle.relative_to(REPO)) if bundle and bundle.is_relative_to(REPO) else str(bundle)
        if bundle is None:
            bundle = demo_shaped_bundle(Path(tmp) / "demo")
            origin = "demo-shaped, untrained (mobilenetv2 + custom_cnn, 64 px)"
        n_members = sum(float(m["weight"]) > 0 for m in read_bundle_json(bundle)["members"])
        bundles = {f"{n_members}-member": bundle}
        if n_members != 3:
            bundles["3-member"] = three_members(bundle, Path(tmp) / "three")
        for label, b in bundles.items():
            print(f"== {label}: {b}", flush=True)
            ours = _child("ours", b, "--n-single", str(n_single), "--n-batch", str(n_batch))
            print(
                f"   ours: load {ours['load_s']:.2f} s, p50 {_pct(ours['single_ms'], 50):.1f} ms", flush=True
            )
            naive = _child("naive", b, "--n-single", str(n_naive))
            print(f"   naive: p50 {_pct(naive['single_ms'], 50):.1f} ms", flush=True)
            web = _web(b, n_web)
            print(f"   web: p50 {_pct(web['api'], 50):.1f} ms", flush=True)
            cold = _cold_cli(b, 3)
            meta = read_bundle_json(b)
            rows.append({"label": label, "members": [m["name"] for m in meta["members"]],
                         "image_size": meta["image_size"], "ours": ours, "naive": naive, "web": web,
                         "cold_cli_s": cold})  # fmt: skip
    figures = {
        "origin": origin, "rows": rows, "n_single": n_single, "n_batch": n_batch, "n_naive": n_naive,
        "n_web": n_web, "machine": _machine(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }  # fmt: skip
    return figures


def _markdown(f: dict[str, Any]) -> str:
    lines = [
        "# Using the model: load time, single-image latency, batch throughput vs the naive loop",
        "",
        f"Bundle: {f['origin']}; the 3-member bundle is made from it by copying a member folder and "
        "editing `bundle.json` (`bench.bench_serve.three_members`). Images: distinct real HAM10000 "
        "thumbnails (200x150 JPEG). Each measurement in a fresh process; latency after one warm-up "
        f"call; the predictor's result cache off. Single image: {f['n_single']} images (CLI path), "
        f"{f['n_web']} per web variant, {f['n_naive']} naive; throughput over {f['n_batch']} images.",
        "",
        "| bundle | members | load (s) | TF import (s) | CLI cold start (s) "
        "| single, CLI path p50 / p95 (ms) | single, web API p50 / p95 (ms) "
        "| web + Grad-CAM p50 / p95 (ms) | naive p50 / p95 (ms) "
        "| naive / CLI path (p50) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in f["rows"]:
        o, n, w = r["ours"], r["naive"], r["web"]
        lines.append(
            f"| {r['label']} | {', '.join(r['members'])} ({r['image_size']} px) | {o['load_s']:.2f} "
            f"| {o['import_s']:.1f} | {min(r['cold_cli_s']):.1f} "
            f"| {_pct(o['single_ms'], 50):.1f} / {_pct(o['single_ms'], 95):.1f} "
            f"| {_pct(w['api'], 50):.1f} / {_pct(w['api'], 95):.1f} "
            f"| {_pct(w['api_gradcam'], 50):.1f} / {_pct(w['api_gradcam'], 95):.1f} "
            f"| {_pct(n['single_ms'], 50):.1f} / {_pct(n['single_ms'], 95):.1f} "
            f"| {_pct(n['single_ms'], 50) / _pct(o['single_ms'], 50):.1f}x |"
        )
    lines += [
        "",
        "## Batch throughput (images/s, decode + every member + calibration, one process)",
        "",
        "| bundle | " + " | ".join(f"batch {b}" for b in BATCHES) + " | naive (1 / p50) | best / naive |",
        "| --- | " + " | ".join("---:" for _ in BATCHES) + " | ---: | ---: |",
    ]
    for r in f["rows"]:
        tp = {int(k): v for k, v in r["ours"]["throughput"].items()}
        naive_tp = 1000.0 / _pct(r["naive"]["single_ms"], 50)
        cells = " | ".join(f"{tp[b]:.0f}" for b in BATCHES)
        lines.append(f"| {r['label']} | {cells} | {naive_tp:.0f} | {max(tp.values()) / naive_tp:.1f}x |")
    best = {}
    for r in f["rows"]:
        tp = {int(k): v for k, v in r["ours"]["throughput"].items()}
        best[r["label"]] = max(tp, key=tp.get)
    m = f["machine"]
    lines += [
        "",
        "Best batch size here: "
        + ", ".join(f"{label} {b}" for label, b in best.items())
        + " (the CLI's default is 32; a larger batch is not always faster on a CPU, whose caches hold "
        "fewer images' activations).",
        "",
        "Reading the figures: the naive loop pays Keras's `model.predict` set-up (a data adapter, a "
        "compiled predict function call, callbacks) once per image and per member; the CLI path runs "
        "each member as a traced graph (`tf.function`, traced once per batch shape) called once per "
        "batch, and decodes in JPEG draft mode. At batch 1 both pay per-image "
        "overhead; batching is where the difference grows. The web figures add HTTP, the multipart "
        "upload and JSON; Grad-CAM adds a forward and a backward pass of the best member and a PNG. The "
        "cold start is what one `python -m serve.predict IMAGE` costs: mostly importing TensorFlow, so a "
        "batch job should pass all its images to one command, and the web app loads the bundle once.",
        "",
        "Reproduce: `python -m bench.bench_serve` (or `python -m bench.run serve`); `--bundle DIR` to "
        "measure another bundle.",
        "",
        f"Machine: {m['cpu']}; Python {m['python']}; Keras {m['keras']}; {m['os']}. Load average "
        f"before/after: {' '.join(f'{x:.2f}' for x in f['loadavg_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in f['loadavg_after'])} (a shared machine: other jobs slow every "
        "figure, the ratios less than the absolute values).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, help="bundle to measure (default: the pipeline's, else demo-shaped)"
    )
    ap.add_argument("--n-single", type=int, default=60, help="single-image predictions (CLI path)")
    ap.add_argument("--n-batch", type=int, default=512, help="images per throughput run")
    ap.add_argument("--n-naive", type=int, default=60, help="images through the naive loop")
    ap.add_argument("--n-web", type=int, default=40, help="requests per web variant")
    ap.add_argument("--out-md", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "ours":
        print(json.dumps(_child_ours(args.bundle, args.n_single, args.n_batch)))
        return 0
    if args.child == "naive":
        print(json.dumps(_child_naive(args.bundle, args.n_single)))
        return 0
    figures = run_bench(
        bundle=args.bundle,
        n_single=args.n_single,
        n_batch=args.n_batch,
        n_naive=args.n_naive,
        n_web=args.n_web,
    )
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(_markdown(figures))
    args.out_md.with_suffix(".json").write_text(json.dumps(figures, indent=1, default=str))
    print(f"wrote {args.out_md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
