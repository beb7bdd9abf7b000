"""Validate stage: the Great Expectations gate between the split and anything that trains.

Real HAM10000 copies carry small damage (blanked rows, home-made classes, long diagnosis names,
truncated JPEGs, grayscale or CMYK files, PNGs renamed ``.jpg``, absurdly large images). A model
trained on such data is confidently wrong, so this stage refuses the data and says exactly why.

How it works: the inputs are turned into a few pandas frames of *facts*, each checked by a GX
1.x expectation suite (:mod:`skinlesion.checks.suites`: ``metadata``, ``images``, ``split``).
Facts that need a whole file are computed first, in worker processes
(:mod:`skinlesion.checks.imagefacts`); GX then holds the pass/fail rules and renders them as
Data Docs (:mod:`skinlesion.checks.gx`).

The gate: any failing expectation exits 1 with a short summary naming the first failing rows or
files (rows are line numbers of metadata.csv, header = line 1; :mod:`skinlesion.checks.validation_report`).
The Data Docs and the metrics are written either way so the failure can be inspected, but
``--out`` is only written on success, so dvc stops before prepare/train. With
``on_image_error: quarantine`` bad images are listed in ``quarantine.csv`` and left out of the
validated split instead, and the run passes only if the remainder still passes every other
expectation (the split suite is checked after the removal).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion.checks.gx import GxRunner
from skinlesion.checks.imagefacts import inspect_images, list_image_files
from skinlesion.checks.suites import (
    SUITES,
    Failure,
    add_metadata_facts,
    image_check,
    image_frame,
    metadata_checks,
    split_checks,
)
from skinlesion.checks.validation_report import failure_summary, quarantine_rows
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.parallel import n_workers
from skinlesion.core.splits import SPLIT_CSV, SPLITS, UNDECODABLE_CSV, read_split
from skinlesion.core.tables import read_rows, read_table
from skinlesion.params.schema import load_sections
from skinlesion.params.split import FractionsParams, SplitParams
from skinlesion.params.validate import ValidateParams

log = logging.getLogger(__name__)

# The split.csv columns the split suite checks.
SPLIT_NEEDS: tuple[str, ...] = ("image_id", "lesion_id", "group_id", "dx", "split")


@dataclass(frozen=True)
class ValidateResult:
    passed: bool
    suites: dict[str, bool]  # suite -> passed (after quarantine)
    failures: tuple[Failure, ...]  # what fails the gate
    warnings: tuple[Failure, ...]  # reported only (byte-identical copies)
    quarantine: pd.DataFrame = field(repr=False)  # image_id, file, reason
    n_rows: int = 0  # metadata rows
    n_images_checked: int = 0
    n_validated: int = 0  # rows in the validated split.csv (0 on failure)
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    summary: str = ""
    report_index: Path | None = None


class ValidationFailed(StageError):
    """The gate is closed; ``result`` holds the details, ``str(self)`` the summary."""

    def __init__(self, result: ValidateResult) -> None:
        super().__init__(result.summary)
        self.result = result


def run(
    params: ValidateParams,
    *,
    fractions: FractionsParams | None = None,
    raw: str | Path,
    split: str | Path,
    out: str | Path,
    report: str | Path,
    metrics: str | Path,
    progress: bool = True,
) -> ValidateResult:
    """Validate ``raw`` (metadata.csv + images/) and ``split``/split.csv.

    Always writes ``report`` (Data Docs + summary.txt) and ``metrics`` (flat JSON). On success
    writes ``out``/split.csv (the usable split rows) and ``out``/quarantine.csv and returns the
    result; on failure leaves ``out`` untouched and raises :class:`ValidationFailed`.
    ``fractions`` are the split targets (params ``split.fractions``).
    """
    t0 = time.perf_counter()
    fractions = fractions or FractionsParams()
    raw, split_dir, out, report = Path(raw), Path(split), Path(out), Path(report)

    meta = add_metadata_facts(read_rows(raw / "metadata.csv", empty=None))
    split_df = read_split(split_dir / SPLIT_CSV, SPLIT_NEEDS, hint="run the split stage first")
    undecodable = _read_undecodable(split_dir / UNDECODABLE_CSV)
    files = list_image_files(raw / "images")
    workers = n_workers(params.workers)
    log.info("metadata: %d rows; images/: %d files; split.csv: %d rows", len(meta), len(files), len(split_df))

    t = time.perf_counter()
    found = inspect_images([raw / "images" / n for n in files], params.max_pixels, workers, progress=progress)
    facts = dict(zip(files, found, strict=True))
    decode_s = time.perf_counter() - t
    log.info("inspected %d image files in %.1f s (%d worker(s))", len(files), decode_s, workers)
    images = image_frame(meta, files, facts)

    t = time.perf_counter()
    gx = GxRunner()
    checks = metadata_checks(meta, params)
    img_check = image_check(images, params)
    results: dict[str, list[Failure]] = {c.name: gx.validate(c) for c in [*checks, img_check]}

    quarantining = params.on_image_error == "quarantine"
    quarantine = quarantine_rows(images, results["images"] if quarantining else [], img_check)
    quarantined_ids = set(quarantine["image_id"])
    if undecodable:
        log.info(
            "the split stage could not decode %d image(s); checked here like every other", len(undecodable)
        )
    s_checks = split_checks(split_df, meta, images, params, fractions, quarantined_ids | undecodable)
    for c in s_checks:
        results[c.name] = gx.validate(c)
    gx_s = time.perf_counter() - t
    log.info("Great Expectations: %d validations in %.1f s", len(results), gx_s)
    checks_all = [*checks, img_check, *s_checks]

    failures, warned = [], []
    for c in checks_all:
        for f in results[c.name]:
            if not f.gating:
                warned.append(f)
            elif not (c is img_check and quarantining):  # those files are in quarantine instead
                failures.append(f)
    suites = {s: not any(f.suite == s for f in failures) for s in SUITES}
    passed = not failures

    with atomic_dir(report) as site:
        index = report / gx.build_docs(site).relative_to(site)
        summary = (
            failure_summary(failures, index, len(quarantine)) if failures else f"validation passed ({index})"
        )
        (site / "summary.txt").write_text(summary + "\n" + "".join(f"note: {f.line()}\n" for f in warned))

    usable = split_df[split_df["split"].isin(SPLITS) & ~split_df["image_id"].isin(quarantined_ids)]
    seconds = time.perf_counter() - t0
    metric_values: dict[str, Any] = {
        "passed": int(passed),
        **{f"{s}_passed": int(ok) for s, ok in suites.items()},
        "n_rows": len(meta),
        "n_images_checked": len(files),
        "n_quarantined": len(quarantine),
        "n_validated": len(usable) if passed else 0,
        "decode_seconds": round(decode_s, 3),
        "seconds": round(seconds, 3),
    }
    for c in checks_all:
        counts = {f.key: f.count for f in results[c.name]}
        for spec in c.specs:
            metric_values[f"{c.name}_fail_{spec.key}"] = counts.get(spec.key, 0)
    write_json(metrics, metric_values)

    result = ValidateResult(
        passed=passed,
        suites=suites,
        failures=tuple(failures),
        warnings=tuple(warned),
        quarantine=quarantine,
        n_rows=len(meta),
        n_images_checked=len(files),
        n_validated=len(usable) if passed else 0,
        seconds=seconds,
        metrics=metric_values,
        summary=summary,
        report_index=index,
    )
    for f in warned:
        log.warning("%s", f.line())
    if not passed:
        raise ValidationFailed(result)
    with atomic_dir(out) as tmp:
        _write_csv(tmp / SPLIT_CSV, usable)
        _write_csv(tmp / "quarantine.csv", quarantine)
    if len(quarantine):
        log.warning("quarantined %d image(s): %s", len(quarantine), out / "quarantine.csv")
    log.info("validation passed: %d split rows in %s (%.1f s)", len(usable), out / SPLIT_CSV, seconds)
    return result


def _read_undecodable(path: Path) -> set[str]:
    """Image ids the split stage listed as undecodable (optional file)."""
    if not path.is_file():
        return set()
    return set(read_table(path, required=("image_id",))["image_id"]) - {""}


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.validate",
        description="Great Expectations gate on the raw metadata, the image files and the split. "
        "Exits 1 with a summary naming the failing rows/files when a suite fails; the Data Docs and "
        "metrics are written either way, --out only on success.",
    )
    ap.add_argument(
        "--params", default="params.yaml", help="params file; reads 'validate' and 'split.fractions'"
    )
    ap.add_argument("--raw", required=True, help="raw data folder: metadata.csv + images/<image_id>.jpg")
    ap.add_argument("--split", required=True, help="split folder: split.csv (+ optional undecodable.csv)")
    ap.add_argument(
        "--out", required=True, help="output folder (split.csv, quarantine.csv); written only on success"
    )
    ap.add_argument(
        "--report", required=True, help="Data Docs folder (index.html, summary.txt), always written"
    )
    ap.add_argument("--metrics", required=True, help="metrics JSON file, always written")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, split=SplitParams, validate=ValidateParams)
        try:
            run(
                params.validate,
                fractions=params.split.fractions,
                raw=args.raw,
                split=args.split,
                out=args.out,
                report=args.report,
                metrics=args.metrics,
            )
        except ValidationFailed as e:
            print(str(e), file=sys.stderr)  # the summary, once (not through run_main's one-liner)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
