"""What a monitor run tells its operator: the Markdown artifact of each batch's drift check (with
the external validation of a labelled batch) and the run's ``monitor-summary``, and the artifact
key of a batch. Pure functions on plain values (no Prefect, no I/O); :mod:`flows.monitor`
publishes their output as Prefect artifacts.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.evaluation import EVALUATION_KEYS
from flows.ledger import Batch
from flows.report import fmt, mode_label, table, with_ci

if TYPE_CHECKING:  # the failure's type only: flows.monitor, which raises it, imports this module
    from flows.monitor import DriftCheckFailed

__all__ = [
    "MAX_LISTED",
    "evaluation_note",
    "file_link",
    "listed",
    "render_batch",
    "render_evaluation",
    "render_monitor_summary",
    "slug",
    "summary_line",
    "verdict_text",
]

MAX_LISTED = 30


def slug(name: str, *, max_len: int = 60) -> str:
    """A Prefect artifact key part (lowercase letters, digits, dashes) for a batch name. Names
    that are not one already get a short hash, so ``Clinic B`` and ``clinic-b`` stay apart."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:max_len].strip("-")
    if base == name:
        return base
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{base}-{digest}" if base else f"batch-{digest}"


def listed(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """Up to ``limit`` names in backticks, then how many more; ``none`` for none."""
    if not items:
        return "none"
    shown = ", ".join(f"`{x}`" for x in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def file_link(path: Path) -> str:
    """A Markdown link to a local file, with its path."""
    return f"[{path.name}]({path.resolve().as_uri()}) (`{path}`)"


def evaluation_note(evaluation: Mapping[str, Any] | None, error: str | None = None) -> str:
    """One line on a labelled batch's external validation: the malignant recall per mode."""
    if error is not None:
        return f"FAILED ({error[:200]})"
    if evaluation is None:
        return "—"
    parts = [
        f"{fmt(m.get('test_malignant_recall'))} {mode_label(mode)}" for mode, m in evaluation["modes"].items()
    ]
    return "malignant recall " + ", ".join(parts)


def _skipped(item: Any) -> str:
    """A row ``serve.evaluate`` left out: ``{"image_id", "file", "line", "reason"}``."""
    if not isinstance(item, Mapping):
        return str(item)
    return f"{item.get('image_id') or '(no image_id)'}: {item.get('reason', '')}".rstrip(": ")


def render_evaluation(evaluation: Mapping[str, Any] | None, error: str | None = None) -> list[str]:
    """The artifact's section on a labelled batch scored by ``serve.evaluate``: its headline
    metrics, one column per input mode ([95% CI] where the result has one)."""
    lines = ["## External validation: the labelled batch scored by the bundle (`serve.evaluate`)", ""]
    if error is not None:
        return lines + [f"**Failed**, the drift check above stands: {error}", ""]
    assert evaluation is not None
    modes = list(evaluation["modes"].items())
    skipped = [_skipped(x) for x in evaluation.get("skipped") or []]
    bundle = evaluation.get("bundle") or {}
    shown = f"`{bundle['path']}`" if bundle.get("path") else "—"
    if bundle.get("label"):
        shown += f" ({bundle['label']})"
    if bundle.get("synthetic"):
        shown += ": trained on SYNTHETIC images, these numbers say nothing about real lesions"
    facts = [
        ("bundle", shown),
        ("images", f"{fmt(evaluation.get('n_images'))} scored, {fmt(evaluation.get('n_skipped'))} skipped"),
    ]
    lines += table(["", ""], facts) + [""]
    keys = [k for k in EVALUATION_KEYS if any(k in m for _, m in modes)]
    rows = [[k, *(with_ci(m, k) for _, m in modes)] for k in keys]
    lines += table(["metric", *(mode_label(mode) for mode, _ in modes)], rows) + [""]
    if len(modes) > 1:
        lines += [
            "With metadata: each image with its own age, sex and localization where all three are "
            "known, else image only; image only: every image without.",
            "",
        ]
    if skipped:
        lines += [f"Skipped: {listed(skipped)}.", ""]
    return lines


def verdict_text(m: Mapping[str, Any], *, drift: str = "DRIFT") -> str:
    """The drift check's verdict in a few words; a batch the check could not judge (too few
    images: ``drift_detected`` null) says why instead of passing for "no drift"."""
    if m.get("drift_detected") is None:
        return str(m.get("verdict_reason") or m.get("verdict") or "no verdict")
    return drift if m.get("drift_detected") else "no drift"


def render_batch(
    batch: Batch,
    why: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    failure: DriftCheckFailed | None = None,
    report: Path | None = None,
    retrain_note: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
    evaluation_error: str | None = None,
) -> str:
    """The markdown artifact of one batch's check."""
    if failure is not None:
        lines = [f"# Drift check `{batch.name}`: FAILED", "", f"**Error:** {failure.error}", ""]
        lines += table(["", ""], [("batch", f"`{batch.path}` ({why}, {batch.n_files} files)")]) + [""]
        lines += ["## Last output lines", "", "```text", failure.tail.strip()[-4000:], "```", ""]
        return "\n".join(lines)
    m = metrics or {}
    verdict = verdict_text(m, drift="DRIFT DETECTED")
    share = m.get("predicted_class_share") or {}
    mix = ", ".join(f"{c} {fmt(v)}" for c, v in sorted(share.items(), key=lambda kv: -kv[1]) if v) or "—"
    labelled = f"yes ({m.get('n_labelled')} rows, `{m.get('metadata_csv')}`)" if m.get("labelled") else "no"
    rows = [
        ("batch", f"`{batch.path}` ({why}, {batch.n_files} files, fingerprint `{batch.fingerprint[:12]}`)"),
        ("images", f"{fmt(m.get('n_images'))} checked, {fmt(m.get('n_unreadable'))} unreadable"),
        ("labelled", labelled),
        ("dataset drift", f"{fmt(m.get('dataset_drift'))}: {fmt(m.get('n_drifted_features'))} of "
         f"{fmt(m.get('n_features'))} features, share {fmt(m.get('drift_share'))} "
         f"(threshold {fmt(m.get('drift_share_threshold'))})"),
        ("drifted features", listed(m.get("drifted_features") or [])),
        ("single-feature alarm", f"{fmt(m.get('feature_alarm'))}: {listed(m.get('alarm_features') or [])}"),
        ("embedding drift", f"{fmt(m.get('embedding_drift'))}: score {fmt(m.get('embedding_drift_score'))} "
         f"({m.get('embedding_method', '—')}, threshold {fmt(m.get('embedding_threshold'))})"),
        ("predicted class shift",
         f"Jensen-Shannon distance {fmt(m.get('prediction_class_shift'))} vs the reference"),
        ("predicted class mix", mix),
        ("report", file_link(report) if report else "—"),
    ]  # fmt: skip
    evaluated = evaluation is not None or evaluation_error is not None
    if evaluated:
        rows.append(("external validation", evaluation_note(evaluation, evaluation_error)))
    if retrain_note:
        rows.append(("retrain", retrain_note))
    lines = [f"# Drift check `{batch.name}`: {verdict}", ""] + table(["", ""], rows) + [""]
    if evaluated:
        lines += render_evaluation(evaluation, evaluation_error)
    unreadable = m.get("unreadable") or []
    if unreadable:
        reasons = m.get("unreadable_reasons") or {}
        lines += [f"## {len(unreadable)} unreadable file(s), left out of the statistics", ""]
        lines += [f"- `{n}`: {reasons.get(n, '')}" for n in unreadable[:MAX_LISTED]]
        if len(unreadable) > MAX_LISTED:
            lines.append(f"- ... and {len(unreadable) - MAX_LISTED} more (the metrics JSON lists all)")
        lines.append("")
    return "\n".join(lines)


def render_monitor_summary(summary: Mapping[str, Any], rows: Sequence[Sequence[Any]]) -> str:
    """The run's ``monitor-summary`` artifact."""
    n_failed = len(summary["failed"])
    title = "FAILED" if n_failed else ("drift found" if summary["drifted"] else "ok")
    lines = [f"# Monitor `{summary['flow_run']}`: {title}", ""]
    facts = [
        ("inbox", f"`{summary['inbox']}`" + ("" if summary["inbox_exists"] else " (not found)")),
        ("bundle", f"`{summary['bundle']}`" if summary.get("bundle") else "— (nothing to check)"),
        ("checked", str(len(summary["checked"]))),
        ("drifted", listed(summary["drifted"])),
        ("failed", listed(summary["failed"])),
        ("already seen, skipped", str(len(summary["skipped"]))),
        ("retrain trigger", "on" if summary["trigger_retrain"] else "off (events labelled retrain: false)"),
    ]  # fmt: skip
    lines += table(["", ""], facts) + [""]
    if rows:
        header = ["batch", "result", "drift share", "embedding score", "labelled", "event"]
        lines += ["## Batches checked", ""] + table(header, rows) + [""]
    return "\n".join(lines)


def summary_line(s: Mapping[str, Any]) -> str:
    """The run in one line: how many batches were checked, drifted, failed, already seen."""
    return (
        f"{len(s['checked'])} checked, {len(s['drifted'])} drifted, {len(s['failed'])} failed, "
        f"{len(s['skipped'])} already seen"
    )
