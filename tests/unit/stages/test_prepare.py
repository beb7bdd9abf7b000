"""The prepare stage: decode + resize once into TFRecord shards, read back by skinlesion.model.tfdata."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.errors import StageError
from skinlesion.core.images import PAD_COLOR, draft_request, load_image
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.params.load import parse_params
from skinlesion.params.prepare import PrepareParams
from stages.prepare import main, run, shard_bounds
from tests.conftest import make_jpeg, write_raw

SPLIT_COLUMNS = ("image_id", "lesion_id", "group_id", "dx", "split")


def _rows(n: int, *, splits=("train", "train", "val", "test")) -> list[dict]:
    """n metadata rows cycling through classes and splits; every 5th has an unknown age."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "image_id": f"ISIC_{i:07d}",
                "lesion_id": f"HAM_{i // 2:07d}",
                "dx": CLASSES[i % len(CLASSES)],
                "age": "" if i % 5 == 4 else f"{30 + i}.0",
                "sex": SEXES[i % len(SEXES)],
                "localization": LOCALIZATIONS[i % len(LOCALIZATIONS)],
                "split": splits[i % len(splits)],
            }
        )
    return rows


def _write_split(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*SPLIT_COLUMNS, "extra"], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(
                {"group_id": r["lesion_id"], "extra": "x", **{k: r[k] for k in SPLIT_COLUMNS if k in r}}
            )
    return path


def _setup(tmp_path: Path, rows: list[dict], *, size=(64, 48)) -> tuple[Path, Path]:
    raw = write_raw(tmp_path / "raw", rows, size=size)
    return raw, _write_split(tmp_path / "split.csv", rows)


def _params(**kw) -> PrepareParams:
    return parse_params({"prepare": {"image_size": 32, "workers": 2, **kw}}).prepare


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _reference(path: Path, size: int, aspect: str, *, gap: float | None = 2.0) -> np.ndarray:
    """The documented recipe written out with plain PIL calls (gap=None: no draft mode)."""
    img = Image.open(path)
    w, h = img.size
    if gap is not None and img.format == "JPEG":
        ref = min(w, h) if aspect == "crop" else max(w, h)
        img.draft("RGB", (math.ceil(gap * size * w / ref), math.ceil(gap * size * h / ref)))
    img = img.convert("RGB")
    w, h = img.size
    if aspect == "crop":
        m = min(w, h)
        x, y = (w - m) / 2, (h - m) / 2
        # box= resamples from the centre square, taking the filter's support from its neighbours
        return np.asarray(img.resize((size, size), Image.BICUBIC, box=(x, y, x + m, y + m)))
    m = max(w, h)
    nw, nh = round(w * size / m), round(h * size / m)
    out = Image.new("RGB", (size, size), PAD_COLOR)
    out.paste(img.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out)


# --------------------------------------------------------------------------- pure helpers


def test_shard_bounds_cover_rows_in_near_equal_shards():
    assert shard_bounds(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_bounds(4, 4) == [(0, 4)]
    assert shard_bounds(1, 2048) == [(0, 1)]


def test_draft_request_keeps_the_final_resize_at_least_gap():
    # crop: the short side must stay >= 2 * 64 after the decoder's downscale
    assert draft_request(1200, 900, 64, "crop", 2.0) == (171, 128)
    # pad: the long side must stay >= 2 * 64
    assert draft_request(1200, 900, 64, "pad", 2.0) == (128, 96)
    img = Image.new("RGB", (1200, 900))
    assert min(draft_request(*img.size, 64, "crop", 1.0)) == 64


def test_large_jpeg_is_decoded_in_draft_mode_and_matches_a_full_decode(tmp_path):
    # photo-like content: detail coarser than the output pixels (make_jpeg's 8-pixel noise would
    # be pure aliasing at 64x64, where any two resampling paths disagree)
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    path = tmp_path / "big.jpg"
    small.resize((1200, 900), Image.BICUBIC).save(path, "JPEG", quality=90)
    with Image.open(path) as img:
        img.draft("RGB", draft_request(1200, 900, 64, "crop", 2.0))
        assert img.size == (300, 225)  # decoded at 1/4 scale: 16x fewer pixels
    fast = load_image(path, 64, "crop", 2.0)
    full = _reference(path, 64, "crop", gap=None)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.array_equal(fast, _reference(path, 64, "crop"))
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert diff.mean() < 1.5, diff.mean()
    assert not np.array_equal(fast, full)  # the draft path really ran


def test_pad_keeps_the_whole_image_with_grey_borders_and_crop_fills_the_square(tmp_path):
    path = make_jpeg(tmp_path / "wide.jpg", size=(96, 48), color=(200, 30, 40))
    padded = load_image(path, 32, "pad")
    cropped = load_image(path, 32, "crop")
    assert padded.shape == cropped.shape == (32, 32, 3)
    # 96x48 -> 32x16 in the middle: 8 rows of pad colour above and below
    assert (padded[:7] == PAD_COLOR).all() and (padded[-7:] == PAD_COLOR).all()
    assert np.abs(padded[10:22].astype(int) - (200, 30, 40)).max() <= 6
    assert np.abs(cropped.astype(int) - (200, 30, 40)).max() <= 6


def test_grayscale_cmyk_and_png_named_jpg_become_rgb(tmp_path):
    gray = make_jpeg(tmp_path / "gray.jpg", size=(40, 40), color=(100, 100, 100), mode="L")
    cmyk = make_jpeg(tmp_path / "cmyk.jpg", size=(40, 40), color=(20, 120, 220), mode="CMYK")
    png = tmp_path / "png.jpg"
    Image.new("RGBA", (50, 40), (10, 200, 30, 255)).save(png, "PNG")
    with Image.open(gray) as g, Image.open(cmyk) as c, Image.open(png) as p:
        assert (g.mode, c.mode, p.format) == ("L", "CMYK", "PNG")
    out_gray = load_image(gray, 16, "crop")
    assert out_gray.shape == (16, 16, 3) and np.abs(out_gray.astype(int) - 100).max() <= 2
    out_cmyk = load_image(cmyk, 16, "crop")
    assert out_cmyk.shape == (16, 16, 3)
    assert np.abs(out_cmyk.mean(axis=(0, 1)) - (20, 120, 220)).max() < 12
    assert np.array_equal(load_image(png, 16, "crop"), np.full((16, 16, 3), (10, 200, 30), np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # blue left third
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    out = load_image(tmp_path / "o.jpg", 30, "pad").astype(int)
    assert np.abs(out[2, 15] - (0, 0, 255)).max() < 8  # blue now on top
    assert np.abs(out[27, 15] - (255, 0, 0)).max() < 8
    assert (out[15, :4] == PAD_COLOR).all()  # tall image: pad left and right


# --------------------------------------------------------------------------- the stage


def test_round_trip_pixels_labels_ids_and_meta_in_csv_order(tmp_path):
    from skinlesion.model.tfdata import load_manifest, read_split, read_split_numpy

    rows = _rows(14)
    raw, split = _setup(tmp_path, rows, size=(72, 54))
    res = run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "prepared")
    out = tmp_path / "prepared"
    assert res.counts == {"train": 8, "val": 3, "test": 3}

    by_id = {r["image_id"]: r for r in rows}
    manifest = load_manifest(out)
    assert manifest["image_size"] == 32 and manifest["aspect"] == "crop"
    assert manifest["classes"] == list(CLASSES) and manifest["sexes"] == list(SEXES)
    for s in ("train", "val", "test"):
        listed = _read_csv(out / f"{s}.csv")
        assert [r["image_id"] for r in listed] and all(by_id[r["image_id"]]["split"] == s for r in listed)
        want_counts = {c: sum(by_id[r["image_id"]]["dx"] == c for r in listed) for c in CLASSES}
        assert manifest["splits"][s]["class_counts"] == want_counts
        assert manifest["splits"][s]["n"] == len(listed)

        got = list(read_split(out, s, with_meta=True).as_numpy_iterator())
        assert len(got) == len(listed)
        for (feat, label), r in zip(got, listed, strict=True):
            src = by_id[r["image_id"]]
            assert label == CLASSES.index(src["dx"]) == int(r["label"])
            assert feat["image"].dtype == np.uint8 and feat["image"].shape == (32, 32, 3)
            assert np.array_equal(
                feat["image"], _reference(raw / "images" / f"{r['image_id']}.jpg", 32, "crop")
            )
            if src["age"]:
                assert (
                    feat["age"] == pytest.approx(float(src["age"])) and r["age"] == f"{float(src['age']):g}"
                )
            else:
                assert math.isnan(feat["age"]) and r["age"] == ""
            assert feat["sex"] == SEXES.index(src["sex"]) and r["sex"] == src["sex"]
            assert feat["localization"] == LOCALIZATIONS.index(src["localization"])
            assert r["lesion_id"] == src["lesion_id"] and r["dx"] == src["dx"]

    arr = read_split_numpy(out, "val")
    listed = _read_csv(out / "val.csv")
    assert arr.image_ids.tolist() == [r["image_id"] for r in listed]
    assert arr.lesion_ids.tolist() == [r["lesion_id"] for r in listed]
    assert arr.labels.tolist() == [int(r["label"]) for r in listed]
    assert arr.images.shape == (3, 32, 32, 3)
    first = raw / "images" / f"{listed[0]['image_id']}.jpg"
    assert np.array_equal(arr.images[0], _reference(first, 32, "crop"))
    plain = next(read_split(out, "val").as_numpy_iterator())
    assert np.array_equal(plain[0], arr.images[0]) and plain[1] == arr.labels[0]


def test_pad_stage_output_has_grey_borders(tmp_path):
    from skinlesion.model.tfdata import read_split_numpy

    raw, split = _setup(tmp_path, _rows(4), size=(80, 40))
    run(_params(aspect="pad", workers=1), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    arr = read_split_numpy(tmp_path / "p", "train")
    assert arr.images.shape == (2, 32, 32, 3)
    assert (arr.images[:, :7] == PAD_COLOR).all() and (arr.images[:, -7:] == PAD_COLOR).all()
    assert not (arr.images[:, 12:20] == PAD_COLOR).all()
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["aspect"] == "pad"


def test_dropped_rows_are_skipped(tmp_path):
    rows = _rows(8, splits=("train", "dropped", "val", "test"))
    raw, split = _setup(tmp_path, rows)
    res = run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    assert res.counts == {"train": 2, "val": 2, "test": 2}
    written = {
        r["image_id"] for s in ("train", "val", "test") for r in _read_csv(tmp_path / "p" / f"{s}.csv")
    }
    assert written == {r["image_id"] for r in rows if r["split"] != "dropped"}


def test_shard_size_splits_into_several_shards_read_back_in_order(tmp_path):
    from skinlesion.model.tfdata import read_split

    rows = _rows(13, splits=("train",) * 10 + ("val", "test", "val"))
    raw, split = _setup(tmp_path, rows)
    run(_params(shard_size=3), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    out = tmp_path / "p"
    names = sorted(p.name for p in out.glob("train-*.tfrecord"))
    assert names == [f"train-{k:05d}-of-00004.tfrecord" for k in range(4)]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"] == names
    labels = [int(r["label"]) for r in _read_csv(out / "train.csv")]
    in_order = [(x.tobytes(), int(y)) for x, y in read_split(out, "train").as_numpy_iterator()]
    assert [y for _, y in in_order] == labels
    mixed = [(x.tobytes(), int(y)) for x, y in read_split(out, "train", ordered=False).as_numpy_iterator()]
    assert sorted(mixed) == sorted(in_order) and mixed != in_order  # shards read interleaved


def test_same_input_gives_byte_identical_output_whatever_the_workers_and_row_order(tmp_path):
    rows = _rows(20)
    raw, split = _setup(tmp_path, rows)
    run(_params(shard_size=4, workers=2), raw_dir=raw, split_csv=split, out_dir=tmp_path / "a")
    shuffled = _write_split(tmp_path / "split2.csv", rows[::-1])
    run(_params(shard_size=4, workers=1), raw_dir=raw, split_csv=shuffled, out_dir=tmp_path / "b")
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files_a) == 3 + 2 + 2 + 3 + 1  # 10 train / 5 val / 5 test in shards of <= 4, csvs, manifest
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_undecodable_images_are_all_named_and_nothing_is_written(tmp_path):
    rows = _rows(8)
    raw, split = _setup(tmp_path, rows)
    good = (raw / "images" / "ISIC_0000001.jpg").read_bytes()
    (raw / "images" / "ISIC_0000001.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (raw / "images" / "ISIC_0000006.jpg").write_bytes(b"")  # zero bytes
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "old.txt").write_text("previous output")
    with pytest.raises(StageError) as e:
        run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    msg = str(e.value)
    assert msg.startswith("2 of 8 image(s) could not be decoded")
    assert "ISIC_0000001 (" in msg and "truncated" in msg
    assert "ISIC_0000006 (" in msg and "cannot identify image file" in msg
    assert str(raw / "images" / "ISIC_0000006.jpg") in msg
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["old.txt"]  # previous output intact
    assert not list(tmp_path.glob(".p.tmp-*"))


def test_many_failures_are_counted_beyond_the_first_ten(tmp_path):
    rows = _rows(12)
    raw, split = _setup(tmp_path, rows)
    for r in rows:
        (raw / "images" / f"{r['image_id']}.jpg").write_bytes(b"not an image")
    with pytest.raises(StageError, match=r"^12 of 12 image\(s\) could not be decoded.* and 2 more$"):
        run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")


def test_missing_image_file_is_named(tmp_path):
    raw, split = _setup(tmp_path, _rows(4))
    (raw / "images" / "ISIC_0000002.jpg").unlink()
    with pytest.raises(StageError, match=r"ISIC_0000002 \(.*ISIC_0000002\.jpg\): FileNotFoundError"):
        run(_params(workers=1), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [{**r, "dx": "melanoma"} if i == 2 else r for i, r in enumerate(rows)],
         "split.csv: image ISIC_0000002: dx 'melanoma' is not one of"),
        (lambda rows: [r for r in rows if r["split"] != "test"],
         "split.csv: no rows with split 'test'; train, val and test are all needed"),
        (lambda rows: [*rows, rows[0]], "split.csv: image_id listed more than once: ISIC_0000000"),
        (lambda rows: [*rows, {**rows[0], "image_id": "ISIC_0999999"}],
         "metadata.csv: no metadata row for image(s) of"),
    ],
)  # fmt: skip
def test_bad_split_rows_give_one_clear_message(tmp_path, edit, message):
    rows = _rows(8)
    raw = write_raw(tmp_path / "raw", rows)
    split = _write_split(tmp_path / "split.csv", edit(rows))
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_bad_metadata_values_name_the_image(tmp_path):
    rows = _rows(8)
    rows[3] = {**rows[3], "sex": "m"}
    raw, split = _setup(tmp_path, rows)
    with pytest.raises(StageError, match=r"metadata.csv: image ISIC_0000003: sex 'm' is not one of"):
        run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")
    rows[3] = {**rows[3], "sex": "male", "age": "old"}
    raw, split = _setup(tmp_path, rows)
    with pytest.raises(StageError, match=r"metadata.csv: image ISIC_0000003: age 'old' is not a number"):
        run(_params(), raw_dir=raw, split_csv=split, out_dir=tmp_path / "p")


def test_split_csv_missing_column_is_named(tmp_path):
    raw = write_raw(tmp_path / "raw", _rows(4))
    (tmp_path / "split.csv").write_text("image_id,lesion_id,split\nISIC_0000000,HAM_0000000,train\n")
    with pytest.raises(StageError, match=r"split.csv: missing column\(s\) \['dx'\]"):
        run(_params(), raw_dir=raw, split_csv=tmp_path / "split.csv", out_dir=tmp_path / "p")


def test_cli_success_and_one_line_error(tmp_path, capsys):
    raw, split = _setup(tmp_path, _rows(6))
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  image_size: 16\n  workers: 1\n")
    out = tmp_path / "prepared"
    assert main(["--params", str(params), "--raw", str(raw), "--split", str(split), "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["image_size"] == 16
    capsys.readouterr()
    missing = tmp_path / "nope.csv"
    assert main(["--params", str(params), "--raw", str(raw), "--split", str(missing), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {missing}: not found"
    assert (out / "manifest.json").is_file()  # the earlier good output is untouched


def test_params_bounds_for_prepare():
    from skinlesion.core.errors import ParamsError

    with pytest.raises(ParamsError, match=r"prepare.aspect: 'stretch' is not one of \['pad', 'crop'\]"):
        parse_params({"prepare": {"aspect": "stretch"}})
    with pytest.raises(ParamsError, match=r"prepare.draft_gap: 0.5 is below the minimum 1.0"):
        parse_params({"prepare": {"draft_gap": 0.5}})
