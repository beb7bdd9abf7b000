"""The one predictor the CLI and the web app share: a bundle loaded once, images in, answers out.

:class:`Predictor` wraps :class:`stages.bundle.Bundle` (members, weights, temperature, TTA and the
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
from stages.common import StageError, n_workers
from stages.images import DEFAULT_MAX_PIXELS
from stages.parallel import in_order

log = logging.getLogger(__name__)

# Published screening apps' grouping: melanoma and basal cell carcinoma need a specialist soon,
# actinic keratosis / Bowen's disease (akiec) is pre-malignant, the other four are benign.
DEFAULT_RISK = "mel=High,bcc=High,akiec=Moderate,*=Low"
TOP_K = 3
# Side of the display square the Grad-CAM overlay is drawn on (the model input can be 32 px).
DISPLAY_SIZE = 256
PRODUCTION_RECORD = "production.json"
DISCLAIMER = (
    "Research software, not a medical device: this result is not a diagnosis and must not be used to "
    "rule out skin cancer. A clinician examines the lesion and decides; anyone worried about a skin "
    "lesion should see a doctor."
)


@dataclass(frozen=True)
class RiskLevels:
    """Risk level per top-1 class; classes not listed get ``default``."""

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


@dataclass
class Prediction:
    """The answer for one image, or the reason there is none (``error``)."""

    image: str
    probabilities: dict[str, float] = field(default_factory=dict)
    malignant_prob: float = math.nan
    refer: bool = False
    risk: str = ""
    # the bundle's decision (bundle.json "decision"): with "balanced" it can differ from top[0]
    predicted: str = ""
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

    def as_row(self, classes: Sequence[str], threshold: float, version: Mapping[str, Any]) -> dict[str, Any]:
        """A flat record (CSV / JSON): every probability unrounded, so the 7 sum to 1."""
        row: dict[str, Any] = {
            "image": self.image,
            "status": "ok" if self.ok else "error",
            "error": self.error or "",
            "risk": self.risk,
            "predicted": self.predicted if self.ok else "",
            "refer": self.refer if self.ok else None,
            "malignant_prob": self.malignant_prob if self.ok else None,
            "threshold": threshold,
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
    production = root / "models" / "production"
    return production if (production / "bundle.json").is_file() else root / "models" / "ensemble"


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
        # The pixel cap the pipeline validated its own images with (the bomb guard).
        self.max_pixels = int(max_pixels or params.get("validate", {}).get("max_pixels", DEFAULT_MAX_PIXELS))
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._gradcam: Any = None
        self._best_model = next(
            (m.model for m in getattr(bundle, "members", []) if m.name == bundle.best), None
        )
        _run_as_graphs(bundle)
        self._lock = threading.Lock()  # one model call at a time: Keras layers keep call state

    @classmethod
    def load(cls, bundle_dir: str | Path, **kwargs: Any) -> Predictor:
        from stages.bundle import Bundle  # TensorFlow from here on

        return cls(Bundle.load(bundle_dir), **kwargs)

    # ------------------------------------------------------------------ facts about the bundle

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    @cached_property
    def version(self) -> dict[str, Any]:
        """What identifies the bundle: when it was made, from which data, and its promotion tag."""
        meta = self.bundle.meta
        md5 = (meta.get("data_version") or {}).get("md5")
        tag = None
        record = Path(self.bundle.root) / PRODUCTION_RECORD
        if record.is_file():
            try:
                tag = json.loads(record.read_text(encoding="utf-8")).get("git_tag")
            except (OSError, ValueError):
                tag = None
        label = f"{meta.get('created', '?')}, data {md5[:8] if md5 else 'unknown'}"
        if tag:
            label += f", {tag}"
        return {"created": meta.get("created"), "data_version": md5, "tag": tag, "label": label}

    def decode_spec(self, *, explain: bool = False) -> DecodeSpec:
        return DecodeSpec(
            image_size=self.bundle.image_size,
            aspect=self.bundle.aspect,
            draft_gap=self.draft_gap,
            max_pixels=self.max_pixels,
            display_size=DISPLAY_SIZE if explain else 0,
        )

    # ------------------------------------------------------------------ the core

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``[N, C]`` of uint8 model inputs ``[N, S, S, 3]``."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        keys = [hashlib.blake2b(p.tobytes(), digest_size=16).digest() for p in pixels]
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
                _emb, probs = self.bundle.predict(pixels[first])
                for (k, rows), p in zip(todo.items(), np.asarray(probs, dtype=np.float64), strict=True):
                    out[rows] = p
                    if self.cache_size > 0:
                        self._cache[k] = p
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def heatmaps(self, pixels: np.ndarray, class_index: np.ndarray) -> np.ndarray:
        """Grad-CAM maps ``[N, h, w]`` of the best member for ``class_index``."""
        from serve.gradcam import GradCam

        best = next(m for m in self.bundle.members if m.name == self.bundle.best)
        with self._lock:
            if self._gradcam is None:
                self._gradcam = GradCam(self._best_model)
            # The bundle's own input convention (image-only: unknown metadata for a fusion member).
            inputs = self.bundle.model_inputs(np.ascontiguousarray(pixels, dtype=np.uint8), best.takes_meta)
            return self._gradcam.heatmaps(inputs, class_index)

    def read(self, name: str, probs: np.ndarray) -> Prediction:
        """A :class:`Prediction` from one row of calibrated probabilities."""
        probabilities = {c: float(p) for c, p in zip(self.classes, probs, strict=True)}
        malignant = float(self.bundle.malignant_score(probs[None, :])[0])
        top = self.classes[int(self.bundle.decide(probs[None, :])[0])]
        return Prediction(
            image=name,
            probabilities=probabilities,
            malignant_prob=malignant,
            refer=bool(malignant >= self.threshold),
            risk=self.risk.level(top),
            predicted=top,
        )

    def predict_decoded(
        self, names: Sequence[str], decoded: Sequence[Decoded], *, explain: bool = False
    ) -> list[Prediction]:
        """Predictions for already decoded images (one model call), with overlays if ``explain``."""
        if not decoded:
            return []
        from serve.gradcam import overlay

        pixels = np.stack([d.pixels for d in decoded])
        probs = self.probabilities(pixels)
        out = [self.read(n, p) for n, p in zip(names, probs, strict=True)]
        if explain:
            heat = self.heatmaps(pixels, self.bundle.decide(probs))
            for pred, d, h in zip(out, decoded, heat, strict=True):
                pred.gradcam_empty = not bool(h.max() > 0)
                if d.display is not None:
                    pred.overlay = overlay(d.display, h)
        return out

    def predict_paths(
        self,
        items: Iterable[tuple[str, str, str | None]],
        *,
        batch_size: int = 32,
        workers: int = 1,
        explain: bool = False,
        progress: bool = True,
        total: int | None = None,
    ) -> Iterator[Prediction]:
        """Stream predictions for ``(name, path, known error or None)`` items, in input order.

        Decoding runs on ``workers`` processes (a bounded window of chunks in flight), the model
        here on batches of ``batch_size``: memory stays flat in the number of images. A bad file
        becomes a :class:`Prediction` with ``error`` set, never an exception.
        """
        spec = self.decode_spec(explain=explain)
        workers = max(1, workers)
        chunk = 8 if workers > 1 else batch_size
        names: list[str] = []

        def tasks() -> Iterator[tuple[int, tuple[Any, ...]]]:
            part: list[tuple[int, str, str | None]] = []
            for name, path, known in items:
                names.append(name)
                part.append((len(names) - 1, path, known))
                if len(part) >= chunk:
                    yield part[0][0], (part, spec)
                    part = []
            if part:
                yield part[0][0], (part, spec)

        buffer: list[tuple[int, Decoded | None, str | None]] = []

        def flush() -> list[Prediction]:
            good = [(i, d) for i, d, _ in buffer if d is not None]
            preds = self.predict_decoded([names[i] for i, _ in good], [d for _, d in good], explain=explain)
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


def _run_as_graphs(bundle: Any) -> None:
    """Make the bundle's members and embedder run as traced graphs (``tf.function``), in place.

    Called eagerly, a Keras model runs its layers one by one from Python: one image through the
    demo's two members (MobileNetV2 + the custom CNN at 64 px) took 277 ms here, 13 ms as a graph,
    with identical probabilities (measured max difference 0). ``reduce_retracing``: one trace per
    batch shape at first, then one for any batch size. :meth:`Bundle.predict` calls them as before.
    """
    members = getattr(bundle, "members", None)
    if not members:
        return
    import tensorflow as tf

    def graph(model: Any) -> Any:
        if isinstance(model, tf.types.experimental.GenericFunction):  # a second Predictor of the bundle
            return model
        return tf.function(model, reduce_retracing=True)

    for m in members:
        m.model = graph(m.model)
    bundle.embedder = graph(bundle.embedder)


def pick_workers(requested: int, n_items: int, batch_size: int) -> int:
    """Decode processes: one when the images fit in a batch or two (a pool costs ~0.5 s to start)."""
    if n_items <= 2 * batch_size:
        return 1
    return n_workers(requested)
