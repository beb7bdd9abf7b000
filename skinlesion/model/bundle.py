"""Reading and running the model bundle that ``calibrate`` writes (``models/ensemble/``).

A bundle is ``bundle.json`` (members, weights, one operating point per input mode: temperature,
class bias, decision prior and malignant threshold; classes, input size, params) plus one
``members/<name>/model.keras`` per member. This module owns that format (``format_version``
checked on read). :class:`Bundle` loads it once (each member with ``safe_mode=True``, its md5
checked against ``bundle.json``) and applies the recipe of :mod:`skinlesion.measure.scoring`:
``p = sum_m w_m model_m(x, metadata of the row's mode)``; ``calibrated = softmax(log p / T + b)``
with the row's mode's operating point; ``malignant = P(mel) + P(bcc) + P(akiec) >= threshold``
of that mode. It also gives the *embedding* of the
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import StageError
from skinlesion.core.images import DEFAULT_MAX_PIXELS
from skinlesion.core.parallel import n_workers
from skinlesion.core.schema import CLASSES
from skinlesion.core.tables import read_table
from skinlesion.measure.metrics import malignant_score
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    MODES,
    MetaArrays,
    OperatingPoint,
    calibrated,
    decisions,
    member_probabilities,
    mix,
    mode_inputs,
    model_inputs,
    row_modes,
)

log = logging.getLogger(__name__)

BUNDLE_JSON = "bundle.json"
# 2: one operating point per input mode ("operating_points"); 1: one at the top level.
BUNDLE_FORMAT_VERSION = 2
# The drift reference table ``calibrate`` stores in the bundle (features + embeddings of the
# training split) and its description in bundle.json.
REFERENCE_FILE = "drift_reference.parquet"
REFERENCE_KEY = "drift_reference"
# What the bundle has seen: the lesions and images it trained, tuned or calibrated on (the train
# and val rows of its split). A later comparison on another data version (the promotion gate,
# ``make compare --rescore``) leaves them out, since a lesion can move from one split to another.
SEEN_FILE = "seen.json"
SEEN_FORMAT_VERSION = 1
SEEN_SPLITS = ("train", "val")
# The promotion record beside a promoted bundle (models/production/production.json): written by
# flows/promote.py, read by serve (the web page's "promoted at") and the gate.
PRODUCTION_RECORD = "production.json"


@dataclass(frozen=True)
class Seen:
    lesion_ids: frozenset[str]
    image_ids: frozenset[str]

    def unseen(self, lesion_ids: Sequence[str], image_ids: Sequence[str]) -> np.ndarray:
        """Mask of the rows neither whose lesion nor whose image the bundle has seen."""
        lesion_seen = np.isin(np.asarray(lesion_ids, dtype=str), list(self.lesion_ids))
        image_seen = np.isin(np.asarray(image_ids, dtype=str), list(self.image_ids))
        return ~(lesion_seen | image_seen)

    def unseen_rows(self, frame: Any) -> np.ndarray:
        """:meth:`unseen` for the rows of a frame with ``lesion_id`` and ``image_id`` columns."""
        return self.unseen(frame["lesion_id"].astype(str).tolist(), frame["image_id"].astype(str).tolist())


def seen_record(split: Any) -> dict[str, Any]:
    """The ``seen.json`` content for a split frame (columns image_id, lesion_id, split)."""
    rows = split[split["split"].isin(SEEN_SPLITS)]
    return {
        "format_version": SEEN_FORMAT_VERSION,
        "splits": list(SEEN_SPLITS),
        "lesion_ids": sorted(map(str, rows["lesion_id"].unique())),
        "image_ids": sorted(map(str, rows["image_id"])),
    }


def read_seen(bundle_dir: str | Path) -> Seen | None:
    """The bundle's ``seen.json``; None for a bundle older than the file (nothing recorded)."""
    path = Path(bundle_dir) / SEEN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable ({e}); rebuild the bundle with dvc repro calibrate") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != SEEN_FORMAT_VERSION:
        raise StageError(
            f"{path}: format_version {version!r}, this code reads {SEEN_FORMAT_VERSION}; "
            "rebuild the bundle with dvc repro calibrate"
        )
    ids = {k: data.get(k) for k in ("lesion_ids", "image_ids")}
    for key, value in ids.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StageError(f"{path}: {key} must be a list of strings")
    return Seen(frozenset(ids["lesion_ids"]), frozenset(ids["image_ids"]))



def is_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds a bundle (its ``bundle.json``); not a check of its content."""
    return (Path(folder) / BUNDLE_JSON).is_file()


def choose_bundle(production: str | Path, candidate: str | Path) -> Path:
    """The bundle to serve by default: ``production`` once a promotion made one, else the last
    candidate (which may not exist yet: the caller's reader says so, naming it)."""
    return Path(production) if is_bundle(production) else Path(candidate)

def read_bundle_json(bundle_dir: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle folder, checked; a clear error when it is missing or unusable.

    Format 2 holds one operating point per input mode (``operating_points``); a format-1 bundle
    (one temperature/threshold at the top level) is read as a bundle with ``image_only`` only.
    Every value serving uses is checked here, so the CLI, the web app and drift refuse the same
    bundle with the same one-line message naming the key: the classes, the input size and
    aspect, each operating point (:meth:`OperatingPoint.from_json`), the members (name, weight
    >= 0 with a positive sum, a path that stays inside the folder, symlinks resolved), the
    params serving reads, and no NaN or Infinity anywhere (``calibrate`` writes strict JSON).
    """
    path = Path(bundle_dir) / BUNDLE_JSON
    if not Path(bundle_dir).is_dir():
        raise StageError(f"{bundle_dir}: no such folder (give a model bundle folder, e.g. models/ensemble)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(
            f"{path}: not found; {bundle_dir} is not a model bundle (the calibrate stage writes one: "
            "`dvc repro calibrate`)"
        ) from None
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: unreadable bundle description ({e})") from None
    if not isinstance(meta, dict):
        raise StageError(f"{path}: not a bundle description (a JSON object)")
    version = meta.get("format_version", 1)
    if not _is_int(version) or version not in (1, BUNDLE_FORMAT_VERSION):
        raise StageError(
            f"{path}: format_version {version!r:.50}; this code reads 1 and {BUNDLE_FORMAT_VERSION} "
            "(a bundle from a newer version of the project?)"
        )
    for key in ("classes", "members", "image_size"):
        if key not in meta:
            raise StageError(f"{path}: missing key {key!r}; the bundle is incomplete or from another tool")
    size = meta["image_size"]
    if not _is_int(size) or not 8 <= size <= 2048:
        raise StageError(
            f"{path}: 'image_size' must be a whole number of pixels in 8..2048, got {size!r:.50}"
        )
    if meta["classes"] != list(CLASSES):
        # The members' outputs are in this order (train refuses any other): a bundle naming other
        # classes, or these in another order, would label every probability wrongly.
        raise StageError(
            f"{path}: 'classes' must be HAM10000's {len(CLASSES)} classes in this order {list(CLASSES)}, "
            f"got {meta['classes']!r:.200}"
        )
    if meta.get("aspect") not in (None, "crop", "pad"):
        raise StageError(f"{path}: 'aspect' must be 'crop' or 'pad', got {meta['aspect']!r:.50}")
    if version == 1:
        for key in ("temperature", "threshold"):
            if key not in meta:
                raise StageError(
                    f"{path}: missing key {key!r}; the bundle is incomplete or from another tool"
                )
        meta["operating_points"] = {IMAGE_ONLY: {k: meta.get(k) for k in _POINT_KEYS}}
    points = meta.get("operating_points")
    if not isinstance(points, dict) or IMAGE_ONLY not in points or set(points) - set(MODES):
        raise StageError(
            f"{path}: 'operating_points' must map {IMAGE_ONLY!r} (and optionally {METADATA!r}) to an "
            f"operating point, got {points!r:.200}"
        )
    for mode, point in points.items():
        if not isinstance(point, dict):
            raise StageError(f"{path}: operating point {mode!r} is not an object")
        OperatingPoint.from_json(point, len(CLASSES), f"{path}: {mode}")
    _check_members(meta["members"], Path(bundle_dir), path)
    _check_served_params(meta, path)
    _check_training_data(meta, path)
    _check_finite(meta, path)
    return meta


_POINT_KEYS = ("temperature", "threshold", "class_bias", "class_prior", "decision")
# What serving reads from ``params``: (section, key, check, what it must be), with the bounds of
# stages.params (the pixel caps: serve.web takes the stricter of the two).
_SERVED_PARAMS: tuple[tuple[str, str, Any, str], ...] = (
    ("prepare", "draft_gap", lambda v: _is_number(v) and 1.0 <= v <= 16.0, "a number in 1..16"),
    ("validate", "max_pixels", lambda v: _is_int(v) and v >= 1, "a whole number of pixels >= 1"),
    ("drift", "max_pixels", lambda v: _is_int(v) and v >= 1, "a whole number of pixels >= 1"),
    ("evaluate", "batch_size", lambda v: _is_int(v) and 1 <= v <= 4096, "a whole number in 1..4096"),
    ("evaluate", "tta", lambda v: isinstance(v, bool), "true or false"),
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_members(members: Any, root: Path, path: Path) -> None:
    """``members``: a non-empty list of ``{name, weight, path[, md5]}``, weights >= 0 with a positive
    sum, each path inside the bundle folder (after symlinks). The files are checked by load."""
    shape = "a non-empty list of {name, weight, path, md5} objects"
    if not isinstance(members, list) or not members:
        raise StageError(f"{path}: 'members' must be {shape}, got {members!r:.200}")
    names: set[str] = set()
    inside = root.resolve()
    for k, m in enumerate(members):
        if not isinstance(m, dict):
            raise StageError(f"{path}: 'members' must be {shape}; member {k} is {m!r:.100}")
        name = m.get("name")
        if not isinstance(name, str) or not name or name in names:
            why = "listed twice" if name in names else "must be a non-empty text"
            raise StageError(f"{path}: member {k} 'name' {why}, got {name!r:.100}")
        names.add(name)
        weight = m.get("weight")
        if not _is_number(weight) or weight < 0:
            raise StageError(
                f"{path}: member {name!r} 'weight' must be a finite number >= 0, got {weight!r:.100}"
            )
        rel = m.get("path")
        if not isinstance(rel, str) or not rel:
            raise StageError(f"{path}: member {name!r} 'path' must be a relative file path, got {rel!r:.100}")
        if m.get("md5") is not None and not isinstance(m["md5"], str):
            raise StageError(f"{path}: member {name!r} 'md5' must be hex text, got {m['md5']!r:.100}")
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise StageError(f"{path}: member {name!r} path {rel!r} leaves the bundle folder")
        target = (root / p).resolve()
        if inside not in target.parents:
            raise StageError(
                f"{path}: member {name!r} path {rel!r} resolves to {target}, outside the bundle folder "
                "(a symlink?)"
            )
    total = math.fsum(float(m["weight"]) for m in members)
    if not total > 0:
        raise StageError(f"{path}: member 'weight's must have a positive sum, got {total:g}")


def _check_served_params(meta: dict[str, Any], path: Path) -> None:
    """The recorded params serving reads (decode, pixel cap, TTA, batch), and the data version."""
    params = meta.get("params")
    if params is None:
        return
    if not isinstance(params, dict):
        raise StageError(f"{path}: 'params' must be an object, got {params!r:.100}")
    for section, key, ok, want in _SERVED_PARAMS:
        sect = params.get(section)
        if sect is None:
            continue
        if not isinstance(sect, dict):
            raise StageError(f"{path}: 'params.{section}' must be an object, got {sect!r:.100}")
        if key in sect and not ok(sect[key]):
            raise StageError(f"{path}: 'params.{section}.{key}' must be {want}, got {sect[key]!r:.50}")
    version = meta.get("data_version")
    if version is not None and (
        not isinstance(version, dict) or not isinstance(version.get("md5"), str | None)
    ):
        raise StageError(
            f"{path}: 'data_version' must be {{path, md5}} (md5 text or null), got {version!r:.80}"
        )


def _check_finite(value: Any, path: Path, key: str = "") -> None:
    """No NaN or Infinity anywhere: Python's json reads them, but they are not JSON, calibrate
    never writes them (``allow_nan=False``), and a key nothing checks may be read by a tool later."""
    if isinstance(value, float) and not math.isfinite(value):
        raise StageError(f"{path}: {key!r} is {value!r}, not a finite number (NaN and Infinity are not JSON)")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, path, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _check_finite(v, path, f"{key}[{k}]")


# --------------------------------------------------------------------------- training data

TRAINING_DATA_KEY = "training_data"
SYNTHETIC_SOURCE = "synthetic"
# What every face of a bundle trained on the demo generator's images says first (serve.predict's
# header, the web page and /api/model, the model card): its answers on real images mean nothing.
SYNTHETIC_WARNING = "synthetic demo data (not real dermoscopy) — do not use on real images"
UNKNOWN_TRAINING_DATA = (
    "training data: unknown (a bundle older than its training_data record; rebuild it with "
    "`dvc repro calibrate`)"
)


@dataclass(frozen=True)
class TrainingData:
    """What a bundle was trained on: ``bundle.json`` ``training_data``, written by ``calibrate``.

    ``source`` is ``download.source`` (synthetic | dataverse | local:PATH), ``extra_sources`` the
    labelled batches merged into it, ``data_version`` the DVC md5 of the raw data (``data/raw`` in
    dvc.lock: the version the promotion record and the noise file name; None when not recorded).
    ``recorded`` False: read from the params snapshot of a bundle written before the record.
    """

    source: str
    synthetic: bool
    data_version: str | None = None
    extra_sources: tuple[str, ...] = ()
    recorded: bool = True

    @classmethod
    def of_params(cls, download: Any, data_version: str | None) -> TrainingData:
        """From the ``download`` params section (a dict) and the raw data's md5."""
        source = str(download.get("source") or "unknown")
        extra = tuple(str(s) for s in download.get("extra_sources") or ())
        return cls(source, source == SYNTHETIC_SOURCE, data_version, extra)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "synthetic": self.synthetic,
            "data_version": self.data_version,
            "extra_sources": list(self.extra_sources),
        }

    def describe(self) -> str:
        """One line, the warning first for synthetic data: ``trained on <what> (<data version>...)``."""
        what = SYNTHETIC_WARNING if self.synthetic else f"HAM10000 via {self.source}"
        notes = [f"data {self.data_version[:8]}" if self.data_version else "data version not recorded"]
        if self.extra_sources:
            notes.append("with labelled batches " + ", ".join(self.extra_sources))
        if not self.recorded:
            notes.append("read from the params of a bundle older than its training_data record")
        return f"trained on {what} ({'; '.join(notes)})"


def read_training_data(meta: dict[str, Any]) -> TrainingData | None:
    """What a bundle (``read_bundle_json``'s checked dict) was trained on. A bundle older than the
    ``training_data`` record: its params snapshot's ``download`` section (``recorded`` False; every
    calibrate wrote it, the source is what matters most); None when neither says."""
    block = meta.get(TRAINING_DATA_KEY)
    if isinstance(block, dict):
        return TrainingData(
            str(block["source"]),
            bool(block["synthetic"]),
            block.get("data_version"),
            tuple(block.get("extra_sources") or ()),
        )
    params = meta.get("params")
    download = params.get("download") if isinstance(params, dict) else None
    if isinstance(download, dict) and isinstance(download.get("source"), str) and download["source"]:
        return replace(TrainingData.of_params(download, None), recorded=False)
    return None


def trained_on(meta: dict[str, Any]) -> str:
    """The line every face of a bundle shows first (:meth:`TrainingData.describe`, or unknown)."""
    data = read_training_data(meta)
    return data.describe() if data is not None else UNKNOWN_TRAINING_DATA


def _check_training_data(meta: dict[str, Any], path: Path) -> None:
    """``training_data`` (optional: older bundles lack it): {source, synthetic, data_version,
    extra_sources}; a synthetic source can never be recorded as real data."""
    block = meta.get(TRAINING_DATA_KEY)
    if block is None:
        return
    key = f"{path}: '{TRAINING_DATA_KEY}"
    if not isinstance(block, dict):
        raise StageError(
            f"{key}' must be {{source, synthetic, data_version, extra_sources}}, got {block!r:.100}"
        )
    source, synthetic = block.get("source"), block.get("synthetic")
    if not isinstance(source, str) or not source:
        raise StageError(f"{key}.source' must be a non-empty text (download.source), got {source!r:.100}")
    if not isinstance(synthetic, bool):
        raise StageError(f"{key}.synthetic' must be true or false, got {synthetic!r:.50}")
    if source == SYNTHETIC_SOURCE and not synthetic:
        raise StageError(f"{key}.synthetic' is false but the source is {SYNTHETIC_SOURCE!r}")
    version = block.get("data_version")
    if version is not None and (not isinstance(version, str) or not version):
        raise StageError(
            f"{key}.data_version' must be the raw data's md5 (text) or null, got {version!r:.80}"
        )
    extra = block.get("extra_sources", [])
    if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
        raise StageError(f"{key}.extra_sources' must be a list of texts, got {extra!r:.100}")


def pixel_cap(params: Any, limit: int | None = None, where: str = "bundle.json") -> int:
    """The project's one pixel cap for a bundle: the stricter of its ``params.validate.max_pixels``
    (what the pipeline accepted) and ``params.drift.max_pixels`` (what drift reads), lowered by
    ``limit`` (``--max-pixels``), which may not raise it. Neither given: skinlesion.core.images' default."""
    params = params if isinstance(params, dict) else {}
    found = []
    for section in ("validate", "drift"):
        values = params.get(section)
        value = values.get("max_pixels") if isinstance(values, dict) else None
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StageError(
                f"{where}: 'params.{section}.max_pixels' must be a whole number of pixels >= 1, "
                f"got {value!r:.50}"
            )
        found.append(value)
    cap = min(found) if found else DEFAULT_MAX_PIXELS
    if limit is not None:
        if limit < 1:
            raise StageError(f"--max-pixels must be at least 1, got {limit}")
        if limit > cap:
            raise StageError(
                f"--max-pixels {limit:,} is above the bundle's cap of {cap:,} pixels (the stricter of "
                "params validate.max_pixels and drift.max_pixels): it can only lower it"
            )
        cap = limit
    return cap


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

    @property
    def points(self) -> dict[str, OperatingPoint]:
        """The operating point of each input mode this bundle has (``image_only`` always)."""
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
    bundle: Bundle | None = None,
) -> dict[str, Any]:
    """Write the drift reference into a bundle folder and return its ``bundle.json`` entry.

    ``bundle``: the folder's bundle when the caller has it loaded already (else it is loaded).

    The table is what a drift check computes for new images (:mod:`skinlesion.measure.imagefeatures`), for a
    seeded sample of the ``split`` images, with this bundle's own members: a later check needs
    only the bundle and the new images, never the training data.
    """
    import pandas as pd

    from skinlesion.measure.imagefeatures import FeatureSpec, build_table

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
    bundle = bundle if bundle is not None else Bundle.load(bundle_dir)
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
