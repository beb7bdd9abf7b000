"""Paired comparison of two runs: ``python -m tools.compare A [B]`` (``make compare A=.. B=..``).

A run is a git revision (``HEAD~1``, a tag, a sha), a DVC experiment name (``dvc exp run -n NAME``,
``dvc exp list``) or ``workspace`` (B's default). Each run's files are read as it holds them: git
files from git, DVC outputs from the DVC cache (``dvc.api.DVCFileSystem``), the workspace from disk.

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
(the bundle's ``seen.json``; for an older bundle, A's split train + val rows).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

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
    headline,
    pair,
    paired_bootstrap,
    served_statistics,
)
from skinlesion.measure.scoring import IMAGE_ONLY, IMAGE_ONLY_SUFFIX, METADATA

log = logging.getLogger(__name__)

WORKSPACE = "workspace"
ECE_KEY = HEADLINE_KEYS[-1]  # ece_after: shown unpaired
DEFAULT_SAMPLES = 1000  # when B's params ask for no bootstrap (evaluate.bootstrap_samples: 0)
COMPARE_FORMAT_VERSION = 1
MAX_PARAMS_SHOWN = 12
# How a file missing from a run is made: shown after the run and the path.
HOW = {
    "served": "run `dvc repro calibrate`",
    "bundle": "run `dvc repro calibrate`",
    "raw": "run `dvc repro download`",
    "split": "run `dvc repro validate`",
}


@dataclass(frozen=True)
class Layout:
    """Where a run keeps what a comparison reads (as dvc.yaml names them)."""

    served: str = "data/served"
    headline: str = "metrics/headline.json"
    calibration: str = "metrics/calibration.json"
    split: str = "data/validated/split.csv"
    bundle: str = "models/ensemble"
    raw: str = "data/raw"
    noise: str = "metrics/noise.json"
    params: str = "params.yaml"
    lock: str = "dvc.lock"


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
    fa, fb = _flatten(a), _flatten(b)
    missing = object()
    out = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def lock_out_md5(lock: Mapping[str, Any] | None, path: str) -> str | None:
    """The md5 that ``dvc.lock`` records for the output ``path`` (None when it records none)."""
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, Mapping) and out.get("path") == path:
                return out.get("md5")
    return None


def lock_tracks(lock: Mapping[str, Any] | None, path: str) -> str | None:
    """The DVC output of ``dvc.lock`` that holds ``path`` (itself or a folder above it), if any."""
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            p = out.get("path") if isinstance(out, Mapping) else None
            if p and (path == p or path.startswith(p.rstrip("/") + "/")):
                return str(p)
    return None


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


# --------------------------------------------------------------------------- reading a run


@dataclass(frozen=True)
class Run:
    """A run to compare: ``name`` as the user gave it, ``sha`` its commit (None: the workspace)."""

    name: str
    sha: str | None
    experiment: bool = False

    @property
    def label(self) -> str:
        if self.sha is None:
            return WORKSPACE
        kind = "experiment " if self.experiment else ""
        return f"{self.name} ({kind}{self.sha[:7]})"


def resolve(root: Path, name: str) -> Run:
    """A git revision or a DVC experiment name, resolved to its commit as DVC resolves it
    (``dvc exp diff`` and ``dvc.api`` take the same names), or ``workspace``."""
    if name == WORKSPACE:
        return Run(name, None)
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import resolve_rev

    try:
        with Repo(str(root)) as repo:
            sha = resolve_rev(repo.scm, name)
            try:
                is_exp = repo.scm.resolve_rev(name) != sha
            except Exception:  # noqa: BLE001 - git alone does not know the name: an experiment
                is_exp = True
    except DvcException as e:
        raise StageError(
            f"{name}: not a git revision or a DVC experiment name in {root} ({e}); see git log, "
            "dvc exp list, or use 'workspace'"
        ) from None
    return Run(name, sha, is_exp)


class RunFiles:
    """One run's files on disk: the workspace's own, or a revision's copied from git and the DVC
    cache into ``scratch``. A missing file is one error naming the run, the path and the fix."""

    def __init__(self, root: Path, run: Run, scratch: Path, lock: str = "dvc.lock") -> None:
        self.root, self.run, self.scratch, self.lock_rel = root, run, scratch, lock
        self._fs: Any = None
        self._lock: dict[str, Any] | None = None
        self._lock_read = False

    def fs(self) -> Any:
        """The revision's files as DVC sees them (git files and DVC outputs from the cache)."""
        if self._fs is None:
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(str(self.root), rev=self.run.sha)
        return self._fs

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fs is not None:
            self._fs.close()

    def shown(self, rel: str) -> str:
        return rel if self.run.sha is None else f"{self.run.name}:{rel}"

    def lock(self) -> dict[str, Any] | None:
        """The run's ``dvc.lock``, parsed (None when it has none)."""
        if not self._lock_read:
            self._lock_read = True
            path = self.get(self.lock_rel, required=False)
            self._lock = _read_yaml(path, self.shown(self.lock_rel)) if path else None
        return self._lock

    def get(self, rel: str, *, required: bool = True, how: str = "make it") -> Path | None:
        """``rel`` (a file or a folder) on disk, or None when the run has none and not ``required``."""
        if self.run.sha is None:
            path = self.root / rel
            if path.exists():
                return path
            if required:
                raise StageError(f"workspace: no {rel}: {how} (or dvc pull)")
            return None
        dest = self.scratch / rel
        if dest.exists():
            return dest
        fs = self.fs()
        error = None
        try:
            if fs.exists(rel):
                dest.parent.mkdir(parents=True, exist_ok=True)
                if fs.isdir(rel):
                    fs.get(rel, str(dest), recursive=True)
                else:
                    fs.get_file(rel, str(dest))
                return dest
        except Exception as e:  # noqa: BLE001 - DVC's cache errors have no common base worth naming
            error = e
        # An output its dvc.lock records was made there: its data is missing from the cache. One
        # that dvc.yaml declares but no lock records (or a file git never held) was never made.
        if rel != self.lock_rel and lock_tracks(self.lock(), rel):
            why = f" ({error})" if error is not None else ""
            raise StageError(
                f"{self.run.label}: {rel}: made at that revision but its data is not in the DVC cache{why}; "
                f"{self.fetch_hint(rel)}"
            )
        if required:
            raise StageError(
                f"{self.run.label}: no {rel} at that revision: {how} there (git checkout {self.run.name}), "
                "or compare with the workspace"
            )
        return None

    def fetch_hint(self, rel: str) -> str:
        if self.run.experiment:
            return (
                f"get it with `dvc exp pull <remote> {self.run.name}` (or `dvc pull` after `dvc exp apply`)"
            )
        return f"get it with `dvc fetch -A {rel}`, or `git checkout {self.run.name} && dvc pull`"


@dataclass
class RunData:
    """What a comparison reads of one run."""

    run: Run
    frames: dict[str, pd.DataFrame]  # by headline suffix: "" (test.csv), "_image_only"
    modes: dict[str, str]  # the input mode of each frame
    headline: dict[str, Any] | None  # metrics/headline.json, else the calibration metrics' subset
    params: dict[str, Any]
    data_md5: str | None
    files: RunFiles = field(repr=False)


def served_files(served_dir: Path) -> dict[str, Path]:
    """The served prediction files of a run by headline suffix: ``test.csv`` (the first mode)
    and ``test_image_only.csv`` beside it for a bundle that fuses metadata."""
    out = {"": served_dir / "test.csv"}
    other = served_dir / f"test{IMAGE_ONLY_SUFFIX}.csv"
    if other.is_file():
        out[IMAGE_ONLY_SUFFIX] = other
    return out


def read_served(path: Path, shown: str) -> pd.DataFrame:
    """A served predictions file, checked (its errors name ``shown``)."""
    from skinlesion.measure.predictions import read_predictions

    if not path.is_file():
        raise StageError(f"{shown}: not found; {HOW['served']}")
    try:
        df = read_predictions(path, producer="calibrate")
    except StageError as e:
        raise StageError(str(e).replace(str(path), shown)) from None
    missing = [c for c in ("refer", "predicted") if c not in df.columns]
    if missing:
        raise StageError(f"{shown}: no column(s) {missing}: written by an older calibrate; {HOW['served']}")
    return df


def load_run(files: RunFiles, layout: Layout) -> RunData:
    """A run's served frames, headline, params and data version."""
    served_dir = files.get(layout.served, how=HOW["served"])
    assert served_dir is not None
    paths = served_files(served_dir)
    frames = {sfx: read_served(p, files.shown(f"{layout.served}/{p.name}")) for sfx, p in paths.items()}
    modes = {"": METADATA if IMAGE_ONLY_SUFFIX in frames else IMAGE_ONLY}
    if IMAGE_ONLY_SUFFIX in frames:
        modes[IMAGE_ONLY_SUFFIX] = IMAGE_ONLY
    head = None
    path = files.get(layout.headline, required=False)
    if path is not None:
        head = _read_json(path, files.shown(layout.headline))
    else:
        path = files.get(layout.calibration, required=False)
        if path is not None:
            head = headline(_read_json(path, files.shown(layout.calibration)), tuple(frames))
    params_path = files.get(layout.params, required=False)
    params = _read_yaml(params_path, files.shown(layout.params)) if params_path else {}
    data = RunData(
        run=files.run,
        frames=frames,
        modes=modes,
        headline=head,
        params=params or {},
        data_md5=lock_out_md5(files.lock(), layout.raw),
        files=files,
    )
    check_in_step(data, layout)
    return data


def check_in_step(data: RunData, layout: Layout) -> None:
    """Warn when a run's served file does not give the metrics its headline reports (outputs
    out of step, e.g. a workspace where calibrate's outputs were edited or partly restored)."""
    if not data.headline:
        return
    for sfx, frame in data.frames.items():
        stats = served_statistics(frame)
        for key in ("macro_auc", "test_malignant_recall"):
            reported = data.headline.get(key + sfx)
            if reported is not None and abs(stats[key] - float(reported)) > 1e-6:
                log.warning(
                    "%s: %s/test%s.csv gives %s %.6f, its headline %.6f: the outputs are out of step "
                    "(dvc status; dvc repro calibrate)",
                    data.run.label, layout.served, sfx, key, stats[key], float(reported),
                )  # fmt: skip
                return


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StageError(f"{shown}: not YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_json(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise StageError(f"{shown}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise StageError(f"{shown}: expected a JSON object")
    return data


def read_bands(runs: Sequence[RunData], layout: Layout) -> tuple[dict[str, float], str | None]:
    """The headline noise bands of the first run that has a noise file (B, then A), else the
    workspace's."""
    from tools.noise import NoiseFileError, noise_bands

    for data in runs:
        path = data.files.get(layout.noise, required=False)
        if path is None:
            continue
        shown = data.files.shown(layout.noise)
        try:
            return noise_bands(path), shown
        except NoiseFileError as e:
            raise StageError(str(e).replace(str(path), shown)) from None
    # Runs made before the noise file (e.g. make noise's own experiments): the band committed
    # now, said as such.
    here = runs[0].files.root / layout.noise if runs else None
    if here is not None and here.is_file():
        try:
            return noise_bands(here), f"{layout.noise} of the workspace (neither run has one)"
        except NoiseFileError as e:
            raise StageError(str(e)) from None
    return {}, None


# --------------------------------------------------------------------------- rescoring A on B's split


@dataclass(frozen=True)
class Rescore:
    frames: dict[str, pd.DataFrame]  # A's bundle on B's unseen test images, by headline suffix
    modes: dict[str, str]
    n_test: int  # B's test images
    n_left_out: int  # of them, images whose lesion or image A has seen
    n_left_out_lesions: int
    n_failed: int  # unseen images that could not be scored (named in the log)
    seen_source: str

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("frames", "modes")}


def seen_of_a(a: RunData, bundle_dir: Path, layout: Layout) -> tuple[Any, str]:
    """What A's bundle has seen (:class:`skinlesion.model.bundle.Seen`) and where that was read: its
    seen.json, else, for a bundle older than the file, A's split's train + val rows."""
    from skinlesion.core.tables import read_table
    from skinlesion.model.bundle import SEEN_FILE, SEEN_SPLITS, Seen, read_seen

    seen = read_seen(bundle_dir)
    if seen is not None:
        return seen, a.files.shown(f"{layout.bundle}/{SEEN_FILE}")
    path = a.files.get(layout.split, how=HOW["split"])
    assert path is not None
    shown = a.files.shown(layout.split)
    try:
        split = read_table(path, required=("image_id", "lesion_id", "split"))
    except StageError as e:
        raise StageError(str(e).replace(str(path), shown)) from None
    rows = split[split["split"].isin(SEEN_SPLITS)]
    source = f"{shown}, {' + '.join(SEEN_SPLITS)} rows: the bundle has no {SEEN_FILE}"
    log.info("what A has seen: %s", source)
    return Seen(frozenset(rows["lesion_id"].astype(str)), frozenset(rows["image_id"].astype(str))), source


def rescore(
    a: RunData, b: RunData, layout: Layout, *, scratch: Path, batch_size: int, workers: int, progress: bool
) -> Rescore:
    """Score A's bundle on B's test split (B's image files and metadata rows) through the serving
    path, leaving out the images A has seen."""
    from serve.evaluate import read_labelled, score_labelled
    from serve.predictor import Predictor
    from skinlesion.measure.scoring import mode_suffix
    from stages.download import read_metadata_table, write_metadata_csv

    bundle_dir = a.files.get(layout.bundle, how=HOW["bundle"])
    assert bundle_dir is not None
    seen, source = seen_of_a(a, bundle_dir, layout)
    test = b.frames[""]
    keep = seen.unseen_rows(test)
    ids = test.loc[keep, "image_id"].astype(str).tolist()
    left = test.loc[~keep]
    log.info(
        "B's test split: %d images; %d of them (%d lesions) left out: A trained, tuned or calibrated on "
        "their lesion or image (%s)", len(test), len(left), left["lesion_id"].nunique(), source,
    )  # fmt: skip
    if not ids:
        raise StageError(
            f"every one of {b.run.label}'s {len(test)} test images is a lesion or image {a.run.label} has "
            f"seen ({source}): nothing left to compare on"
        )
    # B's test images as a labelled folder in HAM10000 layout: B's own metadata rows and files.
    folder = scratch / "rescore"
    (folder / "images").mkdir(parents=True)
    meta_path = b.files.get(f"{layout.raw}/metadata.csv", how=HOW["raw"])
    assert meta_path is not None
    meta = read_metadata_table(meta_path)
    rows = meta[meta["image_id"].isin(set(ids))]
    if len(set(rows["image_id"])) < len(ids):
        missing = sorted(set(ids) - set(rows["image_id"]))
        log.warning("%d of B's test images have no row in %s (e.g. %s): not scored", len(missing),
                    b.files.shown(f"{layout.raw}/metadata.csv"), missing[0])  # fmt: skip
    write_metadata_csv(rows, folder / "metadata.csv")
    _gather_images(b, layout, ids, folder / "images", progress=progress)
    shown = b.files.shown(layout.raw)
    labelled = read_labelled(folder, shown=shown)
    for s in labelled.skipped:
        log.warning("%s", s.message())
    predictor = Predictor.load(bundle_dir)
    classes = list(predictor.classes)
    if sorted(classes) != sorted(CLASSES):
        raise StageError(
            f"{a.files.shown(layout.bundle)}: classes {classes} are not HAM10000's {list(CLASSES)}"
        )
    scored = score_labelled(
        predictor,
        labelled,
        root=folder,
        shown=shown,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    if scored.rows.empty:
        raise StageError(f"{shown}: none of B's {len(ids)} unseen test images could be scored (named above)")
    modes = list(predictor.modes)
    frames, mode_of = {}, {}
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        frames[sfx] = scored.served[mode].frame(scored.rows, classes)
        mode_of[sfx] = mode
    return Rescore(
        frames=frames,
        modes=mode_of,
        n_test=len(test),
        n_left_out=len(left),
        n_left_out_lesions=int(left["lesion_id"].nunique()),
        n_failed=len(ids) - len(scored.rows),
        seen_source=source,
    )


def _gather_images(b: RunData, layout: Layout, ids: Sequence[str], dest: Path, *, progress: bool) -> None:
    """B's image files of ``ids`` into ``dest`` (links to the workspace's, copies of a revision's)."""
    from tqdm import tqdm

    images = f"{layout.raw}/images"
    if b.run.sha is None:
        for image_id in ids:
            src = b.files.root / images / f"{image_id}.jpg"
            if src.is_file():
                (dest / src.name).symlink_to(src.resolve())
        return
    fs = b.files.fs()
    for image_id in tqdm(ids, desc=f"images of {b.run.name}", unit="img", disable=not progress):
        rel = f"{images}/{image_id}.jpg"
        try:
            fs.get_file(rel, str(dest / f"{image_id}.jpg"))
        except FileNotFoundError:
            continue  # read_labelled names it: no image file
        except Exception as e:  # noqa: BLE001
            raise StageError(
                f"{b.run.label}: {rel}: cannot read it ({e}); {b.files.fetch_hint(layout.raw)}"
            ) from None


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
    layout: Layout = Layout(),
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
