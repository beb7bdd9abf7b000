"""The one image gate (skinlesion/core/images.py): incomplete data is refused, high bit depths are scaled.

Every crafted file is made here at test time (Pillow, numpy, bytes). Each refusal is checked
through the callers that decode through the gate: ``load_image`` (prepare), ``serve.decode``
(the prediction CLI's worker and the web app, which pass a path or the upload's bytes) and
``skinlesion.measure.imagefeatures`` (drift), with the one line a user sees.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from serve.decode import DecodeSpec, decode, decode_chunk, describe_error
from skinlesion.core.images import (
    MAX_FILL_SHARE,
    ImageIncomplete,
    ImageRejected,
    draft_request,
    fill_share,
    jpeg_scan_gap,
    load_checked,
    load_image,
    to_square,
)
from skinlesion.measure.imagefeatures import FeatureSpec, features_chunk

FILL = re.compile(
    r"^JPEG data ends after (\d+)% of the image \(the other (\d+)% would be the decoder's grey padding\): "
    r"the file was cut short, or its header promises more rows than its data holds$"
)
SCANS = re.compile(
    r"^progressive JPEG data ends after (\d+) scan\(s\), before all of the image is sent "
    r"\(the file was cut short\): it would decode as a blurred approximation$"
)
EOI = b"\xff\xd9"


# --------------------------------------------------------------------------- files made here


def photo(w: int = 400, h: int = 300, seed: int = 0) -> Image.Image:
    """Photo-like RGB content: smooth detail coarser than a pixel (JPEG sizes like a real photo's)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 10, 2), max(w // 10, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def cut_with_end_marker(data: bytes, keep: float) -> bytes:
    """The first ``keep`` of a JPEG, closed with an end-of-image marker as if it were whole."""
    return data[: int(len(data) * keep)] + EOI


def segments(data: bytes) -> list[tuple[int, int]]:
    """(marker, offset) of each header segment up to the first scan, by walking their lengths."""
    out, at = [], 2
    while at < len(data):
        marker = data[at + 1]
        out.append((marker, at))
        if marker == 0xDA:
            break
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return out


def with_height(data: bytes, rows: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) promising ``rows`` rows; the data is unchanged."""
    at = next(off for marker, off in segments(data) if marker in (0xC0, 0xC1, 0xC2))
    out = bytearray(data)
    out[at + 5 : at + 7] = rows.to_bytes(2, "big")
    return bytes(out)


def sos_offsets(data: bytes) -> list[int]:
    """Offsets of the scan headers of a JPEG written here (FF DA never occurs in scan data)."""
    return [m.start() for m in re.finditer(b"\xff\xda", data)]


def png_16bit(arr: np.ndarray) -> bytes:
    """A PNG written byte by byte: 16-bit grey (2-D) or 48-bit RGB (H, W, 3) from uint16 values."""
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def tiff_raw(w: int, h: int, bits: int, spp: int, raw: bytes) -> bytes:
    """An uncompressed little-endian TIFF written byte by byte (one strip), for depths Pillow
    cannot write itself: 48-bit RGB, 12-bit grey."""
    n = 10
    bits_at = 8 + 2 + 12 * n + 4
    data_at = bits_at + 2 * spp
    entries = [
        (256, 3, 1, w),
        (257, 3, 1, h),
        (258, 3, spp, bits if spp == 1 else bits_at),
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2 if spp == 3 else 1),  # RGB | BlackIsZero
        (273, 4, 1, data_at),
        (277, 3, 1, spp),
        (278, 3, 1, h),
        (279, 4, 1, len(raw)),
        (284, 3, 1, 1),  # chunky
    ]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n)
    for tag, kind, count, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<" + "H" * spp, *([bits] * spp)) + raw


# --------------------------------------------------------------------------- the callers


def every_caller(path: Path) -> dict[str, str]:
    """The one line each caller of the gate reports for ``path`` ('' where it decoded)."""
    out: dict[str, str] = {}
    spec = DecodeSpec(image_size=32, aspect="crop", display_size=96)
    for name, call in {
        "prepare (draft)": lambda: load_image(path, 32, "crop"),
        "prepare (full size)": lambda: load_image(path, 4096, "pad"),
        "web (upload bytes)": lambda: decode(path.read_bytes(), spec),
    }.items():
        try:
            call()
            out[name] = ""
        except Exception as e:  # what the caller hands to describe_error
            out[name] = describe_error(e)
    (_, decoded, reason) = decode_chunk([(0, str(path), None)], spec)[0]
    out["predict CLI"] = "" if decoded is not None else reason
    drift_spec = FeatureSpec(image_size=32, aspect="crop")
    (_, feats, _, why) = features_chunk([(path.name, str(path))], drift_spec)[0]
    out["drift"] = "" if feats is not None else why
    return out


def assert_refused_everywhere(path: Path, pattern: re.Pattern) -> list[re.Match]:
    lines = every_caller(path)
    matches = []
    for caller, line in lines.items():
        assert "\n" not in line
        m = pattern.match(line)
        assert m, f"{caller}: {line!r}"
        matches.append(m)
    return matches


# --------------------------------------------------------------------------- incomplete JPEG data


@pytest.mark.parametrize("keep", [0.1, 0.35, 0.6, 0.85])
def test_jpeg_cut_short_but_closed_with_an_end_marker_is_refused_by_every_caller(tmp_path, keep):
    # Pillow decodes this silently: every block after the cut comes out mid grey.
    data = jpeg_bytes(photo())
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut_with_end_marker(data, keep))
    with Image.open(path) as img:
        img.load()  # Pillow alone: no error at all
        assert fill_share(img) > MAX_FILL_SHARE
    for m in assert_refused_everywhere(path, FILL):
        kept, padded = int(m.group(1)), int(m.group(2))
        assert kept + padded == 100 and kept < 95


@pytest.mark.parametrize("factor", [2, 10, 100])
def test_header_promising_more_rows_than_the_data_holds_is_refused(tmp_path, factor):
    data = jpeg_bytes(photo(300, 200))
    path = tmp_path / "tall.jpg"
    path.write_bytes(with_height(data, 200 * factor))
    with Image.open(path) as img:
        assert img.size == (300, 200 * factor)
    for m in assert_refused_everywhere(path, FILL):
        # 200 real rows of 200 * factor (the first block after the data is decoded from the
        # encoder's padding bits, not fill: up to one 16-row block row is not counted)
        assert 100 / factor - 1 <= int(m.group(1)) <= 100 / factor + 100 * 16 / (200 * factor) + 1, m.group(0)


def test_a_few_rows_more_than_the_data_holds_stay_under_the_bound(tmp_path):
    # 300 rows are coded as 19 MCU rows of 16 (304 rows): rows 300..303 are the encoder's own
    # edge replication, real data; 8 more rows of grey fill are under 5% of 312 rows.
    data = jpeg_bytes(photo(400, 300))
    path = tmp_path / "plus12.jpg"
    path.write_bytes(with_height(data, 312))
    with Image.open(path) as img:
        load_checked(img)
        assert 0 < fill_share(img) <= MAX_FILL_SHARE
    assert every_caller(path) == dict.fromkeys(every_caller(path), "")


@pytest.mark.realdata
def test_real_dermoscopy_jpeg_cut_short_or_stretched_is_refused(tmp_path, shared_ham):
    data = (shared_ham / "originals_600x450" / "ISIC_0024306.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(cut_with_end_marker(data, 0.5))
    (tmp_path / "tall.jpg").write_bytes(with_height(data, 900))
    (tmp_path / "huge.jpg").write_bytes(with_height(data, 45000))
    assert_refused_everywhere(tmp_path / "cut.jpg", FILL)
    tall = {int(m.group(1)) for m in assert_refused_everywhere(tmp_path / "tall.jpg", FILL)}
    assert tall <= {50, 51, 52}  # 450 of 900 rows
    huge = {int(m.group(1)) for m in assert_refused_everywhere(tmp_path / "huge.jpg", FILL)}
    assert huge == {1}


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_cut_short_are_refused(tmp_path, mode):
    path = tmp_path / f"{mode}.jpg"
    path.write_bytes(cut_with_end_marker(jpeg_bytes(photo().convert(mode)), 0.5))
    assert_refused_everywhere(path, FILL)


def test_exif_rotated_jpeg_cut_short_is_refused(tmp_path):
    # The fill is at the bottom of the stored rows; the check runs before the EXIF rotation.
    img = photo()
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(cut_with_end_marker(jpeg_bytes(img, exif=exif.tobytes()), 0.5))
    assert_refused_everywhere(path, FILL)


@pytest.mark.parametrize("scans_kept", [1, 3, 6, 8])
def test_progressive_jpeg_cut_between_scans_is_refused(tmp_path, scans_kept):
    # A progressive file cut after its first scans decodes whole but blurred (no grey rows):
    # the scan headers say what is missing.
    data = jpeg_bytes(photo(), progressive=True)
    starts = sos_offsets(data)
    assert len(starts) == 10  # libjpeg's standard progression
    path = tmp_path / "prog.jpg"
    path.write_bytes(cut_with_end_marker(data[: starts[scans_kept] + 100], 1.0))
    with Image.open(path) as img:
        img.load()
        assert fill_share(img) == 0  # no grey: Pillow alone would predict on a blurred image
    for m in assert_refused_everywhere(path, SCANS):
        assert int(m.group(1)) == scans_kept + 1  # the last one cut short


def test_progressive_jpeg_cut_inside_its_first_scan_is_refused(tmp_path):
    data = jpeg_bytes(photo(), progressive=True)
    path = tmp_path / "prog_dc.jpg"
    path.write_bytes(cut_with_end_marker(data[: sos_offsets(data)[1] // 2], 1.0))
    assert_refused_everywhere(path, SCANS)


def test_truncated_file_without_end_marker_keeps_pillows_own_error(tmp_path, monkeypatch):
    path = tmp_path / "no_eoi.jpg"
    path.write_bytes(jpeg_bytes(photo())[:5000])
    # even if some library switched truncated loading on for the whole process
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for caller, line in every_caller(path).items():
        assert line.startswith("truncated") and "image file is truncated" in line, (caller, line)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after each decode


def test_complete_jpegs_of_every_kind_pass(tmp_path):
    img = photo(333, 251)  # edges not on a block boundary
    exif = img.getexif()
    exif[0x0112] = 3
    files = {
        "baseline.jpg": jpeg_bytes(img),
        "progressive.jpg": jpeg_bytes(img, progressive=True),
        "grey.jpg": jpeg_bytes(img.convert("L")),
        "grey_progressive.jpg": jpeg_bytes(img.convert("L"), progressive=True),
        "cmyk.jpg": jpeg_bytes(img.convert("CMYK")),
        "restart_markers.jpg": jpeg_bytes(img, restart_marker_blocks=3),
        "exif_icc_comment.jpg": jpeg_bytes(img, exif=exif.tobytes(), icc_profile=b"\0" * 70000, comment=b"x"),
        "subsampling_444.jpg": jpeg_bytes(img, subsampling=0),
        "tiny.jpg": jpeg_bytes(photo(3, 2)),
    }
    mpo = io.BytesIO()
    img.save(mpo, "MPO", save_all=True, append_images=[img.rotate(90)])
    files["camera.jpg"] = mpo.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert jpeg_scan_gap(io.BytesIO(data)) is None, name
        assert every_caller(tmp_path / name) == dict.fromkeys(every_caller(tmp_path / name), ""), name


def test_a_grey_image_is_refused_with_the_padding_reason(tmp_path):
    # Exact mid grey in every bottom row is what the decoder writes for missing data; no
    # photograph has it (see the real-data checks below), so a flat grey picture is refused too.
    path = tmp_path / "grey.jpg"
    path.write_bytes(jpeg_bytes(Image.new("RGB", (64, 48), (128, 128, 128))))
    with pytest.raises(ImageIncomplete, match="ends after 0% of the image"):
        load_image(path, 32, "crop")


def test_incomplete_is_a_refusal():
    assert issubclass(ImageIncomplete, ImageRejected)


# --------------------------------------------------------------------------- no false positive


def _sweep(paths: list[Path]) -> tuple[list[str], float]:
    """Refusals and the largest fill share over real files, on the draft path and a full decode."""
    refused, worst = [], 0.0
    for p in paths:
        try:
            load_image(p, 64, "crop")
        except Exception as e:  # a refusal of a real image is the failure reported
            refused.append(f"{p.name}: {describe_error(e)}")
            continue
        with Image.open(p) as img:
            load_checked(img)
            worst = max(worst, fill_share(img))
        with Image.open(p) as img:
            load_checked(img, draft_request(img.width, img.height, 64, "crop", 2.0))
            worst = max(worst, fill_share(img))
    return refused, worst


@pytest.mark.realdata
def test_no_real_image_is_refused_sample(shared_ham):
    paths = sorted((shared_ham / "images_200x150").glob("*.jpg"))[::31][:300]
    paths += sorted((shared_ham / "originals_600x450").glob("*.jpg"))[::6]
    refused, worst = _sweep(paths)
    assert refused == [] and worst == 0.0, (refused, worst)


@pytest.mark.slow
@pytest.mark.realdata
def test_no_real_image_is_refused_all(shared_ham):
    paths = sorted((shared_ham / "images_200x150").glob("*.jpg"))
    paths += sorted((shared_ham / "originals_600x450").glob("*.jpg"))
    assert len(paths) == 9247 + 124
    refused, worst = _sweep(paths)
    assert refused == [] and worst == 0.0, (refused, worst)


# --------------------------------------------------------------------------- high bit depths


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.realdata), "made"])
def source_jpeg(request, tmp_path) -> Path:
    """A HAM10000 JPEG (skipped without the shared data) or a photo-like JPEG made here."""
    if request.param == "real":
        ham = request.getfixturevalue("shared_ham")
        return ham / "images_200x150" / "ISIC_0024306.jpg"
    path = tmp_path / "made.jpg"
    path.write_bytes(jpeg_bytes(photo(200, 150)))
    return path


def _grey_reference(jpeg: Path, size: int) -> np.ndarray:
    with Image.open(jpeg) as img:
        return np.asarray(to_square(img.convert("L").convert("RGB"), size, "crop"))


def _sixteen_bit_grey_files(grey16: np.ndarray, folder: Path) -> dict[str, Path]:
    h, w = grey16.shape
    files = {
        "png_I;16": png_16bit(grey16),
        "pgm_16bit": f"P5 {w} {h} 65535\n".encode() + grey16.astype(">u2").tobytes(),
    }
    for mode, img in {
        "I;16": Image.fromarray(grey16),
        "I;16B": Image.frombytes("I;16B", (w, h), grey16.astype(">u2").tobytes()),
        "I": Image.fromarray(grey16.astype(np.int32)),
        "F": Image.fromarray((grey16 / 65535.0).astype(np.float32)),
    }.items():
        buf = io.BytesIO()
        img.save(buf, "TIFF")
        files[f"tiff_{mode}"] = buf.getvalue()
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name.replace(';', '')}.{name.split('_')[0]}"
        paths[name].write_bytes(data)
    return paths


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, source_jpeg):
    with Image.open(source_jpeg) as img:
        grey8 = np.asarray(img.convert("L"))
    grey16 = grey8.astype(np.uint16) * 257  # the same picture, 16 bits per pixel
    expected = _grey_reference(source_jpeg, 64)
    modes = {}
    paths = _sixteen_bit_grey_files(grey16, tmp_path)
    for name, path in paths.items():
        with Image.open(path) as img:
            modes[name] = img.mode
        got = load_image(path, 64, "crop")
        assert np.abs(got.astype(int) - expected).max() <= 1, name
        if not name.startswith("pgm"):  # the web app's allow-list has no PGM
            served = decode(path.read_bytes(), DecodeSpec(image_size=64)).pixels
            assert np.array_equal(served, got), name
    assert modes == {
        "png_I;16": "I;16",
        "pgm_16bit": "I",
        "tiff_I;16": "I;16",
        "tiff_I;16B": "I;16B",
        "tiff_I": "I",
        "tiff_F": "F",
    }
    # what Pillow's own conversion would have fed the model: almost all white
    with Image.open(paths["png_I;16"]) as img:
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9


def test_48_bit_rgb_png_and_tiff_match_the_8_bit_image(tmp_path, source_jpeg):
    with Image.open(source_jpeg) as img:
        rgb8 = np.asarray(img.convert("RGB"))
        expected = np.asarray(to_square(img.convert("RGB"), 64, "crop"))
    rgb16 = rgb8.astype(np.uint16) * 257
    h, w = rgb8.shape[:2]
    (tmp_path / "rgb48.png").write_bytes(png_16bit(rgb16))
    (tmp_path / "rgb48.tif").write_bytes(tiff_raw(w, h, 16, 3, rgb16.astype("<u2").tobytes()))
    for name in ("rgb48.png", "rgb48.tif"):
        got = load_image(tmp_path / name, 64, "crop")
        assert np.abs(got.astype(int) - expected).max() <= 1, name


def test_12_bit_tiff_is_scaled_by_its_declared_depth(tmp_path, source_jpeg):
    with Image.open(source_jpeg) as img:
        grey8 = np.asarray(img.convert("L"))
    g12 = (grey8.astype(np.uint16) << 4) | (grey8 >> 4)  # 0..4095, the 8-bit picture widened
    flat = g12.reshape(-1)
    a, b = flat[0::2], flat[1::2]  # two 12-bit samples in three bytes
    packed = np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], axis=1).astype(np.uint8)
    path = tmp_path / "grey12.tif"
    path.write_bytes(tiff_raw(grey8.shape[1], grey8.shape[0], 12, 1, packed.tobytes()))
    with Image.open(path) as img:
        assert img.mode == "I;16" and np.asarray(img).max() <= 4095
    got = load_image(path, 64, "crop")
    assert np.abs(got.astype(int) - _grey_reference(source_jpeg, 64)).max() <= 1


@pytest.mark.parametrize(
    ("values", "why"),
    [
        (np.array([[0.0, np.nan], [0.5, 1.0]], np.float32), r"^F image with NaN or infinite pixel values$"),
        (np.array([[-3.0, 0.0], [5.0, 1.0]], np.float32), r"^F image with pixel values from -3 to 5: not"),
        (
            np.array([[0, 70000], [5, 1]], np.int32),
            r"^I image with pixel values from 0 to 70000: not an 8- or",
        ),
    ],
)
def test_high_depth_values_no_photograph_has_are_refused(tmp_path, values, why):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).resize((40, 40), Image.Resampling.NEAREST).save(path)
    with pytest.raises(ImageRejected, match=why):
        load_image(path, 16, "crop")
    (_, decoded, reason) = decode_chunk([(0, str(path), None)], DecodeSpec(image_size=16))[0]
    assert decoded is None and re.match(why, reason)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), [0, 128, 255, 64]),  # [0, 1]
        (np.array([[0.0, 100.0], [255.0, 7.0]], np.float32), [0, 100, 255, 7]),  # [0, 255]
        (np.array([[0, 100], [255, 7]], np.int32), [0, 100, 255, 7]),  # 8-bit values, 32-bit container
    ],
)
def test_float_and_wide_integer_images_are_scaled_by_their_range(tmp_path, values, expected):
    path = tmp_path / "wide.tif"
    Image.fromarray(values).save(path)
    out = load_image(path, 2, "crop", draft_gap=1.0)
    assert out[..., 0].ravel().tolist() == expected and (out == out[..., :1]).all()


# --------------------------------------------------------------------------- one line per file


def test_describe_error_is_one_line():
    assert describe_error(OSError("broken data stream\nwhen reading image file")) == (
        "cannot decode image (OSError: broken data stream when reading image file)"
    )
    assert describe_error(ImageIncomplete("a\n b")) == "a b"
