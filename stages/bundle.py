"""Reading and running the model bundle that ``calibrate`` writes (``models/ensemble/``).

A bundle is ``bundle.json`` (members, weights, temperature, malignant threshold, classes, input
size, params) plus one ``members/<name>/model.keras`` per member. :class:`Bundle` loads it once
(each member with ``safe_mode=True``, its md5 checked against ``bundle.json``) and applies the
recipe the bundle states: ``p = sum_m w_m model_m(x)``; ``calibrated = softmax(log p / T)``;
``malignant = P(mel) + P(bcc) + P(akiec) >= threshold``. It also gives the *embedding* of the
best member (the highest weight): the input of its final softmax layer, the vector a drift check
compares between batches.

Everything that uses a trained bundle (the drift check, the reference stored with the bundle,
prediction) goes through here, so none of them can apply the recipe differently.
TensorFlow is imported when a bundle is loaded, not at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import CLASSES, LOCALIZATIONS, SEXES, StageError, n_workers
from stages.metadata import read_table
from stages.metrics import apply_calibration, balanced_decision, malignant_score

log = logging.getLogger(__name__)

BUNDLE_JSON = "bundle.json"
# The drift reference table ``calibrate`` stores in the bundle (features + embeddings of the
# training split) and its description in bundle.json.
REFERENCE_FILE = "drift_reference.parquet"
REFERENCE_KEY = "drift_reference"


def read_bundle_json(bundle_dir: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle folder; a clear error when it is missing or unreadable."""
    path = Path(bundle_dir) / BUNDLE_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(
            f"{path}: not found; is {bundle_dir} a model bundle? (run `dvc repro calibrate`)"
        ) from None
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable bundle description ({e})") from None
    for key in ("classes", "members", "temperature", "threshold", "image_size"):
        if key not in meta:
            raise StageError(f"{path}: missing key {key!r}; the bundle is incomplete or from another tool")
    for key in ("class_bias", "class_prior"):
        v = meta.get(key)
        if v is None:
            continue
        ok = isinstance(v, list) and len(v) == len(meta["classes"])
        ok = ok and all(isinstance(x, int | float) and math.isfinite(x) for x in v)
        if not ok or (key == "class_prior" and min(v) <= 0):
            raise StageError(
                f"{path}: {key!r} must be {len(meta['classes'])} finite numbers (one per class"
                f"{', all > 0' if key == 'class_prior' else ''}), got {v!r:.200}"
            )
    return meta


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Member:
    name: str
    weight: float
    model: Any  # keras.Model
    takes_meta: bool


@dataclass
class Bundle:
    """A loaded bundle: call :meth:`predict` on uint8 images ``[N, S, S, 3]``."""

    root: Path
    meta: dict[str, Any]
    members: list[Member]
    embedder: Any  # keras.Model: inputs -> (penultimate features, probabilities) of the best member
    best: str
    tta: bool = False
    classes: Sequence[str] = field(default_factory=lambda: list(CLASSES))

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def aspect(self) -> str:
        return str(self.meta.get("aspect") or "crop")

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def class_bias(self) -> list[float] | None:
        """Per-class logit bias after the temperature (None: temperature only, older bundles)."""
        bias = self.meta.get("class_bias")
        return [float(v) for v in bias] if bias is not None else None

    @property
    def class_prior(self) -> list[float] | None:
        """The balanced decision's class prior (None: the predicted class is the argmax)."""
        prior = self.meta.get("class_prior") if self.meta.get("decision") == "balanced" else None
        return [float(v) for v in prior] if prior is not None else None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class indices of calibrated probabilities ``[N, K]`` (bundle.json "decision")."""
        return balanced_decision(probs, self.class_prior)

    @classmethod
    def load(cls, bundle_dir: str | Path, *, check_md5: bool = True) -> Bundle:
        """Load every member once (``safe_mode=True``); md5 mismatches are refused by name."""
        root = Path(bundle_dir)
        meta = read_bundle_json(root)
        from stages.models import load_model  # TensorFlow from here on

        members: list[Member] = []
        for m in meta["members"]:
            if float(m["weight"]) <= 0.0:
                # A member the ensemble gave no weight changes no prediction: not worth loading.
                log.info("bundle %s: member %s has weight 0, not loaded", root, m["name"])
                continue
            path = root / m["path"]
            if not path.is_file():
                raise StageError(f"{path}: member {m['name']!r} listed in {root / BUNDLE_JSON} is missing")
            if check_md5 and m.get("md5") and file_md5(path) != m["md5"]:
                raise StageError(f"{path}: md5 differs from {root / BUNDLE_JSON}: file changed or damaged")
            try:
                model = load_model(path)
            except Exception as e:  # a Lambda layer (refused by safe mode), a truncated file ...
                raise StageError(f"{path}: cannot load member {m['name']!r}: {type(e).__name__}: {e}") from e
            takes_meta = len(model.inputs) > 1
            members.append(Member(m["name"], float(m["weight"]), model, takes_meta))
        if not members:
            raise StageError(f"{root / BUNDLE_JSON}: the bundle has no members")
        best = max(members, key=lambda m: m.weight)  # first of equals: the file's order
        embedder = _embedding_model(best.model)
        tta = bool(meta.get("params", {}).get("evaluate", {}).get("tta", False))
        log.info(
            "bundle %s: members %s, embedding from %s (%d dims)",
            root, ", ".join(f"{m.name} ({m.weight:.2f})" for m in members), best.name,
            int(embedder.outputs[0].shape[-1]),
        )  # fmt: skip
        return cls(root, meta, members, embedder, best.name, tta, list(meta["classes"]))

    def model_inputs(self, images: np.ndarray, takes_meta: bool) -> Any:
        """What a member is called with: the images, plus unknown metadata for a fusion member."""
        if not takes_meta:
            return images
        # Drift checks and reference both run image-only: unknown metadata for a fusion member
        # (NaN age, "unknown" sex and site), so the two are always compared like with like.
        n = len(images)
        return {
            "image": images,
            "age": np.full(n, np.nan, dtype=np.float32),
            "sex": np.full(n, SEXES.index("unknown"), dtype=np.int32),
            "localization": np.full(n, LOCALIZATIONS.index("unknown"), dtype=np.int32),
        }

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings of the best member, calibrated probabilities)`` of uint8 images."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        views = [images]
        if self.tta:
            views += [images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
        emb = None
        mixed = np.zeros((len(images), len(self.classes)), dtype=np.float64)
        for m in self.members:
            probs = np.zeros_like(mixed)
            for k, v in enumerate(views):
                x = self.model_inputs(np.ascontiguousarray(v), m.takes_meta)
                if m.name == self.best and k == 0:
                    feats, p = self.embedder(x, training=False)
                    emb = np.asarray(feats, dtype=np.float32)
                else:
                    p = m.model(x, training=False)
                probs += np.asarray(p, dtype=np.float64)
            mixed += m.weight * probs / len(views)
        calibrated = apply_calibration(np.log(np.clip(mixed, 1e-12, 1.0)), self.temperature, self.class_bias)
        assert emb is not None
        return emb, calibrated

    def malignant_score(self, probs: np.ndarray) -> np.ndarray:
        return malignant_score(probs, list(self.classes))


def _embedding_model(model: Any) -> Any:
    """``inputs -> (input of the final softmax layer, output)``: one pass gives both."""
    import keras

    try:
        head = model.get_layer("probs")
    except ValueError:
        head = model.layers[-1]
    # model.input (not .inputs): the same input structure as the model, a tensor or a dict.
    return keras.Model(model.input, [head.input, model.output], name=f"{model.name}_embedder")


# --------------------------------------------------------------------------- drift reference


def write_drift_reference(
    bundle_dir: Path,
    *,
    raw_dir: Path,
    split_csv: Path,
    split: str,
    max_images: int,
    stats_size: int,
    max_pixels: int,
    draft_gap: float,
    seed: int,
    workers: int,
) -> dict[str, Any]:
    """Write the drift reference into a bundle folder and return its ``bundle.json`` entry.

    The table is what a drift check computes for new images (:mod:`stages.imagefeatures`), for a
    seeded sample of the ``split`` images, with this bundle's own members: a later check needs
    only the bundle and the new images, never the training data.
    """
    import pandas as pd

    from stages.imagefeatures import FeatureSpec, build_table

    try:
        rows = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise StageError(f"{split_csv}: not found; run the split and validate stages first") from None
    missing = {"image_id", "split"} - set(rows.columns)
    if missing:
        raise StageError(f"{split_csv}: missing column(s) {sorted(missing)}")
    ids = sorted(rows.loc[rows["split"] == split, "image_id"])
    if not ids:
        raise StageError(f"{split_csv}: no {split!r} rows to build the drift reference from")
    if len(ids) > max_images:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=max_images, replace=False).tolist())
    bundle = Bundle.load(bundle_dir)
    spec = FeatureSpec(bundle.image_size, bundle.aspect, stats_size, draft_gap, max_pixels)
    items = [(i, Path(raw_dir) / "images" / f"{i}.jpg") for i in ids]
    table = build_table(items, spec, bundle, workers=n_workers(workers), desc="drift reference")
    if table.unreadable:
        name, why = table.unreadable[0]
        raise StageError(
            f"drift reference: {len(table.unreadable)} {split} image(s) unreadable, e.g. {name}: {why} "
            "(the validate stage should have stopped them)"
        )
    df = table.with_embeddings()
    # The training rows' metadata, for comparing a labelled batch's population (age, sex, site).
    try:
        meta = read_table(Path(raw_dir) / "metadata.csv", required=("image_id", "age", "sex", "localization"),
                          unique="image_id")  # fmt: skip
        meta = meta.set_index("image_id").reindex(df["name"])
        df.insert(1, "age", pd.to_numeric(meta["age"].to_numpy(), errors="coerce"))
        for col in ("sex", "localization"):
            values = pd.Series(meta[col].to_numpy()).replace("", "unknown").fillna("unknown")
            df.insert(2, col, values.to_numpy())
    except (OSError, KeyError, StageError) as e:
        log.warning("drift reference: no metadata columns (%s); labelled batches compare images only", e)
    df.to_parquet(Path(bundle_dir) / REFERENCE_FILE, index=False)
    entry = {
        "path": REFERENCE_FILE,
        "split": split,
        "n_images": len(df),
        "embedding_member": bundle.best,
        "embedding_dim": int(table.embeddings.shape[1]),
        "feature_spec": {
            "image_size": spec.image_size,
            "aspect": spec.aspect,
            "stats_size": spec.stats_size,
            "draft_gap": spec.draft_gap,
        },
    }
    log.info(
        "drift reference: %d %s images, %d-dim embedding of %s",
        len(df), split, entry["embedding_dim"], bundle.best,
    )  # fmt: skip
    return entry


def read_drift_reference(bundle_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The reference table (features, model columns, ``emb_*``) and its ``bundle.json`` entry."""
    import pandas as pd

    meta = read_bundle_json(bundle_dir)
    entry = meta.get(REFERENCE_KEY)
    path = Path(bundle_dir) / (entry or {}).get("path", REFERENCE_FILE)
    if not entry or not path.is_file():
        raise StageError(
            f"{bundle_dir}: this bundle has no drift reference ({path.name}); it was made before drift "
            "checks existed: rebuild it with `dvc repro calibrate`"
        )
    return pd.read_parquet(path), entry
