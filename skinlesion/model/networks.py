"""Model building for the train stage: backbones, per-family preprocessing, heads, metadata fusion.

A built model takes raw uint8 RGB images (``[B, S, S, 3]``, plus ``age``/``sex``/``localization``
when metadata fusion is on) and returns float32 class probabilities. Augmentation and the
preprocessing each backbone family was trained with live *inside* the model, so training,
evaluation and serving cannot disagree about them, and a saved ``model.keras`` is all a
consumer needs. The project's own layers are registered serializable: ``import skinlesion.model.networks``
(or :func:`load_model`) and the file loads with ``safe_mode=True``.

This module imports Keras (and so TensorFlow) at import time; the train stage imports it only
inside the functions that build a model.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONE_FAMILIES",
    "ModelSpec",
    "Preprocess",
    "MetadataEncoding",
    "FeatureGate",
    "build_backbone",
    "build_model",
    "augmentation_layers",
    "set_trainable",
    "synchronize_batchnorm",
    "load_model",
]

# backbone -> (keras.applications constructor, preprocessing mode). The modes reproduce each
# family's `preprocess_input`: "tf" scales to [-1, 1] (MobileNets), "caffe" is BGR minus the
# ImageNet mean (ResNet50), "torch" is ImageNet mean/std on [0, 1] (DenseNet), "raw" passes
# 0-255 through because Keras's EfficientNets rescale and normalise inside the network, and
# "unit" ([0, 1]) is for the custom CNN trained from scratch.
BACKBONE_FAMILIES: dict[str, tuple[str | None, str]] = {
    "efficientnetb0": ("EfficientNetB0", "raw"),
    "efficientnetb1": ("EfficientNetB1", "raw"),
    "efficientnetb3": ("EfficientNetB3", "raw"),
    "mobilenet": ("MobileNet", "tf"),
    "mobilenetv2": ("MobileNetV2", "tf"),
    "resnet50": ("ResNet50", "caffe"),
    "densenet121": ("DenseNet121", "torch"),
    "custom_cnn": (None, "unit"),
    "resnet_small": (None, "unit"),
}

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_DOWNLOAD_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- custom layers


@keras.saving.register_keras_serializable(package="skinlesion")
class Preprocess(keras.layers.Layer):
    """Cast 0-255 pixels to float and apply a backbone family's input normalisation."""

    MODES = ("tf", "caffe", "torch", "raw", "unit")

    def __init__(self, mode: str = "raw", **kwargs: Any):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Preprocess: unknown mode {mode!r}; use one of {self.MODES}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_RGB, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD_RGB, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="skinlesion")
class MetadataEncoding(keras.layers.Layer):
    """``(age, sex, localization)`` -> ``[age/100, age known, one-hot sex, one-hot localization]``.

    Unknown ages arrive as NaN (the TFRecord convention) and become 0 with a "known" flag of 0,
    so the network can tell "unknown" from "age 0". Out-of-range indices give an all-zero
    one-hot rather than an error: a new category at serving time must not crash the model.
    """

    def __init__(self, n_sexes: int = len(SEXES), n_localizations: int = len(LOCALIZATIONS), **kwargs: Any):
        super().__init__(**kwargs)
        self.n_sexes = int(n_sexes)
        self.n_localizations = int(n_localizations)

    def call(self, inputs):
        age, sex, loc = inputs
        age = ops.reshape(ops.cast(age, "float32"), (-1, 1))
        known = ops.logical_not(ops.isnan(age))
        age = ops.where(known, age / 100.0, ops.zeros_like(age))
        sex = ops.one_hot(ops.reshape(ops.cast(sex, "int32"), (-1,)), self.n_sexes)
        loc = ops.one_hot(ops.reshape(ops.cast(loc, "int32"), (-1,)), self.n_localizations)
        out = ops.concatenate([age, ops.cast(known, "float32"), sex, loc], axis=-1)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 2 + self.n_sexes + self.n_localizations)

    def get_config(self):
        return {**super().get_config(), "n_sexes": self.n_sexes, "n_localizations": self.n_localizations}


@keras.saving.register_keras_serializable(package="skinlesion")
class FeatureGate(keras.layers.Layer):
    """``x * (1 + a * m)``: metadata gates ``m`` rescale image feature channels ``x``.

    ``a`` is one learnable scalar starting at 0, so the fused model starts out as exactly the
    image-only model and lets the metadata in only as far as it helps the loss.
    """

    def __init__(self, initial_scale: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.initial_scale = float(initial_scale)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_scale),
            trainable=True,
        )

    def call(self, inputs):
        x, m = inputs
        a = ops.cast(self.scale, x.dtype)
        return x * (1.0 + a * ops.cast(m, x.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "initial_scale": self.initial_scale}


# --------------------------------------------------------------------------- backbones


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    # Keras downloads with urllib and no timeout; a firewall that drops packets (rather than
    # refusing) would hang the stage forever instead of falling back.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _custom_cnn(input_shape: tuple[int, int, int], *, block_dropout: float = 0.25) -> keras.Model:
    """Three conv blocks (2x conv-BN-GELU, max-pool, dropout), as in the from-scratch MedAL model."""
    inp = keras.Input(input_shape, name="backbone_input")
    x = inp
    for i, filters in enumerate((32, 64, 128), start=1):
        for j in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"block{i}_bn{j}")(x)
            x = layers.Activation("gelu", name=f"block{i}_gelu{j}")(x)
        x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
        x = layers.Dropout(block_dropout, name=f"block{i}_dropout")(x)
    return keras.Model(inp, x, name="backbone")


def _resnet_small(
    input_shape: tuple[int, int, int], *, widths: Sequence[int] = (32, 64, 128, 192)
) -> keras.Model:
    """A ResNet-18-style network sized for 64-128 px from scratch on a CPU.

    A stride-2 stem, then one stage per width of two basic blocks (conv-BN-ReLU x2 with an
    identity or 1x1 projection shortcut), each stage after the first halving the resolution.
    Why residual with pre-set BN momentum (build_model caps it at 0.99): on 6.5k images the
    shortcuts keep gradients flowing from the first epoch, where a deep plain stack from
    scratch (mobilenetv2) stalls on "everything is nv".
    """
    inp = keras.Input(input_shape, name="backbone_input")
    x = layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for i, width in enumerate(widths, start=1):
        for j in (1, 2):
            stride = 2 if (i > 1 and j == 1) else 1
            name = f"stage{i}_block{j}"
            shortcut = x
            y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(
                x
            )
            y = layers.BatchNormalization(name=f"{name}_bn1")(y)
            y = layers.Activation("relu", name=f"{name}_relu1")(y)
            y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            # zero-initialised last BN: each block starts as the identity (Goyal et al. 2017)
            y = layers.BatchNormalization(gamma_initializer="zeros", name=f"{name}_bn2")(y)
            if stride != 1 or shortcut.shape[-1] != width:
                shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
                shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
            x = layers.Activation("relu", name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
    return keras.Model(inp, x, name="backbone")


# Backbones built here (no keras.applications constructor, no ImageNet weights).
_SCRATCH_BUILDERS = {"custom_cnn": _custom_cnn, "resnet_small": _resnet_small}


def build_backbone(
    name: str, image_size: int, weights: str = "none", *, fallback: str = "scratch"
) -> tuple[keras.Model, str]:
    """The feature extractor (no top) of ``name``, named ``backbone``; returns it and the weights used.

    ``weights``: ``"imagenet"`` (Keras's download, cached under ``$KERAS_HOME/models``),
    ``"none"``, or a local weights file for this backbone without its top. When the ImageNet
    download fails, ``fallback="scratch"`` logs one warning and returns randomly initialised
    weights; ``"fail"`` raises :class:`StageError`. The second value is ``"imagenet"``,
    ``"scratch"`` or the weights file's path.
    """
    if name not in BACKBONE_FAMILIES:
        raise StageError(f"train: unknown backbone {name!r}; choose from {sorted(BACKBONE_FAMILIES)}")
    ctor_name, _mode = BACKBONE_FAMILIES[name]
    shape = (image_size, image_size, 3)
    ctor = getattr(keras.applications, ctor_name) if ctor_name else None

    def make(w: str | None) -> keras.Model:
        if ctor is None:  # custom_cnn, resnet_small: no ImageNet weights exist; a file warm-starts it
            m = _SCRATCH_BUILDERS[name](shape)
            if w is not None:
                m.load_weights(w)
            return m
        with warnings.catch_warnings():
            # MobileNets warn that ImageNet weights exist only for 96-224 px and the 224 px ones
            # are used: intended (the convolutions do not care), so not worth a warning per run.
            warnings.filterwarnings("ignore", message=".*input_shape.*", category=UserWarning)
            return ctor(include_top=False, weights=w, input_shape=shape, name="backbone")

    if weights == "none":
        return make(None), "scratch"
    if weights == "imagenet" and ctor is None:
        log.info("%s has no ImageNet weights; training it from scratch", name)
        return make(None), "scratch"
    if weights == "imagenet":
        try:
            with _download_timeout(_DOWNLOAD_TIMEOUT_S):
                return make("imagenet"), "imagenet"
        except Exception as e:  # keras raises a bare Exception("URL fetch failure on ...")
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if fallback == "fail":
                raise StageError(
                    f"train.weights: ImageNet weights for {name} could not be loaded ({reason}); "
                    "connect to the internet once (Keras caches them under ~/.keras/models), set "
                    "train.weights to a local weights file, or set train.weights_fallback: scratch"
                ) from None
            log.warning(
                "ImageNet weights for %s could not be loaded (%s); training from scratch "
                "(train.weights_fallback: scratch). For pretrained weights, run once with internet "
                "access (Keras caches them under ~/.keras/models) or set train.weights to a local file.",
                name,
                reason,
            )
            return make(None), "scratch"
    path = Path(weights)
    if not path.is_file():
        raise StageError(f"train.weights: {weights!r} is neither 'imagenet', 'none' nor an existing file")
    try:
        return make(str(path)), str(path)
    except Exception as e:
        raise StageError(
            f"train.weights: {path} does not fit {name} without its top at {image_size} px ({e})"
        ) from None


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`build_model` needs (the train stage fills it from params + manifest)."""

    backbone: str
    image_size: int
    num_classes: int = len(CLASSES)
    head: str = "gap"  # "gap" | "funnel"
    dropout: float = 0.3
    funnel_units: int = 256
    fusion: bool = False
    fusion_units: int = 32
    # augmentation factors (0 disables each); see params.AugmentParams
    flip: str = "horizontal_and_vertical"
    rotation: float = 0.0
    zoom: float = 0.0
    shift: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    output_bias: tuple[float, ...] | None = None  # log class priors
    seed: int = 0
    # Keras's random zoom/rotation/translation layers do not compile under XLA, and one such
    # layer turns XLA off for the whole model; with jit_compile the train stage therefore runs
    # the same layers in tf.data instead (see augmentation_layers).
    augment_in_model: bool = True


def augmentation_layers(spec: ModelSpec) -> list[keras.layers.Layer]:
    """The random augmentation layers of ``spec`` (0-255 float in and out; no-ops at inference)."""
    s = spec.seed
    out: list[keras.layers.Layer] = []
    if spec.flip != "none":
        out.append(layers.RandomFlip(spec.flip, seed=s, name="aug_flip"))
    if spec.rotation > 0:
        out.append(layers.RandomRotation(spec.rotation, fill_mode="reflect", seed=s + 1, name="aug_rotation"))
    if spec.zoom > 0:
        out.append(layers.RandomZoom(spec.zoom, fill_mode="reflect", seed=s + 2, name="aug_zoom"))
    if spec.shift > 0:
        out.append(
            layers.RandomTranslation(
                spec.shift, spec.shift, fill_mode="reflect", seed=s + 3, name="aug_shift"
            )
        )
    if spec.brightness > 0:
        out.append(
            layers.RandomBrightness(spec.brightness, value_range=(0, 255), seed=s + 4, name="aug_brightness")
        )
    if spec.contrast > 0:
        out.append(
            layers.RandomContrast(spec.contrast, value_range=(0, 255), seed=s + 5, name="aug_contrast")
        )
    return out


# Keras's MobileNets use BatchNormalization momentum 0.999, made for ImageNet's ~500k steps: their
# moving statistics average over ~1000 steps, so a from-scratch run of a few epochs on HAM10000
# (~200 steps each at batch 32) evaluates with statistics still near their initial values and
# predicts one class (measured on the real data at 64 px, 6 epochs: val macro AUC 0.53 with
# 0.999, 0.88 with 0.99).
SCRATCH_BN_MOMENTUM = 0.99


def _limit_bn_momentum(model: keras.Model, momentum: float) -> None:
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.momentum > momentum:
            layer.momentum = momentum


def build_model(spec: ModelSpec, backbone: keras.Model, *, pretrained: bool) -> keras.Model:
    """Wrap a feature extractor (from :func:`build_backbone`) into the full classifier.

    ``pretrained``: the backbone holds ImageNet (or file) weights. Its BatchNormalization then
    always runs in inference mode, also while fine-tuning: updating ImageNet BN statistics from
    small dermoscopy batches wrecks the pretrained features (the Keras transfer-learning guide's
    advice). A backbone trained from scratch needs its BN in training mode.
    """
    _ctor, mode = BACKBONE_FAMILIES[spec.backbone]
    if not pretrained:
        _limit_bn_momentum(backbone, SCRATCH_BN_MOMENTUM)
    image = keras.Input((spec.image_size, spec.image_size, 3), dtype="uint8", name="image")
    x = image
    for layer in augmentation_layers(spec) if spec.augment_in_model else []:
        x = layer(x)
    x = Preprocess(mode, name="preprocess")(x)
    x = backbone(x, training=False) if pretrained else backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)

    inputs: Any = image
    if spec.fusion:
        age = keras.Input((), dtype="float32", name="age")
        sex = keras.Input((), dtype="int32", name="sex")
        loc = keras.Input((), dtype="int32", name="localization")
        m = MetadataEncoding(name="meta_encoding")([age, sex, loc])
        m = layers.Dense(spec.fusion_units, activation="gelu", name="meta_dense")(m)
        m = layers.Dense(x.shape[-1], activation="sigmoid", name="meta_gates")(m)
        x = FeatureGate(name="meta_gate")([x, m])
        inputs = {"image": image, "age": age, "sex": sex, "localization": loc}

    if spec.head == "funnel":
        # The 3-layer swish funnel of published HAM10000 EfficientNet heads: halving widths.
        for i, units in enumerate((spec.funnel_units, spec.funnel_units // 2, spec.funnel_units // 4), 1):
            x = layers.Dropout(spec.dropout, name=f"funnel_dropout{i}")(x)
            x = layers.Dense(max(units, 1), activation="swish", name=f"funnel_dense{i}")(x)
    elif spec.head != "gap":
        raise ValueError(f"unknown head {spec.head!r}; use 'gap' or 'funnel'")
    x = layers.Dropout(spec.dropout, name="head_dropout")(x)
    bias = keras.initializers.Constant(list(spec.output_bias)) if spec.output_bias is not None else "zeros"
    # float32 output even under mixed_float16: softmax and the loss need the range.
    probs = layers.Dense(
        spec.num_classes, activation="softmax", bias_initializer=bias, dtype="float32", name="probs"
    )(x)
    return keras.Model(inputs, probs, name=f"{spec.backbone}_classifier")


def set_trainable(model: keras.Model, depth: int | None, *, freeze_bn: bool = True) -> int:
    """Freeze the backbone (``depth=None``), or make its top ``depth`` layers trainable (-1: all).

    Everything outside the backbone (head, fusion) stays trainable. With ``freeze_bn`` the
    backbone's BatchNormalization layers stay frozen even when unfrozen (see build_model).
    Returns the number of trainable weights, for the log. Recompile after calling this.
    """
    bb = model.get_layer("backbone")
    if depth is None:
        bb.trainable = False
    else:
        bb.trainable = True
        cut = 0 if depth == -1 else max(0, len(bb.layers) - depth)
        for i, layer in enumerate(bb.layers):
            frozen = i < cut or (freeze_bn and isinstance(layer, layers.BatchNormalization))
            layer.trainable = not frozen
    return len(model.trainable_weights)


def _nested_layers(model: keras.Model) -> Iterator[layers.Layer]:
    """Every layer of ``model``, descending into nested models (the backbone)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _nested_layers(layer)
        else:
            yield layer


def synchronize_batchnorm(model: keras.Model) -> int:
    """Make every BatchNormalization use global-batch statistics under tf.distribute.

    Under MultiWorkerMirroredStrategy each worker otherwise updates its moving mean/variance from
    its own shard, and the workers end with different models although their trainable weights
    agree. Returns the number of layers switched.
    """
    n = 0
    for layer in _nested_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = True
            n += 1
    return n


def recalibrate_batchnorm(model: keras.Model, batches: Iterable[Any]) -> int:
    """Precise BatchNorm: replace the backbone's moving means and variances by the average batch
    statistics of ``batches`` (uint8 images) under the final weights. Returns the layers updated.

    Why: the moving statistics are an exponential average taken while the weights were still
    changing, and with augmentation and dropout on. A network trained from scratch in a few
    hundred steps ends with statistics that no longer match its weights; evaluated with them,
    the demo's mobilenetv2 predicted one class for every image (val balanced accuracy 0.14, the
    same weights with recomputed statistics: 0.65; Wu & Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021). Images go through the model's preprocessing and the backbone only: no
    augmentation, backbone dropout off, so the statistics are those of the images as inference
    sees them. Batch statistics normalise each forward pass in training mode, so the result
    does not depend on the old moving statistics; each batch weighs by its size.
    """
    backbone, preprocess = model.get_layer("backbone"), model.get_layer("preprocess")
    inner = list(_nested_layers(backbone))
    bns = [layer for layer in inner if isinstance(layer, layers.BatchNormalization)]
    if not bns:
        return 0
    saved = [(layer, layer.momentum, layer.trainable, layer.synchronized) for layer in bns]
    drops = [(layer, layer.rate) for layer in inner if isinstance(layer, layers.Dropout)]
    sums = [[np.zeros(layer.moving_mean.shape, np.float64) for _ in range(2)] for layer in bns]
    seen = 0
    try:
        for layer, *_ in saved:
            # momentum 0: after a call the moving variables hold exactly that batch's statistics.
            # A frozen (trainable=False) BN would run in inference mode; each worker of a
            # multi-worker run sees every batch here, so no cross-replica reduction is needed.
            layer.momentum, layer.trainable, layer.synchronized = 0.0, True, False
        for layer, _rate in drops:
            layer.rate = 0.0
        for images in batches:
            n = int(images.shape[0])
            backbone(preprocess(images), training=True)
            for (mean_sum, var_sum), layer in zip(sums, bns, strict=True):
                mean_sum += n * np.asarray(layer.moving_mean, np.float64)
                var_sum += n * np.asarray(layer.moving_variance, np.float64)
            seen += n
    finally:
        for layer, momentum, trainable, synced in saved:
            layer.momentum, layer.trainable, layer.synchronized = momentum, trainable, synced
        for layer, rate in drops:
            layer.rate = rate
    if seen == 0:
        raise ValueError("recalibrate_batchnorm: no images")
    for (mean_sum, var_sum), layer in zip(sums, bns, strict=True):
        layer.moving_mean.assign((mean_sum / seen).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((var_sum / seen).astype(layer.moving_variance.dtype))
    return len(bns)


def load_model(path: str | Path) -> keras.Model:
    """Load a saved ``model.keras`` (safe mode; this module's layers are registered on import)."""
    import skinlesion.model.losses  # noqa: F401  (registers the losses named in a compile config)

    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def output_bias_from_counts(counts: Sequence[int]) -> tuple[float, ...]:
    from skinlesion.model.losses import log_priors

    return tuple(float(v) for v in np.asarray(log_priors(counts)))


def as_graph(model: Any) -> Any:
    """``inputs -> probabilities`` of a model, as a traced graph (``tf.function``), inference mode.

    Called eagerly, a Keras model runs its layers one by one from Python: one image through the
    demo's two members took 277 ms here, 13 ms as a graph, with identical probabilities.
    ``reduce_retracing``: one trace per batch shape at first, then one for any batch size. The
    evaluate stage and the bundle both score through this, so they run the same kernels.
    """
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)
