"""Per-image drift features, the decode guards and the drift stage's input errors (no bundle)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from skinlesion.checks import drift as drift_check
from skinlesion.checks.drift import MIN_IMAGES, js_distance, normed_wasserstein
from skinlesion.checks.drift_metadata import batch_metadata, check_metadata
from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.images import ImageRejected, list_images, load_image, open_checked
from skinlesion.core.schema import CLASSES, SEXES
from skinlesion.core.tables import read_rows
from skinlesion.measure.imagefeatures import (
    FeatureSpec,
    features_chunk,
    image_features,
    jpeg_quality,
    list_batch,
    pixel_features,
)
from skinlesion.measure.scoring import IMAGE_ONLY
from skinlesion.model.drift_reference import REFERENCE_KEY, write_drift_reference
from skinlesion.params.load import parse_params
from stages import drift
from tests.builders.bundles import POINTS, write_bundle
from tests.builders.images import huge_header_jpeg, texture, truncated_jpeg
from tests.conftest import make_jpeg, write_raw

SPEC = FeatureSpec(image_size=32, aspect="crop", stats_size=64)


# --------------------------------------------------------------------------- features


def test_jpeg_quality_estimate_follows_the_encoder(tmp_path):
    estimates = {}
    for q in (10, 30, 60, 75, 90, 95):
        p = tmp_path / f"q{q}.jpg"
        texture().save(p, "JPEG", quality=q)
        with Image.open(p) as img:
            estimates[q] = jpeg_quality(img)
    for q, est in estimates.items():
        assert abs(est - q) <= 3, estimates
    png = tmp_path / "x.png"
    texture().save(png)
    with Image.open(png) as img:
        assert jpeg_quality(img) == 100.0


def test_pixel_features_see_light_colour_blur_and_vignette():
    base = np.asarray(texture(), dtype=np.uint8)
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
    texture(size=(600, 450)).save(p, "JPEG", quality=80)
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
    with pytest.raises(StageError, match=rf"drift.new_images: {missing}: folder not found"):
        _run(tmp_path, missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(StageError, match=rf"{empty}: no image files"):
        _run(tmp_path, empty)
    rc = drift.main([
        "--bundle", str(tmp_path / "b"), "--images", str(missing), "--report", str(tmp_path / "r"),
        "--metrics", str(tmp_path / "m.json"), "--no-workspace",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    # given on the command line: the error names the option, not the params key
    assert rc == 1 and err == [f"error: --images {missing}: folder not found"]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r").exists()


def test_a_missing_bundle_folder_is_not_found_and_production_says_why(tmp_path, capsys):
    make_jpeg(tmp_path / "batch" / "a.jpg")
    common = ["--images", str(tmp_path / "batch"), "--report", str(tmp_path / "r"), "--metrics",
              str(tmp_path / "m.json"), "--no-workspace"]  # fmt: skip
    missing = tmp_path / "typo"
    assert drift.main(["--bundle", str(missing), *common]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --bundle {missing}: not found (give a model bundle folder, e.g. models/ensemble)"
    ]
    # after the demo there is a candidate but no promoted model: the hint names what exists
    production = tmp_path / "models" / "production"
    assert drift.main(["--bundle", str(production), *common]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --bundle {production}: not found; no promoted model yet: use "
        f"{tmp_path / 'models' / 'ensemble'} "
        "(the last model `dvc repro` built) or run the retrain flow, which promotes one"
    ]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r").exists()


def test_bundle_without_reference_is_a_clear_error(tmp_path):
    make_jpeg(tmp_path / "batch" / "a.jpg")
    (tmp_path / "no-bundle").mkdir()
    with pytest.raises(StageError, match="bundle.json: not found"):
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
    assert js_distance(a, a, ["mel", "nv"]) == 0.0
    assert js_distance(a, pd.Series(["mel"] * 100), ["mel", "nv"]) > 0.5
    r = pd.Series(np.random.default_rng(0).normal(0, 2, 5000))
    assert normed_wasserstein(r, r + 2.0) == pytest.approx(1.0, abs=0.02)  # one reference std
    assert normed_wasserstein(pd.Series([200.0] * 50), pd.Series([600.0] * 5)) > 1000


# --------------------------------------------------------------------------- a real bundle, odd batches

N_REF = 40
META_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"


def _ref_row(i: int) -> dict:
    return {
        "lesion_id": f"HAM_{i:07d}", "image_id": f"ISIC_{i:07d}", "dx": CLASSES[i % len(CLASSES)],
        "age": str(20 + (7 * i) % 60), "sex": ("male", "female")[i % 2],
        "localization": ("back", "face", "trunk")[i % 3],
    }  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle as calibrate writes it, with its drift reference: one tiny real member (16 px)
    and the features and embeddings of 40 training images (64x48 JPEGs with HAM metadata)."""
    root = tmp_path_factory.mktemp("drift-bundle")
    rows = [_ref_row(i) for i in range(N_REF)]
    write_raw(root / "raw", rows)
    (root / "split.csv").write_text(
        "image_id,split\n" + "".join(f"{r['image_id']},train\n" for r in rows), encoding="utf-8"
    )
    out = write_bundle(root / "bundle", fusion=False, size=16, points={IMAGE_ONLY: POINTS[IMAGE_ONLY]})
    entry = write_drift_reference(
        out, raw_dir=root / "raw", split_csv=root / "split.csv", split="train", max_images=1000,
        stats_size=64, max_pixels=40_000_000, draft_gap=2.0, seed=0, workers=1,
    )  # fmt: skip
    meta = json.loads((out / "bundle.json").read_text(encoding="utf-8"))
    meta[REFERENCE_KEY] = entry
    (out / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return out


def _images(folder: Path, n: int, *, first: int = 100, same: bool = False) -> Path:
    """``n`` real 64x48 JPEGs named ISIC_<first + k>.jpg (one picture ``n`` times with ``same``)."""
    for k in range(n):
        make_jpeg(folder / f"ISIC_{first + k:07d}.jpg", size=(64, 48), seed=7 if same else first + k)
    return folder


def _check(bundle: Path, folder: Path, tmp_path: Path, **drift_params) -> dict:
    res = drift.run(
        parse_params({"drift": {"workers": 1, **drift_params}}).drift,
        bundle_dir=bundle,
        images_dir=folder,
        report_dir=tmp_path / "report",
        metrics_path=tmp_path / "drift.json",
        workspace=None,
    )
    on_disk = json.loads((tmp_path / "drift.json").read_text(encoding="utf-8"))
    assert on_disk == res.metrics
    json.dumps(on_disk, allow_nan=False)  # no NaN anywhere
    return res.metrics


def _cli(bundle: Path, folder: Path, tmp_path: Path, capsys) -> tuple[int, dict | None, str]:
    params = tmp_path / "params.yaml"
    params.write_text("drift:\n  workers: 1\n", encoding="utf-8")
    rc = drift.main([
        "--params", str(params), "--bundle", str(bundle), "--images", str(folder),
        "--report", str(tmp_path / "report"), "--metrics", str(tmp_path / "drift.json"), "--no-workspace",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    path = tmp_path / "drift.json"
    return rc, json.loads(path.read_text(encoding="utf-8")) if path.exists() else None, err


@pytest.mark.parametrize(
    ("n", "same", "reason"),
    [
        (1, False, "too few images for a drift test: 1 < 12"),
        (2, False, "too few images for a drift test: 2 < 12"),
        (5, True, "too few images for a drift test: 5 < 12"),
        (11, False, "too few images for a drift test: 11 < 12"),
        (30, True, "too few distinct images for a drift test: 1 < 12 (30 images, the others copies of them)"),
    ],
)
def test_a_batch_too_small_or_too_uniform_gets_a_verdict_that_says_so(
    bundle, tmp_path, capsys, n, same, reason
):
    folder = _images(tmp_path / "batch", n, same=same)
    rc, m, err = _cli(bundle, folder, tmp_path, capsys)
    assert rc == 0  # a verdict, not a failure: the contract of `python -m stages.drift --help`
    assert m["verdict"] == "too few images" and m["verdict_reason"] == reason
    assert m["drift_detected"] is None and m["dataset_drift"] is None and m["embedding_drift"] is None
    assert (m["n_images"], m["min_images"], m["feature_scores"]) == (n, MIN_IMAGES, {})
    assert f"drift: {reason}; no test run" in err
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "TOO FEW IMAGES" in page and html.escape(reason) in page and "no drift test was run" in page
    assert "Every image file was readable." in page


def test_the_minimum_batch_is_tested(bundle, tmp_path):
    m = _check(bundle, _images(tmp_path / "batch", MIN_IMAGES), tmp_path)
    assert m["verdict"] in ("drift detected", "no drift detected") and isinstance(m["drift_detected"], bool)
    assert m["n_distinct_images"] == MIN_IMAGES and m["embedding_drift_score"] is not None
    # every image is 64x48 in the reference and the batch: one value, tested (wasserstein gives 0)
    assert m["feature_scores"]["width"] == 0.0 and "width" not in m["drifted_features"]
    assert m["skipped_features"] == {} and m["notes"] == []


@pytest.mark.parametrize("method", ["t_test", "anderson"])
def test_a_feature_with_one_value_everywhere_is_skipped_with_a_note_not_nan(bundle, tmp_path, method):
    m = _check(bundle, _images(tmp_path / "batch", 14), tmp_path, num_method=method)
    why = (
        "one value (64) in the reference and the batch: identical, counted as not drifted "
        f"({method} is undefined on one value)"
    )
    assert m["skipped_features"]["width"] == why
    assert {"width", "height", "aspect", "jpeg_quality"} <= set(m["skipped_features"])
    assert "width" not in m["feature_scores"] and "width" not in m["drifted_features"]
    # counted as not drifted: the share's denominator is every feature but the untestable ones
    assert m["drift_share"] == pytest.approx(m["n_drifted_features"] / m["n_features"], abs=1e-6)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "feature(s) not tested" in page and html.escape(why) in page


def test_when_evidentlys_embedding_plot_fails_the_score_is_computed_without_it(bundle, tmp_path, monkeypatch):
    from evidently.legacy.metrics.data_drift import embeddings_drift

    def singular(*_a, **_k):
        raise np.linalg.LinAlgError("The data appears to lie in a lower-dimensional subspace")

    monkeypatch.setattr(embeddings_drift, "get_gaussian_kde", singular)
    m = _check(bundle, _images(tmp_path / "batch", 14), tmp_path)
    assert m["notes"] == [
        "Evidently's EmbeddingsDrift failed on this batch (LinAlgError: The data appears to lie in a "
        "lower-dimensional subspace): the score is the model method's, computed without its plot"
    ]
    assert 0.0 <= m["embedding_drift_score"] <= 1.0 and isinstance(m["embedding_drift"], bool)

    def no_method(_params):
        def fails(_cur, _ref):
            raise ValueError("The number of classes has to be greater than one; got 1 class")

        return fails

    monkeypatch.setattr(drift_check, "drift_method", no_method)
    m = _check(bundle, _images(tmp_path / "batch", 14), tmp_path)
    assert m["embedding_drift"] is None and m["embedding_drift_score"] is None
    assert m["notes"][0].endswith(
        "and its model method alone fails too (ValueError: The number of classes has to be greater than "
        "one; got 1 class): no embedding test"
    )
    assert "embedding drift: <b>not tested</b>" in (tmp_path / "report" / "index.html").read_text()


# --------------------------------------------------------------------------- batch metadata

BAD_METADATA = "\n".join([
    META_HEADER,
    "HAM_0000100,ISIC_0000100,nv,histo,45,male,back",  # 2: good
    "HAM_0000101,ISIC_0000101,xyz,histo,45,male,back",  # 3: unknown diagnosis
    "HAM_0000102,ISIC_0000102,nv,histo,1e9,male,back",  # 4: age out of range
    "HAM_0000103,ISIC_0000103,nv,histo,45,robot,back",  # 5: sex not in the set
    "HAM_0000104,ISIC_0000104,mel,histo,45,male,back",  # 6: image_id twice ...
    "HAM_0000104,ISIC_0000104,nv,histo,45,male,back",  # 7: ... with another diagnosis
    "HAM_0000105,ISIC_0000105,nv,histo,45,male",  # 8: a field short
    "",  # 9: a blank line
    *(f"HAM_{i:07d},ISIC_{i:07d},{CLASSES[i % 7]},histo,{20 + (7 * i) % 60},{('male', 'female')[i % 2]},"
      f"{('back', 'face', 'trunk')[i % 3]}" for i in range(106, 121)),  # 10-24: good
    "HAM_0000106,ISIC_0000106,bcc,histo,42,male,face",  # 25: an identical repeat of row 10
    "HAM_0000121,ISIC_0000121,nv,confocal_scan,45,male,back",  # 26: dx_type not in the set
    ",,nv,histo,45,male,back",  # 27: no image_id
]) + "\n"  # fmt: skip


def _named(m: dict) -> list[tuple]:
    return [(b["row"], b["column"], b["value"]) for b in m["metadata_bad_rows"]]


def test_bad_metadata_rows_are_named_and_left_out_the_rest_is_used(bundle, tmp_path):
    folder = _images(tmp_path / "batch", 22, first=100)
    (folder / "metadata.csv").write_text(BAD_METADATA, encoding="utf-8")
    m = _check(bundle, folder, tmp_path)
    assert _named(m) == [
        (3, "dx", "xyz"), (4, "age", "1e9"), (5, "sex", "robot"), (6, "dx", "mel"), (7, "dx", "nv"),
        (8, None, None), (25, "image_id", "ISIC_0000106"), (26, "dx_type", "confocal_scan"),
        (27, "image_id", ""),
    ]  # fmt: skip
    why = {b["row"]: b["why"] for b in m["metadata_bad_rows"]}
    assert why[3] == f"dx 'xyz' is not one of {list(CLASSES)}"
    assert why[4] == "age '1e9' is outside 0..120 years"
    assert why[5] == f"sex 'robot' is not one of {list(SEXES)}"
    assert why[6] == why[7] == "image_id ISIC_0000104 is on rows 6, 7 with different dx: none of them is used"
    assert why[8] == "6 field(s), the header has 7"
    assert why[25] == "image_id ISIC_0000106 repeats row 10 (counted once)"
    assert m["n_metadata_bad_rows"] == 9 and m["metadata_csv"] == str(folder / "metadata.csv")
    # the good rows are used: row 2 and rows 10-24 name 16 of the batch's 22 images
    assert m["labelled"] and m["n_labelled"] == 16
    assert {"age", "sex", "localization"} <= set(m["feature_scores"])
    assert m["feature_scores"]["age"] < 5  # an age of 1e9 would make it ~10^7
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "9 metadata row problem(s): those rows are left out of the metadata comparison" in page
    assert html.escape("metadata.csv row 5, sex 'robot': sex 'robot' is not one of") in page


def test_metadata_of_a_too_small_batch_is_still_checked(bundle, tmp_path):
    folder = _images(tmp_path / "batch", 3, first=100)
    (folder / "metadata.csv").write_text(BAD_METADATA, encoding="utf-8")
    m = _check(bundle, folder, tmp_path)
    assert m["verdict"] == "too few images" and m["n_labelled"] == 1 and m["n_metadata_bad_rows"] == 9
    assert "9 metadata row problem(s)" in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")


def test_check_metadata_keeps_good_rows_normalised(tmp_path):
    p = tmp_path / "meta.csv"
    p.write_text(
        META_HEADER + "\nL1,ISIC_1,mel,histo,,Female,Lower Extremity\nL2,ISIC_2,,,80.0,,\n", encoding="utf-8"
    )
    rows, bad = check_metadata(read_rows(p), "meta.csv")
    assert bad == []
    assert rows.loc["ISIC_1", ["dx", "sex", "localization"]].tolist() == ["mel", "female", "lower extremity"]
    assert np.isnan(rows.loc["ISIC_1", "age"]) and rows.loc["ISIC_2", "age"] == 80.0
    assert rows.loc["ISIC_2", ["dx", "sex", "localization"]].tolist() == ["", "unknown", "unknown"]


def test_an_unreadable_metadata_table_is_named_not_a_crash(tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    text = (META_HEADER + "\nL1,ISIC_1,mel,histo,50,male,back\n").encode()
    (folder / "metadata.csv").write_bytes(text + b"\xff\n")
    meta = batch_metadata(folder)
    assert meta.path is None and meta.rows.empty
    assert meta.notes == [
        f"metadata.csv: not UTF-8 text (byte 0xff on line 3, offset {len(text)}) "
        "(not used as the batch's metadata)"
    ]


# --------------------------------------------------------------------------- links in the batch folder


def _links(folder: Path) -> Path:
    """Every kind of link a batch folder can hold that is not an image to read."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "ping.jpg").symlink_to("pong.jpg")
    (folder / "pong.jpg").symlink_to("ping.jpg")
    (folder / "gone.jpg").symlink_to("nowhere.jpg")
    (folder / "sub" / "up").symlink_to("..")
    (folder / "notes.txt").symlink_to("notes.txt")  # a loop is named whatever its name
    return folder


LINK_ROWS = [
    ("gone.jpg", "symbolic link to a missing file (nowhere.jpg)"),
    ("loop.jpg", "symbolic link loop (too many levels of symbolic links): no file to read"),
    ("notes.txt", "symbolic link loop (too many levels of symbolic links): no file to read"),
    ("ping.jpg", "symbolic link loop (too many levels of symbolic links): no file to read"),
    ("pong.jpg", "symbolic link loop (too many levels of symbolic links): no file to read"),
    ("sub/up", "symbolic link to a folder: not searched (it leads back into the batch)"),
]


def test_list_batch_names_links_that_loop_or_lead_nowhere(tmp_path):
    folder = _links(tmp_path / "batch")
    make_jpeg(folder / "a.jpg")
    make_jpeg(folder / "sub" / "b.jpg")
    (folder / "elsewhere").symlink_to(tmp_path / "batch" / "sub")
    make_jpeg(tmp_path / "other" / "c.jpg")
    (folder / "linked").symlink_to(tmp_path / "other")
    (folder / "hidden.jpg").symlink_to("hidden.jpg")  # not hidden: named
    (folder / ".tmp.jpg").symlink_to(".tmp.jpg")  # hidden: skipped, as list_images skips it
    os.mkfifo(folder / "pipe.jpg")  # named like an image, not a file
    files, problems = list_batch(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["a.jpg", "sub/b.jpg"]
    assert problems == sorted([
        *LINK_ROWS,
        ("elsewhere", "symbolic link to a folder: not searched (it leads back into the batch)"),
        ("hidden.jpg", "symbolic link loop (too many levels of symbolic links): no file to read"),
        ("linked", "symbolic link to a folder: not searched (link or copy the files themselves)"),
        ("pipe.jpg", "not a regular file"),
    ])  # fmt: skip


def test_a_symlink_loop_in_the_batch_gets_its_error_row(bundle, tmp_path):
    folder = _links(_images(tmp_path / "batch", 12))
    m = _check(bundle, folder, tmp_path)
    assert m["n_images"] == 12 and m["n_unreadable"] == len(LINK_ROWS)
    assert m["unreadable_reasons"] == dict(LINK_ROWS)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert f"{len(LINK_ROWS)} unreadable file(s), left out of the statistics" in page
    assert "<code>loop.jpg</code>: symbolic link loop (too many levels of symbolic links)" in page


def test_a_batch_of_only_links_is_a_one_line_error(bundle, tmp_path, capsys):
    folder = _links(tmp_path / "batch")
    rc, m, err = _cli(bundle, folder, tmp_path, capsys)
    assert rc == 1 and m is None
    first = "; ".join(f"{name}: {why}" for name, why in LINK_ROWS[:5])  # the first five, by name
    assert err.strip().splitlines() == [
        f"error: --images {folder}: no readable image file ({first})"  # the option the user typed
    ]
