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
* Incomplete data is refused (:class:`ImageIncomplete`), whatever the caller: Pillow's own
  truncation error (no end marker) stays on, and two JPEG cases it decodes silently are caught.
  A baseline JPEG whose data ends early but still closes with an end marker (or whose header
  promises more rows than the data holds) decodes with every missing 8x8 block at zero, which
  libjpeg(-turbo) turns into exact mid grey (128; 127 in Adobe CMYK): that fill, a tail at the
  bottom, is measured on the decoded (draft-sized) image and refused above ``MAX_FILL_SHARE``.
  A progressive or multi-scan JPEG cut between scans decodes as a blurred approximation
  instead: its scan headers are read (no pixel decoded) and it is refused unless every
  coefficient of every component is sent.
* 16-bit and other high-bit-depth pixels (I;16*, I, F) are scaled to 8 bits by their bit depth,
  not clipped (Pillow's own conversion turns a 16-bit grey image almost all white).

No TensorFlow here: worker processes import this module.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

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
# What the download stage takes from a source folder: HAM10000 ships JPEGs, and data/raw stores each
# as ``images/<image_id>.jpg`` with its bytes unchanged (no re-encoding), so any other format would
# land under a .jpg name. Drift checks and serving decode every suffix of IMAGE_SUFFIXES.
JPEG_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg")
# Refuse a JPEG when more than this share of its pixels is the decoder's fill (see fill_share). None
# of the 9,371 real HAM10000 images (200x150 and 600x450) has a single fill pixel at its bottom-right
# corner, where any fill would show; what is left to pass is a file that lacks its last few blocks.
MAX_FILL_SHARE = 0.05
# What a JPEG block decodes to when the data for it is missing (libjpeg leaves its coefficients at
# zero): level-shifted mid grey in every channel; Pillow inverts Adobe CMYK, so 127 there.
_JPEG_FILL: dict[str, tuple[int, ...]] = {"L": (128,), "RGB": (128,), "CMYK": (127, 128)}
# Start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames); C2/C6/CA/CE are progressive.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# The next marker after entropy-coded data: FF 00 is a stuffed byte, FF D0-D7 a restart marker,
# and any number of FF fill bytes may precede a marker.
_NEXT_MARKER = re.compile(rb"\xff+([\x01-\xcf\xd8-\xfe])")
_MARKER = re.compile(rb"\xff+([^\x00\xff])")
_EOI, _SOS = 0xD9, 0xDA
_ALL64 = (1 << 64) - 1
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


class ImageRejected(ValueError):
    """An image file that cannot be used; the message says why (size, format, truncation)."""


class ImageIncomplete(ImageRejected):
    """An image whose decoded data is not all in the file: predicting on it would use padding."""


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


def jpeg_scan_gap(fp: Any) -> str | None:
    """Why the scans of the JPEG in ``fp`` do not send all of the image, or None when they do.

    Reads marker segments only (no pixel is decoded): for a baseline file the first scan header
    settles it; a progressive or multi-scan file is searched for its scan headers up to its end
    marker. Every component needs each of its 64 coefficients in a scan with no bits left out
    (successive approximation ``Al == 0``). None also when the structure cannot be followed or
    has no end marker: Pillow's decoder then raises its own error.
    """
    pos = fp.tell()
    try:
        return _scan_gap(fp)
    except (OSError, ValueError, IndexError):
        return None
    finally:
        fp.seek(pos)


def _scan_gap(fp: Any) -> str | None:
    fp.seek(0)
    data = fp.read(1 << 16)  # the headers of a photograph; the rest is read only if needed
    whole = len(data) < 1 << 16

    def have(end: int) -> bool:
        nonlocal data, whole
        if end > len(data) and not whole:
            data, whole = data + fp.read(), True
        return end <= len(data)

    if data[:2] != b"\xff\xd8":
        return None
    progressive = False
    sent: dict[int, int] = {}  # component id -> bit k set once coefficient k is complete
    scans, at, in_scan = 0, 2, False
    while True:
        # Up to the first scan, segments follow each other; after it, entropy-coded data comes first.
        if in_scan:
            have(len(data) + 1)
            m = _NEXT_MARKER.search(data, at)
        else:
            if at + 4 > len(data):
                have(at + 4)
            m = _MARKER.match(data, at)
        if m is None:
            return None  # no end marker: Pillow's decoder reports the truncation itself
        marker, at = m.group(1)[0], m.end()
        if marker == _EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            continue
        n = int.from_bytes(data[at : at + 2], "big")
        if n < 2 or (at + n > len(data) and not have(at + n)):
            return None
        payload, at = data[at + 2 : at + n], at + n
        if marker in _SOF and not sent:
            sent = {payload[6 + 3 * i]: 0 for i in range(payload[5])}
            progressive = marker in _PROGRESSIVE
        elif marker == _SOS:
            if not sent:
                return None
            scans, in_scan = scans + 1, True
            ns = payload[0]
            ids = [payload[1 + 2 * i] for i in range(ns)]
            ss, se, al = payload[1 + 2 * ns], payload[2 + 2 * ns], payload[3 + 2 * ns] & 0x0F
            # Sequential scans send every coefficient; a progressive one sends the band ss..se,
            # and only its last pass (al == 0) completes it.
            band = ((1 << (se + 1)) - (1 << ss)) if progressive else _ALL64
            for c in ids:
                if c in sent and not (progressive and al != 0):
                    sent[c] |= band
            if all(v == _ALL64 for v in sent.values()):
                return None  # all of the image is in the scans (a baseline file stops here)
    if not sent:
        return None
    if progressive:
        return (
            f"progressive JPEG data ends after {scans} scan(s), before all of the image is sent "
            "(the file was cut short): it would decode as a blurred approximation"
        )
    missing = [c for c, v in sent.items() if v != _ALL64]
    return (
        f"JPEG data ends before the scan of colour component(s) {', '.join(map(str, missing))} "
        "(the file was cut short)"
    )


def fill_share(img: Image.Image) -> float:
    """Share of a decoded JPEG's pixels that are the decoder's fill for data the file lacks.

    Missing blocks are a tail in block order: whole rows at the bottom, above them the right
    part of one row of blocks, so every row of the tail ends (right edge) in fill. The rows that
    do, counted up from the bottom, are the tail; its exact-fill pixels are the share (the
    block decoded from the bits before an early end marker, and the chroma interpolated across
    the edge, are not fill and not counted). One pixel read settles an image with no fill.
    Rows are in stored order (before any EXIF rotation).
    """
    values = _JPEG_FILL.get(img.mode)
    w, h = img.size
    if not values or w == 0 or h == 0:
        return 0.0
    corner = img.getpixel((w - 1, h - 1))
    corner = corner if isinstance(corner, tuple) else (corner,)
    if len(set(corner)) != 1 or corner[0] not in values:
        return 0.0
    a = np.asarray(img)
    fill = a == corner[0] if a.ndim == 2 else (a == corner[0]).all(axis=2)
    ends_in_fill = fill[:, -1]
    tail = h if ends_in_fill.all() else int(np.argmin(ends_in_fill[::-1]))
    return float(fill[h - tail :].sum()) / (w * h)


def load_checked(img: Image.Image, draft: tuple[int, int] | None = None) -> None:
    """``img.load()`` (in JPEG draft mode when ``draft`` is given) that refuses incomplete data.

    Raises ``OSError`` for what Pillow itself calls truncated (``LOAD_TRUNCATED_IMAGES`` is forced
    off: it would pad a cut-off file with grey) and :class:`ImageIncomplete` for the JPEG cases
    Pillow decodes silently: scans missing, or missing rows filled with grey.
    """
    jpeg = img.format in ("JPEG", "MPO")
    if jpeg and img.fp is not None:
        gap = jpeg_scan_gap(img.fp)
        if gap:
            raise ImageIncomplete(gap)
    if img.format == "JPEG" and draft is not None:
        img.draft("RGB", draft)
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    if jpeg:
        share = fill_share(img)
        if share > MAX_FILL_SHARE:
            kept = math.floor(100 * (1 - share))
            raise ImageIncomplete(
                f"JPEG data ends after {kept}% of the image (the other {100 - kept}% would be the "
                "decoder's grey padding): the file was cut short, or its header promises more rows "
                "than its data holds"
            )


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or other high-bit-depth one-channel image (I;16*, I, F) as 8-bit L, scaled, not clipped.

    Integers are shifted down by their bit depth (>> 8 for 16 bits: the high byte, as Pillow
    itself reduces 48-bit RGB); the depth is the TIFF's BitsPerSample when it says 9..16, else
    16 bits, or 8 for a 32-bit integer image whose values all fit in 8 bits. Floats are scaled from
    [0, 1], [0, 255] or [0, 65535], whichever holds them. Negative, NaN or wider values are no
    photograph's and are refused.
    """
    a = np.asarray(img)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageRejected(f"{img.mode} image with NaN or infinite pixel values")
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageRejected(
            f"{img.mode} image with pixel values from {lo:g} to {hi:g}: not an 8- or 16-bit image "
            "(save it as 8- or 16-bit PNG or TIFF)"
        )
    # In the image's own dtype: no wider copy of an image that may hold up to max_pixels.
    if a.dtype.kind == "f":
        full = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0
        out = a * np.float32(255.0 / full)
        np.rint(out, out=out)
    else:
        declared = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
        declared = max(declared) if isinstance(declared, tuple) else declared
        if isinstance(declared, int) and 9 <= declared <= 16:
            bits = declared
        elif img.mode == "I" and img.format != "PPM" and hi <= 255:
            bits = 8  # a 32-bit container of 8-bit values (Pillow's PPM reader scales to 16 bits)
        else:
            bits = 16
        out = a >> (bits - 8)
    l8 = Image.fromarray(np.minimum(out, 255).astype(np.uint8))
    l8.info = dict(img.info)  # keeps the EXIF orientation
    return l8


def decode_rgb(img: Image.Image, draft: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image to RGB through :func:`load_checked`, in JPEG draft mode when
    ``draft`` is given; high-bit-depth pixels are scaled to 8 bits (:func:`to_8bit`)."""
    load_checked(img, draft)
    base = to_8bit(img) if img.mode in _HIGH_DEPTH_MODES else img
    # L, CMYK, P, RGBA ... all end up RGB; an RGB image is used as is (no copy).
    rgb = base if base.mode == "RGB" else base.convert("RGB")
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
