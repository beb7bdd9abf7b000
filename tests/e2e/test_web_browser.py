"""The web app in a real browser: `python -m serve.web` as its own process on 127.0.0.1, driven by
headless Chromium (Debian's, through Playwright; nothing is downloaded at run time).

A user uploads three real HAM10000 images and reads the results with their Grad-CAM overlays, uploads a
text file and reads the refusal, and opens the model card page. The screenshots are kept in the
test's tmp dir; with SAVE_SCREENSHOTS=1 they are also copied to docs/img/ (web_result.png,
web_refusal.png, web_model.png) for the README. The bundle is a small real one: a custom CNN
trained on ~2,400 real images (tests/integration/real_bundle.py, ~90 s on an idle machine).
``SERVE_TEST_BUILD=DIR`` reuses the folder of an earlier ``real_bundle.build(shared, DIR)``
(e.g. one trained longer, for screenshots).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Background, free_port, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.realdata]

REPO = Path(__file__).resolve().parents[2]
DOCS_IMG = REPO / "docs" / "img"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium not found: `make setup` installs Debian's chromium (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def served(shared_ham, tmp_path_factory):
    """A real bundle, the pipeline-shaped metrics folder beside it, and the app serving both."""
    from tests.integration import real_bundle

    root = tmp_path_factory.mktemp("web")
    reuse = os.environ.get("SERVE_TEST_BUILD")
    made = Path(reuse) if reuse else root / "build"
    bundle = made / "bundle" if reuse else real_bundle.build(shared_ham, made)[0]
    metrics = root / "metrics"
    for rel, src in {
        "eval/custom_cnn": "eval",
        "train/custom_cnn": "live",
        "calibration": "cal",
        "ensemble": "ens",
    }.items():
        (metrics / rel).parent.mkdir(parents=True, exist_ok=True)
        (metrics / rel).symlink_to(made / src)
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    app = Background(
        "web",
        [sys.executable, "-m", "serve.web", "--bundle", str(bundle), "--metrics", str(metrics),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, logs=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/healthz", app, 180, "the web app did not come up")
        yield url, app
    finally:
        app.stop()


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile per test
            executable_path=_chromium(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1150, "height": 900},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def _shot(page, tmp_path: Path, name: str, *, full_page: bool = True) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=full_page)
    assert out.stat().st_size > 10_000, f"{name}: an empty screenshot"
    if os.environ.get("SAVE_SCREENSHOTS"):  # refresh the README's pictures; a test run never edits the repo
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, DOCS_IMG / name)
    return out


def test_upload_real_images_and_read_the_results(served, page, shared_ham, tmp_path):
    url, app = served
    # the first original of a melanoma, a basal cell carcinoma and a nevus: referrals and not
    import pandas as pd

    meta = pd.read_csv(shared_ham / "HAM10000_metadata.csv", dtype=str).set_index("image_id")
    originals = sorted((shared_ham / "originals_600x450").glob("*.jpg"))
    images = [next(p for p in originals if meta.at[p.stem, "dx"] == dx) for dx in ("mel", "bcc", "nv")]
    page.goto(url + "/")
    assert "Not a medical device." in page.inner_text("p.banner")
    # first on the page: what the bundle was trained on, a real source here
    trained = page.locator("#trained-on")
    assert trained.inner_text().startswith("This model was trained on HAM10000 via local:")
    assert trained.get_attribute("data-synthetic") == "no"
    page.set_input_files("#files", [str(i) for i in images])
    with page.expect_response(url + "/predict") as response:
        page.click("#analyse")
    assert response.value.status == 200, app.tail()
    for image in images:
        result = page.locator(f'section.result[data-image="{image.name}"]')
        result.wait_for()
        badge = result.locator(".badge").inner_text()
        assert badge in ("High", "Moderate", "Low")
        # the badge is read on the side of the referral: never "Low" beside "refer", never above it without
        referred = result.locator(".refer-yes").count() == 1
        assert (badge != "Low") == referred, (badge, result.inner_text())
        assert result.locator("table.top3 tr").count() == 3
        assert "Malignant probability 0." in result.inner_text()
        assert "not a medical device" in result.locator("p.disclaimer").inner_text()
        overlay = result.locator("img.gradcam")
        # the overlay really decoded and painted: a 512x256 PNG (image | Grad-CAM)
        assert overlay.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]") == [
            True,
            512,
            256,
        ]
    shot = _shot(page, tmp_path, "web_result.png")
    assert shot.stat().st_size > 20_000


def test_upload_a_text_file_and_read_the_refusal(served, page, tmp_path):
    url, app = served
    notes = tmp_path / "notes.txt"
    notes.write_text("Patient notes: this is not an image.\n")
    page.goto(url + "/")
    page.set_input_files("#files", str(notes))
    with page.expect_response(url + "/predict") as response:
        page.click("#analyse")
    assert response.value.status == 415, app.tail()
    error = page.locator("#error")
    error.wait_for()
    text = error.inner_text()
    assert "1 of 1 file(s) refused; nothing was analysed" in text
    assert "notes.txt: not an image file (BMP, JPEG, PNG, TIFF, WEBP expected)" in text
    assert page.locator("section.result").count() == 0
    _shot(page, tmp_path, "web_refusal.png")


def test_model_card_page_shows_the_card_and_the_plots(served, page, tmp_path):
    url, _app = served
    page.goto(url + "/model")
    assert page.locator("article.card h1").inner_text().startswith("Model card")
    images = page.locator("figure img")
    # ensemble confusion + ROC, reliability, the member's confusion, ROC, confidence grid, history
    assert images.count() >= 5
    page.wait_for_load_state("networkidle")
    widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 100 for w in widths), widths
    _shot(page, tmp_path, "web_model.png", full_page=False)  # the card's first screen: the page is long
