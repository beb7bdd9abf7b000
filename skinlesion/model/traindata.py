"""The data of a training run: what the prepared folder's manifest says (:func:`read_prepared`) and
the tf.data pipelines ``fit`` reads (:func:`make_datasets`: shuffled training batches with optional
augmentation and metadata dropout, the validation set in file order). Shards and their parsing are
:mod:`skinlesion.model.tfdata`'s; TensorFlow is imported inside the functions that use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES

__all__ = ["Prepared", "class_counts", "make_datasets", "metadata_dropout", "read_prepared"]


@dataclass(frozen=True)
class Prepared:
    """What the prepared folder's manifest says about the shards."""

    path: Path
    manifest: dict[str, Any]
    image_size: int
    train_counts: list[int]
    n_train: int
    n_val: int


def read_prepared(prepared: Path) -> Prepared:
    """The manifest of ``prepared``, checked: the project's classes, images in train and val."""
    from skinlesion.model.tfdata import load_manifest

    manifest = load_manifest(prepared)
    if tuple(manifest.get("classes", ())) != CLASSES:
        raise StageError(
            f"{prepared}/manifest.json: classes {manifest.get('classes')} differ from {list(CLASSES)}"
        )
    train_counts, val_counts = class_counts(manifest, "train"), class_counts(manifest, "val")
    n_train, n_val = sum(train_counts), sum(val_counts)
    if n_train == 0 or n_val == 0:
        raise StageError(
            f"{prepared}: the train split has {n_train} images and val {n_val}; both must be > 0"
        )
    return Prepared(prepared, manifest, int(manifest["image_size"]), train_counts, n_train, n_val)


def class_counts(manifest: dict[str, Any], split: str) -> list[int]:
    """Images per class of ``split`` in the manifest, in :data:`CLASSES` order."""
    info = manifest["splits"][split]
    counts = info.get("class_counts")
    if isinstance(counts, dict):
        return [int(counts.get(c, 0)) for c in CLASSES]
    if isinstance(counts, list) and len(counts) == len(CLASSES):
        return [int(c) for c in counts]
    raise StageError(f"manifest.json: splits.{split}.class_counts is missing or malformed: {counts!r}")


def metadata_dropout(features: Mapping[str, Any], rate: float, seed: Any) -> dict[str, Any]:
    """A batch of fusion features with each of age, sex and localization replaced by "unknown"
    (NaN age, ``SEXES.index("unknown")``, ``LOCALIZATIONS.index("unknown")``), independently per
    image and field, with probability ``rate``; ``image`` and any other key pass through.

    Why: the bundle and the service feed a fusion member all three unknown when an image comes
    without metadata, a combination that is rare in the training set (HAM10000 has almost every
    field filled in); dropping fields at random puts it, and every partial case, in the training
    distribution (all three unknown in ``rate**3`` of the images). ``seed`` is a stateless seed
    (shape ``[2]`` integers): the same seed gives the same mask, under TF op determinism too.
    """
    import tensorflow as tf

    from skinlesion.core.schema import LOCALIZATIONS, SEXES

    if rate <= 0:
        return dict(features)
    age = tf.convert_to_tensor(features["age"])
    sex = tf.convert_to_tensor(features["sex"])
    loc = tf.convert_to_tensor(features["localization"])
    drop = tf.random.stateless_uniform([tf.shape(age)[0], 3], seed=seed) < rate
    return {
        **features,
        "age": tf.where(drop[:, 0], tf.constant(float("nan"), age.dtype), age),
        "sex": tf.where(drop[:, 1], tf.constant(SEXES.index("unknown"), sex.dtype), sex),
        "localization": tf.where(drop[:, 2], tf.constant(LOCALIZATIONS.index("unknown"), loc.dtype), loc),
    }


def make_datasets(
    prepared: Path,
    *,
    n_train: int,
    with_meta: bool,
    batch: int,
    shuffle_buffer: int,
    seed: int,
    cache: bool,
    drop_remainder: bool = False,
    augment: list[Any] | None = None,
    metadata_dropout_rate: float = 0.0,
) -> tuple[Any, Any]:
    """Training (shuffled, batched, prefetched) and validation datasets from the shards.

    ``augment``: Keras augmentation layers to run here, on batches, instead of inside the model
    (only when the model is XLA-compiled; images stay uint8 so the model's input is unchanged).
    ``metadata_dropout_rate`` (with ``with_meta``): :func:`metadata_dropout` on the training
    batches, drawn anew every epoch; the validation set keeps its metadata.
    """
    import keras
    import tensorflow as tf

    from skinlesion.model.tfdata import read_split

    k = len(CLASSES)

    def onehot(x: Any, y: Any) -> Any:
        return x, tf.one_hot(y, k)

    train = (
        read_split(prepared, "train", with_meta=with_meta, ordered=False)
        # Interleaved shards have an unknown length; stating it lets Keras count the steps.
        .apply(tf.data.experimental.assert_cardinality(n_train))
        .map(onehot, num_parallel_calls=tf.data.AUTOTUNE)
    )
    if cache:
        # Decoded uint8 images: ~12 KB each at 64 px; the shards are read once, later epochs
        # come from memory. Caching before the shuffle keeps the per-epoch reshuffle.
        train = train.cache()
    train = train.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).batch(
        batch, drop_remainder=drop_remainder
    )
    if with_meta and metadata_dropout_rate > 0:
        # After the cache, so every epoch draws new masks. One int64 per batch from a seeded
        # stream that re-seeds each iteration (epoch) deterministically seeds a stateless draw:
        # reruns with the same seed drop the same fields, with TF op determinism on. An op seed
        # of its own: with the shuffle's, the masks would come from the shuffle's random stream.
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

        def drop_meta(xy: Any, r: Any) -> Any:
            x, y = xy
            return metadata_dropout(x, metadata_dropout_rate, tf.stack([r, tf.zeros_like(r)])), y

        train = tf.data.Dataset.zip((train, draws)).map(drop_meta, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        pipeline = keras.Sequential(augment, name="augment")

        def augment_batch(x: Any, y: Any) -> Any:
            image = x["image"] if with_meta else x
            image = pipeline(tf.cast(image, tf.float32), training=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
            return ({**x, "image": image} if with_meta else image), y

        train = train.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
    train = train.prefetch(tf.data.AUTOTUNE)
    val = read_split(prepared, "val", with_meta=with_meta, ordered=True).map(onehot).batch(batch).cache()
    return train, val.prefetch(tf.data.AUTOTUNE)
