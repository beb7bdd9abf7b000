"""Drift checks on real HAM10000 images against a small real-data bundle (skips without the data).

The bundle is built once per module by the stages' own commands from ~2,400 real images
(tests/integration/real_bundle.py); every other lesion is held out: never trained on, never in
the reference. Held-out samples must not alarm; the same images darkened, colour-shifted,
blurred or recompressed must, naming the features that moved; 600x450 originals against a
200x150 reference must name the size features; bad files are listed and left out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from skinlesion.core.errors import StageError
from skinlesion.measure.imagefeatures import jpeg_quality
from skinlesion.params.load import parse_params
from stages import drift
from tests.builders.images import huge_header_jpeg, truncated_jpeg
from tests.integration.real_bundle import build

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

N_BATCH = 300


@pytest.fixture(scope="module")
def real(shared_ham, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-bundle")
    bundle, held = build(shared_ham, root)
    rng = np.random.default_rng(2026)
    held_ids = rng.permutation(held["image_id"].to_numpy())
    return {"bundle": bundle, "held": held_ids, "images": shared_ham / "images_200x150", "root": root}


def _batch(
    real, name: str, ids, transform: Callable[[Image.Image], tuple[Image.Image, int | None]] | None = None
):
    """A folder of real images: links to the originals, or transformed copies saved as JPEG
    at the original's own quality unless the transform says otherwise."""
    folder = real["root"] / "batches" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in ids:
        src = real["images"] / f"{i}.jpg"
        if transform is None:
            (folder / f"{i}.jpg").symlink_to(src)
            continue
        with Image.open(src) as img:
            q = round(jpeg_quality(img))
            out, quality = transform(img.convert("RGB"))
        out.save(folder / f"{i}.jpg", "JPEG", quality=quality or q)
    return folder


def _check(real, folder: Path, name: str, **drift_params) -> dict:
    params = parse_params({"drift": drift_params}).drift
    res = drift.run(
        params,
        bundle_dir=real["bundle"],
        images_dir=folder,
        report_dir=real["root"] / "reports" / name,
        metrics_path=real["root"] / "metrics" / f"{name}.json",
        workspace=None,
        seed=0,
    )
    on_disk = json.loads((real["root"] / "metrics" / f"{name}.json").read_text())
    assert on_disk == res.metrics
    return res.metrics


def test_held_out_samples_raise_no_false_alarm(real):
    verdicts = []
    for k in range(5):
        ids = real["held"][k * N_BATCH : (k + 1) * N_BATCH]
        m = _check(real, _batch(real, f"clean{k}", ids), f"clean{k}")
        assert m["n_images"] == N_BATCH and m["n_unreadable"] == 0
        verdicts.append((m["drift_detected"], m["dataset_drift"], m["drift_share"], m["max_feature_shift"],
                         m["embedding_drift_score"]))  # fmt: skip
    print("clean samples (drift, dataset_drift, share, max shift, embedding score):", verdicts)
    assert [v[0] for v in verdicts] == [False] * 5, verdicts
    assert [v[1] for v in verdicts] == [False] * 5, verdicts


def _cast(img: Image.Image) -> tuple[Image.Image, None]:
    a = np.asarray(img, dtype=np.float32) * np.array([1.15, 0.95, 0.8], dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), None


@pytest.mark.parametrize(
    ("name", "transform", "expected"),
    [
        ("darkened", lambda im: (ImageEnhance.Brightness(im).enhance(0.6), None), {"brightness", "lab_l"}),
        ("colour_shifted", _cast, {"lab_b", "blue_mean"}),
        ("blurred", lambda im: (im.filter(ImageFilter.GaussianBlur(2)), None), {"sharpness"}),
        ("jpeg_q10", lambda im: (im, 10), {"jpeg_quality", "file_kb"}),
    ],
)
def test_degraded_images_drift_naming_the_features(real, name, transform, expected):
    ids = real["held"][:N_BATCH]
    m = _check(real, _batch(real, name, ids, transform), name)
    assert m["drift_detected"], m
    assert expected <= set(m["drifted_features"]), (expected, m["drifted_features"])
    assert expected & set(m["alarm_features"]) or m["dataset_drift"], m
    html = (real["root"] / "reports" / name / "index.html").read_text()
    assert "DRIFT DETECTED" in html and all(f in html for f in expected)


def test_originals_against_thumbnails_name_the_size_features(real, shared_ham):
    m = _check(real, shared_ham / "originals_600x450", "originals")
    assert m["n_images"] == len(list((shared_ham / "originals_600x450").glob("*.jpg")))
    assert m["drift_detected"] and {"width", "height", "file_kb"} <= set(m["alarm_features"])
    assert {"width", "height"} <= set(m["drifted_features"])


def test_bad_files_are_named_and_left_out(real, tmp_path):
    ids = list(real["held"][2000:2050])
    folder = _batch(real, "with_bad", ids)
    truncated_jpeg(folder / "ISIC_9999998.jpg")
    (folder / "ISIC_9999999.jpg").write_text("not a JPEG at all\n")
    m = _check(real, folder, "with_bad")
    assert m["n_images"] == 50 and m["n_unreadable"] == 2
    assert m["unreadable"] == ["ISIC_9999998.jpg", "ISIC_9999999.jpg"]
    assert "truncated" in m["unreadable_reasons"]["ISIC_9999998.jpg"]
    assert "cannot identify image file" in m["unreadable_reasons"]["ISIC_9999999.jpg"]
    html = (real["root"] / "reports" / "with_bad" / "index.html").read_text()
    assert "2 unreadable file(s), left out of the statistics" in html
    assert "ISIC_9999998.jpg" in html and "ISIC_9999999.jpg" in html
    # the statistics are the 50 good images': identical to a batch of only those 50
    clean = _check(real, _batch(real, "only_good", ids), "only_good")
    assert clean["feature_scores"] == m["feature_scores"]
    assert clean["predicted_class_share"] == m["predicted_class_share"]


def test_a_bomb_and_an_all_bad_folder(real):
    folder = real["root"] / "batches" / "hostile"
    folder.mkdir(parents=True)
    huge_header_jpeg(folder / "bomb.jpg")
    (folder / "fake.jpg").write_text("hello")
    with pytest.raises(
        StageError, match=r"none of the 2 image file\(s\) is readable .*bomb.jpg: 20000x20000"
    ):
        _check(real, folder, "hostile")
    # with good images beside it, the bomb is listed and the check goes on
    for i in real["held"][3000:3040]:
        (folder / f"{i}.jpg").symlink_to(real["images"] / f"{i}.jpg")
    m = _check(real, folder, "hostile2")
    assert m["n_images"] == 40 and m["unreadable"] == ["bomb.jpg", "fake.jpg"]


def test_labelled_batch_compares_metadata_too(real, shared_ham):
    ids = real["held"][:N_BATCH]
    folder = _batch(real, "labelled", ids)
    meta = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    meta[meta["image_id"].isin(ids)].to_csv(folder / "metadata.csv", index=False)
    m = _check(real, folder, "labelled")
    assert m["labelled"] and m["n_labelled"] == N_BATCH
    assert {"age", "sex", "localization"} <= set(m["feature_scores"])
    assert not m["drift_detected"], m
