"""Bad image files: a JPEG whose header claims a huge frame, truncated JPEGs, a PNG bomb."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import make_jpeg


def texture(seed: int = 0, size=(120, 90)) -> Image.Image:
    """Blocky random RGB content of ``size`` = (width, height): detail coarser than a pixel."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, size=(size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.NEAREST)


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG's bytes with its baseline frame header (SOF0) claiming ``width`` x ``height``; the
    scan data is unchanged."""
    out = bytearray(data)
    sof = out.find(b"\xff\xc0")
    assert sof > 0
    out[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    out[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(out)


def huge_header_jpeg(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A small real JPEG whose frame header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(buf, "JPEG", quality=90)
    path.write_bytes(claim_size(buf.getvalue(), width, height))
    return path


def truncated_jpeg(path: Path, seed: int = 1) -> Path:
    """The first half of a :func:`texture` JPEG."""
    buf = io.BytesIO()
    texture(seed).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def make_bomb(path: Path, side: int = 30_000) -> Path:
    """A PNG whose header says ``side`` x ``side`` pixels (900 MP) in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut the file at ``path`` to its first ``keep`` (a JPEG's header intact, its scan data cut off)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_truncated(path: Path, source: Path | None = None, *, seed: int = 0) -> Path:
    """The first 60% of a real JPEG (its header is intact, its scan data cut off): of ``source``,
    else of a 200x150 :func:`make_jpeg` of ``seed``."""
    if source is None:
        full = make_jpeg(path.with_suffix(".full.jpg"), size=(200, 150), seed=seed)
        data = full.read_bytes()
        full.unlink()
    else:
        data = source.read_bytes()
    path.write_bytes(data)
    return truncate(path)
