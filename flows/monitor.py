"""The ``monitor`` flow: check every new batch of images in the inbox for drift, once.

A batch is a sub-folder of the inbox (``drift.inbox``). It is known by its name and a
fingerprint of its files (relative path, size, mtime), kept in a ledger
(``<drift.monitor_state>/ledger.json``, written atomically), so a batch is never checked twice
and a batch whose files changed is checked again. Each new or changed batch is one task running
the drift check (``python -m stages.drift``) from the repository root, its output lines going to
the run log; the flow itself only composes.

For every batch checked the flow publishes a markdown artifact ``drift-<batch slug>`` (verdict,
drifted features, embedding score, class shift, unreadable files, the report's path), and at the
end ``monitor-summary``. On drift it emits the Prefect event ``skinlesion.drift.detected`` (the
batch is the resource); the ``retrain/on-demand`` deployment's trigger in ``prefect.yaml`` runs
on it. The event hands labelled batches (a HAM10000 metadata CSV in the folder) to that retrain
in its payload's ``extra_sources``; the retrain appends them to ``download.extra_sources``, so
they join the next data version. ``drift.trigger_retrain: false`` (or the flow parameter)
labels the event so that the trigger ignores it.

A labelled batch (its metadata table has a ``dx`` column: the drift check says ``labelled``) is
also scored against its labels, as an external validation of the bundle: ``python -m
serve.evaluate`` (a subprocess, so TensorFlow stays out of this process) writes
``batches/<batch>/evaluation.json``, whose headline metrics, per input mode ("with metadata",
"image only"), go into the batch's artifact and, with a workspace, into the Evidently project
``<drift.project>: external validation``. That check is an extra: when it fails the monitor logs
a warning and carries on; the drift verdict, the event and the ledger never depend on it.

Run it once, locally, with no server (ephemeral API; an event then starts nothing)::

    python -m flows.monitor --help

Deployed (``prefect.yaml``): ``prefect deployment run 'monitor/daily'``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from flows.dvcops import Layout, stream_command, subprocess_env
from flows.report import _table, fmt, mode_label, with_ci
from skinlesion.core.outputs import write_json
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA
from skinlesion.params.load import load_params

__all__ = [
    "EVENT",
    "Batch",
    "drift_event",
    "evaluation_values",
    "fingerprint",
    "load_ledger",
    "main",
    "monitor",
    "plan_checks",
    "read_evaluation",
    "render_evaluation",
    "scan_inbox",
    "slug",
]

EVENT = "skinlesion.drift.detected"
RESOURCE_PREFIX = "skinlesion.batch."
SUMMARY_KEY = "monitor-summary"
LEDGER = "ledger.json"
LEDGER_VERSION = 1
# Under drift.monitor_state: batches/<batch>/drift.json and batches/<batch>/report/index.html.
# Not under reports/drift: that folder is the `drift` stage's DVC output, which `dvc repro drift`
# replaces as a whole (and a promotion commits reports/ to git; each report is ~5 MB of HTML).
BATCHES = "batches"
BUNDLE_FILE = "bundle.json"
MAX_LISTED = 30
EVALUATION_FILE = "evaluation.json"  # beside drift.json: serve.evaluate's output for a labelled batch
# The metrics of serve.evaluate shown per input mode (artifact) and recorded (Evidently), in order.
EVALUATION_KEYS = (
    "n_images",
    "share_metadata",
    "macro_auc",
    "lesion_macro_auc",
    "malignant_auc",
    "test_malignant_recall",
    "lesion_test_malignant_recall",
    "test_specificity",
    "test_ppv",
    "referrals_per_100",
    "balanced_accuracy_decision",
    "ece_after",
    "threshold",
)
# The Evidently dashboard's panels: one line per input mode over the evaluated batches.
EVALUATION_PANELS = (
    ("Malignant recall on labelled batches", "test_malignant_recall"),
    ("Specificity on labelled batches", "test_specificity"),
    ("Macro AUC on labelled batches", "macro_auc"),
    ("Balanced accuracy of the decisions on labelled batches", "balanced_accuracy_decision"),
)


class MonitorFailed(RuntimeError):
    """The monitor could not run, or a batch check failed (the summary artifact says which)."""


class BatchCommandFailed(RuntimeError):
    """A command run on one batch exited non-zero; ``error`` is the line it printed."""

    what = "command"

    def __init__(self, batch: str, returncode: int, tail: Sequence[str]) -> None:
        errors = [ln for ln in tail if ln.startswith("error: ")]
        # `error: ...` is the command's one-line verdict on a bad batch (missing/empty folder, no
        # readable image, a bundle without a drift reference); anything else is a crash.
        self.expected = returncode == 1 and bool(errors)
        last = (errors or [ln for ln in tail if ln.strip()] or [f"exit {returncode}"])[-1]
        self.error = last.removeprefix("error: ")[:500]
        self.batch = batch
        self.returncode = returncode
        self.tail = "\n".join(tail)
        super().__init__(f"{self.what} of {batch!r} failed (exit {returncode}): {self.error}")


class DriftCheckFailed(BatchCommandFailed):
    """``stages.drift`` exited non-zero for a batch."""

    what = "drift check"


class EvaluationFailed(BatchCommandFailed):
    """``serve.evaluate`` exited non-zero for a labelled batch (or wrote no usable result)."""

    what = "external validation"


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class Batch:
    """One sub-folder of the inbox as it is now."""

    name: str
    path: Path  # absolute
    fingerprint: str
    n_files: int


def _visible(name: str) -> bool:
    # Hidden entries are skipped: copy a batch in as `.clinic-x` and rename it when complete, and
    # the monitor never checks half a batch; .DS_Store and the like change nothing.
    return not name.startswith(".")


def fingerprint(folder: Path) -> tuple[str, int]:
    """sha256 of the sorted (relative path, size, mtime) of every file under ``folder`` (hidden
    files and folders left out), and the number of files. Contents are not read: a changed file
    has another size or mtime."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        for name in filenames:
            if not _visible(name):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:  # removed (or a dangling link) while we walked
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}")
    entries.sort()
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest(), len(entries)


def scan_inbox(inbox: Path) -> list[Batch]:
    """The batches in ``inbox`` (its visible sub-folders), by name; [] when it does not exist."""
    if not inbox.is_dir():
        return []
    out = []
    for entry in sorted(inbox.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and _visible(entry.name):
            fp, n = fingerprint(entry)
            out.append(Batch(entry.name, entry.resolve(), fp, n))
    return out


def slug(name: str, *, max_len: int = 60) -> str:
    """A Prefect artifact key part (lowercase letters, digits, dashes) for a batch name. Names
    that are not one already get a short hash, so ``Clinic B`` and ``clinic-b`` stay apart."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:max_len].strip("-")
    if base == name:
        return base
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{base}-{digest}" if base else f"batch-{digest}"


def new_ledger() -> dict[str, Any]:
    return {"version": LEDGER_VERSION, "batches": {}}


def load_ledger(path: Path) -> dict[str, Any]:
    """The ledger, or an empty one when there is none yet. An unreadable ledger is an error, not
    a fresh start: starting over would check every batch again and start a retrain per drift."""
    if not path.exists():
        return new_ledger()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MonitorFailed(f"{path}: unreadable monitor ledger ({e}); repair it or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("batches"), dict):
        raise MonitorFailed(f"{path}: not a monitor ledger (no 'batches' mapping); repair it or move it away")
    return data


def save_ledger(path: Path, ledger: Mapping[str, Any]) -> None:
    """Write the ledger atomically (temp file, then rename over the old one)."""
    write_json(path, ledger)


def plan_checks(
    batches: Iterable[Batch], ledger: Mapping[str, Any]
) -> tuple[list[tuple[Batch, str]], list[Batch]]:
    """Batches to check, each with why (``new`` or ``changed``), and the batches already seen."""
    known = ledger.get("batches", {})
    todo: list[tuple[Batch, str]] = []
    seen: list[Batch] = []
    for b in batches:
        entry = known.get(b.name)
        if entry is None:
            todo.append((b, "new"))
        elif entry.get("fingerprint") != b.fingerprint:
            todo.append((b, "changed"))
        else:
            seen.append(b)
    return todo, seen


def record_check(
    ledger: dict[str, Any],
    batch: Batch,
    *,
    at: str,
    flow_run_name: str,
    metrics: Mapping[str, Any] | None = None,
    error: str | None = None,
    metrics_path: Path | None = None,
    report: Path | None = None,
) -> dict[str, Any]:
    """Put a batch's check (``metrics``) or its failure (``error``) into the ledger."""
    m = metrics or {}
    entry = {
        "path": str(batch.path),
        "fingerprint": batch.fingerprint,
        "n_files": batch.n_files,
        "status": "failed" if error is not None else "checked",
        "checked_at": at,
        "flow_run": flow_run_name,
        "error": error,
        "drift_detected": bool(m.get("drift_detected", False)),
        "labelled": bool(m.get("labelled", False)),
        "n_images": m.get("n_images"),
        "metrics": str(metrics_path) if metrics_path and error is None else None,
        "report": str(report) if report and error is None else None,
        # A re-checked batch is new data: it is handed to a retrain again.
        "handed_over": False,
        "handed_over_at": None,
        "event_id": None,
    }
    ledger.setdefault("batches", {})[batch.name] = entry
    return entry


def pending_labelled(ledger: Mapping[str, Any], *, exists: bool = True) -> list[str]:
    """Absolute paths of checked labelled batches not yet handed to a retrain, oldest first
    (those whose folder is gone are left out when ``exists``)."""
    entries = [
        (e.get("checked_at") or "", name, e)
        for name, e in ledger.get("batches", {}).items()
        if e.get("status") == "checked" and e.get("labelled") and not e.get("handed_over")
    ]
    paths = [e["path"] for _, _, e in sorted(entries, key=lambda t: (t[0], t[1]))]
    return [p for p in paths if not exists or Path(p).is_dir()]


def mark_handed_over(ledger: dict[str, Any], paths: Iterable[str], *, at: str, event_id: str | None) -> None:
    wanted = set(paths)
    for entry in ledger.get("batches", {}).values():
        if entry.get("path") in wanted:
            entry["handed_over"], entry["handed_over_at"], entry["event_id"] = True, at, event_id


EVENT_METRICS = (
    "drift_detected",
    "dataset_drift",
    "drift_share",
    "n_drifted_features",
    "drifted_features",
    "feature_alarm",
    "alarm_features",
    "embedding_drift",
    "embedding_drift_score",
    "prediction_class_shift",
    "n_images",
    "n_unreadable",
    "labelled",
    "n_labelled",
)


def drift_event(
    batch: Batch,
    metrics: Mapping[str, Any],
    *,
    retrain: bool,
    extra_sources: Sequence[str],
    report: Path,
    metrics_path: Path,
) -> tuple[dict[str, str], dict[str, Any]]:
    """The resource (labels are strings, what the trigger matches on) and the payload of a
    ``skinlesion.drift.detected`` event. ``extra_sources`` travels as a JSON string: the retrain
    trigger's template passes it unchanged to the flow's ``extra_sources`` parameter."""
    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{batch.name}",
        "prefect.resource.name": batch.name,
        "skinlesion.retrain": "true" if retrain else "false",
        "skinlesion.labelled": "true" if metrics.get("labelled") else "false",
    }
    payload = {
        "batch": batch.name,
        "path": str(batch.path),
        "fingerprint": batch.fingerprint,
        **{k: metrics.get(k) for k in EVENT_METRICS},
        "report": str(report),
        "metrics": str(metrics_path),
        "extra_sources": json.dumps(list(extra_sources)),
    }
    return resource, payload


def _names(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    if not items:
        return "none"
    shown = ", ".join(f"`{x}`" for x in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def file_link(path: Path) -> str:
    return f"[{path.name}]({path.resolve().as_uri()}) (`{path}`)"


def read_evaluation(path: Path) -> dict[str, Any]:
    """``serve.evaluate``'s result (``{"bundle", "folder", "n_images", "n_skipped", "skipped",
    "modes": {mode: metrics}}``), checked for what the monitor reads; ValueError names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable evaluation result ({e})") from None
    modes = data.get("modes") if isinstance(data, dict) else None
    if not isinstance(modes, dict) or not modes or not all(isinstance(m, dict) for m in modes.values()):
        raise ValueError(f"{path}: not an evaluation result (no 'modes' mapping of metrics)")
    return data


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def evaluation_values(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of an evaluation, flat: ``<metric>_<mode>`` (``macro_auc_image_only``);
    what is missing or not a finite number is left out."""
    out: dict[str, float] = {}
    for mode, m in evaluation["modes"].items():
        for key in EVALUATION_KEYS:
            v = _number(m.get(key))
            if v is not None:
                out[f"{key}_{mode}"] = v
    return out


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
    lines += _table(["", ""], facts) + [""]
    keys = [k for k in EVALUATION_KEYS if any(k in m for _, m in modes)]
    rows = [[k, *(with_ci(m, k) for _, m in modes)] for k in keys]
    lines += _table(["metric", *(mode_label(mode) for mode, _ in modes)], rows) + [""]
    if len(modes) > 1:
        lines += [
            "With metadata: each image with its own age, sex and localization where all three are "
            "known, else image only; image only: every image without.",
            "",
        ]
    if skipped:
        lines += [f"Skipped: {_names(skipped)}.", ""]
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
        lines += _table(["", ""], [("batch", f"`{batch.path}` ({why}, {batch.n_files} files)")]) + [""]
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
        ("drifted features", _names(m.get("drifted_features") or [])),
        ("single-feature alarm", f"{fmt(m.get('feature_alarm'))}: {_names(m.get('alarm_features') or [])}"),
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
    lines = [f"# Drift check `{batch.name}`: {verdict}", ""] + _table(["", ""], rows) + [""]
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


def render_summary(summary: Mapping[str, Any], rows: Sequence[Sequence[Any]]) -> str:
    """The run's ``monitor-summary`` artifact."""
    n_failed = len(summary["failed"])
    title = "FAILED" if n_failed else ("drift found" if summary["drifted"] else "ok")
    lines = [f"# Monitor `{summary['flow_run']}`: {title}", ""]
    facts = [
        ("inbox", f"`{summary['inbox']}`" + ("" if summary["inbox_exists"] else " (not found)")),
        ("bundle", f"`{summary['bundle']}`" if summary.get("bundle") else "— (nothing to check)"),
        ("checked", str(len(summary["checked"]))),
        ("drifted", _names(summary["drifted"])),
        ("failed", _names(summary["failed"])),
        ("already seen, skipped", str(len(summary["skipped"]))),
        ("retrain trigger", "on" if summary["trigger_retrain"] else "off (events labelled retrain: false)"),
    ]  # fmt: skip
    lines += _table(["", ""], facts) + [""]
    if rows:
        header = ["batch", "result", "drift share", "embedding score", "labelled", "event"]
        lines += ["## Batches checked", ""] + _table(header, rows) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tasks


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger (lines reach the Prefect UI); a plain one under ``task.fn()`` in tests."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="drift-check", task_run_name="drift check {name}", cache_policy=NONE)
def check_batch(
    root: str,
    name: str,
    images: str,
    bundle: str,
    report_dir: str,
    metrics_path: str,
    workspace: str | None,
    params: str = "params.yaml",
) -> dict[str, Any]:
    """``python -m stages.drift`` on one batch, its output lines in the run log; its metrics.

    Not retried: a bad batch fails the same way again. Raises :class:`DriftCheckFailed`.
    """
    logger = _logger()
    metrics = Path(metrics_path)
    metrics.unlink(missing_ok=True)  # a failed re-check must not leave the last one's verdict
    argv = [
        sys.executable, "-m", "stages.drift", "--params", params, "--bundle", bundle, "--images", images,
        "--report", report_dir, "--metrics", metrics_path, "--name", name,
        *(["--workspace", workspace] if workspace else ["--no-workspace"]),
    ]  # fmt: skip
    logger.info("python -m stages.drift --images %s --bundle %s", images, bundle)
    returncode, tail = stream_command(argv, Path(root), on_line=logger.info, env=subprocess_env())
    if returncode != 0:
        raise DriftCheckFailed(name, returncode, tail)
    return json.loads(metrics.read_text(encoding="utf-8"))


@task(name="external-validation", task_run_name="evaluate {name}", cache_policy=NONE)
def evaluate_batch(root: str, name: str, images: str, bundle: str, out_path: str) -> dict[str, Any]:
    """``python -m serve.evaluate`` on one labelled batch, its output lines in the run log; its
    result (:func:`read_evaluation`). Not retried. Raises :class:`EvaluationFailed`.

    Exit 1 with the result written means rows were left out (named in it, and in the artifact):
    the others were scored, so that is a result, not a failure.
    """
    logger = _logger()
    out = Path(out_path)
    out.unlink(missing_ok=True)  # a failed re-check must not leave the last one's numbers
    argv = [
        sys.executable, "-m", "serve.evaluate", images, "--bundle", bundle, "--out", out_path,
        "--no-progress",
    ]  # fmt: skip
    logger.info("python -m serve.evaluate %s --bundle %s", images, bundle)
    returncode, tail = stream_command(argv, Path(root), on_line=logger.info, env=subprocess_env())
    if returncode != 0 and not (returncode == 1 and out.is_file()):
        raise EvaluationFailed(name, returncode, tail)
    try:
        return read_evaluation(out)
    except ValueError as e:
        raise EvaluationFailed(name, returncode or 1, [*tail, f"error: {e}"]) from None


def add_evaluation_to_workspace(
    evaluation: Mapping[str, Any], workspace: Path, project_name: str, run_name: str
) -> str:
    """One snapshot of the headline numbers (:func:`evaluation_values`, each an Evidently
    ``MeanValue`` of a one-row table) in the workspace's project ``project_name``, created with a
    dashboard plotting them per input mode over the batches. Returns the project's id."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel
    from evidently.ui.workspace import Workspace

    values = evaluation_values(evaluation)
    if not values:
        raise ValueError("no headline metric in the evaluation result")
    columns = list(values)
    data = Dataset.from_pandas(
        pd.DataFrame([values]), data_definition=DataDefinition(numerical_columns=columns)
    )
    snapshot = Report(
        [MeanValue(column=c) for c in columns], metadata={"batch": run_name, "kind": "external validation"}
    ).run(data, None)
    ws = Workspace(str(workspace))
    found = ws.search_project(project_name)
    if found:
        project = found[0]
    else:
        project = ws.create_project(project_name, description="Labelled batches scored by the bundle")
        for title, key in EVALUATION_PANELS:
            project.dashboard.add_panel(
                line_plot_panel(
                    title=title,
                    values=[
                        PanelMetric(
                            legend=mode_label(mode),
                            metric="MeanValue",
                            metric_labels={"column": f"{key}_{mode}"},
                        )
                        for mode in (METADATA, IMAGE_ONLY)
                    ],  # fmt: skip
                ),
                tab="External validation",
            )
    ref = ws.add_run(project.id, snapshot, include_data=False, name=run_name)
    return str(project.id) if ref is None else str(getattr(ref, "project_id", project.id))


@task(name="publish", task_run_name="publish {key}", cache_policy=NONE)
def publish(key: str, markdown: str, description: str) -> None:
    """One markdown artifact; an artifact error is logged, never the run's outcome."""
    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:
        _logger().error("could not publish artifact %s: %s", key, e)


# --------------------------------------------------------------------------- the flow


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def choose_bundle(layout: Layout, bundle: str | None) -> Path:
    """``bundle`` if given; else production when a promotion made one; else the last candidate."""
    if bundle:
        chosen = _resolve(layout.root, bundle)
        if not (chosen / BUNDLE_FILE).is_file():
            raise MonitorFailed(
                f"bundle: {chosen}: no {BUNDLE_FILE} (a folder made by `dvc repro calibrate`)"
            )
        return chosen
    for rel in (layout.production, layout.bundle):
        if (layout.path(rel) / BUNDLE_FILE).is_file():
            return layout.path(rel)
    raise MonitorFailed(
        f"no model bundle in {layout.production} or {layout.bundle}: build one first "
        "(prefect deployment run 'retrain/on-demand', or dvc repro calibrate)"
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    """What every batch check of one monitor run shares."""

    root: Path
    params: Path
    bundle: Path
    state: Path
    workspace: str | None
    retrain_on: bool
    ledger: dict[str, Any]
    ledger_path: Path
    name: str
    summary: dict[str, Any]
    project: str = ""  # the Evidently project of the drift checks (drift.project)


def evaluation_project(drift_project: str) -> str:
    """The Evidently project of the external validations, beside the drift checks' own."""
    return f"{drift_project}: external validation"


def _evaluate(run: _Run, batch: Batch, out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Score a labelled batch with ``serve.evaluate`` (and record it in the Evidently workspace).
    Never raises: a failure is logged as a warning and returned as the error line."""
    logger = _logger()
    try:
        evaluation = evaluate_batch(str(run.root), batch.name, str(batch.path), str(run.bundle), str(out))
    except Exception as e:  # the drift check stands whatever happens here
        error = e.error if isinstance(e, EvaluationFailed) else f"{type(e).__name__}: {e}"
        logger.warning("%s: external validation failed, the drift check stands: %s", batch.name, error)
        return None, error
    logger.info("%s: external validation: %s", batch.name, evaluation_note(evaluation))
    if run.workspace and run.project:
        try:
            project_id = add_evaluation_to_workspace(
                evaluation, Path(run.workspace), evaluation_project(run.project), batch.name
            )
            logger.info("%s: external validation added to the Evidently workspace (project %s)",
                        batch.name, project_id)  # fmt: skip
        except Exception as e:  # the time series misses one point; the artifact has the numbers
            logger.warning("%s: could not add the external validation to the Evidently workspace %s: %s",
                           batch.name, run.workspace, e)  # fmt: skip
    return evaluation, None


def _check_one(run: _Run, batch: Batch, why: str) -> tuple[str, ...]:
    """Check one batch, publish it, emit its drift event, record it; its summary-table row.
    Raises :class:`DriftCheckFailed` (after publishing and, for a bad batch, recording it)."""
    out_dir = run.state / BATCHES / batch.name
    metrics_path, report_dir = out_dir / "drift.json", out_dir / "report"
    report = report_dir / "index.html"
    key = f"drift-{slug(batch.name)}"
    try:
        metrics = check_batch(
            str(run.root), batch.name, str(batch.path), str(run.bundle), str(report_dir),
            str(metrics_path), run.workspace, params=str(run.params),
        )  # fmt: skip
    except DriftCheckFailed as e:
        run.summary["failed"].append(batch.name)
        _logger().error("%s: %s", batch.name, e.error)
        if e.expected:  # a bad batch: not checked again until its files change
            record_check(run.ledger, batch, at=_now(), flow_run_name=run.name, error=e.error)
            save_ledger(run.ledger_path, run.ledger)
        publish(key, render_batch(batch, why, failure=e), f"drift check {batch.name}: FAILED")
        raise

    run.summary["checked"].append(batch.name)
    entry = record_check(
        run.ledger, batch, at=_now(), flow_run_name=run.name, metrics=metrics,
        metrics_path=metrics_path, report=report,
    )  # fmt: skip
    evaluation, evaluation_error = None, None
    if metrics.get("labelled"):
        evaluation, evaluation_error = _evaluate(run, batch, out_dir / EVALUATION_FILE)
        entry["evaluation"] = str(out_dir / EVALUATION_FILE) if evaluation is not None else None
        entry["evaluation_error"] = evaluation_error
    drift = bool(metrics.get("drift_detected"))
    note, event_cell = None, "—"
    if drift:
        run.summary["drifted"].append(batch.name)
        note, event_cell = _emit_drift(
            run.ledger, batch, metrics, run.retrain_on, report, metrics_path, run.summary
        )
    save_ledger(run.ledger_path, run.ledger)
    publish(
        key,
        render_batch(
            batch, why, metrics=metrics, report=report, retrain_note=note, evaluation=evaluation,
            evaluation_error=evaluation_error,
        ),
        f"drift check {batch.name}: {verdict_text(metrics)}",
    )  # fmt: skip
    labelled = fmt(bool(metrics.get("labelled")))
    if evaluation is not None or evaluation_error is not None:
        labelled += f"; {evaluation_note(evaluation, evaluation_error)}"
    return (
        f"`{batch.name}`", verdict_text(metrics), fmt(metrics.get("drift_share")),
        fmt(metrics.get("embedding_drift_score")), labelled, event_cell,
    )  # fmt: skip


@flow(
    name="monitor",
    description="Check new image batches in the inbox for drift; on drift emit skinlesion.drift.detected.",
)
def monitor(
    inbox: str | None = None,
    trigger_retrain: bool | None = None,
    bundle: str | None = None,
) -> dict[str, Any]:
    """Check every new or changed batch (sub-folder) of the inbox for drift, once.

    Args:
        inbox: folder whose sub-folders are the batches (default: ``drift.inbox``; relative
            paths are relative to the repository root).
        trigger_retrain: whether a drift event may start the retrain deployment (default:
            ``drift.trigger_retrain``). False still emits the event, labelled
            ``skinlesion.retrain: "false"``, which the retrain trigger does not match.
        bundle: the model bundle to check against (default: ``models/production`` when a
            promotion made it, else ``models/ensemble``).

    Returns ``{"checked": [...], "drifted": [...], "failed": [...], "skipped": [...], ...}``
    (batch names); ends Failed, after publishing every artifact, when a batch check failed.
    """
    logger = get_run_logger()
    layout = Layout(Path.cwd().resolve())
    root = layout.root
    if not (root / "dvc.yaml").is_file():
        raise MonitorFailed(f"no dvc.yaml in {root}: run the flow from the repository root")
    params = load_params(layout.path(layout.params)).drift
    inbox_dir = _resolve(root, inbox or params.inbox)
    if inbox is not None and not inbox_dir.is_dir():
        # Asked for by name: a typo must fail, not pass as "0 checked". The default inbox
        # (drift.inbox) may not exist yet on a fresh clone: nothing to check, said below.
        raise MonitorFailed(f"inbox {inbox_dir}: folder not found (the inbox parameter: {inbox})")
    state = _resolve(root, params.monitor_state)
    retrain_on = params.trigger_retrain if trigger_retrain is None else bool(trigger_retrain)
    workspace = str(_resolve(root, params.workspace)) if params.workspace else None
    run_name = flow_run.get_name() or "local"

    ledger_path = state / LEDGER
    ledger = load_ledger(ledger_path)
    todo, seen = plan_checks(scan_inbox(inbox_dir), ledger)
    summary: dict[str, Any] = {
        "flow_run": run_name,
        "inbox": str(inbox_dir),
        "inbox_exists": inbox_dir.is_dir(),
        "bundle": None,
        "trigger_retrain": retrain_on,
        "checked": [],
        "drifted": [],
        "failed": [],
        "skipped": [b.name for b in seen],
        "events": [],
    }
    if not summary["inbox_exists"]:
        logger.warning("inbox %s not found: nothing to check", inbox_dir)
    logger.info(
        "inbox %s: %d batch(es) to check (%s), %d already seen",
        inbox_dir, len(todo), ", ".join(f"{b.name} ({why})" for b, why in todo) or "none", len(seen),
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    failures: list[DriftCheckFailed] = []
    if todo:
        run = _Run(
            root=root,
            params=layout.path(layout.params),
            bundle=choose_bundle(layout, bundle),
            state=state,
            workspace=workspace,
            retrain_on=retrain_on,
            ledger=ledger,
            ledger_path=ledger_path,
            name=run_name,
            summary=summary,
            project=params.project,
        )
        summary["bundle"] = str(run.bundle)
        logger.info("bundle: %s", run.bundle)
        for batch, why in todo:
            try:
                rows.append(_check_one(run, batch, why))
            except DriftCheckFailed as e:
                failures.append(e)
                rows.append((f"`{batch.name}`", f"FAILED: {e.error[:120]}", "—", "—", "—", "—"))

    publish(SUMMARY_KEY, render_summary(summary, rows), _summary_line(summary))
    logger.info("monitor: %s", _summary_line(summary))
    if failures:
        detail = "; ".join(f"{f.batch}: {f.error}" for f in failures)
        raise MonitorFailed(f"{len(failures)} of {len(todo)} batch check(s) failed: {detail}"[:1000])
    return summary


def _emit_drift(
    ledger: dict[str, Any],
    batch: Batch,
    metrics: Mapping[str, Any],
    retrain_on: bool,
    report: Path,
    metrics_path: Path,
    summary: dict[str, Any],
) -> tuple[str, str]:
    """Emit the drift event; hand the pending labelled batches over when it may start a retrain.
    Returns the artifact's retrain note and the summary table's event cell."""
    logger = _logger()
    extra = pending_labelled(ledger)
    resource, payload = drift_event(
        batch, metrics, retrain=retrain_on, extra_sources=extra, report=report, metrics_path=metrics_path
    )
    event = emit_event(EVENT, resource=resource, payload=payload)
    if event is None:  # Prefect logged why; the batches stay pending for the next drift event
        logger.error("%s: could not emit %s (no Prefect API?): no retrain starts", batch.name, EVENT)
        return "the drift event could not be emitted (see the run log)", "not emitted"
    summary["events"].append(str(event.id))
    if not retrain_on:
        logger.info("%s: emitted %s (retrain trigger off)", batch.name, EVENT)
        return f"trigger off: `{EVENT}` emitted with `skinlesion.retrain: false`", "emitted (trigger off)"
    mark_handed_over(ledger, extra, at=_now(), event_id=str(event.id))
    logger.info(
        "%s: emitted %s; labelled batches handed to the retrain: %s", batch.name, EVENT, extra or "none"
    )
    return (
        f"`{EVENT}` emitted: the trigger starts `retrain/on-demand` with extra_sources {_names(extra)}",
        "emitted",
    )


def _summary_line(s: Mapping[str, Any]) -> str:
    return (
        f"{len(s['checked'])} checked, {len(s['drifted'])} drifted, {len(s['failed'])} failed, "
        f"{len(s['skipped'])} already seen"
    )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor",
        description=(
            "Run the monitor flow once, here, with no Prefect server (Prefect's ephemeral API): check "
            "every new or changed batch (sub-folder) of the inbox for drift against the model bundle, "
            "publish an artifact per batch, and remember what was checked. With no PREFECT_API_URL a "
            "drift event starts no retrain (no server, no trigger) and labelled batches stay pending "
            "for the next drift event. For the daily deployment see prefect.yaml "
            "(prefect deployment run 'monitor/daily')."
        ),
    )
    parser.add_argument("--inbox", help="folder of batches (default: params' drift.inbox)")
    parser.add_argument("--bundle", help="model bundle (default: models/production, else models/ensemble)")
    parser.add_argument(
        "--no-trigger",
        action="store_true",
        help="label drift events so the retrain trigger ignores them (drift.trigger_retrain: false)",
    )
    args = parser.parse_args(argv)
    if args.inbox is not None and not Path(args.inbox).expanduser().is_dir():
        # Before Prefect starts: a mistyped folder is one line, exit 1, never "0 checked".
        print(
            f"error: --inbox {args.inbox}: folder not found (a folder whose sub-folders are the batches)",
            file=sys.stderr,
        )
        return 1
    trigger: bool | None = False if args.no_trigger else None
    if trigger is None and not get_current_settings().api.url:
        # Prefect's ephemeral API runs no trigger: an event marked for retraining would hand the
        # labelled batches over to a retrain that never starts. They stay pending instead.
        print("no Prefect server configured (PREFECT_API_URL): drift events will not start a retrain")
        trigger = False
    try:
        result = monitor(inbox=args.inbox, bundle=args.bundle, trigger_retrain=trigger)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: monitor failed: {first}", file=sys.stderr)
        return 1
    print(
        f"monitor: {_summary_line(result)}"
        + (f"; drift in {', '.join(result['drifted'])}" if result["drifted"] else "")
        + (
            ""
            if result["inbox_exists"]
            else f"; inbox {result['inbox']} not found (drift.inbox): nothing to check"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
