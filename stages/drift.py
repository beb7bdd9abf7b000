"""Drift stage: does a batch of new images look like the data the bundle was trained on?

For every image of the batch (``drift.new_images``: a folder, searched recursively; a HAM10000
metadata CSV in it makes it a *labelled* batch) it computes the same per-image table the bundle
stores for its training split (:mod:`stages.imagefeatures`: size, compression, brightness,
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
named in both outputs and left out of the statistics; a missing or empty folder is an error.
"""

from __future__ import annotations

import argparse
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

from stages.bundle import Bundle, read_drift_reference
from stages.common import (
    HAM_COLUMNS,
    StageError,
    atomic_dir,
    n_workers,
    run_main,
    setup_logging,
    write_json,
)
from stages.imagefeatures import (
    IMAGE_FEATURES,
    MODEL_FEATURES,
    PRED_CLASS,
    FeatureSpec,
    build_table,
    split_embeddings,
)
from stages.images import list_images
from stages.metadata import read_table
from stages.params import DriftParams, load_params

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


@dataclass(frozen=True)
class DriftResult:
    metrics: dict[str, Any]
    report: Path
    seconds: float


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


def batch_metadata(folder: Path) -> tuple[pd.DataFrame | None, Path | None]:
    """The batch's HAM10000 metadata table (first ``*.csv`` with the HAM columns), if any."""
    for path in sorted(folder.rglob("*.csv")):
        try:
            df = read_table(path)
        except StageError as e:
            log.warning("%s: not a readable CSV, ignored (%s)", path, e)
            continue
        df.columns = [c.strip() for c in df.columns]
        if set(HAM_COLUMNS) <= set(df.columns):
            return df[list(HAM_COLUMNS)].reset_index(drop=True), path
        log.info("%s: not a HAM10000 metadata table (columns %s), ignored", path, list(df.columns))
    return None, None


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
    embedding_cols: list[str],
    params: DriftParams,
) -> tuple[Any, dict[str, Any]]:
    """Run the Evidently report; return the snapshot and what it found, flat."""
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
    metrics: list[Any] = [
        DataDriftPreset(
            columns=columns,
            drift_share=params.drift_share,
            num_method=params.num_method,
            num_threshold=params.num_threshold,
            cat_method=params.cat_method,
            cat_threshold=params.cat_threshold,
        ),
        UniqueValueCount(column=PRED_CLASS),
    ]
    if embedding_cols:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=_drift_method(params)))
    with warnings.catch_warnings():
        # Evidently divides by a column's spread for its plots; a constant column (every image
        # 200x150) warns on every run without changing a result.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report(metrics, metadata={"project": params.project}).run(
            Dataset.from_pandas(cur[columns + embedding_cols], data_definition=definition),
            Dataset.from_pandas(ref[columns + embedding_cols], data_definition=definition),
        )
    found: dict[str, Any] = {"values": {}, "embedding_score": None}
    for m in snapshot.dict()["metrics"]:
        cfg = m["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            found["n_drifted"] = int(m["value"]["count"])
            found["share"] = float(m["value"]["share"])
        elif kind == "ValueDrift":
            found["values"][cfg["column"]] = float(m["value"])
        elif kind == "EmbeddingsDrift":
            found["embedding_score"] = float(m["value"])
    found["methods"] = {
        c: (params.cat_method, params.cat_threshold)
        if c in categorical
        else (params.num_method, params.num_threshold)
        for c in columns
    }
    return snapshot, found


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


def _summary_html(m: dict[str, Any], reasons: list[tuple[str, str]]) -> str:
    verdict = "DRIFT DETECTED" if m["drift_detected"] else "no drift detected"
    colour = "#b00020" if m["drift_detected"] else "#1b5e20"
    rows = "".join(
        f"<li><code>{html.escape(n)}</code>: {html.escape(w)}</li>" for n, w in reasons[:MAX_LISTED]
    )
    more = (
        f"<li>... and {len(reasons) - MAX_LISTED} more (metrics/drift.json)</li>"
        if len(reasons) > MAX_LISTED
        else ""
    )
    bad = (
        f"<h3>{len(reasons)} unreadable file(s), left out of the statistics</h3><ul>{rows}{more}</ul>"
        if reasons
        else "<p>Every image file was readable.</p>"
    )
    drifted_names = ", ".join(html.escape(f) for f in m["drifted_features"]) or "none"
    return (
        '<div id="skinlesion-drift-summary" style="font-family:sans-serif;margin:16px;padding:12px;'
        f'border:2px solid {colour};border-radius:6px">'
        f'<h2 style="color:{colour};margin-top:0">{verdict}</h2>'
        f"<p>Batch <code>{html.escape(m['batch'])}</code>: {m['n_images']} image(s) compared with "
        "the bundle's "
        f"{m['n_reference']} {html.escape(m['reference_split'])} images "
        f"(embedding of <code>{html.escape(m['embedding_member'])}</code>).</p>"
        f"<ul><li>dataset drift: <b>{m['dataset_drift']}</b> ({m['n_drifted_features']} of {m['n_features']} "
        f"features, share {m['drift_share']:.2f}; threshold {m['drift_share_threshold']:.2f})</li>"
        f"<li>drifted features: {drifted_names}</li>"
        f"<li>single-feature alarm (a shift of >= {m['alarm_threshold']:g} reference std): "
        f"<b>{m['feature_alarm']}</b> {html.escape(', '.join(m['alarm_features']))}</li>"
        f"<li>embedding drift: <b>{m['embedding_drift']}</b> (score {m['embedding_drift_score']:.3f}, "
        f"method {html.escape(m['embedding_method'])}, threshold {m['embedding_threshold']:g})</li>"
        "<li>predicted class mix vs reference: Jensen-Shannon distance "
        f"{m['prediction_class_shift']:.3f}</li>"
        f"<li>labelled batch: {m['labelled']}</li></ul>{bad}</div>"
    )


def write_report(snapshot: Any, report_dir: Path, summary: str) -> Path:
    """``index.html``: Evidently's report with the summary inserted at the top of its body."""
    with atomic_dir(report_dir) as tmp:
        snapshot.save_html(str(tmp / "index.html"))
        text = (tmp / "index.html").read_text(encoding="utf-8")
        at = text.find(">", text.find("<body")) + 1 if "<body" in text else 0
        (tmp / "index.html").write_text(text[:at] + summary + text[at:], encoding="utf-8")
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
) -> DriftResult:
    t0 = time.perf_counter()
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise StageError(f"drift.new_images: {images_dir}: folder not found")
    if not images_dir.is_dir():
        raise StageError(f"drift.new_images: {images_dir}: not a folder")
    files = list_images(images_dir)
    if not files:
        raise StageError(
            f"drift.new_images: {images_dir}: no image files (*.jpg, *.jpeg, *.png, *.bmp, *.tif, *.webp)"
        )
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
    unreadable = table.unreadable
    for name, why in unreadable:
        log.warning("unreadable, left out of the statistics: %s: %s", name, why)
    if table.frame.empty:
        first = "; ".join(f"{n}: {w}" for n, w in unreadable[:5])
        raise StageError(
            f"drift.new_images: {images_dir}: none of the {len(files)} image file(s) is readable ({first})"
        )

    ref_frame, ref_emb = split_embeddings(reference)
    cur_frame, cur_emb = table.frame.reset_index(drop=True), table.embeddings
    ref_pc, cur_pc = pca_columns(ref_emb, cur_emb, params.pca_components, seed)
    ref = pd.concat([ref_frame.reset_index(drop=True), ref_pc], axis=1)
    cur = pd.concat([cur_frame, cur_pc], axis=1)
    numerical = [*IMAGE_FEATURES, *MODEL_FEATURES, *ref_pc.columns]
    categorical = [PRED_CLASS]

    meta, meta_path = batch_metadata(images_dir)
    n_labelled = 0
    if meta is not None:
        stems = cur["name"].map(lambda n: Path(n).stem)
        joined = meta.drop_duplicates("image_id").set_index("image_id").reindex(stems)
        n_labelled = int(joined["dx"].fillna("").ne("").sum())
        have = [c for c in (*META_NUM, *META_CAT) if c in ref.columns]
        if n_labelled and have:
            for c in have:
                values = pd.Series(joined[c].to_numpy())
                cur[c] = (
                    pd.to_numeric(values, errors="coerce")
                    if c in META_NUM
                    else values.replace("", "unknown").fillna("unknown")
                ).to_numpy()
            numerical += [c for c in META_NUM if c in have]
            categorical += [c for c in META_CAT if c in have]

    emb_cols = [f"emb_{i}" for i in range(ref_emb.shape[1])]
    ref_all = pd.concat([ref, pd.DataFrame(ref_emb, columns=emb_cols)], axis=1)
    cur_all = pd.concat([cur, pd.DataFrame(cur_emb, columns=emb_cols)], axis=1)
    snapshot, found = evidently_report(
        ref_all, cur_all, numerical=numerical, categorical=categorical, embedding_cols=emb_cols, params=params
    )
    drifted_features = [c for c, v in found["values"].items() if drifted(v, *found["methods"][c])]
    shifts = {c: normed_wasserstein(ref[c], cur[c]) for c in numerical}
    alarm_features = [c for c, v in shifts.items() if v >= params.alarm_threshold]
    n_features = len(numerical) + len(categorical)
    dataset_drift = found["share"] >= params.drift_share if n_features else False
    emb_score = found["embedding_score"]
    # Evidently's own rule for every embedding method (without bootstrap): score > threshold.
    embedding_drift = bool(emb_score is not None and emb_score > params.embedding_threshold)
    name = batch_name or images_dir.name
    metrics: dict[str, Any] = {
        "batch": name,
        "drift_detected": bool(dataset_drift or embedding_drift or alarm_features),
        "dataset_drift": bool(dataset_drift),
        "drift_share": round(found["share"], 6),
        "drift_share_threshold": params.drift_share,
        "n_features": n_features,
        "n_drifted_features": len(drifted_features),
        "drifted_features": drifted_features,
        "feature_scores": {c: round(v, 6) for c, v in found["values"].items()},
        "feature_alarm": bool(alarm_features),
        "alarm_features": alarm_features,
        "alarm_threshold": params.alarm_threshold,
        "max_feature_shift": round(max(shifts.values(), default=0.0), 6),
        "embedding_drift": embedding_drift,
        "embedding_drift_score": round(float(emb_score or 0.0), 6),
        "embedding_method": params.embedding_method,
        "embedding_threshold": params.embedding_threshold,
        "embedding_member": bundle.best,
        "prediction_class_shift": round(js_distance(ref[PRED_CLASS], cur[PRED_CLASS], bundle.classes), 6),
        "predicted_class_share": {c: round(float((cur[PRED_CLASS] == c).mean()), 6) for c in bundle.classes},
        "n_images": len(cur),
        "n_unreadable": len(unreadable),
        "unreadable": [n for n, _ in unreadable],
        "unreadable_reasons": {n: w for n, w in unreadable},
        "n_reference": len(ref),
        "reference_split": str(entry.get("split", "train")),
        "labelled": bool(n_labelled),
        "n_labelled": n_labelled,
        "metadata_csv": str(meta_path) if meta_path else None,
    }
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
        "drift: %s (%d of %d features drifted%s; embedding %s, score %.3f); %d unreadable; %s (%.1f s)",
        "DRIFT" if metrics["drift_detected"] else "no drift", len(drifted_features), n_features,
        f": {', '.join(drifted_features)}" if drifted_features else "",
        "drifted" if embedding_drift else "stable",
        metrics["embedding_drift_score"], len(unreadable), report, seconds,
    )  # fmt: skip
    return DriftResult(metrics, report, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.drift",
        description="Check a folder of new images for drift against the reference stored in a model "
        "bundle (Evidently DataDriftPreset + EmbeddingsDrift). Writes an HTML report, a flat metrics "
        "JSON and a snapshot in the local Evidently workspace. Exit 0 whatever the verdict (it is in "
        "the metrics); 1 for a missing/empty folder or bundle.",
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
        params = load_params(args.params)
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
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
