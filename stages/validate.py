"""Validate stage: the Great Expectations gate between the split and anything that trains.

Real HAM10000 copies carry small damage (blanked rows, home-made classes, long diagnosis names,
truncated JPEGs, grayscale or CMYK files, PNGs renamed ``.jpg``, absurdly large images). A model
trained on such data is confidently wrong, so this stage refuses the data and says exactly why.

How it works: the inputs are turned into a few pandas frames of *facts*, one row per thing a
user can point at (a metadata row, an image file, a split group, a class in a split), and each
frame is checked by a GX 1.x expectation suite. Facts that need a whole file (does it decode to
the last byte? what are its header dimensions?) are computed first, in worker processes; GX then
holds the pass/fail rules and renders them as Data Docs. Three suites are reported:

* ``metadata``: exact column set, unique well-formed ids, known codes, ages, one diagnosis per
  lesion, enough rows per class;
* ``images``: a file for every row and a row for every file, full decode, format, mode,
  dimensions, a pixel limit applied from the header before decoding, byte-identical copies;
* ``split``: split.csv agrees with the metadata, no group / lesion / byte-identical image in two
  splits, every class in every split, fractions within tolerance of ``split.fractions``.

The gate: any failing expectation exits 1 with a short summary naming the first failing rows or
files (rows are line numbers of metadata.csv, header = line 1). The Data Docs and the metrics
are written either way so the failure can be inspected, but ``--out`` is only written on success,
so dvc stops before prepare/train. With ``on_image_error: quarantine`` bad images are listed in
``quarantine.csv`` and left out of the validated split instead, and the run passes only if the
remainder still passes every other expectation (the split suite is checked after the removal).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.images import load_checked
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import in_order, n_workers
from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.core.tables import read_rows, read_table
from skinlesion.params.schema import load_sections
from skinlesion.params.split import FractionsParams, SplitParams
from skinlesion.params.validate import ValidateParams

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DROPPED = "dropped"  # split.csv rows a split option removed from training and evaluation
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "group_id", "dx", "split")
AGE_RANGE = (0, 120)
# Pillow names baseline and progressive JPEGs "JPEG", and camera JPEGs with a second picture
# appended "MPO"; both are JPEG files.
JPEG_FORMATS: tuple[str, ...] = ("JPEG", "MPO")
# Formats Pillow decodes by content whatever the file is called; prepare reads them the same way.
CONVERTIBLE_FORMATS: tuple[str, ...] = ("PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
# Modes whose RGB conversion keeps the picture (grey, palette, alpha dropped, CMYK/YCbCr
# transformed). 16-bit and float modes are not here: Pillow clips them when converting.
CONVERTIBLE_MODES: tuple[str, ...] = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr")
MAX_EXAMPLES = 3  # failing rows/files named per expectation in the summary


# --------------------------------------------------------------------------- checks (pure data)


@dataclass(frozen=True)
class Spec:
    """One expectation, and how the summary talks about the rows that fail it."""

    key: str  # metrics key, unique within its check
    message: str  # what is wrong, e.g. "dx not in the class set"
    kind: str  # GX expectation class, e.g. "ExpectColumnValuesToBeInSet"
    kwargs: dict[str, Any]
    detail: Callable[[pd.Series], str] | None = None  # the failing value, e.g. "dx='healthy'"
    gating: bool = True  # False: reported (a warning in GX), never fails the run
    note: str = ""  # table-level expectations have no failing rows: this says what is wrong
    table_count: int = 0  # ... and this how many things are wrong


@dataclass(frozen=True)
class Check:
    """A frame of facts and the expectations on it: one GX suite, validated once."""

    name: str  # GX suite / validation name
    suite: str  # reported suite: metadata | images | split
    unit: str  # what one frame row is, for the summary ("row", "file", "group")
    frame: pd.DataFrame
    specs: tuple[Spec, ...]
    item: Callable[[Any, pd.Series], str]  # names one row: (index value, row) -> "row 17 ISIC_..."


@dataclass(frozen=True)
class Failure:
    """The rows of one check that failed one expectation."""

    suite: str
    check: str
    key: str
    message: str
    unit: str
    count: int
    index: tuple[Any, ...]  # failing frame index values, in frame order
    examples: tuple[str, ...]
    gating: bool = True

    def line(self) -> str:
        noun = self.unit if self.count == 1 else _plural(self.unit)
        first = "; ".join(self.examples)
        return f"{self.suite}: {self.message}: {self.count} {noun}" + (f", first: {first}" if first else "")


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("s") else "s")


def _in_set(column: str, values: Iterable[Any]) -> dict[str, Any]:
    return {"column": column, "value_set": list(values)}


def _text(v: Any) -> str:
    return "''" if _missing(v) else repr(v)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# --------------------------------------------------------------------------- metadata


def add_metadata_facts(df: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the metadata expectations check (names start with ``_``)."""
    df = df.copy()
    data_cols = [c for c in df.columns if not c.startswith("_")]
    df["_blank"] = df[data_cols].isna().all(axis=1) if data_cols else False
    if "age" in df.columns:
        # "80", "80.0" and "" are all fine; anything else shows up in the age-is-a-number check.
        text = df["age"].map(lambda v: v.strip() if isinstance(v, str) else None)
        df["_age"] = pd.to_numeric(text, errors="coerce").astype(float)
    if "lesion_id" in df.columns and "dx" in df.columns:
        n_dx = df.groupby("lesion_id")["dx"].nunique()
        df["_lesion_dx"] = df["lesion_id"].map(n_dx).astype(float)
    return df


def metadata_checks(df: pd.DataFrame, params: ValidateParams) -> list[Check]:
    """The metadata suite: per-row checks on ``df`` (from :func:`add_metadata_facts`) and per-class counts."""
    cols = set(df.columns)
    derived = [c for c in df.columns if c.startswith("_")]
    header = [c for c in df.columns if not c.startswith("_")]
    missing = [c for c in HAM_COLUMNS if c not in cols]
    extra = [c for c in header if c not in HAM_COLUMNS]
    note = "; ".join(
        part
        for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "")
        if part
    )
    specs: list[Spec] = [
        Spec(
            "columns",
            "columns are not the HAM10000 set",
            "ExpectTableColumnsToMatchSet",
            {"column_set": [*HAM_COLUMNS, *derived], "exact_match": True},
            note=note,
            table_count=len(missing) + len(extra),
        ),
        Spec("blank_rows", "blank row", "ExpectColumnValuesToBeInSet", _in_set("_blank", [False])),
        Spec(
            "field_count",
            "wrong number of fields",
            "ExpectColumnValuesToBeBetween",
            {"column": "_fields", "min_value": len(header), "max_value": len(header)},
            lambda r: f"{r['_fields']} fields, header has {len(header)}",
        ),
    ]
    for col in ("lesion_id", "image_id", "dx", "dx_type"):
        if col in cols:
            specs.append(
                Spec(f"{col}_not_null", f"{col} is empty", "ExpectColumnValuesToNotBeNull", {"column": col})
            )
    if "image_id" in cols:
        specs += [
            Spec(
                "image_id_unique",
                "image_id not unique",
                "ExpectColumnValuesToBeUnique",
                {"column": "image_id"},
            ),
            Spec(
                "image_id_pattern",
                f"image_id does not match {params.image_id_pattern}",
                "ExpectColumnValuesToMatchRegex",
                {"column": "image_id", "regex": params.image_id_pattern},
                lambda r: f"image_id={r['image_id']!r}",
            ),
        ]
    for col, allowed, what in (
        ("dx", params.classes, "the class set"),
        ("dx_type", params.dx_types, "the dx_type set"),
        ("sex", params.sexes, "the sex set"),
        ("localization", params.localizations, "the localization set"),
    ):
        if col in cols:
            specs.append(
                Spec(
                    f"{col}_in_set",
                    f"{col} not in {what}",
                    "ExpectColumnValuesToBeInSet",
                    _in_set(col, allowed),
                    partial(lambda c, r: f"{c}={r[c]!r}", col),
                )
            )
    if "_age" in cols:
        specs += [
            Spec(
                "age_numeric",
                "age is not a number",
                "ExpectColumnValuesToMatchRegex",
                {"column": "age", "regex": r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$"},
                lambda r: f"age={r['age']!r}",
            ),
            Spec(
                "age_range",
                f"age outside [{AGE_RANGE[0]}, {AGE_RANGE[1]}]",
                "ExpectColumnValuesToBeBetween",
                {"column": "_age", "min_value": AGE_RANGE[0], "max_value": AGE_RANGE[1]},
                lambda r: f"age={r['age']!r}",
            ),
        ]
    if "_lesion_dx" in cols:
        dx_sets = df.groupby("lesion_id")["dx"].agg(lambda s: ", ".join(sorted(s.dropna().unique())))
        specs.append(
            Spec(
                "one_dx_per_lesion",
                "lesion with more than one diagnosis",
                "ExpectColumnValuesToBeBetween",
                {"column": "_lesion_dx", "max_value": 1},
                lambda r: f"dx={r['dx']!r}, lesion {r['lesion_id']} has {dx_sets[r['lesion_id']]}",
            )
        )

    def row_item(idx: Any, r: pd.Series) -> str:
        iid = r.get("image_id")
        return f"row {idx}" + ("" if _missing(iid) else f" {iid}")

    counts = df["dx"].value_counts() if "dx" in cols else pd.Series(dtype=int)
    classes = pd.DataFrame(
        {"count": [int(counts.get(c, 0)) for c in params.classes]},
        index=pd.Index(list(params.classes), name="dx"),
    )
    class_spec = Spec(
        "class_count",
        f"class below min_class_count={params.min_class_count}",
        "ExpectColumnValuesToBeBetween",
        {"column": "count", "min_value": params.min_class_count},
        lambda r: f"{r['count']} rows",
    )
    return [
        Check("metadata", "metadata", "row", df, tuple(specs), row_item),
        Check("metadata_classes", "metadata", "class", classes, (class_spec,), lambda i, r: str(i)),
    ]


# --------------------------------------------------------------------------- images


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


def image_frame(meta: pd.DataFrame, files: list[str], facts: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per image: every metadata image_id (expected as ``<image_id>.jpg``) and every file.

    ``facts`` maps file name -> :func:`inspect_image` output. Index: ``file``. ``duplicate_of`` names
    the first image (by file name) with the same bytes.
    """
    first_row: dict[str, Any] = {}
    if "image_id" in meta.columns:
        for row, image_id in meta["image_id"].items():
            if not _missing(image_id) and image_id not in first_row:
                first_row[image_id] = row
    on_disk = set(files)
    records = []
    for image_id, row in first_row.items():
        name = f"{image_id}.jpg"
        records.append(
            {"file": name, "image_id": image_id, "row": row, "has_row": True, "has_file": name in on_disk}
        )
    claimed = {r["file"] for r in records}
    for name in files:
        if name not in claimed:
            records.append(
                {"file": name, "image_id": Path(name).stem, "row": None, "has_row": False, "has_file": True}
            )
    cols = ["bytes", "sha256", "format", "mode", "width", "height", "error"]
    for r in records:
        r.update(facts.get(r["file"], dict.fromkeys(cols)))
    df = pd.DataFrame.from_records(records, columns=["file", "image_id", "row", "has_row", "has_file", *cols])
    df = df.set_index("file")
    for c in ("bytes", "width", "height", "row"):
        df[c] = pd.to_numeric(df[c]).astype(float)
    df["has_row"] = df["has_row"].astype(bool)
    df["has_file"] = df["has_file"].astype(bool)
    df["pixels"] = df["width"] * df["height"]
    df["duplicate_of"] = None
    hashed = df[df["sha256"].notna()].sort_index()
    first = hashed.groupby("sha256")["image_id"].transform("first")
    dup = first[first != hashed["image_id"]]
    df.loc[dup.index, "duplicate_of"] = dup
    df["duplicate_of"] = df["duplicate_of"].astype(object)
    return df


def image_check(df: pd.DataFrame, params: ValidateParams) -> Check:
    """The images suite on :func:`image_frame`'s output."""
    lo, hi = params.min_side, params.max_side
    if params.on_non_jpeg == "reject":
        formats, format_msg = JPEG_FORMATS, "not a JPEG (on_non_jpeg=reject)"
    else:
        formats = JPEG_FORMATS + CONVERTIBLE_FORMATS
        format_msg = f"format not one of {', '.join(formats)}"
    if params.on_non_rgb == "reject":
        modes, mode_msg = ("RGB",), "mode is not RGB (on_non_rgb=reject)"
    else:
        modes, mode_msg = ("RGB", *CONVERTIBLE_MODES), "mode not convertible to RGB"
    specs = (
        Spec(
            "has_file",
            "metadata row without an image file",
            "ExpectColumnValuesToBeInSet",
            _in_set("has_file", [True]),
            lambda r: "no such file in images/",
        ),
        Spec(
            "has_row",
            "image file without a metadata row",
            "ExpectColumnValuesToBeInSet",
            _in_set("has_row", [True]),
        ),
        Spec(
            "not_empty",
            "empty file (0 bytes)",
            "ExpectColumnValuesToBeBetween",
            {"column": "bytes", "min_value": 1},
        ),
        Spec(
            "decodes",
            "does not decode fully",
            "ExpectColumnValuesToBeNull",
            {"column": "error"},
            lambda r: str(r["error"]),
        ),
        Spec(
            "format",
            format_msg,
            "ExpectColumnValuesToBeInSet",
            _in_set("format", formats),
            lambda r: f"format {r['format']}",
        ),
        Spec(
            "mode",
            mode_msg,
            "ExpectColumnValuesToBeInSet",
            _in_set("mode", modes),
            lambda r: f"mode {r['mode']}",
        ),
        Spec(
            "width",
            f"width outside [{lo}, {hi}]",
            "ExpectColumnValuesToBeBetween",
            {"column": "width", "min_value": lo, "max_value": hi},
            lambda r: _size(r),
        ),
        Spec(
            "height",
            f"height outside [{lo}, {hi}]",
            "ExpectColumnValuesToBeBetween",
            {"column": "height", "min_value": lo, "max_value": hi},
            lambda r: _size(r),
        ),
        Spec(
            "pixels",
            f"more than max_pixels={params.max_pixels} pixels (refused before decoding)",
            "ExpectColumnValuesToBeBetween",
            {"column": "pixels", "max_value": params.max_pixels},
            lambda r: f"{_size(r)} = {r['pixels']:.0f} pixels",
        ),
        Spec(
            "not_duplicate",
            "byte-identical copy of another image (reported, not an error)",
            "ExpectColumnValuesToBeNull",
            {"column": "duplicate_of"},
            lambda r: f"same bytes as {r['duplicate_of']}",
            gating=False,
        ),
    )

    def file_item(name: Any, r: pd.Series) -> str:
        return str(name) + ("" if _missing(r["row"]) else f" (row {r['row']:.0f})")

    return Check("images", "images", "file", df, specs, file_item)


def _size(r: pd.Series) -> str:
    return f"{r['width']:.0f}x{r['height']:.0f}"


# --------------------------------------------------------------------------- split


def read_split_table(path: Path) -> pd.DataFrame:
    """split.csv as text (empty fields stay ``""``), with the columns checked."""
    return read_table(path, required=SPLIT_COLUMNS, hint="run the split stage first")


def split_checks(
    split: pd.DataFrame,
    meta: pd.DataFrame,
    images: pd.DataFrame,
    params: ValidateParams,
    fractions: FractionsParams,
    exempt: set[str],
) -> list[Check]:
    """The split suite. ``exempt``: image ids left out of every check (quarantined, or listed
    as undecodable by the split stage: the images suite reports those)."""
    split = split.replace({"": None})
    split = split[~split["image_id"].isin(exempt)].reset_index(drop=True)
    known = {}
    if {"image_id", "dx", "lesion_id"} <= set(meta.columns):
        m = meta.dropna(subset=["image_id"]).drop_duplicates("image_id")
        known = {r.image_id: (r.dx, r.lesion_id) for r in m.itertuples()}
    listed = set(split["image_id"].dropna())
    rows = split.assign(in_split=True)
    rows["in_metadata"] = rows["image_id"].isin(known.keys())
    rows["dx_ok"] = [
        known[i][0] == d if i in known else None for i, d in zip(rows["image_id"], rows["dx"], strict=True)
    ]
    rows["lesion_ok"] = [
        known[i][1] == les if i in known else None
        for i, les in zip(rows["image_id"], rows["lesion_id"], strict=True)
    ]
    absent = [i for i in known if i not in listed and i not in exempt]
    if absent:
        extra = pd.DataFrame({"image_id": absent, "in_split": False})
        rows = pd.concat([rows, extra], ignore_index=True)
    rows = rows.astype({"in_split": bool}).rename_axis("n")
    for c in ("in_metadata", "dx_ok", "lesion_ok"):
        rows[c] = rows[c].astype(object)

    def mismatch(col: str, pos: int) -> Callable[[pd.Series], str]:
        return lambda r: f"{col}={r[col]!r}, metadata has {known[r['image_id']][pos]!r}"

    row_specs = (
        Spec(
            "split_value",
            f"split not one of {[*SPLITS, DROPPED]}",
            "ExpectColumnValuesToBeInSet",
            _in_set("split", [*SPLITS, DROPPED]),
            lambda r: f"split={_text(r['split'])}",
        ),
        Spec(
            "image_id_unique",
            "image_id listed twice in split.csv",
            "ExpectColumnValuesToBeUnique",
            {"column": "image_id"},
        ),
        Spec(
            "in_metadata",
            "split.csv row without a metadata row",
            "ExpectColumnValuesToBeInSet",
            _in_set("in_metadata", [True]),
        ),
        Spec(
            "in_split",
            "metadata image missing from split.csv",
            "ExpectColumnValuesToBeInSet",
            _in_set("in_split", [True]),
        ),
        Spec(
            "dx_matches",
            "split.csv dx differs from metadata",
            "ExpectColumnValuesToBeInSet",
            _in_set("dx_ok", [True]),
            mismatch("dx", 0),
        ),
        Spec(
            "lesion_matches",
            "split.csv lesion_id differs from metadata",
            "ExpectColumnValuesToBeInSet",
            _in_set("lesion_ok", [True]),
            mismatch("lesion_id", 1),
        ),
    )
    checks = [Check("split_rows", "split", "image", rows, row_specs, lambda i, r: str(r["image_id"]))]

    active = split[split["split"].isin(SPLITS)]
    sha = images.dropna(subset=["sha256"]).drop_duplicates("image_id").set_index("image_id")["sha256"]
    for name, unit, key in (
        ("groups", "group", "group_id"),
        ("lesions", "lesion", "lesion_id"),
        ("duplicates", "set", "sha256"),
    ):
        part = active.assign(sha256=active["image_id"].map(sha))
        sets = (
            part.dropna(subset=[key])
            .groupby(key)
            .agg(
                n_splits=("split", "nunique"),
                splits=("split", lambda s: ", ".join(x for x in SPLITS if x in set(s))),
                images=("image_id", lambda s: ", ".join(sorted(s)[:4]) + (" ..." if len(s) > 4 else "")),
                n_images=("image_id", "size"),
            )
        )
        if key == "sha256":  # a "set" of byte-identical images; named by its first image id
            sets = sets[sets["n_images"] > 1]
            sets.index = [s.split(", ")[0] for s in sets["images"]]
        sets = sets.rename_axis(unit)
        what = {"group": "group", "lesion": "lesion", "set": "byte-identical images"}[unit]
        spec = Spec(
            f"{unit}_in_one_split",
            f"{what} in more than one split",
            "ExpectColumnValuesToBeBetween",
            {"column": "n_splits", "max_value": 1},
            lambda r: f"in {r['splits']} ({r['images']})",
        )
        label = (lambda i, r, u=unit: f"{u} {i}") if unit != "set" else (lambda i, r: f"{i}")
        checks.append(Check(f"split_{name}", "split", unit, sets, (spec,), label))

    counts = active.groupby(["split", "dx"]).size()
    classes = pd.DataFrame(
        [{"split": s, "dx": c, "count": int(counts.get((s, c), 0))} for s in SPLITS for c in params.classes]
    )
    classes.index = pd.Index(
        [f"{s}/{c}" for s, c in zip(classes["split"], classes["dx"], strict=True)], name="split_dx"
    )
    class_spec = Spec(
        "class_in_every_split",
        "class missing from a split",
        "ExpectColumnValuesToBeBetween",
        {"column": "count", "min_value": 1},
        lambda r: f"{r['split']} has no {r['dx']} image",
    )
    checks.append(Check("split_classes", "split", "class", classes, (class_spec,), lambda i, r: ""))

    total = len(active)
    targets = {"train": fractions.train, "val": fractions.val, "test": fractions.test}
    n = active["split"].value_counts()
    fr = pd.DataFrame(
        {
            "n_images": [int(n.get(s, 0)) for s in SPLITS],
            "fraction": [n.get(s, 0) / total if total else 0.0 for s in SPLITS],
            "target": [targets[s] for s in SPLITS],
        },
        index=pd.Index(list(SPLITS), name="split"),
    )
    fr["deviation"] = (fr["fraction"] - fr["target"]).abs()
    tol = params.fraction_tolerance
    frac_spec = Spec(
        "fraction",
        f"split fraction off target by more than {tol:g}",
        "ExpectColumnValuesToBeBetween",
        {"column": "deviation", "max_value": tol},
        lambda r: f"{r['fraction']:.3f} of {total} images, target {r['target']:g}",
    )
    checks.append(Check("split_fractions", "split", "split", fr, (frac_spec,), lambda i, r: str(i)))
    return checks


# --------------------------------------------------------------------------- Great Expectations


class GxRunner:
    """One ephemeral GX context for the whole run: importing GX and building contexts is slow."""

    def __init__(self) -> None:
        # Set here, not at import: GX reads it when imported and otherwise phones home.
        os.environ["GX_ANALYTICS_ENABLED"] = "false"
        gx_log = logging.getLogger("great_expectations")
        if gx_log.level == logging.NOTSET:  # its INFO chatter at import would bury our summary
            gx_log.setLevel(logging.WARNING)
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # This module forces its own logger to INFO ("Created temporary directory ..." per context).
        logging.getLogger("great_expectations.data_context.types.base").setLevel(gx_log.level)

        self.gx, self.gxe = gx, gxe
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        # The default site would write into a fresh /tmp folder; ours is added at build time.
        self.context.delete_data_docs_site("local_site")
        self.source = self.context.data_sources.add_pandas("frames")

    def validate(self, check: Check) -> list[Failure]:
        """Run ``check`` as one GX validation; return its failing expectations."""
        gx, gxe = self.gx, self.gxe
        suite = self.context.suites.add(gx.ExpectationSuite(name=check.name))
        for spec in check.specs:
            suite.add_expectation(
                getattr(gxe, spec.kind)(
                    **spec.kwargs,
                    notes=spec.message,
                    meta={"key": spec.key},
                    severity="critical" if spec.gating else "warning",
                )
            )
        batch = self.source.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("all")
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=check.name, data=batch, suite=suite)
        )
        with warnings.catch_warnings():
            # pandas warns when a regex (a user's image_id_pattern) has capture groups: harmless here.
            warnings.filterwarnings("ignore", message="This pattern is interpreted as a regular expression")
            result = vd.run(
                batch_parameters={"dataframe": check.frame}, result_format={"result_format": "COMPLETE"}
            )
        by_key = {spec.key: spec for spec in check.specs}
        failures = []
        for r in result.results:
            if r.success:
                continue
            spec = by_key[r.expectation_config.meta["key"]]
            failures.append(_failure(check, spec, r.result or {}, r.exception_info or {}))
        order = list(by_key)
        return sorted(failures, key=lambda f: order.index(f.key))

    def build_docs(self, site_dir: Path) -> Path:
        """Render every suite and validation result of this run as Data Docs into ``site_dir``."""
        self.context.add_data_docs_site(
            "validation",
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(site_dir.resolve()),  # GX refuses relative paths here
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.context.build_data_docs(site_names=["validation"])
        return site_dir / "index.html"


def _failure(check: Check, spec: Spec, result: dict[str, Any], exc: dict[str, Any]) -> Failure:
    name = check.frame.index.name
    if exc.get("raised_exception"):  # a bug in a check, never a pass
        msg = (exc.get("exception_message") or "").strip().splitlines()
        return Failure(
            check.suite,
            check.name,
            spec.key,
            spec.message,
            check.unit,
            1,
            (),
            (f"GX raised: {msg[-1] if msg else '?'}",),
            spec.gating,
        )
    if "unexpected_index_list" not in result:  # a table-level expectation
        return Failure(
            check.suite,
            check.name,
            spec.key,
            spec.message,
            "column",
            max(spec.table_count, 1),
            (),
            (spec.note,) if spec.note else (),
            spec.gating,
        )
    index = tuple(v[name] if isinstance(v, dict) else v for v in result["unexpected_index_list"])
    examples = []
    for idx in index[:MAX_EXAMPLES]:
        row = check.frame.loc[idx]
        text = " ".join(t for t in (check.item(idx, row), spec.detail(row) if spec.detail else "") if t)
        examples.append(text)
    count = int(result.get("unexpected_count", len(index)))
    return Failure(
        check.suite,
        check.name,
        spec.key,
        spec.message,
        check.unit,
        count,
        index,
        tuple(examples),
        spec.gating,
    )


# --------------------------------------------------------------------------- gate


def quarantine_rows(images: pd.DataFrame, failures: list[Failure], check: Check) -> pd.DataFrame:
    """quarantine.csv rows (image_id, file, reason) for the files that failed gating image checks."""
    reasons: dict[str, list[str]] = {}
    details = {s.key: s.detail for s in check.specs}
    for f in failures:
        if not f.gating:
            continue
        for name in f.index:
            row = images.loc[name]
            detail = details[f.key](row) if details[f.key] else ""
            reasons.setdefault(name, []).append(f"{f.message}" + (f": {detail}" if detail else ""))
    ordered = [n for n in images.index if n in reasons]
    return pd.DataFrame(
        {
            "image_id": [images.loc[n, "image_id"] for n in ordered],
            "file": [f"images/{n}" for n in ordered],
            "reason": ["; ".join(reasons[n]) for n in ordered],
        },
        columns=["image_id", "file", "reason"],
    )


def failure_summary(failures: list[Failure], report_index: Path | None, quarantined: int = 0) -> str:
    """The short text a user reads in the terminal: one line per failing expectation."""
    suites = sorted({f.suite for f in failures}, key=["metadata", "images", "split"].index)
    head = f"validation failed: {len(failures)} expectation(s) in {', '.join(suites)}"
    if quarantined:
        head += f" (after quarantining {quarantined} image(s))"
    lines = [head + " (row = line in metadata.csv)"]
    lines += [f"  {f.line()}" for f in failures]
    if report_index is not None:
        lines.append(f"  details: {report_index}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ValidateResult:
    passed: bool
    suites: dict[str, bool]  # suite -> passed (after quarantine)
    failures: tuple[Failure, ...]  # what fails the gate
    warnings: tuple[Failure, ...]  # reported only (byte-identical copies)
    quarantine: pd.DataFrame = field(repr=False)  # image_id, file, reason
    n_rows: int = 0  # metadata rows
    n_images_checked: int = 0
    n_validated: int = 0  # rows in the validated split.csv (0 on failure)
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    summary: str = ""
    report_index: Path | None = None


class ValidationFailed(StageError):
    """The gate is closed; ``result`` holds the details, ``str(self)`` the summary."""

    def __init__(self, result: ValidateResult) -> None:
        super().__init__(result.summary)
        self.result = result


def run(
    params: ValidateParams,
    *,
    fractions: FractionsParams | None = None,
    raw: str | Path,
    split: str | Path,
    out: str | Path,
    report: str | Path,
    metrics: str | Path,
    progress: bool = True,
) -> ValidateResult:
    """Validate ``raw`` (metadata.csv + images/) and ``split``/split.csv.

    Always writes ``report`` (Data Docs + summary.txt) and ``metrics`` (flat JSON). On success
    writes ``out``/split.csv (the usable split rows) and ``out``/quarantine.csv and returns the
    result; on failure leaves ``out`` untouched and raises :class:`ValidationFailed`.
    ``fractions`` are the split targets (params ``split.fractions``).
    """
    t0 = time.perf_counter()
    fractions = fractions or FractionsParams()
    raw, split_dir, out, report = Path(raw), Path(split), Path(out), Path(report)

    meta = add_metadata_facts(read_rows(raw / "metadata.csv", empty=None))
    split_df = read_split_table(split_dir / "split.csv")
    undecodable = _read_undecodable(split_dir / "undecodable.csv")
    files = list_image_files(raw / "images")
    workers = n_workers(params.workers)
    log.info("metadata: %d rows; images/: %d files; split.csv: %d rows", len(meta), len(files), len(split_df))

    t = time.perf_counter()
    found = inspect_images([raw / "images" / n for n in files], params.max_pixels, workers, progress=progress)
    facts = dict(zip(files, found, strict=True))
    decode_s = time.perf_counter() - t
    log.info("inspected %d image files in %.1f s (%d worker(s))", len(files), decode_s, workers)
    images = image_frame(meta, files, facts)

    t = time.perf_counter()
    gx = GxRunner()
    checks = metadata_checks(meta, params)
    img_check = image_check(images, params)
    results: dict[str, list[Failure]] = {c.name: gx.validate(c) for c in [*checks, img_check]}

    quarantining = params.on_image_error == "quarantine"
    quarantine = quarantine_rows(images, results["images"] if quarantining else [], img_check)
    quarantined_ids = set(quarantine["image_id"])
    if undecodable:
        log.info(
            "the split stage could not decode %d image(s); checked here like every other", len(undecodable)
        )
    s_checks = split_checks(split_df, meta, images, params, fractions, quarantined_ids | undecodable)
    for c in s_checks:
        results[c.name] = gx.validate(c)
    gx_s = time.perf_counter() - t
    log.info("Great Expectations: %d validations in %.1f s", len(results), gx_s)
    checks_all = [*checks, img_check, *s_checks]

    failures, warned = [], []
    for c in checks_all:
        for f in results[c.name]:
            if not f.gating:
                warned.append(f)
            elif not (c is img_check and quarantining):  # those files are in quarantine instead
                failures.append(f)
    suites = {s: not any(f.suite == s for f in failures) for s in ("metadata", "images", "split")}
    passed = not failures

    with atomic_dir(report) as site:
        index = report / gx.build_docs(site).relative_to(site)
        summary = (
            failure_summary(failures, index, len(quarantine)) if failures else f"validation passed ({index})"
        )
        (site / "summary.txt").write_text(summary + "\n" + "".join(f"note: {f.line()}\n" for f in warned))

    usable = split_df[split_df["split"].isin(SPLITS) & ~split_df["image_id"].isin(quarantined_ids)]
    seconds = time.perf_counter() - t0
    metric_values: dict[str, Any] = {
        "passed": int(passed),
        **{f"{s}_passed": int(ok) for s, ok in suites.items()},
        "n_rows": len(meta),
        "n_images_checked": len(files),
        "n_quarantined": len(quarantine),
        "n_validated": len(usable) if passed else 0,
        "decode_seconds": round(decode_s, 3),
        "seconds": round(seconds, 3),
    }
    for c in checks_all:
        counts = {f.key: f.count for f in results[c.name]}
        for spec in c.specs:
            metric_values[f"{c.name}_fail_{spec.key}"] = counts.get(spec.key, 0)
    write_json(metrics, metric_values)

    result = ValidateResult(
        passed=passed,
        suites=suites,
        failures=tuple(failures),
        warnings=tuple(warned),
        quarantine=quarantine,
        n_rows=len(meta),
        n_images_checked=len(files),
        n_validated=len(usable) if passed else 0,
        seconds=seconds,
        metrics=metric_values,
        summary=summary,
        report_index=index,
    )
    for f in warned:
        log.warning("%s", f.line())
    if not passed:
        raise ValidationFailed(result)
    with atomic_dir(out) as tmp:
        _write_csv(tmp / "split.csv", usable)
        _write_csv(tmp / "quarantine.csv", quarantine)
    if len(quarantine):
        log.warning("quarantined %d image(s): %s", len(quarantine), out / "quarantine.csv")
    log.info("validation passed: %d split rows in %s (%.1f s)", len(usable), out / "split.csv", seconds)
    return result


def _read_undecodable(path: Path) -> set[str]:
    """Image ids the split stage listed as undecodable (optional file)."""
    if not path.is_file():
        return set()
    return set(read_table(path, required=("image_id",))["image_id"]) - {""}


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.validate",
        description="Great Expectations gate on the raw metadata, the image files and the split. "
        "Exits 1 with a summary naming the failing rows/files when a suite fails; the Data Docs and "
        "metrics are written either way, --out only on success.",
    )
    ap.add_argument(
        "--params", default="params.yaml", help="params file; reads 'validate' and 'split.fractions'"
    )
    ap.add_argument("--raw", required=True, help="raw data folder: metadata.csv + images/<image_id>.jpg")
    ap.add_argument("--split", required=True, help="split folder: split.csv (+ optional undecodable.csv)")
    ap.add_argument(
        "--out", required=True, help="output folder (split.csv, quarantine.csv); written only on success"
    )
    ap.add_argument(
        "--report", required=True, help="Data Docs folder (index.html, summary.txt), always written"
    )
    ap.add_argument("--metrics", required=True, help="metrics JSON file, always written")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, split=SplitParams, validate=ValidateParams)
        try:
            run(
                params.validate,
                fractions=params.split.fractions,
                raw=args.raw,
                split=args.split,
                out=args.out,
                report=args.report,
                metrics=args.metrics,
            )
        except ValidationFailed as e:
            print(str(e), file=sys.stderr)  # the summary, once (not through run_main's one-liner)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
