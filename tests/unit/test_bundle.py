"""Loading a bundle: safe mode refuses code inside a model file; damaged members are named; the
bundle.json format (1: one operating point; 2: one per input mode) is checked on read; scoring
follows the mode rule of stages.scoring with each mode's own operating point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages.bundle import BUNDLE_FORMAT_VERSION, Bundle, file_md5, read_bundle_json
from stages.common import CLASSES, LOCALIZATIONS, SEXES, StageError
from stages.scoring import (
    IMAGE_ONLY,
    METADATA,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    OperatingPoint,
    malignant_flags,
    model_inputs,
)
from tests.unit.test_scoring import tiny_model

SIZE = 8
# Two operating points that differ in every number, so a row's mode is visible in its output.
POINTS = {
    METADATA: {"temperature": 0.8, "threshold": 0.2, "class_bias": [0.3, -0.2, 0.0, 0.1, 0.4, -0.5, 0.0],
               "class_prior": None, "decision": "argmax"},
    IMAGE_ONLY: {"temperature": 1.7, "threshold": 0.35, "class_bias": None,
                 "class_prior": [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02], "decision": "balanced"},
}  # fmt: skip


def _model(lambda_layer: bool):
    import keras

    inp = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(inp)
    if lambda_layer:
        # arbitrary Python in a model file: what safe_mode exists to refuse
        x = keras.layers.Lambda(lambda t: t * 2.0, name="crafted")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
    return keras.Model(inp, out)


def _bundle(root: Path, *, lambda_layer: bool = False, **extra) -> Path:
    """A format-1 bundle (one operating point at the top level), as calibrate wrote it before modes."""
    member = root / "members" / "m" / "model.keras"
    member.parent.mkdir(parents=True)
    _model(lambda_layer).save(member)
    meta = {
        "classes": list(CLASSES), "image_size": SIZE, "aspect": "crop", "temperature": 1.0, "threshold": 0.5,
        "members": [{"name": "m", "weight": 1.0, "path": "members/m/model.keras", "md5": file_md5(member)}],
        **extra,
    }  # fmt: skip
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def write_bundle(
    root: Path,
    *,
    fusion: bool,
    points: dict | None = None,
    format_version: int = BUNDLE_FORMAT_VERSION,
    size: int = SIZE,
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


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _complete(n: int) -> MetaArrays:
    return MetaArrays(
        np.linspace(20, 80, n).astype(np.float32),
        (np.arange(n) % 2).astype(np.int32),  # male / female
        np.array([LOCALIZATIONS.index(c) for c in ("back", "face", "scalp", "trunk")] * n, np.int32)[:n],
    )


def _raw(bundle: Bundle, images: np.ndarray, meta: MetaArrays | None) -> np.ndarray:
    """The single member's own output, called directly (not through the bundle)."""
    (m,) = bundle.members
    return np.asarray(m.model(model_inputs(images, meta, m.takes_meta), training=False), dtype=np.float64)


# --------------------------------------------------------------------------- loading, refusing


def test_a_plain_bundle_loads_and_predicts_calibrated_probabilities(tmp_path):
    b = Bundle.load(_bundle(tmp_path / "ok"))
    emb, probs = b.predict(np.zeros((3, SIZE, SIZE, 3), np.uint8))
    assert emb.shape == (3, 3) and probs.shape == (3, 7)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_a_model_with_a_lambda_layer_is_refused_by_safe_mode(tmp_path):
    root = _bundle(tmp_path / "crafted", lambda_layer=True)
    with pytest.raises(StageError, match=r"model.keras: cannot load member 'm': .*(safe_mode|Lambda)"):
        Bundle.load(root)


def test_a_changed_member_file_is_refused_by_its_md5(tmp_path):
    root = _bundle(tmp_path / "changed")
    with open(root / "members" / "m" / "model.keras", "ab") as fh:
        fh.write(b"\0")
    damaged = r"model.keras: md5 differs from .*bundle.json: file changed or damaged"
    with pytest.raises(StageError, match=damaged):
        Bundle.load(root)


def test_missing_bundle_json_or_folder_names_the_path(tmp_path):
    with pytest.raises(StageError) as e:
        Bundle.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'bundle.json'}: not found; {tmp_path} is not a model bundle (the calibrate stage "
        "writes one: `dvc repro calibrate`)"
    )
    with pytest.raises(StageError) as e:
        Bundle.load(tmp_path / "nowhere")
    assert str(e.value) == (
        f"{tmp_path / 'nowhere'}: no such folder (give a model bundle folder, e.g. models/ensemble)"
    )


def test_class_bias_and_the_balanced_decision_are_applied_as_bundle_json_says(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    bias = [0.5, -1.0, 0.0, 0.25, 1.0, -0.5, -0.25]
    prior = [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]
    b = Bundle.load(_bundle(tmp_path / "biased", class_bias=bias, decision="balanced", class_prior=prior))
    _, probs = b.predict(x)
    b.meta["operating_points"][IMAGE_ONLY]["class_bias"] = None  # the same members, temperature only
    _, plain = b.predict(x)
    assert not np.allclose(plain, probs)
    expected = plain * np.exp(bias)  # softmax(log p + b) = p e^b / sum
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(b.decide(probs), (probs / np.array(prior)).argmax(1))
    # "argmax" (or no decision key: bundles written before it) ignores the prior
    argmax = Bundle.load(_bundle(tmp_path / "argmax", decision="argmax", class_prior=prior))
    np.testing.assert_array_equal(argmax.decide(probs), probs.argmax(1))


@pytest.mark.parametrize(
    ("key", "value", "decision"),
    [("class_bias", [0.0] * 6, None), ("class_bias", [0.0] * 6 + ["x"], None),
     ("class_prior", [0.0] + [0.1] * 6, None), ("class_prior", [0.0] + [0.1] * 6, "balanced"),
     ("class_prior", [0.1] * 6, "argmax"), ("class_bias", [float("nan")] * 7, None)],
)  # fmt: skip
def test_a_malformed_bias_or_prior_is_refused_by_name(tmp_path, key, value, decision):
    # refused even where the decision would not use the prior: a damaged bundle.json is not served
    root = tmp_path / "bad"
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps({
        "classes": list(CLASSES), "image_size": 8, "temperature": 1.0, "threshold": 0.5, "members": [],
        key: value, **({"decision": decision} if decision else {}),
    }))  # fmt: skip
    with pytest.raises(StageError, match=rf"bundle.json: image_only: '{key}' must be 7 finite numbers"):
        Bundle.load(root)


def test_format_version_3_is_refused_by_name(tmp_path):
    root = write_bundle(
        tmp_path / "b", fusion=False, points={IMAGE_ONLY: POINTS[IMAGE_ONLY]}, format_version=3
    )
    with pytest.raises(StageError) as e:
        Bundle.load(root)
    assert str(e.value) == (
        f"{root / 'bundle.json'}: format_version 3; this code reads 1 and 2 (a bundle from a newer "
        "version of the project?)"
    )


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({METADATA: POINTS[METADATA]}, "'operating_points' must map 'image_only' (and optionally 'metad"),
        ({**POINTS, "meta": POINTS[METADATA]}, "'operating_points' must map 'image_only'"),
        ({IMAGE_ONLY: 0.3}, "operating point 'image_only' is not an object"),
        ({**POINTS, METADATA: {**POINTS[METADATA], "temperature": "hot"}},
         "metadata: 'temperature' must be a number in (0, 1000], got 'hot'"),
        ({**POINTS, IMAGE_ONLY: {**POINTS[IMAGE_ONLY], "threshold": 1.5}},
         "image_only: 'threshold' must be a number in [0, 1], got 1.5"),
    ],
)  # fmt: skip
def test_a_bad_operating_point_is_refused_naming_the_mode_and_key(tmp_path, points, message):
    root = tmp_path / "b"
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps({
        "format_version": 2, "classes": list(CLASSES), "image_size": 8, "members": [],
        "operating_points": points,
    }))  # fmt: skip
    with pytest.raises(StageError) as e:
        read_bundle_json(root)
    assert str(e.value).startswith(f"{root / 'bundle.json'}: {message}"), str(e.value)


@pytest.mark.parametrize("path", ["../m/model.keras", "members/../../m/model.keras", "/tmp/m/model.keras"])
def test_a_member_path_leaving_the_bundle_folder_is_refused(tmp_path, path):
    root = write_bundle(tmp_path / "b", fusion=False)
    # a real model file where the path points, so only the path itself can be the reason
    tiny_model(tmp_path / "m" / "model.keras", SIZE)
    meta = json.loads((root / "bundle.json").read_text())
    meta["members"][0]["path"] = path
    meta["members"][0].pop("md5")
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(StageError) as e:
        Bundle.load(root)
    assert str(e.value) == f"{root / 'bundle.json'}: member 'm' path {path!r} leaves the bundle folder"


def test_a_metadata_point_without_a_fusion_member_is_refused(tmp_path):
    root = write_bundle(tmp_path / "b", fusion=False)
    with pytest.raises(StageError) as e:
        Bundle.load(root)
    assert (
        str(e.value) == f"{root / 'bundle.json'}: a 'metadata' operating point but no member takes metadata"
    )


# --------------------------------------------------------------------------- input modes


def test_a_format_1_bundle_is_image_only_even_with_a_fusion_member(tmp_path):
    # a fusion bundle written before operating points existed: one point, fitted image-only
    b = Bundle.load(write_bundle(tmp_path / "v1", fusion=True, format_version=1,
                                 points={"temperature": 1.3, "threshold": 0.3}))  # fmt: skip
    assert b.modes == (IMAGE_ONLY,) and list(b.points) == [IMAGE_ONLY]
    assert b.points[IMAGE_ONLY] == OperatingPoint(1.3, 0.3, None, None)
    assert b.threshold() == 0.3 and b.threshold(IMAGE_ONLY) == 0.3
    with pytest.raises(KeyError):
        b.threshold(METADATA)
    x = _images(4)
    given = b.score(x, _complete(4))
    assert given.modes.tolist() == [IMAGE_ONLY] * 4
    # known metadata is not fed: there is no operating point calibrated for it
    np.testing.assert_array_equal(given.probs, b.score(x).probs)
    np.testing.assert_allclose(given.probs, b.points[IMAGE_ONLY].calibrate(_raw(b, x, None)), atol=1e-6)


@pytest.fixture(scope="module")
def fusion_bundle(tmp_path_factory) -> Bundle:
    return Bundle.load(write_bundle(tmp_path_factory.mktemp("fusion"), fusion=True))


def test_a_two_mode_bundle_loads_both_operating_points(fusion_bundle):
    b = fusion_bundle
    assert b.meta["format_version"] == 2
    assert b.modes == (METADATA, IMAGE_ONLY)
    assert b.points == {m: OperatingPoint.from_json(p, 7, "-") for m, p in POINTS.items()}
    assert (b.threshold(METADATA), b.threshold(), b.threshold(IMAGE_ONLY)) == (0.2, 0.35, 0.35)


def test_complete_metadata_is_scored_with_the_metadata_point(fusion_bundle):
    b = fusion_bundle
    x, meta = _images(5, seed=1), _complete(5)
    s = b.score(x, meta)
    assert s.modes.tolist() == [METADATA] * 5
    raw = _raw(b, x, meta)
    # the member saw the metadata, and the metadata point's temperature and bias calibrated it
    np.testing.assert_allclose(s.probs, b.points[METADATA].calibrate(raw), atol=1e-6)
    assert not np.allclose(raw, _raw(b, x, None), atol=1e-4)
    assert not np.allclose(s.probs, b.points[IMAGE_ONLY].calibrate(raw), atol=1e-4)
    _, thr = malignant_flags(s.probs, s.modes, b.points, b.classes)
    assert thr.tolist() == [0.2] * 5
    np.testing.assert_array_equal(b.decide(s.probs, s.modes), s.probs.argmax(1))  # metadata: argmax
    assert s.embeddings.shape == (5, 4 + 2 + len(SEXES) + len(LOCALIZATIONS))


def test_partial_metadata_is_scored_exactly_as_image_only(fusion_bundle):
    b = fusion_bundle
    x = _images(4, seed=2)
    partial = MetaArrays.of([(math.nan, 0, 2), (45.0, UNKNOWN_SEX, 2), (45.0, 1, UNKNOWN_LOCALIZATION),
                             (math.nan, UNKNOWN_SEX, UNKNOWN_LOCALIZATION)])  # fmt: skip
    s = b.score(x, partial)
    image_only = b.score(x)
    assert s.modes.tolist() == [IMAGE_ONLY] * 4 and image_only.modes.tolist() == [IMAGE_ONLY] * 4
    np.testing.assert_array_equal(s.probs, image_only.probs)
    np.testing.assert_allclose(image_only.probs, b.points[IMAGE_ONLY].calibrate(_raw(b, x, None)), atol=1e-6)
    _, thr = malignant_flags(s.probs, s.modes, b.points, b.classes)
    assert thr.tolist() == [0.35] * 4


def test_a_mixed_batch_scores_each_row_in_its_own_mode(fusion_bundle):
    b = fusion_bundle
    x = _images(4, seed=3)
    complete = _complete(4)
    mixed = MetaArrays(complete.age.copy(), complete.sex.copy(), complete.localization.copy())
    mixed.age[1] = np.nan  # rows 1 and 3 partly known
    mixed.sex[3] = UNKNOWN_SEX
    s = b.score(x, mixed)
    assert s.modes.tolist() == [METADATA, IMAGE_ONLY, METADATA, IMAGE_ONLY]
    all_meta, all_image = b.score(x, complete).probs, b.score(x).probs
    np.testing.assert_allclose(s.probs[[0, 2]], all_meta[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(s.probs[[1, 3]], all_image[[1, 3]], atol=1e-6)
    decided = b.decide(s.probs, s.modes)
    assert decided[[0, 2]].tolist() == s.probs[[0, 2]].argmax(1).tolist()
    prior = np.array(POINTS[IMAGE_ONLY]["class_prior"])
    assert decided[[1, 3]].tolist() == (s.probs[[1, 3]] / prior).argmax(1).tolist()
    # predict() is the image-only answer (what drift compares)
    emb, probs = b.predict(x)
    np.testing.assert_array_equal(probs, all_image)
    assert emb.shape[0] == 4
