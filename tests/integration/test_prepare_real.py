"""The prepare stage on the real HAM10000 originals (600x450) from ../shared."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinlesion.core.schema import CLASSES
from skinlesion.params.load import parse_params
from stages.prepare import run


def _raw_from_originals(shared: Path, root: Path) -> tuple[Path, Path, pd.DataFrame]:
    """data/raw with the 124 originals (symlinked, read-only source) + a split.csv by lesion."""
    ids = sorted(p.stem for p in (shared / "originals_600x450").glob("*.jpg"))
    meta = pd.read_csv(shared / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta = meta[meta["image_id"].isin(ids)]
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    meta.to_csv(raw / "metadata.csv", index=False, lineterminator="\n")
    for i in ids:
        os.symlink(shared / "originals_600x450" / f"{i}.jpg", raw / "images" / f"{i}.jpg")
    split = meta[["image_id", "lesion_id", "dx"]].assign(group_id=meta["lesion_id"])
    lesion_no = split["lesion_id"].str[4:].astype(int)
    split["split"] = np.select([lesion_no % 5 == 0, lesion_no % 5 == 1], ["val", "test"], "train")
    split.to_csv(root / "split.csv", index=False)
    return raw, root / "split.csv", split


def test_prepare_the_124_real_originals(shared_ham, tmp_path):
    from skinlesion.model.tfdata import load_manifest, read_split_numpy

    raw, split_csv, split = _raw_from_originals(shared_ham, tmp_path)
    assert len(split) == 124
    params = parse_params({"prepare": {"image_size": 64, "workers": 2}}).prepare
    res = run(params, raw_dir=raw, split_csv=split_csv, out_dir=tmp_path / "prepared")
    out = tmp_path / "prepared"
    assert sum(res.counts.values()) == 124
    manifest = load_manifest(out)
    for s in ("train", "val", "test"):
        want = split.loc[split["split"] == s, "dx"].value_counts()
        assert manifest["splits"][s]["class_counts"] == {c: int(want.get(c, 0)) for c in CLASSES}
    assert sum(manifest["splits"]["train"]["class_counts"][c] > 0 for c in CLASSES) >= 5

    arr = read_split_numpy(out, "val")
    with open(out / "val.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert arr.image_ids.tolist() == [r["image_id"] for r in listed]
    assert arr.images.shape == (len(listed), 64, 64, 3)
    # draft-mode output against a full-resolution decode + resize of the same real file
    for k in range(0, len(listed), max(1, len(listed) // 5)):
        with Image.open(raw / "images" / f"{listed[k]['image_id']}.jpg") as img:
            assert img.size == (600, 450)
            full = np.asarray(img.convert("RGB").resize((64, 64), Image.LANCZOS, box=(75, 0, 525, 450)))
        assert np.abs(arr.images[k].astype(int) - full.astype(int)).mean() < 2.0
