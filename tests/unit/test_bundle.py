"""Loading a bundle: safe mode refuses code inside a model file; damaged members are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.bundle import Bundle, file_md5
from stages.common import CLASSES, StageError


def _model(lambda_layer: bool):
    import keras

    inp = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(inp)
    if lambda_layer:
        # arbitrary Python in a model file: what safe_mode exists to refuse
        x = keras.layers.Lambda(lambda t: t * 2.0, name="crafted")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="probs")(x)
    return keras.Model(inp, out)


def _bundle(root: Path, *, lambda_layer: bool = False, **extra) -> Path:
    member = root / "members" / "m" / "model.keras"
    member.parent.mkdir(parents=True)
    _model(lambda_layer).save(member)
    meta = {
        "classes": list(CLASSES), "image_size": 8, "aspect": "crop", "temperature": 1.0, "threshold": 0.5,
        "members": [{"name": "m", "weight": 1.0, "path": "members/m/model.keras", "md5": file_md5(member)}],
        **extra,
    }  # fmt: skip
    (root / "bundle.json").write_text(json.dumps(meta))
    return root


def test_a_plain_bundle_loads_and_predicts_calibrated_probabilities(tmp_path):
    b = Bundle.load(_bundle(tmp_path / "ok"))
    emb, probs = b.predict(np.zeros((3, 8, 8, 3), np.uint8))
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


def test_missing_bundle_json_names_the_path(tmp_path):
    with pytest.raises(StageError, match=r"bundle.json: not found; is .* a model bundle"):
        Bundle.load(tmp_path)


def test_class_bias_and_the_balanced_decision_are_applied_as_bundle_json_says(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    bias = [0.5, -1.0, 0.0, 0.25, 1.0, -0.5, -0.25]
    prior = [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]
    b = Bundle.load(_bundle(tmp_path / "biased", class_bias=bias, decision="balanced", class_prior=prior))
    _, probs = b.predict(x)
    b.meta["class_bias"] = None  # the same members, temperature only
    _, plain = b.predict(x)
    assert not np.allclose(plain, probs)
    expected = plain * np.exp(bias)  # softmax(log p + b) = p e^b / sum
    np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(b.decide(probs), (probs / np.array(prior)).argmax(1))
    # "argmax" (or no decision key: bundles written before it) ignores the prior
    argmax = Bundle.load(_bundle(tmp_path / "argmax", decision="argmax", class_prior=prior))
    np.testing.assert_array_equal(argmax.decide(probs), probs.argmax(1))


@pytest.mark.parametrize(
    ("key", "value"),
    [("class_bias", [0.0] * 6), ("class_bias", [0.0] * 6 + ["x"]), ("class_prior", [0.0] + [0.1] * 6),
     ("class_bias", [float("nan")] * 7)],
)  # fmt: skip
def test_a_malformed_bias_or_prior_is_refused_by_name(tmp_path, key, value):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "bundle.json").write_text(json.dumps({
        "classes": list(CLASSES), "image_size": 8, "temperature": 1.0, "threshold": 0.5, "members": [],
        key: value,
    }))  # fmt: skip
    with pytest.raises(StageError, match=rf"bundle.json: '{key}' must be 7 finite numbers"):
        Bundle.load(root)
