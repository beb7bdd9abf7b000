"""The gate's evidence on AUC: production and the candidate scored on the same test images.

Production's bundle answers the candidate's test split (through the serving path, as
``serve.evaluate`` scores a labelled folder), less every image whose lesion or image production
trained, tuned or calibrated on (``seen.json``); its answers are compared with the candidate's own
served answers lesion by lesion (:mod:`skinlesion.measure.paired`), in every kind of request
(with metadata, image only). :func:`paired_production` never raises for what the gate can fall
back from: its :class:`PairedGate` then says why it is unavailable, and :func:`flows.gate.decide`
compares the stored metrics instead. No Prefect here; :mod:`flows.retrain` calls it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import StageError
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
from skinlesion.model.seen import read_seen

__all__ = [
    "PAIRED_GATE_KEY",
    "PairedGate",
    "PairedMode",
    "ScoringFailed",
    "compare_served",
    "leave_out_seen",
    "paired_production",
    "read_served",
    "request_modes",
    "score_requests",
]

log = logging.getLogger(__name__)

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
    (:class:`skinlesion.model.seen.Seen`) holds, and how many images and lesions were left out."""
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
