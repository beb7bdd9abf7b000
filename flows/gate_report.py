"""The gate in the retrain summary: its thresholds, the data versions and the paired comparison
with production, as Markdown sections inserted before the summary's gate table
(:func:`flows.report.render_summary`). Pure functions on the plain dicts the gate records
(:attr:`flows.gate.Verdict.summary`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flows.dvcops import Layout
from flows.gate import recall_bar
from flows.gate_paired import PAIRED_GATE_KEY
from flows.report import RunReport, fmt, mode_label, render_summary, table
from skinlesion.measure.paired import PAIRED_KEYS

__all__ = ["gate_markdown", "paired_markdown", "render_retrain_summary"]


def gate_markdown(gate: Mapping[str, Any], layout: Layout) -> list[str]:
    """The summary's sections on the gate's thresholds and the data versions (``report.gate``)."""
    lines: list[str] = []
    th = gate.get("thresholds")
    if th:
        committed = th["committed"]
        lines += ["## Gate thresholds", ""]
        if th["overrides"]:
            shown = ", ".join(
                f"`{k}={v}` (committed: {fmt(committed[k])})" for k, v in th["overrides"].items()
            )
            lines += [f"**GATE OVERRIDDEN by the operator (gate_overrides), this run only:** {shown}.", ""]
        lines += table(
            ["threshold", "committed", "this run's gate"],
            [
                ("test malignant recall, in every input mode of the bundle (`promote.min_test_recall`, "
                 "null: `calibrate.target_recall`)",
                 fmt(recall_bar(committed)), fmt(th["target_recall"])),
                ("AUC drop allowed (`promote.max_auc_drop`; paired: the lower bound of the CI of the "
                 "macro AUC difference on the same images)", fmt(committed["promote.max_auc_drop"]),
                 fmt(th["max_auc_drop"])),
                ("paired lesion bootstrap: replicates, seed (`evaluate.bootstrap_samples`, `base.seed`)",
                 *[f"{th['bootstrap_samples']}, seed {th['seed']}"] * 2),
            ],
        )  # fmt: skip
        lines += ["", f"Committed values from {th['source']}."]
        if th["ignored"]:
            shown = ", ".join(f"`{k}={v}`" for k, v in th["ignored"].items())
            lines += [
                f"params_overrides of gate inputs, not used by the gate: {shown} (they configure "
                "the candidate: an overridden `calibrate.target_recall` retunes its threshold; "
                "thresholds change only through gate_overrides)."
            ]
        lines += [""]
    data = gate.get("data")
    if data and data["status"] != "no production":
        titles = {"same": "same as production", "newer": "NEWER than production's"}
        title = titles.get(data["status"], "unknown")
        lines += [f"## Data version: {title}", "", data["note"][:1].upper() + data["note"][1:] + ".", ""]
        rows = []
        for path in layout.data_outputs:
            old, new = data["production"].get(path), data["candidate"].get(path)
            if old is None and new is None:
                continue
            verdict = "—" if old is None or new is None else ("same" if old == new else "changed")
            rows.append((f"`{path}`", f"`{old}`" if old else "—", f"`{new}`" if new else "—", verdict))
        lines += table(["output (md5 in dvc.lock)", "production", "candidate", ""], rows) + [""]
    if gate.get("paired"):
        lines += paired_markdown(gate["paired"], (th or {}).get("max_auc_drop"))
    return lines


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


def paired_markdown(paired: Mapping[str, Any], max_auc_drop: float | None) -> list[str]:
    """The summary's section on the paired comparison (``PairedGate.as_dict()``)."""
    lines = ["## Paired comparison with production", ""]
    if paired.get("unavailable"):
        lines += [
            f"Not compared on the same images: {paired['unavailable']}. The AUC checks compare each "
            "bundle's stored test metrics.",
            "",
        ]
        return lines
    level = round(100 * paired["level"])
    failed = f", less {paired['n_failed']} production could not score" if paired["n_failed"] else ""
    rule = (
        f" The gate: the lower bound of the {PAIRED_GATE_KEY} CI >= {-max_auc_drop:+.3f} in every input mode."
        if max_auc_drop is not None
        else ""
    )
    first = paired["modes"][0]
    lines += [
        f"Both bundles scored on the same **{first['n_images']}** test images ({first['n_lesions']} "
        f"lesions): the candidate's {paired['n_test']} test images less **{paired['n_left_out']}** "
        f"({paired['n_lesions_left_out']} lesions) production trained, tuned or calibrated on{failed}. "
        f"Difference = candidate - production, {level}% CI of {paired['samples']} lesion-bootstrap "
        f"replicates (seed {paired['seed']}).{rule}",
        "",
    ]
    rows = []
    for m in paired["modes"]:
        for key in PAIRED_KEYS:
            d = m["metrics"].get(key)
            if d is None:
                continue
            ci = f"[{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]"
            shown = f"**{key}**" if key == PAIRED_GATE_KEY else key
            rows.append((mode_label(m["mode"]), shown, fmt(d["production"]), fmt(d["candidate"]),
                         _signed(d["diff"]), ci))  # fmt: skip
    lines += table(["input mode", "metric", "production", "candidate", "difference", f"{level}% CI"], rows)
    lines += [""] + [f"- {note}" for note in paired.get("notes") or []]
    return lines + ([""] if paired.get("notes") else [])


def render_retrain_summary(report: RunReport, layout: Layout) -> str:
    """The summary artifact: :func:`flows.report.render_summary` with the gate's thresholds and
    the data versions just before its gate table."""
    md = render_summary(report, layout)
    extra = gate_markdown(report.gate or {}, layout)
    if not extra:
        return md
    marker = "## Promotion gate\n"
    at = md.find(marker)
    block = "\n".join(extra) + "\n"
    return md[:at] + block + md[at:] if at >= 0 else md.rstrip() + "\n\n" + block
