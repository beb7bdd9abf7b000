"""Reading the project's metadata tables: one reader for every stage that opens one.

The tables: a HAM10000 metadata table (``metadata.csv``, or Dataverse's tab-separated ``.tab``)
and the per-image tables the stages write from it (``split.csv``, ``undecodable.csv``). Every
stage reads them the same way:

* the delimiter from the file: a tab when the header line has one or the name ends in
  ``.tab``/``.tsv``, a comma otherwise;
* UTF-8 with or without a BOM, LF or CRLF line ends, quoted fields (a field may span lines);
* each record indexed by ``row``, the 1-based line of the file it starts on (header = line 1),
  so that a message can name the line a user opens the file at;
* header names stripped of surrounding blanks; an empty name becomes ``unnamed_<k>`` and a
  repeated one gets ``_dup``, so two columns never merge silently;
* values as text, never parsed; a blank field becomes ``empty`` ("" unless asked otherwise).

:func:`read_rows` refuses nothing that can be read (the validate stage reports each fault by
row); :func:`read_table` refuses a table a stage cannot use, naming the file and the rows.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.core.errors import StageError

ROW = "row"  # index name: the line a record starts on
FIELDS = "_fields"  # how many fields the record's line had (0 for a blank line)
TAB_SUFFIXES = (".tab", ".tsv")
MAX_NAMED = 5  # rows or values named in a one-line error


def read_rows(path: str | Path, *, empty: str | None = "") -> pd.DataFrame:
    """Every record of the table at ``path``, as text, with exact line numbers.

    Index ``row`` (see the module doc); column ``_fields`` is the number of fields on the
    record's line: a ragged row is padded with ``empty`` or cut to the header's width, and
    counted here instead of shifting columns. A blank line inside the table is a row of
    ``empty`` with 0 fields; blank rows at the very end are harmless and dropped.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StageError(f"{path}: not found") from None
    except OSError as e:
        raise StageError(f"{path}: cannot read ({e.strerror or e})") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise StageError(
            f"{path}: not UTF-8 text (byte {data[at]:#04x} on line {line}, offset {at})"
        ) from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first or path.suffix.lower() in TAB_SUFFIXES else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise StageError(f"{path}: empty file (no header line)")
        records, lines = [], []
        start = reader.line_num + 1
        for record in reader:
            if len(record) == 1 and not record[0].strip():  # a line of blanks is a blank line
                record = []
            records.append(record)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise StageError(f"{path}: not a readable table (line {reader.line_num}: {e})") from None
    while records and not any(v.strip() for v in records[-1]):
        records.pop()
        lines.pop()

    columns: list[str] = []
    for k, name in enumerate(header):
        name = name.strip() or f"unnamed_{k + 1}"
        while name in columns:
            name += "_dup"
        columns.append(name)
    width = len(columns)
    data_rows = [[v if v.strip() else empty for v in (r + [""] * width)[:width]] for r in records]
    df = pd.DataFrame(data_rows, columns=columns, index=pd.Index(lines, name=ROW), dtype=object)
    df[FIELDS] = [len(r) for r in records]
    return df


def read_table(
    path: str | Path,
    *,
    required: Sequence[str] = (),
    unique: str | None = None,
    hint: str = "",
) -> pd.DataFrame:
    """The table at ``path`` for a stage that uses it: :func:`read_rows`, then refused unless
    every line has the header's number of fields, the ``required`` columns are there and no
    value of the ``unique`` column (e.g. ``image_id``) is listed twice. Blank lines are skipped.

    Returns the header's columns as text ("" for a blank field), indexed by ``row``. ``hint``
    follows "not found", e.g. "run the download stage first".
    """
    path = Path(path)
    if hint and not path.exists():
        raise StageError(f"{path}: not found; {hint}")
    df = read_rows(path)
    df = df[df[FIELDS] > 0]
    width = len(df.columns) - 1
    ragged = df[df[FIELDS] != width]
    if len(ragged):
        named = [f"row {row} has {n}" for row, n in ragged[FIELDS].items()]
        raise StageError(f"{path}: wrong number of fields (the header has {width}): {name_first(named)}")
    df = df.drop(columns=FIELDS)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    if unique is not None:
        check_unique(df, unique, path)
    return df


def check_unique(df: pd.DataFrame, column: str, path: str | Path) -> None:
    """Refuse a value of ``column`` listed on several rows, naming the value and its rows
    (``df`` indexed by ``row``, as :func:`read_table` returns it). Blank values are not ids."""
    values = df[column]
    dup = values[values.duplicated(keep=False) & (values != "")]
    if len(dup):
        rows: dict[str, list[str]] = {}
        for row, value in dup.items():
            rows.setdefault(value, []).append(str(row))
        named = [f"{value} (rows {', '.join(lines)})" for value, lines in rows.items()]
        raise StageError(f"{path}: {column} listed more than once: {name_first(named)}")


def name_first(items: Sequence[str], k: int = MAX_NAMED) -> str:
    """The first ``k`` of ``items`` for a one-line message, and how many more there are."""
    named = ", ".join(items[:k])
    return named + (f" and {len(items) - k} more" if len(items) > k else "")
