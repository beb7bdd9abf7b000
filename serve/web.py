"""The web app: upload dermoscopic images (optional age, sex, site); read risk, top-3, flag, Grad-CAM.

    python -m serve.web [--bundle DIR] [--metrics DIR] [--host 127.0.0.1] [--port 8000]

A thin FastAPI face over :class:`serve.predictor.Predictor`, loaded once per process when the
server starts (not at import). Pages: ``/`` (upload form and results, every result with the
medical disclaimer), ``/model`` (the bundle's model card and the evaluation plots); JSON:
``POST /api/predict``; ``/healthz``.

Metadata: each image may come with ``age`` (years, 0-120), ``sex`` and ``localization`` (HAM10000's
vocabulary, ``stages.common.SEXES`` / ``LOCALIZATIONS``), sent as form fields repeated once per
file in the order of ``files`` (an empty value or "unknown" means unknown). A field sent another
number of times, with a value in it, is refused (400) rather than paired by guess. A value that does
not parse gives that image an error result naming the field and the value; the other images are
still analysed. Each result says the input mode it was scored in (``stages.scoring``: metadata
only when all three are known and the bundle fuses metadata, else image_only) and that mode's
threshold.

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
from stages.common import LOCALIZATIONS, SEXES, StageError, run_main, setup_logging
from stages.images import IMAGE_SUFFIXES, ImageRejected
from stages.scoring import (
    IMAGE_ONLY,
    META_FIELDS,
    METADATA,
    MODE_RULE,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    parse_metadata,
)

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
MODE_LABELS = {METADATA: "image with age, sex and site", IMAGE_ONLY: "image only"}
# Multipart framing (boundaries, part headers, the metadata fields) on top of the files themselves.
FORM_OVERHEAD_BYTES = 64 * 1024
# Text fields a form may carry besides the metadata (none today; room for a browser's extras).
SPARE_FIELDS = 8
UNKNOWN_ROW = (float("nan"), UNKNOWN_SEX, UNKNOWN_LOCALIZATION)
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


# (age, sex, localization) as sent with one file; None: the field was not sent.
MetaTexts = tuple[str | None, str | None, str | None]
# (age, sex index, localization index) as stages.scoring.parse_metadata returns it.
MetaRow = tuple[float, int, int]


@dataclass(frozen=True)
class Upload:
    """One uploaded file and the metadata texts sent with it."""

    name: str
    data: bytes
    texts: MetaTexts = (None, None, None)


@dataclass(frozen=True)
class Answer:
    """One image's prediction (or its error) and the metadata given with it (None: none)."""

    prediction: Prediction
    metadata: MetaRow | None = None


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


def _informative(text: str | None) -> bool:
    return text is not None and text.strip().lower() not in ("", "unknown")


def metadata_texts(fields: dict[str, list[Any]], n_files: int) -> list[MetaTexts]:
    """Per file, the ``age``, ``sex`` and ``localization`` texts sent with it, by position.

    ``fields``: each metadata field's values in the order sent. A field is sent once per file or
    not at all; sent another number of times it is refused (400) rather than paired by guess,
    unless none of its values says anything (all empty or "unknown": a form without JavaScript
    sends one blank set however many files were chosen).
    """
    columns: list[list[str | None]] = []
    for name in META_FIELDS:
        values = fields.get(name, [])
        if any(not isinstance(v, str) for v in values):
            raise Refusal(400, f"the field {name!r} must be text (one value per file), not a file")
        if len(values) != n_files and any(_informative(v) for v in values):
            raise Refusal(
                400,
                f"{n_files} file(s) but {len(values)} value(s) of {name!r}: send each of "
                f"{', '.join(META_FIELDS)} once per file, in the order of the files "
                "(empty means unknown), or leave it out",
            )
        columns.append(list(values) if len(values) == n_files else [None] * n_files)
    return [(a, s, loc) for a, s, loc in zip(*columns, strict=True)]


def parse_texts(texts: MetaTexts) -> tuple[MetaRow | None, str | None]:
    """``(metadata, None)``, ``(None, None)`` when nothing was given, or ``(None, why)``."""
    if not any(_informative(t) for t in texts):
        return None, None
    try:
        return parse_metadata(*texts), None
    except StageError as e:  # the message names the field and the value
        return None, str(e)


def predict_uploads(
    predictor: Predictor, uploads: list[Upload], decoded: list[Decoded], *, explain: bool
) -> list[Answer]:
    """One :class:`Answer` per upload, in order: an image whose metadata does not parse gets an
    error naming the field and the value, the others are predicted (in one model call)."""
    parsed = [parse_texts(u.texts) for u in uploads]
    ok = [i for i, (_, why) in enumerate(parsed) if why is None]
    rows = [parsed[i][0] for i in ok]
    # None when no image came with metadata: the same model input as the CLI's for a plain image.
    meta = MetaArrays.of([r or UNKNOWN_ROW for r in rows]) if any(r is not None for r in rows) else None
    preds = predictor.predict_decoded(
        [uploads[i].name for i in ok], [decoded[i] for i in ok], meta=meta, explain=explain
    )
    by_index = dict(zip(ok, preds, strict=True))
    return [
        Answer(by_index[i], row) if i in by_index else Answer(Prediction(u.name, error=why))
        for i, (u, (row, why)) in enumerate(zip(uploads, parsed, strict=True))
    ]


async def read_uploads(request: Request, settings: WebSettings) -> list[Upload]:
    """The form's ``files`` with the metadata sent for each, or a :class:`Refusal` (limits first)."""
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
        form = await request.form(
            max_files=settings.max_files, max_fields=len(META_FIELDS) * settings.max_files + SPARE_FIELDS
        )
    except HTTPException as e:  # too many files or fields, malformed multipart
        raise Refusal(
            400, f"the upload was refused: {e.detail} (at most {settings.max_files} files)"
        ) from None
    parts = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    # An empty file input sends one nameless part: not a file the user chose.
    chosen = [i for i, f in enumerate(parts) if f.filename or f.size]
    if not chosen:
        raise Refusal(400, "choose one or more image files first")
    # Paired by position among the parts sent, as the form lists them.
    texts = metadata_texts({k: form.getlist(k) for k in META_FIELDS}, len(parts))
    files = [parts[i] for i in chosen]
    refused: list[tuple[str, str]] = []
    out: list[Upload] = []
    status = 0
    for i, f in zip(chosen, files, strict=True):
        name = f.filename or ""
        problem = name_problem(name)
        if problem is None:
            data = await f.read(settings.max_file_bytes + 1)
            if len(data) > settings.max_file_bytes:
                problem, code = f"larger than the limit of {settings.max_file_mb:g} MB", 413
            else:
                out.append(Upload(name, data, texts[i]))
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


def metadata_json(row: MetaRow | None) -> dict[str, Any] | None:
    """The metadata given with an image, in the vocabulary (age None when unknown)."""
    if row is None:
        return None
    age, sex, loc = row
    return {"age": age if age == age else None, "sex": SEXES[sex], "localization": LOCALIZATIONS[loc]}


def _given_text(row: MetaRow | None) -> str:
    """``"age 45, female, back"``: the known fields of what was given ("" for none)."""
    d = metadata_json(row) or {}
    parts = [f"age {d['age']:g}" if d.get("age") is not None else ""]
    parts += [d[k] if d.get(k) not in (None, "unknown") else "" for k in ("sex", "localization")]
    return ", ".join(p for p in parts if p)


def _result_view(answer: Answer) -> dict[str, Any]:
    pred = answer.prediction
    return {
        "image": pred.image,
        "error": pred.error,
        "mode": pred.mode,
        "mode_label": MODE_LABELS.get(pred.mode, pred.mode),
        "threshold": pred.threshold,
        "given": _given_text(answer.metadata),
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
            "thresholds": [(MODE_LABELS.get(m, m), t) for m, t in p.thresholds.items()],
            "uses_metadata": METADATA in p.modes,
            "sexes": SEXES,
            "localizations": LOCALIZATIONS,
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

    async def analyse(request: Request, explain: bool) -> list[Answer]:
        p: Predictor = request.app.state.predictor
        uploads = await read_uploads(request, settings)
        decoded = await run_in_threadpool(
            decode_uploads, [(u.name, u.data) for u in uploads], p, explain=explain
        )
        return await run_in_threadpool(predict_uploads, p, uploads, decoded, explain=explain)

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> HTMLResponse:
        return page(request, "index.html")

    @app.post("/predict", response_class=HTMLResponse)
    async def predict_page(request: Request) -> HTMLResponse:
        try:
            answers = await analyse(request, settings.explain)
        except Refusal as r:
            log.info("refused upload (%d): %s %s", r.status, r.summary, r.items)
            return page(request, "index.html", status=r.status, refusal=r)
        return page(request, "index.html", results=[_result_view(a) for a in answers])

    @app.post("/api/predict")
    async def predict_api(request: Request, explain: bool = False) -> JSONResponse:
        p: Predictor = request.app.state.predictor
        try:
            answers = await analyse(request, explain)
        except Refusal as r:
            refused = [{"file": n, "reason": why} for n, why in r.items]
            return JSONResponse({"detail": r.summary, "refused": refused}, status_code=r.status)
        results = []
        for a in answers:
            x = a.prediction
            row = x.as_row(p.classes, p.version)
            row["metadata"] = metadata_json(a.metadata)
            row["top"] = [{"class": c, "probability": v} for c, v in x.top]
            if x.overlay is not None:
                row["gradcam_png_base64"] = base64.b64encode(_png(x.overlay)).decode("ascii")
            results.append(row)
        return JSONResponse(
            {
                "bundle": p.version,
                "thresholds": p.thresholds,
                "mode_rule": MODE_RULE,
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

    @app.get("/plots/{key}.png")
    async def plot(request: Request, key: str) -> Response:
        fig = request.app.state.figures.get(key)
        if fig is None:
            return Response("no such plot", status_code=404, media_type="text/plain")
        return Response(await run_in_threadpool(fig.png), media_type="image/png")

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        p: Predictor = request.app.state.predictor
        return {
            "status": "ok",
            "bundle": p.version,
            "members": [m.name for m in p.bundle.members],
            "modes": list(p.modes),
        }

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
