"""The monitor's ledger: which batches of the inbox were checked, and what became of them.

A batch is a visible sub-folder of the inbox (:func:`scan_inbox`), known by its name and a
fingerprint of its files (relative path, size, mtime). The ledger
(``<drift.monitor_state>/ledger.json``, written atomically) keeps each batch's last check, so a
batch is never checked twice and a batch whose files changed is checked again
(:func:`plan_checks`). It also remembers which labelled batches were handed to a retrain by a
drift event (:func:`pending_labelled`, :func:`mark_handed_over`). No Prefect here;
:mod:`flows.monitor` calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion.core.outputs import write_json

__all__ = [
    "LEDGER",
    "Batch",
    "LedgerError",
    "fingerprint",
    "load_ledger",
    "mark_handed_over",
    "new_ledger",
    "pending_labelled",
    "plan_checks",
    "record_check",
    "save_ledger",
    "scan_inbox",
]

LEDGER = "ledger.json"
LEDGER_VERSION = 1


class LedgerError(RuntimeError):
    """The ledger cannot be read (the message names the file and what to do)."""


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
        raise LedgerError(f"{path}: unreadable monitor ledger ({e}); repair it or move it away") from None
    if not isinstance(data, dict) or not isinstance(data.get("batches"), dict):
        raise LedgerError(f"{path}: not a monitor ledger (no 'batches' mapping); repair it or move it away")
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
