"""A small real-data model bundle for drift tests, built by the stages' own commands.

Lesions of ``../shared/data/ham10000`` are drawn (seeded) into train/val/test for a small
custom CNN at 32 px; every other lesion is *held out*: never seen by the bundle, they are the
"new images" of a no-drift check. The images are symlinked, never copied or written.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from skinlesion.core.schema import HAM_COLUMNS

PARAMS = {
    "prepare": {"image_size": 32},
    "train": {
        "backbones": ["custom_cnn"],
        "weights": "none",
        "common": {"epochs": 3, "batch_size": 32},
    },
    "ensemble": {"members": ["custom_cnn"]},
    "evaluate": {"bootstrap_samples": 20},
    "calibrate": {"bootstrap_samples": 20},
    "drift": {"reference": {"max_images": 2000}},
}


def pick_lesions(meta: pd.DataFrame, n_images: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(used, held_out)``: whole lesions, about ``n_images`` images used, the rest held out."""
    rng = np.random.default_rng(seed)
    lesions = meta["lesion_id"].unique()
    rng.shuffle(lesions)
    sizes = meta.groupby("lesion_id").size()
    take = lesions[np.searchsorted(np.cumsum(sizes[lesions].to_numpy()), n_images) :]
    used = meta[~meta["lesion_id"].isin(take)]
    return used, meta[meta["lesion_id"].isin(take)]


def build(
    shared: Path,
    root: Path,
    *,
    n_images: int = 2400,
    seed: int = 0,
    fusion: bool = False,
    epochs: int = 3,
) -> tuple[Path, pd.DataFrame]:
    """Build ``root/bundle`` from about ``n_images`` real images; return it and the held-out rows.

    ``fusion``: the member fuses age, sex and site (a two-mode bundle). The calibrate stage's own
    test predictions are in ``root/served`` (``test.csv``, ``test_image_only.csv`` with fusion),
    the raw images and metadata in ``root/raw``."""
    meta = pd.read_csv(shared / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    thumbs = shared / "images_200x150"
    meta = meta[[(thumbs / f"{i}.jpg").is_file() for i in meta["image_id"]]]
    used, held = pick_lesions(meta, n_images, seed)
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    for i in used["image_id"]:
        (raw / "images" / f"{i}.jpg").symlink_to(thumbs / f"{i}.jpg")
    used[list(HAM_COLUMNS)].to_csv(raw / "metadata.csv", index=False, lineterminator="\n")
    # A lesion-level split: 60/20/20 of the lesions, seeded.
    rng = np.random.default_rng(seed + 1)
    lesions = used["lesion_id"].unique()
    rng.shuffle(lesions)
    n = len(lesions)
    split_of = {
        les: ("train" if k < 0.6 * n else "val" if k < 0.8 * n else "test") for k, les in enumerate(lesions)
    }
    split = used[["image_id", "lesion_id", "dx"]].assign(split=used["lesion_id"].map(split_of))
    split.to_csv(root / "split.csv", index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    params = root / "params.yaml"
    knobs = yaml.safe_load(yaml.safe_dump(PARAMS))
    knobs["train"]["common"]["epochs"] = epochs
    knobs["download"] = {"source": f"local:{shared}"}  # the bundle says it was trained on real images
    if fusion:
        knobs["train"]["backbone"] = {"custom_cnn": {"fusion": True}}
    params.write_text(yaml.safe_dump(knobs), encoding="utf-8")
    py = sys.executable
    p = str(params)
    for args in (
        ["stages.prepare", "--params", p, "--raw", str(raw), "--split", str(root / "split.csv"),
         "--out", str(root / "prepared")],
        ["stages.train", "--params", p, "--backbone", "custom_cnn", "--prepared", str(root / "prepared"),
         "--out", str(root / "models" / "custom_cnn"), "--metrics", str(root / "train.json"),
         "--live", str(root / "live"), "--backup", str(root / "models" / "custom_cnn.ckpt")],
        ["stages.evaluate", "--params", p, "--backbone", "custom_cnn",
         "--model", str(root / "models" / "custom_cnn"), "--prepared", str(root / "prepared"),
         "--out", str(root / "predictions" / "custom_cnn"),
         "--metrics", str(root / "eval.json"), "--plots", str(root / "eval")],
        ["stages.ensemble", "--params", p, "--predictions", str(root / "predictions"), "--out",
         str(root / "ensemble"), "--metrics", str(root / "ensemble.json"), "--plots", str(root / "ens")],
        ["stages.calibrate", "--params", p, "--ensemble", str(root / "ensemble"), "--ensemble-metrics",
         str(root / "ensemble.json"), "--models", str(root / "models"), "--prepared", str(root / "prepared"),
         "--lock", str(root / "dvc.lock"), "--bundle", str(root / "bundle"), "--metrics",
         str(root / "calibration.json"), "--plots", str(root / "cal"), "--card", str(root / "card.md"),
         "--raw", str(raw), "--split", str(root / "split.csv"), "--served", str(root / "served")],
    ):  # fmt: skip
        proc = subprocess.run([py, "-m", *args], cwd=root, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return root / "bundle", held
