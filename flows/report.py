"""What a retrain run tells its operator: the markdown summary and the metrics-diff table.

Pure functions on plain values (no Prefect, no I/O), so they are tested on small dicts; the flow
publishes their output as Prefect artifacts. The helpers every flow's Markdown uses live here too
(:func:`fmt`, :func:`mode_label`, :func:`table`, :func:`with_ci`); the gate's sections are
:mod:`flows.gate_report`'s. Numbers are rounded here: ``dvc metrics diff
--json`` prints them unrounded.

A bundle fusing metadata reports every metric in two input modes (``skinlesion.measure.scoring``): the key
as is, each test image with its own metadata ("with metadata"), and the key with the suffix
``_image_only``, every image without ("image only"). Each table shows both, labelled; the
metrics of a bundle without fusion (one mode) are shown as they always were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.dvcops import Layout
from skinlesion.measure.scoring import IMAGE_ONLY, IMAGE_ONLY_SUFFIX, METADATA

__all__ = [
    "RunReport",
    "diff_table",
    "fmt",
    "metric_modes",
    "mode_label",
    "render_summary",
    "table",
    "with_ci",
]

MODE_LABELS = {METADATA: "with metadata", IMAGE_ONLY: "image only"}

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


def mode_label(mode: str) -> str:
    """An input mode for people: ``with metadata``, ``image only``."""
    return MODE_LABELS.get(mode, mode.replace("_", " "))


def metric_modes(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, key suffix)`` of each input mode a metrics file reports: with metadata and image
    only for a bundle fusing metadata (it has ``_image_only`` keys), ``[("", "")]`` otherwise."""
    if any(k.endswith(IMAGE_ONLY_SUFFIX) for k in metrics):
        return [(mode_label(METADATA), ""), (mode_label(IMAGE_ONLY), IMAGE_ONLY_SUFFIX)]
    return [("", "")]


def _round(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return round(v, digits)
    return v


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (``|`` in a cell escaped, newlines made spaces), as lines."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return out


def with_ci(metrics: Mapping[str, Any], key: str, suffix: str = "") -> str:
    """``key`` with its CI; ``suffix`` is the mode's (it follows the CI's: ``x_ci_low_image_only``)."""
    v = metrics.get(key + suffix)
    lo, hi = metrics.get(key + _CI[0] + suffix), metrics.get(key + _CI[1] + suffix)
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
    lines += table(["", ""], facts) + [""]

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
        lines += ["## Stages", ""] + table(["stage", "result", "seconds", "device"], rows) + [""]

    m = r.metrics
    split = m.get(layout.split_metrics)
    if split:
        lines += ["## Split", ""] + split_section(split) + [""]
    validation = m.get(layout.validation_metrics)
    if validation:
        shown = [(k, fmt(validation[k])) for k in VALIDATION_KEYS if k in validation]
        shown += [(k, fmt(v)) for k, v in validation.items() if "_fail_" in k and v]
        lines += ["## Validation", ""] + table(["", "value"], shown) + [""]

    model_rows = [(p, mm) for p, mm in m.items() if p.startswith(layout.eval_metrics_dir.rstrip("/") + "/")]
    if layout.ensemble_metrics in m:
        model_rows.append((layout.ensemble_metrics, m[layout.ensemble_metrics]))
    if model_rows:
        cols = [k for k in MODEL_KEYS if any(k in mm for _, mm in model_rows)]
        body = []
        for path, mm in model_rows:
            name = path.rsplit("/", 1)[-1].removesuffix(".json")
            name = "ensemble" if path == layout.ensemble_metrics else name
            for label, sfx in metric_modes(mm):
                shown = f"{name} ({label})" if label else name
                shown = f"**{shown}**" if name == "ensemble" else shown
                body.append([shown, *(with_ci(mm, k, sfx) for k in cols)])
        lines += ["## Models (test set; [95% CI] from the lesion bootstrap)", ""]
        lines += table(["model", *cols], body) + [""]
        ens = m.get(layout.ensemble_metrics) or {}
        weights = {k.removeprefix("weight_"): v for k, v in ens.items() if k.startswith("weight_")}
        if weights:
            lines += ["Ensemble weights: " + ", ".join(f"{k} {fmt(v)}" for k, v in weights.items()) + "."]
        for label, sfx in metric_modes(ens):
            if "worst_subgroup" + sfx in ens:
                lines += [
                    "Worst subgroup (malignant recall" + (f", {label}" if label else "") + "): "
                    f"{ens['worst_subgroup' + sfx]} "
                    f"({fmt(ens.get('worst_subgroup_malignant_recall' + sfx))}, "
                    f"{fmt(ens.get('worst_subgroup_n_malignant' + sfx))} malignant)."
                ]
        lines += [""]

    cal = m.get(layout.calibration_metrics)
    if cal:
        modes = metric_modes(cal)
        lines += ["## Calibration (threshold tuned on val, reported on test)", ""]
        if len(modes) == 1:
            cols = [k for k in CALIBRATION_KEYS if k in cal]
            lines += table(cols, [[with_ci(cal, k) for k in cols]]) + [""]
        else:  # one operating point per input mode, each tuned on val in that mode
            cols = [k for k in CALIBRATION_KEYS if any(k + sfx in cal for _, sfx in modes)]
            rows = [[label, *(with_ci(cal, k, sfx) for k in cols)] for label, sfx in modes]
            lines += table(["input mode", *cols], rows) + [""]

    if r.gate:
        lines += ["## Promotion gate", ""]
        lines += table(
            ["check", "result", "detail"],
            [(c["name"], "pass" if c["passed"] else "FAIL", c["detail"]) for c in r.gate.get("checks", [])],
        )
        lines += [""]
    if r.promotion:
        p = r.promotion
        lines += ["## Promotion", ""]
        lines += table(["", ""], [(k, f"`{v}`" if isinstance(v, str) else fmt(v)) for k, v in p.items()])
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
        return table(["", "value"], [(k, fmt(v)) for k, v in split.items()])
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
    return table(header, rows) + ([""] + table(["", "value"], facts) if facts else [])


def diff_table(diff: Mapping[str, Mapping[str, Mapping[str, Any]]], *, with_ci: bool = False) -> list[dict]:
    """Rows of the metrics-diff table artifact from ``dvc metrics diff --json`` (rounded).

    Confidence-interval bounds are left out unless ``with_ci``: they double the rows and the
    summary shows them next to their metric. When either side has image-only metrics (a bundle
    fusing metadata), every row also says its input ``mode``: ``image only`` for a
    ``_image_only`` key, ``with metadata`` for a key that has an image-only twin in its file,
    ``—`` for a key that does not depend on the mode.
    """
    modal = any(k.endswith(IMAGE_ONLY_SUFFIX) for keys in diff.values() for k in keys)
    rows = []
    for path, keys in diff.items():
        for key, d in keys.items():
            base = key.removesuffix(IMAGE_ONLY_SUFFIX)
            if not with_ci and base.endswith(_CI):
                continue
            old, new = d.get("old"), d.get("new")
            change = d.get("diff")
            row = {"file": path, "metric": key}
            if modal:
                if key != base:
                    row["mode"] = mode_label(IMAGE_ONLY)
                else:
                    row["mode"] = mode_label(METADATA) if key + IMAGE_ONLY_SUFFIX in keys else "—"
            rows.append(
                {
                    **row,
                    "production": _round(old) if old is not None else "—",
                    "candidate": _round(new) if new is not None else "—",
                    "change": _round(change) if isinstance(change, (int, float)) and old is not None else "—",
                }
            )
    return rows
