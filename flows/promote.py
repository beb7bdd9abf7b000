"""The promotion gate and the promotion itself. No Prefect here; :mod:`flows.retrain` calls it.

A candidate bundle (``models/ensemble``) replaces production (``models/production``) only if

* its ``test_malignant_recall`` reaches ``calibrate.target_recall`` in every input mode it has
  (a bundle fusing metadata has two: ``test_malignant_recall``, each test image with its own
  metadata, and ``test_malignant_recall_image_only``, every image without; a bundle without
  fusion has the first only), and
* its ``malignant_auc`` and ``macro_auc`` drop by at most ``promote.max_auc_drop`` against the
  production model's, mode by mode where both have the mode's numbers (a negative tolerance
  demands an improvement; with no production model yet the AUCs are not compared).

Promotion copies the bundle atomically (temp folder, one rename) with a ``production.json``
record, tracks it with ``dvc add``, and in a git repository commits the pipeline record and tags
it ``model-<UTC time>``. A rejected candidate touches nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.dvcops import DvcError, Layout, dvc_argv, run_quiet
from flows.report import mode_label
from stages.common import atomic_dir, failpoint
from stages.scoring import IMAGE_ONLY, IMAGE_ONLY_SUFFIX, METADATA, MODES, mode_suffix

__all__ = [
    "GATE_AUC_KEYS",
    "Check",
    "Decision",
    "decide",
    "gate_modes",
    "promote_bundle",
    "read_production",
]

RECALL_KEY = "test_malignant_recall"
GATE_AUC_KEYS = ("malignant_auc", "macro_auc")
RECORD = "production.json"
# Float noise must not flip a decision taken on metrics rounded nowhere.
_EPS = 1e-9
# Test hook (stages.common.failpoint): "<point>[@N][:pause]" stops a promotion at one of its steps:
# copy@N (about to copy the bundle's Nth file into the temp folder), record (the bundle copied,
# production.json not written), track (production swapped in, `dvc add` not run), tag (the record
# committed, not tagged). The swap itself: SKINLESION_ATOMIC_FAILPOINT=swapped-production.
FAILPOINT_ENV = "SKINLESION_PROMOTE_FAILPOINT"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    checks: tuple[Check, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def gate_modes(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The input modes a flat gate dict has numbers for: both when it holds any image-only key
    (a bundle fusing metadata), else the one mode of a bundle without fusion."""
    if any(k + IMAGE_ONLY_SUFFIX in metrics for k in (RECALL_KEY, *GATE_AUC_KEYS)):
        return MODES
    return (IMAGE_ONLY,)


def _recall_check(candidate: Mapping[str, Any], key: str, name: str, target_recall: float) -> Check:
    recall = _num(candidate.get(key))
    if recall is None:
        return Check(key, False, f"{name} missing or not a number in the candidate")
    ok = recall >= target_recall - _EPS
    op = ">=" if ok else "<"
    return Check(key, ok, f"{name} {recall:.3f} {op} target {target_recall:.3f}")


def _auc_check(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    key: str,
    name: str,
    max_auc_drop: float,
    *,
    prod_key: str | None,
) -> Check:
    """``prod_key``: production's number to compare with; None when production has none for
    this mode (the candidate's number is shown, not compared)."""
    cand = _num(candidate.get(key))
    if cand is None:
        return Check(key, False, f"{name} missing or not a number in the candidate")
    if production is None:
        return Check(key, True, f"{name} {cand:.3f} (no production model yet)")
    if prod_key is None:
        return Check(key, True, f"{name} {cand:.3f} (not compared: production has no image-only numbers)")
    prod = _num(production.get(prod_key))
    if prod is None:
        return Check(key, True, f"{name} {cand:.3f} (production has no {prod_key} to compare)")
    delta = cand - prod
    ok = delta >= -max_auc_drop - _EPS
    rule = f"drop allowed {max_auc_drop:.3f}" if max_auc_drop >= 0 else f"gain required {-max_auc_drop:.3f}"
    verdict = "ok" if ok else "too low"
    return Check(key, ok, f"{name} {cand:.3f} vs production {prod:.3f} ({delta:+.3f}; {rule}): {verdict}")


def decide(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    *,
    target_recall: float,
    max_auc_drop: float,
) -> Decision:
    """The gate, on flat metric dicts (``test_malignant_recall``, ``malignant_auc``, ``macro_auc``,
    and for a bundle fusing metadata the same keys again with ``_image_only``: :func:`gate_metrics`).

    The recall must reach the target in every mode the candidate has: a fusion bundle that finds
    melanomas only when it is given age, sex and site would miss them in every request without.
    The AUCs are compared mode with mode where production has the mode's numbers too; what is
    not compared (production is older than input modes, or the candidate has one mode and
    production two) is said in the reason. ``production`` is None when no model has been
    promoted yet.
    """
    modes = gate_modes(candidate)
    fusion = len(modes) > 1
    prod_fusion = production is not None and len(gate_modes(production)) > 1
    checks: list[Check] = []
    notes: list[str] = []
    for mode in modes:
        key = RECALL_KEY + mode_suffix(mode, modes)
        name = f"{key} ({mode_label(mode)})" if fusion else key
        checks.append(_recall_check(candidate, key, name, target_recall))
    n_recall = len(checks)
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        for base in GATE_AUC_KEYS:
            key = base + sfx
            name = f"{key} ({mode_label(mode)})" if fusion else key
            # production's number for this mode: its own key when it has the mode; a one-mode
            # production has no image-only numbers to set beside a fusion candidate's
            prod_key = key if (not sfx or prod_fusion) else None
            checks.append(_auc_check(candidate, production, key, name, max_auc_drop, prod_key=prod_key))
    if production is not None and fusion and not prod_fusion:
        notes.append(
            "production has no image-only metrics (a one-mode bundle): only the AUCs "
            f"{mode_label(METADATA)} are compared, the image-only ones are not"
        )
    if production is not None and not fusion and prod_fusion:
        notes.append(
            "the candidate has one input mode, production two: its AUCs are compared with "
            f"production's {mode_label(METADATA)}, production's image-only ones are not"
        )

    failed = [c.detail for c in checks if not c.passed]
    if failed:
        return Decision(False, "; ".join(failed + notes), tuple(checks))
    if production is None:
        recalls = "; ".join(c.detail for c in checks[:n_recall])
        return Decision(True, f"no production model yet; {recalls}", tuple(checks))
    return Decision(True, "; ".join([c.detail for c in checks] + notes), tuple(checks))


# --------------------------------------------------------------------------- reading


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
    return read_json(layout.path(layout.production) / RECORD)


def gate_metrics(snapshot: Mapping[str, Mapping[str, Any]], layout: Layout) -> dict[str, Any]:
    """The gate's flat inputs from a metrics snapshot ({file: {key: value}}): the recall and the
    AUCs of the bundle as served (the calibration metrics: the calibrate stage scores the test
    images with the bundle itself); the AUCs from the ensemble's metrics only for a snapshot
    whose calibration metrics have none (made before they were reported there). Each
    ``_image_only`` key too where the file has it (a bundle fusing metadata), so :func:`decide`
    judges every mode."""
    calibration = snapshot.get(layout.calibration_metrics) or {}
    ensemble = snapshot.get(layout.ensemble_metrics) or {}
    aucs = calibration if all(k in calibration for k in GATE_AUC_KEYS) else ensemble
    out = {RECALL_KEY: calibration.get(RECALL_KEY), **{k: aucs.get(k) for k in GATE_AUC_KEYS}}
    for source, keys in ((calibration, (RECALL_KEY,)), (aucs, GATE_AUC_KEYS)):
        out.update({k + IMAGE_ONLY_SUFFIX: source[k + IMAGE_ONLY_SUFFIX] for k in keys
                    if k + IMAGE_ONLY_SUFFIX in source})  # fmt: skip
    return out


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
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
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
