"""Rescoring for ``python -m tools.compare --rescore``: A's bundle scored on B's test split.

For runs on other data versions, whose test sets differ: B's test images (B's own metadata rows
and image files) are scored through the serving path by A's bundle, leaving out every image whose
lesion or image A trained, tuned or calibrated on (the bundle's ``seen.json``; for an older
bundle, A's split train + val rows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from tools.runs import HOW, Layout, RunData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rescore:
    frames: dict[str, pd.DataFrame]  # A's bundle on B's unseen test images, by headline suffix
    modes: dict[str, str]
    n_test: int  # B's test images
    n_left_out: int  # of them, images whose lesion or image A has seen
    n_left_out_lesions: int
    n_failed: int  # unseen images that could not be scored (named in the log)
    seen_source: str

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("frames", "modes")}


def seen_of_a(a: RunData, bundle_dir: Path, layout: Layout) -> tuple[Any, str]:
    """What A's bundle has seen (:class:`skinlesion.model.bundle.Seen`) and where that was read: its
    seen.json, else, for a bundle older than the file, A's split's train + val rows."""
    from skinlesion.core.splits import read_split
    from skinlesion.model.seen import SEEN_FILE, SEEN_SPLITS, Seen, read_seen

    seen = read_seen(bundle_dir)
    if seen is not None:
        return seen, a.files.shown(f"{layout.bundle}/{SEEN_FILE}")
    path = a.files.get(layout.split, how=HOW["split"])
    assert path is not None
    shown = a.files.shown(layout.split)
    try:
        split = read_split(path)
    except StageError as e:
        raise StageError(str(e).replace(str(path), shown)) from None
    rows = split[split["split"].isin(SEEN_SPLITS)]
    source = f"{shown}, {' + '.join(SEEN_SPLITS)} rows: the bundle has no {SEEN_FILE}"
    log.info("what A has seen: %s", source)
    return Seen(frozenset(rows["lesion_id"].astype(str)), frozenset(rows["image_id"].astype(str))), source


def rescore(
    a: RunData, b: RunData, layout: Layout, *, scratch: Path, batch_size: int, workers: int, progress: bool
) -> Rescore:
    """Score A's bundle on B's test split (B's image files and metadata rows) through the serving
    path, leaving out the images A has seen."""
    from serve.evaluate import read_labelled, score_labelled
    from serve.predictor import Predictor
    from skinlesion.measure.scoring import mode_suffix
    from skinlesion.sources.local import read_metadata_table, write_metadata_csv

    bundle_dir = a.files.get(layout.bundle, how=HOW["bundle"])
    assert bundle_dir is not None
    seen, source = seen_of_a(a, bundle_dir, layout)
    test = b.frames[""]
    keep = seen.unseen_rows(test)
    ids = test.loc[keep, "image_id"].astype(str).tolist()
    left = test.loc[~keep]
    log.info(
        "B's test split: %d images; %d of them (%d lesions) left out: A trained, tuned or calibrated on "
        "their lesion or image (%s)", len(test), len(left), left["lesion_id"].nunique(), source,
    )  # fmt: skip
    if not ids:
        raise StageError(
            f"every one of {b.run.label}'s {len(test)} test images is a lesion or image {a.run.label} has "
            f"seen ({source}): nothing left to compare on"
        )
    # B's test images as a labelled folder in HAM10000 layout: B's own metadata rows and files.
    folder = scratch / "rescore"
    (folder / "images").mkdir(parents=True)
    meta_path = b.files.get(f"{layout.raw}/metadata.csv", how=HOW["raw"])
    assert meta_path is not None
    meta = read_metadata_table(meta_path)
    rows = meta[meta["image_id"].isin(set(ids))]
    if len(set(rows["image_id"])) < len(ids):
        missing = sorted(set(ids) - set(rows["image_id"]))
        log.warning("%d of B's test images have no row in %s (e.g. %s): not scored", len(missing),
                    b.files.shown(f"{layout.raw}/metadata.csv"), missing[0])  # fmt: skip
    write_metadata_csv(rows, folder / "metadata.csv")
    _gather_images(b, layout, ids, folder / "images", progress=progress)
    shown = b.files.shown(layout.raw)
    labelled = read_labelled(folder, shown=shown)
    for s in labelled.skipped:
        log.warning("%s", s.message())
    predictor = Predictor.load(bundle_dir)
    classes = list(predictor.classes)
    if sorted(classes) != sorted(CLASSES):
        raise StageError(
            f"{a.files.shown(layout.bundle)}: classes {classes} are not HAM10000's {list(CLASSES)}"
        )
    scored = score_labelled(
        predictor,
        labelled,
        root=folder,
        shown=shown,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    if scored.rows.empty:
        raise StageError(f"{shown}: none of B's {len(ids)} unseen test images could be scored (named above)")
    modes = list(predictor.modes)
    frames, mode_of = {}, {}
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        frames[sfx] = scored.served[mode].frame(scored.rows, classes)
        mode_of[sfx] = mode
    return Rescore(
        frames=frames,
        modes=mode_of,
        n_test=len(test),
        n_left_out=len(left),
        n_left_out_lesions=int(left["lesion_id"].nunique()),
        n_failed=len(ids) - len(scored.rows),
        seen_source=source,
    )


def _gather_images(b: RunData, layout: Layout, ids: Sequence[str], dest: Path, *, progress: bool) -> None:
    """B's image files of ``ids`` into ``dest`` (links to the workspace's, copies of a revision's)."""
    from tqdm import tqdm

    images = f"{layout.raw}/images"
    if b.run.sha is None:
        for image_id in ids:
            src = b.files.root / images / f"{image_id}.jpg"
            if src.is_file():
                (dest / src.name).symlink_to(src.resolve())
        return
    fs = b.files.fs()
    for image_id in tqdm(ids, desc=f"images of {b.run.name}", unit="img", disable=not progress):
        rel = f"{images}/{image_id}.jpg"
        try:
            fs.get_file(rel, str(dest / f"{image_id}.jpg"))
        except FileNotFoundError:
            continue  # read_labelled names it: no image file
        except Exception as e:  # noqa: BLE001
            raise StageError(
                f"{b.run.label}: {rel}: cannot read it ({e}); {b.files.fetch_hint(layout.raw)}"
            ) from None
