"""Bundle folders as ``calibrate`` lays them out, with small real Keras members.

- :func:`tiny_model`: a tiny real ``.keras`` member (conv -> pool -> softmax, optionally fusing
  the metadata);
- :func:`write_bundle`: a bundle of one :func:`tiny_model` member (format 2 by default, the
  :data:`POINTS` operating points);
- :func:`make_bundle`: the serving tests' bundle: one untrained custom CNN at :data:`SIZE` px,
  image-only, format 1, with a model card;
- :func:`make_evaluate_bundle`: the ``serve.evaluate`` tests' bundle: one untrained custom CNN,
  fusion (format 2, both modes) or image-only (format 1), with the params that command reads;
- :func:`with_training_data`: a copy of a bundle recording what it was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from skinlesion.core.schema import CLASSES
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA
from skinlesion.model.bundle_json import BUNDLE_FORMAT_VERSION, file_md5

SIZE = 32  # image size of the custom-CNN bundles (make_bundle, make_evaluate_bundle)
TINY_SIZE = 8  # image size of the tiny members (tiny_model, write_bundle)
# Two operating points that differ in every number, so a row's mode is visible in its output.
POINTS = {
    METADATA: {"temperature": 0.8, "threshold": 0.2, "class_bias": [0.3, -0.2, 0.0, 0.1, 0.4, -0.5, 0.0],
               "class_prior": None, "decision": "argmax"},
    IMAGE_ONLY: {"temperature": 1.7, "threshold": 0.35, "class_bias": None,
                 "class_prior": [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02], "decision": "balanced"},
}  # fmt: skip
DEMO_DATA = {
    "source": "synthetic",
    "synthetic": True,
    "data_version": "d70be3bf" * 4 + ".dir",
    "extra_sources": [],
}


def tiny_model(path: Path, size: int = TINY_SIZE, *, fusion: bool = False, seed: int = 0) -> Path:
    """Save ``uint8 image [-> + metadata] -> conv -> pool -> softmax`` to ``path`` (a .keras file).

    The convolution makes flips change the output (TTA is visible); with ``fusion`` the metadata
    go through the project's ``MetadataEncoding`` into the final layer, so they change the output.
    The final layer is named ``probs``, as the bundle's embedding expects.
    """
    import keras

    from skinlesion.model.networks import MetadataEncoding

    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    inputs: object = image
    if fusion:
        age = keras.Input((), dtype="float32", name="age")
        sex = keras.Input((), dtype="int32", name="sex")
        loc = keras.Input((), dtype="int32", name="localization")
        x = keras.layers.Concatenate(name="fuse")([x, MetadataEncoding(name="meta")([age, sex, loc])])
        inputs = {"image": image, "age": age, "sex": sex, "localization": loc}
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, out).save(path)
    return path


def write_bundle(
    root: Path,
    *,
    fusion: bool,
    points: dict | None = None,
    format_version: int = BUNDLE_FORMAT_VERSION,
    size: int = TINY_SIZE,
    seed: int = 0,
    **extra,
) -> Path:
    """A bundle folder as calibrate writes it (format 2 by default) with one tiny real member:
    with ``fusion`` it takes the metadata. ``points``: ``operating_points`` (format 2) or the
    top-level keys (format 1)."""
    member = tiny_model(root / "members" / "m" / "model.keras", size, fusion=fusion, seed=seed)
    meta = {
        "format_version": format_version, "created": "2026-11-30T12:00:00Z", "classes": list(CLASSES),
        "malignant": ["akiec", "bcc", "mel"], "image_size": size, "aspect": "crop",
        "members": [{"name": "m", "weight": 1.0, "path": "members/m/model.keras", "md5": file_md5(member)}],
        "data_version": {"path": "data/prepared", "md5": "0123456789abcdef0123456789abcdef"},
        "params": {"prepare": {"draft_gap": 2.0}, "evaluate": {"tta": False},
                   "validate": {"max_pixels": 100_000_000}},
        **extra,
    }  # fmt: skip
    if format_version == 1:
        meta.update(points if points is not None else {"temperature": 1.3, "threshold": 0.3})
    else:
        meta["operating_points"] = points if points is not None else POINTS
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def custom_cnn_member(root: Path, *, seed: int, **spec: object) -> Path:
    """An untrained custom-CNN member saved at ``root/members/custom_cnn/model.keras`` (``spec``:
    more :class:`ModelSpec` fields, e.g. ``fusion=True, fusion_units=8``); its path."""
    import keras

    from skinlesion.model.networks import ModelSpec, build_backbone, build_model, output_bias_from_counts

    keras.utils.set_random_seed(seed)
    bb, _ = build_backbone("custom_cnn", SIZE, "none")
    model_spec = ModelSpec(
        backbone="custom_cnn",
        image_size=SIZE,
        output_bias=output_bias_from_counts([30, 50, 110, 12, 111, 670, 14]),
        **spec,
    )
    model = build_model(model_spec, bb, pretrained=False)
    member = root / "members" / "custom_cnn" / "model.keras"
    member.parent.mkdir(parents=True)
    model.save(member)
    return member


def make_bundle(root: Path, *, seed: int = 0, threshold: float = 0.3, temperature: float = 1.3) -> Path:
    """A bundle folder as ``calibrate`` writes it, with one untrained custom-CNN member."""
    member = custom_cnn_member(root, seed=seed)
    meta = {
        "format_version": 1,
        "created": "2026-11-30T12:00:00Z",
        "classes": list(CLASSES),
        "malignant": ["akiec", "bcc", "mel"],
        "image_size": SIZE,
        "aspect": "crop",
        "members": [{"name": "custom_cnn", "weight": 1.0, "path": "members/custom_cnn/model.keras",
                     "md5": file_md5(member)}],
        "temperature": temperature,
        "threshold": threshold,
        "data_version": {"path": "data/prepared", "md5": "0123456789abcdef0123456789abcdef"},
        "params": {"prepare": {"draft_gap": 2.0}, "evaluate": {"tta": False},
                   "validate": {"max_pixels": 100_000_000}},
        "metrics": {},
    }  # fmt: skip
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    (root / "model_card.md").write_text("# Model card: test bundle\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    return root


def make_evaluate_bundle(root: Path, *, fusion: bool, synthetic: bool = False, seed: int = 0) -> Path:
    """A bundle folder as ``calibrate`` writes it, with one untrained custom-CNN member and the
    params ``serve.evaluate`` reads (``evaluate.ci_level``, ``download.source``).

    ``fusion``: a member with the metadata inputs and format 2 with both operating points
    (the image-only one with the balanced decision); otherwise format 1 (image-only)."""
    member = custom_cnn_member(root, seed=seed, fusion=fusion, fusion_units=8)
    meta = {
        "created": "2026-11-30T12:00:00Z",
        "classes": list(CLASSES),
        "malignant": ["akiec", "bcc", "mel"],
        "image_size": SIZE,
        "aspect": "crop",
        "members": [{"name": "custom_cnn", "weight": 1.0, "path": "members/custom_cnn/model.keras",
                     "md5": file_md5(member)}],
        "data_version": {"path": "data/prepared", "md5": "0123456789abcdef0123456789abcdef"},
        "params": {"prepare": {"draft_gap": 2.0}, "evaluate": {"tta": False, "ci_level": 0.9},
                   "validate": {"max_pixels": 100_000_000},
                   "download": {"source": "synthetic" if synthetic else "local:somewhere"}},
        "metrics": {},
    }  # fmt: skip
    if fusion:
        meta["format_version"] = 2
        meta["operating_points"] = {
            "metadata": {"temperature": 0.9, "threshold": 0.22, "class_prior": None, "decision": "argmax",
                         "class_bias": [0.1, 0.2, 0.0, 0.0, 0.3, -0.2, 0.0]},
            "image_only": {"temperature": 1.3, "threshold": 0.3, "class_bias": None,
                           "class_prior": [0.03, 0.05, 0.11, 0.02, 0.10, 0.67, 0.02], "decision": "balanced"},
        }  # fmt: skip
    else:
        meta.update({"format_version": 1, "temperature": 1.3, "threshold": 0.3})
    (root / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def with_training_data(bundle: Path, root: Path, block: dict) -> Path:
    """A copy of ``bundle`` whose bundle.json records ``block`` as its training data."""
    shutil.copytree(bundle, root)
    meta = json.loads((root / "bundle.json").read_text())
    (root / "bundle.json").write_text(json.dumps({**meta, "training_data": block}))
    return root
