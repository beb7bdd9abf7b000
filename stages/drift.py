"""Drift stage: does a batch of new images look like the data the bundle was trained on?

For every image of the batch (``drift.new_images``: a folder, searched recursively; a HAM10000
metadata CSV in it makes it a *labelled* batch) it computes the same per-image table the bundle
stores for its training split (:mod:`skinlesion.measure.imagefeatures`: size, compression, brightness,
contrast, colour, saturation, sharpness, dark corners; the best member's embedding, the
predicted class and its calibrated confidence) and compares the two with Evidently 0.7:

* ``DataDriftPreset`` over the per-image features, a few PCA components of the embedding (fitted
  on the reference) and the predicted class, with the stat tests and thresholds of params.yaml;
  ``dataset_drift`` when at least ``drift.drift_share`` of them drifted;
* ``EmbeddingsDrift`` on the raw embedding vectors (``embedding_drift``).

The verdict ``drift_detected`` is either of the two. Outputs: the HTML report
(``<report>/index.html``: a summary with the verdict and every unreadable file on top of
Evidently's report), flat ``metrics/drift.json`` for ``dvc metrics diff``, and a snapshot in a
local Evidently workspace (``evidently ui --workspace <drift.workspace>``) so batches can be
followed over time. Unreadable files (truncated, not an image, over ``drift.max_pixels``) are
named in both outputs and left out of the statistics, as is every entry the listing cannot
use (a symbolic link that loops or leads nowhere, a linked folder); a missing or empty folder, or
one without a single readable image, is an error.

A batch of fewer than ``MIN_IMAGES`` images (or distinct images: copies of one photograph are
one sample) gets no test: its verdict is ``too few images`` (``drift_detected: null``), said in
both outputs, exit 0. A feature with one and the same value in the reference and the batch (every
image 200x150) is not drifted by definition: it is tested when the configured test gives a number
on it (wasserstein: 0), else skipped and counted as not drifted (t_test gives NaN, anderson
fails); a feature with fewer than ``MIN_IMAGES`` known values in the batch (age) is skipped and
not counted. Both are named in ``skipped_features``; a test that still gives no number skips its
feature the same way, so no NaN reaches a verdict.

A labelled batch's metadata rows are checked with the vocabularies and the age range the
``validate`` stage and serving use (:func:`skinlesion.measure.scoring.parse_metadata`): every row that fails
(a diagnosis not in the class set, an age outside 0..120, a sex not in the set, an image_id
listed twice with different values, a row with the wrong number of fields) is named with its
line, column and value in both outputs and left out of the metadata comparison; the other rows
are used.

The statistics and the verdict are :mod:`skinlesion.checks.drift`, the metadata checks
:mod:`skinlesion.checks.drift_metadata`, the report and the workspace
:mod:`skinlesion.checks.drift_report`; this module reads the batch and the bundle and writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion.checks.drift import MIN_IMAGES, compare, count_distinct, too_few_verdict
from skinlesion.checks.drift_metadata import bad_row_text, batch_metadata
from skinlesion.checks.drift_report import add_to_workspace, summary_html, write_report
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import write_json
from skinlesion.core.parallel import n_workers
from skinlesion.measure.imagefeatures import (
    PRED_CLASS,
    FeatureSpec,
    build_table,
    list_batch,
    split_embeddings,
)
from skinlesion.model.bundle import Bundle
from skinlesion.model.drift_reference import read_drift_reference
from skinlesion.params.base import BaseParams
from skinlesion.params.drift import DriftParams
from skinlesion.params.schema import load_sections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftResult:
    metrics: dict[str, Any]
    report: Path
    seconds: float


def run(
    params: DriftParams,
    *,
    bundle_dir: Path,
    images_dir: Path,
    report_dir: Path,
    metrics_path: Path,
    workspace: Path | None,
    seed: int = 0,
    batch_name: str | None = None,
    images_label: str = "drift.new_images:",
    bundle_label: str = "bundle",
) -> DriftResult:
    """``images_label``, ``bundle_label``: what an error about the folder names first, before it: the
    params key (``drift.new_images:``) or the command-line option the user typed (``--images``)."""
    t0 = time.perf_counter()
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise StageError(f"{images_label} {images_dir}: folder not found")
    if not images_dir.is_dir():
        raise StageError(f"{images_label} {images_dir}: not a folder")
    files, unusable = list_batch(images_dir)
    if not files:
        if unusable:
            first = "; ".join(f"{n}: {w}" for n, w in unusable[:5])
            raise StageError(f"{images_label} {images_dir}: no readable image file ({first})")
        raise StageError(
            f"{images_label} {images_dir}: no image files (*.jpg, *.jpeg, *.png, *.bmp, *.tif, *.webp)"
        )
    for name, why in unusable:
        log.warning("left out of the statistics: %s: %s", name, why)
    check_bundle_folder(Path(bundle_dir), bundle_label)
    reference, entry = read_drift_reference(bundle_dir)
    spec_info = entry["feature_spec"]
    spec = FeatureSpec(
        int(spec_info["image_size"]),
        str(spec_info["aspect"]),
        int(spec_info["stats_size"]),
        float(spec_info["draft_gap"]),
        params.max_pixels,
    )
    bundle = Bundle.load(bundle_dir)
    if bundle.best != entry.get("embedding_member", bundle.best):
        raise StageError(
            f"{bundle_dir}: the drift reference was made with another member; rebuild the bundle"
        )
    log.info("drift: %d image file(s) in %s vs %d reference images", len(files), images_dir, len(reference))
    items = [(p.relative_to(images_dir).as_posix(), p) for p in files]
    table = build_table(items, spec, bundle, workers=n_workers(params.workers), desc="drift features")
    for name, why in table.unreadable:
        log.warning("unreadable, left out of the statistics: %s: %s", name, why)
    unreadable = sorted([*table.unreadable, *unusable])
    if table.frame.empty:
        first = "; ".join(f"{n}: {w}" for n, w in unreadable[:5])
        n = len(unreadable)
        raise StageError(f"{images_label} {images_dir}: none of the {n} image file(s) is readable ({first})")

    ref_frame, ref_emb = split_embeddings(reference)
    cur_frame, cur_emb = table.frame.reset_index(drop=True), table.embeddings
    meta = batch_metadata(images_dir)
    for b in meta.bad_rows:
        log.warning("metadata row left out of the comparison: %s", bad_row_text(b))
    stems = cur_frame["name"].map(lambda n: Path(n).stem)
    joined = meta.rows.reindex(stems)
    n_labelled = int(joined["dx"].fillna("").ne("").sum())
    n_images = len(cur_frame)
    n_distinct = count_distinct(cur_frame, cur_emb)
    name = batch_name or images_dir.name
    metrics: dict[str, Any] = {
        "batch": name,
        "min_images": MIN_IMAGES,
        "n_images": n_images,
        "n_distinct_images": n_distinct,
        "n_unreadable": len(unreadable),
        "unreadable": [n for n, _ in unreadable],
        "unreadable_reasons": {n: w for n, w in unreadable},
        "n_reference": len(ref_frame),
        "reference_split": str(entry.get("split", "train")),
        "embedding_member": bundle.best,
        "embedding_method": params.embedding_method,
        "embedding_threshold": params.embedding_threshold,
        "drift_share_threshold": params.drift_share,
        "alarm_threshold": params.alarm_threshold,
        "labelled": bool(n_labelled),
        "n_labelled": n_labelled,
        "metadata_csv": str(meta.path) if meta.path else None,
        "n_metadata_bad_rows": len(meta.bad_rows),
        "metadata_bad_rows": meta.bad_rows,
        "metadata_notes": meta.notes,
        "predicted_class_share": {
            c: round(float((cur_frame[PRED_CLASS] == c).mean()), 6) for c in bundle.classes
        },
    }
    if n_distinct < MIN_IMAGES:
        return _too_few(metrics, report_dir, metrics_path, t0)

    cmp = compare(
        ref_frame, ref_emb, cur_frame, cur_emb, joined,
        n_labelled=n_labelled, classes=bundle.classes, params=params, seed=seed,
    )  # fmt: skip
    metrics.update(cmp.metrics)
    snapshot, emb_score = cmp.snapshot, cmp.embedding_score
    detected, drifted_features = metrics["drift_detected"], metrics["drifted_features"]
    embedding_drift = metrics["embedding_drift"]
    report = write_report(snapshot, Path(report_dir), summary_html(metrics, unreadable))
    metrics["report"] = report.as_posix()
    if workspace is not None:
        try:
            # Not in the metrics: the project's id is random, and the metrics must reproduce.
            project_id = add_to_workspace(snapshot, Path(workspace), params.project, name)
            log.info("snapshot added to the Evidently workspace %s (project %s)", workspace, project_id)
        except Exception as e:  # the check itself stands; the time series misses one point
            log.error("could not add the snapshot to the Evidently workspace %s: %s", workspace, e)
    write_json(metrics_path, metrics)
    seconds = time.perf_counter() - t0
    log.info(
        "drift: %s (%d of %d features drifted%s; embedding %s, score %s); %d unreadable; %s (%.1f s)",
        "DRIFT" if detected else "no drift", len(drifted_features), metrics["n_features"],
        f": {', '.join(drifted_features)}" if drifted_features else "",
        {True: "drifted", False: "stable", None: "not tested"}[embedding_drift],
        "-" if emb_score is None else f"{emb_score:.3f}", len(unreadable), report, seconds,
    )  # fmt: skip
    return DriftResult(metrics, report, seconds)


# The folder a promotion writes (flows.promote): missing until a candidate is promoted.
PRODUCTION_NAME = "production"


def check_bundle_folder(bundle_dir: Path, label: str = "bundle") -> None:
    """A missing bundle folder is "``label`` DIR: not found", with what to use instead.

    The production folder exists only once the retrain flow promoted a candidate (after the demo
    it does not): the hint names the candidate beside it, which ``dvc repro`` writes.
    """
    if bundle_dir.is_dir():
        return
    if bundle_dir.name == PRODUCTION_NAME:
        candidate = bundle_dir.parent / "ensemble"
        raise StageError(
            f"{label} {bundle_dir}: not found; no promoted model yet: use {candidate} (the last model "
            "`dvc repro` built) or run the retrain flow, which promotes one"
        )
    raise StageError(f"{label} {bundle_dir}: not found (give a model bundle folder, e.g. models/ensemble)")


def _too_few(metrics: dict[str, Any], report_dir: Path, metrics_path: Path, t0: float) -> DriftResult:
    """The verdict of a batch too small (or too uniform) for any test: said, not guessed."""
    metrics.update(too_few_verdict(metrics["n_images"], metrics["n_distinct_images"]))
    reason = metrics["verdict_reason"]
    unreadable = [(k, metrics["unreadable_reasons"][k]) for k in metrics["unreadable"]]
    report = write_report(None, Path(report_dir), summary_html(metrics, unreadable))
    metrics["report"] = report.as_posix()
    write_json(metrics_path, metrics)
    seconds = time.perf_counter() - t0
    log.warning(
        "drift: %s; no test run; %d unreadable; %s (%.1f s)", reason, len(unreadable), report, seconds
    )
    return DriftResult(metrics, report, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.drift",
        description="Check a folder of new images for drift against the reference stored in a model "
        "bundle (Evidently DataDriftPreset + EmbeddingsDrift). Writes an HTML report, a flat metrics "
        "JSON and a snapshot in the local Evidently workspace. Exit 0 whatever the verdict (it is in "
        f"the metrics: drift detected, no drift detected, or too few images when the batch has fewer "
        f"than {MIN_IMAGES} distinct readable images); 1 for a missing folder, one without a readable "
        "image, or a bad bundle.",
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (drift section)")
    ap.add_argument("--bundle", type=Path, required=True, help="model bundle folder (models/ensemble)")
    ap.add_argument(
        "--images",
        type=Path,
        help="folder of new images (default: params' drift.new_images, relative to the current directory)",
    )
    ap.add_argument("--report", type=Path, required=True, help="report folder to write (index.html)")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument(
        "--workspace", type=Path, help="Evidently workspace folder (default: params' drift.workspace)"
    )
    ap.add_argument("--no-workspace", action="store_true", help="do not add a snapshot to the workspace")
    ap.add_argument("--name", help="batch name in the report and the workspace (default: the folder name)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, base=BaseParams, drift=DriftParams)
        workspace = None if args.no_workspace else (args.workspace or Path(params.drift.workspace))
        run(
            params.drift,
            bundle_dir=args.bundle,
            images_dir=args.images or Path(params.drift.new_images),
            report_dir=args.report,
            metrics_path=args.metrics,
            workspace=workspace,
            seed=params.base.seed,
            batch_name=args.name,
            images_label="--images" if args.images else "drift.new_images:",
            bundle_label="--bundle",
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
