"""Reading an upload: the multipart form parsed in memory as it streams in, each part refused the
moment it passes its limit; the file names and the metadata sent with each file checked; the
images decoded within the pixel budget. Every refusal is a :class:`serve.limits.Refusal`.
See :mod:`serve.web` for the limits and the order they are checked in.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from serve.decode import ALLOWED_FORMATS, Decoded, DecodeSpec, decode, describe_error
from serve.limits import MB, Busy, Refusal, Runtime, WebSettings, busy_refusal
from skinlesion.core.errors import StageError
from skinlesion.core.images import ImageIncomplete, ImageRejected, open_checked
from skinlesion.measure.scoring import META_FIELDS, parse_metadata

# A text field holds an age, a sex or a body site: a few bytes. Anything near this is not ours.
MAX_FIELD_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

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
            raise busy_refusal(
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


# --------------------------------------------------------------------------- metadata sent with the files


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
