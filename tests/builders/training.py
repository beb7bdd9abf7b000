"""A tiny real prepared folder, raw train params, the train stage's paths and command line (for
tests/unit/model/: its conftest.py and the train tests; tests/integration/test_same_bits)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from skinlesion.core.schema import CLASSES, HAM_COLUMNS, LOCALIZATIONS, SEXES
from skinlesion.params.load import parse_params

# One colour per class, so a tiny CNN can learn the task in a couple of epochs.
COLORS = [
    (200, 60, 60),
    (60, 200, 60),
    (60, 60, 200),
    (200, 200, 60),
    (200, 60, 200),
    (60, 200, 200),
    (120, 120, 120),
]


def make_prepared(root: Path, *, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """A tiny real prepared folder: JPEGs + metadata + split.csv through ``stages.prepare.run``."""
    from stages import prepare

    rng = np.random.default_rng(seed)
    raw = root / "raw"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for c, dx in enumerate(CLASSES):
        for j in range(per_class):
            image_id = f"ISIC_{i:07d}"
            img = np.clip(np.array(COLORS[c], float) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(img).save(raw / "images" / f"{image_id}.jpg", quality=90)
            rows.append({
                "lesion_id": f"HAM_{i:07d}", "image_id": image_id, "group_id": f"HAM_{i:07d}", "dx": dx,
                "dx_type": "histo", "age": "" if i % 5 == 4 else str(30 + i % 50), "sex": SEXES[i % 3],
                "localization": LOCALIZATIONS[i % len(LOCALIZATIONS)],
                "split": ("train", "train", "val", "test")[j % 4],
            })  # fmt: skip
            i += 1
    with open(raw / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(root / "split.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "lesion_id", "group_id", "dx", "split"],
                           lineterminator="\n", extrasaction="ignore")  # fmt: skip
        w.writeheader()
        w.writerows(rows)
    p = parse_params({"prepare": {"image_size": size, "workers": 1, "shard_size": 16}}).prepare
    prepare.run(p, raw_dir=raw, split_csv=root / "split.csv", out_dir=root / "prepared")
    return root / "prepared"


def raw_params(bb: str = "custom_cnn", *, common=None, backbone=None, **top) -> dict:
    """A params file's content training ``bb`` alone, from scratch, 2 epochs of batch 8 by default."""
    common = {"epochs": 2, "batch_size": 8, **(common or {})}
    train = {"backbones": [bb], "weights": "none", "common": common, "backbone": {bb: backbone or {}}, **top}
    return {"train": train, "ensemble": {"members": [bb]}}


def train_paths(root: Path) -> dict:
    """The output paths of a run under ``root``, as keyword arguments of ``stages.train.run``."""
    return {
        "out": root / "model",
        "metrics": root / "metrics.json",
        "live": root / "live",
        "backup": root / "ckpt",
    }


def write_params(path: Path, raw: dict) -> Path:
    """``raw`` as a params file at ``path``."""
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cli(root: Path, prepared: Path, pfile: Path) -> list[str]:
    """The command line of the train stage on custom_cnn, writing to :func:`train_paths` of ``root``."""
    p = train_paths(root)
    return [sys.executable, "-m", "stages.train", "--params", str(pfile), "--backbone", "custom_cnn",
            "--prepared", str(prepared), "--out", str(p["out"]), "--metrics", str(p["metrics"]),
            "--live", str(p["live"]), "--backup", str(p["backup"])]  # fmt: skip
