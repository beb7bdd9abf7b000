"""Facts about the image files, for the validate stage's ``images`` suite.

Facts that need a whole file (does it decode to the last byte? what are its header
dimensions?) are computed here, in worker processes; the expectations on them are in
:func:`skinlesion.checks.suites.image_check`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from skinlesion.core.errors import StageError
from skinlesion.core.images import load_checked
from skinlesion.core.parallel import in_order

log = logging.getLogger(__name__)


def inspect_image(path: str | Path, max_pixels: int) -> dict[str, Any]:
    """Facts about one image file. Never raises for a bad file: the problem is a fact too.

    The pixel count is read from the header and the image is only decoded when it is within
    ``max_pixels``, so a 20,000 x 20,000 header allocates nothing. The decode is a full load
    through the project's image gate (:func:`skinlesion.core.images.load_checked`): a truncated JPEG has a
    valid header and only fails there, and one that Pillow would pad with grey is refused.
    """
    facts: dict[str, Any] = {
        "bytes": None,
        "sha256": None,
        "format": None,
        "mode": None,
        "width": None,
        "height": None,
        "error": None,
    }
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        facts["error"] = f"cannot read the file: {e.strerror or e}"
        return facts
    facts["bytes"] = len(data)
    facts["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        return facts  # the empty-file expectation names it; there is nothing to decode
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # Pillow's own bomb check raises inside open(), before the size is known: it is switched off
    # for the header read and max_pixels applied here instead, so the refusal names the real
    # size. LOAD_TRUNCATED_IMAGES must be False or load() pads a truncated file with grey.
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and similar chatter is not a validation result
            with Image.open(io.BytesIO(data)) as img:
                facts.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
                if img.width * img.height <= max_pixels:
                    # the one image gate: also refuses a JPEG Pillow would pad with grey
                    load_checked(img)
    except UnidentifiedImageError:
        facts["error"] = "not an image Pillow can identify"
    except Exception as e:  # any decoder failure is a fact about this file
        text = str(e) or type(e).__name__
        # Pillow's wording when the file ends inside a header segment rather than in the pixels
        facts["error"] = (
            "image file is truncated (inside its header)" if text == "Truncated File Read" else text
        )
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return facts


def inspect_chunk(paths: list[Path], max_pixels: int) -> list[dict[str, Any]]:
    """Worker: :func:`inspect_image` for a chunk of paths."""
    return [inspect_image(p, max_pixels) for p in paths]


def inspect_images(paths: list[Path], max_pixels: int, workers: int, *, progress: bool = True) -> list[dict]:
    """:func:`inspect_image` for every path, in order, over a process pool with a progress bar."""
    if len(paths) < 64:  # starting a pool costs more than it saves
        workers = 1
    # Chunks amortise the inter-process traffic; ~16 per worker keep the bar moving and the load even.
    chunk = max(1, min(256, len(paths) // (16 * workers)))
    tasks = ((i, (paths[i : i + chunk], max_pixels)) for i in range(0, len(paths), chunk))
    facts: list[dict] = []
    with tqdm(
        total=len(paths), unit="img", desc="validate images", mininterval=1.0, disable=not progress
    ) as bar:
        for _, part in in_order(inspect_chunk, tasks, workers, window=4 * workers):
            facts.extend(part)
            bar.update(len(part))
    return facts


def list_image_files(images_dir: Path) -> list[str]:
    """File names in ``images_dir`` (symlinks followed; hidden files and folders skipped)."""
    if not images_dir.is_dir():
        raise StageError(f"{images_dir}: image folder not found")
    names = []
    for entry in os.scandir(images_dir):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            names.append(entry.name)
        else:
            log.warning("%s: not a regular file (a folder or a broken link), ignored", entry.path)
    return sorted(names)
