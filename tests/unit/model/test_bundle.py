"""Loading a bundle: safe mode refuses code inside a model file; damaged members are named; the
bundle.json format (1: one operating point; 2: one per input mode) is checked on read; scoring
follows the mode rule of skinlesion.measure.scoring with each mode's own operating point."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
    OperatingPoint,
    malignant_flags,
    model_inputs,
)
from skinlesion.model.bundle import Bundle
from skinlesion.model.bundle_json import (
    BUNDLE_FORMAT_VERSION,
    BUNDLE_JSON,
    choose_bundle,
    file_md5,
    is_bundle,
    read_bundle_json,
    write_bundle_json,
)
from tests.builders.bundles import POINTS, TINY_SIZE, tiny_model, write_bundle

SIZE = TINY_SIZE  # the tiny members' image size (write_bundle's default)


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
    unbiased = json.loads(json.dumps(b.meta))
    unbiased["operating_points"][IMAGE_ONLY]["class_bias"] = None  # the same members, temperature only
    _, plain = dataclasses.replace(b, meta=unbiased).predict(x)
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


def test_bundle_json_is_written_with_its_format_version_and_read_back(tmp_path):
    meta = json.loads((write_bundle(tmp_path / "src", fusion=True)).joinpath(BUNDLE_JSON).read_text())
    del meta["format_version"]
    root = tmp_path / "src"
    write_bundle_json(root, meta)
    written = json.loads((root / BUNDLE_JSON).read_text())
    assert written == {"format_version": BUNDLE_FORMAT_VERSION, **meta} and "format_version" not in meta
    assert read_bundle_json(root)["format_version"] == BUNDLE_FORMAT_VERSION
    with pytest.raises(ValueError, match="bundle.json: this code writes format_version 2, not 1"):
        write_bundle_json(root, {**meta, "format_version": 1})


def test_the_default_bundle_is_production_once_promoted_else_the_candidate(tmp_path):
    production, candidate = tmp_path / "models" / "production", tmp_path / "models" / "ensemble"
    assert not is_bundle(production) and choose_bundle(production, candidate) == candidate
    write_bundle(production, fusion=False)
    assert is_bundle(production) and choose_bundle(str(production), candidate) == production


def test_the_operating_points_are_parsed_once_per_loaded_bundle(fusion_bundle, monkeypatch):
    b = dataclasses.replace(fusion_bundle)  # a new instance: nothing parsed yet
    calls = []
    real = OperatingPoint.from_json

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(OperatingPoint, "from_json", staticmethod(counted))
    for _ in range(3):
        b.score(_images(2), None)
        b.threshold(METADATA)
    assert len(calls) == len(POINTS)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({METADATA: POINTS[METADATA]}, "'operating_points' must map 'image_only' (and optionally 'metad"),
        ({**POINTS, "meta": POINTS[METADATA]}, "'operating_points' must map 'image_only'"),
        ({IMAGE_ONLY: 0.3}, "operating point 'image_only' is not an object"),
        ({**POINTS, METADATA: {**POINTS[METADATA], "temperature": "hot"}},
         "metadata: 'temperature' must be a number in [0.001, 1000], got 'hot'"),
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


# --------------------------------------------------------------------------- bundle.json values


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    """A real image-only format-2 bundle; each case below copies it and edits its bundle.json."""
    return write_bundle(
        tmp_path_factory.mktemp("good"), fusion=False, points={IMAGE_ONLY: POINTS[IMAGE_ONLY]}
    )


def edited(good: Path, root: Path, where: tuple, literal: str) -> Path:
    """A copy of ``good`` with the value at ``where`` in bundle.json written as the raw JSON text
    ``literal`` (so NaN, Infinity and 1e999 are in the file exactly as a hand edit puts them)."""
    import shutil

    shutil.copytree(good, root)
    meta = json.loads((root / "bundle.json").read_text())
    node = meta
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = "@@VALUE@@"
    (root / "bundle.json").write_text(json.dumps(meta, indent=1).replace('"@@VALUE@@"', literal))
    return root


OP = ("operating_points", IMAGE_ONLY)
W = ("members", 0, "weight")
T = "image_only: 'temperature' must be a number in [0.001, 1000], got "
TH = "image_only: 'threshold' must be a number in [0, 1], got "
MEMBERS = "'members' must be a non-empty list of {name, weight, path, md5} objects"
BAD_VALUES = [
    # (where, literal JSON text, message after "<path>/bundle.json: ")
    ((*OP, "threshold"), "NaN", TH + "nan"),
    ((*OP, "threshold"), "Infinity", TH + "inf"),
    ((*OP, "threshold"), "1e999", TH + "inf"),
    ((*OP, "threshold"), '"abc"', TH + "'abc'"),
    ((*OP, "threshold"), "2.0", TH + "2.0"),
    ((*OP, "threshold"), "-1", TH + "-1"),
    ((*OP, "threshold"), "null", TH + "None"),
    ((*OP, "temperature"), "0", T + "0"),
    ((*OP, "temperature"), "-1", T + "-1"),
    ((*OP, "temperature"), "NaN", T + "nan"),
    ((*OP, "temperature"), "1e-320", T + "1e-3"),
    ((*OP, "temperature"), '"abc"', T + "'abc'"),
    ((*OP, "class_bias"), "[0, 0, 0, 0, 0, 0, NaN]", "image_only: 'class_bias' must be 7 finite numbers"),
    (W, "NaN", "member 'm' 'weight' must be a finite number >= 0, got nan"),
    (W, "-Infinity", "member 'm' 'weight' must be a finite number >= 0, got -inf"),
    (W, "-1", "member 'm' 'weight' must be a finite number >= 0, got -1"),
    (W, '"abc"', "member 'm' 'weight' must be a finite number >= 0, got 'abc'"),
    (W, "true", "member 'm' 'weight' must be a finite number >= 0, got True"),
    (W, "0", "member 'weight's must have a positive sum, got 0"),
    (("members", 0, "name"), "7", "member 0 'name' must be a non-empty text, got 7"),
    (("members", 0, "path"), "null", "member 'm' 'path' must be a relative file path, got None"),
    (("members", 0, "md5"), "5", "member 'm' 'md5' must be hex text, got 5"),
    (("members",), "[]", MEMBERS + ", got []"),
    (("members",), '"m"', MEMBERS + ", got 'm'"),
    (("members", 0), '"m"', MEMBERS + "; member 0 is 'm'"),
    (("image_size",), '"abc"', "'image_size' must be a whole number of pixels in 8..2048, got 'abc'"),
    (("image_size",), "0", "'image_size' must be a whole number of pixels in 8..2048, got 0"),
    (("image_size",), "8.0", "'image_size' must be a whole number of pixels in 8..2048, got 8.0"),
    (("image_size",), "NaN", "'image_size' must be a whole number of pixels in 8..2048, got nan"),
    (("classes",), json.dumps(list(CLASSES)[::-1]), "'classes' must be HAM10000's 7 classes in this order"),
    (("classes",), json.dumps(list(CLASSES)[:6]), "'classes' must be HAM10000's 7 classes in this order"),
    (("classes",), json.dumps(["nv"] * 7), "'classes' must be HAM10000's 7 classes in this order"),
    (("aspect",), '"stretch"', "'aspect' must be 'crop' or 'pad', got 'stretch'"),
    (("format_version",), "true", "format_version True; this code reads 1 and 2"),
    (("params", "evaluate", "batch_size"), '"abc"',
     "'params.evaluate.batch_size' must be a whole number in 1..4096, got 'abc'"),
    (("params", "evaluate", "tta"), '"yes"', "'params.evaluate.tta' must be true or false, got 'yes'"),
    (("params", "prepare", "draft_gap"), "NaN",
     "'params.prepare.draft_gap' must be a number in 1..16, got nan"),
    (("params", "validate", "max_pixels"), "-1",
     "'params.validate.max_pixels' must be a whole number of pixels >= 1, got -1"),
    (("params", "drift"), '{"max_pixels": 1.5}',
     "'params.drift.max_pixels' must be a whole number of pixels >= 1, got 1.5"),
    (("params", "evaluate"), "[]", "'params.evaluate' must be an object, got []"),
    (("data_version", "md5"), "12", "'data_version' must be {path, md5} (md5 text or null), got"),
    # a key nothing else reads: Python's json takes NaN, but it is not JSON and calibrate never writes it
    (("metrics",), '{"macro_auc": NaN}', "'metrics.macro_auc' is nan, not a finite number (NaN and Infinity"),
]  # fmt: skip


@pytest.mark.parametrize(("where", "literal", "message"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_every_bad_bundle_json_value_is_one_line_naming_the_key(
    good_bundle, tmp_path, where, literal, message
):
    root = edited(good_bundle, tmp_path / "b", where, literal)
    for read in (read_bundle_json, Bundle.load):  # the web app and drift read through the first
        with pytest.raises(StageError) as e:
            read(root)
        text = str(e.value)
        assert text.startswith(f"{root / 'bundle.json'}: {message}"), text
        assert "\n" not in text


def test_a_format_1_bundle_with_a_nan_threshold_is_refused_by_name(tmp_path):
    root = write_bundle(
        tmp_path / "v1", fusion=False, format_version=1, points={"temperature": 1.0, "threshold": 0.3}
    )
    text = (root / "bundle.json").read_text().replace('"threshold": 0.3', '"threshold": NaN')
    (root / "bundle.json").write_text(text)
    with pytest.raises(StageError) as e:
        Bundle.load(root)
    assert (
        str(e.value) == f"{root / 'bundle.json'}: image_only: 'threshold' must be a number in [0, 1], got nan"
    )


@pytest.mark.parametrize(("threshold", "temperature"), [(0, 0.001), (1, 1000), (0.0, 0.05), (1.0, 20)])
def test_the_ends_of_the_accepted_ranges_load(good_bundle, tmp_path, threshold, temperature):
    # what calibrate can write (a threshold of exactly 0 or 1; T within its fit bounds) is served
    root = edited(good_bundle, tmp_path / "b", (*OP, "threshold"), json.dumps(threshold))
    meta = json.loads((root / "bundle.json").read_text())
    meta["operating_points"][IMAGE_ONLY]["temperature"] = temperature
    (root / "bundle.json").write_text(json.dumps(meta))
    b = Bundle.load(root)
    assert b.threshold() == threshold
    probs = b.predict(_images(3))[1]
    assert np.isfinite(probs).all()


def test_a_zero_weight_member_beside_a_weighted_one_is_fine(tmp_path):
    root = write_bundle(tmp_path / "b", fusion=False, points={IMAGE_ONLY: POINTS[IMAGE_ONLY]})
    meta = json.loads((root / "bundle.json").read_text())
    meta["members"].append({**meta["members"][0], "name": "unused", "weight": 0.0})
    (root / "bundle.json").write_text(json.dumps(meta))
    assert [m.name for m in Bundle.load(root).members] == ["m"]
    meta["members"][1]["name"] = "m"
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(StageError, match=r"bundle.json: member 1 'name' listed twice, got 'm'$"):
        read_bundle_json(root)


def test_a_member_symlink_resolving_outside_the_bundle_folder_is_refused(tmp_path):
    root = write_bundle(tmp_path / "b", fusion=False, points={IMAGE_ONLY: POINTS[IMAGE_ONLY]})
    outside = tiny_model(tmp_path / "elsewhere" / "model.keras", SIZE)
    # a member folder that is a symlink out of the bundle: the path text itself looks harmless
    (root / "members" / "out").symlink_to(outside.parent, target_is_directory=True)
    meta = json.loads((root / "bundle.json").read_text())
    meta["members"][0].update(path="members/out/model.keras", md5=file_md5(outside))
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(StageError) as e:
        Bundle.load(root)
    assert str(e.value) == (
        f"{root / 'bundle.json'}: member 'm' path 'members/out/model.keras' resolves to "
        f"{outside.resolve()}, outside the bundle folder (a symlink?)"
    )
    # a symlink that stays inside the folder is followed
    (root / "members" / "out").unlink()
    (root / "members" / "alias").symlink_to("m", target_is_directory=True)
    meta["members"][0].update(path="members/alias/model.keras", md5=file_md5(root / "members/m/model.keras"))
    (root / "bundle.json").write_text(json.dumps(meta))
    assert [m.name for m in Bundle.load(root).members] == ["m"]


def test_the_drift_reference_reader_refuses_the_same_bundle(good_bundle, tmp_path):
    from skinlesion.model.drift_reference import read_drift_reference

    root = edited(good_bundle, tmp_path / "b", (*OP, "threshold"), "NaN")
    with pytest.raises(
        StageError, match=r"bundle.json: image_only: 'threshold' must be a number in \[0, 1\]"
    ):
        read_drift_reference(root)


# --------------------------------------------------------------------------- training data


SYNTHETIC = {
    "source": "synthetic",
    "synthetic": True,
    "data_version": "d70be3bf" * 4 + ".dir",
    "extra_sources": [],
}


def test_what_a_bundle_was_trained_on_is_read_back_and_said_first(tmp_path):
    from skinlesion.model.bundle_json import SYNTHETIC_WARNING, TrainingData, read_training_data, trained_on

    root = write_bundle(tmp_path / "demo", fusion=False, training_data=SYNTHETIC)
    meta = read_bundle_json(root)
    assert read_training_data(meta) == TrainingData("synthetic", True, SYNTHETIC["data_version"])
    assert trained_on(meta) == f"trained on {SYNTHETIC_WARNING} (data d70be3bf)"
    assert SYNTHETIC_WARNING == "synthetic demo data (not real dermoscopy) — do not use on real images"
    real = {"source": "dataverse", "synthetic": False, "data_version": None, "extra_sources": ["../inbox/b"]}
    root = write_bundle(tmp_path / "real", fusion=False, training_data=real)
    assert trained_on(read_bundle_json(root)) == (
        "trained on HAM10000 via dataverse (data version not recorded; with labelled batches ../inbox/b)"
    )
    assert TrainingData.of_params({"source": "local:/x", "extra_sources": ["/y"]}, "ab").to_json() == {
        "source": "local:/x", "synthetic": False, "data_version": "ab", "extra_sources": ["/y"],
    }  # fmt: skip


def test_an_older_bundle_says_its_params_source_or_unknown(tmp_path):
    from skinlesion.model.bundle_json import UNKNOWN_TRAINING_DATA, read_training_data, trained_on

    # before the record, every calibrate wrote the params snapshot: its download.source still warns
    params = {"prepare": {"draft_gap": 2.0}, "download": {"source": "synthetic"}}
    meta = read_bundle_json(write_bundle(tmp_path / "old", fusion=False, params=params))
    assert read_training_data(meta).recorded is False
    assert trained_on(meta) == (
        "trained on synthetic demo data (not real dermoscopy) — do not use on real images (data version "
        "not recorded; read from the params of a bundle older than its training_data record)"
    )
    bare = read_bundle_json(write_bundle(tmp_path / "bare", fusion=False))  # no download params either
    assert read_training_data(bare) is None
    assert trained_on(bare) == UNKNOWN_TRAINING_DATA
    assert UNKNOWN_TRAINING_DATA.startswith("training data: unknown (a bundle older than its training_data")


BAD_TRAINING_DATA = [
    ("[]", "'training_data' must be {source, synthetic, data_version, extra_sources}, got []"),
    ('{"source": "", "synthetic": false}', "'training_data.source' must be a non-empty text"),
    ('{"source": "dataverse", "synthetic": "no"}',
     "'training_data.synthetic' must be true or false, got 'no'"),
    ('{"source": "synthetic", "synthetic": false}', "'training_data.synthetic' is false but the source is"),
    ('{"source": "dataverse", "synthetic": false, "data_version": 12}',
     "'training_data.data_version' must be the raw data's md5 (text) or null, got 12"),
    ('{"source": "dataverse", "synthetic": false, "extra_sources": "b"}',
     "'training_data.extra_sources' must be a list of texts, got 'b'"),
]  # fmt: skip


@pytest.mark.parametrize(("literal", "message"), BAD_TRAINING_DATA, ids=lambda v: str(v)[:40])
def test_a_bad_training_data_record_is_one_line_naming_the_key(good_bundle, tmp_path, literal, message):
    root = edited(good_bundle, tmp_path / "b", ("training_data",), literal)
    with pytest.raises(StageError) as e:
        read_bundle_json(root)
    assert str(e.value).startswith(f"{root / 'bundle.json'}: {message}"), str(e.value)
