"""A drift batch's HAM10000 metadata table: found in the batch folder, checked row by row.

A labelled batch's rows are checked with the vocabularies and the age range the ``validate`` stage
and serving use (:func:`skinlesion.measure.scoring.parse_metadata`): every row that fails is named
with its line, column and value, and left out of the drift check's metadata comparison
(:mod:`skinlesion.checks.drift`); the other rows are used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, DX_TYPES, HAM_COLUMNS, LOCALIZATIONS, SEXES
from skinlesion.core.tables import FIELDS, read_rows
from skinlesion.measure.scoring import parse_metadata

log = logging.getLogger(__name__)

# Columns of the batch's HAM10000 table that are checked (lesion_id and image_id are ids).
META_CHECKED = ("dx", "dx_type", "age", "sex", "localization")
COMPARED = ("lesion_id", *META_CHECKED)  # what two rows of one image_id must agree on


@dataclass(frozen=True)
class BatchMetadata:
    """A batch's HAM10000 table: its usable rows and each row (or file) that was not used."""

    path: Path | None
    # index image_id; dx ("" = unlabelled), age (float, NaN = unknown), sex and localization
    # (their vocabulary's spelling, "unknown" when blank)
    rows: pd.DataFrame
    bad_rows: list[dict[str, Any]]  # {"file", "row", "column", "value", "why"}
    notes: list[str]  # a table that could not be read at all, with why


NO_METADATA_ROWS = pd.DataFrame(
    columns=["dx", "age", "sex", "localization"], index=pd.Index([], name="image_id")
)


def check_metadata(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The usable rows of a HAM10000 table read by :func:`skinlesion.core.tables.read_rows`, and the others.

    A row is not used when it has the wrong number of fields, no image_id, a dx not in the
    class set (blank: an unlabelled row), a dx_type not in its set, or an age, sex or
    localization :func:`skinlesion.measure.scoring.parse_metadata` refuses (the vocabularies and the 0..120
    age range of ``validate`` and serving); nor when its image_id is on another row with other
    values (neither can be trusted). A repeat of an identical row is named and counted once.
    Each is a ``{"file", "row", "column", "value", "why"}``, ``row`` the line of the file.
    """
    width = len(table.columns) - 1  # the header's fields (FIELDS is read_rows' count)
    bad: list[dict[str, Any]] = []

    def flag(row: Any, column: str | None, value: str | None, why: str) -> None:
        bad.append({"file": source, "row": int(row), "column": column, "value": value, "why": why})

    parsed: dict[int, dict[str, Any]] = {}
    for row, r in table.iterrows():
        n = int(r[FIELDS])
        if n == 0:  # a blank line
            continue
        if n != width:
            flag(row, None, None, f"{n} field(s), the header has {width}")
            continue
        faults: list[tuple[str, str, str]] = []
        image_id = r["image_id"].strip()
        if not image_id:
            faults.append(("image_id", r["image_id"], "image_id is empty"))
        dx, dx_type = r["dx"].strip(), r["dx_type"].strip()
        if dx and dx not in CLASSES:
            faults.append(("dx", r["dx"], f"dx {dx!r} is not one of {list(CLASSES)}"))
        if dx_type and dx_type not in DX_TYPES:
            faults.append(("dx_type", r["dx_type"], f"dx_type {dx_type!r} is not one of {list(DX_TYPES)}"))
        values: dict[str, Any] = {"lesion_id": r["lesion_id"].strip(), "dx": dx, "dx_type": dx_type}
        for col in ("age", "sex", "localization"):
            try:
                values[col] = _parse_field(col, r[col])
            except StageError as e:
                faults.append((col, r[col], str(e)))
        if faults:
            for fault in faults:
                flag(row, *fault)
            continue
        parsed[int(row)] = {"image_id": image_id, **values}

    groups: dict[str, list[int]] = {}
    for row, v in parsed.items():
        groups.setdefault(v["image_id"], []).append(row)
    keep: list[int] = []
    for image_id, rows in groups.items():
        key = [_comparable(parsed[row]) for row in rows]
        if len(rows) == 1:
            keep.append(rows[0])
        elif all(k == key[0] for k in key):
            keep.append(rows[0])
            for row in rows[1:]:
                flag(row, "image_id", image_id, f"image_id {image_id} repeats row {rows[0]} (counted once)")
        else:
            differ = [c for i, c in enumerate(COMPARED) if len({k[i] for k in key}) > 1]
            where = ", ".join(map(str, rows))
            for row in rows:
                flag(
                    row, differ[0], value_text(parsed[row][differ[0]]),
                    f"image_id {image_id} is on rows {where} with different {' and '.join(differ)}: "
                    "none of them is used",
                )  # fmt: skip
    bad.sort(key=lambda b: (b["row"], b["column"] or ""))
    if not keep:
        return NO_METADATA_ROWS.copy(), bad
    good = pd.DataFrame([parsed[row] for row in sorted(keep)]).set_index("image_id")
    return good[["dx", "age", "sex", "localization"]], bad


def _parse_field(column: str, value: str) -> float | str:
    """One of age, sex, localization through :func:`parse_metadata` (the others left unknown):
    the age in years (NaN unknown) or the vocabulary's word ("unknown" when blank)."""
    age, sex, loc = parse_metadata(**{"age": None, "sex": None, "localization": None, column: value})
    return age if column == "age" else SEXES[sex] if column == "sex" else LOCALIZATIONS[loc]


def _comparable(v: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(None if isinstance(v[c], float) and np.isnan(v[c]) else v[c] for c in COMPARED)


def value_text(v: Any) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:g}"
    return str(v)


def batch_metadata(folder: Path) -> BatchMetadata:
    """The batch's HAM10000 metadata (the first ``*.csv`` with the HAM columns), if any, checked
    row by row (:func:`check_metadata`); hidden files and folders are skipped."""
    notes: list[str] = []
    for path in sorted(folder.rglob("*.csv")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            table = read_rows(path)
        except StageError as e:
            log.warning("%s (not used as the batch's metadata)", e)
            notes.append(
                f"{rel.as_posix()}: {str(e).removeprefix(f'{path}: ')} (not used as the batch's metadata)"
            )
            continue
        if set(HAM_COLUMNS) <= set(table.columns):
            rows, bad = check_metadata(table, rel.as_posix())
            return BatchMetadata(path, rows, bad, notes)
        columns = [c for c in table.columns if c != FIELDS]
        log.info("%s: not a HAM10000 metadata table (columns %s), ignored", path, columns)
    return BatchMetadata(None, NO_METADATA_ROWS.copy(), [], notes)


def bad_row_text(b: dict[str, Any]) -> str:
    """One bad metadata row for people: ``metadata.csv row 7, sex 'robot': why``."""
    where = f"{b['file']}" + (f" row {b['row']}" if b.get("row") is not None else "")
    what = f", {b['column']} {b['value']!r}" if b.get("column") else ""
    return f"{where}{what}: {b['why']}"
