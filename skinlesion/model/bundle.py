"""Loading and running the model bundle that ``calibrate`` writes (``models/ensemble/``).

:class:`Bundle` loads a bundle once (``bundle.json`` read and checked by
:mod:`skinlesion.model.bundle_json`; each member with ``safe_mode=True``, its md5 checked against
``bundle.json``) and applies the recipe of :mod:`skinlesion.measure.scoring`:
``p = sum_m w_m model_m(x, metadata of the row's mode)``; ``calibrated = softmax(log p / T + b)``
with the row's mode's operating point; ``malignant = P(mel) + P(bcc) + P(akiec) >= threshold``
of that mode. It also gives the *embedding* of the best member (the highest weight): the input of
its final softmax layer, the vector a drift check compares between batches.

Everything that uses a trained bundle (the drift check, the reference stored with the bundle,
prediction, calibrate's served report) goes through here, so none of them can apply the recipe
differently. TensorFlow is imported when a bundle is loaded, not at import time.

The bundle's files have their own modules: ``bundle.json`` :mod:`skinlesion.model.bundle_json`,
``seen.json`` :mod:`skinlesion.model.seen`, the drift reference
:mod:`skinlesion.model.drift_reference`, assembling a new bundle :mod:`skinlesion.model.bundle_write`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import malignant_score
from skinlesion.measure.predictions import Served
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    MODES,
    MetaArrays,
    OperatingPoint,
    calibrated,
    decisions,
    malignant_flags,
    member_probabilities,
    mix,
    mode_inputs,
    model_inputs,
    row_modes,
)
from skinlesion.model.bundle_json import (
    BUNDLE_JSON,
    file_md5,
    read_bundle_json,
)

log = logging.getLogger(__name__)


@dataclass
class Member:
    name: str
    weight: float
    model: Any  # keras.Model (Grad-CAM needs its layers)
    takes_meta: bool
    call: Any = (
        None  # the same model as a graph: inputs -> probabilities (skinlesion.model.networks.as_graph)
    )


@dataclass
class Scored:
    """What the bundle says about a batch: one row per image."""

    probs: np.ndarray  # calibrated probabilities [N, K], float64
    modes: np.ndarray  # the input mode each row was scored in (skinlesion.measure.scoring.MODES)
    # float32 [N, D]: the best member's penultimate features of the first view, as fed (drift
    # scores image-only, so its reference and its batches are compared like with like)
    embeddings: np.ndarray


@dataclass
class Bundle:
    """A loaded bundle: :meth:`score` uint8 images ``[N, S, S, 3]`` (and their metadata)."""

    root: Path
    meta: dict[str, Any]
    members: list[Member]
    embedder: Any  # graph: inputs -> (penultimate features, probabilities) of the best member
    best: str
    tta: bool = False
    classes: Sequence[str] = field(default_factory=lambda: list(CLASSES))
    batch_size: int = 64  # rows per model call (evaluate.batch_size, as the stages score)

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def aspect(self) -> str:
        return str(self.meta.get("aspect") or "crop")

    @cached_property
    def points(self) -> dict[str, OperatingPoint]:
        """The operating point of each input mode this bundle has (``image_only`` always), parsed
        once: every scored row reads it."""
        n = len(self.classes)
        where = str(self.root / BUNDLE_JSON)
        return {
            m: OperatingPoint.from_json(p, n, f"{where}: {m}")
            for m, p in self.meta["operating_points"].items()
        }

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m for m in MODES if m in self.meta["operating_points"])

    def threshold(self, mode: str = IMAGE_ONLY) -> float:
        return self.points[mode].threshold

    def decide(self, probs: np.ndarray, modes: np.ndarray | None = None) -> np.ndarray:
        """Predicted class indices of calibrated probabilities ``[N, K]`` (each row by its mode)."""
        modes = np.full(len(probs), IMAGE_ONLY, dtype=object) if modes is None else modes
        return decisions(probs, modes, self.points)

    @classmethod
    def load(cls, bundle_dir: str | Path, *, check_md5: bool = True) -> Bundle:
        """Load every member once (``safe_mode=True``); md5 mismatches are refused by name."""
        root = Path(bundle_dir)
        meta = read_bundle_json(root)
        from skinlesion.model.networks import as_graph, load_model  # TensorFlow from here on

        members: list[Member] = []
        for m in meta["members"]:
            if float(m["weight"]) <= 0.0:
                # A member the ensemble gave no weight changes no prediction: not worth loading.
                log.info("bundle %s: member %s has weight 0, not loaded", root, m["name"])
                continue
            path = root / m["path"]  # inside the folder: read_bundle_json checked it
            if not path.is_file():
                raise StageError(f"{path}: member {m['name']!r} listed in {root / BUNDLE_JSON} is missing")
            if check_md5 and m.get("md5") and file_md5(path) != m["md5"]:
                raise StageError(f"{path}: md5 differs from {root / BUNDLE_JSON}: file changed or damaged")
            try:
                model = load_model(path)
            except Exception as e:  # a Lambda layer (refused by safe mode), a truncated file ...
                raise StageError(f"{path}: cannot load member {m['name']!r}: {type(e).__name__}: {e}") from e
            takes_meta = len(model.inputs) > 1
            members.append(Member(m["name"], float(m["weight"]), model, takes_meta, as_graph(model)))
        if not members:
            raise StageError(f"{root / BUNDLE_JSON}: the bundle has no members")
        if METADATA in meta["operating_points"] and not any(m.takes_meta for m in members):
            raise StageError(
                f"{root / BUNDLE_JSON}: a {METADATA!r} operating point but no member takes metadata"
            )
        best = max(members, key=lambda m: m.weight)  # first of equals: the file's order
        embedder = as_graph(_embedding_model(best.model))
        evaluate = meta.get("params", {}).get("evaluate", {})
        tta = bool(evaluate.get("tta", False))
        batch_size = int(evaluate.get("batch_size", 64) or 64)
        log.info(
            "bundle %s: members %s, modes %s, embedding from %s (%d dims)",
            root, ", ".join(f"{m.name} ({m.weight:.2f})" for m in members),
            "/".join(m for m in MODES if m in meta["operating_points"]), best.name,
            int(_embedding_dim(best.model)),
        )  # fmt: skip
        return cls(root, meta, members, embedder, best.name, tta, list(meta["classes"]), batch_size)

    def model_inputs(self, images: np.ndarray, takes_meta: bool, meta: MetaArrays | None = None) -> Any:
        """What a member is called with (``meta`` None: every field unknown)."""
        return model_inputs(images, meta, takes_meta)

    def row_modes(self, n: int, meta: MetaArrays | None) -> np.ndarray:
        return row_modes(meta, n, self.modes)

    def score(self, images: np.ndarray, meta: MetaArrays | None = None) -> Scored:
        """The bundle's answer for uint8 images and (optionally) their metadata.

        The recipe in :mod:`skinlesion.measure.scoring`: each row's mode by the rule; each member scored
        with what that mode feeds it; mixed with the weights; calibrated with the row's mode's
        operating point.
        """
        images = np.ascontiguousarray(images, dtype=np.uint8)
        n = len(images)
        modes = self.row_modes(n, meta)
        fed = mode_inputs(meta, modes)
        feats: list[np.ndarray] = []
        per_member = []
        for m in self.members:
            hook = None
            model = m.call

            if m.name == self.best:
                model = self.embedder

                def hook(k: int, _x: Any, out: Any) -> Any:
                    f, p = out
                    if k == 0:
                        feats.append(np.asarray(f, dtype=np.float32))
                    return p

            per_member.append(
                member_probabilities(
                    model, images, fed,
                    takes_meta=m.takes_meta, tta=self.tta, batch_size=self.batch_size, on_view=hook,
                )
            )  # fmt: skip
        mixed = mix(per_member, [m.weight for m in self.members])
        probs = calibrated(mixed, modes, self.points)
        emb = np.concatenate(feats) if feats else np.zeros((n, 0), dtype=np.float32)
        return Scored(probs, modes, emb)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings of the best member, calibrated probabilities)`` of images, image-only."""
        s = self.score(images)
        return s.embeddings, s.probs

    def malignant_score(self, probs: np.ndarray) -> np.ndarray:
        return malignant_score(probs, list(self.classes))


def _embedding_dim(model: Any) -> int:
    try:
        head = model.get_layer("probs")
    except ValueError:
        head = model.layers[-1]
    return int(head.input.shape[-1])


def _embedding_model(model: Any) -> Any:
    """``inputs -> (input of the final softmax layer, output)``: one pass gives both."""
    import keras

    try:
        head = model.get_layer("probs")
    except ValueError:
        head = model.layers[-1]
    # model.input (not .inputs): the same input structure as the model, a tensor or a dict.
    return keras.Model(model.input, [head.input, model.output], name=f"{model.name}_embedder")


def served_predictions(bundle: Bundle, arrays: Any, mode: str) -> Served:
    """The bundle's answers for a prepared split (:func:`skinlesion.model.tfdata.read_split_numpy`)
    in ``mode``: exactly what ``serve`` computes for those image files (with their metadata in
    the ``metadata`` mode)."""
    meta = MetaArrays(arrays.age, arrays.sex, arrays.localization) if mode == METADATA else None
    out = bundle.score(arrays.images, meta)
    score, thr = malignant_flags(out.probs, out.modes, bundle.points, bundle.classes)
    return Served(out.probs, out.modes, score, thr, bundle.decide(out.probs, out.modes))
