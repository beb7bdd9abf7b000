"""Per-image features for drift checks, and the streaming table builder that adds the model's view.

What a clinic changes when it changes device, lighting or workflow shows up in a few numbers per
image: its size and compression, its brightness, contrast and colour (RGB and CIE Lab), its
saturation, its sharpness (variance of the Laplacian) and how much of its corners the
dermatoscope's dark ring covers. :func:`image_features` computes them from one decode through
the project's decode path (:mod:`skinlesion.core.images`: header pixel cap, JPEG draft mode) and, from the
same decoded image, the square model input. :func:`build_table` streams a list of files through
a process pool (all cores, a bounded window, a progress bar: memory is flat in the number of
images but for the per-image rows and embeddings) and runs the model bundle on the pixels as
they arrive, adding the bundle's embedding, predicted class and calibrated confidence.
:func:`list_batch` lists a folder of new images for it, naming every entry it cannot use.

Photometric features are measured on a "stats view" whose long side is ``stats_size`` pixels,
so a 600x450 original and a 200x150 copy of the same photograph give nearly the same
brightness, colour and sharpness: only the size features (width, height, file size) tell them
apart, which is what a drift report should say about them.

No TensorFlow here: worker processes import this module. The bundle object is passed in.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from skinlesion.core.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    decode_rgb,
    draft_request,
    list_images,
    open_checked,
    to_square,
)
from skinlesion.core.parallel import in_order

log = logging.getLogger(__name__)

# Numerical features of the file and its pixels, in report order.
IMAGE_FEATURES: tuple[str, ...] = (
    "width", "height", "aspect", "file_kb", "jpeg_quality",
    "brightness", "contrast", "red_mean", "green_mean", "blue_mean", "red_std", "green_std", "blue_std",
    "lab_l", "lab_a", "lab_b", "saturation", "sharpness", "dark_corners",
)  # fmt: skip
# The bundle's view of the image (the embedding's PCA components are added by the drift stage).
MODEL_FEATURES: tuple[str, ...] = ("confidence", "malignant_prob")
PRED_CLASS = "pred_class"
EMBEDDING_PREFIX = "emb_"
CHUNK_IMAGES = 16
# libjpeg's standard luminance quantisation table (quality 50), in natural order, the order
# Pillow's ``quantization`` gives.
_STD_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
# Luma below this (0-255) counts as the dermatoscope's dark ring / vignette in the corners.
DARK_LUMA = 50.0


class EmbeddingSource(Protocol):
    """What :func:`build_table` needs of a model bundle (``skinlesion.model.bundle.Bundle`` is one):
    embeddings and calibrated probabilities of model inputs, and the bundle's reading of them."""

    classes: Sequence[str]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def malignant_score(self, probs: np.ndarray) -> np.ndarray: ...

    def decide(self, probs: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------- pure core


def jpeg_quality(img: Image.Image) -> float:
    """libjpeg quality (1-100) estimated from the luminance quantisation table; 100 if lossless."""
    tables = getattr(img, "quantization", None)
    if img.format != "JPEG" or not tables:
        return 100.0
    luma = np.asarray(tables.get(0) or next(iter(tables.values())), dtype=float)
    if luma.size != 64:
        return 100.0
    ratio = luma / np.asarray(_STD_LUMA, dtype=float)
    # Entries clipped at 255 (low qualities) or 1 (very high ones) no longer follow the scale.
    usable = ratio[(luma < 255) & (luma > 1)]
    scale = 100.0 * float(np.median(usable if usable.size else ratio))  # libjpeg's scale, percent
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return float(min(100.0, max(1.0, quality)))


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of float sRGB in [0, 1], shape (..., 3)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], dtype=np.float32
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack(
        [116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1
    )


def pixel_features(pixels: np.ndarray) -> dict[str, float]:
    """Photometric features of an RGB uint8 image ``[H, W, 3]`` (the stats view)."""
    x = pixels.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    lab = _srgb_to_lab(x / 255.0)
    mx, mn = x.max(axis=-1), x.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    # Variance of the 4-neighbour Laplacian: the usual focus measure (a blurred or heavily
    # downscaled-then-upscaled image loses its high frequencies). Reported as log10(1 + var).
    lap = luma[1:-1, :-2] + luma[1:-1, 2:] + luma[:-2, 1:-1] + luma[2:, 1:-1] - 4.0 * luma[1:-1, 1:-1]
    h, w = luma.shape
    yy, xx = np.mgrid[0:h, 0:w]
    # Normalised elliptic radius: 1 on the ellipse inscribed in the frame; > 1 are the corners.
    rr = np.hypot((xx + 0.5 - w / 2) / (w / 2), (yy + 0.5 - h / 2) / (h / 2))
    corners = rr > 1.0
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "red_mean": float(r.mean()),
        "green_mean": float(g.mean()),
        "blue_mean": float(b.mean()),
        "red_std": float(r.std()),
        "green_std": float(g.std()),
        "blue_std": float(b.std()),
        "lab_l": float(lab[..., 0].mean()),
        "lab_a": float(lab[..., 1].mean()),
        "lab_b": float(lab[..., 2].mean()),
        "saturation": float(sat.mean()),
        # log10: the Laplacian's variance spans orders of magnitude between a smooth lesion and
        # one with hairs; on a log scale a blur is a shift, not a change in the tail.
        "sharpness": float(np.log10(1.0 + lap.var())) if lap.size else 0.0,
        "dark_corners": float((luma[corners] < DARK_LUMA).mean()) if corners.any() else 0.0,
    }


@dataclass(frozen=True)
class FeatureSpec:
    """How images are decoded for features: stored with the reference so checks match it."""

    image_size: int  # the bundle's square model input
    aspect: str  # crop | pad, as the bundle was prepared
    stats_size: int = 128  # long side of the view the photometric features are measured on
    draft_gap: float = 2.0
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_features(path: str | Path, spec: FeatureSpec) -> tuple[dict[str, float], np.ndarray]:
    """Features of one image file and its model input (uint8 ``[S, S, 3]``), from one decode.

    Raises :class:`skinlesion.core.images.ImageRejected` or a decoder error for a bad file.
    """
    path = Path(path)
    size_kb = os.stat(path).st_size / 1024.0
    with open_checked(path, spec.max_pixels) as img:
        w, h = img.size
        quality = jpeg_quality(img)
        a = draft_request(w, h, spec.image_size, spec.aspect, spec.draft_gap)
        b = draft_request(w, h, spec.stats_size, "pad", spec.draft_gap)
        rgb = decode_rgb(img, (max(a[0], b[0]), max(a[1], b[1])))
        model_in = np.asarray(to_square(rgb, spec.image_size, spec.aspect), dtype=np.uint8)
        scale = spec.stats_size / max(rgb.size)
        view_size = (max(3, round(rgb.width * scale)), max(3, round(rgb.height * scale)))
        view = np.asarray(rgb.resize(view_size, Image.Resampling.BICUBIC), dtype=np.uint8)
    feats = {
        "width": float(w),
        "height": float(h),
        "aspect": float(w) / float(h),
        "file_kb": size_kb,
        "jpeg_quality": quality,
        **pixel_features(view),
    }
    return feats, model_in


def features_chunk(
    items: list[tuple[str, str]], spec: FeatureSpec
) -> list[tuple[str, dict[str, float] | None, np.ndarray | None, str | None]]:
    """Worker: ``(name, features, model input, None)`` per good file, ``(name, None, None, why)``
    per bad one. Never raises for a bad file: a drift check lists it and goes on."""
    out: list[tuple[str, dict[str, float] | None, np.ndarray | None, str | None]] = []
    for name, path in items:
        try:
            feats, pixels = image_features(path, spec)
        except FileNotFoundError:
            out.append((name, None, None, "file not found"))
        except Exception as e:  # any decoder failure is a fact about this file
            text = str(e) or type(e).__name__
            if text == "Truncated File Read" or "truncated" in text.lower():
                text = f"truncated image file ({text})"
            out.append((name, None, None, text))
        else:
            out.append((name, feats, pixels, None))
    return out


# --------------------------------------------------------------------------- the batch folder


def _why_unusable(path: Path) -> str | None:
    """Why an entry :func:`list_images` left out is worth a row, or None when it is not.

    A symbolic link that loops is named whatever its name; one that leads nowhere, or a
    non-file, only when it is named like an image.
    """
    image_name = path.suffix.lower() in IMAGE_SUFFIXES
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links): no file to read"
        if not image_name:
            return None
        if e.errno == errno.ENOENT and path.is_symlink():
            return f"symbolic link to a missing file ({os.readlink(path)})"
        return f"cannot read ({e.strerror or e})"
    return "not a regular file" if image_name and not path.is_file() else None


def list_batch(folder: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """A batch folder's image files (:func:`skinlesion.core.images.list_images`) and what it cannot use.

    The second list names, relative to ``folder``, every entry left out that a user may have
    meant as an image, with why: a symbolic link that loops, or (named like an image) leads
    nowhere or to no regular file; a symbolic link to a folder (not searched: the listing, like
    the monitor's batch fingerprint, follows links to files only, and a linked folder may lead
    back into the batch); a folder that cannot be read. Hidden entries are skipped, as
    :func:`list_images` skips them.
    """
    folder = Path(folder)
    files = list_images(folder)
    listed = set(files)
    problems: list[tuple[str, str]] = []
    home = folder.resolve()

    def rel(path: Path) -> str:
        return path.relative_to(folder).as_posix()

    def on_error(e: OSError) -> None:
        if e.filename and Path(e.filename) != folder:
            problems.append((rel(Path(e.filename)), f"folder not searched ({e.strerror or e})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for d in dirnames:
            if (here / d).is_symlink():
                target = (here / d).resolve()
                back = target.is_relative_to(home) or target in home.parents
                where = "it leads back into the batch" if back else "link or copy the files themselves"
                problems.append((rel(here / d), f"symbolic link to a folder: not searched ({where})"))
        for name in filenames:
            path = here / name
            if name.startswith(".") or path in listed:
                continue
            why = _why_unusable(path)
            if why:
                problems.append((rel(path), why))
    return files, sorted(problems)


# --------------------------------------------------------------------------- the table


@dataclass
class ImageTable:
    """Rows of good images (``name`` + features + model columns), their embeddings, bad files."""

    frame: pd.DataFrame
    embeddings: np.ndarray  # (n, d) float32, row-aligned with ``frame``
    unreadable: list[tuple[str, str]]  # (name, reason)

    def with_embeddings(self) -> pd.DataFrame:
        """``frame`` with the raw embedding as columns ``emb_0 ... emb_{d-1}``."""
        cols = [f"{EMBEDDING_PREFIX}{i}" for i in range(self.embeddings.shape[1])]
        emb = pd.DataFrame(self.embeddings, columns=cols, index=self.frame.index)
        return pd.concat([self.frame, emb], axis=1)


def split_embeddings(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Inverse of :meth:`ImageTable.with_embeddings`."""
    cols = [c for c in df.columns if c.startswith(EMBEDDING_PREFIX)]
    cols.sort(key=lambda c: int(c[len(EMBEDDING_PREFIX) :]))
    return df.drop(columns=cols), df[cols].to_numpy(dtype=np.float32)


def _chunks(items: Sequence[tuple[str, str]], n: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
    for i in range(0, len(items), n):
        yield i, (list(items[i : i + n]),)


def build_table(
    items: Sequence[tuple[str, str | Path]],
    spec: FeatureSpec,
    source: EmbeddingSource,
    *,
    workers: int = 1,
    batch_size: int = 128,
    desc: str = "image features",
) -> ImageTable:
    """Features + the bundle's view of every ``(name, path)``, in order; bad files are listed.

    Decoding and features run on ``workers`` processes; the bundle runs here, on batches of
    ``batch_size`` model inputs, as the decoded chunks arrive in order.
    """
    items = [(str(n), str(p)) for n, p in items]
    rows: list[dict[str, Any]] = []
    unreadable: list[tuple[str, str]] = []
    emb_parts: list[np.ndarray] = []
    prob_parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            emb, probs = source.predict(np.stack(pending))
            emb_parts.append(np.asarray(emb, dtype=np.float32))
            prob_parts.append(np.asarray(probs, dtype=np.float64))
            pending.clear()

    chunk = max(1, min(CHUNK_IMAGES, math.ceil(len(items) / max(1, 4 * workers))))
    tasks = ((tag, (args[0], spec)) for tag, args in _chunks(items, chunk))
    with tqdm(total=len(items), unit="img", desc=desc, mininterval=1.0) as bar:
        for _tag, results in in_order(features_chunk, tasks, workers, window=4 * workers):
            for name, feats, pixels, why in results:
                if feats is None:
                    unreadable.append((name, why or "unreadable"))
                    continue
                rows.append({"name": name, **feats})
                pending.append(pixels)
                if len(pending) >= batch_size:
                    flush()
            bar.update(len(results))
    flush()
    frame = pd.DataFrame(rows, columns=["name", *IMAGE_FEATURES])
    if rows:
        probs = np.concatenate(prob_parts)
        embeddings = np.concatenate(emb_parts)
        classes = list(source.classes)
        frame[PRED_CLASS] = [classes[i] for i in source.decide(probs)]
        frame["confidence"] = probs.max(axis=1)
        frame["malignant_prob"] = source.malignant_score(probs)
    else:
        embeddings = np.zeros((0, 0), dtype=np.float32)
        frame[PRED_CLASS] = pd.Series(dtype=str)
        for c in MODEL_FEATURES:
            frame[c] = pd.Series(dtype=float)
    return ImageTable(frame=frame, embeddings=embeddings, unreadable=unreadable)
