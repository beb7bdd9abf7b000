"""Print the few numbers a person looks at first after a run (``make demo`` ends with it).

``dvc metrics show`` prints every key of every file in one very wide row; this prints, per
model, the headline metrics with their lesion-bootstrap CIs, then the operating point.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

HEADLINE = ("macro_auc", "balanced_accuracy", "malignant_auc", "mel_recall")
OPERATING = ("threshold", "test_malignant_recall", "test_specificity", "test_ppv", "referrals_per_100")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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
    rows = [(p.stem, _load(p)) for p in sorted((metrics_dir / "eval").glob("*.json"))]
    rows.append(("ensemble", _load(metrics_dir / "ensemble.json")))
    rows = [(name, m) for name, m in rows if m]
    if rows:
        lines.append("")
        lines.append(f"{'test set':<14}" + "".join(f"{k:<24}" for k in HEADLINE))
        for name, m in rows:
            lines.append(f"{name:<14}" + "".join(f"{_fmt(m, k):<24}" for k in HEADLINE))
    cal = _load(metrics_dir / "calibration.json")
    if cal:
        lines.append("")
        lines.append(
            f"operating point (chosen on val for malignant recall >= {cal.get('target_recall')}), on test: "
            + ", ".join(f"{k} {_fmt(cal, k).split(' [')[0]}" for k in OPERATING if k in cal)
        )
        nan = float("nan")
        lines.append(f"calibration: ECE {cal.get('ece_before', nan):.3f} -> {cal.get('ece_after', nan):.3f}")
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.summary", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--metrics", type=Path, default=Path("metrics"), help="metrics folder (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    print(summarize(args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
