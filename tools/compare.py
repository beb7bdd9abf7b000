"""Paired comparison of two runs: ``python -m tools.compare A [B]`` (``make compare A=.. B=..``).

A run is a git revision (``HEAD~1``, a tag, a sha), a DVC experiment name (``dvc exp run -n NAME``,
``dvc exp list``) or ``workspace`` (B's default). Each run's files are read as it holds them: git
files from git, DVC outputs from the DVC cache (``dvc.api.DVCFileSystem``), the workspace from disk
(:mod:`tools.runs` reads them; this module compares and prints).

Both runs' served test predictions (the calibrate stage's ``data/served/test*.csv``: the bundle's
own answers, one file per input mode) are paired image by image, and for each headline metric
(:data:`skinlesion.measure.paired.HEADLINE_KEYS`) this prints A, B, B - A and the lesion-bootstrap CI of B - A
(:func:`skinlesion.measure.paired.paired_bootstrap`: each replicate draws lesions and measures both runs on
the draw, so the test images' own variation cancels out). A difference is *significant* only
when its CI excludes 0 and it is larger than the run-to-run noise band of training
(``metrics/noise.json`` of B, else of A, written by ``make noise``); without a band the CI alone
decides, and the table says so. ``ece_after`` is shown unpaired (no CI). Also shown: the params
that differ and each run's data version (data/raw's md5 in its dvc.lock).

When the runs' test sets differ (another data version), the counts are given and the comparison
uses the images both scored; ``--rescore`` instead scores A's bundle on B's test split through
the serving path, leaving out every image whose lesion or image A trained, tuned or calibrated on
(the bundle's ``seen.json``; for an older bundle, A's split train + val rows; :mod:`tools.rescore`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_file
from skinlesion.core.schema import CLASSES
from skinlesion.measure.paired import (
    HEADLINE_KEYS,
    LOWER_IS_BETTER,
    PAIRED_KEYS,
    PairedDiff,
    Pairing,
    pair,
    paired_bootstrap,
)
from tools.profile import flatten
from tools.rescore import rescore
from tools.runs import WORKSPACE, Layout, RunData, RunFiles, load_run, read_bands, resolve

log = logging.getLogger(__name__)

ECE_KEY = HEADLINE_KEYS[-1]  # ece_after: shown unpaired
DEFAULT_SAMPLES = 1000  # when B's params ask for no bootstrap (evaluate.bootstrap_samples: 0)
COMPARE_FORMAT_VERSION = 1
MAX_PARAMS_SHOWN = 12


# --------------------------------------------------------------------------- the verdict (pure)


@dataclass(frozen=True)
class Row:
    """One headline metric of one input mode: the paired difference and what it means."""

    key: str
    a: float
    b: float
    diff: float
    lo: float | None  # CI of B - A (None: unpaired, ece_after)
    hi: float | None
    band: float | None  # the noise band of the metric (None: not measured)
    significant: bool
    verdict: str

    def as_json(self) -> dict[str, Any]:
        return {k: _json_num(v) for k, v in self.__dict__.items()}


def direction(key: str, diff: float) -> str:
    """``B better`` or ``B worse`` for a non-zero difference (lower is better for some keys)."""
    better = diff < 0 if key in LOWER_IS_BETTER else diff > 0
    return "B better" if better else "B worse"


def verdict(d: PairedDiff, band: float | None) -> tuple[bool, str]:
    """Significant only when the paired CI excludes 0 *and* |B - A| exceeds the noise band;
    without a band (no ``make noise``) the CI alone decides and the text says so."""
    if any(math.isnan(v) for v in (d.diff, d.lo, d.hi)):
        return False, "n/a (undefined on these images)"
    if not d.ci_excludes_zero():
        return False, "not significant (CI includes 0)"
    if band is None:
        return True, f"significant, {direction(d.key, d.diff)} (CI only: no noise band measured, make noise)"
    if d.significant(band):
        return True, f"significant, {direction(d.key, d.diff)}"
    return False, f"not significant (within noise: |B-A| <= band {band:.3g})"


def ece_row(key: str, a: float | None, b: float | None, band: float | None) -> Row:
    """``ece_after``: A, B and B - A without a CI (its bootstrap is dominated by the binning)."""
    a_, b_ = _float(a), _float(b)
    diff = b_ - a_
    if math.isnan(diff):
        text = "n/a"
    elif band is None:
        text = "unpaired, no CI"
    elif abs(diff) <= band:
        text = "unpaired, no CI; within noise"
    else:
        text = f"unpaired, no CI; beyond the noise band, {direction(key, diff)}"
    return Row(key, a_, b_, diff, None, None, band, False, text)


def rows_of(diffs: Mapping[str, PairedDiff], bands: Mapping[str, float], suffix: str) -> list[Row]:
    """The table rows of the paired metrics of one mode; ``bands`` keyed as the headline is."""
    out = []
    for key in PAIRED_KEYS:
        d = diffs[key]
        band = bands.get(key + suffix)
        sig, text = verdict(d, band)
        out.append(Row(key, d.a, d.b, d.diff, d.lo, d.hi, band, sig, text))
    return out


def params_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, A's value, B's value)`` of every param that differs (None: absent)."""
    fa, fb = flatten(a), flatten(b)
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def differing_test_sets(pairing: Pairing, name_a: str = "A", name_b: str = "B") -> str | None:
    """One line when the two test sets differ (None when they are the same images)."""
    if not pairing.only_a and not pairing.only_b:
        return None
    return (
        f"the two runs' test sets differ: {pairing.n_images} images in common, {pairing.only_a} only in "
        f"{name_a}, {pairing.only_b} only in {name_b}"
    )


def ece(frame: pd.DataFrame, n_bins: int, classes: Sequence[str] = CLASSES) -> float:
    """The calibration error of a served frame's probabilities, as the calibrate stage measures it."""
    from skinlesion.measure.metrics import expected_calibration_error

    y = frame["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    probs = frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    return float(expected_calibration_error(probs, y, n_bins))


def _float(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _json_num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# --------------------------------------------------------------------------- the comparison


@dataclass
class ModeResult:
    suffix: str
    file: str
    mode_a: str
    mode_b: str
    n_images: int
    n_lesions: int
    only_a: int
    only_b: int
    rows: list[Row]

    def as_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "rows"}
        return {**d, "metrics": {r.key: r.as_json() for r in self.rows}}


def compare_mode(
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    *,
    suffix: str,
    bands: Mapping[str, float],
    n_samples: int,
    seed: int,
    level: float,
    ece_ab: tuple[float | None, float | None] | None = None,
    ece_bins: int = 15,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> tuple[Pairing, list[Row]]:
    """The rows of one input mode: the paired metrics with their CIs and verdicts, then ECE
    (``ece_ab``: the runs' reported values, when the comparison covers their whole test sets;
    else measured on the paired images)."""
    try:
        pairing = pair(frame_a, frame_b)
    except ValueError as e:
        raise StageError(str(e)) from None
    if pairing.n_images == 0:
        raise StageError("the two runs have no test image in common (another data version?): add --rescore")
    diffs = paired_bootstrap(
        pairing, n_samples=n_samples, rng=np.random.default_rng(seed), level=level, progress=progress
    )
    rows = rows_of(diffs, bands, suffix)
    if ece_ab is None:
        ece_ab = (ece(pairing.a, ece_bins), ece(pairing.b, ece_bins))
    rows.append(ece_row(ECE_KEY, *ece_ab, bands.get(ECE_KEY + suffix)))
    return pairing, rows


def _fmt(v: float | None, key: str, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    digits = 1 if key == "referrals_per_100" else 3
    v = 0.0 if round(v, digits) == 0 else v  # no "-0.000"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def format_table(result: ModeResult, level: float) -> list[str]:
    head = ["metric", "A", "B", "B-A", f"{round(100 * level)}% CI of B-A", "noise band", "verdict"]
    body = []
    for r in result.rows:
        ci = "(unpaired)" if r.lo is None else f"[{_fmt(r.lo, r.key, True)}, {_fmt(r.hi, r.key, True)}]"
        band = "-" if r.band is None else f"{r.band:.3g}"
        body.append(
            [r.key, _fmt(r.a, r.key), _fmt(r.b, r.key), _fmt(r.diff, r.key, True), ci, band, r.verdict]
        )
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in [head, *body]
    ]


def _value(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def report_lines(result: dict[str, Any], modes: Sequence[ModeResult]) -> list[str]:
    """What is printed: the runs, what changed between them, one table per input mode, a verdict."""
    a, b = result["a"], result["b"]
    lines = [f"# compare A = {a['label']}  vs  B = {b['label']}"]
    same = a["data_raw_md5"] == b["data_raw_md5"]
    lines.append(
        f"# data version (data/raw md5 in dvc.lock): A {a['data_raw_md5'] or 'unknown'}, "
        f"B {b['data_raw_md5'] or 'unknown'}" + (" (same)" if same and a["data_raw_md5"] else "")
    )
    changed = result["params_changed"]
    if not changed:
        lines.append("# params: none differ")
    else:
        lines.append(f"# params that differ ({len(changed)}), A -> B:")
        for p in changed[:MAX_PARAMS_SHOWN]:
            lines.append(f"#   {p['key']}: {_value(p['a'])} -> {_value(p['b'])}")
        if len(changed) > MAX_PARAMS_SHOWN:
            lines.append(f"#   ... and {len(changed) - MAX_PARAMS_SHOWN} more (--json OUT lists them all)")
    if result["test_sets"]:
        lines.append(f"# {result['test_sets']}")
    rs = result["rescore"]
    if rs:
        lines.append(
            f"# rescored: A's bundle on B's test split ({rs['n_test']} images): {rs['n_left_out']} images "
            f"({rs['n_left_out_lesions']} lesions) left out that A trained, tuned or calibrated on "
            f"({rs['seen_source']}); {rs['n_failed']} could not be scored"
        )
    boot = result["bootstrap"]
    lines.append(
        f"# paired lesion bootstrap: {boot['samples']} replicates, seed {boot['seed']}, "
        f"{round(100 * boot['level'])}% CI of B-A"
    )
    noise = result["noise"]
    lines.append(
        f"# noise bands: {noise['source']}" if noise["source"] else
        "# noise bands: no noise band measured (make noise): the CI alone decides"
    )  # fmt: skip
    for m in modes:
        mode = m.mode_a if m.mode_a == m.mode_b else f"A {m.mode_a}, B {m.mode_b}"
        lines.append("")
        lines.append(f"{m.file} (mode {mode}): {m.n_images} images, {m.n_lesions} lesions")
        lines.extend(format_table(m, boot["level"]))
    for note in result["not_compared"]:
        lines.append(f"# {note}")
    lines.append("")
    moved = [
        f"{r.key}{m.suffix} ({direction(r.key, r.diff)}, {_fmt(r.diff, r.key, True)})"
        for m in modes for r in m.rows if r.significant
    ]  # fmt: skip
    lines.append("significant: " + "; ".join(moved) if moved else "no headline metric differs significantly")
    return lines


@dataclass(frozen=True)
class Settings:
    """The bootstrap of a comparison: B's evaluate settings unless given."""

    samples: int
    seed: int
    level: float
    ece_bins: int

    @staticmethod
    def of(params: Mapping[str, Any], samples: int | None, seed: int) -> Settings:
        evaluate = params.get("evaluate") or {}
        n = samples if samples is not None else int(evaluate.get("bootstrap_samples") or 0)
        if n < 1:
            if samples is not None:
                raise StageError(f"--samples must be >= 1, got {samples}")
            log.info(
                "B's evaluate.bootstrap_samples is 0: using %d replicates (--samples N)", DEFAULT_SAMPLES
            )
            n = DEFAULT_SAMPLES
        level = float(evaluate.get("ci_level") or 0.95)
        return Settings(n, seed, level, int((params.get("calibrate") or {}).get("ece_bins") or 15))


def _pair(a: pd.DataFrame, b: pd.DataFrame) -> Pairing:
    try:
        return pair(a, b)
    except ValueError as e:  # the same image_id with another label: not the same test images
        raise StageError(str(e)) from None


def compare_frames(
    frames_a: Mapping[str, pd.DataFrame],
    modes_a: Mapping[str, str],
    b: RunData,
    *,
    bands: Mapping[str, float],
    settings: Settings,
    reported_a: Mapping[str, Any] | None,
    progress: bool,
) -> tuple[list[ModeResult], list[str]]:
    """One :class:`ModeResult` per served file both runs have; notes on the files only one has.
    ``reported_a``: A's headline, whose ECE is used when A's frames are A's own whole test set."""
    from tqdm import tqdm

    results: list[ModeResult] = []
    for sfx in [s for s in b.frames if s in frames_a]:
        fa, fb, name = frames_a[sfx], b.frames[sfx], f"test{sfx}.csv"
        reported = None
        if reported_a and b.headline and set(fa["image_id"]) == set(fb["image_id"]):
            reported = (reported_a.get(ECE_KEY + sfx), b.headline.get(ECE_KEY + sfx))
            reported = reported if None not in reported else None

        def bar(it: Iterator, name: str = name) -> Iterator:
            return tqdm(it, total=settings.samples, desc=f"paired bootstrap ({name})", unit="rep",
                        mininterval=1.0, disable=not progress)  # fmt: skip

        pairing, rows = compare_mode(
            fa, fb, suffix=sfx, bands=bands, n_samples=settings.samples, seed=settings.seed,
            level=settings.level, ece_ab=reported, ece_bins=settings.ece_bins, progress=bar,
        )  # fmt: skip
        results.append(
            ModeResult(
                sfx,
                name,
                modes_a[sfx],
                b.modes[sfx],
                pairing.n_images,
                pairing.n_lesions,
                pairing.only_a,
                pairing.only_b,
                rows,
            )  # fmt: skip
        )
    notes = [
        f"test{s}.csv: only B has this mode ({b.modes[s]}): not compared"
        for s in b.frames
        if s not in frames_a
    ]
    notes += [
        f"test{s}.csv: only A has this mode ({modes_a[s]}): not compared"
        for s in frames_a
        if s not in b.frames
    ]
    return results, notes


def run(
    a_name: str,
    b_name: str = WORKSPACE,
    *,
    root: Path,
    layout: Layout = Layout(),  # noqa: B008 - frozen: one shared default is safe
    samples: int | None = None,
    seed: int = 0,
    do_rescore: bool = False,
    out: Path | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    stdout: Any = None,
) -> dict[str, Any]:
    """Compare run B against run A; prints the report and returns what ``--json`` writes."""
    stdout = stdout or sys.stdout
    if out is not None:
        from serve.predict import check_output_file

        check_output_file("--json", Path(out), (".json",))
    if a_name == b_name == WORKSPACE:
        raise StageError("A and B are both the workspace: name a git revision or an experiment for one")
    run_a, run_b = resolve(root, a_name), resolve(root, b_name)
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-")))
        files_a = stack.enter_context(RunFiles(root, run_a, scratch / "a", layout.lock))
        files_b = stack.enter_context(RunFiles(root, run_b, scratch / "b", layout.lock))
        a, b = load_run(files_a, layout), load_run(files_b, layout)
        bands, band_source = read_bands([b, a], layout)
        settings = Settings.of(b.params, samples, seed)
        test_sets, rs = None, None
        if do_rescore:
            rs = rescore(
                a, b, layout, scratch=scratch, batch_size=batch_size, workers=workers, progress=progress
            )
            frames_a, modes_a, reported_a = rs.frames, rs.modes, None
        else:
            frames_a, modes_a, reported_a = a.frames, a.modes, a.headline
            test_sets = differing_test_sets(_pair(a.frames[""], b.frames[""]))
            if test_sets:
                test_sets += (
                    f" (data/raw: A {a.data_md5 or 'unknown'}, B {b.data_md5 or 'unknown'}); compared on "
                    "the common images; --rescore scores A's bundle on B's whole test split instead"
                )
                log.warning("%s", test_sets)
        results, notes = compare_frames(
            frames_a, modes_a, b, bands=bands, settings=settings, reported_a=reported_a, progress=progress
        )
        result: dict[str, Any] = {
            "format_version": COMPARE_FORMAT_VERSION,
            "a": _run_json(a),
            "b": _run_json(b),
            "params_changed": [{"key": k, "a": va, "b": vb} for k, va, vb in params_diff(a.params, b.params)],
            "test_sets": test_sets,
            "rescore": None if rs is None else rs.as_json(),
            "bootstrap": {"samples": settings.samples, "seed": seed, "level": settings.level},
            "noise": {"source": band_source, "bands": bands},
            "not_compared": notes,
            "modes": {m.file: m.as_json() for m in results},
            "significant": [f"{r.key}{m.suffix}" for m in results for r in m.rows if r.significant],
        }
    print("\n".join(report_lines(result, results)), file=stdout)
    if out is not None:
        with atomic_file(out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, allow_nan=False, default=str)
            fh.write("\n")
        log.info("comparison in %s", out)
    return result


def _run_json(data: RunData) -> dict[str, Any]:
    r = data.run
    return {
        "name": r.name,
        "sha": r.sha,
        "experiment": r.experiment,
        "label": r.label,
        "data_raw_md5": data.data_md5,
        "modes": data.modes,
        "headline": {k: _json_num(v) for k, v in (data.headline or {}).items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.compare",
        description=(
            "Compare two runs on the same test images: per headline metric A, B, B-A, the paired "
            "lesion-bootstrap CI of B-A and a verdict (significant only when the CI excludes 0 and "
            "|B-A| exceeds the noise band of make noise). A run: a git revision, a DVC experiment "
            "name, or 'workspace'."
        ),
    )
    ap.add_argument(
        "a", metavar="A", help="the run compared against: git revision, experiment name, workspace"
    )
    ap.add_argument("b", metavar="B", nargs="?", default=WORKSPACE, help="the other run (default: workspace)")
    ap.add_argument(
        "--rescore", action="store_true",
        help="score A's bundle on B's test split (leaving out what A trained, tuned or calibrated on) "
        "instead of comparing on the images both runs scored; for runs on other data versions",
    )  # fmt: skip
    ap.add_argument(
        "--samples", type=int, metavar="N",
        help="bootstrap replicates (default: B's evaluate.bootstrap_samples)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the comparison to OUT (.json)")
    ap.add_argument("--repo", type=Path, default=Path("."), help="the project (default: the current folder)")
    ap.add_argument("--batch-size", type=int, default=32, help="--rescore: images per model call")
    ap.add_argument("--workers", type=int, default=0, help="--rescore: decode processes (0: all cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported (--rescore)
    # DVC's own loggers are chatty at INFO about its index and cache; our messages name the files.
    logging.getLogger("dvc").setLevel(logging.WARNING)

    def body() -> int:
        run(
            args.a, args.b, root=args.repo.resolve(), samples=args.samples, seed=args.seed,
            do_rescore=args.rescore, out=args.json, batch_size=args.batch_size, workers=args.workers,
            progress=not args.no_progress,
        )  # fmt: skip
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
