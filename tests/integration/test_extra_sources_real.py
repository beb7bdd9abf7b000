"""A labelled batch of 300 real HAM10000 rows joins the next data version through
``download.extra_sources``: the training data grows by exactly those rows, and the lesion-level
split that follows keeps every lesion (and every near-duplicate group) in one split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.params.load import parse_params
from stages import download, split

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _folder(root: Path, rows: pd.DataFrame, images: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows[list(HAM_COLUMNS)].to_csv(root / "metadata.csv", index=False, lineterminator="\n")
    for i in rows["image_id"]:
        (root / "images" / f"{i}.jpg").symlink_to(images / f"{i}.jpg")
    return root


def test_labelled_batch_of_300_real_rows_grows_the_data_and_the_split_stays_lesion_disjoint(
    shared_ham, tmp_path
):
    meta = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    images = shared_ham / "images_200x150"
    meta = meta[[(images / f"{i}.jpg").is_file() for i in meta["image_id"]]]
    rng = np.random.default_rng(10)
    lesions = meta["lesion_id"].unique()
    rng.shuffle(lesions)
    # whole lesions: the batch holds ~300 images of lesions the base never saw, as a new clinic would
    sizes = meta.groupby("lesion_id").size()[lesions].cumsum()
    batch_lesions = set(sizes.index[sizes <= 300])
    base_lesions = set(sizes.index[(sizes > 300) & (sizes <= 1500)])
    batch_rows = meta[meta["lesion_id"].isin(batch_lesions)]
    base_rows = meta[meta["lesion_id"].isin(base_lesions)]
    # top up to exactly 300 rows with single-image lesions not used elsewhere
    singles = (
        meta[~meta["lesion_id"].isin(batch_lesions | base_lesions)]
        .groupby("lesion_id")
        .filter(lambda g: len(g) == 1)
    )
    batch_rows = pd.concat([batch_rows, singles.head(300 - len(batch_rows))])
    assert len(batch_rows) == 300
    base = _folder(tmp_path / "base", base_rows, images)
    batch = _folder(tmp_path / "batch", batch_rows, images)

    raw = tmp_path / "raw"
    before = download.run(
        parse_params({"download": {"source": f"local:{base}"}}).download,
        seed=0, out_dir=raw, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    n_before = len(pd.read_csv(raw / "metadata.csv"))
    assert n_before == len(base_rows) == before.n_rows
    params = parse_params({"download": {"source": f"local:{base}", "extra_sources": [str(batch)]}})
    after = download.run(params.download, seed=0, out_dir=raw, cache_dir=tmp_path / "cache")
    assert [n for _, n in after.rows_per_source] == [n_before, 300]
    merged = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    assert len(merged) == n_before + 300
    assert set(batch_rows["image_id"]) <= set(merged["image_id"])
    assert len(list((raw / "images").iterdir())) == len(merged)

    res = split.run(
        params.split, seed=0, raw_dir=raw, out_dir=tmp_path / "split", metrics_path=tmp_path / "split.json",
        plots_dir=tmp_path / "split_plots",
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "split" / "split.csv", dtype=str, keep_default_na=False)
    assert set(batch_rows["image_id"]) <= set(table["image_id"])
    per_lesion = table.groupby("lesion_id")["split"].nunique()
    assert (per_lesion == 1).all(), per_lesion[per_lesion > 1]
    per_group = table.groupby("group_id")["split"].nunique()
    assert (per_group == 1).all()
    assert res.metrics["leaking_groups"] == 0
