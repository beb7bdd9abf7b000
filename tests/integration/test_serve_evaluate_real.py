"""``serve.evaluate`` on 60 real HAM10000 images (skips when ../shared/data/ham10000 is absent).

The folder is a slice of the real release as a user would hand it over: the original metadata
lines, byte for byte (ages like ``80.0``, empty ages, ``unknown`` sex or site), and links to the
real images in a subfolder. The bundle is the tiny untrained fusion bundle of the unit tests
(tests/builders/bundles.make_evaluate_bundle): what is checked is that the command reads real
data and counts images, lesions and modes right.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from serve.evaluate import main
from skinlesion.core.schema import MALIGNANT
from skinlesion.measure.predictions import complete_metadata
from tests.builders.bundles import make_evaluate_bundle

pytestmark = [pytest.mark.realdata]

N_IMAGES = 60


def _pick(meta: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of whole lesions (the last one possibly cut), the classes taken in turn."""
    rng = np.random.default_rng(seed)
    queues = {dx: list(rng.permutation(g["lesion_id"].unique())) for dx, g in meta.groupby("dx")}
    lesions: list[str] = []
    count = 0
    sizes = meta.groupby("lesion_id").size()
    while count < n:
        for q in queues.values():
            if q and count < n:
                lesions.append(q.pop())
                count += int(sizes[lesions[-1]])
    rows = meta[meta["lesion_id"].isin(lesions)]
    return rows.iloc[:n]


def test_real_images_are_scored_in_both_modes_and_lesions_counted(shared_ham, tmp_path, capsys):
    table = shared_ham / "HAM10000_metadata.csv"
    thumbs = shared_ham / "images_200x150"
    meta = pd.read_csv(table, dtype=str, keep_default_na=False)
    meta = meta[[(thumbs / f"{i}.jpg").is_file() for i in meta["image_id"]]]
    # the real rows with missing metadata are in the slice: they are scored image-only
    incomplete = meta[~complete_metadata(meta)].head(3)
    rows = pd.concat([_pick(meta.drop(incomplete.index), N_IMAGES - len(incomplete), seed=5), incomplete])

    folder = tmp_path / "clinic"
    (folder / "images").mkdir(parents=True)
    lines = table.read_text(encoding="utf-8").splitlines(keepends=True)
    wanted = set(rows["image_id"])
    with open(folder / "HAM10000_metadata.csv", "w", encoding="utf-8", newline="") as fh:
        fh.write(lines[0])
        fh.writelines(line for line in lines[1:] if line.split(",")[1] in wanted)
    for i in rows["image_id"]:
        (folder / "images" / f"{i}.jpg").symlink_to(thumbs / f"{i}.jpg")
    bundle = make_evaluate_bundle(tmp_path / "bundle", fusion=True)

    out = tmp_path / "metrics.json"
    rc = main([str(folder), "--bundle", str(bundle), "--out", str(out), "--bootstrap", "50", "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert (doc["n_rows"], doc["n_images"], doc["n_skipped"]) == (N_IMAGES, N_IMAGES, 0)
    assert list(doc["modes"]) == ["metadata", "image_only"]
    n_lesions = rows["lesion_id"].nunique()
    malignant = rows["dx"].isin(MALIGNANT)
    for mode, m in doc["modes"].items():
        assert m["n_images"] == N_IMAGES and m["n_lesions"] == m["lesion_n"] == n_lesions, mode
        assert m["test_n_malignant"] == malignant.sum()
        assert m["lesion_test_n_malignant"] == rows.loc[malignant, "lesion_id"].nunique()
        assert m["macro_auc"] is not None and 0.0 <= m["macro_auc"] <= 1.0
    share = complete_metadata(rows).mean()
    assert 0.0 < share < 1.0
    assert doc["modes"]["metadata"]["share_metadata"] == pytest.approx(share, abs=1e-6)
    assert doc["modes"]["image_only"]["share_metadata"] == 0.0
    printed = capsys.readouterr().out
    assert f"{N_IMAGES} / {n_lesions} / {malignant.sum()}" in printed
