"""The one predictor the CLI and the web app share: a bundle loaded once, images in, answers out.

:class:`Predictor` wraps :class:`skinlesion.model.bundle.Bundle` (members, weights, temperature, TTA and the
malignant threshold exactly as ``calibrate`` recorded them) and adds what a user reads: the top-3
classes, the malignant probability and the ``refer`` flag, a risk level per top class, the
bundle's version, and on request a Grad-CAM overlay of the best member (the highest weight).

Identical inputs give identical numbers. Float32 kernels give results that differ in the 7th
decimal with the batch an image is computed in (oneDNN picks other algorithms for other batch
sizes), so the probabilities of a model input already seen in this process (by content, up to
``cache_size`` of them) are reused rather than recomputed: an image listed twice, or uploaded
twice, gets the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from serve.decode import Decoded, DecodeSpec, decode_chunk
from skinlesion.core.errors import StageError
from skinlesion.core.parallel import in_order, n_workers
from skinlesion.core.schema import MALIGNANT
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    mode_inputs,
)
from skinlesion.model.bundle_json import (
    BUNDLE_JSON,
    PRODUCTION_RECORD,
    choose_bundle,
    pixel_cap,
    read_bundle_json,
    read_training_data,
    trained_on,
)

log = logging.getLogger(__name__)

# Published screening apps' grouping: melanoma and basal cell carcinoma need a specialist soon,
# actinic keratosis / Bowen's disease (akiec) is pre-malignant, the other four are benign.
DEFAULT_RISK = "mel=High,bcc=High,akiec=Moderate,*=Low"
TOP_K = 3
# Side of the display square the Grad-CAM overlay is drawn on (the model input can be 32 px).
DISPLAY_SIZE = 256
NOT_FINITE = "the model gave no valid probabilities for this image (NaN or inf): the bundle is damaged"
# What :meth:`Predictor.predict_paths` takes per image: ``(name, path, known error or None)``,
# optionally with the image's metadata ``(age, sex index, localization index)`` as a 4th element.
Item = tuple[Any, ...]
# What the output's columns mean, said where they are read (predict's header, --help and JSON
# header; the page): a "predicted" class beside another "top1" is the bundle working as designed.
# Both are kept: top1 is what the calibrated probabilities say, predicted what the bundle decides.
DECISION_NOTES = {
    "balanced": (
        "the bundle's class decision: the class whose calibrated probability is highest "
        "against its share of the validation images (balanced: every class weighs alike), so a rare "
        "class (vasc, df) can be predicted while a common one (nv) is the most probable (top1)"
    ),
    "argmax": "the bundle's class decision: the most probable class (the same as top1)",
}
TOP_NOTE = "the classes with the highest calibrated probabilities, most probable first"
RISK_NOTE = (
    "the level of the class behind the referral: referred, the predicted class if it is "
    "malignant (mel, bcc, akiec) else the most probable malignant one; not referred, a benign one "
    "(so it never reads Low beside refer)"
)
DISCLAIMER = (
    "Research software, not a medical device: this result is not a diagnosis and must not be used to "
    "rule out skin cancer. A clinician examines the lesion and decides; anyone worried about a skin "
    "lesion should see a doctor."
)


@dataclass(frozen=True)
class RiskLevels:
    """Risk level per class (the class :func:`risk_class` picks); classes not listed get ``default``."""

    by_class: Mapping[str, str]
    default: str = "Low"

    @classmethod
    def parse(cls, text: str, classes: Sequence[str]) -> RiskLevels:
        """``"mel=High,bcc=High,akiec=Moderate,*=Low"``: ``*`` is every class not named."""
        by_class: dict[str, str] = {}
        default = "Low"
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, level = (s.strip() for s in part.partition("="))
            if not sep or not level:
                raise StageError(f"--risk: {part!r} is not CLASS=LEVEL (e.g. mel=High)")
            if name == "*":
                default = level
            elif name not in classes:
                raise StageError(f"--risk: unknown class {name!r}; the bundle's classes are {list(classes)}")
            else:
                by_class[name] = level
        return cls(by_class, default)

    def level(self, top_class: str) -> str:
        return self.by_class.get(top_class, self.default)


def risk_class(probabilities: Mapping[str, float], predicted: str, refer: bool) -> str:
    """The class the risk level is read from, always on the side of the referral decision.

    Referred (P(mel) + P(bcc) + P(akiec) at or above the threshold): the predicted class if it is
    malignant, else the most probable malignant class. Not referred: the predicted class if it is
    benign, else the most probable benign class. The referral is the decision the bundle is tuned
    and tested on (recall first); the class decision (balanced) answers another question, and
    reading the risk from it alone put a green "Low" beside a red "refer" (issue 22).
    """
    side = [c for c in probabilities if (c in MALIGNANT) == refer]
    if predicted in side or not side:
        return predicted
    return min(side, key=lambda c: (-probabilities[c], c))


@dataclass
class Prediction:
    """The answer for one image, or the reason there is none (``error``)."""

    image: str
    probabilities: dict[str, float] = field(default_factory=dict)
    malignant_prob: float = math.nan
    refer: bool = False
    risk: str = ""
    risk_class: str = ""  # the class the risk level was read from (:func:`risk_class`)
    # The bundle's class decision (bundle.json "decision"). With "balanced" it is the class whose
    # probability is highest *against its share of the validation images* (p / prior), so a rare class (vasc,
    # df) can be predicted while a common one (nv) has the highest probability (top[0], "top1"):
    # the decision weighs every class alike, the probabilities follow the population.
    predicted: str = ""
    # the bundle's input mode this row was scored in (skinlesion.measure.scoring: metadata | image_only)
    mode: str = ""
    threshold: float = math.nan  # the malignant threshold of that mode
    error: str | None = None
    overlay: np.ndarray | None = None  # uint8 [D, 2D, 3]: the image | its Grad-CAM overlay
    # No region raised the top class's score (an all-zero map): the class won on the model's
    # bias and the other classes' losses, and the page says so instead of showing a blank map.
    gradcam_empty: bool = False
    gradcam_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top(self) -> list[tuple[str, float]]:
        ranked = sorted(self.probabilities.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked[:TOP_K]

    def as_row(self, classes: Sequence[str], version: Mapping[str, Any]) -> dict[str, Any]:
        """A flat record (CSV / JSON): every probability unrounded, so the 7 sum to 1."""
        row: dict[str, Any] = {
            "image": self.image,
            "status": "ok" if self.ok else "error",
            "error": self.error or "",
            "mode": self.mode if self.ok else "",
            "risk": self.risk,
            "risk_class": self.risk_class if self.ok else "",
            "predicted": self.predicted if self.ok else "",
            "refer": self.refer if self.ok else None,
            "malignant_prob": self.malignant_prob if self.ok else None,
            "threshold": self.threshold if self.ok else None,
        }
        top = self.top
        for k in range(TOP_K):
            row[f"top{k + 1}"] = top[k][0] if k < len(top) else ""
            row[f"top{k + 1}_prob"] = top[k][1] if k < len(top) else None
        for c in classes:
            row[f"prob_{c}"] = self.probabilities.get(c)
        row["gradcam"] = self.gradcam_path or ""
        row["bundle_created"] = version.get("created")
        row["bundle_data_version"] = version.get("data_version")
        return row


def default_bundle(root: Path) -> Path:
    """``models/production`` once a promotion made one, else the last candidate ``models/ensemble``."""
    return choose_bundle(root / "models" / "production", root / "models" / "ensemble")


def bundle_pixel_cap(bundle_dir: str | Path, params: Any, limit: int | None = None) -> int:
    """The project's one pixel cap for the bundle in ``bundle_dir`` (:func:`pixel_cap`: the
    stricter of its validate and drift caps), lowered by ``limit`` (``--max-pixels``)."""
    return pixel_cap(params, limit, str(Path(bundle_dir) / BUNDLE_JSON))


class Predictor:
    """A loaded bundle plus the user-facing reading of its output. Thread-safe."""

    def __init__(
        self,
        bundle: Any,
        *,
        risk: RiskLevels | None = None,
        max_pixels: int | None = None,
        cache_size: int = 65_536,
    ):
        self.bundle = bundle
        self.classes = list(bundle.classes)
        self.risk = risk or RiskLevels.parse(DEFAULT_RISK, self.classes)
        params = bundle.meta.get("params", {})
        self.draft_gap = float(params.get("prepare", {}).get("draft_gap", 2.0))
        # The project's one pixel cap (the bomb guard): the stricter of the bundle's validate and
        # drift caps, the same as the web app's and drift's.
        self.max_pixels = int(max_pixels or bundle_pixel_cap(bundle.root, params))
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._gradcam: Any = None
        self._best_model = next(
            (m.model for m in getattr(bundle, "members", []) if m.name == bundle.best), None
        )
        self._lock = threading.Lock()  # one model call at a time: Keras layers keep call state

    @classmethod
    def load(cls, bundle_dir: str | Path, *, max_pixels: int | None = None, **kwargs: Any) -> Predictor:
        """Load the bundle once. ``max_pixels`` (``--max-pixels``) lowers its pixel cap, never raises
        it: checked, with ``bundle.json``, before any member is loaded."""
        cap = bundle_pixel_cap(bundle_dir, read_bundle_json(bundle_dir).get("params"), max_pixels)
        from skinlesion.model.bundle import Bundle

        return cls(Bundle.load(bundle_dir), max_pixels=cap, **kwargs)

    # ------------------------------------------------------------------ facts about the bundle

    @property
    def modes(self) -> tuple[str, ...]:
        """The input modes the bundle has an operating point for (``image_only`` always)."""
        return tuple(self.bundle.modes)

    @property
    def thresholds(self) -> dict[str, float]:
        """The malignant threshold of each mode."""
        return {m: self.bundle.threshold(m) for m in self.modes}

    @property
    def decision(self) -> str:
        """``balanced`` when any mode decides against the class prior, else ``argmax``."""
        return "balanced" if any(p.class_prior is not None for p in self.bundle.points.values()) else "argmax"

    @property
    def notes(self) -> dict[str, str]:
        """What the class columns of an answer mean, for this bundle: predicted, top1, risk."""
        return {"predicted": DECISION_NOTES[self.decision], "top1": TOP_NOTE, "risk": RISK_NOTE}

    @cached_property
    def version(self) -> dict[str, Any]:
        """What identifies the bundle: what it was trained on (``trained_on``, the line every face
        shows first; ``synthetic``), when it was made, from which data, and its promotion tag.

        ``data_version`` is the prepared data's hash (bundle.json ``data_version``); the label names
        the raw data's (``training_data``: the version a promotion record names) when recorded."""
        meta = self.bundle.meta
        md5 = (meta.get("data_version") or {}).get("md5")
        data = read_training_data(meta)
        tag = None
        record = Path(self.bundle.root) / PRODUCTION_RECORD
        if record.is_file():
            try:
                tag = json.loads(record.read_text(encoding="utf-8")).get("git_tag")
            except (OSError, ValueError):
                tag = None
        if data is not None and data.recorded:
            label = f"{meta.get('created', '?')}, data {(data.data_version or 'unknown')[:8]}"
        else:  # a bundle older than its training_data record: the prepared data's hash
            label = f"{meta.get('created', '?')}, prepared data {md5[:8] if md5 else 'unknown'}"
        if tag:
            label += f", {tag}"
        return {
            "trained_on": trained_on(meta),
            "synthetic": None if data is None else data.synthetic,
            "training_data": None if data is None or not data.recorded else data.to_json(),
            "created": meta.get("created"),
            "data_version": md5,
            "tag": tag,
            "label": label,
        }

    def decode_spec(self, *, explain: bool = False) -> DecodeSpec:
        return DecodeSpec(
            image_size=self.bundle.image_size,
            aspect=self.bundle.aspect,
            draft_gap=self.draft_gap,
            max_pixels=self.max_pixels,
            display_size=DISPLAY_SIZE if explain else 0,
        )

    # ------------------------------------------------------------------ the core

    def probabilities(
        self, pixels: np.ndarray, meta: MetaArrays | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities ``[N, C]`` of uint8 model inputs ``[N, S, S, 3]`` (and their
        metadata), and the mode each row was scored in."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        modes = self.bundle.row_modes(len(pixels), meta)
        fed = mode_inputs(meta, modes)

        def key(i: int) -> bytes:
            h = hashlib.blake2b(pixels[i].tobytes(), digest_size=16)
            if modes[i] == METADATA:  # the same image with other metadata is another model input
                assert fed is not None
                h.update(np.array([fed.age[i], fed.sex[i], fed.localization[i]], np.float64).tobytes())
            return h.digest()

        keys = [key(i) for i in range(len(pixels))]
        out = np.empty((len(pixels), len(self.classes)), dtype=np.float64)
        with self._lock:
            todo: dict[bytes, list[int]] = {}
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is not None:
                    out[i] = hit
                    self._cache.move_to_end(k)
                else:
                    todo.setdefault(k, []).append(i)
            if todo:
                first = [rows[0] for rows in todo.values()]
                probs = self.bundle.score(pixels[first], fed.take(first) if fed is not None else None).probs
                for (k, rows), p in zip(todo.items(), np.asarray(probs, dtype=np.float64), strict=True):
                    out[rows] = p
                    if self.cache_size > 0:
                        self._cache[k] = p
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out, modes

    def heatmaps(
        self, pixels: np.ndarray, class_index: np.ndarray, meta: MetaArrays | None = None
    ) -> np.ndarray:
        """Grad-CAM maps ``[N, h, w]`` of the best member for ``class_index``."""
        from serve.gradcam import GradCam

        best = next(m for m in self.bundle.members if m.name == self.bundle.best)
        with self._lock:
            if self._gradcam is None:
                self._gradcam = GradCam(self._best_model)
            # The bundle's own input convention (image-only: unknown metadata for a fusion member).
            inputs = self.bundle.model_inputs(
                np.ascontiguousarray(pixels, dtype=np.uint8), best.takes_meta, meta
            )
            return self._gradcam.heatmaps(inputs, class_index)

    def read(self, name: str, probs: np.ndarray, mode: str = IMAGE_ONLY) -> Prediction:
        """A :class:`Prediction` from one row of calibrated probabilities scored in ``mode``."""
        probabilities = {c: float(p) for c, p in zip(self.classes, probs, strict=True)}
        malignant = float(self.bundle.malignant_score(probs[None, :])[0])
        decided = self.classes[int(self.bundle.decide(probs[None, :], np.array([mode], dtype=object))[0])]
        threshold = self.bundle.threshold(mode)
        refer = bool(malignant >= threshold)
        basis = risk_class(probabilities, decided, refer)
        return Prediction(
            image=name,
            probabilities=probabilities,
            malignant_prob=malignant,
            refer=refer,
            risk=self.risk.level(basis),
            risk_class=basis,
            predicted=decided,
            mode=mode,
            threshold=threshold,
        )

    def predict_decoded(
        self,
        names: Sequence[str],
        decoded: Sequence[Decoded],
        *,
        meta: MetaArrays | None = None,
        explain: bool = False,
    ) -> list[Prediction]:
        """Predictions for already decoded images (one model call), with overlays if ``explain``.

        ``meta``: the images' metadata (None: none known); each row's mode follows the bundle's rule.
        """
        if not decoded:
            return []
        from serve.gradcam import overlay

        pixels = np.stack([d.pixels for d in decoded])
        probs, modes = self.probabilities(pixels, meta)
        # A member that outputs NaN (diverged weights whose md5 still matches) must not give a
        # prediction marked ok: that image gets an error instead.
        out = [
            self.read(n, p, str(m)) if np.all(np.isfinite(p)) else Prediction(n, error=NOT_FINITE)
            for n, p, m in zip(names, probs, modes, strict=True)
        ]
        if explain:
            heat = self.heatmaps(pixels, self.bundle.decide(probs, modes), mode_inputs(meta, modes))
            for pred, d, h in zip(out, decoded, heat, strict=True):
                pred.gradcam_empty = not bool(h.max() > 0)
                if d.display is not None and pred.ok:
                    pred.overlay = overlay(d.display, h)
        return out

    def predict_paths(
        self,
        items: Iterable[Item],
        *,
        batch_size: int = 32,
        workers: int = 1,
        explain: bool = False,
        progress: bool = True,
        total: int | None = None,
    ) -> Iterator[Prediction]:
        """Stream predictions for :data:`Item` s, in input order.

        Decoding runs on ``workers`` processes (a bounded window of chunks in flight), the model
        here on batches of ``batch_size``: memory stays flat in the number of images. A bad file
        becomes a :class:`Prediction` with ``error`` set, never an exception.
        """
        spec = self.decode_spec(explain=explain)
        workers = max(1, workers)
        chunk = 8 if workers > 1 else batch_size
        names: list[str] = []
        metas: list[tuple[float, int, int] | None] = []

        def tasks() -> Iterator[tuple[int, tuple[Any, ...]]]:
            part: list[tuple[int, str, str | None]] = []
            for item in items:
                name, path, known = item[:3]
                names.append(name)
                metas.append(item[3] if len(item) > 3 else None)
                part.append((len(names) - 1, path, known))
                if len(part) >= chunk:
                    yield part[0][0], (part, spec)
                    part = []
            if part:
                yield part[0][0], (part, spec)

        buffer: list[tuple[int, Decoded | None, str | None]] = []

        def flush() -> list[Prediction]:
            good = [(i, d) for i, d, _ in buffer if d is not None]
            given = [metas[i] for i, _ in good]
            meta = None
            if any(g is not None for g in given):
                unknown = (math.nan, UNKNOWN_SEX, UNKNOWN_LOCALIZATION)
                meta = MetaArrays.of([g if g is not None else unknown for g in given])
            preds = self.predict_decoded(
                [names[i] for i, _ in good], [d for _, d in good], meta=meta, explain=explain
            )
            by_index = dict(zip((i for i, _ in good), preds, strict=True))
            rows = [by_index[i] if d is not None else Prediction(names[i], error=why) for i, d, why in buffer]
            buffer.clear()
            return rows

        with tqdm(total=total, unit="img", desc="predict", mininterval=1.0, disable=not progress) as bar:
            for _tag, results in in_order(decode_chunk, tasks(), workers, window=4 * workers):
                buffer.extend(results)
                bar.update(len(results))
                if len(buffer) >= batch_size:
                    yield from flush()
            if buffer:
                yield from flush()


def pick_workers(requested: int, n_items: int, batch_size: int) -> int:
    """Decode processes: one when the images fit in a batch or two (a pool costs ~0.5 s to start)."""
    if n_items <= 2 * batch_size:
        return 1
    return n_workers(requested)
