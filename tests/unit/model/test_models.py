"""Model building: every backbone trains one step, preprocessing per family, heads, fusion, saving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from skinlesion.core.errors import StageError  # noqa: E402
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES  # noqa: E402
from skinlesion.model.losses import class_weights, make_loss  # noqa: E402
from skinlesion.model.networks import (  # noqa: E402
    BACKBONE_FAMILIES,
    FeatureGate,
    MetadataEncoding,
    ModelSpec,
    Preprocess,
    build_backbone,
    build_model,
    load_model,
    output_bias_from_counts,
    recalibrate_batchnorm,
    set_trainable,
)
from skinlesion.params.train import BACKBONES  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SIZE = 32
COUNTS = [30, 50, 110, 12, 111, 670, 14]


def _batch(n=4, *, meta=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.eye(len(CLASSES), dtype=np.float32)[np.arange(n) % len(CLASSES)]
    if meta:
        x = {
            "image": x,
            "age": np.array([45.0, np.nan, 70.0, 5.0][:n], np.float32),
            "sex": np.array([0, 1, 2, 0][:n], np.int32),
            "localization": np.array([0, 2, 13, 14][:n], np.int32),
        }
    return x, y


def _model(backbone="custom_cnn", **kw):
    pretrained = kw.pop("pretrained", False)
    bb, _ = build_backbone(backbone, SIZE, "none")
    spec = ModelSpec(backbone=backbone, image_size=SIZE, output_bias=output_bias_from_counts(COUNTS), **kw)
    return build_model(spec, bb, pretrained=pretrained)


def test_backbone_table_matches_params():
    assert set(BACKBONE_FAMILIES) == set(BACKBONES)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_builds_and_trains_one_step(backbone):
    model = _model(backbone, rotation=0.1, zoom=0.1, shift=0.1, brightness=0.1, contrast=0.1)
    assert model.get_layer("backbone").name == "backbone"
    assert model.inputs[0].dtype == "uint8" and tuple(model.inputs[0].shape) == (None, SIZE, SIZE, 3)
    # eager: one step without tracing the graph keeps 8 backbones within ~30 s on 2 cores
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=make_loss("focal", class_weights(COUNTS)),
                  run_eagerly=True)  # fmt: skip
    x, y = _batch()
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss) and loss > 0
    changed = sum(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    assert changed > len(before) // 3, f"{backbone}: only {changed} of {len(before)} weight tensors moved"
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, len(CLASSES)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "mode, family",
    [("tf", "mobilenet_v2"), ("caffe", "resnet50"), ("torch", "densenet"), ("raw", "efficientnet")],
)
def test_preprocess_matches_keras_preprocess_input(mode, family):
    x = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    ref = getattr(keras.applications, family).preprocess_input(x.astype(np.float32).copy())
    np.testing.assert_allclose(np.asarray(Preprocess(mode)(x)), ref, rtol=1e-5, atol=1e-4)


def test_preprocess_unit_mode_and_bad_mode():
    np.testing.assert_allclose(np.asarray(Preprocess("unit")(np.full((1, 2, 2, 3), 255, np.uint8))), 1.0)
    with pytest.raises(ValueError, match="unknown mode 'bgr'"):
        Preprocess("bgr")


def test_metadata_encoding_by_hand():
    enc = MetadataEncoding()
    out = np.asarray(enc([np.array([50.0, np.nan], np.float32), np.array([1, 2]), np.array([3, 99])]))
    assert out.shape == (2, 2 + len(SEXES) + len(LOCALIZATIONS))
    want0 = np.zeros(out.shape[1], np.float32)
    want0[[0, 1, 2 + 1, 2 + len(SEXES) + 3]] = [0.5, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(out[0], want0)
    # unknown age -> 0 with flag 0; a localization index out of range -> no one-hot bit, no error
    want1 = np.zeros(out.shape[1], np.float32)
    want1[2 + 2] = 1.0
    np.testing.assert_array_equal(out[1], want1)


def test_fusion_on_off():
    plain = _model()
    assert [t.name for t in plain.inputs] == ["image"]
    assert not any(isinstance(layer, FeatureGate) for layer in plain.layers)

    fused = _model(fusion=True, fusion_units=8)
    assert sorted(t.name for t in fused.inputs) == ["age", "image", "localization", "sex"]
    # Each named input reaches its own slot of the metadata vector. Sex and site indices differ in
    # every row, so swapping the two anywhere between the model's inputs and the one-hots (the
    # input dict, the encoder's argument order, its unpacking) moves or drops a bit here.
    encoded = keras.Model(fused.input, fused.get_layer("meta_encoding").output)
    meta = {
        "image": np.zeros((2, SIZE, SIZE, 3), np.uint8),
        "age": np.array([45.0, np.nan], np.float32),
        "sex": np.array([1, 2], np.int32),
        "localization": np.array([5, 13], np.int32),
    }
    want = np.zeros((2, 2 + len(SEXES) + len(LOCALIZATIONS)), np.float32)
    want[0, [0, 1, 2 + 1, 2 + len(SEXES) + 5]] = [0.45, 1.0, 1.0, 1.0]
    want[1, [2 + 2, 2 + len(SEXES) + 13]] = 1.0  # unknown age: 0 with its "known" flag 0
    np.testing.assert_allclose(encoded.predict(meta, verbose=0), want, rtol=1e-6)

    gate = fused.get_layer("meta_gate")
    assert float(gate.scale.numpy()) == 0.0  # starts as the image-only model
    features = keras.Model(fused.inputs, gate.output)  # the gated image features
    x, _ = _batch(meta=True)
    # images 1, 3, 4 get other metadata; image 2 (unknown age) keeps its own
    other = dict(
        x, age=np.array([10.0, np.nan, 30.0, 40.0], np.float32), sex=np.array([2, 1, 2, 2], np.int32)
    )
    f1, f2 = features.predict(x, verbose=0), features.predict(other, verbose=0)
    np.testing.assert_array_equal(f1, f2)  # a = 0: metadata has no effect yet
    gate.scale.assign(1.0)
    f1, f2 = features.predict(x, verbose=0), features.predict(other, verbose=0)
    assert np.all(np.isfinite(f1))  # the unknown (NaN) age of image 2 included
    moved = np.abs(f1 - f2).max(axis=1) / (np.abs(f1).max(axis=1) + 1e-12)
    assert moved[1] < 1e-6 < 1e-3 < moved[[0, 2, 3]].min()
    # and the gate is trained: one step moves a
    fused.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", run_eagerly=True)
    fused.train_on_batch(*_batch(meta=True))
    assert float(gate.scale.numpy()) != 1.0


def test_heads_and_output_bias_from_priors():
    model = _model(head="funnel", funnel_units=64, dropout=0.2)
    dense = [layer for layer in model.layers if layer.name.startswith("funnel_dense")]
    assert [d.units for d in dense] == [64, 32, 16]
    assert all(d.get_config()["activation"] in ("swish", "silu") for d in dense)
    out = model.get_layer("probs")
    np.testing.assert_allclose(
        np.exp(out.bias.numpy()), (np.array(COUNTS) + 1) / (sum(COUNTS) + 7), rtol=1e-5
    )
    # with a zero kernel the untrained model predicts the class priors
    out.kernel.assign(np.zeros(out.kernel.shape, np.float32))
    probs = model.predict(_batch()[0], verbose=0)
    np.testing.assert_allclose(probs[0], (np.array(COUNTS) + 1) / (sum(COUNTS) + 7), rtol=1e-5)
    gap = _model(head="gap")
    assert not any(layer.name.startswith("funnel") for layer in gap.layers)


def test_augmentation_only_while_training():
    model = _model(rotation=0.5, zoom=0.2, shift=0.1, brightness=0.2, contrast=0.2)
    x, _ = _batch()
    a, b = model(x, training=False), model(x, training=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    aug = keras.Model(model.inputs, model.get_layer("preprocess").output)
    t1, t2 = np.asarray(aug(x, training=True)), np.asarray(aug(x, training=True))
    assert np.abs(t1 - t2).mean() > 1e-3
    off = _model(flip="none")
    assert not any(layer.name.startswith("aug_") for layer in off.layers)


def test_set_trainable_depths_keep_bn_frozen():
    model = _model("mobilenetv2", pretrained=True)
    bb = model.get_layer("backbone")
    head_only = set_trainable(model, None)
    assert not bb.trainable and head_only == 2  # the output dense: kernel + bias
    set_trainable(model, 10)
    trainable = [layer for layer in bb.layers if layer.trainable and layer.weights]
    assert trainable and all(bb.layers.index(layer) >= len(bb.layers) - 10 for layer in trainable)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    everything = set_trainable(model, -1, freeze_bn=False)
    assert everything == len(model.weights) - 2 * sum(
        isinstance(layer, keras.layers.BatchNormalization) for layer in bb.layers
    )  # all but the BN moving mean/variance


def test_save_and_load_with_safe_mode(tmp_path):
    model = _model(fusion=True, head="funnel", funnel_units=32, rotation=0.1, brightness=0.1)
    model.get_layer("meta_gate").scale.assign(0.7)
    path = tmp_path / "model.keras"
    model.save(path)
    x, _ = _batch(meta=True)
    np.testing.assert_allclose(load_model(path).predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    # a fresh interpreter that only imports skinlesion.model.networks loads it in safe mode too
    code = textwrap.dedent(f"""
        import keras, skinlesion.model.networks
        m = keras.saving.load_model({str(path)!r}, safe_mode=True, compile=False)
        print(float(m.get_layer("meta_gate").scale.numpy()))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) == pytest.approx(0.7)


def test_local_weights_file(tmp_path):
    keras.utils.set_random_seed(3)
    src, used = build_backbone("mobilenet", SIZE, "none")
    assert used == "scratch"
    path = tmp_path / "mobilenet_notop.weights.h5"
    src.save_weights(path)
    loaded, used = build_backbone("mobilenet", SIZE, str(path))
    assert used == str(path)
    for a, b in zip(src.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StageError, match=r"train.weights: '.*missing.h5' is neither 'imagenet', 'none' nor"):
        build_backbone("mobilenet", SIZE, str(tmp_path / "missing.h5"))
    with pytest.raises(StageError, match="does not fit resnet50 without its top"):
        build_backbone("resnet50", SIZE, str(path))


def test_mixed_precision_keeps_float32_output():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(fusion=True, rotation=0.1)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=make_loss("focal", class_weights(COUNTS)),
                      run_eagerly=True)  # fmt: skip
        x, y = _batch(meta=True)
        assert np.isfinite(float(model.train_on_batch(x, y)))
        assert model.get_layer("meta_gate").compute_dtype == "float16"
        assert model.get_layer("probs").compute_dtype == "float32"
        assert model.predict(x, verbose=0).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_xla_jit_compiled_step_on_cpu():
    # With augmentation moved out of the model (what the train stage does under jit_compile),
    # Keras keeps XLA on; with the random geometric layers inside, Keras silently turns it off.
    from tensorflow.python.framework import config as tf_config

    # Keras also refuses XLA under op determinism, which an earlier training test may have
    # switched on for the whole process.
    was_deterministic = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    try:
        _xla_checks()
    finally:
        if was_deterministic:
            tf_config.enable_op_determinism()


def _xla_checks():
    kw = dict(rotation=0.1, zoom=0.1, shift=0.1, brightness=0.1, contrast=0.1)
    model = _model(augment_in_model=False, **kw)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=make_loss("focal", class_weights(COUNTS)),
                  jit_compile=True)  # fmt: skip
    assert model.jit_compile is True
    assert np.isfinite(float(model.train_on_batch(*_batch())))
    inside = _model(**kw)
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        inside.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
    assert inside.jit_compile is False


def _online() -> bool:
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_imagenet_offline_fallback_message_for_real(tmp_path):
    """On this offline machine the real Keras download fails: one WARNING, then scratch; or a clear error."""
    if _online():
        pytest.skip("online: the ImageNet download would succeed, the offline path cannot be exercised")
    code = textwrap.dedent("""
        import json, sys
        from skinlesion.core.cli import setup_logging
        from skinlesion.core.errors import StageError
        from skinlesion.model.networks import build_backbone
        setup_logging()
        _, used = build_backbone("mobilenetv2", 32, "imagenet", fallback="scratch")
        try:
            build_backbone("mobilenetv2", 32, "imagenet", fallback="fail")
            err = None
        except StageError as e:
            err = str(e)
        print(json.dumps({"used": used, "error": err}))
    """)
    # an empty Keras cache, so a previously downloaded file cannot make the test pass vacuously
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras"), TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["used"] == "scratch"
    warnings = [line for line in res.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, res.stderr
    assert "ImageNet weights for mobilenetv2 could not be loaded" in warnings[0]
    assert "training from scratch (train.weights_fallback: scratch)" in warnings[0]
    assert "URL fetch failure" in warnings[0]
    assert not any("UserWarning" in line for line in res.stderr.splitlines())
    assert out["error"].startswith("train.weights: ImageNet weights for mobilenetv2 could not be loaded (")
    assert "train.weights_fallback: scratch" in out["error"]


def test_scratch_backbone_bn_momentum_is_limited():
    def momenta(model):
        return {layer.momentum for layer in model.get_layer("backbone").layers
                if isinstance(layer, keras.layers.BatchNormalization)}  # fmt: skip

    assert momenta(_model("mobilenetv2", pretrained=True)) == {0.999}  # ImageNet weights: as trained
    assert momenta(_model("mobilenetv2")) == {0.99}  # from scratch: statistics that follow a short run


def test_recalibrate_batchnorm_gives_the_statistics_of_the_images_under_the_final_weights():
    model = _model("resnet_small")
    bb, pre = model.get_layer("backbone"), model.get_layer("preprocess")
    bns = [layer for layer in bb.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:  # stale statistics, as a short from-scratch run leaves them
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 5.0, np.float32))
        layer.moving_variance.assign(np.full(layer.moving_variance.shape, 9.0, np.float32))
    x, _ = _batch(12, seed=3)
    stale = np.asarray(bb(pre(x), training=False))
    batch_stats = np.asarray(bb(pre(x), training=True))  # every layer normalised by this batch
    assert recalibrate_batchnorm(model, [x]) == len(bns) > 10
    # one batch: the inference-mode forward now equals the batch-statistics forward, layer by
    # layer through every residual block (resnet_small has no dropout)
    np.testing.assert_allclose(np.asarray(bb(pre(x), training=False)), batch_stats, rtol=1e-3, atol=1e-4)
    assert not np.allclose(stale, batch_stats, atol=1e-2)
    assert {layer.momentum for layer in bns} == {0.99}  # restored (build_model's scratch cap)


def test_recalibrate_batchnorm_averages_batches_by_size_without_augmentation_or_dropout():
    model = _model("custom_cnn", rotation=0.5, zoom=0.2)  # augmentation would move the statistics
    bb, pre = model.get_layer("backbone"), model.get_layer("preprocess")
    first = bb.get_layer("block1_bn1")
    drop_rates = {layer.name: layer.rate for layer in bb.layers if isinstance(layer, keras.layers.Dropout)}
    assert drop_rates and all(r > 0 for r in drop_rates.values())
    conv = keras.Model(bb.input, bb.get_layer("block1_conv1").output)
    batches = [_batch(n, seed=s)[0] for n, s in ((8, 1), (3, 2))]  # unequal: weights 8 and 3
    feats = [np.asarray(conv(pre(b))).reshape(-1, first.moving_mean.shape[0]) for b in batches]
    mean = (8 * feats[0].mean(0) + 3 * feats[1].mean(0)) / 11
    var = (8 * feats[0].var(0) + 3 * feats[1].var(0)) / 11
    recalibrate_batchnorm(model, iter(batches))
    np.testing.assert_allclose(np.asarray(first.moving_mean), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(first.moving_variance), var, rtol=1e-4, atol=1e-5)
    # the model is left as it was found: dropout rates, momentum, frozen layers
    assert {
        layer.name: layer.rate for layer in bb.layers if isinstance(layer, keras.layers.Dropout)
    } == drop_rates
    assert first.momentum == 0.99


def test_recalibrate_batchnorm_of_a_frozen_bn_and_of_no_images():
    model = _model("custom_cnn")
    set_trainable(model, -1, freeze_bn=True)
    first = model.get_layer("backbone").get_layer("block1_bn1")
    before = np.asarray(first.moving_mean).copy()
    recalibrate_batchnorm(model, [_batch(6)[0]])
    assert not np.allclose(np.asarray(first.moving_mean), before)  # frozen BN recalibrated too
    assert first.trainable is False  # ... and still frozen
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(model, [])
