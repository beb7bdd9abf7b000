"""Per-image drift features, the decode guards and the drift stage's input errors (no bundle)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stages import drift
from stages.imagefeatures import FeatureSpec, features_chunk, image_features, jpeg_quality, pixel_features
from stages.images import ImageRejected, list_images, load_image, open_checked
from stages.params import ParamsError, parse_params
from tests.conftest import make_jpeg

SPEC = FeatureSpec(image_size=32, aspect="crop", stats_size=64)


def _texture(seed: int = 0, size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, size=(size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.NEAREST)


def huge_header_jpeg(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A small real JPEG whose frame header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path, seed: int = 1) -> Path:
    buf = io.BytesIO()
    _texture(seed).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# --------------------------------------------------------------------------- features


def test_jpeg_quality_estimate_follows_the_encoder(tmp_path):
    estimates = {}
    for q in (10, 30, 60, 75, 90, 95):
        p = tmp_path / f"q{q}.jpg"
        _texture().save(p, "JPEG", quality=q)
        with Image.open(p) as img:
            estimates[q] = jpeg_quality(img)
    for q, est in estimates.items():
        assert abs(est - q) <= 3, estimates
    png = tmp_path / "x.png"
    _texture().save(png)
    with Image.open(png) as img:
        assert jpeg_quality(img) == 100.0


def test_pixel_features_see_light_colour_blur_and_vignette():
    base = np.asarray(_texture(), dtype=np.uint8)
    f = pixel_features(base)
    dark = pixel_features((base * 0.5).astype(np.uint8))
    assert dark["brightness"] < 0.6 * f["brightness"] and dark["lab_l"] < f["lab_l"] - 10
    warm = base.astype(float) * np.array([1.2, 1.0, 0.7])
    w = pixel_features(np.clip(warm, 0, 255).astype(np.uint8))
    assert w["lab_b"] > f["lab_b"] + 5 and w["red_mean"] > f["red_mean"] and w["saturation"] > f["saturation"]
    blurred = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(3)))
    assert pixel_features(blurred)["sharpness"] < f["sharpness"] - 0.5
    # a black ring outside the inscribed ellipse: the corners are dark, the centre unchanged
    h, w_ = base.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w_]
    ring = np.hypot((xx + 0.5 - w_ / 2) / (w_ / 2), (yy + 0.5 - h / 2) / (h / 2)) > 1.0
    vign = base.copy()
    vign[ring] = 0
    assert f["dark_corners"] < 0.1 and pixel_features(vign)["dark_corners"] == 1.0


def test_image_features_size_and_model_input_from_one_decode(tmp_path):
    p = tmp_path / "a.jpg"
    _texture(size=(600, 450)).save(p, "JPEG", quality=80)
    feats, pixels = image_features(p, SPEC)
    assert (feats["width"], feats["height"]) == (600.0, 450.0)
    assert feats["aspect"] == pytest.approx(4 / 3)
    assert feats["file_kb"] == pytest.approx(p.stat().st_size / 1024)
    assert abs(feats["jpeg_quality"] - 80) <= 3
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    # the model input is exactly what the prepare stage's decode path gives
    assert np.array_equal(pixels, load_image(p, 32, "crop", 2.0))
    # photometric features barely depend on the file's resolution (measured on the stats view)
    small = tmp_path / "small.jpg"
    Image.open(p).resize((200, 150), Image.BICUBIC).save(small, "JPEG", quality=80)
    f2, _ = image_features(small, SPEC)
    for k in ("brightness", "lab_a", "lab_b", "saturation"):
        assert f2[k] == pytest.approx(feats[k], rel=0.05, abs=0.5), k


def test_bad_files_are_facts_not_crashes(tmp_path):
    good = make_jpeg(tmp_path / "good.jpg", size=(80, 60))
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    bomb = huge_header_jpeg(tmp_path / "bomb.jpg")
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    items = [(p.name, str(p)) for p in (good, text, bomb, cut, empty)] + [
        ("gone.jpg", str(tmp_path / "gone.jpg"))
    ]
    out = {name: (feats, why) for name, feats, _px, why in features_chunk(items, SPEC)}
    assert out["good.jpg"][0] is not None and out["good.jpg"][1] is None
    assert "cannot identify image file" in out["notes.jpg"][1]
    assert "20000x20000" in out["bomb.jpg"][1] and "decompression-bomb" in out["bomb.jpg"][1]
    assert "truncated" in out["cut.jpg"][1]
    assert out["empty.jpg"][0] is None
    assert out["gone.jpg"][1] == "file not found"


def test_header_cap_refuses_before_decoding(tmp_path):
    bomb = huge_header_jpeg(tmp_path / "bomb.jpg", 20_000, 20_000)
    with pytest.raises(ImageRejected, match=r"20000x20000 pixels is over the limit of 40,000,000"):
        open_checked(bomb, 40_000_000)
    with pytest.raises(ImageRejected, match="over the limit"):
        load_image(bomb, 32, "crop")  # the prepare/predict path applies the default cap too


def test_list_images_recurses_skips_hidden_and_non_images(tmp_path):
    make_jpeg(tmp_path / "b" / "x.JPG")
    make_jpeg(tmp_path / "a.jpeg")
    make_jpeg(tmp_path / ".hidden" / "y.jpg")
    (tmp_path / "metadata.csv").write_text("a,b\n")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.jpeg", "b/x.JPG"]


# --------------------------------------------------------------------------- stage errors


def _run(tmp_path: Path, images: Path):
    return drift.run(
        parse_params({}).drift,
        bundle_dir=tmp_path / "no-bundle",
        images_dir=images,
        report_dir=tmp_path / "report",
        metrics_path=tmp_path / "drift.json",
        workspace=None,
    )


def test_missing_or_empty_folder_is_one_line_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(drift.StageError, match=rf"drift.new_images: {missing}: folder not found"):
        _run(tmp_path, missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(drift.StageError, match=rf"{empty}: no image files"):
        _run(tmp_path, empty)
    rc = drift.main([
        "--bundle", str(tmp_path / "b"), "--images", str(missing), "--report", str(tmp_path / "r"),
        "--metrics", str(tmp_path / "m.json"), "--no-workspace",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"error: drift.new_images: {missing}: folder not found"]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r").exists()


def test_bundle_without_reference_is_a_clear_error(tmp_path):
    make_jpeg(tmp_path / "batch" / "a.jpg")
    (tmp_path / "no-bundle").mkdir()
    with pytest.raises(drift.StageError, match="bundle.json: not found"):
        _run(tmp_path, tmp_path / "batch")


def test_drift_params_are_checked_at_load():
    with pytest.raises(ParamsError, match="drift.num_method: 'kss' is not one of"):
        parse_params({"drift": {"num_method": "kss"}})
    with pytest.raises(ParamsError, match="drift.workspace: '../../etc' must be a relative path inside"):
        parse_params({"drift": {"workspace": "../../etc"}})
    with pytest.raises(ParamsError, match="drift.monitor_state: '/tmp/x' must be a relative path"):
        parse_params({"drift": {"monitor_state": "/tmp/x"}})
    with pytest.raises(ParamsError, match="drift.reference.split: 'test' is not one of"):
        parse_params({"drift": {"reference": {"split": "test"}}})


def test_js_distance_and_normed_wasserstein():
    import pandas as pd

    a = pd.Series(["nv"] * 80 + ["mel"] * 20)
    assert drift.js_distance(a, a, ["mel", "nv"]) == 0.0
    assert drift.js_distance(a, pd.Series(["mel"] * 100), ["mel", "nv"]) > 0.5
    r = pd.Series(np.random.default_rng(0).normal(0, 2, 5000))
    assert drift.normed_wasserstein(r, r + 2.0) == pytest.approx(1.0, abs=0.02)  # one reference std
    assert drift.normed_wasserstein(pd.Series([200.0] * 50), pd.Series([600.0] * 5)) > 1000
