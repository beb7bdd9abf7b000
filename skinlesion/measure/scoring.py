"""The one scoring path: images (and their metadata) in, the bundle's calibrated probabilities out.

Every number the project reports about a model and every answer it serves come from these
functions: ``evaluate`` scores a member with :func:`member_probabilities`, ``ensemble`` mixes
members with :func:`mix`, ``calibrate`` fits an :class:`OperatingPoint` per input mode, and
:class:`skinlesion.model.bundle.Bundle` (used by ``serve.predict``, the web app, ``serve.evaluate`` and
drift) chains the same three. A parity test holds ``serve.predict`` on the test split's files
to the probabilities ``calibrate`` reports.

**Input modes.** A bundle whose members fuse metadata (age, sex, localization) has two
operating points, ``metadata`` and ``image_only``, each with its own temperature, class bias,
decision prior and malignant threshold fitted on validation data scored in that mode. The rule
(:func:`row_modes`): a row uses ``metadata`` only when all three fields are known; a row with
any field unknown is scored as ``image_only`` (the known fields are not used), because that is
the input the image-only operating point was calibrated on: partly known metadata has no
calibrated operating point of its own. A bundle without fusion members has ``image_only`` only.

No TensorFlow here: a model is any callable ``inputs -> probabilities``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.schema import LOCALIZATIONS, SEXES
from skinlesion.measure.metrics import apply_calibration, balanced_decision, malignant_score

METADATA = "metadata"
IMAGE_ONLY = "image_only"
MODES: tuple[str, ...] = (METADATA, IMAGE_ONLY)
# A fusion bundle's metric files hold every key twice: as is (the metadata mode) and with this
# suffix (image only); see :func:`mode_suffix`.
IMAGE_ONLY_SUFFIX = f"_{IMAGE_ONLY}"
# The columns a prediction table may give per image, in HAM10000's vocabulary.
META_FIELDS: tuple[str, ...] = ("age", "sex", "localization")
AGE_RANGE = (0.0, 120.0)
MODE_RULE = (
    "metadata when age, sex and localization are all known (and the bundle fuses metadata); "
    "otherwise image_only, with every field fed as unknown"
)
UNKNOWN_SEX = SEXES.index("unknown")
UNKNOWN_LOCALIZATION = LOCALIZATIONS.index("unknown")


# --------------------------------------------------------------------------- metadata input


@dataclass(frozen=True)
class MetaArrays:
    """Per-image metadata as the fusion members take it: NaN age / "unknown" index = unknown."""

    age: np.ndarray  # float32 [N]
    sex: np.ndarray  # int32 [N], index into SEXES
    localization: np.ndarray  # int32 [N], index into LOCALIZATIONS

    def __len__(self) -> int:
        return len(self.age)

    @classmethod
    def unknown(cls, n: int) -> MetaArrays:
        return cls(
            np.full(n, np.nan, dtype=np.float32),
            np.full(n, UNKNOWN_SEX, dtype=np.int32),
            np.full(n, UNKNOWN_LOCALIZATION, dtype=np.int32),
        )

    @classmethod
    def of(cls, rows: Sequence[tuple[float, int, int]]) -> MetaArrays:
        if not rows:
            return cls.unknown(0)
        age, sex, loc = zip(*rows, strict=True)
        return cls(np.asarray(age, np.float32), np.asarray(sex, np.int32), np.asarray(loc, np.int32))

    def complete(self) -> np.ndarray:
        """Rows whose three fields are all known."""
        return np.isfinite(self.age) & (self.sex != UNKNOWN_SEX) & (self.localization != UNKNOWN_LOCALIZATION)

    def take(self, idx: Any) -> MetaArrays:
        return MetaArrays(self.age[idx], self.sex[idx], self.localization[idx])


def parse_metadata(age: str | None, sex: str | None, localization: str | None) -> tuple[float, int, int]:
    """One image's metadata from text (HAM10000 vocabulary); empty or "unknown" = unknown.

    Raises :class:`StageError` naming the column and the value, e.g. ``sex 'robot' is not one of
    [...]``, so a caller can put it on that image's row.
    """
    a = (age or "").strip()
    if a.lower() in ("", "unknown", "nan", "na", "n/a"):  # "NA": Dataverse's .tab
        age_v = math.nan
    else:
        try:
            age_v = float(a)
        except ValueError:
            raise StageError(f"age {a!r} is not a number (years, or empty when unknown)") from None
        if not (AGE_RANGE[0] <= age_v <= AGE_RANGE[1]):
            raise StageError(f"age {a!r} is outside {AGE_RANGE[0]:g}..{AGE_RANGE[1]:g} years")
    out = [age_v]
    for name, value, vocab in (("sex", sex, SEXES), ("localization", localization, LOCALIZATIONS)):
        v = (value or "").strip().lower() or "unknown"
        if v not in vocab:
            raise StageError(f"{name} {value!r} is not one of {list(vocab)}")
        out.append(vocab.index(v))
    return out[0], int(out[1]), int(out[2])


def row_modes(meta: MetaArrays | None, n: int, modes: Sequence[str]) -> np.ndarray:
    """The mode each row is scored in (see the module doc for the rule)."""
    out = np.full(n, IMAGE_ONLY, dtype=object)
    if meta is not None and METADATA in modes:
        out[meta.complete()] = METADATA
    return out


# --------------------------------------------------------------------------- the recipe


# The temperatures a bundle may hold. calibrate fits T in [0.05, 20]; below ~1e-307 log p / T
# overflows to -inf and the softmax is NaN, and anything under 0.001 is already a hard arg-max,
# so the floor refuses a damaged value long before it could give NaN probabilities.
TEMPERATURE_RANGE = (0.001, 1000.0)


@dataclass(frozen=True)
class OperatingPoint:
    """What calibrate fits on validation data for one input mode (bundle.json ``operating_points``)."""

    temperature: float
    threshold: float
    class_bias: tuple[float, ...] | None = None  # per-class logit bias after the temperature
    class_prior: tuple[float, ...] | None = None  # the balanced decision's prior (None: argmax)

    def calibrate(self, mixed: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of mixed (ensemble) probabilities ``[N, K]``."""
        return apply_calibration(log_probs(mixed), self.temperature, self.class_bias)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return balanced_decision(probs, self.class_prior)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("class_bias", "class_prior"):
            d[k] = list(d[k]) if d[k] is not None else None
        d["decision"] = "balanced" if self.class_prior is not None else "argmax"
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], n_classes: int, where: str) -> OperatingPoint:
        """Checked: a value that is not a usable number is refused by name, never served."""

        def number(key: str, lo: float, hi: float) -> float:
            v = d.get(key)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not (ok and lo <= v <= hi):
                raise StageError(f"{where}: {key!r} must be a number in [{lo:g}, {hi:g}], got {v!r:.100}")
            return float(v)

        def vector(key: str, positive: bool) -> tuple[float, ...] | None:
            v = d.get(key)
            if v is None:
                return None
            ok = isinstance(v, list) and len(v) == n_classes
            ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            ok = ok and all(math.isfinite(x) for x in v)
            if not ok or (positive and min(v) <= 0):
                raise StageError(
                    f"{where}: {key!r} must be {n_classes} finite numbers (one per class"
                    f"{', all > 0' if positive else ''}), got {v!r:.200}"
                )
            return tuple(float(x) for x in v)

        decision = d.get("decision") or "argmax"  # absent (format 1): argmax
        if decision not in ("argmax", "balanced"):
            raise StageError(f"{where}: 'decision' must be 'argmax' or 'balanced', got {decision!r:.50}")
        prior = vector("class_prior", True)  # checked even when unused: a damaged file is refused
        if decision == "balanced" and prior is None:
            raise StageError(
                f"{where}: 'class_prior' is needed by the balanced decision ({n_classes} numbers > 0)"
            )
        return cls(
            temperature=number("temperature", *TEMPERATURE_RANGE),
            # closed: recall_first_threshold may return a score itself, and a score can be 0 or 1
            # (refer everyone / only the certain); beyond them no row is ever (or always) referred
            threshold=number("threshold", 0.0, 1.0),
            class_bias=vector("class_bias", False),
            class_prior=prior if decision == "balanced" else None,
        )


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p, clipped: the "logits" calibration works on (averaged members have no pre-softmax)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def tta_views(images: np.ndarray, tta: bool) -> list[np.ndarray]:
    """The image views a member is averaged over: the image, and its 3 flips with ``tta``."""
    views = [images]
    if tta:
        views += [images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    return [np.ascontiguousarray(v) for v in views]


def model_inputs(images: np.ndarray, meta: MetaArrays | None, takes_meta: bool) -> Any:
    """What a member is called with: the images, plus the metadata for a fusion member."""
    if not takes_meta:
        return images
    meta = meta if meta is not None else MetaArrays.unknown(len(images))
    return {"image": images, "age": meta.age, "sex": meta.sex, "localization": meta.localization}


def member_probabilities(
    model: Callable[[Any], Any],
    images: np.ndarray,
    meta: MetaArrays | None,
    *,
    takes_meta: bool,
    tta: bool,
    batch_size: int,
    on_view: Callable[[int, Any, Any], Any] | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """One member's probabilities ``[N, K]`` (float64): the mean over the TTA views.

    ``meta`` is what the member is given (``None``: every field unknown); the caller has applied
    :func:`row_modes` already. The model is called on consecutive chunks of ``batch_size`` rows.
    ``on_view(k, inputs, outputs)`` sees each call and returns the probabilities (the bundle
    takes its embedding there). ``progress``: a progress bar's label (None: no bar).
    """
    from tqdm import tqdm

    images = np.ascontiguousarray(images, dtype=np.uint8)
    n = len(images)
    views = tta_views(images, tta)
    starts = range(0, n, max(1, batch_size))
    bar = tqdm(total=len(views) * n, desc=progress, unit="img", leave=False, disable=progress is None)
    total = None
    for k, view in enumerate(views):
        parts = []
        for start in starts:
            sl = slice(start, start + batch_size)
            x = model_inputs(view[sl], meta.take(sl) if meta is not None else None, takes_meta)
            out = model(x)
            if on_view is not None:
                out = on_view(k, x, out)
            parts.append(np.asarray(out, dtype=np.float64))
            bar.update(len(parts[-1]))
        p = np.concatenate(parts) if parts else np.zeros((0, 0))
        total = p if total is None else total + p
    bar.close()
    assert total is not None
    return total / len(views)


def mode_inputs(meta: MetaArrays | None, modes: np.ndarray) -> MetaArrays | None:
    """The metadata rows of ``modes == metadata`` kept, every other row all unknown."""
    if meta is None:
        return None
    keep = modes == METADATA
    if keep.all():
        return meta
    out = MetaArrays.unknown(len(meta))
    for a, b in ((out.age, meta.age), (out.sex, meta.sex), (out.localization, meta.localization)):
        a[keep] = b[keep]
    return out


def mix(member_probs: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``sum_m w_m * probs_m``: the ensemble before calibration."""
    stacked = np.asarray(member_probs, dtype=np.float64)
    return np.tensordot(np.asarray(weights, dtype=np.float64), stacked, axes=1)


def calibrated(mixed: np.ndarray, modes: np.ndarray, points: dict[str, OperatingPoint]) -> np.ndarray:
    """Each row calibrated with its mode's operating point."""
    out = np.empty_like(np.asarray(mixed, dtype=np.float64))
    for mode in np.unique(modes):
        rows = modes == mode
        out[rows] = points[str(mode)].calibrate(mixed[rows])
    return out


def malignant_flags(
    probs: np.ndarray, modes: np.ndarray, points: dict[str, OperatingPoint], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(malignant score, threshold of the row's mode)`` per row; refer = score >= threshold."""
    score = malignant_score(probs, classes)
    thr = np.array([points[str(m)].threshold for m in modes], dtype=np.float64)
    return score, thr


def decisions(probs: np.ndarray, modes: np.ndarray, points: dict[str, OperatingPoint]) -> np.ndarray:
    """The predicted class index of each row, by its mode's decision rule."""
    out = np.empty(len(probs), dtype=np.int64)
    for mode in np.unique(modes):
        rows = modes == mode
        out[rows] = points[str(mode)].decide(probs[rows])
    return out


def mode_suffix(mode: str, modes: Sequence[str]) -> str:
    """The suffix of a mode's metric keys and prediction files: none for the first (or only)
    mode of ``modes``, ``_image_only`` for the image-only numbers beside the metadata ones."""
    return "" if mode == modes[0] else IMAGE_ONLY_SUFFIX if mode == IMAGE_ONLY else f"_{mode}"
