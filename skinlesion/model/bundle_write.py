"""Assembling a new bundle folder (``calibrate``): its members copied, the content of its ``bundle.json``.

The files themselves are written by their owners: ``bundle.json`` by
:func:`skinlesion.model.bundle_json.write_bundle_json` (which stamps ``format_version``),
``seen.json`` by :func:`skinlesion.model.seen.write_seen`, the drift reference by
:func:`skinlesion.model.drift_reference.write_drift_reference`.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, MALIGNANT
from skinlesion.measure.scoring import MODE_RULE
from skinlesion.model.bundle_json import TRAINING_DATA_KEY, TrainingData, file_md5

# How a bundle answers, in words (bundle.json "recipe"; the code is skinlesion.measure.scoring).
RECIPE = (
    "mode = metadata if the bundle has it and age, sex and localization are all known, else "
    "image_only (every field unknown); p = sum_m weight_m * model_m(image, metadata of the mode); "
    "calibrated = softmax(log(p) / temperature + class_bias) with the mode's operating point; "
    "predicted class = argmax calibrated / class_prior (decision balanced) or argmax calibrated; "
    "malignant flag = calibrated[mel] + calibrated[bcc] + calibrated[akiec] >= the mode's threshold"
)
IMAGE_ONLY_RULE = "image_only: the members do not use metadata"


@dataclass(frozen=True)
class MemberFile:
    """A trained member to put in a bundle: ``<models>/<name>/model.keras`` and its ensemble weight."""

    name: str
    weight: float
    src: Path

    @property
    def path(self) -> str:
        """Where it goes inside the bundle folder."""
        return f"members/{self.name}/model.keras"


def member_files(models_dir: str | Path, names: Sequence[str], weights: Sequence[float]) -> list[MemberFile]:
    """The ensemble's members (``weights.json``'s names and weights), each model file checked."""
    out = []
    for name, w in zip(names, weights, strict=True):
        src = Path(models_dir) / name / "model.keras"
        if not src.is_file():
            raise StageError(f"{src}: member model not found; run the train stage for {name!r}")
        out.append(MemberFile(name, float(w), src))
    return out


def copy_members(bundle_dir: str | Path, members: Sequence[MemberFile]) -> list[dict[str, Any]]:
    """Copy each member into the (new) bundle folder; its ``bundle.json`` ``members`` entries
    (name, weight, path, md5 of the copy)."""
    entries = []
    for m in members:
        dest = Path(bundle_dir) / m.path
        dest.parent.mkdir(parents=True)
        shutil.copy2(m.src, dest)
        entries.append({"name": m.name, "weight": m.weight, "path": m.path, "md5": file_md5(dest)})
    return entries


def bundle_meta(
    *,
    image_size: int,
    aspect: str | None,
    points: Mapping[str, dict[str, Any]],
    target_recall: float,
    recall_bound: str,
    prepared_dir: str | Path,
    data_md5: str | None,
    all_params: dict[str, Any],
    raw_md5: str | None,
    classes: Sequence[str] = CLASSES,
    created: str | None = None,
) -> dict[str, Any]:
    """The content of a new bundle's ``bundle.json`` before its members are copied (``members``
    empty) and its test metrics computed: :func:`write_bundle_json` stamps its format version.

    ``points``: each input mode's operating point (:meth:`OperatingPoint.to_json`), the first the
    bundle's main mode; ``all_params``: the whole params file; ``data_md5`` / ``raw_md5``: the DVC
    hashes of the prepared and the raw data."""
    return {
        "created": created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "classes": list(classes),
        "malignant": list(MALIGNANT),
        "image_size": int(image_size),
        "aspect": aspect,
        "members": [],
        "operating_points": dict(points),
        "mode_rule": MODE_RULE if len(points) > 1 else IMAGE_ONLY_RULE,
        "target_recall": target_recall,
        "recall_bound": recall_bound,
        "recipe": RECIPE,
        "data_version": {"path": Path(prepared_dir).as_posix(), "md5": data_md5},
        # what every face of the bundle names first (TrainingData): the source from the download
        # params, the version of the raw data (raw_md5: data/raw in dvc.lock)
        TRAINING_DATA_KEY: TrainingData.of_params(all_params.get("download") or {}, raw_md5).to_json(),
        "params": all_params,
    }
