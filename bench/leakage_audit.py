"""Leakage audit: how much an image-level random split inflates the numbers on HAM10000.

Most published HAM10000 projects split *images* at random. HAM10000 has 1.34 images per lesion
(several photographs of one mole), so such a split puts images of the same lesion in train and
test, and the test set partly measures memory. This script trains the **same model with the same
params** twice on the same real images and evaluates each on its own test split:

* ``lesion``: this project's split (``stages.split``: lesion groups joined with verified
  near-duplicates, stratified on diagnosis and lesion size; no lesion crosses splits);
* ``image``: the usual image-level random split, stratified on diagnosis, same fractions.

Each arm runs the project's own stage CLIs (prepare, train, evaluate) in a scratch folder, so
the model, loss, augmentation and evaluation are exactly the pipeline's. Both are reported with
lesion-bootstrap 95% CIs, plus how much of the image split's test set has a sibling image of the
same lesion in its train set.

    python -m bench.leakage_audit                      # ../shared/data/ham10000, ~2 x 6 min on 2 cores
    python -m bench.leakage_audit --data PATH --epochs 8 --profile profiles/real-cpu.yaml

Writes ``reports/leakage_audit/`` (``report.md``, ``metrics.json``, ``leakage.png``).
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))
ARMS = ("lesion", "image")
KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "malignant_auc", "mel_recall")


def image_level_split(meta: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.DataFrame:
    """The usual leaky split: images shuffled and cut per diagnosis (stratified), lesions ignored."""
    rng = np.random.default_rng(seed)
    parts = []
    for _dx, rows in meta.sort_values("image_id").groupby("dx", sort=True):
        order = rows.iloc[rng.permutation(len(rows))]
        n_val = round(len(order) * fractions["val"])
        n_test = round(len(order) * fractions["test"])
        split = ["val"] * n_val + ["test"] * n_test + ["train"] * (len(order) - n_val - n_test)
        parts.append(order.assign(split=split))
    out = pd.concat(parts).sort_values("image_id")
    out["group_id"] = np.arange(len(out))
    return out[["image_id", "lesion_id", "group_id", "dx", "split"]].reset_index(drop=True)


def sibling_share(split: pd.DataFrame) -> float:
    """Share of test images whose lesion also has an image in train."""
    train_lesions = set(split.loc[split["split"] == "train", "lesion_id"])
    test = split[split["split"] == "test"]
    return float(test["lesion_id"].isin(train_lesions).mean()) if len(test) else 0.0


def _run(cmd: Sequence[str], log_path: Path) -> float:
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        rc = subprocess.call([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if rc:
        sys.exit(f"error: {' '.join(map(str, cmd[:4]))} ... exited {rc}; see {log_path}")
    return time.perf_counter() - t0


def run_arm(
    arm: str, split: pd.DataFrame, raw: Path, params_file: Path, backbone: str, work: Path
) -> dict[str, Any]:
    """prepare -> train -> evaluate with the stage CLIs on one split; returns the eval metrics."""
    d = work / arm
    d.mkdir(parents=True, exist_ok=True)
    split.to_csv(d / "split.csv", index=False, lineterminator="\n")
    log_path = d / "log.txt"
    py = sys.executable
    seconds = {
        "prepare": _run([py, "-m", "stages.prepare", "--params", params_file, "--raw", raw,
                         "--split", d / "split.csv", "--out", d / "prepared"], log_path),
        "train": _run([py, "-m", "stages.train", "--params", params_file, "--backbone", backbone,
                       "--prepared", d / "prepared", "--out", d / "model", "--metrics", d / "train.json",
                       "--live", d / "live", "--backup", d / "model.ckpt"], log_path),
        "evaluate": _run([py, "-m", "stages.evaluate", "--params", params_file, "--backbone", backbone,
                          "--model", d / "model", "--prepared", d / "prepared", "--out", d / "predictions",
                          "--metrics", d / "eval.json", "--plots", d / "eval_plots"], log_path),
    }  # fmt: skip
    metrics = json.loads((d / "eval.json").read_text())
    metrics["seconds"] = seconds
    metrics["test_sibling_share"] = sibling_share(split)
    metrics["test_images_per_lesion"] = float(
        (split["split"] == "test").sum() / split.loc[split["split"] == "test", "lesion_id"].nunique()
    )
    return metrics


def _fmt(m: dict[str, Any], k: str) -> str:
    v, lo, hi = m.get(k), m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    if v is None:
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"


def write_report(out: Path, results: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    les, img = results["lesion"], results["image"]
    rows = [
        f"| {k} | {_fmt(les, k)} | {_fmt(img, k)} | {img[k] - les[k]:+.3f} |"
        for k in KEYS if les.get(k) is not None and img.get(k) is not None
    ]  # fmt: skip
    d_auc = img["macro_auc"] - les["macro_auc"]
    d_bacc = img["balanced_accuracy"] - les["balanced_accuracy"]
    leak = (
        f"{100 * img['test_sibling_share']:.0f}% of the image split's test images have another image "
        "of the same lesion in train"
    )
    if max(d_auc, d_bacc) >= 0.01:
        head = (
            f"The image-level split inflates macro AUC by {d_auc:+.3f} and balanced accuracy by "
            f"{d_bacc:+.3f}: {leak}."
        )
    else:
        head = (
            f"No measurable inflation with this model (macro AUC {d_auc:+.3f}, balanced accuracy "
            f"{d_bacc:+.3f}, "
            f"inside the CIs) although {leak}: a model this small at this resolution does not memorise a "
            "lesion's other views; larger, pretrained models do (see the README)."
        )
    text = "\n".join([
        "# Leakage audit: image-level vs lesion-level split",
        "",
        f"**{head}**",
        "",
        f"Same model ({info['backbone']}, {info['image_size']} px, {info['epochs']} epochs, profile "
        f"`{info['profile']}`), same params and seed, trained and tested on {info['n_images']} real "
        f"HAM10000 images ({info['n_lesions']} lesions); each arm on its own test split. 95% CIs from "
        f"{info['bootstrap_samples']} lesion-bootstrap replicates.",
        "",
        "| test metric | lesion-level split (this project) | image-level random split | inflation |",
        "| --- | --- | --- | --- |",
        *rows,
        f"| test images with a same-lesion image in train | {100 * les['test_sibling_share']:.1f}% | "
        f"{100 * img['test_sibling_share']:.1f}% | |",
        f"| test images per lesion | {les['test_images_per_lesion']:.2f} | "
        f"{img['test_images_per_lesion']:.2f} | |",
        "",
        "![leakage](leakage.png)",
        "",
        f"Command: `{info['command']}` (git {info['git']}), {info['minutes']:.0f} min on "
        f"{os.cpu_count()} cores.",
        "",
    ])  # fmt: skip
    (out / "report.md").write_text(text, encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps({"info": info, **results}, indent=2, sort_keys=True) + "\n")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    keys = [k for k in KEYS if les.get(k) is not None]
    x = np.arange(len(keys))
    for j, (arm, m) in enumerate((("lesion-level split", les), ("image-level split", img))):
        v = np.array([m[k] for k in keys])
        err = np.array(
            [[m[k] - m.get(f"{k}_ci_low", m[k]), m.get(f"{k}_ci_high", m[k]) - m[k]] for k in keys]
        ).T
        ax.bar(x + (j - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, label=arm)
    ax.set_xticks(x, keys, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_title("Test metrics: the leaky image-level split looks better")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "leakage.png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.leakage_audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED, help="a HAM10000-layout folder (metadata + images)")
    ap.add_argument("--profile", type=Path, default=REPO / "profiles" / "real-cpu.yaml")
    ap.add_argument("--backbone", default="custom_cnn")
    ap.add_argument("--epochs", type=int, default=12, help="training budget of each arm")
    # What is measured is the split's effect, not the model: 32 px (DermaMNIST uses 28 px) keeps
    # both arms at ~5 min each on 2 cores; --size 64 matches the make-real profile.
    ap.add_argument("--size", type=int, default=32, help="input resolution of both arms (px)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "leakage_audit")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    from skinlesion.core.cli import setup_logging
    from skinlesion.params.load import parse_params
    from skinlesion.sources.local import import_folder
    from stages.split import run as split_run
    from tools.profile import merge, read_profile

    setup_logging(False)
    if not args.data.is_dir():
        sys.exit(f"error: --data {args.data}: not a folder (a HAM10000 layout: metadata csv + images)")
    t0 = time.perf_counter()
    sets = [f"train.common.epochs={args.epochs}", f"train.backbones=[{args.backbone}]",
            f"prepare.image_size={args.size}",
            f"ensemble.members=[{args.backbone}]"]  # fmt: skip
    merged, _ = merge(REPO / "params.yaml", read_profile(args.profile), sets)
    params = parse_params(merged)
    work = args.work or Path(tempfile.mkdtemp(prefix="leakage-audit-"))
    try:
        params_file = work / "params.yaml"
        work.mkdir(parents=True, exist_ok=True)
        params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
        raw = work / "raw"
        if not (raw / "metadata.csv").is_file():
            raw.mkdir(parents=True, exist_ok=True)
            import_folder(args.data, raw)
        meta = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
        lesion = split_run(
            params.split, seed=params.base.seed, raw_dir=raw, out_dir=work / "split",
            metrics_path=work / "split.json", plots_dir=work / "split_plots",
        ).split  # fmt: skip
        lesion = lesion[lesion["split"].isin(["train", "val", "test"])]
        fr = params.split.fractions
        image = image_level_split(meta, {"train": fr.train, "val": fr.val, "test": fr.test}, params.base.seed)
        results = {}
        for arm, split in (("lesion", lesion), ("image", image)):
            print(
                f"arm {arm}: prepare, train {args.backbone} ({args.epochs} epochs), evaluate ...", flush=True
            )
            results[arm] = run_arm(arm, split, raw, params_file, args.backbone, work)
            print(f"arm {arm}: test macro AUC {results[arm]['macro_auc']:.3f}, balanced accuracy "
                  f"{results[arm]['balanced_accuracy']:.3f}", flush=True)  # fmt: skip
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        info = {
            "backbone": args.backbone,
            "epochs": args.epochs,
            "image_size": params.prepare.image_size,
            "profile": str(
                args.profile.relative_to(REPO) if args.profile.is_relative_to(REPO) else args.profile
            ),
            "n_images": len(meta),
            "n_lesions": int(meta["lesion_id"].nunique()),
            "bootstrap_samples": params.evaluate.bootstrap_samples,
            "command": "python -m bench.leakage_audit "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "git": git.stdout.strip() or "unknown",
            "minutes": (time.perf_counter() - t0) / 60,
        }
        write_report(args.out, results, info)
        print(f"report: {args.out / 'report.md'}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
