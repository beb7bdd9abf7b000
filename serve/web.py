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
``Retry-After``. Every response carries security headers (:func:`security_headers`).

Binds to 127.0.0.1 by default: exposing it to a network is a deployment decision (TLS, login)
this prototype does not make for you.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import math
import os
import re
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from serve.decode import ALLOWED_FORMATS, Decoded, DecodeSpec, decode, describe_error
from serve.predictor import DISCLAIMER, Prediction, Predictor, default_bundle
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.images import IMAGE_SUFFIXES, ImageIncomplete, ImageRejected, open_checked
from skinlesion.core.parallel import n_workers
from skinlesion.core.schema import LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    META_FIELDS,
    METADATA,
    MODE_RULE,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    parse_metadata,
)
from skinlesion.model.bundle import pixel_cap  # noqa: F401 (re-exported: tests and callers)

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
# Not 8000: `evidently ui` (the drift dashboard) defaults to it, and a user runs both.
DEFAULT_PORT = 8080
# Multipart framing (boundaries, part headers, the metadata fields) on top of the files themselves.
FORM_OVERHEAD_BYTES = 64 * 1024
# Text fields a form may carry besides the metadata (none today; room for a browser's extras).
SPARE_FIELDS = 8
# A text field holds an age, a sex or a body site: a few bytes. Anything near this is not ours.
MAX_FIELD_BYTES = 1024
# What a 503 tells the client to wait: a worst-case image (40 MP PNG) decodes in ~2 s on one core.
RETRY_AFTER_S = 5
MB = 1024 * 1024
UNKNOWN_ROW = (float("nan"), UNKNOWN_SEX, UNKNOWN_LOCALIZATION)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class WebSettings:
    bundle: Path
    metrics: Path | None = None  # the pipeline's metrics/ folder (evaluation plots)
    max_files: int = 16
    max_file_mb: float = 10.0
    explain: bool = True  # Grad-CAM overlay on every result
    max_pixels: int | None = None  # lowers the bundle's pixel cap (see pixel_cap); never raises it
    pixel_budget_mp: float | None = None  # megapixels in decoding at once, all requests (None: 2x the cap)
    upload_budget_mb: float | None = None  # upload bytes in memory at once, all requests (None: 2 uploads)
    decode_workers: int = 0  # decode threads (0: one per core)
    budget_wait_s: float = 15.0  # longest wait in line for either budget, then 503
    max_waiting: int = 32  # requests in line per budget beyond which the answer is 503 at once
    upload_stall_s: float = 30.0  # no body data for this long: 408
    upload_deadline_s: float = 300.0  # the whole body not received after this long: 408

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + FORM_OVERHEAD_BYTES

    @property
    def max_fields(self) -> int:
        return len(META_FIELDS) * self.max_files + SPARE_FIELDS


@dataclass
class Refusal(Exception):
    """A refused upload: the HTTP status, one summary line and ``(file, reason)`` per bad file."""

    status: int
    summary: str
    items: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


# (age, sex, localization) as sent with one file; None: the field was not sent.
MetaTexts = tuple[str | None, str | None, str | None]
# (age, sex index, localization index) as skinlesion.measure.scoring.parse_metadata returns it.
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
    """413 for the pixel cap (skinlesion.core.images says "over the limit"), 415 for a non-image or a
    format not accepted, 422 for an image file that is damaged."""
    if isinstance(e, ImageIncomplete):  # a damaged file, like a truncated one
        return 422
    if isinstance(e, ImageRejected):
        return 413 if "over the limit" in str(e) else 415
    return 422


def _reason(e: BaseException) -> str:
    reason = describe_error(e)
    if reason.startswith("cannot identify image file"):
        reason = f"not an image file ({', '.join(sorted(ALLOWED_FORMATS - {'MPO'}))} expected)"
    return reason


# --------------------------------------------------------------------------- limits and budgets


class Busy(Exception):
    """A budget could not be had in time (or the line was full): the answer is 503."""


class Budget:
    """An amount shared by every request of the process (pixels in decoding, upload bytes held).

    ``acquire(n)`` takes ``n`` at once when it fits and nobody is waiting (first come, first
    served: a large image is not overtaken forever by small ones); otherwise it waits in line, at
    most ``wait_s`` and behind at most ``max_waiting`` others, else raises :class:`Busy`.
    Event-loop side only: a worker thread gives back through ``loop.call_soon_threadsafe``.
    """

    def __init__(self, capacity: int, *, wait_s: float, max_waiting: int):
        self.capacity = capacity
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.used = 0
        self.peak = 0
        self._line: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    async def acquire(self, n: int) -> None:
        if n > self.capacity:  # the settings check makes this impossible; never wait for it
            raise ValueError(f"{n} is more than the whole budget of {self.capacity}")
        if not self._line and self.used + n <= self.capacity:
            self._take(n)
            return
        if len(self._line) >= self.max_waiting:
            raise Busy
        entry = (n, asyncio.get_running_loop().create_future())
        self._line.append(entry)
        try:
            await asyncio.wait_for(entry[1], self.wait_s)
        except BaseException as e:  # the wait ran out, or the request was cancelled
            if entry[1].done() and not entry[1].cancelled():
                self.release(n)  # granted just as it gave up
            else:
                with contextlib.suppress(ValueError):
                    self._line.remove(entry)
                self._grant()  # the head of the line may have changed
            if isinstance(e, TimeoutError):
                raise Busy from None
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._line and self.used + self._line[0][0] <= self.capacity:
            n, fut = self._line.popleft()
            if not fut.done():
                self._take(n)
                fut.set_result(None)


@dataclass(frozen=True)
class Limits:
    """The settings' limits made concrete for a bundle, checked: one that could never serve an
    upload is one error line at startup."""

    cap: int  # pixels per image
    pixel_budget: int  # pixels in decoding at once, all requests
    upload_budget: int  # upload bytes held in memory at once, all requests
    workers: int  # decode threads

    @classmethod
    def of(cls, settings: WebSettings, predictor: Predictor) -> Limits:
        where = str(Path(predictor.bundle.root) / "bundle.json")
        cap = pixel_cap(predictor.bundle.meta.get("params"), settings.max_pixels, where)
        if settings.max_files < 1:
            raise StageError(f"--max-files must be at least 1, got {settings.max_files}")
        numbers = ("max_file_mb", "pixel_budget_mp", "upload_budget_mb", "budget_wait_s", "upload_stall_s",
                   "upload_deadline_s")  # fmt: skip
        for name in numbers:
            value = getattr(settings, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise StageError(f"--{name.replace('_', '-')} must be a number above 0, got {value:g}")
        pixels = int(settings.pixel_budget_mp * 1e6) if settings.pixel_budget_mp is not None else 2 * cap
        if pixels < cap:
            raise StageError(
                f"--pixel-budget-mp {pixels / 1e6:g} is below the pixel cap of {cap / 1e6:g} MP: "
                "an image at the cap could never be decoded"
            )
        full = settings.max_request_bytes
        upload = int(settings.upload_budget_mb * MB) if settings.upload_budget_mb is not None else 2 * full
        if upload < full:
            raise StageError(
                f"--upload-budget-mb {upload / MB:g} is below one full upload ({full / MB:.3g} MB: "
                f"--max-files {settings.max_files} x --max-file-mb {settings.max_file_mb:g})"
            )
        if settings.decode_workers < 0:
            raise StageError(
                f"--decode-workers must be 0 (one per core) or more, got {settings.decode_workers}"
            )
        return cls(cap, pixels, upload, n_workers(settings.decode_workers))


@dataclass
class Runtime:
    """What a serving process shares between requests, made at startup."""

    limits: Limits
    pixels: Budget  # pixels being decoded
    uploads: Budget  # upload bytes held in memory
    decode_pool: ThreadPoolExecutor
    model_pool: ThreadPoolExecutor  # one thread: the predictor runs one model call at a time anyway

    @classmethod
    def start(cls, settings: WebSettings, limits: Limits) -> Runtime:
        kw = {"wait_s": settings.budget_wait_s, "max_waiting": max(0, settings.max_waiting)}
        return cls(
            limits=limits,
            pixels=Budget(limits.pixel_budget, **kw),
            uploads=Budget(limits.upload_budget, **kw),
            decode_pool=ThreadPoolExecutor(limits.workers, thread_name_prefix="decode"),
            model_pool=ThreadPoolExecutor(1, thread_name_prefix="model"),
        )

    def stop(self) -> None:
        # Waits for a decode in progress: its budget is given back before the loop closes.
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        self.model_pool.shutdown(wait=True, cancel_futures=True)

    async def run_held(self, pixels: int, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Reserve ``pixels``, start ``fn(*args)`` on the decode pool, and give them back when that
        job ends (not when its awaiter is cancelled: the thread still holds the memory)."""
        await self.pixels.acquire(pixels)
        loop = asyncio.get_running_loop()
        try:
            job = self.decode_pool.submit(fn, *args)
        except BaseException:
            self.pixels.release(pixels)
            raise

        def done(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
                loop.call_soon_threadsafe(self.pixels.release, pixels)

        job.add_done_callback(done)
        return asyncio.wrap_future(job)


def _busy(what: str) -> Refusal:
    return Refusal(
        503,
        f"the server is busy: {what}; nothing was analysed, try again in {RETRY_AFTER_S} s",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


# --------------------------------------------------------------------------- reading the form


@dataclass
class FilePart:
    """A file part of the form, held in memory."""

    filename: str
    data: bytearray = field(default_factory=bytearray)


FormFields = dict[str, list[str | FilePart]]


def _text(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")


class _FormReader:
    """python-multipart callbacks that build the form in memory and refuse a part the moment it
    passes its limit (the rest of the body is never read)."""

    def __init__(self, settings: WebSettings, charset: str):
        self.settings = settings
        self.charset = charset
        self.fields: FormFields = {}
        self.complete = False
        self._files = 0
        self._texts = 0
        self._header = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self._name = ""
        self._part: FilePart | bytearray = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, a, b: self._header.extend(d[a:b]),
            "on_header_value": lambda d, a, b: self._value.extend(d[a:b]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""

    def on_header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        s = self.settings
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise Refusal(400, "the upload is not a form this app reads (a part without a field name)")
        self._name = _text(options[b"name"], self.charset)
        if b"filename" in options:
            self._files += 1
            if self._files > s.max_files:
                raise Refusal(
                    400, f"the upload was refused: more than {s.max_files} files (at most {s.max_files})"
                )
            self._part = FilePart(_text(options[b"filename"], self.charset))
        else:
            self._texts += 1
            if self._texts > s.max_fields:
                raise Refusal(
                    400,
                    f"the upload was refused: more than {s.max_fields} form fields "
                    f"({', '.join(META_FIELDS)} once per file, at most {s.max_files} files)",
                )
            self._part = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if isinstance(part, FilePart):
            if len(part.data) + end - start > self.settings.max_file_bytes:
                limit = f"larger than the limit of {self.settings.max_file_mb:g} MB"
                raise Refusal(
                    413,
                    "the upload was stopped at a file over the size limit; nothing was analysed",
                    [(part.filename[:300], limit)],
                )
            part.data.extend(data[start:end])
        else:
            if len(part) + end - start > MAX_FIELD_BYTES:
                raise Refusal(
                    413, f"the form field {self._name[:50]!r} is longer than {MAX_FIELD_BYTES} bytes"
                )
            part.extend(data[start:end])

    def on_part_end(self) -> None:
        part = self._part
        value = part if isinstance(part, FilePart) else _text(bytes(part), self.charset)
        self.fields.setdefault(self._name, []).append(value)
        self._part = bytearray()

    def on_end(self) -> None:
        self.complete = True


async def body_chunks(request: Request, settings: WebSettings) -> AsyncIterator[bytes]:
    """The request body as it arrives; 408 when it stalls or takes too long. Sets
    ``request.state.body_done`` once the last byte is in."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.upload_deadline_s
    while True:
        left = deadline - loop.time()
        try:
            async with asyncio.timeout(min(settings.upload_stall_s, left)):
                message = await request.receive()
        except TimeoutError:
            if left <= settings.upload_stall_s:
                why = f"took longer than {settings.upload_deadline_s:g} s"
            else:
                why = f"stalled: nothing arrived for {settings.upload_stall_s:g} s"
            raise Refusal(408, f"the upload {why}; nothing was analysed") from None
        if message["type"] == "http.disconnect":
            raise Refusal(400, "the connection closed before the upload was complete")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body", False):
            request.state.body_done = True
            return


async def read_form(request: Request, settings: WebSettings) -> FormFields:
    """Every field of the multipart form, each in the order sent (files as :class:`FilePart`)."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise Refusal(400, "the upload must be a multipart/form-data form with the images as 'files'")
    reader = _FormReader(settings, _text(params.get(b"charset", b"utf-8"), "latin-1"))
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        async with contextlib.aclosing(body_chunks(request, settings)) as chunks:
            async for chunk in chunks:
                parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise Refusal(400, "the upload is not a well-formed multipart form") from None
    if not reader.complete:
        raise Refusal(400, "the upload ended before its form did (the closing boundary is missing)")
    return reader.fields


def uploads_of(fields: FormFields, settings: WebSettings) -> list[Upload]:
    """The form's ``files`` with the metadata sent for each, or a :class:`Refusal`."""
    parts = [f for f in fields.get("files", []) if isinstance(f, FilePart)]
    # An empty file input sends one nameless part: not a file the user chose.
    chosen = [i for i, f in enumerate(parts) if f.filename or f.data]
    if not chosen:
        raise Refusal(400, "choose one or more image files first")
    # Paired by position among the parts sent, as the form lists them.
    texts = metadata_texts({k: fields.get(k, []) for k in META_FIELDS}, len(parts))
    refused: list[tuple[str, str]] = []
    out: list[Upload] = []
    for i in chosen:
        part = parts[i]
        problem = name_problem(part.filename)
        if problem is not None:
            refused.append((part.filename[:300], problem))
        else:
            out.append(Upload(part.filename, bytes(part.data), texts[i]))
        part.data = bytearray()  # one copy of each file in memory, not two
    if refused:
        raise Refusal(400, f"{len(refused)} of {len(chosen)} file(s) refused; nothing was analysed", refused)
    return out


def content_length(request: Request, settings: WebSettings) -> int:
    """The upload's size from its header: stated (411) and under the total limit (413)."""
    length = request.headers.get("content-length")
    if length is None:
        raise Refusal(411, "the upload must state its size (Content-Length)")
    if not length.isdigit() or int(length) > settings.max_request_bytes:
        raise Refusal(
            413,
            f"the upload is larger than {settings.max_request_bytes / MB:.3g} MB "
            f"({settings.max_files} files of at most {settings.max_file_mb:g} MB)",
        )
    return int(length)


# --------------------------------------------------------------------------- decoding


def header_pixels(data: list[bytes], cap: int) -> list[int | BaseException]:
    """Per upload, its pixel count from the header alone (nothing decoded), or why it is refused."""
    out: list[int | BaseException] = []
    for d in data:
        try:
            with open_checked(io.BytesIO(d), cap) as img:
                out.append(img.width * img.height)
        except Exception as e:  # any reader failure is a fact about this upload
            out.append(e)
    return out


def _decode_one(data: bytes, spec: DecodeSpec) -> Decoded | BaseException:
    try:
        return decode(data, spec)
    except Exception as e:  # any decoder failure is a fact about this upload
        return e


async def decode_uploads(rt: Runtime, uploads: list[Upload], spec: DecodeSpec) -> list[Decoded]:
    """Decode every upload within the pixel budget, or raise one :class:`Refusal` naming each file
    refused (when some are refused from their header, the others are not decoded)."""
    loop = asyncio.get_running_loop()
    sizes = await loop.run_in_executor(
        rt.decode_pool, header_pixels, [u.data for u in uploads], spec.max_pixels
    )
    results: list[Decoded | BaseException | None] = [
        s if isinstance(s, BaseException) else None for s in sizes
    ]
    if not any(results):
        jobs: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            for i, (u, px) in enumerate(zip(uploads, sizes, strict=True)):
                assert isinstance(px, int)
                jobs.append((i, await rt.run_held(px, _decode_one, u.data, spec)))
        except Busy:
            raise _busy(
                f"the images it is decoding already fill its memory budget ({rt.pixels.capacity / 1e6:g} MP)"
            ) from None
        finally:  # the jobs started run to their end either way
            done = await asyncio.gather(*(job for _, job in jobs))
            for (i, _), result in zip(jobs, done, strict=True):
                results[i] = result
    refused = [(u.name, r) for u, r in zip(uploads, results, strict=True) if isinstance(r, BaseException)]
    if refused:
        raise Refusal(
            _status_for(refused[0][1]),
            f"{len(refused)} of {len(uploads)} file(s) refused; nothing was analysed",
            [(name, _reason(e)) for name, e in refused],
        )
    return [r for r in results if isinstance(r, Decoded)]


# --------------------------------------------------------------------------- metadata and answers


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
        "risk_class": pred.risk_class,
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


# --------------------------------------------------------------------------- security headers


def _inline_hashes(tag: str) -> list[str]:
    """CSP hash sources of every inline ``<tag>`` block of the templates. A block with template
    syntax in it would render to other bytes than its hash: refused here, at startup."""
    out = []
    for path in sorted(TEMPLATES.glob("*.html")):
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", path.read_text(encoding="utf-8"), re.S):
            if any(mark in body for mark in ("{{", "{%", "{#")):
                raise RuntimeError(f"{path.name}: an inline <{tag}> holds template syntax; CSP cannot pin it")
            digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
            out.append(f"'sha256-{digest}'")
    return out


def security_headers() -> dict[str, str]:
    """Headers on every response. The CSP allows the templates' own inline script and style block
    by hash, nothing else; ``style=`` attributes (the top-3 bar widths) need 'unsafe-inline' in
    ``style-src``, which a browser reading ``style-src-elem`` applies to attributes only; images
    from the app itself (plots) and ``data:`` (the Grad-CAM overlays)."""
    scripts = " ".join(_inline_hashes("script")) or "'none'"
    styles = " ".join(_inline_hashes("style")) or "'none'"
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; style-src-elem {styles}; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


class SecurityHeaders:
    """ASGI middleware adding :func:`security_headers` to every HTTP response (a header the app
    set itself is kept)."""

    def __init__(self, app: Any, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _App(FastAPI):
    def build_middleware_stack(self) -> Any:
        # Outside Starlette's error handler, so a 500 carries the headers too.
        return SecurityHeaders(super().build_middleware_stack(), security_headers())


# --------------------------------------------------------------------------- the app


def load_predictor(settings: WebSettings) -> Predictor:
    """The bundle checked (bundle.json's values, the pixel cap), then loaded with the web's cap."""
    from skinlesion.model.bundle import read_bundle_json

    meta = read_bundle_json(settings.bundle)
    cap = pixel_cap(meta.get("params"), settings.max_pixels, str(Path(settings.bundle) / "bundle.json"))
    return Predictor.load(settings.bundle, max_pixels=cap)


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
                raise _busy(
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
        return page(request, "index.html", results=[_result_view(a) for a in answers])

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
                row["gradcam_png_base64"] = base64.b64encode(_png(x.overlay)).decode("ascii")
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
