"""Print the few numbers a person looks at first after a run (``make demo`` ends with it).

``dvc metrics show`` prints every key of every file in one very wide row; this prints, per
model, the headline metrics with their lesion-bootstrap CIs (members and the ensemble before
calibration; then the bundle as served, per input mode), then the operating point of each mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.scoring import IMAGE_ONLY_SUFFIX

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


def summarize(metrics_dir: Path) -> str:
    lines = []
    split = _load(metrics_dir / "split.json")
    if split:
        lines.append(
            f"data: {split.get('n_images')} images, {split.get('n_groups')} lesion groups; "
            f"train/val/test {split.get('train_n')}/{split.get('val_n')}/{split.get('test_n')}; "
            f"leaking groups {split.get('leaking_groups')}"
        )
    ensemble = _load(metrics_dir / "ensemble.json")
    # The ensemble's members only, when it names them: a member file left by another run (the
    # demo's mobilenetv2 after a real run without it) is not this run's result.
    members = {k.removeprefix("weight_") for k in ensemble if k.startswith("weight_")}
    rows = [(p.stem, _load(p)) for p in sorted((metrics_dir / "eval").glob("*.json"))
            if not members or p.stem in members]  # fmt: skip
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


# Keys that measure the machine, not the model: they differ between any two runs.
_MACHINE_KEYS = ("seconds", "_s", "minutes", "per_s", "throughput", "wall")


def reproduction_verdict(diff: dict, tolerance: float) -> str:
    """One paragraph from ``dvc metrics diff --json --all REV``: did this run reproduce REV's?

    Identical on the same kind of CPU (seeded, deterministic ops); on another CPU the floating
    point order of a few kernels differs, so model metrics may move a little: a metric within
    ``tolerance`` (absolute, or relative above 1) counts as reproduced."""
    same = close = 0
    off: list[tuple[float, str]] = []
    compared = 0
    for path, metrics in sorted(diff.items()):
        for key, d in sorted((metrics or {}).items()):
            if not isinstance(d, dict) or d.get("old") is None or any(t in key for t in _MACHINE_KEYS):
                continue
            old, new = d.get("old"), d.get("new")
            compared += 1
            if old == new:
                same += 1
            elif isinstance(old, (int, float)) and isinstance(new, (int, float)):
                gap = abs(new - old) / max(1.0, abs(old))
                if gap <= tolerance:
                    close += 1
                else:
                    off.append((gap, f"{path}:{key} {old} -> {new}"))
            else:
                off.append((float("inf"), f"{path}:{key} {old!r} -> {new!r}"))
    if not compared:
        return "reproduction: the committed run has no metrics to compare with (no baseline committed)"
    if not off:
        how = "identical" if not close else f"{same} identical, {close} within {tolerance}"
        return f"reproduction: REPRODUCED the committed run: {compared} metrics compared, {how}"
    off.sort(reverse=True)
    lines = [
        f"reproduction: DIFFERS from the committed run: {len(off)} of {compared} metrics moved by more "
        f"than {tolerance} (params or code changed? `dvc status`, `git diff HEAD -- params.yaml`):"
    ]
    lines += [f"  {text}" for _gap, text in off[:8]]
    if len(off) > 8:
        lines.append(f"  ... and {len(off) - 8} more: dvc metrics diff")
    return "\n".join(lines)


def metrics_diff(rev: str) -> dict:
    """``dvc metrics diff --json --all REV`` (REV against the workspace); {} when DVC cannot."""
    import subprocess

    # The venv's dvc beside this interpreter when it is there (python -m stages.summary run
    # without the venv on PATH), else whatever dvc is on PATH.
    beside = Path(sys.executable).with_name("dvc")
    dvc = str(beside) if beside.is_file() else "dvc"
    try:
        r = subprocess.run([dvc, "metrics", "diff", "--json", "--all", rev], capture_output=True, text=True)
    except OSError:
        return {}
    try:
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
    except ValueError:
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.summary", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--metrics", type=Path, default=Path("metrics"), help="metrics folder (default: %(default)s)"
    )
    ap.add_argument(
        "--diff", metavar="REV", default=None,
        help="also say whether this run reproduced the metrics committed at REV (e.g. HEAD)",
    )  # fmt: skip
    ap.add_argument("--tolerance", type=float, default=0.02, help="for --diff (default: %(default)s)")
    args = ap.parse_args(argv)
    print(summarize(args.metrics))
    if args.diff:
        print()
        print(reproduction_verdict(metrics_diff(args.diff), args.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
