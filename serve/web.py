"""The web app: upload dermoscopic images, read risk level, top-3, malignant flag and Grad-CAM.

    python -m serve.web [--bundle DIR] [--metrics DIR] [--host 127.0.0.1] [--port 8000]

A thin FastAPI face over :class:`serve.predictor.Predictor`, loaded once per process when the
server starts (not at import). Pages: ``/`` (upload form and results, every result with the
medical disclaimer), ``/model`` (the bundle's model card and the evaluation plots); JSON:
``POST /api/predict``; ``/healthz``.

Limits are enforced at the edge, before any decoding, each refusal with an HTTP 4xx status and a
message the page shows: the request must state its size (411) and stay under the total limit
(413); at most ``max_files`` files (400), each under ``max_file_mb`` (413), with a plain file name
(400: a name with a path in it is refused, not cleaned); the content must be an image of an
accepted format (415), whole (422) and under the pixel limit (413). One refused file refuses
the upload, naming every refused file, so no result is shown for a set the user did not send.
Nothing uploaded is written to disk by the app.

Binds to 127.0.0.1 by default: exposing it to a network is a deployment decision (TLS, login)
this prototype does not make for you.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from serve.decode import ALLOWED_FORMATS, Decoded, decode, describe_error
from serve.predictor import DISCLAIMER, Prediction, Predictor, default_bundle
from stages.common import run_main, setup_logging
from stages.images import IMAGE_SUFFIXES, ImageRejected

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
CLASS_NAMES = {
    "akiec": "Actinic keratosis / Bowen's disease",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
# Multipart framing (boundaries, part headers) on top of the files themselves.
FORM_OVERHEAD_BYTES = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class WebSettings:
    bundle: Path
    metrics: Path | None = None  # the pipeline's metrics/ folder (evaluation plots)
    max_files: int = 16
    max_file_mb: float = 10.0
    explain: bool = True  # Grad-CAM overlay on every result

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + FORM_OVERHEAD_BYTES


@dataclass
class Refusal(Exception):
    """A refused upload: the HTTP status, one summary line and ``(file, reason)`` per bad file."""

    status: int
    summary: str
    items: list[tuple[str, str]] = field(default_factory=list)


def name_problem(name: str) -> str | None:
    """Why an uploaded file's name is refused, or None. Browsers send a bare name; anything
    else came from a script, and the app never guesses what part of it was meant."""
    if not name:
        return "the file has no name"
    if "/" in name or "\\" in name or name.startswith(".") or ":" in name:
        return "the file name looks like a path; upload the file itself under a plain name (e.g. lesion.jpg)"
    if _CONTROL.search(name):
        return "the file name contains control characters"
    if len(name) > 255:
        return "the file name is longer than 255 characters"
    return None


def _status_for(e: BaseException) -> int:
    """413 for the pixel cap (stages.images says "over the limit"), 415 for a non-image or a
    format not accepted, 422 for an image file that is damaged."""
    if isinstance(e, ImageRejected):
        return 413 if "over the limit" in str(e) else 415
    return 422


def decode_uploads(uploads: list[tuple[str, bytes]], predictor: Predictor, *, explain: bool) -> list[Decoded]:
    """Decode every upload or raise one :class:`Refusal` naming each file that failed."""
    spec = predictor.decode_spec(explain=explain)
    decoded: list[Decoded] = []
    refused: list[tuple[str, str]] = []
    status = 0
    for name, data in uploads:
        try:
            decoded.append(decode(data, spec))
        except Exception as e:  # any decoder failure is a fact about this upload
            reason = describe_error(e)
            if reason.startswith("cannot identify image file"):
                reason = f"not an image file ({', '.join(sorted(ALLOWED_FORMATS - {'MPO'}))} expected)"
            refused.append((name, reason))
            status = status or _status_for(e)
    if refused:
        raise Refusal(
            status, f"{len(refused)} of {len(uploads)} file(s) refused; nothing was analysed", refused
        )
    return decoded


async def read_uploads(request: Request, settings: WebSettings) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of the form's ``files``, or a :class:`Refusal` (limits first)."""
    length = request.headers.get("content-length")
    if length is None:
        raise Refusal(411, "the upload must state its size (Content-Length)")
    if not length.isdigit() or int(length) > settings.max_request_bytes:
        raise Refusal(
            413,
            f"the upload is larger than {settings.max_request_bytes / 2**20:.3g} MB "
            f"({settings.max_files} files of at most {settings.max_file_mb:g} MB)",
        )
    try:
        form = await request.form(max_files=settings.max_files, max_fields=8)
    except HTTPException as e:  # too many files or fields, malformed multipart
        raise Refusal(
            400, f"the upload was refused: {e.detail} (at most {settings.max_files} files)"
        ) from None
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    files = [f for f in files if f.filename or f.size]  # an empty file input sends one nameless part
    if not files:
        raise Refusal(400, "choose one or more image files first")
    refused: list[tuple[str, str]] = []
    out: list[tuple[str, bytes]] = []
    status = 0
    for f in files:
        name = f.filename or ""
        problem = name_problem(name)
        if problem is None:
            data = await f.read(settings.max_file_bytes + 1)
            if len(data) > settings.max_file_bytes:
                problem, code = f"larger than the limit of {settings.max_file_mb:g} MB", 413
            else:
                out.append((name, data))
        else:
            code = 400
        if problem is not None:
            refused.append((name[:300], problem))
            status = status or code
        await f.close()
    if refused:
        raise Refusal(
            status, f"{len(refused)} of {len(files)} file(s) refused; nothing was analysed", refused
        )
    return out


def _result_view(pred: Prediction) -> dict[str, Any]:
    return {
        "image": pred.image,
        "risk": pred.risk,
        "predicted": pred.predicted,
        "refer": pred.refer,
        "malignant_prob": pred.malignant_prob,
        "top": pred.top,
        "gradcam_empty": pred.gradcam_empty,
        "overlay": base64.b64encode(_png(pred.overlay)).decode("ascii") if pred.overlay is not None else None,
    }


def _png(pixels: Any) -> bytes:
    from serve.gradcam import png_bytes

    return png_bytes(pixels)


def create_app(settings: WebSettings, predictor: Predictor | None = None) -> FastAPI:
    """The FastAPI app. ``predictor``: an already loaded one (tests); else loaded at startup."""
    import markdown

    from serve.plots import find_figures

    templates = Jinja2Templates(directory=str(TEMPLATES))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        p = predictor or await run_in_threadpool(Predictor.load, settings.bundle)
        app.state.predictor = p
        members = [m["name"] for m in p.bundle.meta.get("members", [])]
        app.state.figures = {f.key: f for f in find_figures(settings.metrics, members)}
        log.info("serving bundle %s (%s)", settings.bundle, p.version["label"])
        yield

    app = FastAPI(title="Skin lesion classifier (research prototype)", lifespan=lifespan, docs_url=None)

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        p: Predictor = request.app.state.predictor
        base = {
            "disclaimer": DISCLAIMER,
            "version": p.version,
            "threshold": p.threshold,
            "best": p.bundle.best,
            "class_names": CLASS_NAMES,
            "max_files": settings.max_files,
            "max_file_mb": f"{settings.max_file_mb:g}",
            "formats": ", ".join(sorted(ALLOWED_FORMATS - {"MPO"})),
            "accept": ",".join(IMAGE_SUFFIXES),
            "results": [],
            "refusal": None,
        }
        return templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)

    async def analyse(request: Request, explain: bool) -> list[Prediction]:
        p: Predictor = request.app.state.predictor
        uploads = await read_uploads(request, settings)
        decoded = await run_in_threadpool(decode_uploads, uploads, p, explain=explain)
        names = [n for n, _ in uploads]
        return await run_in_threadpool(p.predict_decoded, names, decoded, explain=explain)

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        return page(request, "index.html")

    @app.post("/predict", response_class=HTMLResponse)
    async def predict_page(request: Request) -> HTMLResponse:
        try:
            preds = await analyse(request, settings.explain)
        except Refusal as r:
            log.info("refused upload (%d): %s %s", r.status, r.summary, r.items)
            return page(request, "index.html", status=r.status, refusal=r)
        return page(request, "index.html", results=[_result_view(x) for x in preds])

    @app.post("/api/predict")
    async def predict_api(request: Request, explain: bool = False) -> JSONResponse:
        p: Predictor = request.app.state.predictor
        try:
            preds = await analyse(request, explain)
        except Refusal as r:
            refused = [{"file": n, "reason": why} for n, why in r.items]
            return JSONResponse({"detail": r.summary, "refused": refused}, status_code=r.status)
        results = []
        for x in preds:
            row = x.as_row(p.classes, p.threshold, p.version)
            row["top"] = [{"class": c, "probability": v} for c, v in x.top]
            if x.overlay is not None:
                row["gradcam_png_base64"] = base64.b64encode(_png(x.overlay)).decode("ascii")
            results.append(row)
        return JSONResponse({"bundle": p.version, "disclaimer": DISCLAIMER, "results": results})

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
        return page(
            request, "model.html", card=card, figures=list(sections.items()), metrics_dir=settings.metrics
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
        return {"status": "ok", "bundle": p.version, "members": [m.name for m in p.bundle.members]}

    return app


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
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-files", type=int, default=16, help="images per upload (default 16)")
    ap.add_argument("--max-file-mb", type=float, default=10.0, help="size limit per image (default 10 MB)")
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
        )
        # Loaded here, once, so a missing or damaged bundle is one error line, not a server traceback.
        predictor = Predictor.load(settings.bundle)
        uvicorn.run(create_app(settings, predictor), host=args.host, port=args.port, log_level="info")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
