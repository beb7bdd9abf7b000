"""The drift reference a bundle carries: written by ``calibrate``, read by the drift check.

A table (``drift_reference.parquet``: image features, the training rows' metadata and the best
member's embeddings, :mod:`skinlesion.measure.imagefeatures`) of a seeded sample of the training
split, computed with the bundle's own members, and its entry in ``bundle.json``. A later drift
check needs only the bundle and the new images, never the training data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.parallel import n_workers
from skinlesion.core.tables import read_table
from skinlesion.model.bundle_json import read_bundle_json

if TYPE_CHECKING:
    from skinlesion.model.bundle import Bundle

log = logging.getLogger(__name__)

# The table and its description in bundle.json.
REFERENCE_FILE = "drift_reference.parquet"
REFERENCE_KEY = "drift_reference"


def write_drift_reference(
    bundle_dir: Path,
    *,
    raw_dir: Path,
    split_csv: Path,
    split: str,
    max_images: int,
    stats_size: int,
    max_pixels: int,
    draft_gap: float,
    seed: int,
    workers: int,
    bundle: Bundle | None = None,
) -> dict[str, Any]:
    """Write the drift reference into a bundle folder and return its ``bundle.json`` entry.

    ``bundle``: the folder's bundle when the caller has it loaded already (else it is loaded).

    The table is what a drift check computes for new images (:mod:`skinlesion.measure.imagefeatures`), for a
    seeded sample of the ``split`` images, with this bundle's own members: a later check needs
    only the bundle and the new images, never the training data.
    """
    import pandas as pd

    from skinlesion.measure.imagefeatures import FeatureSpec, build_table

    try:
        rows = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise StageError(f"{split_csv}: not found; run the split and validate stages first") from None
    missing = {"image_id", "split"} - set(rows.columns)
    if missing:
        raise StageError(f"{split_csv}: missing column(s) {sorted(missing)}")
    ids = sorted(rows.loc[rows["split"] == split, "image_id"])
    if not ids:
        raise StageError(f"{split_csv}: no {split!r} rows to build the drift reference from")
    if len(ids) > max_images:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=max_images, replace=False).tolist())
    if bundle is None:
        from skinlesion.model.bundle import Bundle

        bundle = Bundle.load(bundle_dir)
    spec = FeatureSpec(bundle.image_size, bundle.aspect, stats_size, draft_gap, max_pixels)
    items = [(i, Path(raw_dir) / "images" / f"{i}.jpg") for i in ids]
    table = build_table(items, spec, bundle, workers=n_workers(workers), desc="drift reference")
    if table.unreadable:
        name, why = table.unreadable[0]
        raise StageError(
            f"drift reference: {len(table.unreadable)} {split} image(s) unreadable, e.g. {name}: {why} "
            "(the validate stage should have stopped them)"
        )
    df = table.with_embeddings()
    # The training rows' metadata, for comparing a labelled batch's population (age, sex, site).
    try:
        meta = read_table(Path(raw_dir) / "metadata.csv", required=("image_id", "age", "sex", "localization"),
                          unique="image_id")  # fmt: skip
        meta = meta.set_index("image_id").reindex(df["name"])
        df.insert(1, "age", pd.to_numeric(meta["age"].to_numpy(), errors="coerce"))
        for col in ("sex", "localization"):
            values = pd.Series(meta[col].to_numpy()).replace("", "unknown").fillna("unknown")
            df.insert(2, col, values.to_numpy())
    except (OSError, KeyError, StageError) as e:
        log.warning("drift reference: no metadata columns (%s); labelled batches compare images only", e)
    df.to_parquet(Path(bundle_dir) / REFERENCE_FILE, index=False)
    entry = {
        "path": REFERENCE_FILE,
        "split": split,
        "n_images": len(df),
        "embedding_member": bundle.best,
        "embedding_dim": int(table.embeddings.shape[1]),
        "feature_spec": {
            "image_size": spec.image_size,
            "aspect": spec.aspect,
            "stats_size": spec.stats_size,
            "draft_gap": spec.draft_gap,
        },
    }
    log.info(
        "drift reference: %d %s images, %d-dim embedding of %s",
        len(df), split, entry["embedding_dim"], bundle.best,
    )  # fmt: skip
    return entry


def read_drift_reference(bundle_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The reference table (features, model columns, ``emb_*``) and its ``bundle.json`` entry."""
    import pandas as pd

    meta = read_bundle_json(bundle_dir)
    entry = meta.get(REFERENCE_KEY)
    path = Path(bundle_dir) / (entry or {}).get("path", REFERENCE_FILE)
    if not entry or not path.is_file():
        raise StageError(
            f"{bundle_dir}: this bundle has no drift reference ({path.name}); it was made before drift "
            "checks existed: rebuild it with `dvc repro calibrate`"
        )
    return pd.read_parquet(path), entry
