"""The split stage on the 9,247 real HAM10000 thumbnails."""

from __future__ import annotations

import pandas as pd
import pytest

from stages.download import import_folder
from stages.params import parse_params
from stages.split import run

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def real_raw(tmp_path_factory, shared_ham):
    raw = tmp_path_factory.mktemp("real") / "raw"
    raw.mkdir()
    import_folder(shared_ham, raw)
    return raw


def _split(raw, out, seed):
    return run(parse_params({}).split, seed=seed, raw_dir=raw, out_dir=out / "split",
               metrics_path=out / "split.json", plots_dir=out / "plots")  # fmt: skip


def test_real_split_has_no_leakage_and_keeps_proportions(real_raw, tmp_path):
    res = _split(real_raw, tmp_path / "a", seed=42)
    m, s = res.metrics, res.split
    assert m["n_images"] == 9247 and m["leaking_groups"] == 0
    assert m["n_cross_diagnosis_duplicate_pairs"] == 0
    assert m["largest_group"] <= 12
    where = s.set_index("image_id")["split"]
    d = pd.read_csv(tmp_path / "a" / "split" / "duplicates.csv")
    assert len(d) == m["n_near_duplicate_pairs"] > 0
    assert (d["dx_a"] == d["dx_b"]).all()
    assert (where[d["image_id_a"]].to_numpy() == where[d["image_id_b"]].to_numpy()).all()
    assert (s.groupby("lesion_id")["split"].nunique() == 1).all()
    whole = s["dx"].value_counts(normalize=True)
    groups_per_class = s.groupby("dx")["group_id"].nunique()
    for part in ("train", "val", "test"):
        share = s[s["split"] == part]["dx"].value_counts(normalize=True)
        assert set(share.index) == set(whole.index), f"{part} lacks a class"
        for dx in whole.index:
            if groups_per_class[dx] >= 50:
                assert abs(share[dx] - whole[dx]) <= 0.02, (part, dx)

    # same seed: byte-identical; another seed: a different split
    _split(real_raw, tmp_path / "b", seed=42)
    a = (tmp_path / "a" / "split" / "split.csv").read_bytes()
    assert a == (tmp_path / "b" / "split" / "split.csv").read_bytes()
    _split(real_raw, tmp_path / "c", seed=7)
    assert a != (tmp_path / "c" / "split" / "split.csv").read_bytes()
