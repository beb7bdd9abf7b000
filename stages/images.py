"""The one decode path of the project: open an image safely, decode it in JPEG draft mode, resize.

``prepare`` (training shards), ``drift`` (features of new images) and the bundle reference made
by ``calibrate`` all decode through here, so what a model sees at training time is what it sees
when it is checked or used later.

* The pixel count is read from the header and refused above ``max_pixels`` *before* anything
  is decoded: a 20,000 x 20,000 JPEG (a decompression bomb) allocates nothing.
* JPEG draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
  coefficients, so the full-size image is never built; the draft size is chosen so the final
  (antialiased bicubic) resize still shrinks by at least ``draft_gap`` (Pillow's
  ``reducing_gap``: with 2 the result is close to a full-resolution resize).

No TensorFlow here: worker processes import this module.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Mid grey: after the usual [-1, 1] or ImageNet input scaling it is close to 0, so the padding
# carries no signal (black would mimic the dermatoscope's vignette, white a lesion-free skin).
PAD_COLOR: tuple[int, int, int] = (128, 128, 128)
# Draft decode to >= 2x the target, then an antialiased bicubic resize: Pillow's own thumbnail()
# recipe (reducing_gap=2). Lanczos measured ~20% more CPU per thumbnail for no visible gain.
RESAMPLE = Image.Resampling.BICUBIC
# 100 MP: 10x a 12 MP dermatoscope's photograph; larger is a bomb or a scan, not a dermoscopy image.
DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageRejected(ValueError):
    """An image file that cannot be used; the message says why (size, format, truncation)."""


def draft_request(width: int, height: int, size: int, aspect: str, gap: float) -> tuple[int, int]:
    """The smallest decode size that leaves a resampling step of at least ``gap`` to ``size``.

    The square is cut from the short side (crop) or holds the long side (pad); that side must
    stay >= ``gap * size`` after the JPEG decoder's own downscaling.
    """
    ref = min(width, height) if aspect == "crop" else max(width, height)
    want = gap * size
    return (max(1, math.ceil(want * width / ref)), max(1, math.ceil(want * height / ref)))


def to_square(img: Image.Image, size: int, aspect: str) -> Image.Image:
    """Resize an RGB image to ``size`` x ``size``: centre-crop to a square, or pad to one."""
    w, h = img.size
    if aspect == "crop":
        m = min(w, h)
        left, top = (w - m) / 2, (h - m) / 2
        # resize(box=) resamples straight from the centre square (no crop copy, filter support
        # taken from the neighbours); the box stays fractional so the square's centre does not
        # move with the decoder's draft scale.
        return img.resize((size, size), RESAMPLE, box=(left, top, left + m, top + m))
    if aspect == "pad":
        m = max(w, h)
        nw, nh = max(1, round(w * size / m)), max(1, round(h * size / m))
        canvas = Image.new("RGB", (size, size), PAD_COLOR)
        canvas.paste(img.resize((nw, nh), RESAMPLE), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"aspect must be 'crop' or 'pad', got {aspect!r}")


def open_checked(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``Image.open`` that refuses, from the header alone, an image over ``max_pixels``.

    Pillow's own bomb check is replaced by this one so the refusal names the real size; the
    caller closes the returned image (use it in a ``with``).
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF chatter
            img = Image.open(path)
    except Image.UnidentifiedImageError:
        raise ImageRejected("cannot identify image file: not an image Pillow can read") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if img.width * img.height > max_pixels:
        w, h = img.size
        img.close()
        raise ImageRejected(f"{w}x{h} pixels is over the limit of {max_pixels:,} (decompression-bomb guard)")
    return img


def decode_rgb(img: Image.Image, draft: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image to RGB, in JPEG draft mode when ``draft`` is given.

    A truncated file raises (``LOAD_TRUNCATED_IMAGES`` is forced off: padding a cut-off JPEG
    with grey would feed invented pixels to the model).
    """
    if img.format == "JPEG" and draft is not None:
        img.draft("RGB", draft)
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    # L, CMYK, P, RGBA, I;16 ... all end up RGB; an RGB image is used as is (no copy).
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if "exif" in img.info or "XML:com.adobe.xmp" in img.info:  # only then can it be rotated
        rgb = ImageOps.exif_transpose(rgb)
    return rgb


def load_image(
    path: str | Path, size: int, aspect: str, draft_gap: float = 2.0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an image file by content (JPEG, PNG, ...; any mode) into uint8 ``[size, size, 3]``.

    What training sees is what prediction and drift checks feed.
    """
    with open_checked(path, max_pixels) as img:
        rgb = decode_rgb(img, draft_request(img.width, img.height, size, aspect, draft_gap))
        return np.asarray(to_square(rgb, size, aspect), dtype=np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix) anywhere below ``folder``, sorted; hidden files and folders skipped."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            out.append(p)
    return sorted(out)
