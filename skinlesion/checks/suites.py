"""The validate stage's expectation suites: frames of facts, and the GX expectations on them.

The inputs are turned into pandas frames of *facts*, one row per thing a user can point at (a
metadata row, an image file, a split group, a class in a split), and each frame is checked by
one GX 1.x expectation suite (a :class:`Check`; run by :mod:`skinlesion.checks.gx`). The
suites, as reported:

* ``metadata``: exact column set, unique well-formed ids, known codes, ages, one diagnosis per
  lesion, enough rows per class (:func:`metadata_checks`);
* ``images``: a file for every row and a row for every file, full decode, format, mode,
  dimensions, a pixel limit applied from the header before decoding, byte-identical copies
  (:func:`image_check`, on the per-file facts of :mod:`skinlesion.checks.imagefacts`);
* ``split``: split.csv agrees with the metadata, no group / lesion / byte-identical image in two
  splits, every class in every split, fractions within tolerance of ``split.fractions``
  (:func:`split_checks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion.core.schema import HAM_COLUMNS
from skinlesion.core.splits import DROPPED, SPLITS
from skinlesion.params.split import FractionsParams
from skinlesion.params.validate import ValidateParams

SUITES: tuple[str, ...] = ("metadata", "images", "split")  # as reported, in this order
AGE_RANGE = (0, 120)
# Pillow names baseline and progressive JPEGs "JPEG", and camera JPEGs with a second picture
# appended "MPO"; both are JPEG files.
JPEG_FORMATS: tuple[str, ...] = ("JPEG", "MPO")
# Formats Pillow decodes by content whatever the file is called; prepare reads them the same way.
CONVERTIBLE_FORMATS: tuple[str, ...] = ("PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
# Modes whose RGB conversion keeps the picture (grey, palette, alpha dropped, CMYK/YCbCr
# transformed). 16-bit and float modes are not here: Pillow clips them when converting.
CONVERTIBLE_MODES: tuple[str, ...] = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr")


# --------------------------------------------------------------------------- checks and failures


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


def image_frame(meta: pd.DataFrame, files: list[str], facts: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per image: every metadata image_id (expected as ``<image_id>.jpg``) and every file.

    ``facts`` maps file name -> :func:`skinlesion.checks.imagefacts.inspect_image` output.
    Index: ``file``. ``duplicate_of`` names the first image (by file name) with the same bytes.
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
    targets = {s: getattr(fractions, s) for s in SPLITS}
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
