"""The split stage: no leakage by construction and by check; verified duplicates only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from skinlesion.checks.duplicates import near_pairs, near_pairs_bruteforce, search_plan, verify_scores
from skinlesion.checks.leakage import assign_splits, build_groups, leakage
from skinlesion.core.errors import StageError
from skinlesion.params.load import parse_params
from stages.split import main, run
from tests.builders.images import huge_header_jpeg
from tests.conftest import write_raw


def _params(**kw):
    return parse_params({"split": {"workers": 1, **kw}}).split


def _run(raw: Path, tmp: Path, seed: int = 1, **kw):
    return run(_params(**kw), seed=seed, raw_dir=raw, out_dir=tmp / "split", metrics_path=tmp / "m.json",
               plots_dir=tmp / "plots")  # fmt: skip


def _rows(n_lesions_per_class=4, images_per_lesion=2, classes=("nv", "mel", "bkl")):
    rows, k = [], 0
    for c in classes:
        for les in range(n_lesions_per_class):
            for _ in range(images_per_lesion):
                rows.append({"lesion_id": f"HAM_{c}{les}", "image_id": f"ISIC_{k:07d}", "dx": c})
                k += 1
    return rows


def _lesion(texture_seed: int, shift=(0, 0), size=(200, 150)) -> np.ndarray:
    """A dermoscopy-like picture: a dark blob on shaded skin plus fine texture (hair, dots).

    The blob and the shading fix the 64-bit pHash (it sees 32x32); the seeded texture, too fine
    for the hash, is what tells two lesions apart. ``shift`` moves the camera (whole picture)."""
    w, h = size
    yy, xx = np.mgrid[0 : h + 40, 0 : w + 40].astype(float)
    blob = ((xx - (w + 40) * 0.45) / (w / 4)) ** 2 + ((yy - (h + 40) * 0.55) / (h / 4.5)) ** 2 < 1
    base = np.where(gaussian_filter(blob.astype(float), 4) > 0.5, 70.0, 180.0) + 0.15 * xx
    noise = np.random.default_rng(texture_seed).normal(0, 1, xx.shape)
    tex = gaussian_filter(noise, 1.5) - gaussian_filter(noise, 4)
    grey = (base + 20 * tex / tex.std())[20 + shift[1] : 20 + shift[1] + h, 20 + shift[0] : 20 + shift[0] + w]
    return np.clip(grey[..., None] * np.array([1.0, 0.8, 0.7]), 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path, quality: int = 90) -> None:
    Image.fromarray(arr).save(path, "JPEG", quality=quality)


# --------------------------------------------------------------------------- search


def _planted(rng, n_base, n_copies, max_flips):
    base = rng.integers(0, 2**64 - 1, size=n_base, dtype=np.uint64, endpoint=True)
    flips = [
        sum(1 << int(b) for b in rng.choice(64, rng.integers(0, max_flips + 1), replace=False))
        for _ in range(n_copies)
    ]
    return np.concatenate([base, base[:n_copies] ^ np.array(flips, dtype=np.uint64)])


def _reference(h, radius):
    """Brute force in plain Python ints: nothing shared with the code under test."""
    ints = [int(x) for x in h]
    return {
        (i, j): (ints[i] ^ ints[j]).bit_count()
        for i in range(len(ints))
        for j in range(i + 1, len(ints))
        if (ints[i] ^ ints[j]).bit_count() <= radius
    }


@pytest.mark.parametrize("radius", [0, 3, 4, 8, 10, 12])
def test_near_pairs_equals_brute_force_reference(radius):
    rng = np.random.default_rng(radius)
    h = _planted(rng, 400, 300, max_flips=radius + 3)
    h = np.concatenate([h, h[:20], h[:5]])  # exact duplicates: runs of equal band keys
    want = _reference(h, radius)
    assert len(want) > 50  # the planted copies make the test meaningful
    for method in ("index", "brute", "auto"):
        pairs, dist = near_pairs(h, radius, method=method, max_block_pairs=1000)
        got = dict(zip(map(tuple, pairs.tolist()), dist.tolist(), strict=True))
        assert got == want, method
        assert (pairs[:, 0] < pairs[:, 1]).all()


def test_index_search_is_used_at_scale_and_finds_planted_pairs():
    # At 60k hashes the cost model must pick the index, not brute force, for the default radius.
    assert search_plan(60_000, 8) is not None and search_plan(60_000, 4) is not None
    rng = np.random.default_rng(7)
    h = _planted(rng, 60_000, 0, 0)
    idx = rng.choice(60_000, 50, replace=False)
    bits = np.array([(1 << int(a)) | (1 << int(b)) for a, b in rng.integers(0, 64, (50, 2))], dtype=np.uint64)
    h = np.concatenate([h, h[idx] ^ bits])
    pairs, dist = near_pairs(h, 8)
    found = set(map(tuple, pairs.tolist()))
    assert {(int(i), 60_000 + k) for k, i in enumerate(idx)} <= found
    # random 64-bit hashes are almost never within 8 bits of each other by chance
    assert len(found) < 60 and (dist <= 8).all()
    brute, _ = near_pairs_bruteforce(h[:5000], 8)
    assert set(map(tuple, brute.tolist())) == {p for p in found if p[1] < 5000}


# --------------------------------------------------------------------------- verification


def _thumb(arr: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(arr).convert("L").resize((96, 72), Image.BOX)
    return np.asarray(grey)[:, 12:84][None]


def test_verification_accepts_a_shifted_rotated_copy_and_rejects_a_look_alike():
    a = _lesion(1)
    moved = np.rot90(_lesion(1, shift=(6, -4)), 2).copy()  # re-shot: shifted and turned 180 deg
    other = _lesion(2)  # another lesion with the same blob: same pHash region, other texture
    s_copy = verify_scores(_thumb(a), _thumb(moved), prefilter=-1)[0]
    s_other = verify_scores(_thumb(a), _thumb(other), prefilter=-1)[0]
    assert s_copy > 0.8 and s_other < 0.4
    assert s_copy > _params().verify_threshold > s_other  # the default threshold separates them
    # the prefilter skips the full-resolution pass (NaN) only for pairs failing the coarse pass
    s = verify_scores(np.r_[_thumb(a), _thumb(a)], np.r_[_thumb(moved), _thumb(other)], prefilter=0.45)
    assert s[0] == pytest.approx(s_copy) and np.isnan(s[1])


# --------------------------------------------------------------------------- grouping and assignment


def test_build_groups_refuses_oversize_and_cross_diagnosis_merges():
    lesions = np.array(["L1", "L1", "L2", "L2", "L3", "L4"])
    dx = np.array(["nv", "nv", "nv", "nv", "nv", "mel"])
    pairs = np.array([[0, 2], [2, 4], [4, 5]])
    roots, refused = build_groups(lesions, dx, pairs, np.array([0.9, 0.8, 0.99]), max_group_size=4)
    assert refused == ["", "size", "diagnosis"]
    assert roots.tolist() == [0, 0, 0, 0, 4, 5]


def test_assign_splits_keeps_class_proportions_and_every_class_everywhere():
    rng = np.random.default_rng(0)
    sizes = np.r_[rng.integers(1, 4, 300), [1, 1, 2]]
    groups = pd.DataFrame({"dx": ["nv"] * 300 + ["df"] * 3, "n": sizes}, index=np.arange(303))
    out = assign_splits(groups, _params().fractions, np.random.default_rng(1))
    assert set(out[groups["dx"] == "df"]) == {"train", "val", "test"}
    nv = groups[groups["dx"] == "nv"].assign(split=out)
    share = nv.groupby("split")["n"].sum() / nv["n"].sum()
    assert share["train"] == pytest.approx(0.70, abs=0.01)
    assert share["val"] == pytest.approx(0.15, abs=0.01)


def test_assign_splits_gives_every_split_its_share_of_multi_image_lesions():
    # 200 single-image lesions and 100 of 4 images: val and test must not be all singles
    groups = pd.DataFrame({"dx": "nv", "n": [1] * 200 + [4] * 100}, index=np.arange(300))
    out = assign_splits(groups, _params().fractions, np.random.default_rng(3))
    per_split = groups.assign(split=out).groupby("split")
    images_per_group = per_split["n"].sum() / per_split.size()
    whole = groups["n"].sum() / len(groups)
    for s in ("train", "val", "test"):
        assert images_per_group[s] == pytest.approx(whole, rel=0.1), s
    assert (per_split["n"].sum() / groups["n"].sum())["val"] == pytest.approx(0.15, abs=0.01)


def test_leakage_check_counts_straddling_groups_lesions_and_pairs():
    split = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "lesion_id": ["L1", "L1", "L2", "L3"],
            "group_id": [0, 1, 2, 2],
            "split": ["train", "test", "val", "test"],
        }
    )
    dups = pd.DataFrame({"image_id_a": ["a", "c"], "image_id_b": ["d", "d"], "joined": ["True", "False"]})
    assert leakage(split, dups) == {
        "leaking_group_ids": 1,  # group 2 in val and test
        "leaking_lesions": 1,  # L1 in train and test
        "leaking_duplicate_pairs": 1,  # a-d joined but split; c-d was refused, not claimed
        "leaking_groups": 3,
    }


# --------------------------------------------------------------------------- the stage


def test_lesions_never_straddle_and_classes_in_every_split(tmp_path):
    raw = write_raw(tmp_path / "raw", _rows(n_lesions_per_class=6, images_per_lesion=3))
    res = _run(raw, tmp_path)
    s = res.split
    assert (s.groupby("lesion_id")["split"].nunique() == 1).all()
    assert (s.groupby("lesion_id")["group_id"].nunique() == 1).all()
    assert (s.groupby("dx")["split"].nunique() == 3).all()
    assert res.metrics["leaking_groups"] == 0
    written = pd.read_csv(tmp_path / "split" / "split.csv")
    assert list(written.columns[:5]) == ["image_id", "lesion_id", "group_id", "dx", "split"]
    assert written["image_id"].is_monotonic_increasing
    assert len(written) == 54 and set(written["split"]) == {"train", "val", "test"}
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_images"] == 54 and m["n_lesions"] == 18 and m["largest_group"] == 3
    assert m["train_n"] + m["val_n"] + m["test_n"] == 54
    assert m["train_n_nv"] == int(((written["split"] == "train") & (written["dx"] == "nv")).sum())
    plot = pd.read_csv(tmp_path / "plots" / "class_distribution.csv")
    assert list(plot.columns) == ["split", "dx", "count", "share", "class_split"]
    assert plot["count"].sum() == 54 and len(plot) == 3 * 7  # every split x every HAM class
    nv_train = plot[plot["class_split"] == "nv train"].iloc[0]
    assert nv_train["count"] == m["train_n_nv"] and nv_train["share"] == round(
        m["train_n_nv"] / m["train_n"], 4
    )
    assert (tmp_path / "plots" / "class_distribution.png").read_bytes()[:4] == b"\x89PNG"


def test_near_identical_images_under_two_lesion_ids_are_grouped_look_alikes_are_not(tmp_path):
    rows = _rows(n_lesions_per_class=4, images_per_lesion=1)
    raw = write_raw(tmp_path / "raw", rows, size=(200, 150))
    img = raw / "images"
    _save(_lesion(1), img / "ISIC_0000000.jpg")
    _save(_lesion(1, shift=(3, 2)), img / "ISIC_0000001.jpg", quality=70)  # shifted, re-compressed
    _save(_lesion(2), img / "ISIC_0000002.jpg")  # same blob, another lesion's texture
    res = _run(raw, tmp_path)
    s = res.split.set_index("image_id")
    assert s.loc["ISIC_0000000", "group_id"] == s.loc["ISIC_0000001", "group_id"]
    assert s.loc["ISIC_0000000", "split"] == s.loc["ISIC_0000001", "split"]
    assert s.loc["ISIC_0000002", "group_id"] not in {s.loc["ISIC_0000000", "group_id"]}
    d = pd.read_csv(tmp_path / "split" / "duplicates.csv")
    pairs = set(zip(d["image_id_a"], d["image_id_b"], strict=True))
    assert ("ISIC_0000000", "ISIC_0000001") in pairs
    assert not pairs & {("ISIC_0000000", "ISIC_0000002"), ("ISIC_0000001", "ISIC_0000002")}
    row = d[(d["image_id_a"] == "ISIC_0000000") & (d["image_id_b"] == "ISIC_0000001")].iloc[0]
    assert not row["same_lesion"] and row["joined"] and row["score"] > 0.55
    m = res.metrics
    # the look-alike was a hash candidate (a chance match) that verification turned down
    assert m["n_candidate_pairs"] >= 3 > m["n_near_duplicate_pairs"] == 1
    assert m["n_cross_lesion_duplicate_pairs"] == 1 and m["n_groups"] == 11


def test_undecodable_and_missing_images_are_named_and_kept_in_their_group(tmp_path, caplog):
    raw = write_raw(tmp_path / "raw", _rows())
    (raw / "images" / "ISIC_0000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (raw / "images" / "ISIC_0000005.jpg").unlink()
    cut = raw / "images" / "ISIC_0000007.jpg"  # a download cut short
    cut.write_bytes(cut.read_bytes()[:400])
    res = _run(raw, tmp_path)
    und = pd.read_csv(tmp_path / "split" / "undecodable.csv")
    assert und["image_id"].tolist() == ["ISIC_0000003", "ISIC_0000005", "ISIC_0000007"]
    assert und["error"].str.startswith("cannot decode: OSError").tolist() == [True, False, True]
    assert und["error"].iloc[1] == "missing file"
    assert "ISIC_0000003.jpg: cannot decode: OSError" in caplog.text
    assert "ISIC_0000005.jpg: missing file" in caplog.text
    assert "ISIC_0000007.jpg: cannot decode: OSError" in caplog.text
    assert res.metrics["n_undecodable"] == 3 and res.metrics["n_images"] == 24
    s = res.split.set_index("image_id")
    assert s.loc["ISIC_0000003", "split"] == s.loc["ISIC_0000002", "split"]  # same lesion HAM_nv1
    assert s.loc["ISIC_0000005", "group_id"] == s.loc["ISIC_0000004", "group_id"]  # HAM_nv2


def test_tiny_class_gives_a_clear_message_and_writes_nothing(tmp_path, capsys):
    rows = _rows() + [{"lesion_id": "HAM_df0", "image_id": "ISIC_0000900", "dx": "df"},
                      {"lesion_id": "HAM_df1", "image_id": "ISIC_0000901", "dx": "df"}]  # fmt: skip
    raw = write_raw(tmp_path / "raw", rows)
    with pytest.raises(StageError, match=r"class 'df' has only 2 lesion group\(s\); at least 3"):
        _run(raw, tmp_path)
    assert not (tmp_path / "split").exists() and not (tmp_path / "m.json").exists()
    # the command line: one line, no traceback, exit 1
    (tmp_path / "params.yaml").write_text("split:\n  workers: 1\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--raw", str(raw), "--out", str(tmp_path / "o"),
            "--metrics", str(tmp_path / "o.json"), "--plots", str(tmp_path / "p")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: split: class 'df' has only 2 lesion group(s)" in err and "Traceback" not in err


def test_bad_metadata_is_named(tmp_path):
    raw = write_raw(tmp_path / "raw", _rows())
    meta = pd.read_csv(raw / "metadata.csv")
    pd.concat([meta, meta.iloc[[4]]]).to_csv(raw / "metadata.csv", index=False)
    # 24 rows from line 2 on; the copy of the 5th (line 6) is line 26
    with pytest.raises(
        StageError, match=r"metadata.csv: image_id listed more than once: ISIC_0000004 \(rows 6, 26\)"
    ):
        _run(raw, tmp_path)
    meta.drop(columns="dx").to_csv(raw / "metadata.csv", index=False)
    with pytest.raises(StageError, match=r"metadata.csv: missing column\(s\) \['dx'\]"):
        _run(raw, tmp_path)
    with pytest.raises(StageError, match=r"metadata.csv: not found; run the download stage first"):
        _run(tmp_path / "nowhere", tmp_path)


def test_deterministic_for_a_seed_different_for_another(tmp_path):
    raw = write_raw(tmp_path / "raw", _rows(n_lesions_per_class=10, images_per_lesion=2))
    _run(raw, tmp_path / "a", seed=3)
    _run(raw, tmp_path / "b", seed=3)
    _run(raw, tmp_path / "c", seed=4)
    a = (tmp_path / "a" / "split" / "split.csv").read_bytes()
    assert a == (tmp_path / "b" / "split" / "split.csv").read_bytes()
    assert a != (tmp_path / "c" / "split" / "split.csv").read_bytes()


def test_dedupe_and_canonical_options(tmp_path):
    rows = _rows(n_lesions_per_class=6, images_per_lesion=3)
    rows += [{"lesion_id": f"HAM_nvx{k}", "image_id": f"ISIC_{900 + k:07d}", "dx": "nv"} for k in range(6)]
    raw = write_raw(tmp_path / "raw", rows)  # nv is the majority class (24 of 60 images)
    res = _run(raw, tmp_path, dedupe_majority_in_train=True, eval_images="canonical")
    s = res.split
    kept = s[s["split"] != "dropped"]
    assert (kept[kept["split"].isin(["val", "test"])].groupby("group_id").size() == 1).all()
    train_nv = kept[(kept["split"] == "train") & (kept["dx"] == "nv")]
    assert (train_nv.groupby("group_id").size() == 1).all()
    minority_train = kept[(kept["split"] == "train") & (kept["dx"] != "nv")]
    assert (minority_train.groupby("group_id").size() == 3).all()  # minority duplicates kept
    # the canonical image is the smallest image_id of its group; dropped rows keep their split
    dropped = s[s["split"] == "dropped"]
    assert (dropped["image_id"] > dropped["group_id"].map(kept.groupby("group_id")["image_id"].min())).all()
    assert set(dropped["assigned_split"]) <= {"train", "val", "test"}
    m = res.metrics
    assert m["n_dropped"] == len(dropped) == m["n_dropped_train_majority"] + m["n_dropped_eval_canonical"] > 0
    assert m["train_n"] + m["val_n"] + m["test_n"] == len(kept) and m["leaking_groups"] == 0


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path):
    raw = write_raw(tmp_path / "raw", _rows())
    huge_header_jpeg(raw / "images" / "ISIC_0000004.jpg", 20_000, 20_000)
    res = _run(raw, tmp_path)
    und = pd.read_csv(tmp_path / "split" / "undecodable.csv")
    assert und["image_id"].tolist() == ["ISIC_0000004"]
    assert "20000x20000 pixels is over the limit of 100,000,000" in und["error"].iloc[0]
    assert res.metrics["n_undecodable"] == 1
