"""What a retrain run tells its operator: the markdown summary and the metrics-diff table.

Pure functions on plain values (no Prefect, no I/O), so they are tested on small dicts; the flow
publishes their output as Prefect artifacts. Numbers are rounded here: ``dvc metrics diff
--json`` prints them unrounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.dvcops import Layout

__all__ = ["RunReport", "diff_table", "fmt", "render_summary"]

MODEL_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "malignant_auc",
    "mel_recall",
    "malignant_pauc_tpr80",
)
CALIBRATION_KEYS = (
    "threshold",
    "test_malignant_recall",
    "test_specificity",
    "test_ppv",
    "referrals_per_100",
    "temperature",
    "ece_before",
    "ece_after",
)
VALIDATION_KEYS = (
    "passed",
    "metadata_passed",
    "images_passed",
    "split_passed",
    "n_rows",
    "n_images_checked",
    "n_quarantined",
    "n_validated",
)
_CI = ("_ci_low", "_ci_high")


def fmt(v: Any, digits: int = 3) -> str:
    """A metric for people: 3 decimals below 10, 1 above, integers as they are."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) >= 10:
            return str(int(v))
        return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _round(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return round(v, digits)
    return v


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return out


def with_ci(metrics: Mapping[str, Any], key: str) -> str:
    v = metrics.get(key)
    lo, hi = metrics.get(key + _CI[0]), metrics.get(key + _CI[1])
    if v is None:
        return "—"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"
    return fmt(v)


@dataclass
class RunReport:
    """Everything the summary shows; the flow fills it as the run goes."""

    flow_run: str
    outcome: str = "running"  # promoted | not promoted | failed
    reason: str = ""
    planned: list[str] = field(default_factory=list)
    stage_runs: list[dict[str, Any]] = field(default_factory=list)
    failed_stage: str | None = None
    failure: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    data_version: str | None = None
    git_commit: str | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None
    diff_against: str | None = None
    links: list[str] = field(default_factory=list)


def render_summary(r: RunReport, layout: Layout) -> str:
    """The run's markdown artifact."""
    title = "FAILED" if r.outcome == "failed" else r.outcome
    lines = [f"# Retrain `{r.flow_run}`: {title}", ""]
    lines.append(f"**Outcome:** {r.outcome}" + (f": {r.reason}" if r.reason else ""))
    lines.append("")
    facts = [
        (f"data version (`{layout.raw}` md5 in dvc.lock)", f"`{r.data_version}`" if r.data_version else "—"),
        ("git commit", f"`{r.git_commit[:12]}`" if r.git_commit else "— (not a git repository)"),
        ("devices", ", ".join(r.devices) if r.devices else "CPU (stages run one after another)"),
        ("params overrides (kept in params.yaml)",
         ", ".join(f"`{k}={v}`" for k, v in r.overrides.items()) or "none"),
    ]  # fmt: skip
    lines += _table(["", ""], facts) + [""]

    if r.failed_stage:
        lines += [f"## Stage `{r.failed_stage}` failed", "", "```text", (r.failure or "").strip(), "```", ""]
    elif r.failure:
        lines += ["## Failure", "", "```text", r.failure.strip(), "```", ""]

    ran = {s["stage"]: s for s in r.stage_runs}
    rows = []
    for stage in r.planned:
        s = ran.get(stage)
        if s is None:
            rows.append((f"`{stage}`", "FAILED" if stage == r.failed_stage else "not run", "—", "—"))
        else:
            status = {"ran": "ran", "skipped": "up to date"}.get(s["status"], s["status"])
            rows.append((f"`{stage}`", status, fmt(float(s["seconds"]), 1), s.get("device") or "—"))
    if rows:
        lines += ["## Stages", ""] + _table(["stage", "result", "seconds", "device"], rows) + [""]

    m = r.metrics
    split = m.get(layout.split_metrics)
    if split:
        lines += ["## Split", ""] + split_section(split) + [""]
    validation = m.get(layout.validation_metrics)
    if validation:
        shown = [(k, fmt(validation[k])) for k in VALIDATION_KEYS if k in validation]
        shown += [(k, fmt(v)) for k, v in validation.items() if "_fail_" in k and v]
        lines += ["## Validation", ""] + _table(["", "value"], shown) + [""]

    model_rows = [(p, mm) for p, mm in m.items() if p.startswith(layout.eval_metrics_dir.rstrip("/") + "/")]
    if layout.ensemble_metrics in m:
        model_rows.append((layout.ensemble_metrics, m[layout.ensemble_metrics]))
    if model_rows:
        cols = [k for k in MODEL_KEYS if any(k in mm for _, mm in model_rows)]
        body = []
        for path, mm in model_rows:
            name = path.rsplit("/", 1)[-1].removesuffix(".json")
            name = "ensemble" if path == layout.ensemble_metrics else name
            body.append([f"**{name}**" if name == "ensemble" else name, *(with_ci(mm, k) for k in cols)])
        lines += ["## Models (test set; [95% CI] from the lesion bootstrap)", ""]
        lines += _table(["model", *cols], body) + [""]
        ens = m.get(layout.ensemble_metrics) or {}
        weights = {k.removeprefix("weight_"): v for k, v in ens.items() if k.startswith("weight_")}
        if weights:
            lines += ["Ensemble weights: " + ", ".join(f"{k} {fmt(v)}" for k, v in weights.items()) + "."]
        if "worst_subgroup" in ens:
            lines += [
                f"Worst subgroup (malignant recall): {ens['worst_subgroup']} "
                f"({fmt(ens.get('worst_subgroup_malignant_recall'))}, "
                f"{fmt(ens.get('worst_subgroup_n_malignant'))} malignant)."
            ]
        lines += [""]

    cal = m.get(layout.calibration_metrics)
    if cal:
        cols = [k for k in CALIBRATION_KEYS if k in cal]
        lines += ["## Calibration (threshold tuned on val, reported on test)", ""]
        lines += _table(cols, [[with_ci(cal, k) for k in cols]]) + [""]

    if r.gate:
        lines += ["## Promotion gate", ""]
        lines += _table(
            ["check", "result", "detail"],
            [(c["name"], "pass" if c["passed"] else "FAIL", c["detail"]) for c in r.gate.get("checks", [])],
        )
        lines += [""]
    if r.promotion:
        p = r.promotion
        lines += ["## Promotion", ""]
        lines += _table(["", ""], [(k, f"`{v}`" if isinstance(v, str) else fmt(v)) for k, v in p.items()])
        lines += [""]
    if r.diff_against:
        lines += [f"Metrics diff against production: {r.diff_against} (table `retrain-metrics-diff`).", ""]

    if r.links:
        lines += ["## Plots and reports", ""] + [f"- `{link}`" for link in r.links] + [""]
    return "\n".join(lines).rstrip() + "\n"


SPLIT_FACTS = (
    "n_images",
    "n_lesions",
    "n_groups",
    "largest_group",
    "leaking_groups",
    "n_near_duplicate_pairs",
    "n_cross_lesion_duplicate_pairs",
    "n_dropped",
    "n_undecodable",
)


def split_section(split: Mapping[str, Any]) -> list[str]:
    """Images per split and class (``train_n``, ``train_n_mel``, ...), then the grouping facts."""
    splits = [s for s in ("train", "val", "test") if f"{s}_n" in split]
    if not splits:
        return _table(["", "value"], [(k, fmt(v)) for k, v in split.items()])
    classes: list[str] = []
    for key in split:
        for s in splits:
            if key.startswith(f"{s}_n_") and key[len(s) + 3 :] not in classes:
                classes.append(key[len(s) + 3 :])
    header = ["split", "images", *classes, "fraction"]
    rows = [
        [
            s,
            fmt(split[f"{s}_n"]),
            *(fmt(split.get(f"{s}_n_{c}")) for c in classes),
            fmt(split.get(f"{s}_fraction")),
        ]
        for s in splits
    ]
    facts = [(k, fmt(split[k])) for k in SPLIT_FACTS if k in split]
    return _table(header, rows) + ([""] + _table(["", "value"], facts) if facts else [])


def diff_table(diff: Mapping[str, Mapping[str, Mapping[str, Any]]], *, with_ci: bool = False) -> list[dict]:
    """Rows of the metrics-diff table artifact from ``dvc metrics diff --json`` (rounded).

    Confidence-interval bounds are left out unless ``with_ci``: they double the rows and the
    summary shows them next to their metric.
    """
    rows = []
    for path, keys in diff.items():
        for key, d in keys.items():
            if not with_ci and key.endswith(_CI):
                continue
            old, new = d.get("old"), d.get("new")
            change = d.get("diff")
            rows.append(
                {
                    "file": path,
                    "metric": key,
                    "production": _round(old) if old is not None else "—",
                    "candidate": _round(new) if new is not None else "—",
                    "change": _round(change) if isinstance(change, (int, float)) and old is not None else "—",
                }
            )
    return rows
