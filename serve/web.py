"""The web app: upload dermoscopic images (optional age, sex, site); read risk, top-3, flag, Grad-CAM.

    python -m serve.web [--bundle DIR] [--metrics DIR] [--host 127.0.0.1] [--port 8080]

A thin FastAPI face over :class:`serve.predictor.Predictor`, loaded once per process when the
server starts (not at import). Pages: ``/`` (upload form and results, every result with the
medical disclaimer), ``/model`` (the bundle's model card and the evaluation plots); JSON:
``POST /api/predict``, ``/api/model`` (what the bundle is), ``/healthz``. Every page opens with
what the bundle was trained on (a bundle trained on the synthetic demo data says so, in red), and
so do the JSON answers (``bundle.trained_on``).

Port 8080 by default: ``evidently ui`` (the drift dashboard) keeps its own default, 8000, so both
run side by side.

Metadata: each image may come with ``age`` (years, 0-120), ``sex`` and ``localization`` (HAM10000's
vocabulary, ``skinlesion.core.schema.SEXES`` / ``LOCALIZATIONS``), sent as form fields repeated once per
file in the order of ``files`` (an empty value or "unknown" means unknown). A field sent another
number of times, with a value in it, is refused (400) rather than paired by guess. A value that does
not parse gives that image an error result naming the field and the value; the other images are
still analysed. Each result says the input mode it was scored in (``skinlesion.measure.scoring``: metadata
only when all three are known and the bundle fuses metadata, else image_only) and that mode's
threshold.

Limits are enforced at the edge, each refusal with an HTTP status and a message the page shows.
From the request line and headers, before the body is read: the request must state its size (411)
and stay under the total limit (413). While the body streams in (the form is parsed here, in
memory, by python-multipart: no part is ever spooled to a temporary file): at most ``max_files``
files (400), each refused the moment it passes ``max_file_mb`` (413, without waiting for the rest
of the body), and an upload that sends nothing for ``upload_stall_s`` or is not complete after
``upload_deadline_s`` is dropped (408). Then per file: a plain file name (400: a name with a path
in it is refused, not cleaned), an image of an accepted format (415), under the pixel cap read from
its header (413) and whole (422). One refused file refuses the upload, naming every refused file,
so no result is shown for a set the user did not send.

Memory is bounded in total, not only per image. The pixel cap is the project's one cap: the
stricter of the bundle's ``validate.max_pixels`` (the pipeline's) and ``drift.max_pixels``,
lowered by ``--max-pixels``. The bytes of uploads held in memory, across all requests, stay under
``upload_budget_mb``; the pixels being decoded, across all requests, under ``pixel_budget_mp``
(an image reserves its header's pixel count before it is decoded, on a pool of
``decode_workers`` threads, and gives it back when done). A request that cannot get its share
waits in line (first come, first served, at most ``budget_wait_s``) or is answered 503 with
``Retry-After``. Every response carries security headers (:func:`serve.security.security_headers`).

Binds to 127.0.0.1 by default: exposing it to a network is a deployment decision (TLS, login)
this prototype does not make for you.

This module is the app (its routes) and the command; beside it: :mod:`serve.limits` (settings,
refusals, budgets), :mod:`serve.upload` (reading and decoding an upload), :mod:`serve.page` (the
answers and what the page shows of them) and :mod:`serve.security` (the headers).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates

from serve.decode import ALLOWED_FORMATS
from serve.limits import MB, Busy, Limits, Refusal, Runtime, WebSettings, busy_refusal
from serve.page import (
    CLASS_NAMES,
    MODE_LABELS,
    TEMPLATES,
    Answer,
    metadata_json,
    png,
    predict_uploads,
    result_view,
)
from serve.predictor import DISCLAIMER, Predictor, default_bundle
from serve.security import SecurityHeaders, security_headers
from serve.upload import Upload, content_length, decode_uploads, read_form, uploads_of
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.images import IMAGE_SUFFIXES
from skinlesion.core.schema import LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import METADATA, MODE_RULE

log = logging.getLogger(__name__)

# Not 8000: `evidently ui` (the drift dashboard) defaults to it, and a user runs both.
DEFAULT_PORT = 8080


class _App(FastAPI):
    def build_middleware_stack(self) -> Any:
        # Outside Starlette's error handler, so a 500 carries the headers too.
        return SecurityHeaders(super().build_middleware_stack(), security_headers())


# --------------------------------------------------------------------------- the app


def load_predictor(settings: WebSettings) -> Predictor:
    """The bundle checked (bundle.json's values, the pixel cap with ``--max-pixels``), then loaded."""
    return Predictor.load(settings.bundle, max_pixels=settings.max_pixels)


def create_app(settings: WebSettings, predictor: Predictor | None = None) -> FastAPI:
    """The FastAPI app. ``predictor``: an already loaded one (tests, ``main``: then the settings
    are checked here, before serving); else loaded and checked at startup."""
    import markdown

    from serve.plots import find_figures

    templates = Jinja2Templates(directory=str(TEMPLATES))
    if predictor is not None:
        Limits.of(settings, predictor)  # fail now, with one line, not at startup
    security_headers()  # an unpinnable inline block fails here, not on the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        p = predictor or await run_in_threadpool(load_predictor, settings)
        rt = Runtime.start(settings, Limits.of(settings, p))
        app.state.predictor = p
        app.state.runtime = rt
        members = [m["name"] for m in p.bundle.meta.get("members", [])]
        app.state.figures = {f.key: f for f in find_figures(settings.metrics, members)}
        log.info(
            "serving bundle %s (%s); pixel cap %s, %s MP in decoding at once on %d thread(s)",
            settings.bundle, p.version["label"], f"{rt.limits.cap:,}", f"{rt.pixels.capacity / 1e6:g}",
            rt.limits.workers,
        )  # fmt: skip
        try:
            yield
        finally:
            rt.stop()

    app = _App(
        title="Skin lesion classifier (research prototype)", lifespan=lifespan, docs_url=None, redoc_url=None
    )

    def page(
        request: Request, name: str, status: int = 200, headers: dict[str, str] | None = None, **ctx: Any
    ) -> HTMLResponse:
        p: Predictor = request.app.state.predictor
        base = {
            "disclaimer": DISCLAIMER,
            "version": p.version,
            "thresholds": [(MODE_LABELS.get(m, m), t) for m, t in p.thresholds.items()],
            "uses_metadata": METADATA in p.modes,
            "sexes": SEXES,
            "localizations": LOCALIZATIONS,
            "best": p.bundle.best,
            "class_names": CLASS_NAMES,
            "notes": p.notes,
            "max_files": settings.max_files,
            "max_file_mb": f"{settings.max_file_mb:g}",
            "formats": ", ".join(sorted(ALLOWED_FORMATS - {"MPO"})),
            "accept": ",".join(IMAGE_SUFFIXES),
            "results": [],
            "refusal": None,
        }
        return templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status, headers=headers)

    async def analyse(request: Request, explain: bool) -> list[Answer]:
        p: Predictor = request.app.state.predictor
        rt: Runtime = request.app.state.runtime
        try:
            held = content_length(request, settings)
            try:
                await rt.uploads.acquire(held)
            except Busy:
                raise busy_refusal(
                    f"other uploads fill its memory budget ({rt.uploads.capacity / MB:.3g} MB)"
                ) from None
            try:
                uploads = uploads_of(await read_form(request, settings), settings)
                spec = replace(p.decode_spec(explain=explain), max_pixels=rt.limits.cap)
                decoded = await decode_uploads(rt, uploads, spec)
            finally:
                rt.uploads.release(held)
        except Refusal as r:
            if not getattr(request.state, "body_done", False):
                # Refused before the body was all read: close, rather than receive the rest for nothing.
                r.headers.setdefault("Connection", "close")
            log.info("refused upload (%d): %s %s", r.status, r.summary, r.items)
            raise
        light = [Upload(u.name, b"", u.texts) for u in uploads]  # the bytes are no longer needed
        del uploads
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            rt.model_pool, lambda: predict_uploads(p, light, decoded, explain=explain)
        )

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        return page(request, "index.html")

    @app.post("/predict", response_class=HTMLResponse)
    async def predict_page(request: Request) -> HTMLResponse:
        try:
            answers = await analyse(request, settings.explain)
        except Refusal as r:
            return page(request, "index.html", status=r.status, headers=r.headers, refusal=r)
        return page(request, "index.html", results=[result_view(a) for a in answers])

    @app.post("/api/predict")
    async def predict_api(request: Request, explain: bool = False) -> JSONResponse:
        p: Predictor = request.app.state.predictor
        try:
            answers = await analyse(request, explain)
        except Refusal as r:
            refused = [{"file": n, "reason": why} for n, why in r.items]
            return JSONResponse(
                {"detail": r.summary, "refused": refused}, status_code=r.status, headers=r.headers
            )
        results = []
        for a in answers:
            x = a.prediction
            row = x.as_row(p.classes, p.version)
            row["metadata"] = metadata_json(a.metadata)
            row["top"] = [{"class": c, "probability": v} for c, v in x.top]
            if x.overlay is not None:
                row["gradcam_png_base64"] = base64.b64encode(png(x.overlay)).decode("ascii")
            results.append(row)
        return JSONResponse(
            {
                "trained_on": p.version["trained_on"],
                "bundle": p.version,
                "thresholds": p.thresholds,
                "mode_rule": MODE_RULE,
                "columns": p.notes,
                "disclaimer": DISCLAIMER,
                "results": results,
            }
        )

    @app.get("/model", response_class=HTMLResponse)
    async def model_page(request: Request) -> HTMLResponse:
        p: Predictor = request.app.state.predictor
        card_path = Path(p.bundle.root) / "model_card.md"
        text = (
            card_path.read_text(encoding="utf-8") if card_path.is_file() else "*No model card in the bundle.*"
        )
        # The card is written by the calibrate stage into the bundle, never by a user of this app.
        card = markdown.markdown(text, extensions=["tables"])
        sections: dict[str, list[Any]] = {}
        for f in request.app.state.figures.values():
            sections.setdefault(f.section, []).append(f)
        all_points = p.bundle.points
        points = [(m, MODE_LABELS.get(m, m), all_points[m].to_json()) for m in p.modes]
        return page(
            request,
            "model.html",
            card=card,
            points=points,
            mode_rule=MODE_RULE,
            figures=list(sections.items()),
            metrics_dir=settings.metrics,
        )

    @app.get("/api/model")
    async def model_api(request: Request) -> JSONResponse:
        """What the bundle is: its training data first, then its modes, thresholds and members."""
        p: Predictor = request.app.state.predictor
        return JSONResponse(
            {
                "trained_on": p.version["trained_on"],
                "bundle": p.version,
                "members": [{"name": m.name, "weight": m.weight} for m in p.bundle.members],
                "modes": list(p.modes),
                "mode_rule": MODE_RULE,
                "thresholds": p.thresholds,
                "operating_points": {m: pt.to_json() for m, pt in p.bundle.points.items()},
                "columns": p.notes,
                "disclaimer": DISCLAIMER,
            }
        )

    @app.get("/plots/{key}.png")
    async def plot(request: Request, key: str) -> Response:
        fig = request.app.state.figures.get(key)
        if fig is None:
            return Response("no such plot", status_code=404, media_type="text/plain")
        return Response(await run_in_threadpool(fig.png), media_type="image/png")

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        p: Predictor = request.app.state.predictor
        rt: Runtime = request.app.state.runtime
        return {
            "status": "ok",
            "bundle": p.version,
            "members": [m.name for m in p.bundle.members],
            "modes": list(p.modes),
            "limits": {
                "max_pixels": rt.limits.cap,
                "pixel_budget": rt.pixels.capacity,
                "pixels_in_use": rt.pixels.used,
                "pixels_peak": rt.pixels.peak,
                "upload_budget_bytes": rt.uploads.capacity,
                "decode_workers": rt.limits.workers,
            },
        }

    return app


# Blocks this large are mapped from and unmapped to the system on every allocation (glibc).
MMAP_THRESHOLD_BYTES = 4 * MB


def give_freed_images_back() -> None:
    """Make a decoded image's memory go back to the system when freed (glibc; elsewhere nothing).

    glibc raises its mmap threshold after the first large free, and from then on each decode
    thread's arena keeps the blocks of the largest image it decoded: with 8 decode threads the
    worst-case peak rose by ~300 MB over what the pixel budget allows (bench/results/web_memory.md).
    A fixed threshold keeps the budget the bound, whatever the number of threads.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_mmap_threshold = -3  # malloc.h
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(MMAP_THRESHOLD_BYTES))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.web", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bundle", type=Path, help="model bundle (default: models/production, else models/ensemble)"
    )
    ap.add_argument(
        "--metrics", type=Path, default=Path("metrics"), help="the pipeline's metrics folder (plots)"
    )
    ap.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    ap.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; the Evidently UI keeps its default, 8000)",
    )  # fmt: skip
    ap.add_argument("--max-files", type=int, default=16, help="images per upload (default 16)")
    ap.add_argument("--max-file-mb", type=float, default=10.0, help="size limit per image (default 10 MB)")
    ap.add_argument(
        "--max-pixels",
        type=int,
        help="pixel cap per image, read from its header before anything is decoded (default: the "
        "project's one cap, the stricter of the bundle's params validate.max_pixels and "
        "drift.max_pixels; this option can only lower it)",
    )
    ap.add_argument(
        "--pixel-budget-mp",
        type=float,
        help="megapixels being decoded at once across all requests; an image waits its turn (up to "
        "15 s), then 503 with Retry-After (default: 2x the pixel cap)",
    )
    ap.add_argument(
        "--upload-budget-mb",
        type=float,
        help="MB of uploads held in memory at once across all requests (default: 2 full uploads)",
    )
    ap.add_argument("--decode-workers", type=int, default=0, help="decode threads (default 0: one per core)")
    ap.add_argument(
        "--upload-stall-s", type=float, default=30.0, help="408 when an upload sends nothing this long (30)"
    )
    ap.add_argument(
        "--upload-deadline-s", type=float, default=300.0, help="408 when an upload takes longer (300)"
    )
    ap.add_argument("--no-explain", action="store_true", help="no Grad-CAM overlays (faster)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

    def body() -> int:
        import uvicorn

        settings = WebSettings(
            bundle=args.bundle or default_bundle(Path.cwd()),
            metrics=args.metrics,
            max_files=args.max_files,
            max_file_mb=args.max_file_mb,
            explain=not args.no_explain,
            max_pixels=args.max_pixels,
            pixel_budget_mp=args.pixel_budget_mp,
            upload_budget_mb=args.upload_budget_mb,
            decode_workers=args.decode_workers,
            upload_stall_s=args.upload_stall_s,
            upload_deadline_s=args.upload_deadline_s,
        )
        # Loaded and checked here, once, before serving: a missing or damaged bundle, a bad value in
        # bundle.json or a setting that could never serve an upload is one error line and exit 1.
        app = create_app(settings, load_predictor(settings))
        give_freed_images_back()
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
