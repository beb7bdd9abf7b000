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
"""

from __future__ import annotations

import argparse
import functools
import html
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import n_workers
from skinlesion.core.schema import CLASSES, DX_TYPES, HAM_COLUMNS, LOCALIZATIONS, SEXES
from skinlesion.core.tables import FIELDS, read_rows
from skinlesion.measure.imagefeatures import (
    IMAGE_FEATURES,
    MODEL_FEATURES,
    PRED_CLASS,
    FeatureSpec,
    build_table,
    list_batch,
    split_embeddings,
)
from skinlesion.measure.scoring import parse_metadata
from skinlesion.model.bundle import Bundle, read_drift_reference
from skinlesion.params.base import BaseParams
from skinlesion.params.drift import DriftParams
from skinlesion.params.schema import load_sections

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
PC_PREFIX = "emb_pc"
# Metadata columns compared when both the reference and a labelled batch have them.
META_NUM = ("age",)
META_CAT = ("sex", "localization")
# Evidently's EmbeddingsDrift draws a t-SNE of up to 2,500 + 2,500 points for its plot only
# (~20 s on 2 cores); 500 + 500 show the same picture in ~2 s. The drift score uses every row.
EMBEDDING_PLOT_SAMPLE = 500
MAX_LISTED = 50
# The smallest batch (of distinct images) a drift test is run on. Measured on Evidently 0.7.23:
# 1 image fails its EmbeddingsDrift classifier (one class in a half of its 50/50 split) and the
# Cramer-von Mises test; 2 images fail the t-SNE density of its embedding plot (a singular
# covariance); from 3 the reports run, but the classifier's split (fixed seed, not stratified)
# still puts every batch row in one half for some reference sizes: 4 sizes up to 3,000 rows
# (drift.reference.max_images) with 10 images, 3 sizes up to 10,000 rows (HAM10000 has 10,015
# images) with 11, none with 12. This is the floor below which no statistic is defined, whatever
# the thresholds; it is not a floor for a reliable verdict: on real HAM10000 thumbnails, clean
# batches of 20 / 30 / 40-50 / 60-100 images had half of their image features past
# num_threshold 0.2 by sampling noise alone in 15/20, 8/20, 1/20, 0/20 draws. That minimum depends
# on the thresholds, so it would be a param (drift.min_images, in skinlesion/params/).
MIN_IMAGES = 12
TOO_FEW = "too few images"
# Columns of the batch's HAM10000 table that are checked (lesion_id and image_id are ids).
META_CHECKED = ("dx", "dx_type", "age", "sex", "localization")
_COMPARED = ("lesion_id", *META_CHECKED)  # what two rows of one image_id must agree on


@dataclass(frozen=True)
class DriftResult:
    metrics: dict[str, Any]
    report: Path
    seconds: float


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


# --------------------------------------------------------------------------- pure core


def pca_columns(
    ref_emb: np.ndarray, cur_emb: np.ndarray, k: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``k`` principal components of the embedding, fitted on the reference only."""
    k = min(k, ref_emb.shape[1], max(len(ref_emb) - 1, 0))
    cols = [f"{PC_PREFIX}{i + 1}" for i in range(k)]
    if k == 0:
        return pd.DataFrame(index=range(len(ref_emb))), pd.DataFrame(index=range(len(cur_emb)))
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(ref_emb)
    return (
        pd.DataFrame(pca.transform(ref_emb), columns=cols),
        pd.DataFrame(pca.transform(cur_emb), columns=cols),
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
            differ = [c for i, c in enumerate(_COMPARED) if len({k[i] for k in key}) > 1]
            where = ", ".join(map(str, rows))
            for row in rows:
                flag(
                    row, differ[0], _text(parsed[row][differ[0]]),
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
    return tuple(None if isinstance(v[c], float) and np.isnan(v[c]) else v[c] for c in _COMPARED)


def _text(v: Any) -> str:
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


def js_distance(ref: pd.Series, cur: pd.Series, classes: Sequence[str]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two class mixes."""
    from scipy.spatial.distance import jensenshannon

    p = ref.value_counts(normalize=True).reindex(classes, fill_value=0.0).to_numpy()
    q = cur.value_counts(normalize=True).reindex(classes, fill_value=0.0).to_numpy()
    return float(jensenshannon(p, q, base=2))


def _drift_method(params: DriftParams) -> Any:
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    cls = {
        "model": ModelDriftMethod,
        "mmd": MMDDriftMethod,
        "distance": DistanceDriftMethod,
        "ratio": RatioDriftMethod,
    }[params.embedding_method]
    return cls(threshold=params.embedding_threshold)


def evidently_report(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    *,
    numerical: list[str],
    categorical: list[str],
    tested: list[str],
    embedding_cols: list[str],
    params: DriftParams,
) -> tuple[Any, dict[str, Any]]:
    """Run the Evidently report (per-feature tests on ``tested`` only); return the snapshot and
    what it found, flat.

    When Evidently's ``EmbeddingsDrift`` fails on a batch (its classifier's split, or the density
    of its t-SNE plot on embeddings that are all alike), the report is made without it and the
    embedding score is computed by the same method directly, or left out; ``notes`` says which.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embeddings_drift
    from evidently.metrics import EmbeddingsDrift, UniqueValueCount
    from evidently.presets import DataDriftPreset

    embeddings_drift.SAMPLE_CONSTANT = EMBEDDING_PLOT_SAMPLE  # see EMBEDDING_PLOT_SAMPLE
    definition = DataDefinition(
        numerical_columns=numerical,
        categorical_columns=categorical,
        embeddings={EMBEDDING: embedding_cols} if embedding_cols else None,
    )
    columns = numerical + categorical

    def report(with_embedding: bool) -> Any:
        metrics: list[Any] = [UniqueValueCount(column=PRED_CLASS)]
        if tested:
            metrics.insert(
                0,
                DataDriftPreset(
                    columns=tested,
                    drift_share=params.drift_share,
                    num_method=params.num_method,
                    num_threshold=params.num_threshold,
                    cat_method=params.cat_method,
                    cat_threshold=params.cat_threshold,
                ),
            )
        if with_embedding:
            metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=_drift_method(params)))
        with warnings.catch_warnings():
            # Evidently divides by a column's spread for its plots; a constant column (every image
            # 200x150) warns on every run without changing a result.
            warnings.simplefilter("ignore", RuntimeWarning)
            return Report(metrics, metadata={"project": params.project}).run(
                Dataset.from_pandas(cur[columns + embedding_cols], data_definition=definition),
                Dataset.from_pandas(ref[columns + embedding_cols], data_definition=definition),
            )

    found: dict[str, Any] = {"values": {}, "embedding_score": None, "notes": []}
    try:
        snapshot = report(bool(embedding_cols))
    except Exception as e:
        if not embedding_cols:
            raise
        snapshot = report(False)  # anything else that fails fails again here, with its traceback
        failed = f"Evidently's EmbeddingsDrift failed on this batch ({_one_line(e)})"
        method = params.embedding_method
        score, why = embedding_score(ref[embedding_cols], cur[embedding_cols], params)
        found["embedding_score"] = score
        found["notes"].append(
            f"{failed}: the score is the {method} method's, computed without its plot"
            if why is None
            else f"{failed}, and its {method} method alone fails too ({why}): no embedding test"
        )
        log.warning("%s", found["notes"][-1])
    for m in snapshot.dict()["metrics"]:
        cfg = m["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            found["values"][cfg["column"]] = float(m["value"])
        elif kind == "EmbeddingsDrift":
            found["embedding_score"] = float(m["value"])
    score = found["embedding_score"]
    if score is not None and not np.isfinite(score):
        found["embedding_score"] = None
        found["notes"].append(
            f"the embedding drift score is undefined on this batch ({score}): no embedding test"
        )
    found["methods"] = {
        c: (params.cat_method, params.cat_threshold)
        if c in categorical
        else (params.num_method, params.num_threshold)
        for c in columns
    }
    return snapshot, found


def embedding_score(
    ref_emb: pd.DataFrame, cur_emb: pd.DataFrame, params: DriftParams
) -> tuple[float | None, str | None]:
    """The embedding drift score of ``drift.embedding_method`` alone (no plot), or None and why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score, _drifted, _name = _drift_method(params)(cur_emb.copy(), ref_emb.copy())
    except Exception as e:  # the method's own failure on this batch: no score, said why
        return None, _one_line(e)
    score = float(score)
    return (score, None) if np.isfinite(score) else (None, f"score {score}")


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def count_distinct(frame: pd.DataFrame, embeddings: np.ndarray) -> int:
    """How many of the batch's images are different pictures: copies of one photograph (the same
    pixels, whatever the file) are one sample, so rows equal in size, pixel features and
    embedding count once; file size and JPEG quality are left out."""
    pixels = [c for c in IMAGE_FEATURES if c not in ("file_kb", "jpeg_quality")]
    table = np.column_stack([frame[pixels].to_numpy(dtype=float), embeddings])
    return len(pd.DataFrame(table).drop_duplicates())


def untestable(ref: pd.Series, cur: pd.Series, method: str, kind: str) -> tuple[str, bool] | None:
    """Why a feature gets no statistic on this batch, and whether it counts as not drifted; or None.

    One and the same value in the reference and the batch (every image 200x150): the two are
    identical, so not drifted; it is tested all the same when ``method`` gives a number on one
    value (wasserstein gives 0), and skipped when it does not (t_test: NaN; anderson: an error).
    Fewer than :data:`MIN_IMAGES` known values in the batch (an age known for 3 images), or none
    in the reference: not testable. ``kind``: num or cat.
    """
    r, c = ref.dropna(), cur.dropna()
    if not len(r):
        return "no values in the reference", False
    if len(c) < MIN_IMAGES:
        return f"{len(c)} known value(s) in the batch (< {MIN_IMAGES}): too few to test", False
    values = set(r.unique()) | set(c.unique())
    if len(values) == 1 and not defined_on_one_value(method, kind):
        value = _text(next(iter(values)))
        return (
            f"one value ({value}) in the reference and the batch: identical, counted as not drifted "
            f"({method} is undefined on one value)",
            True,
        )
    return None


@functools.cache
def defined_on_one_value(method: str, kind: str) -> bool:
    """Whether Evidently's test ``method`` gives a number when both samples hold one same value."""
    from evidently.legacy.calculations.stattests.registry import get_stattest

    value = "a" if kind == "cat" else 1.0
    ref, cur = pd.Series([value] * 2 * MIN_IMAGES), pd.Series([value] * MIN_IMAGES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = get_stattest(ref, cur, kind, method)(ref, cur, kind, None).drift_score
        return bool(np.isfinite(float(score)))
    except Exception:  # the test fails on it: that is the answer
        return False


def normed_wasserstein(ref: pd.Series, cur: pd.Series) -> float:
    """Wasserstein distance in reference standard deviations (Evidently's formula and floor)."""
    from scipy.stats import wasserstein_distance

    r = pd.to_numeric(ref, errors="coerce").dropna().to_numpy(dtype=float)
    c = pd.to_numeric(cur, errors="coerce").dropna().to_numpy(dtype=float)
    if not len(r) or not len(c):
        return 0.0
    return float(wasserstein_distance(r, c) / max(float(np.std(r)), 0.001))


def drifted(value: float, method: str, threshold: float) -> bool:
    """Evidently's rule: distances drift at >= threshold, p-values below it."""
    from evidently.legacy.calculations.stattests.registry import get_stattest

    st = get_stattest(pd.Series([0.0, 1.0]), pd.Series([0.0, 1.0]), "num", method)
    p_value_test = "p_value" in st.display_name.lower() or method in (
        "ks", "chisquare", "z", "t_test", "anderson", "cramer_von_mises", "mannw", "fisher_exact", "g_test",
        "emperical_mmd",
    )  # fmt: skip
    return value < threshold if p_value_test else value >= threshold


# --------------------------------------------------------------------------- outputs


def _listed(items: Sequence[str], more: str) -> str:
    """An HTML list of (already escaped) items, the first MAX_LISTED of them."""
    rows = "".join(f"<li>{i}</li>" for i in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        rows += f"<li>... and {len(items) - MAX_LISTED} more ({more})</li>"
    return f"<ul>{rows}</ul>"


def _bad_row_text(b: dict[str, Any]) -> str:
    """One bad metadata row for people: ``metadata.csv row 7, sex 'robot': why``."""
    where = f"{b['file']}" + (f" row {b['row']}" if b.get("row") is not None else "")
    what = f", {b['column']} {b['value']!r}" if b.get("column") else ""
    return f"{where}{what}: {b['why']}"


def _summary_html(m: dict[str, Any], reasons: list[tuple[str, str]]) -> str:
    """The verdict box on top of the report: the verdict, the tests, and everything left out."""
    if m["drift_detected"] is None:
        verdict, colour = m["verdict"].upper(), "#8a5a00"
    else:
        verdict = "DRIFT DETECTED" if m["drift_detected"] else "no drift detected"
        colour = "#b00020" if m["drift_detected"] else "#1b5e20"
    batch = (
        f"<p>Batch <code>{html.escape(m['batch'])}</code>: {m['n_images']} image(s) "
        + ("compared with " if m["drift_detected"] is not None else "and ")
        + f"the bundle's {m['n_reference']} {html.escape(m['reference_split'])} images "
        f"(embedding of <code>{html.escape(m['embedding_member'])}</code>).</p>"
    )
    if m["drift_detected"] is None:
        body = (
            f"<p><b>{html.escape(m['verdict_reason'])}</b>: no drift test was run. A batch needs at least "
            f"{m['min_images']} distinct images for Evidently's tests and its embedding classifier; "
            "add images to the batch and check it again.</p>"
        )
    else:
        emb = (
            f"<b>{m['embedding_drift']}</b> (score {m['embedding_drift_score']:.3f}, "
            f"method {html.escape(m['embedding_method'])}, threshold {m['embedding_threshold']:g})"
            if m["embedding_drift_score"] is not None
            else "<b>not tested</b> (see the notes)"
        )
        drifted_names = ", ".join(html.escape(f) for f in m["drifted_features"]) or "none"
        body = (
            f"<ul><li>dataset drift: <b>{m['dataset_drift']}</b> ({m['n_drifted_features']} of "
            f"{m['n_features']} features, share {m['drift_share']:.2f}; threshold "
            f"{m['drift_share_threshold']:.2f})</li>"
            f"<li>drifted features: {drifted_names}</li>"
            f"<li>single-feature alarm (a shift of >= {m['alarm_threshold']:g} reference std): "
            f"<b>{m['feature_alarm']}</b> {html.escape(', '.join(m['alarm_features']))}</li>"
            f"<li>embedding drift: {emb}</li>"
            "<li>predicted class mix vs reference: Jensen-Shannon distance "
            f"{m['prediction_class_shift']:.3f}</li>"
            f"<li>labelled batch: {m['labelled']}</li></ul>"
        )
    parts = [batch, body]
    if reasons:
        items = [f"<code>{html.escape(n)}</code>: {html.escape(w)}" for n, w in reasons]
        parts.append(f"<h3>{len(reasons)} unreadable file(s), left out of the statistics</h3>")
        parts.append(_listed(items, "metrics/drift.json"))
    else:
        parts.append("<p>Every image file was readable.</p>")
    skipped = m.get("skipped_features") or {}
    if skipped:
        items = [f"<code>{html.escape(c)}</code>: {html.escape(w)}" for c, w in skipped.items()]
        parts.append(f"<h3>{len(skipped)} feature(s) not tested</h3>" + _listed(items, "metrics/drift.json"))
    bad = m.get("metadata_bad_rows") or []
    if bad:
        parts.append(
            f"<h3>{len(bad)} metadata row problem(s): those rows are left out of the metadata comparison</h3>"
            + _listed([html.escape(_bad_row_text(b)) for b in bad], "metrics/drift.json")
        )
    notes = [*(m.get("metadata_notes") or []), *(m.get("notes") or [])]
    if notes:
        parts.append("<h3>Notes</h3>" + _listed([html.escape(n) for n in notes], "metrics/drift.json"))
    return (
        '<div id="skinlesion-drift-summary" style="font-family:sans-serif;margin:16px;padding:12px;'
        f'border:2px solid {colour};border-radius:6px">'
        f'<h2 style="color:{colour};margin-top:0">{html.escape(verdict)}</h2>{"".join(parts)}</div>'
    )


def write_report(snapshot: Any | None, report_dir: Path, summary: str) -> Path:
    """``index.html``: Evidently's report with the summary inserted at the top of its body (the
    summary alone when no test was run)."""
    with atomic_dir(report_dir) as tmp:
        page = tmp / "index.html"
        if snapshot is None:
            page.write_text(
                '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Drift check</title></head>'
                f"<body>{summary}</body></html>\n",
                encoding="utf-8",
            )
        else:
            snapshot.save_html(str(page))
            text = page.read_text(encoding="utf-8")
            at = text.find(">", text.find("<body")) + 1 if "<body" in text else 0
            page.write_text(text[:at] + summary + text[at:], encoding="utf-8")
    return report_dir / "index.html"


def add_to_workspace(snapshot: Any, workspace: Path, project_name: str, run_name: str) -> str:
    """Add the snapshot to a local Evidently workspace (creating the project and its dashboard)."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(workspace))
    found = ws.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = ws.create_project(project_name, description="Drift of new dermoscopy batches vs the bundle")
        project.dashboard.add_panel(
            line_plot_panel(
                title="Share of drifted features per batch",
                values=[
                    PanelMetric(
                        legend="drift share",
                        metric="DriftedColumnsCount",
                        metric_labels={"value_type": "share"},
                    )
                ],
            ),
            tab="Drift",
        )
        project.dashboard.add_panel(
            bar_plot_panel(
                title="Predicted class mix per batch",
                values=[
                    PanelMetric(
                        legend=c,
                        metric="UniqueValueCount",
                        metric_labels={"column": PRED_CLASS, "value_type": "share", "label": c},
                    )
                    for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
                ],
                stacked=True,
            ),
            tab="Drift",
        )
        project.dashboard.add_panel(
            line_plot_panel(
                title="Embedding drift score per batch",
                values=[PanelMetric(legend="embedding drift", metric="EmbeddingsDrift")],
            ),
            tab="Drift",
        )
    ref = ws.add_run(project.id, snapshot, include_data=False, name=run_name)
    return str(project.id) if ref is None else str(getattr(ref, "project_id", project.id))


# --------------------------------------------------------------------------- stage


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
        log.warning("metadata row left out of the comparison: %s", _bad_row_text(b))
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

    ref_pc, cur_pc = pca_columns(ref_emb, cur_emb, params.pca_components, seed)
    ref = pd.concat([ref_frame.reset_index(drop=True), ref_pc], axis=1)
    cur = pd.concat([cur_frame, cur_pc], axis=1)
    numerical = [*IMAGE_FEATURES, *MODEL_FEATURES, *ref_pc.columns]
    categorical = [PRED_CLASS]
    have = [c for c in (*META_NUM, *META_CAT) if c in ref.columns]
    if n_labelled and have:
        for c in have:
            values = pd.Series(joined[c].to_numpy())  # images without a usable row: unknown
            cur[c] = (values.astype(float) if c in META_NUM else values.fillna("unknown")).to_numpy()
        numerical += [c for c in META_NUM if c in have]
        categorical += [c for c in META_CAT if c in have]

    skipped: dict[str, str] = {}
    identical: list[str] = []
    for c in numerical + categorical:
        kind, method = ("cat", params.cat_method) if c in categorical else ("num", params.num_method)
        why = untestable(ref[c], cur[c], method, kind)
        if why is not None:
            skipped[c] = why[0]
            if why[1]:
                identical.append(c)
    tested = [c for c in numerical + categorical if c not in skipped]
    emb_cols = [f"emb_{i}" for i in range(ref_emb.shape[1])]
    ref_all = pd.concat([ref, pd.DataFrame(ref_emb, columns=emb_cols)], axis=1)
    cur_all = pd.concat([cur, pd.DataFrame(cur_emb, columns=emb_cols)], axis=1)
    snapshot, found = evidently_report(
        ref_all, cur_all, numerical=numerical, categorical=categorical, tested=tested,
        embedding_cols=emb_cols, params=params,
    )  # fmt: skip
    scores: dict[str, float] = {}
    for c in tested:
        v = found["values"].get(c)
        if v is not None and np.isfinite(v):
            scores[c] = v
        else:
            skipped[c] = f"{found['methods'][c][0]} gave no number on this batch ({v}): not tested"
    drifted_features = [c for c, v in scores.items() if drifted(v, *found["methods"][c])]
    # Features identical in both count as not drifted; untested ones do not count at all.
    n_counted = len(scores) + len(identical)
    share = len(drifted_features) / n_counted if n_counted else 0.0
    shifts = {c: normed_wasserstein(ref[c], cur[c]) for c in numerical if c not in skipped}
    alarm_features = [c for c, v in shifts.items() if v >= params.alarm_threshold]
    dataset_drift = bool(n_counted) and share >= params.drift_share
    emb_score = found["embedding_score"]
    # Evidently's own rule for every embedding method (without bootstrap): score > threshold.
    embedding_drift = None if emb_score is None else bool(emb_score > params.embedding_threshold)
    detected = bool(dataset_drift or embedding_drift or alarm_features)
    metrics.update({
        "verdict": "drift detected" if detected else "no drift detected",
        "verdict_reason": None,
        "drift_detected": detected,
        "dataset_drift": bool(dataset_drift),
        "drift_share": round(share, 6),
        "n_features": len(numerical) + len(categorical),
        "n_tested_features": len(scores),
        "n_drifted_features": len(drifted_features),
        "drifted_features": drifted_features,
        "feature_scores": {c: round(v, 6) for c, v in scores.items()},
        "skipped_features": skipped,
        "feature_alarm": bool(alarm_features),
        "alarm_features": alarm_features,
        "max_feature_shift": round(max(shifts.values(), default=0.0), 6),
        "embedding_drift": embedding_drift,
        "embedding_drift_score": None if emb_score is None else round(float(emb_score), 6),
        "prediction_class_shift": round(js_distance(ref[PRED_CLASS], cur[PRED_CLASS], bundle.classes), 6),
        "notes": found["notes"],
    })  # fmt: skip
    report = write_report(snapshot, Path(report_dir), _summary_html(metrics, unreadable))
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
    n, n_distinct = metrics["n_images"], metrics["n_distinct_images"]
    reason = (
        f"too few images for a drift test: {n} < {MIN_IMAGES}"
        if n < MIN_IMAGES
        else f"too few distinct images for a drift test: {n_distinct} < {MIN_IMAGES} "
        f"({n} images, the others copies of them)"
    )
    metrics.update({
        "verdict": TOO_FEW,
        "verdict_reason": reason,
        "drift_detected": None,
        "dataset_drift": None,
        "drift_share": None,
        "n_features": 0,
        "n_tested_features": 0,
        "n_drifted_features": 0,
        "drifted_features": [],
        "feature_scores": {},
        "skipped_features": {},
        "feature_alarm": None,
        "alarm_features": [],
        "max_feature_shift": None,
        "embedding_drift": None,
        "embedding_drift_score": None,
        "prediction_class_shift": None,
        "notes": ["no snapshot in the Evidently workspace: no test was run"],
    })  # fmt: skip
    unreadable = [(k, metrics["unreadable_reasons"][k]) for k in metrics["unreadable"]]
    report = write_report(None, Path(report_dir), _summary_html(metrics, unreadable))
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
