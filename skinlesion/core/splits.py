"""The split.csv contract: its file names, columns and split names, and the one reader.

The split stage writes ``split.csv`` (every image, sorted by image_id; columns :data:`COLUMNS`)
beside ``duplicates.csv`` and ``undecodable.csv``; the validate stage writes the usable rows
of it to its own ``split.csv``. ``split`` is one of :data:`SPLITS`, or :data:`DROPPED` for an
image a split option removed from training and evaluation; ``assigned_split`` is the split of
the image's group in every row (a dropped image included). Validate, prepare, calibrate (what
the bundle has seen), the drift reference and ``tools/rescore.py`` read it back through
:func:`read_split`, each naming the columns it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.core.tables import read_table

SPLIT_CSV = "split.csv"
DUPLICATES_CSV = "duplicates.csv"  # the verified near-duplicate pairs (split stage)
UNDECODABLE_CSV = "undecodable.csv"  # images the split stage could not read (image_id, error)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DROPPED = "dropped"  # split.csv rows a split option removed from training and evaluation
# The splits a model is measured on (evaluate, ensemble, calibrate): val chooses, test reports.
EVAL_SPLITS: tuple[str, ...] = ("val", "test")
# The splits a model is fitted or tuned on: what a bundle has seen (its seen.json).
FIT_SPLITS: tuple[str, ...] = ("train", "val")

COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "group_id", "dx", "split", "assigned_split")
# What a reader that only needs to know which image (and lesion) is in which split asks for.
KEY_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "split")


def read_split(
    path: str | Path, columns: Sequence[str] = KEY_COLUMNS, *, unique: bool = False, hint: str = ""
) -> pd.DataFrame:
    """A split.csv as text (:func:`skinlesion.core.tables.read_table`: "" for a blank field,
    indexed by line), refused unless it has ``columns``; with ``unique``, also when an image_id
    is listed twice. ``hint`` follows "not found", e.g. "run the split stage first"."""
    return read_table(path, required=columns, unique="image_id" if unique else None, hint=hint)
