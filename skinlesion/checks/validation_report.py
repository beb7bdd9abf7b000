"""What a validation tells its user: the short terminal summary and the quarantine list.

The full report is GX's Data Docs (:meth:`skinlesion.checks.gx.GxRunner.build_docs`); this is the
text a user reads first, and the ``quarantine.csv`` rows for ``on_image_error: quarantine``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinlesion.checks.suites import SUITES, Check, Failure


def quarantine_rows(images: pd.DataFrame, failures: list[Failure], check: Check) -> pd.DataFrame:
    """quarantine.csv rows (image_id, file, reason) for the files that failed gating image checks."""
    reasons: dict[str, list[str]] = {}
    details = {s.key: s.detail for s in check.specs}
    for f in failures:
        if not f.gating:
            continue
        for name in f.index:
            row = images.loc[name]
            detail = details[f.key](row) if details[f.key] else ""
            reasons.setdefault(name, []).append(f"{f.message}" + (f": {detail}" if detail else ""))
    ordered = [n for n in images.index if n in reasons]
    return pd.DataFrame(
        {
            "image_id": [images.loc[n, "image_id"] for n in ordered],
            "file": [f"images/{n}" for n in ordered],
            "reason": ["; ".join(reasons[n]) for n in ordered],
        },
        columns=["image_id", "file", "reason"],
    )


def failure_summary(failures: list[Failure], report_index: Path | None, quarantined: int = 0) -> str:
    """The short text a user reads in the terminal: one line per failing expectation."""
    suites = sorted({f.suite for f in failures}, key=SUITES.index)
    head = f"validation failed: {len(failures)} expectation(s) in {', '.join(suites)}"
    if quarantined:
        head += f" (after quarantining {quarantined} image(s))"
    lines = [head + " (row = line in metadata.csv)"]
    lines += [f"  {f.line()}" for f in failures]
    if report_index is not None:
        lines.append(f"  details: {report_index}")
    return "\n".join(lines)
