"""The promotion itself, once :mod:`flows.gate` let a candidate through. No Prefect here;
:mod:`flows.retrain` calls it.

Promotion copies the candidate bundle (``models/ensemble``) to production (``models/production``)
atomically (temp folder, one rename) with its record (:data:`skinlesion.model.bundle_json.PRODUCTION_RECORD`,
built by :func:`production_record`, read back by :func:`read_production`), tracks it with
``dvc add``, and in a git repository commits the pipeline record and tags it ``model-<UTC time>``.
A rejected candidate touches nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from flows.dvcops import DvcError, Layout, dvc_argv, run_quiet
from skinlesion.core.outputs import atomic_dir, failpoint
from skinlesion.model.bundle_json import PRODUCTION_RECORD

__all__ = [
    "FAILPOINT_ENV",
    "commit_and_tag",
    "dirty_code",
    "dvc_track",
    "free_tag",
    "head_commit",
    "in_git",
    "production_record",
    "promote_bundle",
    "read_production",
    "tag_exists",
    "utc_tag",
]

# Test hook (skinlesion.core.outputs.failpoint): "<point>[@N][:pause]" stops a promotion at one of its steps:
# copy@N (about to copy the bundle's Nth file into the temp folder), record (the bundle copied,
# production.json not written), track (production swapped in, `dvc add` not run), tag (the record
# committed, not tagged). The swap itself: SKINLESION_ATOMIC_FAILPOINT=swapped-production.
FAILPOINT_ENV = "SKINLESION_PROMOTE_FAILPOINT"


# --------------------------------------------------------------------------- the production record


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DvcError(f"{path}: not valid JSON: {e}") from None
    return data if isinstance(data, dict) else None


def read_production(layout: Layout) -> dict[str, Any] | None:
    """The production record (``models/production/production.json``), or None before the first."""
    return read_json(layout.path(layout.production) / PRODUCTION_RECORD)


def production_record(
    layout: Layout,
    *,
    now: datetime,
    tag: str | None,
    source_commit: str | None,
    git: bool,
    data_version: str | None,
    data_versions: Mapping[str, str],
    lock: Mapping[str, str],
    metrics: Mapping[str, Any],
    gate: Mapping[str, Any],
    gate_overrides: Mapping[str, Any],
    gate_pinned: Mapping[str, Any],
    flow_run: Mapping[str, str],
) -> dict[str, Any]:
    """The production record of a promotion at ``now``: its tag and commit, the code a tag would
    not hold (``git``: a git repository), the data the model learned and was tested from, the
    metrics, the gate that let it through (``gate``: :attr:`flows.gate.Verdict.summary`), the
    operator's gate_overrides, what the promotion pinned in params.yaml (read here, after that)
    and the flow run."""
    return {
        "promoted_at": now.isoformat(timespec="seconds"),
        "git_tag": tag,
        "source_commit": source_commit,
        "dirty_code": dirty_code(layout.root) if git else [],
        # What the model learned and was tested from: data/raw (kept for older readers) and
        # every data output dvc.lock versions; the next run's summary compares against these.
        "data_version": data_version,
        "data_versions": data_versions,
        "dvc_lock": lock,
        "metrics": metrics,
        "gate": gate,
        "gate_overrides": dict(gate_overrides),
        "gate_pinned": gate_pinned,
        "params": yaml.safe_load(layout.path(layout.params).read_text(encoding="utf-8")),
        "flow_run": flow_run,
    }


# --------------------------------------------------------------------------- promoting


def utc_tag(now: datetime) -> str:
    return "model-" + now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def promote_bundle(layout: Layout, record: Mapping[str, Any]) -> Path:
    """Copy the candidate bundle to production in one rename, with ``record`` as production.json.

    A crash at any point leaves the previous production folder exactly as it was.
    """
    src = layout.path(layout.bundle)
    if not src.is_dir() or not any(src.iterdir()):
        raise DvcError(f"{layout.bundle}: no candidate bundle to promote")
    dest = layout.path(layout.production)
    copied = 0

    def copy(src_file: str, dst_file: str) -> object:
        nonlocal copied
        copied += 1
        failpoint(FAILPOINT_ENV, "copy", copied)
        return shutil.copy2(src_file, dst_file)

    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=False, copy_function=copy)
        failpoint(FAILPOINT_ENV, "record", 1)
        (tmp / PRODUCTION_RECORD).write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return dest


def dvc_track(layout: Layout) -> None:
    """``dvc add models/production``: the pointer file git keeps; the content goes to the cache
    (and to the remote with ``dvc push``)."""
    failpoint(FAILPOINT_ENV, "track", 1)
    run_quiet(dvc_argv("add", layout.production), layout.root)


# --------------------------------------------------------------------------- git


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DvcError(f"`git {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def in_git(repo: Path) -> bool:
    try:
        return _git(repo, "rev-parse", "--is-inside-work-tree", check=False).stdout.strip() == "true"
    except FileNotFoundError:  # no git on this machine
        return False


def head_commit(repo: Path) -> str | None:
    proc = _git(repo, "rev-parse", "HEAD", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def dirty_code(repo: Path) -> list[str]:
    """Tracked files that differ from HEAD, outside the pipeline record: code a tag would not hold."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=no", check=False).stdout
    paths = [line[3:] for line in out.splitlines() if len(line) > 3]
    return [p for p in paths if not p.startswith(("metrics/", "reports/", "models/")) and
            p not in ("dvc.lock", "params.yaml", "dvc.yaml") and not p.endswith(".gitignore")]  # fmt: skip


def tag_exists(repo: Path, tag: str) -> bool:
    return _git(repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode == 0


def free_tag(repo: Path, tag: str) -> str:
    """``tag``, or ``tag-2``, ``tag-3``... if a promotion in the same second took it."""
    name, n = tag, 1
    while tag_exists(repo, name):
        n += 1
        name = f"{tag}-{n}"
    return name


def commit_and_tag(layout: Layout, tag: str, message: str) -> str:
    """Commit only the pipeline record (whatever else is staged stays staged) and tag it."""
    repo = layout.root
    candidates = ["dvc.yaml", "dvc.lock", layout.params, "metrics", "reports", f"{layout.production}.dvc"]
    ignores = _git(repo, "ls-files", "-co", "--exclude-standard", "--", ":(glob)**/.gitignore")
    paths = [p for p in candidates if (repo / p).exists()] + ignores.stdout.split()
    ident: list[str] = []
    if not _git(repo, "config", "user.email", check=False).stdout.strip():
        ident = ["-c", "user.name=retrain flow", "-c", "user.email=retrain-flow@localhost"]
    _git(repo, "add", "-A", "--", *paths)
    _git(repo, *ident, "commit", "--quiet", "--allow-empty", "--only", "-m", message, "--", *paths)
    sha = _git(repo, "rev-parse", "HEAD").stdout.strip()
    failpoint(FAILPOINT_ENV, "tag", 1)
    _git(repo, "tag", tag, sha)
    return sha
