"""External validation: how does this model do on OUR images? A bundle measured on a labelled folder.

    python -m serve.evaluate FOLDER [--bundle DIR] [--out FILE.json] [--plots DIR] [--bootstrap N]
                             [--batch-size N] [--workers N] [--no-progress]

FOLDER (or a .zip of one) is in HAM10000 layout and is read exactly as ``download.source=local:PATH``
reads one: a metadata table (``HAM10000_metadata.csv``, Dataverse's ``.tab``, or any .csv/.tab
whose header has lesion_id, image_id, dx, dx_type, age, sex, localization) and ``<image_id>.jpg``
files anywhere below it. Every labelled image is scored through the serving path
(:class:`serve.predictor.Predictor`, as ``serve.predict`` and the web app score it) and measured
with the code the calibrate stage reports its test split with
(:func:`skinlesion.measure.predictions.served_report`): macro AUC per image and per lesion with
lesion-bootstrap CIs, the balanced accuracy of the bundle's decision, malignant recall and
specificity at the bundle's thresholds, referrals per 100 lesions and the calibration error.

A bundle whose members fuse metadata is measured in both input modes on the same images:
``metadata`` (each image with its own age, sex and site, by the rule of skinlesion.measure.scoring) and
``image_only``. A row that cannot be used (a value outside HAM10000's vocabulary, no image file,
an image_id listed twice, no lesion_id, a damaged image) is named on stderr and in ``--out`` and
left out; the others are scored, and the exit code is then 1.

``--out`` (a .json file; an existing file is replaced atomically once the report is complete)
and ``--plots`` (a folder, created if missing; never a file) are checked before the folder is
read or the bundle loads: a folder at --out, a file at --plots, or a place that cannot be written
is one line, exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from serve.predict import check_output_file, check_output_folder
from serve.predictor import DISCLAIMER, Prediction, Predictor, default_bundle, pick_workers
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.outputs import atomic_file
from skinlesion.core.schema import CLASSES, HAM_COLUMNS
from skinlesion.core.tables import read_table
from skinlesion.measure.predictions import META_COLUMNS, Served, json_value, labels, served_report
from skinlesion.measure.scoring import METADATA, MODE_RULE, parse_metadata
from skinlesion.params.evaluate import EvaluateParams
from skinlesion.params.load import parse_params

# The reader of ``download.source=local:PATH``, so that this command takes exactly the table and
# the image files an import of the folder would take.
from skinlesion.sources.local import find_metadata_table, index_images, read_metadata_table, safe_extract_zip

log = logging.getLogger(__name__)

DEFAULT_SEED = 0  # of the lesion bootstrap: the same folder and bundle give the same CIs
SINGLE_MODE_NOTE = "image_only only: this bundle's members do not use metadata (age, sex, site are ignored)"


@dataclass(frozen=True)
class Skipped:
    """A labelled row left out, and why: ``file`` is the metadata table (with ``line``) for a bad
    row, the image file for an image that could not be scored."""

    image_id: str
    file: str
    reason: str
    line: int | None = None

    def what(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else self.file
        return f"image_id {self.image_id or '(empty)'}: {where}: {self.reason}"

    def message(self) -> str:
        return f"skipped {self.what()}"

    def as_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "file": self.file, "line": self.line, "reason": self.reason}


@dataclass(frozen=True)
class Labelled:
    """The usable rows of a labelled folder: one per image, in the table's order."""

    table: str  # the metadata table, as the user names it
    n_rows: int
    rows: pd.DataFrame  # META_COLUMNS (text, as in the table), indexed by the row's line
    paths: list[Path]  # the image file of each row
    meta: list[tuple[float, int, int]]  # parse_metadata of each row
    skipped: list[Skipped]


# --------------------------------------------------------------------------- the folder


def check_rows(
    table: pd.DataFrame,
    lines: Sequence[int],
    images: dict[str, Path],
    *,
    table_name: str,
    folder: str,
    classes: Sequence[str] = CLASSES,
) -> tuple[list[int], list[tuple[float, int, int]], list[Skipped]]:
    """Which rows of a metadata table can be scored: ``(their positions, their parsed metadata,
    the others named)``. Pure: ``table`` holds HAM_COLUMNS as text, ``lines`` its line numbers."""
    ids = table["image_id"].tolist()
    seen: dict[str, list[int]] = {}
    for line, image_id in zip(lines, ids, strict=True):
        seen.setdefault(image_id, []).append(line)
    good: list[int] = []
    metas: list[tuple[float, int, int]] = []
    skipped: list[Skipped] = []
    for pos, (line, row) in enumerate(zip(lines, table.itertuples(index=False), strict=True)):
        image_id = str(row.image_id)

        def skip(reason: str, image_id: str = image_id, line: int = line) -> None:
            skipped.append(Skipped(image_id, table_name, reason, line))

        if not image_id:
            skip("empty image_id")
            continue
        if len(seen[image_id]) > 1:
            others = ", ".join(str(n) for n in seen[image_id])
            skip(f"image_id {image_id} is listed on lines {others}: its label is ambiguous, none is used")
            continue
        if not row.lesion_id:
            skip("empty lesion_id (the lesion-level metrics and the CIs group images by lesion)")
            continue
        if row.dx not in classes:
            skip(f"dx {row.dx!r} is not one of {list(classes)}")
            continue
        try:
            meta = parse_metadata(row.age, row.sex, row.localization)
        except StageError as e:  # names the column and the value
            skip(str(e))
            continue
        if image_id not in images:
            skip(f"no image file {image_id}.jpg (or .jpeg) below {folder}")
            continue
        good.append(pos)
        metas.append(meta)
    return good, metas, skipped


def read_labelled(root: Path, *, shown: str, classes: Sequence[str] = CLASSES) -> Labelled:
    """The usable rows of the HAM10000-layout folder ``root`` (``shown``: its name for messages)."""

    def name(p: Path) -> str:
        return str(p).replace(str(root), shown, 1)

    try:
        meta_path = find_metadata_table(root)
    except StageError as e:
        raise StageError(str(e).replace(str(root), shown)) from None
    table = read_metadata_table(meta_path)
    # read_metadata_table numbers its rows from 0; read_table holds the same rows in the same
    # order with the line each starts on, which is what a user opens the file at.
    lines = [int(n) for n in read_table(meta_path, required=HAM_COLUMNS).index]
    if len(lines) != len(table):  # pragma: no cover - the two readers disagree: a bug, not input
        raise StageError(f"{name(meta_path)}: {len(table)} rows but {len(lines)} line numbers")
    if table.empty:
        raise StageError(f"{name(meta_path)}: the metadata table has no rows")
    images = index_images(root)
    if not images:
        raise StageError(f"{shown}: no .jpg images found below this folder")
    good, metas, skipped = check_rows(
        table, lines, images, table_name=name(meta_path), folder=shown, classes=classes
    )
    rows = table.iloc[good][list(META_COLUMNS)].copy()
    rows.index = pd.Index([lines[i] for i in good], name="line")
    unused = len(images) - len(set(images) & set(table["image_id"]))
    if unused:
        log.info("%s: %d image file(s) have no metadata row (no label): not scored", shown, unused)
    log.info(
        "%s: %d metadata rows in %s, %d usable", shown, len(table), Path(meta_path).name, len(rows)
    )  # fmt: skip
    return Labelled(
        table=name(meta_path),
        n_rows=len(table),
        rows=rows,
        paths=[images[i] for i in rows["image_id"]],
        meta=metas,
        skipped=skipped,
    )


def open_folder(folder: Path, stack: ExitStack) -> Path:
    """The folder to read: ``folder`` itself, or a .zip extracted (safely) into a temp folder."""
    if folder.is_dir():
        return folder
    if not folder.exists():
        raise StageError(
            f"{folder}: no such folder (give a labelled folder or .zip in HAM10000 layout: a metadata "
            "table and <image_id>.jpg files)"
        )
    if zipfile.is_zipfile(folder):
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-evaluate-")))
        try:
            safe_extract_zip(folder, staging)
        except StageError as e:
            raise StageError(str(e).replace(str(staging), str(folder))) from None
        return staging
    raise StageError(f"{folder}: neither a folder nor a .zip archive")


# --------------------------------------------------------------------------- scoring


def served_of(preds: Sequence[Prediction], classes: Sequence[str]) -> Served:
    """What the predictor answered, as the report builder takes it (every row ``ok``)."""
    index = {c: i for i, c in enumerate(classes)}
    return Served(
        probs=np.array([[p.probabilities[c] for c in classes] for p in preds], dtype=np.float64),
        modes=np.array([p.mode for p in preds], dtype=object),
        score=np.array([p.malignant_prob for p in preds], dtype=np.float64),
        threshold=np.array([p.threshold for p in preds], dtype=np.float64),
        decisions=np.array([index[p.predicted] for p in preds], dtype=np.int64),
    )


@dataclass(frozen=True)
class ScoredRows:
    """The usable images of a labelled folder as a bundle serves them, every mode on the same images."""

    rows: pd.DataFrame  # META_COLUMNS of the images scored in every mode, in the table's order
    served: dict[str, Served]  # one per mode of the bundle, in its order, row for row with ``rows``
    failed: list[Skipped]  # images that could not be scored in some mode: left out of every mode


def score_labelled(
    predictor: Predictor,
    labelled: Labelled,
    *,
    root: Path,
    shown: str,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
) -> ScoredRows:
    """Score ``labelled`` (read from ``root``, named ``shown`` in messages) in each of the
    bundle's modes through the serving path (:meth:`Predictor.predict_paths`); an image that
    failed in either mode is named, logged and left out of both."""
    classes = list(predictor.classes)
    modes = list(predictor.modes)
    n = len(labelled.rows)
    preds: dict[str, list[Prediction]] = {}
    for mode in modes:
        log.info("scoring %d image(s) in mode %s", n, mode)
        preds[mode] = list(
            predictor.predict_paths(
                _mode_items(labelled, mode),
                batch_size=batch_size,
                workers=pick_workers(workers, n, batch_size),
                progress=progress,
                total=n,
            )
        )
    failed: dict[int, list[str]] = {}
    for mode in modes:
        for i, p in enumerate(preds[mode]):
            if not p.ok and str(p.error) not in failed.get(i, []):
                failed.setdefault(i, []).append(str(p.error))
    failures = []
    for i, why in sorted(failed.items()):
        s = Skipped(str(labelled.rows["image_id"].iloc[i]), str(labelled.paths[i]).replace(
            str(root), shown, 1), "; ".join(why))  # fmt: skip
        log.warning("%s", s.message())
        failures.append(s)
    keep = [i for i in range(n) if i not in failed]
    return ScoredRows(
        rows=labelled.rows.iloc[keep].reset_index(drop=True),
        served={mode: served_of([preds[mode][i] for i in keep], classes) for mode in modes},
        failed=failures,
    )


def report_params(bundle_meta: dict[str, Any], bootstrap: int | None) -> tuple[EvaluateParams, int]:
    """The bundle's own evaluate settings (CI level, age bands, subgroup size) and ECE bins, as its
    calibrate stage used them; ``bootstrap`` replicates instead of the bundle's when given."""
    params = bundle_meta.get("params") or {}
    fields = {f.name for f in dataclasses.fields(EvaluateParams)}
    section = {k: v for k, v in (params.get("evaluate") or {}).items() if k in fields}
    try:
        ev = parse_params({"evaluate": section}).evaluate
    except ParamsError as e:
        log.warning("bundle's evaluate params unusable (%s); using the defaults", e)
        ev = EvaluateParams()
    if bootstrap is not None:
        if bootstrap < 0:
            raise StageError(f"--bootstrap must be >= 0, got {bootstrap}")
        ev = dataclasses.replace(ev, bootstrap_samples=bootstrap)
    bins = (params.get("calibrate") or {}).get("ece_bins", 15)
    return ev, int(bins) if isinstance(bins, int) and not isinstance(bins, bool) and bins >= 2 else 15


def _mode_items(labelled: Labelled, mode: str) -> list[tuple[Any, ...]]:
    ids = labelled.rows["image_id"].tolist()
    if mode == METADATA:
        return [(i, str(p), None, m) for i, p, m in zip(ids, labelled.paths, labelled.meta, strict=True)]
    return [(i, str(p), None) for i, p in zip(ids, labelled.paths, strict=True)]


# --------------------------------------------------------------------------- output


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(m: dict[str, Any], key: str, digits: int = 3) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    ci = f" [{_num(lo, digits)}, {_num(hi, digits)}]" if lo is not None and hi is not None else ""
    return _num(m.get(key), digits) + ci


def format_report(result: dict[str, Any]) -> str:
    """The table printed for a person: a column per mode."""
    b = result["bundle"]
    level = f"{round(100 * result['ci_level'])}% CI"
    lines = [
        f"# {b['trained_on']}",  # first: what the bundle was trained on (Predictor.version)
        f"# serve.evaluate {result['folder']}: {result['n_images']} of {result['n_rows']} labelled "
        f"images scored, {result['n_skipped']} skipped",
        f"# bundle {b['path']} ({b['label']}); modes: {', '.join(b['modes'])}",
    ]
    if b["synthetic"]:
        lines.append(
            "!!! WARNING: this bundle was trained on SYNTHETIC demo data (download.source synthetic); "
            "its numbers say nothing about real skin lesions !!!"
        )
    lines.append(f"# {'modes' if len(b['modes']) > 1 else 'mode'}: {b['mode_rule']}")
    rows: list[tuple[str, list[str]]] = []
    modes = result["modes"]

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(m) for m in modes.values()]))

    add("images / lesions / malignant",
        lambda m: f"{m['n_images']:.0f} / {m['n_lesions']:.0f} / {m['test_n_malignant']:.0f}")  # fmt: skip
    add(f"macro AUC [{level}]", lambda m: _ci(m, "macro_auc"))
    add(f"lesion macro AUC [{level}]", lambda m: _ci(m, "lesion_macro_auc"))
    add("balanced accuracy (decision)", lambda m: _num(m.get("balanced_accuracy_decision")))
    add("malignant threshold", lambda m: _num(m.get("threshold")))
    add(f"malignant recall [{level}]", lambda m: _ci(m, "test_malignant_recall"))
    add(f"specificity [{level}]", lambda m: _ci(m, "test_specificity"))
    add("lesion malignant recall", lambda m: _num(m.get("lesion_test_malignant_recall")))
    add(f"referrals per 100 lesions [{level}]", lambda m: _ci(m, "referrals_per_100", 1))
    add("ECE (calibration error)", lambda m: _num(m.get("ece_after")))
    add("scored with metadata", lambda m: f"{100 * (m.get('share_metadata') or 0.0):.0f}%")
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(name), *(len(v[k]) for _, v in rows)) + 2 for k, name in enumerate(modes)]
    lines.append(" " * width + "".join(name.ljust(c) for name, c in zip(modes, cols, strict=True)).rstrip())
    for label, values in rows:
        lines.append(
            label.ljust(width) + "".join(v.ljust(c) for v, c in zip(values, cols, strict=True)).rstrip()
        )
    lines.append(f"# {DISCLAIMER}")
    return "\n".join(lines)


def write_confusion(path: Path, y: np.ndarray, pred: np.ndarray, classes: Sequence[str], title: str) -> None:
    """The decision's confusion matrix, row-normalised with counts (the pipeline's plot style)."""
    from matplotlib.figure import Figure

    k = len(classes)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i].sum():
                ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted (the bundle's decision)")
    ax.set_ylabel("actual")
    ax.set_title(f"{title} confusion (row-normalised, counts)".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


# --------------------------------------------------------------------------- the command


def run(
    folder: Path,
    *,
    bundle: Path,
    out: Path | None = None,
    plots: Path | None = None,
    bootstrap: int | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    seed: int = DEFAULT_SEED,
    stdout: IO[str] | None = None,
) -> dict[str, Any]:
    """Score every labelled image of ``folder`` with ``bundle`` in each of its modes and measure it.

    Returns what ``--out`` holds: ``{bundle, folder, metadata_table, n_rows, n_images, n_skipped,
    skipped, ci_level, modes: {mode: metrics}}``; each mode's metrics are :func:`served_report`'s
    (the calibrate stage's test keys, unsuffixed) plus the mode's ``threshold``.
    """
    if batch_size < 1:
        raise StageError(f"--batch-size must be >= 1, got {batch_size}")
    # The outputs first: a bad --out or --plots is one line before the folder is read and the
    # bundle loads, never a traceback after every image was scored.
    if out is not None:
        check_output_file("--out", Path(out), (".json",))
    if plots is not None:
        check_output_folder("--plots", Path(plots))
    folder = Path(folder)
    stdout = stdout or sys.stdout
    with ExitStack() as stack:
        root = open_folder(folder, stack)
        labelled = read_labelled(root, shown=str(folder))
        for s in labelled.skipped:
            log.warning("%s", s.message())
        if labelled.rows.empty:
            raise StageError(
                f"{folder}: no usable labelled image: all {labelled.n_rows} metadata row(s) skipped, "
                f"e.g. {labelled.skipped[0].what()}"
            )
        predictor = Predictor.load(bundle)
        classes = list(predictor.classes)
        if sorted(classes) != sorted(CLASSES):
            raise StageError(f"{bundle}: the bundle's classes {classes} are not HAM10000's {list(CLASSES)}")
        modes = list(predictor.modes)
        params, ece_bins = report_params(predictor.bundle.meta, bootstrap)
        scored = score_labelled(
            predictor, labelled, root=root, shown=str(folder), batch_size=batch_size, workers=workers,
            progress=progress,
        )  # fmt: skip
    skipped = [*labelled.skipped, *scored.failed]
    if scored.rows.empty:
        raise StageError(f"{folder}: no usable labelled image: every image failed, e.g. {skipped[-1].what()}")
    rows = scored.rows

    per_mode: dict[str, dict[str, Any]] = {}
    for mode in modes:
        served = scored.served[mode]
        metrics, table = served_report(
            rows, served, params, np.random.default_rng(seed), ece_bins=ece_bins, classes=classes,
            desc=f"bootstrap ({mode})", progress=progress,
        )  # fmt: skip
        metrics["threshold"] = json_value(predictor.thresholds[mode])
        per_mode[mode] = metrics
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            title = f"{folder.name} {mode}"
            write_confusion(plots / f"confusion_{mode}.png", labels(rows, classes), served.decisions,
                            classes, title)  # fmt: skip
            with atomic_file(plots / f"subgroups_{mode}.csv", "w", encoding="utf-8", newline="") as fh:
                table.to_csv(fh, index=False, float_format="%.4f", lineterminator="\n")
    result: dict[str, Any] = {
        "bundle": {
            "path": str(bundle),
            **predictor.version,
            "modes": modes,
            "thresholds": {m: json_value(t) for m, t in predictor.thresholds.items()},
            "mode_rule": MODE_RULE if len(modes) > 1 else SINGLE_MODE_NOTE,
            "disclaimer": DISCLAIMER,
        },
        "folder": str(folder),
        "metadata_table": labelled.table,
        "n_rows": labelled.n_rows,
        "n_images": len(rows),
        "n_skipped": len(skipped),
        "skipped": [s.as_json() for s in skipped],
        "ci_level": params.ci_level,
        "bootstrap_samples": params.bootstrap_samples,
        "seed": seed,
        "modes": per_mode,
    }
    print(format_report(result), file=stdout)
    if out is not None:
        with atomic_file(out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, allow_nan=False)  # modes in the bundle's order
            fh.write("\n")
        log.info("metrics in %s", out)
    if skipped:
        log.warning(
            "%d labelled row(s) skipped (named above); the other %d were scored", len(skipped), len(rows)
        )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m serve.evaluate",
        description=(
            "How does this model do on OUR images? Scores every labelled image of FOLDER (HAM10000 "
            "layout: a metadata table with lesion_id, image_id, dx, age, sex, localization and "
            "<image_id>.jpg files below it, as download.source=local:PATH reads; a .zip of one too) "
            "with the model bundle, exactly as serve.predict and the web app score images, and "
            "reports what the calibrate stage reports for its test split: macro AUC per image and "
            "per lesion with lesion-bootstrap CIs, balanced accuracy of the bundle's decision, "
            "malignant recall and specificity at the bundle's thresholds, referrals per 100 lesions "
            "and calibration error; for a bundle that uses metadata, both with it and image-only. "
            "Rows that cannot be used are named and left out (exit code 1)."
        ),
        epilog=DISCLAIMER,
    )
    ap.add_argument("folder", type=Path, metavar="FOLDER", help="labelled folder or .zip in HAM10000 layout")
    ap.add_argument(
        "--bundle", type=Path, help="model bundle (default: models/production, else models/ensemble)"
    )
    ap.add_argument(
        "--out", type=Path,
        help="write the metrics and the skipped rows to FILE.json (an existing file is replaced when "
        "the run completes)",
    )  # fmt: skip
    ap.add_argument(
        "--plots", type=Path, metavar="DIR",
        help="write confusion_<mode>.png (the decision, row-normalised) and subgroups_<mode>.csv into DIR",
    )  # fmt: skip
    ap.add_argument(
        "--bootstrap", type=int, metavar="N",
        help="lesion-bootstrap replicates for the CIs (default: the bundle's evaluate.bootstrap_samples; "
        "0: no CIs)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap (default 0)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    ap.add_argument("--workers", type=int, default=0, help="decode processes (default 0: all cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

    def body() -> int:
        result = run(
            args.folder,
            bundle=args.bundle or default_bundle(Path.cwd()),
            out=args.out,
            plots=args.plots,
            bootstrap=args.bootstrap,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
            seed=args.seed,
        )
        return 1 if result["n_skipped"] else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
