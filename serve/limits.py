"""The web app's limits: its settings, the refusal a request gets, and the budgets every request shares.

:class:`WebSettings` (the command line's knobs); :class:`Limits` makes them concrete for a bundle
(the pixel cap: :func:`serve.predictor.bundle_pixel_cap`) and checks them at startup;
:class:`Runtime` holds what a serving process shares between requests: the pixel and upload-byte
:class:`Budget` s and the decode and model thread pools. A request that cannot be served is a
:class:`Refusal` (an HTTP status, a summary line and the files refused); one that cannot get its
share of a budget in time is answered 503 (:func:`busy_refusal`). See :mod:`serve.web`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.predictor import Predictor, bundle_pixel_cap
from skinlesion.core.errors import StageError
from skinlesion.core.parallel import n_workers
from skinlesion.measure.scoring import META_FIELDS

# Multipart framing (boundaries, part headers, the metadata fields) on top of the files themselves.
FORM_OVERHEAD_BYTES = 64 * 1024
# Text fields a form may carry besides the metadata (none today; room for a browser's extras).
SPARE_FIELDS = 8
# A text field holds an age, a sex or a body site: a few bytes. Anything near this is not ours.
# What a 503 tells the client to wait: a worst-case image (40 MP PNG) decodes in ~2 s on one core.
RETRY_AFTER_S = 5
MB = 1024 * 1024


@dataclass(frozen=True)
class WebSettings:
    bundle: Path
    metrics: Path | None = None  # the pipeline's metrics/ folder (evaluation plots)
    max_files: int = 16
    max_file_mb: float = 10.0
    explain: bool = True  # Grad-CAM overlay on every result
    max_pixels: int | None = None  # lowers the bundle's pixel cap (bundle_pixel_cap); never raises it
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
        bundle = predictor.bundle
        cap = bundle_pixel_cap(bundle.root, bundle.meta.get("params"), settings.max_pixels)
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


def busy_refusal(what: str) -> Refusal:
    """The 503 of a request that could not get its share of a budget in time."""
    return Refusal(
        503,
        f"the server is busy: {what}; nothing was analysed, try again in {RETRY_AFTER_S} s",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
