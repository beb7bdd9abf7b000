"""``bundle.json``: the one module that writes, reads and checks a model bundle's description.

A bundle (``models/ensemble/``, written by ``calibrate``) is ``bundle.json`` (members, weights,
one operating point per input mode: temperature, class bias, decision prior and malignant
threshold; classes, input size, params, what it was trained on) plus one
``members/<name>/model.keras`` per member, and beside them ``seen.json``
(:mod:`skinlesion.model.seen`) and the drift reference (:mod:`skinlesion.model.drift_reference`).
:func:`write_bundle_json` stamps ``format_version``; :func:`read_bundle_json` checks it and every
value serving reads. Loading and scoring a bundle: :mod:`skinlesion.model.bundle`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from skinlesion.core.errors import StageError
from skinlesion.core.images import DEFAULT_MAX_PIXELS
from skinlesion.core.outputs import write_json
from skinlesion.core.schema import CLASSES
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA, MODES, OperatingPoint

BUNDLE_JSON = "bundle.json"
# 2: one operating point per input mode ("operating_points"); 1: one at the top level.
BUNDLE_FORMAT_VERSION = 2
# The promotion record beside a promoted bundle (models/production/production.json): written by
# flows/promote.py, read by serve (the web page's "promoted at") and the gate.
PRODUCTION_RECORD = "production.json"


def is_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds a bundle (its ``bundle.json``); not a check of its content."""
    return (Path(folder) / BUNDLE_JSON).is_file()


def choose_bundle(production: str | Path, candidate: str | Path) -> Path:
    """The bundle to serve by default: ``production`` once a promotion made one, else the last
    candidate (which may not exist yet: the caller's reader says so, naming it)."""
    return Path(production) if is_bundle(production) else Path(candidate)


def write_bundle_json(folder: str | Path, meta: dict[str, Any]) -> None:
    """Write ``<folder>/bundle.json``: ``meta`` stamped with this code's ``format_version`` (strict
    JSON, sorted keys: :func:`skinlesion.core.outputs.write_json`). ``meta`` is not changed."""
    version = meta.get("format_version", BUNDLE_FORMAT_VERSION)
    if version != BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"{BUNDLE_JSON}: this code writes format_version {BUNDLE_FORMAT_VERSION}, not {version}"
        )
    write_json(Path(folder) / BUNDLE_JSON, {"format_version": BUNDLE_FORMAT_VERSION, **meta})


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
# skinlesion.params (the pixel caps: serve takes the stricter of the two, pixel_cap).
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


def pixel_cap(params: Any, limit: int | None = None, where: str = BUNDLE_JSON) -> int:
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
