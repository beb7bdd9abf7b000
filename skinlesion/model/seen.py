"""``seen.json``: what a bundle has seen, the one module that writes and reads it.

The lesions and images the bundle trained, tuned or calibrated on (the train and val rows of its
split), written into the bundle by ``calibrate``. A later comparison on another data version (the
promotion gate, ``make compare --rescore``) leaves them out, since a lesion can move from one
split to another.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.outputs import write_json
from skinlesion.core.tables import read_table

SEEN_FILE = "seen.json"
SEEN_FORMAT_VERSION = 1
SEEN_SPLITS = ("train", "val")


@dataclass(frozen=True)
class Seen:
    lesion_ids: frozenset[str]
    image_ids: frozenset[str]

    def unseen(self, lesion_ids: Sequence[str], image_ids: Sequence[str]) -> np.ndarray:
        """Mask of the rows neither whose lesion nor whose image the bundle has seen."""
        lesion_seen = np.isin(np.asarray(lesion_ids, dtype=str), list(self.lesion_ids))
        image_seen = np.isin(np.asarray(image_ids, dtype=str), list(self.image_ids))
        return ~(lesion_seen | image_seen)

    def unseen_rows(self, frame: Any) -> np.ndarray:
        """:meth:`unseen` for the rows of a frame with ``lesion_id`` and ``image_id`` columns."""
        return self.unseen(frame["lesion_id"].astype(str).tolist(), frame["image_id"].astype(str).tolist())


def seen_record(split: Any) -> dict[str, Any]:
    """The ``seen.json`` content for a split frame (columns image_id, lesion_id, split)."""
    rows = split[split["split"].isin(SEEN_SPLITS)]
    return {
        "format_version": SEEN_FORMAT_VERSION,
        "splits": list(SEEN_SPLITS),
        "lesion_ids": sorted(map(str, rows["lesion_id"].unique())),
        "image_ids": sorted(map(str, rows["image_id"])),
    }


def seen_of_split(split_csv: str | Path) -> dict[str, Any]:
    """:func:`seen_record` of the validated split file."""
    split = read_table(split_csv, required=("image_id", "lesion_id", "split"), unique="image_id",
                       hint="run the split and validate stages first")  # fmt: skip
    return seen_record(split)


def write_seen(bundle_dir: str | Path, record: dict[str, Any]) -> None:
    """Write a :func:`seen_record` into a bundle folder."""
    write_json(Path(bundle_dir) / SEEN_FILE, record)


def read_seen(bundle_dir: str | Path) -> Seen | None:
    """The bundle's ``seen.json``; None for a bundle older than the file (nothing recorded)."""
    path = Path(bundle_dir) / SEEN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable ({e}); rebuild the bundle with dvc repro calibrate") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != SEEN_FORMAT_VERSION:
        raise StageError(
            f"{path}: format_version {version!r}, this code reads {SEEN_FORMAT_VERSION}; "
            "rebuild the bundle with dvc repro calibrate"
        )
    ids = {k: data.get(k) for k in ("lesion_ids", "image_ids")}
    for key, value in ids.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StageError(f"{path}: {key} must be a list of strings")
    return Seen(frozenset(ids["lesion_ids"]), frozenset(ids["image_ids"]))
