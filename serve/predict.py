"""Predict skin-lesion images with the model bundle: one row per image, errors included.

    python -m serve.predict IMAGE_OR_FOLDER_OR_CSV... [--bundle DIR] [--out FILE.csv|.json]
                            [--explain DIR] [--batch-size N] [--workers N] [--risk SPEC]

PATH may be image files, folders (searched recursively for .jpg, .jpeg, .png, .bmp, .tif,
.tiff, .webp) or CSV files with a ``path`` column (relative paths are relative to the CSV's own
folder) and optional ``age``, ``sex`` and ``localization`` columns in HAM10000's vocabulary
(empty = unknown). A bundle whose members use metadata scores an image with its metadata only
when all three are known, with the operating point calibrated for that; any other image is
scored image-only, with the image-only operating point (each row says which: ``mode``).
The bundle (default ``models/production`` once a model was promoted, else
``models/ensemble``) is loaded once; images stream through it in batches. A file that cannot be
used (missing, truncated, not an image, over the pixel limit) gets an error row naming it and
the others are still predicted; the exit code is then 1.

The outputs are checked before anything is loaded: ``--out`` must name a .csv or .json file
(an existing file is replaced, atomically, once every row is written; a folder there is an
error) and ``--explain`` a folder (an existing one is added to; a file there is an error); a
missing folder is created, and one that cannot be written or created is an error.

The first line printed says what the bundle was trained on (``trained on synthetic demo data
(not real dermoscopy) — do not use on real images``, or the real source and its data version).
Each row: the risk level, ``refer`` (the malignant probability at or above the mode's threshold),
the malignant probability, ``decision=`` the bundle's class decision (``predicted`` in the files),
the top-3 classes by calibrated probability (``top1``...), the mode. With the balanced decision,
``predicted`` can differ from ``top1`` by design (:data:`serve.predictor.DECISION_NOTES`); the
risk level is read on the side of the referral, so it never says Low beside refer.

Not a diagnosis: the probabilities come from a research model, and a clinician decides.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from serve.predictor import (
    DECISION_NOTES,
    DEFAULT_RISK,
    DISCLAIMER,
    RISK_NOTE,
    TOP_NOTE,
    Item,
    Prediction,
    Predictor,
    RiskLevels,
    default_bundle,
    pick_workers,
)
from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.images import IMAGE_SUFFIXES, list_images
from skinlesion.core.outputs import atomic_file
from skinlesion.measure.scoring import META_FIELDS, MODE_RULE, parse_metadata

log = logging.getLogger(__name__)

PATH_COLUMN = "path"
OUT_SUFFIXES = (".csv", ".json")


def collect(args: Sequence[str], *, column: str = PATH_COLUMN) -> list[Item]:
    """``(name, path, known error[, metadata])`` for every image named by ``args``, in order."""
    items: list[Item] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = list_images(p)
            if not found:
                items.append((arg, arg, f"no image files ({' '.join(IMAGE_SUFFIXES)}) in this folder"))
            items += [(str(f), str(f), None) for f in found]
        elif p.suffix.lower() == ".csv" and p.is_file():
            items += _from_csv(p, column)
        else:
            items.append((arg, arg, None))  # a missing path gets its "file not found" row when decoded
    return items


def _from_csv(path: Path, column: str) -> list[Item]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            reader.fieldnames = fields
            if column not in fields:
                return [(str(path), str(path), f"no {column!r} column (columns: {fields})")]
            given = [f for f in META_FIELDS if f in fields]
            out: list[Item] = []
            for line, row in enumerate(reader, start=2):
                value = (row.get(column) or "").strip()
                if not value:
                    out.append((f"{path}:{line}", str(path), f"line {line}: empty {column!r}"))
                    continue
                target = Path(value) if Path(value).is_absolute() else path.parent / value
                if not given:
                    out.append((value, str(target), None))
                    continue
                try:
                    meta = parse_metadata(*(row.get(f) for f in META_FIELDS))
                except StageError as e:  # this row only: the others are still predicted
                    out.append((value, str(target), f"{path} line {line}: {e}"))
                    continue
                out.append((value, str(target), None, meta))
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [(str(path), str(path), f"unreadable CSV ({e})")]


# --------------------------------------------------------------------------- output


def check_output_file(option: str, path: Path, suffixes: Sequence[str]) -> str:
    """The kind of an output file (its suffix, without the dot), checked before any work starts.

    Refused with one line naming ``option`` and ``path``: a folder there, a suffix not in
    ``suffixes``, or a folder to write into that cannot be (a file on the way, no write
    permission). A missing folder is created when the file is written. An existing file is
    replaced, atomically and only once the output is complete (what ``-o`` does in most tools;
    the previous file stays intact if the run fails).
    """
    where = f"{option} {path}"
    with _os_errors(where):
        if path.is_dir():
            raise StageError(f"{where}: is a folder; give a file name (e.g. {path / 'NAME'}{suffixes[0]})")
        if path.suffix.lower() not in suffixes:
            raise StageError(f"{where}: use a {' or '.join(suffixes)} file name")
        if os.path.lexists(path) and not (path.is_file() or path.is_symlink()):
            raise StageError(f"{where}: not a regular file (a device, pipe or socket?)")
        _check_writable_folder(where, path.parent)
    return path.suffix.lower().lstrip(".")


def check_output_folder(option: str, path: Path) -> None:
    """A folder outputs are written into, checked before any work starts: an existing folder is
    fine (files are added to it), a missing one is created; a file there, or a folder that cannot
    be written or created, is one line naming ``option``."""
    where = f"{option} {path}"
    with _os_errors(where):
        if os.path.lexists(path) and not path.is_dir():
            raise StageError(f"{where}: a file is there; give a folder (a new or an existing one)")
        _check_writable_folder(where, path)


def _check_writable_folder(where: str, folder: Path) -> None:
    """``folder`` can be written into, or created in its nearest existing parent."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise StageError(f"{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StageError(f"{where}: folder {existing} is not writable")


@contextmanager
def _os_errors(where: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:  # e.g. a parent folder that may not be searched
        raise StageError(f"{where}: {e.strerror or e}") from None


def format_line(pred: Prediction, version_label: str) -> str:
    """The row printed for one image (rounded for reading; the files keep every digit)."""
    if not pred.ok:
        return f"{pred.image}\tERROR\t{pred.error}"
    top = ", ".join(f"{c} {p:.3f}" for c, p in pred.top)
    refer = "REFER" if pred.refer else "no"
    malignant = f"malignant={pred.malignant_prob:.3f}/{pred.threshold:.3f}"
    decision = f"decision={pred.predicted}"
    return "\t".join(
        [pred.image, pred.risk, f"refer={refer}", malignant, decision, top, pred.mode, version_label]
    )


class _Writer:
    """Rows to CSV or JSON as they come (the file is renamed into place when complete)."""

    def __init__(self, fh: IO[str], kind: str, header: dict[str, Any]):
        self.fh, self.kind, self.n = fh, kind, 0
        self.csv: csv.DictWriter | None = None
        if kind == "json":
            fh.write('{"bundle": ' + json.dumps(header, sort_keys=True) + ',\n "predictions": [\n')

    def write(self, row: dict[str, Any]) -> None:
        if self.kind == "csv":
            if self.csv is None:
                self.csv = csv.DictWriter(self.fh, fieldnames=list(row), lineterminator="\n")
                self.csv.writeheader()
            self.csv.writerow({k: _csv_value(v) for k, v in row.items()})
        else:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
            }
            self.fh.write(("  " if self.n == 0 else ",\n  ") + json.dumps(clean, allow_nan=False))
        self.n += 1

    def close(self) -> None:
        if self.kind == "json":
            self.fh.write("\n ]}\n")


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # every digit: the 7 probabilities of a row sum to 1 within 1e-15
    return v


def _unique_png(folder: Path, image: str, used: set[str]) -> Path:
    stem = Path(image).stem or "image"
    name, k = f"{stem}.gradcam.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}.gradcam.png"
    used.add(name)
    return folder / name


def run(
    paths: Sequence[str],
    *,
    bundle: Path,
    out: Path | None = None,
    explain: Path | None = None,
    batch_size: int = 32,
    workers: int = 0,
    risk: str = DEFAULT_RISK,
    column: str = PATH_COLUMN,
    progress: bool = True,
    stdout: IO[str] | None = None,
) -> tuple[int, int]:
    """Predict every image named by ``paths``; print a row each; returns ``(n_ok, n_failed)``."""
    from tqdm import tqdm

    if batch_size < 1:
        raise StageError(f"--batch-size must be >= 1, got {batch_size}")
    # The outputs first: a bad --out or --explain is one line before the bundle loads, never
    # a traceback after every image was predicted.
    kind = check_output_file("--out", Path(out), OUT_SUFFIXES) if out is not None else None
    if explain is not None:
        check_output_folder("--explain", Path(explain))
    items = collect(paths, column=column)
    if not items:
        raise StageError("no input: give image files, folders or CSV files")
    stdout = stdout or sys.stdout
    predictor = Predictor.load(bundle)
    predictor.risk = RiskLevels.parse(risk, predictor.classes)
    version = predictor.version
    thresholds = predictor.thresholds
    header = {
        "path": str(bundle),
        **version,
        "columns": predictor.notes,
        "modes": list(predictor.modes),
        "mode_rule": MODE_RULE
        if len(predictor.modes) > 1
        else "image_only: this bundle does not use metadata",
        "thresholds": thresholds,
        "classes": predictor.classes,
        "disclaimer": DISCLAIMER,
    }
    refer = ", ".join(f"{t:.3f} ({m})" for m, t in thresholds.items())
    # First, before any number: what the bundle was trained on (a demo bundle says so).
    print(f"# {version['trained_on']}", file=stdout)
    print(
        f"# bundle {bundle} ({version['label']}); refer when malignant >= {refer}. " + DISCLAIMER, file=stdout
    )
    if len(predictor.modes) > 1:
        print(f"# modes: {MODE_RULE}", file=stdout)
    else:
        print("# mode: image_only (this bundle's members do not use metadata; age/sex/site are ignored)",
              file=stdout)  # fmt: skip
    notes = predictor.notes
    print(f"# risk = {notes['risk']}; decision = {notes['predicted']}", file=stdout)
    print("# image\trisk\trefer\tmalignant/threshold\tdecision\ttop-3\tmode\tbundle", file=stdout)
    if explain is not None:
        explain.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    n_ok = n_bad = 0
    with ExitStack() as stack:
        writer = None
        if out is not None and kind is not None:
            writer = _Writer(stack.enter_context(atomic_file(out, "w", encoding="utf-8")), kind, header)
        stream = predictor.predict_paths(
            items,
            batch_size=batch_size,
            workers=pick_workers(workers, len(items), batch_size),
            explain=explain is not None,
            progress=progress,
            total=len(items),
        )
        for pred in stream:
            if pred.ok:
                n_ok += 1
                if explain is not None and pred.overlay is not None:
                    from serve.gradcam import png_bytes

                    target = _unique_png(explain, pred.image, used)
                    target.write_bytes(png_bytes(pred.overlay))
                    pred.gradcam_path = str(target)
                    pred.overlay = None
            else:
                n_bad += 1
            tqdm.write(format_line(pred, version["label"]), file=stdout)
            if writer is not None:
                writer.write(pred.as_row(predictor.classes, version))
        if writer is not None:
            writer.close()
    log.info("%d image(s) predicted, %d failed%s", n_ok, n_bad, f"; rows in {out}" if out else "")
    return n_ok, n_bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m serve.predict",
        description=__doc__.split("\n\n")[0],
        epilog=f"Columns: risk = {RISK_NOTE}. decision (predicted in --out files) = "
        f"{DECISION_NOTES['balanced']}. top-3 (top1..top3) = {TOP_NOTE}. {DISCLAIMER}",
    )
    ap.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="image files, folders, or CSV files with a path column and optional age, sex, localization "
        "columns (HAM10000 vocabulary; empty = unknown)",
    )  # fmt: skip
    ap.add_argument(
        "--bundle", type=Path, help="model bundle (default: models/production, else models/ensemble)"
    )
    ap.add_argument(
        "--out", type=Path,
        help="also write every row, unrounded, to FILE.csv or FILE.json (an existing file is replaced "
        "when the run completes)",
    )  # fmt: skip
    ap.add_argument(
        "--explain", type=Path, metavar="DIR",
        help="write a Grad-CAM overlay PNG per image into DIR (created if missing; never a file)",
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    ap.add_argument("--workers", type=int, default=0, help="decode processes (default 0: all cores)")
    ap.add_argument(
        "--risk",
        default=DEFAULT_RISK,
        help=f"risk level per top class, * for the others (default {DEFAULT_RISK!r})",
    )
    ap.add_argument("--path-column", default=PATH_COLUMN, help="column of a CSV input that holds the paths")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

    def body() -> int:
        bundle = args.bundle or default_bundle(Path.cwd())
        _ok, bad = run(
            args.paths,
            bundle=bundle,
            out=args.out,
            explain=args.explain,
            batch_size=args.batch_size,
            workers=args.workers,
            risk=args.risk,
            column=args.path_column,
            progress=not args.no_progress,
        )
        return 1 if bad else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
