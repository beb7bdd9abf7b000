"""The drift check's outputs beside the metrics: the HTML report and the Evidently workspace.

``index.html`` is Evidently's report with a summary box inserted on top (the verdict, the tests,
every unreadable file, feature not tested and metadata row left out); a batch too small for any
test gets the summary alone. The snapshot joins a local Evidently workspace (``evidently ui
--workspace <drift.workspace>``) so batches can be followed over time.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skinlesion.checks.drift_metadata import bad_row_text
from skinlesion.core.outputs import atomic_dir
from skinlesion.measure.imagefeatures import PRED_CLASS

MAX_LISTED = 50


def _listed(items: Sequence[str], more: str) -> str:
    """An HTML list of (already escaped) items, the first MAX_LISTED of them."""
    rows = "".join(f"<li>{i}</li>" for i in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        rows += f"<li>... and {len(items) - MAX_LISTED} more ({more})</li>"
    return f"<ul>{rows}</ul>"


def summary_html(m: dict[str, Any], reasons: list[tuple[str, str]]) -> str:
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
            + _listed([html.escape(bad_row_text(b)) for b in bad], "metrics/drift.json")
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
