# Long: every test shares one module-scoped bundle, predictor and client (built once: TensorFlow).
"""The web app through FastAPI's TestClient: results, every refusal with its message, limits, pages,
and the optional age / sex / site per image; and on a real uvicorn on 127.0.0.1 where streaming
matters (a part over the limit answered before the body is all sent, a stalled upload, the pixel
budget under concurrent uploads). Also: the one pixel cap, uploads never written to disk, security
headers on every response, and a bundle with bad values refused at startup.

One small bundle (an untrained custom CNN, as in test_serve.py: tests/unit/serve/conftest.py) and
one predictor serve most tests of the module; the metadata tests add a two-mode bundle whose member
fuses metadata. The refusal tests assert the HTTP status and the sentence the user reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.limits import Budget, Busy, WebSettings
from serve.predictor import Predictor
from serve.upload import name_problem
from serve.web import create_app, load_predictor, main
from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import parse_metadata
from skinlesion.model.bundle_json import pixel_cap
from tests.builders.bundles import DEMO_DATA, SIZE, with_training_data
from tests.builders.images import make_bomb, make_truncated

REPO = Path(__file__).resolve().parents[3]
TestClient = pytest.importorskip("fastapi.testclient").TestClient


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory) -> Path:
    """A metrics/ folder as the pipeline lays it out, for the one member ``custom_cnn``."""
    root = tmp_path_factory.mktemp("metrics")
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(png, "PNG")
    for rel in ("eval/custom_cnn/confusion_normalized.png", "calibration/reliability.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png.getvalue())
    roc = root / "eval" / "custom_cnn" / "roc"
    roc.mkdir()
    for c in ("mel", "malignant"):
        (roc / f"{c}.csv").write_text("fpr,tpr\n0.0,0.0\n0.2,0.7\n1.0,1.0\n")
    hist = root / "train" / "custom_cnn" / "plots" / "metrics"
    for split in ("train", "val"):
        (hist / split).mkdir(parents=True)
        (hist / split / "loss.tsv").write_text("step\tloss\n1\t1.9\n2\t1.4\n3\t1.2\n")
    return root


def _settings(bundle_dir, metrics_dir=None, **kw) -> WebSettings:
    return WebSettings(bundle=bundle_dir, metrics=metrics_dir, **kw)


@pytest.fixture(scope="module")
def client(bundle_dir, predictor, metrics_dir):
    with TestClient(create_app(_settings(bundle_dir, metrics_dir), predictor)) as c:
        yield c


def _jpeg(seed: int = 0, size=(200, 150)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _error_box(html: str) -> str:
    m = re.search(r'<div class="error" id="error" role="alert">(.*?)</div>', html, re.S)
    assert m, "no error box in the page"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", m.group(1))).strip()


def _results(html: str) -> list[str]:
    return re.findall(r'<section class="result".*?</section>', html, re.S)


# --------------------------------------------------------------------------- results


def test_index_shows_the_form_the_limits_and_the_disclaimer(client):
    r = client.get("/")
    assert r.status_code == 200
    assert 'type="file" name="files" multiple' in r.text
    assert "Up to 16 images per upload, 10 MB each; BMP, JPEG, PNG, TIFF, WEBP." in r.text
    assert "not a medical device" in r.text
    assert "2026-11-30T12:00:00Z, prepared data 01234567" in r.text
    # first in the page: what the bundle was trained on (this one is older than the record)
    first = r.text.split("<body>", 1)[1].lstrip()
    assert first.startswith(
        '<p class="trained" id="trained-on" data-synthetic="unknown">This model\'s training data: unknown'
    )


def test_one_upload_gives_risk_top3_flag_overlay_and_disclaimer(client):
    r = client.post("/predict", files=[("files", ("lesion_1.jpg", _jpeg(1), "image/jpeg"))])
    assert r.status_code == 200
    (section,) = _results(r.text)
    assert 'data-image="lesion_1.jpg"' in section
    assert re.search(r'Risk level: <span class="badge risk-(High|Moderate|Low)" title="the level of', section)
    assert len(re.findall(r'<div class="bar"', section)) == 3
    assert re.search(r"Malignant probability 0\.\d{3}:", section)
    assert ("refer (at or above 0.300)" in section) != ("below the referral threshold 0.300" in section)
    img = re.search(r'<img class="gradcam"[^>]*src="data:image/png;base64,([^"]+)"', section)
    with Image.open(io.BytesIO(__import__("base64").b64decode(img.group(1)))) as overlay:
        assert overlay.size == (512, 256)
    assert '<p class="disclaimer">Research software, not a medical device' in section


def test_several_uploads_give_one_result_each_with_its_own_disclaimer(client):
    files = [("files", (f"l{i}.jpg", _jpeg(i), "image/jpeg")) for i in range(3)]
    r = client.post("/predict", files=files)
    assert r.status_code == 200
    sections = _results(r.text)
    assert [re.search(r'data-image="([^"]+)"', s).group(1) for s in sections] == [
        "l0.jpg",
        "l1.jpg",
        "l2.jpg",
    ]
    assert all('class="disclaimer"' in s for s in sections)


def test_the_page_and_the_cli_path_give_the_same_numbers(client, predictor):
    from serve.decode import decode

    data = _jpeg(5)
    r = client.post("/api/predict", files=[("files", ("x.jpg", data, "image/jpeg"))])
    assert r.status_code == 200
    row = r.json()["results"][0]
    probs, modes = predictor.probabilities(decode(data, predictor.decode_spec()).pixels[None])
    probs = probs[0]
    assert list(modes) == ["image_only"] and (row["mode"], row["threshold"]) == ("image_only", 0.3)
    assert [row[f"prob_{c}"] for c in CLASSES] == pytest.approx(probs.tolist(), abs=0, rel=0)
    assert abs(sum(row[f"prob_{c}"] for c in CLASSES) - 1.0) < 1e-6
    assert [t["class"] for t in row["top"]] == [row["top1"], row["top2"], row["top3"]]
    assert "gradcam_png_base64" not in row  # only with ?explain=true
    r2 = client.post("/api/predict?explain=true", files=[("files", ("x.jpg", data, "image/jpeg"))])
    assert r2.json()["results"][0]["gradcam_png_base64"]
    assert r2.json()["results"][0]["prob_nv"] == row["prob_nv"]  # the same upload, the same numbers


# --------------------------------------------------------------------------- refusals


def test_a_text_file_is_refused_as_not_an_image(client):
    r = client.post("/predict", files=[("files", ("notes.jpg", b"my notes, not a photo\n", "image/jpeg"))])
    assert r.status_code == 415
    assert _error_box(r.text) == (
        "1 of 1 file(s) refused; nothing was analysed notes.jpg : not an image file "
        "(BMP, JPEG, PNG, TIFF, WEBP expected)"
    )
    assert not _results(r.text)


@pytest.mark.parametrize("name", ["../../etc/passwd.jpg", "sub/lesion.jpg", "sub\\lesion.jpg", ".hidden.jpg"])
def test_path_like_names_are_refused_not_cleaned(client, name):
    # (A full Windows path, C:\\...\\x.jpg, never reaches the app: python-multipart keeps only its
    # last part, a workaround for old Internet Explorers.)
    r = client.post("/predict", files=[("files", (name, _jpeg(), "image/jpeg"))])
    assert r.status_code == 400
    assert _error_box(r.text).endswith(
        ": the file name looks like a path; upload the file itself under a plain name (e.g. lesion.jpg)"
    )


def test_file_names_are_escaped_in_the_page(client):
    name = "<img src=x onerror=alert(1)>.jpg"
    r = client.post("/predict", files=[("files", (name, _jpeg(4), "image/jpeg"))])
    assert r.status_code == 200
    assert "<img src=x" not in r.text
    assert 'data-image="&lt;img src=x onerror=alert(1)&gt;.jpg"' in r.text


def test_name_rules():
    assert name_problem("ISIC_0024306.jpg") is None
    assert name_problem("lesion (2).JPG") is None
    assert name_problem("") == "the file has no name"
    assert name_problem("a\x00b.jpg") == "the file name contains control characters"
    assert name_problem("x" * 300) == "the file name is longer than 255 characters"


def test_one_bad_file_refuses_the_upload_and_names_only_it(client):
    files = [
        ("files", ("good.jpg", _jpeg(1), "image/jpeg")),
        ("files", ("cut.jpg", _jpeg(2)[:3000], "image/jpeg")),
    ]
    r = client.post("/predict", files=files)
    assert r.status_code == 422
    box = _error_box(r.text)
    assert box.startswith(
        "1 of 2 file(s) refused; nothing was analysed cut.jpg : truncated or damaged image file"
    )
    assert "good.jpg" not in box and not _results(r.text)


def test_truncated_real_jpeg_and_bomb(client, tmp_path):
    cut = make_truncated(tmp_path / "cut.jpg")
    r = client.post("/predict", files=[("files", ("cut.jpg", cut.read_bytes(), "image/jpeg"))])
    assert r.status_code == 422 and "truncated or damaged image file" in _error_box(r.text)
    bomb = make_bomb(tmp_path / "bomb.png")
    r = client.post("/predict", files=[("files", ("bomb.png", bomb.read_bytes(), "image/png"))])
    assert r.status_code == 413
    assert _error_box(r.text).endswith(
        "bomb.png : 30000x30000 pixels is over the limit of 100,000,000 (decompression-bomb guard)"
    )


def test_a_format_outside_the_allow_list_is_refused(client):
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 30, 30)).save(buf, "GIF")
    r = client.post("/predict", files=[("files", ("lesion.gif", buf.getvalue(), "image/gif"))])
    assert r.status_code == 415
    assert _error_box(r.text).endswith(
        "lesion.gif : GIF files are not accepted; use BMP, JPEG, PNG, TIFF, WEBP"
    )


def test_no_file_chosen(client):
    r = client.post("/predict", files=[("files", ("", b"", "application/octet-stream"))])
    assert r.status_code == 400 and _error_box(r.text) == "choose one or more image files first"


def test_size_limits_per_file_per_upload_and_file_count(bundle_dir, predictor):
    settings = _settings(bundle_dir, max_files=2, max_file_mb=0.05)  # 51 KB per file, 2 files
    big = _jpeg(3, size=(600, 450))
    assert settings.max_file_bytes < len(big) < settings.max_request_bytes - 4096
    with TestClient(create_app(settings, predictor)) as c:
        r = c.post("/predict", files=[("files", ("big.jpg", big, "image/jpeg"))])
        assert r.status_code == 413
        assert _error_box(r.text) == (
            "the upload was stopped at a file over the size limit; nothing was analysed "
            "big.jpg : larger than the limit of 0.05 MB"
        )
        three = [("files", (f"{i}.jpg", _jpeg(i, size=(64, 48)), "image/jpeg")) for i in range(3)]
        r = c.post("/predict", files=three)
        assert r.status_code == 400
        assert _error_box(r.text) == ("the upload was refused: more than 2 files (at most 2)")
        r = c.post("/predict", files=[("files", (f"{i}.jpg", big, "image/jpeg")) for i in range(3)])
        assert r.status_code == 413
        assert _error_box(r.text) == "the upload is larger than 0.162 MB (2 files of at most 0.05 MB)"
        r = c.post(
            "/api/predict",
            content=iter([b"--x\r\n"]),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 411
        assert r.json()["detail"] == "the upload must state its size (Content-Length)"


def test_api_refusals_are_json_with_each_file_and_reason(client):
    r = client.post("/api/predict", files=[("files", ("a/b.jpg", _jpeg(), "image/jpeg"))])
    assert r.status_code == 400
    assert r.json() == {
        "detail": "1 of 1 file(s) refused; nothing was analysed",
        "refused": [{"file": "a/b.jpg", "reason": "the file name looks like a path; upload the file itself "
                     "under a plain name (e.g. lesion.jpg)"}],
    }  # fmt: skip


# --------------------------------------------------------------------------- pages, loading, binding


def test_model_page_shows_the_card_and_every_plot(client):
    r = client.get("/model")
    assert r.status_code == 200
    assert "<h1>Model card: test bundle</h1>" in r.text and "<table>" in r.text
    keys = re.findall(r'src="/plots/([\w-]+)\.png"', r.text)
    assert keys == ["calibration-reliability", "custom_cnn-confusion", "custom_cnn-roc", "custom_cnn-history"]
    for key in keys:
        img = client.get(f"/plots/{key}.png")
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(img.content)) as im:
            assert im.format == "PNG" and im.width > 30
    assert client.get("/plots/nothing.png").status_code == 404
    assert client.get("/plots/..%2F..%2Fbundle.json.png").status_code == 404


def test_model_page_without_plots_says_where_it_looked(bundle_dir, predictor, tmp_path):
    with TestClient(create_app(_settings(bundle_dir, tmp_path / "none"), predictor)) as c:
        r = c.get("/model")
    assert r.status_code == 200 and "No evaluation plots found under" in r.text


def test_the_bundle_is_loaded_once_per_process_at_startup_not_at_import(bundle_dir, monkeypatch):
    code = "import sys, serve.web, serve.predict; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False False", res.stderr[-2000:]
    loads = []
    real_load = Predictor.load

    def counting_load(path, **kw):
        loads.append(path)
        return real_load(path, **kw)

    monkeypatch.setattr(Predictor, "load", staticmethod(counting_load))
    app = create_app(_settings(bundle_dir))
    assert loads == []
    with TestClient(app) as c:
        for i in range(3):
            assert (
                c.post("/predict", files=[("files", (f"{i}.jpg", _jpeg(i), "image/jpeg"))]).status_code == 200
            )
        assert c.get("/healthz").json()["members"] == ["custom_cnn"]
    assert loads == [bundle_dir]


def test_main_binds_to_localhost_by_default(bundle_dir, predictor, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setattr(Predictor, "load", staticmethod(lambda path, **kw: predictor))
    assert main(["--bundle", str(bundle_dir)]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8080)  # evidently ui keeps 8000
    assert main(["--bundle", str(bundle_dir), "--host", "0.0.0.0", "--port", "9001"]) == 0
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 9001)


def test_help_names_the_default_port_and_why(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "port (default 8080; the Evidently UI keeps its default, 8000)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_main_without_a_bundle_is_one_error_line(tmp_path, capsys):
    assert main(["--bundle", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: ")


@pytest.mark.realdata
def test_real_image_upload(shared_ham, client):
    path = sorted((shared_ham / "originals_600x450").glob("*.jpg"))[0]
    r = client.post("/predict", files=[("files", (path.name, path.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200 and len(_results(r.text)) == 1


# --------------------------------------------------------------------------- metadata per image

META_THRESHOLD, IMAGE_ONLY_THRESHOLD = 0.25, 0.35
UNKNOWN_SEX_MSG = "['male', 'female', 'unknown']"


def make_fusion_bundle(root: Path) -> Path:
    """A format-2 bundle with one untrained custom CNN that fuses metadata, and two operating points."""
    import keras

    from skinlesion.model.bundle_json import file_md5
    from skinlesion.model.networks import ModelSpec, build_backbone, build_model, output_bias_from_counts

    keras.utils.set_random_seed(1)
    bb, _ = build_backbone("custom_cnn", SIZE, "none")
    spec = ModelSpec(
        backbone="custom_cnn",
        image_size=SIZE,
        fusion=True,
        fusion_units=8,
        output_bias=output_bias_from_counts([30, 50, 110, 12, 111, 670, 14]),
    )
    model = build_model(spec, bb, pretrained=False)
    # The gate starts at 0 (the fused model = the image-only one); open it so metadata moves the numbers.
    model.get_layer("meta_gate").scale.assign(3.0)
    member = root / "members" / "fused" / "model.keras"
    member.parent.mkdir(parents=True)
    model.save(member)

    def point(temperature: float, threshold: float) -> dict:
        return {"temperature": temperature, "threshold": threshold, "class_bias": None, "class_prior": None,
                "decision": "argmax"}  # fmt: skip

    meta = {
        "format_version": 2,
        "created": "2026-12-01T08:00:00Z",
        "classes": list(CLASSES),
        "malignant": ["akiec", "bcc", "mel"],
        "image_size": SIZE,
        "aspect": "crop",
        "members": [{"name": "fused", "weight": 1.0, "path": "members/fused/model.keras",
                     "md5": file_md5(member)}],
        "operating_points": {"metadata": point(1.1, META_THRESHOLD),
                             "image_only": point(1.4, IMAGE_ONLY_THRESHOLD)},
        "data_version": {"path": "data/prepared", "md5": "fedcba9876543210fedcba9876543210"},
        "params": {"prepare": {"draft_gap": 2.0}, "evaluate": {"tta": False},
                   "validate": {"max_pixels": 100_000_000}},
        "metrics": {},
    }  # fmt: skip
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def fusion_dir(tmp_path_factory) -> Path:
    return make_fusion_bundle(tmp_path_factory.mktemp("fusion"))


@pytest.fixture(scope="module")
def fusion_client(fusion_dir):
    with TestClient(create_app(_settings(fusion_dir, explain=False), Predictor.load(fusion_dir))) as c:
        yield c


def _upload(names_and_data, **fields):
    """``files=`` and ``data=`` of a multipart post: each field a list, one value per file."""
    files = [("files", (n, d, "image/jpeg")) for n, d in names_and_data]
    return {"files": files, "data": {k: v for k, v in fields.items() if v is not None}}


def _probs_of(row: dict) -> list[float]:
    return [row[f"prob_{c}"] for c in CLASSES]


def test_metadata_mode_only_with_all_three_fields_each_with_its_threshold(fusion_client):
    img = _jpeg(7)
    r = fusion_client.post(
        "/api/predict",
        **_upload(
            [("full.jpg", img), ("none.jpg", img), ("partial.jpg", img)],
            age=["45", "", "60"],
            sex=["female", "unknown", "unknown"],
            localization=["back", "", "back"],
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["thresholds"] == {"metadata": META_THRESHOLD, "image_only": IMAGE_ONLY_THRESHOLD}
    assert body["mode_rule"].startswith("metadata when age, sex and localization are all known")
    full, none, partial = body["results"]
    assert [x["status"] for x in body["results"]] == ["ok", "ok", "ok"]
    assert (full["mode"], full["threshold"]) == ("metadata", META_THRESHOLD)
    assert (none["mode"], none["threshold"]) == ("image_only", IMAGE_ONLY_THRESHOLD)
    assert (partial["mode"], partial["threshold"]) == ("image_only", IMAGE_ONLY_THRESHOLD)
    assert full["metadata"] == {"age": 45.0, "sex": "female", "localization": "back"}
    assert none["metadata"] is None
    assert partial["metadata"] == {"age": 60.0, "sex": "unknown", "localization": "back"}
    assert full["refer"] == (full["malignant_prob"] >= META_THRESHOLD)
    # the metadata reached the model; partial metadata was not used (the image-only input)
    assert _probs_of(full) != pytest.approx(_probs_of(none), abs=1e-4)
    assert _probs_of(partial) == _probs_of(none)
    # the same image without any metadata field at all: image_only, the same numbers
    alone = fusion_client.post("/api/predict", **_upload([("none.jpg", img)])).json()["results"][0]
    assert alone["mode"] == "image_only" and alone["metadata"] is None
    assert _probs_of(alone) == pytest.approx(_probs_of(none), abs=1e-6)


def test_the_page_says_the_mode_and_threshold_of_each_result(fusion_client):
    img = _jpeg(8)
    r = fusion_client.post(
        "/predict",
        **_upload(
            [("a.jpg", img), ("b.jpg", img)], age=["70", "70"], sex=["male", ""], localization=["face", ""]
        ),
    )
    assert r.status_code == 200
    a, b = _results(r.text)
    assert 'data-mode="metadata"' in a and "Analysed on: <strong>image with age, sex and site</strong>" in a
    assert "given: age 70, male, face" in a
    assert ("refer (at or above 0.250)" in a) != ("below the referral threshold 0.250" in a)
    assert 'data-mode="image_only"' in b and "Analysed on: <strong>image only</strong>" in b
    assert "The details given were not used: this model uses metadata only when age, sex and body site" in b
    assert ("refer (at or above 0.350)" in b) != ("below the referral threshold 0.350" in b)
    footer = re.search(r'<p class="muted" id="thresholds">(.*?)</p>', r.text, re.S).group(1)
    assert re.sub(r"\s+", " ", footer).endswith(
        "&ge; 0.250 (image with age, sex and site), 0.350 (image only)"
    )


def test_a_bad_value_fails_only_its_image_naming_the_field_and_value(fusion_client):
    files = [("ok.jpg", _jpeg(1)), ("robot.jpg", _jpeg(2)), ("old.jpg", _jpeg(3))]
    r = fusion_client.post(
        "/api/predict",
        **_upload(files, age=["30", "30", "130"], sex=["male", "robot", "male"], localization=["back"] * 3),
    )
    assert r.status_code == 200
    ok, robot, old = r.json()["results"]
    assert (ok["status"], ok["mode"], ok["error"]) == ("ok", "metadata", "")
    assert (robot["status"], robot["mode"], robot["threshold"], robot["prob_nv"]) == ("error", "", None, None)
    assert robot["error"] == f"sex 'robot' is not one of {UNKNOWN_SEX_MSG}"
    assert old["error"] == "age '130' is outside 0..120 years"
    # the page: an error section for that image, its value escaped; the others analysed
    r = fusion_client.post(
        "/predict", **_upload(files[:2], age=["", ""], sex=["", "<b>x</b>"], localization=["", ""])
    )
    assert r.status_code == 200
    assert len(_results(r.text)) == 1
    pattern = r'<section class="result failed" data-image="robot.jpg" data-status="error">(.*?)</section>'
    failed = re.search(pattern, r.text, re.S).group(1)
    assert "Not analysed:</strong> sex &#39;&lt;b&gt;x&lt;/b&gt;&#39; is not one of" in failed
    assert "<b>x</b>" not in r.text


def test_metadata_given_once_for_several_files_is_refused(fusion_client, bundle_dir, predictor):
    files = [("a.jpg", _jpeg(1)), ("b.jpg", _jpeg(2))]
    r = fusion_client.post("/api/predict", **_upload(files, sex=["female"]))
    assert r.status_code == 400
    assert r.json() == {
        "detail": "2 file(s) but 1 value(s) of 'sex': send each of age, sex, localization once per file, "
        "in the order of the files (empty means unknown), or leave it out",
        "refused": [],
    }
    r = fusion_client.post("/predict", **_upload(files, age=["40", "50", "60"]))
    assert r.status_code == 400 and _error_box(r.text).startswith(
        "2 file(s) but 3 value(s) of &#39;age&#39;:"
    )
    assert not _results(r.text)
    # the form without JavaScript sends one blank set for any number of files: nothing to pair
    r = fusion_client.post(
        "/api/predict", **_upload(files, age=[""], sex=["unknown"], localization=["unknown"])
    )
    assert r.status_code == 200 and [x["mode"] for x in r.json()["results"]] == ["image_only"] * 2
    # three fields per file at most (plus a few), counted before anything is read
    with TestClient(create_app(_settings(bundle_dir, max_files=2), predictor)) as c:
        r = c.post("/api/predict", **_upload(files[:1], age=[""] * 15))
    assert r.status_code == 400
    assert r.json()["detail"] == (
        "the upload was refused: more than 14 form fields (age, sex, localization once per file, "
        "at most 2 files)"
    )


def test_a_bundle_without_fusion_is_image_only_whatever_is_sent(client):
    img = _jpeg(9)
    r = client.post(
        "/api/predict",
        **_upload(
            [("a.jpg", img), ("b.jpg", img)], age=["45", ""], sex=["female", ""], localization=["back", ""]
        ),
    )
    assert r.status_code == 200
    body = r.json()
    with_meta, without = body["results"]
    assert body["thresholds"] == {"image_only": 0.3}
    assert [(x["mode"], x["threshold"]) for x in (with_meta, without)] == [("image_only", 0.3)] * 2
    assert with_meta["metadata"] == {"age": 45.0, "sex": "female", "localization": "back"}
    assert _probs_of(with_meta) == _probs_of(without)
    page = client.get("/").text
    assert re.search(r'<fieldset class="meta-row" disabled>', page)
    assert "<strong>This model does not use metadata</strong>" in page and "<script>" not in page
    r = client.post(
        "/predict", **_upload([("a.jpg", img)], age=["45"], sex=["female"], localization=["back"])
    )
    (section,) = _results(r.text)
    assert "The details given were not used: this model does not use metadata." in section


@pytest.mark.parametrize("given", [("45", "female", "back"), ("", "", ""), ("50", "", "")])
def test_the_api_gives_the_numbers_of_predict_paths(fusion_client, fusion_dir, tmp_path, given):
    data = _jpeg(11)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    age, sex, loc = given
    r = fusion_client.post(
        "/api/predict", **_upload([("x.jpg", data)], age=[age], sex=[sex], localization=[loc])
    )
    row = r.json()["results"][0]
    item = ("x.jpg", str(path), None) + ((parse_metadata(age, sex, loc),) if any(given) else ())
    fresh = Predictor.load(fusion_dir)  # its own cache: the numbers are computed again
    (pred,) = fresh.predict_paths([item], progress=False)
    assert row["mode"] == pred.mode == ("metadata" if all(given) else "image_only")
    assert _probs_of(row) == pytest.approx([pred.probabilities[c] for c in CLASSES], abs=0, rel=0)
    assert (row["malignant_prob"], row["threshold"], row["predicted"]) == (
        pred.malignant_prob, pred.threshold, pred.predicted,
    )  # fmt: skip


def test_the_form_has_one_labelled_set_of_fields_in_the_vocabulary(fusion_client):
    page = fusion_client.get("/").text
    fieldset = re.search(r'<fieldset class="meta-row">(.*?)</fieldset>', page, re.S).group(1)
    for name in ("age", "sex", "localization"):
        assert f'<label for="{name}-0">' in fieldset and f'id="{name}-0"' in fieldset
    assert 'type="number" name="age" min="0" max="120"' in fieldset
    for name, vocab in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        select = re.search(rf'<select id="{name}-0" name="{name}">(.*?)</select>', fieldset, re.S).group(1)
        assert re.findall(r'<option value="([^"]+)"', select) == list(vocab)
        assert re.findall(r'<option value="([^"]+)" selected>', select) == ["unknown"]
    # the script names each set after its file through textContent, never as markup
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    assert "textContent" in script and "innerHTML" not in script
    assert "Age, sex and body site are optional" in page


def test_the_model_page_shows_each_operating_point(fusion_client, client):
    r = fusion_client.get("/model")
    assert r.status_code == 200
    rows = re.findall(
        r'<tr data-mode="(\w+)"><td>\w+</td><td>[^<]+</td><td>([\d.]+)</td><td>([\d.]+)</td>', r.text
    )
    assert rows == [("metadata", "0.250", "1.100"), ("image_only", "0.350", "1.400")]
    assert "metadata when age, sex and localization are all known" in r.text
    plain = client.get("/model").text
    rows = re.findall(r'<tr data-mode="(\w+)">', plain)
    assert rows == ["image_only"] and "This model does not use metadata" in plain
    assert fusion_client.get("/healthz").json()["modes"] == ["metadata", "image_only"]


# --------------------------------------------------------------------------- memory, streaming, headers
# (issue 21) The pixel cap, the pixel budget, uploads parsed in memory as they stream, timeouts,
# security headers, and a bundle with bad values refused at startup. Streaming behaviour is shown
# on a real uvicorn on 127.0.0.1 (a raw socket sees when the server answers); the rest through
# the TestClient.


@contextlib.contextmanager
def _serving(app):
    """``app`` on a real uvicorn on 127.0.0.1 (a free port) in a thread; yields ``(host, port)``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield "127.0.0.1", server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def _multipart_head(boundary: str, name: str, ctype: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode()


def _request_head(port: int, boundary: str, length: int) -> bytes:
    return (
        f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (or ``timeout``), what a reset left included."""
    sock.settimeout(timeout)
    got = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            got += chunk
            if b"\r\n\r\n" in got:
                head, _, body = got.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: (\d+)", head, re.I)
                if m and len(body) >= int(m.group(1)):
                    break
    return got


def _png_with_filler(filler_mb: float) -> bytes:
    """A real, valid PNG (60x40) carrying ``filler_mb`` MB in a private ancillary chunk: as large
    as wanted, in no time."""
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (180, 90, 60)).save(buf, "PNG")
    png = buf.getvalue()
    data = bytes(int(filler_mb * 2**20))
    chunk = struct.pack(">I", len(data)) + b"prVt" + data + struct.pack(">I", zlib.crc32(b"prVt" + data))
    return png[:33] + chunk + png[33:]  # after the signature and IHDR


def _noise_png(side: int) -> bytes:
    """A real PNG of random pixels: ~3 bytes per pixel (noise does not compress)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def _assert_secure(r) -> str:
    for k, v in SECURITY.items():
        assert r.headers.get(k) == v, (r.request.url, k, r.status_code)
    csp = r.headers["content-security-policy"]
    for part in (
        "default-src 'none'",
        "frame-ancestors 'none'",
        "img-src 'self' data:",
        "form-action 'self'",
    ):
        assert part in csp
    return csp


# ---- one pixel cap


def test_the_pixel_cap_is_the_stricter_of_validate_and_drift_and_can_only_be_lowered():
    both = {"validate": {"max_pixels": 100_000_000}, "drift": {"max_pixels": 40_000_000}}
    assert pixel_cap(both) == 40_000_000
    assert (
        pixel_cap({"validate": {"max_pixels": 30_000_000}, "drift": {"max_pixels": 40_000_000}}) == 30_000_000
    )
    assert pixel_cap({"validate": {"max_pixels": 100_000_000}}) == 100_000_000
    assert pixel_cap({}) == pixel_cap(None) == 100_000_000  # skinlesion.core.images' default
    assert pixel_cap(both, 10_000_000) == 10_000_000
    with pytest.raises(
        StageError, match=r"--max-pixels 50,000,000 is above the bundle's cap of 40,000,000 .*can only lower"
    ):
        pixel_cap(both, 50_000_000)
    for bad in ("abc", -5, 0, 1.5e7, True):
        with pytest.raises(
            StageError, match=r"^b.json: 'params.drift.max_pixels' must be a whole number of pixels"
        ):
            pixel_cap({"validate": {"max_pixels": 10**8}, "drift": {"max_pixels": bad}}, where="b.json")


def test_the_web_app_refuses_over_the_cap_of_drift_and_of_the_option(bundle_dir, predictor, tmp_path):
    # A bundle whose drift cap (20,000 px) is stricter than validate's: a 200x150 image (30,000 px)
    # is refused from its header by the web app, as drift would refuse it.
    strict = tmp_path / "strict"
    shutil.copytree(bundle_dir, strict)
    meta = json.loads((strict / "bundle.json").read_text())
    meta["params"]["drift"] = {"max_pixels": 20_000}
    (strict / "bundle.json").write_text(json.dumps(meta))
    loaded = load_predictor(_settings(strict))
    assert loaded.max_pixels == 20_000  # the predictor's own decode path uses the same cap
    upload = [("files", ("x.jpg", _jpeg(1), "image/jpeg"))]
    for settings, p in ((_settings(strict), loaded), (_settings(bundle_dir, max_pixels=20_000), predictor)):
        with TestClient(create_app(settings, p)) as c:
            assert c.get("/healthz").json()["limits"]["max_pixels"] == 20_000
            r = c.post("/api/predict", files=upload)
        assert r.status_code == 413
        assert r.json()["refused"] == [
            {
                "file": "x.jpg",
                "reason": "200x150 pixels is over the limit of 20,000 (decompression-bomb guard)",
            }
        ]


def test_a_max_pixels_above_the_cap_is_refused_before_any_member_is_loaded(bundle_dir, monkeypatch):
    from skinlesion.model.bundle import Bundle

    monkeypatch.setattr(Bundle, "load", classmethod(lambda cls, *a, **kw: pytest.fail("members loaded")))
    with pytest.raises(StageError, match=r"^--max-pixels 1,000,000,000 is above the bundle's cap"):
        load_predictor(_settings(bundle_dir, max_pixels=10**9))


def test_help_says_where_the_pixel_cap_comes_from(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "the stricter of the bundle's params validate.max_pixels and drift.max_pixels" in text
    assert "this option can only lower it" in text and "--pixel-budget-mp" in text


# ---- the pixel budget


def test_budget_first_come_first_served_bounded_wait_and_line():
    async def scenario() -> list[str]:
        events = []
        b = Budget(10, wait_s=0.2, max_waiting=2)
        await b.acquire(6)

        async def take(n: int, tag: str) -> None:
            try:
                await b.acquire(n)
                events.append(f"{tag} got {n}")
            except Busy:
                events.append(f"{tag} busy")

        big = asyncio.create_task(take(8, "big"))  # waits: 6 + 8 > 10
        await asyncio.sleep(0.01)
        small = asyncio.create_task(take(2, "small"))  # would fit, but big is first in line
        await asyncio.sleep(0.01)
        await take(1, "third")  # the line (2) is full: busy at once
        b.release(6)  # big gets its 8; small (8 + 2 = 10) too
        await asyncio.gather(big, small)
        assert (b.used, b.peak) == (10, 10)
        b.release(8)
        b.release(2)
        await b.acquire(10)
        await take(1, "late")  # waits 0.2 s, then busy
        b.release(10)
        events.append(f"used {b.used}, line {len(b._line)}")
        return events

    assert asyncio.run(scenario()) == [
        "third busy",
        "big got 8",
        "small got 2",
        "late busy",
        "used 0, line 0",
    ]


def test_beyond_the_pixel_budget_a_request_gets_503_with_retry_after(bundle_dir, predictor, monkeypatch):
    """One 30,000-pixel image fills the budget while it decodes (slowed to 3 s); a second upload
    waits its 0.3 s in line, then is told to come back; after the first is done it goes through."""
    import serve.upload

    real_decode = serve.upload.decode

    def slow_decode(data, spec):
        time.sleep(3.0)
        return real_decode(data, spec)

    monkeypatch.setattr(serve.upload, "decode", slow_decode)
    settings = _settings(
        bundle_dir,
        explain=False,
        max_pixels=30_000,
        pixel_budget_mp=0.03,
        budget_wait_s=0.3,
        decode_workers=4,
    )
    upload = [("files", ("x.jpg", _jpeg(2), "image/jpeg"))]  # 200x150 = 30,000 pixels
    with (
        _serving(create_app(settings, predictor)) as (host, port),
        httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as c,
    ):
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=c.post("/api/predict", files=upload)))
        t.start()
        deadline = time.monotonic() + 10
        while c.get("/healthz").json()["limits"]["pixels_in_use"] != 30_000:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as other:
            r = other.post("/api/predict", files=upload)
        waited = time.monotonic() - t0
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["detail"] == (
            "the server is busy: the images it is decoding already fill its memory budget (0.03 MP); "
            "nothing was analysed, try again in 5 s"
        )
        assert 0.25 < waited < 2.5  # it waited in line, and not for the whole decode
        _assert_secure(r)
        t.join(30)
        assert first["r"].status_code == 200
        limits = c.get("/healthz").json()["limits"]
        assert (limits["pixels_in_use"], limits["pixels_peak"], limits["decode_workers"]) == (0, 30_000, 4)
        assert c.post("/api/predict", files=upload).status_code == 200


def test_settings_that_could_never_serve_are_one_error_line(bundle_dir, predictor, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("served with impossible settings"))
    monkeypatch.setattr(Predictor, "load", staticmethod(lambda path, **kw: predictor))
    cases = {
        ("--pixel-budget-mp", "50"): "--pixel-budget-mp 50 is below the pixel cap of 100 MP",
        ("--max-pixels", "200000000"): "--max-pixels 200,000,000 is above the bundle's cap of 100,000,000",
        ("--upload-budget-mb", "1"): "--upload-budget-mb 1 is below one full upload (160 MB",
        ("--upload-stall-s", "0"): "--upload-stall-s must be a number above 0, got 0",
        ("--pixel-budget-mp", "nan"): "--pixel-budget-mp must be a number above 0, got nan",
    }
    for opts, message in cases.items():
        assert main(["--bundle", str(bundle_dir), *opts]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


# ---- uploads: in memory, refused while they stream, timed out


def test_a_part_over_the_limit_is_refused_before_the_body_is_all_sent(bundle_dir, predictor):
    """A 50 MB part (a real PNG with a 50 MB filler chunk; the request's 160 MB limit lets it
    through the Content-Length check) is answered 413 once 10 MB of it are in, while the client
    has sent only a part of it: the server stops reading there."""
    png = _png_with_filler(50)
    boundary = "b0undary21"
    body = _multipart_head(boundary, "huge.png", "image/png") + png + f"\r\n--{boundary}--\r\n".encode()
    with _serving(create_app(_settings(bundle_dir), predictor)) as (host, port):
        sock = socket.create_connection((host, port))
        sock.sendall(_request_head(port, boundary, len(body)))
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < len(body) and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(body[sent : sent + 256 * 1024])
        response = _read_response(sock, 10)
        sock.close()
    assert response.startswith(b"HTTP/1.1 413 "), response[:200]
    head, _, payload = response.partition(b"\r\n\r\n")
    assert json.loads(payload) == {
        "detail": "the upload was stopped at a file over the size limit; nothing was analysed",
        "refused": [{"file": "huge.png", "reason": "larger than the limit of 10 MB"}],
    }
    assert re.search(rb"(?im)^connection: close", head) and re.search(rb"(?im)^x-frame-options: DENY", head)
    # what the client had handed to its socket when the answer came: the 10 MB read, plus what the
    # loopback buffers hold; far from the 50 MB
    assert sent < 30 * 2**20, sent


def test_a_stalled_upload_gets_408_within_the_timeout(bundle_dir, predictor):
    png = _png_with_filler(0.1)
    boundary = "stall21"
    body = _multipart_head(boundary, "slow.png", "image/png") + png + f"\r\n--{boundary}--\r\n".encode()
    settings = _settings(bundle_dir, upload_stall_s=1.0)
    with _serving(create_app(settings, predictor)) as (host, port):
        sock = socket.create_connection((host, port))
        sock.sendall(_request_head(port, boundary, len(body)) + body[:5000])  # then nothing
        t0 = time.monotonic()
        response = _read_response(sock, 10)
        waited = time.monotonic() - t0
        sock.close()
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["detail"] == (
        "the upload stalled: nothing arrived for 1 s; nothing was analysed"
    )
    assert 0.9 < waited < 4, waited


def test_an_upload_over_the_deadline_gets_408(bundle_dir, predictor):
    png = _png_with_filler(0.1)
    boundary = "drip21"
    body = _multipart_head(boundary, "drip.png", "image/png") + png + f"\r\n--{boundary}--\r\n".encode()
    settings = _settings(bundle_dir, upload_stall_s=1.0, upload_deadline_s=1.5)
    with _serving(create_app(settings, predictor)) as (host, port):
        sock = socket.create_connection((host, port))
        sock.sendall(_request_head(port, boundary, len(body)))
        t0 = time.monotonic()
        for i in range(8):  # a byte every 0.4 s: never stalled, never done
            if select.select([sock], [], [], 0.4)[0]:
                break
            sock.send(body[i : i + 1])
        response = _read_response(sock, 10)
        sock.close()
    assert response.startswith(b"HTTP/1.1 408 ")
    assert b"the upload took longer than 1.5 s; nothing was analysed" in response
    assert time.monotonic() - t0 < 4


def test_uploads_are_never_written_to_disk(client, monkeypatch, tmp_path):
    """A 5 MB image is parsed in memory: no temporary file is made (Linux's TemporaryFile leaves
    no name in the folder, so the calls are counted too). The control shows the check sees
    spooling: Starlette's own form parser, on the same upload, rolls it over to a file."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    made: list[str] = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)
        monkeypatch.setattr(
            tempfile, name, lambda *a, _real=real, _n=name, **kw: made.append(_n) or _real(*a, **kw)
        )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    data = _noise_png(1340)
    assert len(data) > 5 * 2**20
    upload = [("files", ("big.png", data, "image/png"))]
    r = client.post("/api/predict", files=upload)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "ok"
    assert made == [] and list(tmp.iterdir()) == []

    async def starlette_form(request):
        form = await request.form()
        return PlainTextResponse(str(len(await form["files"].read())))

    with TestClient(Starlette(routes=[Route("/", starlette_form, methods=["POST"])])) as c:
        assert c.post("/", files=upload).text == str(len(data))
    assert made == ["TemporaryFile"]


# ---- security headers


def test_every_response_carries_the_security_headers(client, predictor, bundle_dir, monkeypatch):
    for r in (
        client.get("/"),
        client.get("/model"),
        client.get("/healthz"),
        client.get("/plots/custom_cnn-roc.png"),
        client.get("/plots/nothing.png"),
        client.get("/no-such-page"),
        client.get("/api/predict"),  # 405
        client.post("/api/predict", files=[("files", ("x.jpg", _jpeg(1), "image/jpeg"))]),
        client.post("/predict", files=[("files", ("notes.jpg", b"not an image", "image/jpeg"))]),
        client.post("/api/predict", content=b"x", headers={"content-type": "text/plain"}),
    ):
        _assert_secure(r)
    assert client.get("/redoc").status_code == 404  # no API docs page pulling scripts from a CDN

    def boom(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(predictor, "predict_decoded", boom)
    with TestClient(create_app(_settings(bundle_dir), predictor), raise_server_exceptions=False) as c:
        r = c.post("/api/predict", files=[("files", ("y.jpg", _jpeg(2), "image/jpeg"))])
    assert r.status_code == 500
    _assert_secure(r)


def test_the_csp_pins_the_pages_own_inline_script_and_style(fusion_client):
    r = fusion_client.get("/")
    csp = _assert_secure(r)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))

    def pinned(body: str) -> str:
        return (
            "'sha256-" + __import__("base64").b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        )

    (script,) = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", r.text, re.S)
    assert pinned(script) in directives["script-src"].split()
    assert pinned(style) in directives["style-src-elem"].split()
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in csp
    assert pinned(script.replace("textContent", "innerHTML")) not in csp  # another script is not allowed


# ---- a bundle with bad values: the app does not start


BAD_VALUES = [
    ("threshold", '"abc"'),
    ("threshold", "NaN"),
    ("threshold", "2.0"),
    ("temperature", "0"),
    ("temperature", "-1"),
    ("image_size", '"abc"'),
]


def _bad_bundle(bundle_dir: Path, root: Path, key: str, text: str) -> Path:
    """A copy of the bundle whose bundle.json says ``"key": text`` (the JSON text written by hand)."""
    bad = root / "bad"
    shutil.copytree(bundle_dir, bad)
    raw = (bad / "bundle.json").read_text()
    edited, n = re.subn(rf'"{key}": [^,}}]+', f'"{key}": {text}', raw, count=1)
    assert n == 1
    (bad / "bundle.json").write_text(edited)
    return bad


@pytest.mark.parametrize(("key", "text"), BAD_VALUES)
def test_a_bundle_with_a_bad_value_refuses_to_start(bundle_dir, tmp_path, monkeypatch, capsys, key, text):
    import uvicorn

    bad = _bad_bundle(bundle_dir, tmp_path, key, text)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("served a bad bundle"))
    assert main(["--bundle", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad / 'bundle.json'}") and repr(key) in err, err
    # an ASGI server running create_app without a predictor: its startup fails, it never answers
    with pytest.raises(StageError, match=repr(key)), TestClient(create_app(_settings(bad))):
        pass


def test_a_bad_pixel_cap_in_the_bundle_refuses_to_start(bundle_dir, tmp_path, capsys):
    bad = _bad_bundle(bundle_dir, tmp_path, "max_pixels", '"abc"')
    assert main(["--bundle", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {bad / 'bundle.json'}: 'params.validate.max_pixels' must be a whole number of pixels >= 1, "
        "got 'abc'\n"
    )


def test_the_command_with_a_nan_threshold_exits_1_with_one_line(bundle_dir, tmp_path):
    bad = _bad_bundle(bundle_dir, tmp_path, "threshold", "NaN")
    res = subprocess.run(
        [sys.executable, "-m", "serve.web", "--bundle", str(bad), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and "'threshold'" in res.stderr and "nan" in res.stderr.lower()
    assert "Traceback" not in res.stderr and "Uvicorn running" not in res.stderr


# --------------------------------------------------------------------------- what the bundle is, said first


def test_a_demo_bundle_says_so_first_on_every_page_and_in_every_json(bundle_dir, tmp_path):
    demo = with_training_data(bundle_dir, tmp_path / "demo", DEMO_DATA)
    line = "trained on synthetic demo data (not real dermoscopy) — do not use on real images (data d70be3bf)"
    with TestClient(create_app(_settings(demo, explain=False), Predictor.load(demo))) as c:
        for page in (c.get("/"), c.get("/model"), c.post("/predict", files=[("files", ("a.jpg", _jpeg(1)))])):
            first = page.text.split("<body>", 1)[1].lstrip()
            assert first.startswith(
                '<p class="trained synthetic" id="trained-on" data-synthetic="yes">'
                f"<strong>This model was {line}."
            ), first[:300]
        model = c.get("/api/model").json()
        assert next(iter(model)) == "trained_on" and model["trained_on"] == line
        assert model["bundle"]["synthetic"] is True and model["bundle"]["training_data"] == DEMO_DATA
        assert model["modes"] == ["image_only"] and model["members"] == [
            {"name": "custom_cnn", "weight": 1.0}
        ]
        answer = c.post("/api/predict", files=[("files", ("a.jpg", _jpeg(1), "image/jpeg"))]).json()
        assert next(iter(answer)) == "trained_on" and answer["trained_on"] == line
        assert c.get("/healthz").json()["bundle"]["trained_on"] == line


def fixed_output_bundle(
    src: Path, root: Path, probs: dict[str, float], *, threshold: float, prior=None
) -> Path:
    """A copy of the real bundle ``src`` whose answer is ``probs`` (within ~3%) for every image: the
    temperature at its maximum (1000) flattens the member's log-probabilities and the class bias
    (log ``probs``) sets the rest. A real model, a real app: only the operating point is chosen."""
    import math
    import shutil

    shutil.copytree(src, root)
    meta = json.loads((root / "bundle.json").read_text())
    rest = (1.0 - sum(probs.values())) / (len(CLASSES) - len(probs))
    meta.update(
        temperature=1000.0,
        threshold=threshold,
        class_bias=[math.log(probs.get(c, rest)) for c in CLASSES],
        class_prior=prior,
        decision="balanced" if prior else "argmax",
    )
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def _text(page: str) -> str:
    import html

    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)).strip())


def test_the_risk_badge_follows_the_referral_never_low_beside_refer(bundle_dir, tmp_path):
    # nv is the most probable class (50%) but P(mel)+P(bcc)+P(akiec) ~0.39 >= 0.3: referred. The
    # badge used to be read from nv alone: a green "Low" beside a red "refer".
    root = fixed_output_bundle(
        bundle_dir, tmp_path / "b", {"nv": 0.5, "mel": 0.3, "bcc": 0.05}, threshold=0.3
    )
    with TestClient(create_app(_settings(root, explain=False), Predictor.load(root))) as c:
        r = c.post("/predict", files=[("files", ("lesion.jpg", _jpeg(4), "image/jpeg"))])
        assert r.status_code == 200
        (section,) = _results(r.text)
        assert '<span class="refer-yes">refer (at or above 0.300)</span>' in section
        assert re.search(r'<span class="badge risk-High"[^>]*>High</span>', section), section
        text = _text(section)
        assert "Risk level: High (referred; from Melanoma)" in text
        assert "Predicted class: Melanocytic nevus (nv, the model's class decision)" in text
        assert "Not the most probable class" not in text  # argmax: the decision is the top class
        api = c.post("/api/predict", files=[("files", ("lesion.jpg", _jpeg(4), "image/jpeg"))]).json()
        (row,) = api["results"]
        assert (row["refer"], row["predicted"], row["risk"], row["risk_class"]) == (True, "nv", "High", "mel")


def test_a_decision_that_is_not_the_top_class_is_explained_on_the_page(bundle_dir, tmp_path):
    # balanced decision: vasc (20%) against its 1% share beats nv (60%) against its 67%
    prior = [0.03, 0.05, 0.11, 0.01, 0.11, 0.68, 0.01]
    root = fixed_output_bundle(
        bundle_dir, tmp_path / "b", {"nv": 0.6, "vasc": 0.2}, threshold=0.3, prior=prior
    )
    with TestClient(create_app(_settings(root, explain=False), Predictor.load(root))) as c:
        (section,) = _results(c.post("/predict", files=[("files", ("x.jpg", _jpeg(5), "image/jpeg"))]).text)
    text = _text(section)
    assert "below the referral threshold 0.300" in text and "Risk level: Low (not referred)" in text
    assert "Predicted class: Vascular lesion (vasc, the model's class decision)" in text
    assert re.search(
        r"Not the most probable class \(nv, 6\d\.\d%\): the bundle's class decision: the class whose "
        r"calibrated probability is highest against its share of the validation images",
        text,
    ), text
