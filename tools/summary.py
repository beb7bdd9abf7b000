"""Print the few numbers a person looks at first after a run (``make demo`` ends with it).

``dvc metrics show`` prints every key of every file in one very wide row; this prints, per
model, the headline metrics with their lesion-bootstrap CIs (members and the ensemble before
calibration; then the bundle as served, per input mode), then the operating point of each mode.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from skinlesion.measure.scoring import IMAGE_ONLY_SUFFIX
from tools.noisefile import NOISE_FILE
from tools.runs import committed_bands, dvc_metrics_diff, dvc_params_diff, git_show, lock_out_md5, run_members

HEADLINE = ("macro_auc", "balanced_accuracy", "malignant_auc", "mel_recall")
OPERATING = ("threshold", "test_malignant_recall", "test_specificity", "test_ppv", "referrals_per_100")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mode(metrics: dict, suffix: str) -> dict:
    """The keys of one input mode: ``suffix`` "" (the first mode) or "_image_only"."""
    if not suffix:
        return {k: v for k, v in metrics.items() if not k.endswith(IMAGE_ONLY_SUFFIX)}
    return {k[: -len(suffix)]: v for k, v in metrics.items() if k.endswith(suffix)}


def served_row(m: dict) -> dict:
    """A served mode's headline: balanced accuracy and mel recall of the bundle's own decision
    (its balanced class rule, what a user is told), not of the arg-max of its probabilities."""
    out = dict(m)
    for key in ("balanced_accuracy", "mel_recall"):
        out.pop(f"{key}_ci_low", None)
        out.pop(f"{key}_ci_high", None)
        out.pop(key, None)
        if f"{key}_decision" in m:
            out[key] = m[f"{key}_decision"]
    return out


def _fmt(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{m[key]:.3f}{ci}"


def summarize(metrics_dir: Path, members: Sequence[str] | None = None) -> str:
    """The summary of the run whose metrics are in ``metrics_dir``; ``members``: its backbones
    (:func:`tools.runs.run_members`), so a member file another run left behind is not shown as this run's."""
    lines = []
    split = _load(metrics_dir / "split.json")
    if split:
        lines.append(
            f"data: {split.get('n_images')} images, {split.get('n_groups')} lesion groups; "
            f"train/val/test {split.get('train_n')}/{split.get('val_n')}/{split.get('test_n')}; "
            f"leaking groups {split.get('leaking_groups')}"
        )
    ensemble = _load(metrics_dir / "ensemble.json")
    # This run's members only: a member file left by another run (the demo's mobilenetv2 after
    # a real run without it) is not this run's result. Without params, the ensemble's weights say.
    if members is None:
        weighted = [k.removeprefix("weight_") for k in ensemble if k.startswith("weight_")]
        present = sorted(p.stem for p in (metrics_dir / "eval").glob("*.json"))
        members = [m for m in present if m in weighted] if weighted else present
    rows = [(m, _load(metrics_dir / "eval" / f"{m}.json")) for m in members]
    rows.append(("ensemble", ensemble))
    cal = _load(metrics_dir / "calibration.json")
    # The bundle's own answers (what serve gives): one row per input mode it has.
    modes = [("", "served")] if cal else []
    if any(k.endswith(IMAGE_ONLY_SUFFIX) for k in cal):
        modes = [("", "served, metadata"), (IMAGE_ONLY_SUFFIX, "served, image only")]
    rows += [(label, served_row(_mode(cal, sfx))) for sfx, label in modes]
    rows = [(name, m) for name, m in rows if m]
    if rows:
        lines.append("")
        lines.append(f"{'test set':<20}" + "".join(f"{k:<24}" for k in HEADLINE))
        for name, m in rows:
            lines.append(f"{name:<20}" + "".join(f"{_fmt(m, k):<24}" for k in HEADLINE))
    if cal:
        lines.append("")
        lines.append(
            f"operating point (chosen on val for malignant recall >= {cal.get('target_recall')}), on test:"
        )
        nan = float("nan")
        for sfx, label in modes:
            m = _mode(cal, sfx)
            lines.append(
                f"  {label}: " + ", ".join(f"{k} {_fmt(m, k).split(' [')[0]}" for k in OPERATING if k in m)
                + f"; ECE {m.get('ece_before', nan):.3f} -> {m.get('ece_after', nan):.3f}"
            )  # fmt: skip
    drift = _load(metrics_dir / "drift.json")
    if drift:
        verdict = "DRIFT DETECTED" if drift.get("drift_detected") else "no drift"
        why = []
        if drift.get("dataset_drift"):
            why.append(f"{drift.get('n_drifted_features')} of {drift.get('n_features')} features drifted")
        if drift.get("alarm_features"):
            why.append("large shift in " + ", ".join(drift["alarm_features"]))
        if drift.get("embedding_drift"):
            why.append(f"embedding drift (score {drift.get('embedding_drift_score', 0):.2f})")
        lines.append("")
        lines.append(
            f"drift check of {drift.get('batch')} ({drift.get('n_images')} images, "
            f"{drift.get('n_unreadable', 0)} unreadable): {verdict}" + (f": {'; '.join(why)}" if why else "")
        )
        if drift.get("drifted_features"):
            lines.append(f"  drifted features: {', '.join(drift['drifted_features'])}")
        lines.append(f"  report: {drift.get('report', 'reports/drift/index.html')}")
    return "\n".join(lines) if lines else f"no metrics found under {metrics_dir}"


# Keys that measure the machine, not the model: they differ between any two runs. (A bare "_s"
# substring would also drop test_specificity, drift_share, image_share_*: only as a suffix.)
_MACHINE_KEYS = ("seconds", "minutes", "per_s", "throughput", "wall")


def is_machine_key(key: str) -> bool:
    return key.endswith("_s") or any(t in key for t in _MACHINE_KEYS)


# Metrics files that are not a run's output: the noise file (NOISE_FILE) is measured by make noise.
HEADLINE_FILE = "metrics/headline.json"
CALIBRATION_FILE = "metrics/calibration.json"
SYNTHETIC_PLATFORM_TEST = "tests/unit/sources/test_synthetic_platform.py"


@dataclass(frozen=True)
class Moved:
    """One metric that is not identical to the committed run's."""

    path: str
    key: str
    old: Any
    new: Any

    @property
    def gap(self) -> float:
        if _is_num(self.old) and _is_num(self.new):
            return abs(float(self.new) - float(self.old))
        return math.inf

    def text(self) -> str:
        return (
            f"{self.path}:{self.key} {self.old!r} -> {self.new!r}"
            if not (_is_num(self.old) and _is_num(self.new))
            else f"{self.path}:{self.key} {self.old} -> {self.new}"
        )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_metrics(diff: Mapping[str, Any]) -> tuple[int, list[Moved]]:
    """(metrics compared, those not identical) of ``dvc metrics diff --json --all REV``. A metric
    the committed run did not have is not compared; one it had and this run lacks has moved."""
    compared = 0
    moved = []
    for path, metrics in sorted(diff.items()):
        if path == NOISE_FILE:
            continue
        for key, d in sorted((metrics or {}).items()):
            if not isinstance(d, dict) or d.get("old") is None or is_machine_key(key):
                continue
            compared += 1
            if d.get("old") != d.get("new"):
                moved.append(Moved(path, key, d.get("old"), d.get("new")))
    return compared, moved


def headline_moves(moved: Sequence[Moved], diff: Mapping[str, Any]) -> dict[str, Moved]:
    """The headline metrics among ``moved`` by headline key: metrics/headline.json, or the same keys
    in metrics/calibration.json when the committed run has no headline file."""
    from skinlesion.measure.paired import HEADLINE_KEYS
    from skinlesion.measure.scoring import IMAGE_ONLY_SUFFIX

    if HEADLINE_FILE in diff:
        return {m.key: m for m in moved if m.path == HEADLINE_FILE}
    keys = {k + s for k in HEADLINE_KEYS for s in ("", IMAGE_ONLY_SUFFIX)}
    return {m.key: m for m in moved if m.path == CALIBRATION_FILE and m.key in keys}


def report_outputs(dvc_yaml: Mapping[str, Any]) -> Callable[[str], bool]:
    """Which outputs are reports, not artifacts: the stages' metrics, plots and ``cache: false``
    outs of ``dvc.yaml`` (parsed; ``${item}`` matches any name). Their differences are the
    metrics diff's; a timing inside metrics/validation.json is no differing artifact."""
    patterns = []
    for stage in (dvc_yaml.get("stages") or {}).values():
        body = (stage or {}).get("do", stage) or {}
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
                if kind != "outs" or (opts or {}).get("cache") is False:
                    rx = re.sub(r"\\\$\\\{[^}]*\\\}", "[^/]+", re.escape(str(path).rstrip("/")))
                    patterns.append(re.compile(rx + "(/.*)?"))
    return lambda path: any(p.fullmatch(path) for p in patterns)


def first_difference(
    old_lock: Mapping[str, Any],
    new_lock: Mapping[str, Any],
    is_report: Callable[[str], bool] = lambda p: False,
) -> str | None:
    """The first output, in DAG order (the order of ``dvc.lock``'s stages), whose md5 differs
    between two ``dvc.lock`` files (parsed), with why: the stage's params, its code, its command,
    or none of them (the same inputs gave other bytes). Reports (``is_report``, see
    :func:`report_outputs`) are skipped. None when every artifact is the same."""
    old_stages = old_lock.get("stages") or {}
    new_stages = new_lock.get("stages") or {}
    old_outs = {o["path"]: o.get("md5") for st in old_stages.values() for o in _entries(st, "outs")}
    produced = {o["path"] for st in new_stages.values() for o in _entries(st, "outs")}
    for name, stage in new_stages.items():
        for out in _entries(stage, "outs"):
            path, md5 = out["path"], out.get("md5")
            if is_report(path) or (path in old_outs and old_outs[path] == md5):
                continue
            if path not in old_outs:
                return f"{path} (stage {name}) is not an output of the committed run (a new stage or member)"
            old = old_stages.get(name) or {}
            head = f"{path} (stage {name}) differs: md5 {md5} here vs {old_outs[path]} committed"
            return head + "\n    " + _why(name, old, stage, produced)
    return None


def _entries(stage: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in ((stage or {}).get(kind) or []) if isinstance(e, dict) and "path" in e]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _params(stage: Mapping[str, Any]) -> dict[str, Any]:
    """A lock stage's params, flat (``train.common.epochs``), over all its params files."""
    out: dict[str, Any] = {}
    for tree in (stage.get("params") or {}).values():
        out.update(_flat(tree))
    return out


def _why(name: str, old: Mapping[str, Any], new: Mapping[str, Any], produced: set[str]) -> str:
    if not old:
        return f"the committed lock has no stage {name}"
    p_old, p_new = _params(old), _params(new)
    params = sorted(k for k in set(p_old) | set(p_new) if p_old.get(k) != p_new.get(k))
    if params:
        return "params differ: " + _few(params)
    d_old = {e["path"]: e.get("md5") for e in _entries(old, "deps")}
    d_new = {e["path"]: e.get("md5") for e in _entries(new, "deps")}
    changed = sorted(p for p in set(d_old) | set(d_new) if d_old.get(p) != d_new.get(p))
    code = [p for p in changed if p not in produced]
    if code:
        return "code differs: " + _few(code)
    if changed:
        return "its inputs differ: " + _few(changed)
    if str(old.get("cmd")) != str(new.get("cmd")):
        return "its command differs (dvc.yaml)"
    source = _params(new).get("download.source")
    if name == "download" and source in (None, "synthetic"):
        return (
            "same code, params and command: the data generator gave other bytes on this machine "
            f"(see {SYNTHETIC_PLATFORM_TEST})"
        )
    if name == "download":
        return f"same code, params and command: the source ({source}) gave other bytes (has it changed?)"
    return (
        "same code, params, command and inputs gave other bytes: the stage is not bit-reproducible "
        "here (another CPU, library or thread count computes it differently)"
    )


def reproduction_verdict(
    diff: Mapping[str, Any],
    *,
    bands: Mapping[str, float] | None = None,
    old_lock: Mapping[str, Any] | None = None,
    new_lock: Mapping[str, Any] | None = None,
    params_diff: Mapping[str, Any] | None = None,
    is_report: Callable[[str], bool] = lambda p: False,
    rev: str = "HEAD",
    notes: Sequence[str] = (),
) -> str:
    """Did this run reproduce the one committed at ``rev``? ``diff`` is ``dvc metrics diff --json
    --all REV``.

    REPRODUCED: every metric identical (machine timings aside). WITHIN NOISE: some differ, but
    every headline metric by at most its band from the committed noise file (``bands``,
    :func:`tools.noisefile.noise_bands`). DIFFERS otherwise, with the first output in DAG order that
    differs between REV's ``dvc.lock`` (``old_lock``) and this one (``new_lock``), and why."""
    where = f"the committed run ({rev})"
    compared, moved = compare_metrics(diff)
    if not compared:
        return f"reproduction: {where} has no metrics to compare with (no baseline committed)"
    if not moved:
        return f"reproduction: REPRODUCED {where}: {compared} metrics compared, all identical"
    bands = dict(bands or {})
    heads = headline_moves(moved, diff)
    judged = HEADLINE_FILE in diff or CALIBRATION_FILE in diff
    count = f"{len(moved)} of {compared} metrics differ"
    if bands and judged and all(k in bands and m.gap <= bands[k] for k, m in heads.items()):
        if heads:
            k, m = max(heads.items(), key=lambda km: km[1].gap / bands[km[0]] if bands[km[0]] else 0.0)
            share = f", {m.gap / bands[k]:.0%} of it" if bands[k] else ""
            largest = f"largest: {k} {m.old} -> {m.new}, |diff| {m.gap:.4g} vs band {bands[k]:.4g}{share}"
        else:
            largest = "the headline metrics are identical"
        head = f"reproduction: WITHIN NOISE of {where}: {count}, every headline metric within its noise band"
        return "\n".join([f"{head} ({largest})", *_params_line(params_diff, rev), *(f"  {n}" for n in notes)])
    lines = [f"reproduction: DIFFERS from {where}: {count}"]
    if not bands:
        lines[0] += "; no noise band committed (make noise), so any difference counts"
    elif not judged:
        lines[0] += f"; {where} has no headline metrics to judge by the noise band"
    for k, m in heads.items():
        if not bands:
            lines.append(f"  headline {k}: {m.old} -> {m.new}")
            continue
        band = f"band {bands[k]:.4g}" if k in bands else "no band"
        over = " (beyond)" if k not in bands or m.gap > bands[k] else ""
        lines.append(f"  headline {k}: {m.old} -> {m.new}, |diff| {m.gap:.4g}, {band}{over}")
    lines += _params_line(params_diff, rev)
    if old_lock is None or new_lock is None:
        lines.append(f"  the first artifact that differs is unknown: no dvc.lock at {rev} or here")
    else:
        first = first_difference(old_lock, new_lock, is_report)
        lines.append(
            f"  first artifact that differs: {first}"
            if first
            else "  every artifact in dvc.lock has its committed md5 (only metrics and reports differ)"
        )
    if not heads:
        top = sorted(moved, key=lambda m: m.gap, reverse=True)[:5]
        lines += [f"  {m.text()}" for m in top]
    lines.append(f"  all of them: dvc metrics diff {rev}")
    lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


def _params_line(params_diff: Mapping[str, Any] | None, rev: str) -> list[str]:
    keys = sorted(k for f in (params_diff or {}).values() for k in (f or {}))
    return [f"  params differ (dvc params diff {rev}): " + _few(keys, 10)] if keys else []


def _few(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _yaml(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def verdict_against(rev: str, *, noise: Path, lock: Path = Path("dvc.lock"), raw: str = "data/raw") -> str:
    """:func:`reproduction_verdict` of the workspace against ``rev``, everything it needs gathered."""
    new_lock = _yaml(lock.read_text(encoding="utf-8")) if lock.is_file() else None
    dvc_yaml = lock.with_name("dvc.yaml")
    pipeline = _yaml(dvc_yaml.read_text(encoding="utf-8")) if dvc_yaml.is_file() else None
    old_lock = _yaml(git_show(rev, lock.as_posix()))
    bands, notes = committed_bands(rev, noise, lock_out_md5(new_lock, raw) if new_lock else None)
    return reproduction_verdict(
        dvc_metrics_diff(rev), bands=bands, old_lock=old_lock, new_lock=new_lock,
        params_diff=dvc_params_diff(rev),
        is_report=report_outputs(pipeline or {}), rev=rev, notes=notes,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.summary", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--metrics", type=Path, default=Path("metrics"), help="metrics folder (default: %(default)s)"
    )
    ap.add_argument(
        "--diff", metavar="REV", default=None,
        help="also say whether this run reproduced the metrics committed at REV (e.g. HEAD)",
    )  # fmt: skip
    ap.add_argument(
        "--noise", type=Path, default=Path(NOISE_FILE),
        help="for --diff: the noise file; its version at REV gives the bands (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"),
        help="the run's params: its train.backbones are the members shown (default: %(default)s)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    print(summarize(args.metrics, members=run_members(args.params)))
    if args.diff:
        print()
        print(verdict_against(args.diff, noise=args.noise))
    return 0


if __name__ == "__main__":
    sys.exit(main())
