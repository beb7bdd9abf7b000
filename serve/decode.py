"""Turning a file or an upload into the model's input, with a message for every way it can fail.

The pixels come from :func:`skinlesion.core.images.load_image`, the function ``prepare`` fed training
with, so a served image is resized, cropped or padded exactly as the model saw its training set.
The same function refuses what must not be predicted on (a file cut short, rows the data does not
hold, decoded as grey padding) and scales 16-bit images to 8 bits. What is added here is what a
server needs in front of it: a format allow-list checked from the header (Pillow also opens EPS,
which it hands to Ghostscript: not for untrusted uploads), a larger copy of the same square for
showing the Grad-CAM overlay, and one short line per bad file instead of an exception.

No TensorFlow here: worker processes of :func:`skinlesion.core.parallel.in_order` import this module.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.images import DEFAULT_MAX_PIXELS, ImageRejected, load_image, open_checked

# Pillow format names. MPO is what Pillow calls the JPEG files many cameras write (a JPEG with
# extra preview frames); it decodes as its first frame.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP"})

Source = str | Path | bytes


@dataclass(frozen=True)
class DecodeSpec:
    """How a bundle wants its images (from ``bundle.json``) and the size of the display copy."""

    image_size: int
    aspect: str = "crop"
    draft_gap: float = 2.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    display_size: int = 0  # 0: no display copy (no Grad-CAM overlay wanted)


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 [S, S, 3]: the model input
    display: np.ndarray | None  # uint8 [D, D, 3]: the same square, larger, for the overlay


def _opener(source: Source) -> Any:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def decode(source: Source, spec: DecodeSpec) -> Decoded:
    """The model input (and display copy) of a file path or the bytes of an upload.

    Raises :class:`~skinlesion.core.images.ImageRejected` (its subclass ``ImageIncomplete`` for data that is
    not all there), ``OSError`` (missing, truncated) or another decoder error;
    :func:`describe_error` turns any of them into a line for the user.
    """
    with open_checked(_opener(source), spec.max_pixels) as img:  # header only: nothing decoded yet
        fmt = img.format
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(
            f"{fmt or 'unknown'} files are not accepted; use {', '.join(sorted(ALLOWED_FORMATS - {'MPO'}))}"
        )
    pixels = load_image(_opener(source), spec.image_size, spec.aspect, spec.draft_gap, spec.max_pixels)
    display = None
    if spec.display_size:
        display = load_image(_opener(source), spec.display_size, spec.aspect, spec.draft_gap, spec.max_pixels)
    return Decoded(pixels, display)


def describe_error(e: BaseException) -> str:
    """One line a user can act on, for anything :func:`decode` raised."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(e, PermissionError):
        return "permission denied"
    # One line whatever the decoder said: a CSV cell, a log line and a web list item each hold one.
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ImageRejected):
        return text
    if text == "Truncated File Read" or "truncated" in text.lower():
        # LOAD_TRUNCATED_IMAGES is off on purpose: a cut-off JPEG padded with grey is not the lesion.
        return f"truncated or damaged image file ({text})"
    return f"cannot decode image ({type(e).__name__}: {text})"


def decode_chunk(
    items: list[tuple[int, str, str | None]], spec: DecodeSpec
) -> list[tuple[int, Decoded | None, str | None]]:
    """Worker: ``(tag, decoded, None)`` per good file, ``(tag, None, reason)`` per bad one.

    An item is ``(tag, path, reason)``; a reason already known (a folder without images) is
    passed through in its place. Never raises for a bad file: one must not stop the batch.
    """
    out: list[tuple[int, Decoded | None, str | None]] = []
    for tag, path, known in items:
        if known is not None:
            out.append((tag, None, known))
            continue
        try:
            out.append((tag, decode(path, spec), None))
        except Exception as e:  # any decoder failure is a fact about this file
            out.append((tag, None, describe_error(e)))
    return out
