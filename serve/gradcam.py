"""Grad-CAM (Selvaraju et al., 2017) for the project's models: where the evidence for a class lies.

The heat map is ``ReLU(sum_k a_k A_k)`` over the channels ``A_k`` of the last convolutional
feature map, with ``a_k`` the spatial mean of ``d logit_c / d A_k``: the pre-softmax score, not
the probability, because a saturated softmax has near-zero gradients exactly where the model is
most sure.

The feature map is found without knowing the backbone: it is the input of the layer that pools
a 4-D tensor into a vector (``gap`` in :func:`skinlesion.model.networks.build_model`; a Keras application
or the custom CNN is nested as one ``backbone`` layer, whose own ``output`` lives in the nested
graph and so cannot be used). The model is split there into ``image -> features`` and
``features (+ metadata) -> head input``; the gradient is taken on the second part with the
features watched explicitly, so it also works when the loaded weights are frozen.

TensorFlow is imported when a :class:`GradCam` is built, not at import time.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

# Colour map of the overlay and how much of it covers the image.
COLORMAP = "turbo"
ALPHA = 0.45


def feature_map_tensor(model: Any) -> Any:
    """The last 4-D tensor of ``model`` that is pooled into a vector (its last conv feature map)."""
    for layer in reversed(model.layers):
        try:
            inp, out = layer.input, layer.output
        except (AttributeError, ValueError):  # an input layer, or a layer used more than once
            continue
        if isinstance(inp, (list, tuple, dict)) or isinstance(out, (list, tuple, dict)):
            continue
        if len(inp.shape) == 4 and len(out.shape) == 2:
            return inp
    raise ValueError(f"{model.name}: no layer pools a 4-D feature map into a vector; Grad-CAM needs one")


class GradCam:
    """Grad-CAM of one classifier whose softmax layer is named ``probs`` (or is the last layer)."""

    def __init__(self, model: Any):
        import keras

        try:
            self.head = model.get_layer("probs")
        except ValueError:
            self.head = model.layers[-1]
        features = feature_map_tensor(model)
        # Metadata fusion: the gates that rescale the pooled features come from age, sex and site,
        # so the second half takes them too (as a list: a dict input must be keyed by Input names).
        self.meta_keys = [k for k in model.input if k != "image"] if isinstance(model.input, dict) else []
        self.to_features = keras.Model(model.input, features, name=f"{model.name}_features")
        meta = [model.input[k] for k in self.meta_keys]
        self.to_head = keras.Model([features, *meta] if meta else features, self.head.input)
        self._graph: Any = None

    def heatmaps(self, inputs: Any, class_index: np.ndarray) -> np.ndarray:
        """``[N, h, w]`` maps in ``[0, 1]`` (each scaled by its own maximum) for ``class_index[i]``.

        ``inputs``: what the model takes (uint8 images, or the dict of a fusion model). A map that
        is all zero means no region raised the class score (not "everywhere").
        """
        import tensorflow as tf

        if self._graph is None:
            # Traced once per input shape: eager Keras runs a backbone layer by layer from Python.
            self._graph = tf.function(self._cam, reduce_retracing=True)
        onehot = tf.one_hot(np.asarray(class_index, dtype=np.int32), int(self.head.units), dtype=tf.float32)
        cam = self._graph(inputs, onehot).numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
        return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0).astype(np.float32)

    def _cam(self, inputs: Any, onehot: Any) -> Any:
        import tensorflow as tf

        feats = self.to_features(inputs, training=False)
        with tf.GradientTape() as tape:
            tape.watch(feats)
            x = [feats, *(inputs[k] for k in self.meta_keys)] if self.meta_keys else feats
            h = tf.cast(self.to_head(x, training=False), tf.float32)
            logits = tf.matmul(h, tf.cast(self.head.kernel, tf.float32))
            if self.head.use_bias:
                logits += tf.cast(self.head.bias, tf.float32)
            # Samples are independent at inference (no batch statistics), so the gradient of the
            # sum is each sample's own gradient.
            score = tf.reduce_sum(logits * onehot)
        grads = tf.cast(tape.gradient(score, feats), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * tf.cast(feats, tf.float32), axis=-1))


def overlay(display: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The image and its heat-map overlay side by side: uint8 ``[D, 2D, 3]``.

    ``display`` is the model's square input at display size (the same crop or padding), so the
    map, upsampled over it, points at the pixels the model was given.
    """
    from matplotlib import colormaps

    d_h, d_w = display.shape[:2]
    up = Image.fromarray(np.uint8(np.clip(heat, 0.0, 1.0) * 255)).resize(
        (d_w, d_h), Image.Resampling.BILINEAR
    )
    colored = colormaps[COLORMAP](np.asarray(up, dtype=np.float32) / 255.0)[..., :3] * 255.0
    mixed = (1.0 - alpha) * display.astype(np.float32) + alpha * colored
    return np.concatenate([display, np.clip(mixed, 0, 255).astype(np.uint8)], axis=1)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: a 256x512 overlay encodes ~6x faster than at the default level 6, for ~13% more bytes.
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
