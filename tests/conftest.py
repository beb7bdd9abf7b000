"""Shared fixtures. Tests need no network and no GPU; real-data tests skip when it is absent."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common import HAM_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SHARED_HAM = Path(os.environ.get("HAM10000_DIR", REPO.parent / "shared" / "data" / "ham10000"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def shared_ham() -> Path:
    """The real HAM10000 copy in ../shared (read-only); skips the test when it is absent."""
    if not (SHARED_HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 data not found at {SHARED_HAM}")
    return SHARED_HAM


def make_jpeg(path: Path, *, size=(64, 48), seed: int = 0, color=None, mode: str = "RGB") -> Path:
    """Write a real JPEG: smooth noise (or a flat colour) of ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if color is None:
        small = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    else:
        img = Image.new("RGB", (w, h), color)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)
    return path


def write_raw(root: Path, rows: list[dict], *, size=(64, 48)) -> Path:
    """Write a ``data/raw``-shaped folder: metadata.csv (HAM columns) + images/<image_id>.jpg."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n")
        w.writeheader()
        for i, r in enumerate(rows):
            full = {"dx_type": "histo", "age": "50", "sex": "male", "localization": "back", **r}
            w.writerow({k: full[k] for k in HAM_COLUMNS})
            make_jpeg(root / "images" / f"{r['image_id']}.jpg", size=size, seed=i)
    return root
