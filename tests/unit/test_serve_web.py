"""The web app through FastAPI's TestClient: results, every refusal with its message, limits, pages,
and the optional age / sex / site per image.

One small bundle (an untrained custom CNN, as in test_serve.py) and one predictor serve most tests
of the module; the metadata tests add a two-mode bundle whose member fuses metadata. The refusal
tests assert the HTTP status and the sentence the user reads.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.predictor import Predictor
from serve.web import WebSettings, create_app, main, name_problem
from stages.common import CLASSES, LOCALIZATIONS, SEXES
from stages.scoring import parse_metadata
from tests.unit.test_serve import SIZE, make_bomb, make_bundle, make_truncated

REPO = Path(__file__).resolve().parents[2]
TestClient = pytest.importorskip("fastapi.testclient").TestClient


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def predictor(bundle_dir) -> Predictor:
    return Predictor.load(bundle_dir)


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
    assert "2026-11-30T12:00:00Z, data 01234567" in r.text


def test_one_upload_gives_risk_top3_flag_overlay_and_disclaimer(client):
    r = client.post("/predict", files=[("files", ("lesion_1.jpg", _jpeg(1), "image/jpeg"))])
    assert r.status_code == 200
    (section,) = _results(r.text)
    assert 'data-image="lesion_1.jpg"' in section
    assert re.search(r'Risk level: <span class="badge risk-(High|Moderate|Low)">', section)
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
        assert (
            _error_box(r.text)
            == "1 of 1 file(s) refused; nothing was analysed big.jpg : larger than the limit of 0.05 MB"
        )
        three = [("files", (f"{i}.jpg", _jpeg(i, size=(64, 48)), "image/jpeg")) for i in range(3)]
        r = c.post("/predict", files=three)
        assert r.status_code == 400
        assert _error_box(r.text) == (
            "the upload was refused: Too many files. Maximum number of files is 2. (at most 2 files)"
        )
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
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8000)
    assert main(["--bundle", str(bundle_dir), "--host", "0.0.0.0", "--port", "9001"]) == 0
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 9001)


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

    from stages.bundle import file_md5
    from stages.models import ModelSpec, build_backbone, build_model, output_bias_from_counts

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
        "the upload was refused: Too many fields. Maximum number of fields is 14. (at most 2 files)"
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
