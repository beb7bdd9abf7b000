"""The promotion gate and the promotion itself. No Prefect here; :mod:`flows.retrain` calls it.

A candidate bundle (``models/ensemble``) replaces production (``models/production``) only if

* its ``test_malignant_recall`` reaches ``calibrate.target_recall`` in every input mode it has
  (a bundle fusing metadata has two: ``test_malignant_recall``, each test image with its own
  metadata, and ``test_malignant_recall_image_only``, every image without; a bundle without
  fusion has the first only), and
* the candidate's macro AUC is not worse than production's by more than ``promote.max_auc_drop``
  on the same images: both bundles' answers for the candidate's test split, less every image
  whose lesion or image production trained, tuned or calibrated on (``seen.json``), compared
  lesion by lesion (:mod:`skinlesion.measure.paired`); the lower bound of the paired 95% CI of the
  difference (candidate - production) must be at least ``-promote.max_auc_drop`` in every kind of
  request (a negative tolerance demands an improvement). With no production model yet the AUCs
  are not compared. A production bundle the comparison cannot use (no ``seen.json``: older than
  it; unloadable; nothing left to pair) falls back to the unpaired check, each bundle's stored
  ``malignant_auc`` and ``macro_auc``, mode by mode, and the decision says so.

Promotion copies the bundle atomically (temp folder, one rename) with a ``production.json``
record, tracks it with ``dvc add``, and in a git repository commits the pipeline record and tags
it ``model-<UTC time>``. A rejected candidate touches nothing.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.dvcops import DvcError, Layout, dvc_argv, run_quiet
from flows.report import mode_label
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, failpoint
from skinlesion.core.schema import CLASSES
from skinlesion.measure.paired import PairedDiff, pair, paired_bootstrap
from skinlesion.measure.predictions import META_COLUMNS, read_predictions
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    IMAGE_ONLY_SUFFIX,
    METADATA,
    MODES,
    mode_suffix,
    parse_metadata,
)
from skinlesion.model.bundle import read_seen

__all__ = [
    "GATE_AUC_KEYS",
    "PAIRED_GATE_KEY",
    "Check",
    "Decision",
    "PairedGate",
    "PairedMode",
    "ScoringFailed",
    "compare_served",
    "decide",
    "gate_modes",
    "leave_out_seen",
    "paired_production",
    "read_served",
    "request_modes",
    "score_requests",
    "promote_bundle",
    "read_production",
]

log = logging.getLogger(__name__)

RECALL_KEY = "test_malignant_recall"
GATE_AUC_KEYS = ("malignant_auc", "macro_auc")
# The paired comparison decides on the macro AUC alone, as issue 20 asks: one number over all
# seven classes keeps the gate to one test per kind of request (each extra test is another chance
# to refuse a candidate by luck), and the malignant side of the decision is already the recall
# check at the operating point. The malignant AUC's paired CI is shown beside it, not gated.
PAIRED_GATE_KEY = "macro_auc"
PAIRED_LEVEL = 0.95
# Production's images are decoded in the calling process: a pool's processes re-import the main
# module, which a Prefect worker's flow-run process need not have as a file, and a test split
# (hundreds to a few thousand images) decodes in seconds anyway.
DECODE_WORKERS = 1
RECORD = "production.json"
# Float noise must not flip a decision taken on metrics rounded nowhere.
_EPS = 1e-9
# Test hook (skinlesion.core.outputs.failpoint): "<point>[@N][:pause]" stops a promotion at one of its steps:
# copy@N (about to copy the bundle's Nth file into the temp folder), record (the bundle copied,
# production.json not written), track (production swapped in, `dvc add` not run), tag (the record
# committed, not tagged). The swap itself: SKINLESION_ATOMIC_FAILPOINT=swapped-production.
FAILPOINT_ENV = "SKINLESION_PROMOTE_FAILPOINT"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    checks: tuple[Check, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class PairedMode:
    """One kind of request (``metadata``: each image with its own age, sex and site;
    ``image_only``: every image without), answered by both bundles on the same images.
    ``diffs``: :data:`skinlesion.measure.paired.PAIRED_KEYS`, ``a`` production, ``b`` the candidate."""

    mode: str
    n_images: int
    n_lesions: int
    diffs: dict[str, PairedDiff]

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "n_images": self.n_images,
            "n_lesions": self.n_lesions,
            "metrics": {
                k: {"production": _finite(d.a), "candidate": _finite(d.b), "diff": _finite(d.diff),
                    "ci_low": _finite(d.lo), "ci_high": _finite(d.hi)}
                for k, d in self.diffs.items()
            },
        }  # fmt: skip


@dataclass(frozen=True)
class PairedGate:
    """The candidate and production scored on the same test images: the gate's AUC evidence.

    ``unavailable`` says why there is none (the gate then falls back to the stored metrics)."""

    modes: tuple[PairedMode, ...] = ()
    n_test: int = 0  # the candidate's test images
    n_left_out: int = 0  # of them, seen by production (its lesion or the image itself)
    n_lesions_left_out: int = 0
    n_failed: int = 0  # production could not score them (named in notes)
    samples: int = 0
    seed: int = 0
    level: float = PAIRED_LEVEL
    notes: tuple[str, ...] = ()
    unavailable: str | None = None

    @property
    def n_images(self) -> int:
        return self.modes[0].n_images if self.modes else 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modes"] = [m.as_dict() for m in self.modes]
        out["notes"] = list(self.notes)
        out["n_images"] = self.n_images
        return out


class ScoringFailed(RuntimeError):
    """A bundle could not be loaded or run on the images (the message says why)."""


def leave_out_seen(frame: pd.DataFrame, seen: Any) -> tuple[pd.DataFrame, int, int]:
    """The rows of a served frame neither whose lesion nor whose image ``seen``
    (:class:`skinlesion.model.bundle.Seen`) holds, and how many images and lesions were left out."""
    keep = seen.unseen_rows(frame)
    gone = frame[~keep]
    return frame[keep].reset_index(drop=True), len(gone), int(gone["lesion_id"].nunique())


def request_modes(candidate_modes: Sequence[str], production_modes: Sequence[str]) -> tuple[str, ...]:
    """The kinds of request the two bundles are compared on: every input mode either has.

    Not only the modes both have: a candidate that adds metadata to a production without must be
    at least as good on the requests that carry it, where production answers image-only (and the
    other way round). A bundle without a mode answers those requests as it does without metadata."""
    return tuple(m for m in MODES if m in candidate_modes or m in production_modes)


def compare_served(
    candidate: Mapping[str, pd.DataFrame],
    production: Mapping[str, pd.DataFrame],
    *,
    samples: int,
    seed: int,
    level: float = PAIRED_LEVEL,
) -> tuple[PairedMode, ...]:
    """The paired lesion bootstrap (:func:`skinlesion.measure.paired.paired_bootstrap`) of each kind of
    request: served frames by mode, the same images in both. Each mode draws the same lesions
    (one generator per mode, seeded alike), so the modes' CIs are read on the same replicates."""
    out = []
    for mode, cand in candidate.items():
        pairing = pair(production[mode], cand)
        rng = np.random.default_rng(seed)
        diffs = paired_bootstrap(pairing, n_samples=samples, rng=rng, level=level)
        out.append(PairedMode(mode, pairing.n_images, pairing.n_lesions, diffs))
    return tuple(out)


def read_served(served_dir: Path, classes: Sequence[str] = CLASSES) -> dict[str, pd.DataFrame]:
    """The candidate's served test frames by mode (``test.csv``; ``test_image_only.csv`` beside
    it for a bundle fusing metadata, whose ``test.csv`` is then the metadata mode)."""
    fused = (served_dir / f"test{IMAGE_ONLY_SUFFIX}.csv").is_file()
    modes = MODES if fused else (IMAGE_ONLY,)
    return {
        m: read_predictions(served_dir / f"test{mode_suffix(m, modes)}.csv", classes, producer="calibrate")
        for m in modes
    }


def score_requests(
    bundle_dir: Path,
    rows: pd.DataFrame,
    images_dir: Path,
    modes: Sequence[str],
    *,
    shown: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
) -> tuple[dict[str, pd.DataFrame], dict[str, str], tuple[str, ...]]:
    """``bundle_dir`` scoring ``rows`` (image_id, lesion_id, dx, age, sex, localization; the images
    at ``images_dir/<image_id>.jpg``, named ``shown`` in messages) through the serving path, as
    ``serve.evaluate`` scores a labelled folder (:func:`serve.evaluate.score_labelled`): each
    row with its own metadata for ``metadata`` requests, without for ``image_only`` ones; a
    bundle without the metadata mode answers both alike. Returns the served frames by mode (the
    rows every scoring answered), the image_ids it could not score with why, and the bundle's
    own modes. A bundle that cannot be loaded or run raises :class:`ScoringFailed`."""
    from serve.evaluate import Labelled, score_labelled
    from serve.predictor import Predictor

    try:
        predictor = Predictor.load(bundle_dir)
    except Exception as e:  # TensorFlow/Keras raise many kinds for a bundle they cannot load
        raise ScoringFailed(f"cannot load it: {type(e).__name__}: {e}") from e
    classes = list(predictor.classes)
    if sorted(classes) != sorted(CLASSES):
        raise StageError(f"{bundle_dir}: the bundle's classes {classes} are not HAM10000's {list(CLASSES)}")
    failed: dict[str, str] = {}
    keep, metas = [], []
    for k, r in enumerate(rows.itertuples(index=False)):
        try:
            metas.append(parse_metadata(str(r.age), str(r.sex), str(r.localization)))
            keep.append(k)
        except StageError as e:
            failed[str(r.image_id)] = str(e)
    usable = rows.iloc[keep].reset_index(drop=True)
    ids = usable["image_id"].astype(str).tolist()
    labelled = Labelled(
        table="the candidate's served test answers",
        n_rows=len(rows),
        rows=usable,
        paths=[images_dir / f"{i}.jpg" for i in ids],
        meta=metas,
        skipped=[],
    )
    try:
        scored = score_labelled(
            predictor, labelled, root=images_dir, shown=shown or str(images_dir), batch_size=batch_size,
            workers=workers, progress=False,
        )  # fmt: skip
    except Exception as e:  # a bad image is a failed row; this is the model failing
        raise ScoringFailed(f"scoring failed: {type(e).__name__}: {e}") from e
    failed.update({s.image_id: s.reason for s in scored.failed})
    own = tuple(predictor.modes)
    frames = {m: scored.served[m if m in own else IMAGE_ONLY].frame(scored.rows, classes) for m in modes}
    return frames, failed, own


def paired_production(
    production_dir: Path,
    served_dir: Path,
    images_dir: Path,
    *,
    samples: int,
    seed: int,
    names: Mapping[str, str] | None = None,
) -> PairedGate:
    """Score production on the candidate's test images it has not seen and compare, lesion by
    lesion, with the candidate's own served answers (``served_dir``, as the calibrate stage wrote
    them). Never raises for what the gate can fall back from: a :class:`PairedGate` whose
    ``unavailable`` says why. ``names``: how to show the three paths (``production``,
    ``served``, ``images``) in messages, e.g. relative to the repository."""
    shown = {"production": str(production_dir), "served": str(served_dir), "images": str(images_dir)}
    shown.update(names or {})
    base = {"samples": samples, "seed": seed}
    try:
        seen = read_seen(production_dir)
    except StageError as e:  # the message names the file
        return PairedGate(**base, unavailable=str(e).replace(str(production_dir), shown["production"]))
    if seen is None:
        return PairedGate(
            **base,
            unavailable=f"{shown['production']} has no seen.json (a bundle from before it was recorded): "
            "which images it learned from is unknown",
        )
    if samples < 1:
        return PairedGate(**base, unavailable="evaluate.bootstrap_samples is 0: no paired CI")
    try:
        candidate = read_served(served_dir)
    except StageError as e:
        why = str(e).replace(str(served_dir), shown["served"])
        return PairedGate(**base, unavailable=f"the candidate's served test answers: {why}")
    first = next(iter(candidate.values()))
    rows, n_left, n_lesions_left = leave_out_seen(first, seen)
    counts = {**base, "n_test": len(first), "n_left_out": n_left, "n_lesions_left_out": n_lesions_left}
    if rows.empty:
        return PairedGate(
            **counts,
            unavailable=f"production has seen all {len(first)} of the candidate's test images "
            "(their lesions were in its train or val split): nothing to compare on",
        )
    try:
        prod_frames, failed, prod_modes = score_requests(
            production_dir, rows[list(META_COLUMNS)], images_dir, request_modes(tuple(candidate), MODES),
            shown=shown["images"], workers=DECODE_WORKERS,
        )  # fmt: skip
    except (ScoringFailed, StageError) as e:  # fall back, and say why
        log.warning("scoring %s failed", shown["production"], exc_info=True)
        return PairedGate(**counts, unavailable=f"{shown['production']} could not be scored: {e}")
    modes = request_modes(tuple(candidate), prod_modes)
    notes: list[str] = []
    if failed:
        first_id, why = next(iter(failed.items()))
        notes.append(f"{len(failed)} image(s) production could not score left out (first: {first_id}: {why})")
    if METADATA in modes and METADATA not in prod_modes:
        notes.append(
            "production does not use metadata: its answers are set beside the candidate's with metadata "
            "as it gives them, image only"
        )
    if METADATA in modes and METADATA not in candidate:
        notes.append(
            "the candidate does not use metadata: its answers are set beside production's with metadata "
            "as it gives them, image only"
        )
    cand_frames = {m: candidate.get(m, candidate[IMAGE_ONLY]) for m in modes}
    kept = set(prod_frames[modes[0]]["image_id"])
    cand_frames = {m: f[f["image_id"].isin(kept)].reset_index(drop=True) for m, f in cand_frames.items()}
    if not kept:
        why = "production could not score any of the candidate's test images"
        return PairedGate(**counts, n_failed=len(failed), notes=tuple(notes), unavailable=why)
    paired = compare_served(cand_frames, {m: prod_frames[m] for m in modes}, samples=samples, seed=seed)
    undefined = [
        m.mode for m in paired
        if not all(math.isfinite(x) for x in (m.diffs[PAIRED_GATE_KEY].diff, m.diffs[PAIRED_GATE_KEY].lo))
    ]  # fmt: skip
    if undefined:
        return PairedGate(
            **counts, n_failed=len(failed), notes=tuple(notes),
            unavailable=f"the paired {PAIRED_GATE_KEY} or its CI is undefined on the {paired[0].n_images} "
            f"images ({', '.join(undefined)}): too few images of each class",
        )  # fmt: skip
    return PairedGate(paired, **counts, n_failed=len(failed), notes=tuple(notes))


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def gate_modes(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The input modes a flat gate dict has numbers for: both when it holds any image-only key
    (a bundle fusing metadata), else the one mode of a bundle without fusion."""
    if any(k + IMAGE_ONLY_SUFFIX in metrics for k in (RECALL_KEY, *GATE_AUC_KEYS)):
        return MODES
    return (IMAGE_ONLY,)


def _recall_check(candidate: Mapping[str, Any], key: str, name: str, target_recall: float) -> Check:
    recall = _num(candidate.get(key))
    if recall is None:
        return Check(key, False, f"{name} missing or not a number in the candidate")
    ok = recall >= target_recall - _EPS
    op = ">=" if ok else "<"
    return Check(key, ok, f"{name} {recall:.3f} {op} target {target_recall:.3f}")


def _auc_check(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    key: str,
    name: str,
    max_auc_drop: float,
    *,
    prod_key: str | None,
) -> Check:
    """``prod_key``: production's number to compare with; None when production has none for
    this mode (the candidate's number is shown, not compared)."""
    cand = _num(candidate.get(key))
    if cand is None:
        return Check(key, False, f"{name} missing or not a number in the candidate")
    if production is None:
        return Check(key, True, f"{name} {cand:.3f} (no production model yet)")
    if prod_key is None:
        return Check(key, True, f"{name} {cand:.3f} (not compared: production has no image-only numbers)")
    prod = _num(production.get(prod_key))
    if prod is None:
        return Check(key, True, f"{name} {cand:.3f} (production has no {prod_key} to compare)")
    delta = cand - prod
    ok = delta >= -max_auc_drop - _EPS
    rule = f"drop allowed {max_auc_drop:.3f}" if max_auc_drop >= 0 else f"gain required {-max_auc_drop:.3f}"
    verdict = "ok" if ok else "too low"
    return Check(key, ok, f"{name} {cand:.3f} vs production {prod:.3f} ({delta:+.3f}; {rule}): {verdict}")


def _paired_check(pm: PairedMode, modes: Sequence[str], max_auc_drop: float, paired: PairedGate) -> Check:
    """The macro AUC of one kind of request: the CI's lower bound against the tolerance."""
    key = PAIRED_GATE_KEY + mode_suffix(pm.mode, modes)
    name = f"{key} ({mode_label(pm.mode)})" if len(modes) > 1 else key
    d = pm.diffs[PAIRED_GATE_KEY]
    ok = d.lo >= -max_auc_drop - _EPS
    op = ">=" if ok else "<"
    rule = f"drop allowed {max_auc_drop:.3f}" if max_auc_drop >= 0 else f"gain required {-max_auc_drop:.3f}"
    return Check(
        key,
        ok,
        f"{name} {d.b:.3f} vs production {d.a:.3f} on the same {pm.n_images} test images "
        f"({paired.n_left_out} left out: seen by production): {d.diff:+.3f}, "
        f"{round(100 * paired.level)}% CI [{d.lo:+.3f}, {d.hi:+.3f}] ({rule}: CI lower bound {d.lo:+.3f} "
        f"{op} {-max_auc_drop:+.3f}): {'ok' if ok else 'too low'}",
    )


def decide(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    *,
    target_recall: float,
    max_auc_drop: float,
    paired: PairedGate | None = None,
) -> Decision:
    """The gate, on flat metric dicts (``test_malignant_recall``, ``malignant_auc``, ``macro_auc``,
    and for a bundle fusing metadata the same keys again with ``_image_only``: :func:`gate_metrics`).

    The recall must reach the target in every mode the candidate has: a fusion bundle that finds
    melanomas only when it is given age, sex and site would miss them in every request without.
    ``production`` is None when no model has been promoted yet.

    ``paired`` (:func:`paired_production`): both bundles on the same images; the macro AUC of
    each kind of request passes when the lower bound of the paired CI of candidate - production
    is at least ``-max_auc_drop``. Without it (None, or ``unavailable``, said in the reason) the
    stored AUCs are compared mode with mode where production has the mode's numbers too; what is
    not compared (production is older than input modes, or the candidate has one mode and
    production two) is said in the reason.
    """
    modes = gate_modes(candidate)
    fusion = len(modes) > 1
    checks: list[Check] = []
    for mode in modes:
        key = RECALL_KEY + mode_suffix(mode, modes)
        name = f"{key} ({mode_label(mode)})" if fusion else key
        checks.append(_recall_check(candidate, key, name, target_recall))
    n_recall = len(checks)
    notes: list[str] = []
    if production is not None and paired is not None and paired.unavailable is None:
        kinds = [pm.mode for pm in paired.modes]
        checks += [_paired_check(pm, kinds, max_auc_drop, paired) for pm in paired.modes]
        notes += paired.notes
    else:
        checks += _unpaired_checks(candidate, production, modes, max_auc_drop, notes)
        if production is not None and paired is not None:
            notes.append(
                f"not compared on the same images: {paired.unavailable}; the AUC checks compare each "
                "bundle's stored test metrics"
            )

    failed = [c.detail for c in checks if not c.passed]
    if failed:
        return Decision(False, "; ".join(failed + notes), tuple(checks))
    if production is None:
        recalls = "; ".join(c.detail for c in checks[:n_recall])
        return Decision(True, f"no production model yet; {recalls}", tuple(checks))
    return Decision(True, "; ".join([c.detail for c in checks] + notes), tuple(checks))


def _unpaired_checks(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    modes: Sequence[str],
    max_auc_drop: float,
    notes: list[str],
) -> list[Check]:
    """Each bundle's stored AUCs, mode by mode where production has the mode's numbers (what is
    not compared is added to ``notes``)."""
    fusion = len(modes) > 1
    prod_fusion = production is not None and len(gate_modes(production)) > 1
    checks: list[Check] = []
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        for base in GATE_AUC_KEYS:
            key = base + sfx
            name = f"{key} ({mode_label(mode)})" if fusion else key
            # production's number for this mode: its own key when it has the mode; a one-mode
            # production has no image-only numbers to set beside a fusion candidate's
            prod_key = key if (not sfx or prod_fusion) else None
            checks.append(_auc_check(candidate, production, key, name, max_auc_drop, prod_key=prod_key))
    if production is not None and fusion and not prod_fusion:
        notes.append(
            "production has no image-only metrics (a one-mode bundle): only the AUCs "
            f"{mode_label(METADATA)} are compared, the image-only ones are not"
        )
    if production is not None and not fusion and prod_fusion:
        notes.append(
            "the candidate has one input mode, production two: its AUCs are compared with "
            f"production's {mode_label(METADATA)}, production's image-only ones are not"
        )
    return checks


# --------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise DvcError(f"{path}: not valid JSON: {e}") from None
    return data if isinstance(data, dict) else None


def read_production(layout: Layout) -> dict[str, Any] | None:
    """The production record (``models/production/production.json``), or None before the first."""
    return read_json(layout.path(layout.production) / RECORD)


def gate_metrics(snapshot: Mapping[str, Mapping[str, Any]], layout: Layout) -> dict[str, Any]:
    """The gate's flat inputs from a metrics snapshot ({file: {key: value}}): the recall and the
    AUCs of the bundle as served (the calibration metrics: the calibrate stage scores the test
    images with the bundle itself); the AUCs from the ensemble's metrics only for a snapshot
    whose calibration metrics have none (made before they were reported there). Each
    ``_image_only`` key too where the file has it (a bundle fusing metadata), so :func:`decide`
    judges every mode."""
    calibration = snapshot.get(layout.calibration_metrics) or {}
    ensemble = snapshot.get(layout.ensemble_metrics) or {}
    aucs = calibration if all(k in calibration for k in GATE_AUC_KEYS) else ensemble
    out = {RECALL_KEY: calibration.get(RECALL_KEY), **{k: aucs.get(k) for k in GATE_AUC_KEYS}}
    for source, keys in ((calibration, (RECALL_KEY,)), (aucs, GATE_AUC_KEYS)):
        out.update({k + IMAGE_ONLY_SUFFIX: source[k + IMAGE_ONLY_SUFFIX] for k in keys
                    if k + IMAGE_ONLY_SUFFIX in source})  # fmt: skip
    return out


# --------------------------------------------------------------------------- promoting


def utc_tag(now: datetime) -> str:
    return "model-" + now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def promote_bundle(layout: Layout, record: Mapping[str, Any]) -> Path:
    """Copy the candidate bundle to production in one rename, with ``record`` as production.json.

    A crash at any point leaves the previous production folder exactly as it was.
    """
    src = layout.path(layout.bundle)
    if not src.is_dir() or not any(src.iterdir()):
        raise DvcError(f"{layout.bundle}: no candidate bundle to promote")
    dest = layout.path(layout.production)
    copied = 0

    def copy(src_file: str, dst_file: str) -> object:
        nonlocal copied
        copied += 1
        failpoint(FAILPOINT_ENV, "copy", copied)
        return shutil.copy2(src_file, dst_file)

    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=False, copy_function=copy)
        failpoint(FAILPOINT_ENV, "record", 1)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def dvc_track(layout: Layout) -> None:
    """``dvc add models/production``: the pointer file git keeps; the content goes to the cache
    (and to the remote with ``dvc push``)."""
    failpoint(FAILPOINT_ENV, "track", 1)
    run_quiet(dvc_argv("add", layout.production), layout.root)


# --------------------------------------------------------------------------- git


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DvcError(f"`git {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def in_git(repo: Path) -> bool:
    try:
        return _git(repo, "rev-parse", "--is-inside-work-tree", check=False).stdout.strip() == "true"
    except FileNotFoundError:  # no git on this machine
        return False


def head_commit(repo: Path) -> str | None:
    proc = _git(repo, "rev-parse", "HEAD", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def dirty_code(repo: Path) -> list[str]:
    """Tracked files that differ from HEAD, outside the pipeline record: code a tag would not hold."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=no", check=False).stdout
    paths = [line[3:] for line in out.splitlines() if len(line) > 3]
    return [p for p in paths if not p.startswith(("metrics/", "reports/", "models/")) and
            p not in ("dvc.lock", "params.yaml", "dvc.yaml") and not p.endswith(".gitignore")]  # fmt: skip


def tag_exists(repo: Path, tag: str) -> bool:
    return _git(repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).returncode == 0


def free_tag(repo: Path, tag: str) -> str:
    """``tag``, or ``tag-2``, ``tag-3``... if a promotion in the same second took it."""
    name, n = tag, 1
    while tag_exists(repo, name):
        n += 1
        name = f"{tag}-{n}"
    return name


def commit_and_tag(layout: Layout, tag: str, message: str) -> str:
    """Commit only the pipeline record (whatever else is staged stays staged) and tag it."""
    repo = layout.root
    candidates = ["dvc.yaml", "dvc.lock", layout.params, "metrics", "reports", f"{layout.production}.dvc"]
    ignores = _git(repo, "ls-files", "-co", "--exclude-standard", "--", ":(glob)**/.gitignore")
    paths = [p for p in candidates if (repo / p).exists()] + ignores.stdout.split()
    ident: list[str] = []
    if not _git(repo, "config", "user.email", check=False).stdout.strip():
        ident = ["-c", "user.name=retrain flow", "-c", "user.email=retrain-flow@localhost"]
    _git(repo, "add", "-A", "--", *paths)
    _git(repo, *ident, "commit", "--quiet", "--allow-empty", "--only", "-m", message, "--", *paths)
    sha = _git(repo, "rev-parse", "HEAD").stdout.strip()
    failpoint(FAILPOINT_ENV, "tag", 1)
    _git(repo, "tag", tag, sha)
    return sha
