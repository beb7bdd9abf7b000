"""Training throughput: the project's pipeline vs the usual published-HAM10000 style, on CPU.

For each backbone (mobilenetv2, custom_cnn), each scenario runs in its own process so its peak
RSS is its own:

* ``project``  — the train stage's input (TFRecord shards -> tf.data: parallel parse, cache,
  seeded shuffle, batch, prefetch) into the stage's model (uint8 in; augmentation and
  preprocessing inside the model), ``Model.fit``;
* ``numpy``    — the style of most published HAM10000 notebooks: every image decoded into one
  float32 array in memory, then ``Model.fit(x, y, batch_size=...)`` on the arrays (same model,
  same loss, same optimizer, so only the input path differs);
* ``pipeline`` — the project's tf.data pipeline alone, iterated without a model: the images/s it
  can deliver, cold (first epoch, reading and parsing the shards) and warm (from the cache).

Training images/s is timed over steady-state steps (after warm-up steps that include tracing).
The requirement checked: the input pipeline delivers >= 5x the images/s the train step consumes.

Run: ``python -m bench.bench_train [--size 64] [--steps 40]`` (needs ../shared/data/ham10000);
writes ``bench/results/train.md`` and ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine_text

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))
BACKBONES = ("mobilenetv2", "custom_cnn")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prepare_real(size: int, root: Path) -> Path:
    """The shared HAM10000 images through the project's prepare stage (lesion-grouped 70/15/15)."""
    import numpy as np
    import pandas as pd

    from skinlesion.params.load import parse_params
    from stages import prepare

    meta = pd.read_csv(SHARED / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    have = {p.stem for p in (SHARED / "images_200x150").glob("*.jpg")}
    meta = meta[meta.image_id.isin(have)].reset_index(drop=True)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / "images").exists():
        (raw / "images").symlink_to(SHARED / "images_200x150")
    cols = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    meta[cols].to_csv(raw / "metadata.csv", index=False, lineterminator="\n")
    rng = np.random.default_rng(0)
    split: dict[str, str] = {}
    for _dx, g in meta.groupby("dx"):
        lesions = g.lesion_id.unique()
        rng.shuffle(lesions)
        a, b = int(0.7 * len(lesions)), int(0.85 * len(lesions))
        for i, lesion in enumerate(lesions):
            split[lesion] = "train" if i < a else ("val" if i < b else "test")
    meta["split"] = meta.lesion_id.map(split)
    meta["group_id"] = meta.lesion_id
    meta[["image_id", "lesion_id", "group_id", "dx", "split"]].to_csv(
        root / "split.csv", index=False, lineterminator="\n"
    )
    p = parse_params({"prepare": {"image_size": size}}).prepare
    prepare.run(p, raw_dir=raw, split_csv=root / "split.csv", out_dir=root / "prepared")
    return root / "prepared"


# --------------------------------------------------------------------------- one scenario


class _StepTimer:
    """Wall time of training steps ``warmup .. warmup+steps-1`` (tracing happens before)."""

    def __init__(self, warmup: int, steps: int):
        import keras

        outer = self

        class CB(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if batch == warmup - 1:
                    outer.t0 = time.perf_counter()
                elif batch == warmup + steps - 1:
                    outer.seconds = time.perf_counter() - outer.t0
                    self.model.stop_training = True

        self.callback = CB()
        self.t0 = self.seconds = 0.0


def _model_and_loss(backbone: str, prepared: Path, seed: int) -> tuple[Any, Any, Any]:
    from skinlesion.model import losses
    from skinlesion.model import networks as models
    from skinlesion.model.phases import plan_phases
    from skinlesion.model.tfdata import load_manifest
    from skinlesion.model.traindata import class_counts
    from skinlesion.model.training import make_optimizer
    from skinlesion.params.load import load_params

    params = load_params(REPO / "params.yaml").train
    common, bbp = params.common, params.for_backbone(backbone)
    manifest = load_manifest(prepared)
    counts = class_counts(manifest, "train")
    spec = models.ModelSpec(
        backbone=backbone,
        image_size=int(manifest["image_size"]),
        head=bbp.head,
        dropout=bbp.dropout,
        **{
            k: getattr(common.augment, k)
            for k in ("flip", "rotation", "zoom", "shift", "brightness", "contrast")
        },
        output_bias=models.output_bias_from_counts(counts),
        seed=seed,
    )
    bb, _ = models.build_backbone(
        backbone, spec.image_size, "none"
    )  # offline: scratch, as the stage falls back
    model = models.build_model(spec, bb, pretrained=False)
    phase = plan_phases(common.epochs, pretrained=False, head_epochs=0, unfreeze=[], learning_rate=1e-3,
                        finetune_learning_rate=1e-4)[0]  # fmt: skip
    opt = make_optimizer(phase, common, steps_per_epoch=200)
    loss = losses.make_loss(common.loss, losses.class_weights(counts, power=common.class_weight_power))
    return model, opt, loss


def scenario(
    kind: str, backbone: str, prepared: Path, *, batch: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Run one scenario in this process; return its figures (images/s, peak RSS)."""
    import keras
    import numpy as np

    from skinlesion.model.tfdata import load_manifest, read_split
    from skinlesion.model.traindata import make_datasets

    keras.utils.set_random_seed(0)
    manifest = load_manifest(prepared)
    n_train = int(manifest["splits"]["train"]["n"])
    out: dict[str, Any] = {"kind": kind, "backbone": backbone, "batch": batch, "n_train": n_train}

    if kind == "pipeline":
        ds, _ = make_datasets(
            prepared, n_train=n_train, with_meta=False, batch=batch, shuffle_buffer=4096, seed=0, cache=True
        )
        for epoch in ("cold", "warm"):
            t0, n = time.perf_counter(), 0
            for x, _y in ds:
                n += int(x.shape[0])
            out[f"{epoch}_images_per_s"] = n / (time.perf_counter() - t0)
        out["peak_rss_mb"] = _peak_rss_mb()
        return out

    model, opt, loss = _model_and_loss(backbone, prepared, seed=0)
    model.compile(optimizer=opt, loss=loss, metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    timer = _StepTimer(warmup, steps)
    t_load = time.perf_counter()
    if kind == "project":
        ds, _ = make_datasets(
            prepared, n_train=n_train, with_meta=False, batch=batch, shuffle_buffer=4096, seed=0, cache=True
        )
        out["load_seconds"] = 0.0  # streaming: nothing is loaded up front
        model.fit(
            ds.repeat(), steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[timer.callback]
        )
    elif kind == "numpy":
        # The published recipe: decode everything into one float32 array, scale, fit on arrays.
        images, labels = [], []
        for x, y in read_split(prepared, "train", ordered=True).batch(512):
            images.append(x.numpy())
            labels.append(y.numpy())
        x_train = np.concatenate(images).astype(np.float32)  # 0-255 floats, 4 bytes per channel
        y_train = keras.utils.to_categorical(np.concatenate(labels), 7)
        out["load_seconds"] = time.perf_counter() - t_load
        out["array_mb"] = x_train.nbytes / 2**20
        # Same model, fed float32 (the stage's model takes uint8: a float Input in front of it).
        inp = keras.Input(x_train.shape[1:], dtype="float32")
        wrapped = keras.Model(inp, model(inp))
        wrapped.compile(
            optimizer=opt, loss=loss, metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")]
        )
        wrapped.fit(x_train, y_train, batch_size=batch, epochs=1, shuffle=True, verbose=0,
                    callbacks=[timer.callback])  # fmt: skip
    else:
        raise ValueError(kind)
    out["train_images_per_s"] = steps * batch / timer.seconds if timer.seconds else float("nan")
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


# --------------------------------------------------------------------------- driver


def _in_subprocess(kind: str, backbone: str, prepared: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_train", "--scenario", kind, "--backbone", backbone,
           "--prepared", str(prepared), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind}/{backbone} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, prep_s: float) -> str:
    by = {(r["kind"], r["backbone"]): r for r in rows}
    lines = [
        "# Training throughput (CPU)",
        "",
        f"Machine: {machine_text()}, no GPU. "
        f"Data: the {by[('pipeline', BACKBONES[0])]['n_train']} training images of the shared HAM10000 copy, "
        f"prepared at {args.size} px by stages.prepare ({prep_s:.1f} s). Batch {args.batch}; training "
        f"images/s timed over {args.steps} steady-state steps after {args.warmup} warm-up steps. "
        "Backbones from scratch (offline), augmentation inside the model in both styles.",
        "",
        "| backbone | project tf.data + fit (img/s) | float32 numpy + fit (img/s) | ratio | "
        "peak RSS project / numpy (MB) | numpy array (MB) | numpy load (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for bb in BACKBONES:
        p, n = by[("project", bb)], by[("numpy", bb)]
        lines.append(
            f"| {bb} | {p['train_images_per_s']:.0f} | {n['train_images_per_s']:.0f} | "
            f"{p['train_images_per_s'] / n['train_images_per_s']:.2f}x | "
            f"{p['peak_rss_mb']:.0f} / {n['peak_rss_mb']:.0f} | {n['array_mb']:.0f} | "
            f"{n['load_seconds']:.1f} |"
        )
    pipe = by[("pipeline", BACKBONES[0])]
    fastest = max(by[("project", bb)]["train_images_per_s"] for bb in BACKBONES)
    ratio = pipe["cold_images_per_s"] / fastest
    lines += [
        "",
        "## Input pipeline alone",
        "",
        f"tf.data (parse shards, cache, shuffle, batch, prefetch) without a model: "
        f"**{pipe['cold_images_per_s']:.0f} img/s** on the first (cold) epoch, "
        f"{pipe['warm_images_per_s']:.0f} img/s from the cache; peak RSS {pipe['peak_rss_mb']:.0f} MB.",
        f"The fastest train step consumes {fastest:.0f} img/s, so the pipeline delivers "
        f"**{ratio:.1f}x** what training needs cold (requirement: >= 5x): "
        + ("**met**." if ratio >= 5 else "**NOT met**."),
        "",
        "## Reading",
        "",
        "On this CPU the train step itself is the bottleneck, so both input styles train at the same "
        "speed (ratio ~1x): the project's pipeline does not buy CPU speed, it removes the input as a "
        "limit. What it does buy here is memory: the numpy style holds the whole split as float32 "
        "(4 bytes per channel, plus Keras's per-batch copies), the project's cache holds uint8 "
        "(1 byte), hence the lower peak RSS; at 224 px the float32 array alone would be "
        f"~{by[('numpy', BACKBONES[0])]['array_mb'] * (224 / args.size) ** 2 / 1024:.1f} GB. "
        "The input pipeline's headroom matters on a GPU, where a train step consumes thousands of "
        "images/s. The numpy load time above reads the already-decoded shards; the published "
        "notebooks decode and resize every JPEG in that step instead (the prepare stage's job, "
        "timed above).",
        "",
        f"Command: `python -m bench.bench_train --size {args.size} --batch {args.batch} "
        f"--steps {args.steps}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size (the configured prepare.image_size)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (tracing, caches)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--scenario", choices=("project", "numpy", "pipeline"), help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.scenario:  # a child process: one scenario, JSON on stdout
        res = scenario(args.scenario, args.backbone, args.prepared, batch=args.batch, warmup=args.warmup,
                       steps=args.steps)  # fmt: skip
        print(json.dumps(res))
        return 0

    if not (SHARED / "HAM10000_metadata.csv").is_file():
        print(f"error: the real HAM10000 data is not at {SHARED}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        t0 = time.perf_counter()
        prepared = prepare_real(args.size, Path(tmp))
        prep_s = time.perf_counter() - t0
        rows = []
        for kind in ("pipeline", "project", "numpy"):
            for bb in BACKBONES if kind != "pipeline" else BACKBONES[:1]:
                r = _in_subprocess(kind, bb, prepared, args)
                print(json.dumps(r), flush=True)
                rows.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(rows, indent=1) + "\n")
    report = _report(rows, args, prep_s)
    (args.out / "train.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
