"""Metadata dropout of fusion members (``train.common.metadata_dropout``): the pure mask on a
batch, its determinism, and where the training pipeline applies it (training batches, anew each
epoch; never the validation set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skinlesion.core.errors import ParamsError
from skinlesion.core.schema import LOCALIZATIONS, SEXES
from skinlesion.model.traindata import make_datasets, metadata_dropout
from skinlesion.params.load import parse_params

SEX_UNKNOWN, LOC_UNKNOWN = SEXES.index("unknown"), LOCALIZATIONS.index("unknown")


def _batch(n: int) -> dict[str, np.ndarray]:
    """``n`` rows with every field known (and distinct images), as read_split yields them."""
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
        "age": rng.integers(5, 90, n).astype(np.float32),
        "sex": rng.integers(0, SEX_UNKNOWN, n).astype(np.int32),  # male / female
        "localization": np.where(rng.random(n) < 0.5, 0, LOC_UNKNOWN + 1).astype(np.int32),
    }


def _unknown(features) -> np.ndarray:
    """``[n, 3]`` bool: which of age, sex, localization read "unknown"."""
    return np.stack([
        np.isnan(np.asarray(features["age"])),
        np.asarray(features["sex"]) == SEX_UNKNOWN,
        np.asarray(features["localization"]) == LOC_UNKNOWN,
    ], axis=1)  # fmt: skip


def test_each_field_is_dropped_at_the_rate_independently_and_the_image_is_untouched():
    x = _batch(4000)
    out = metadata_dropout(x, 0.5, seed=[7, 0])
    unknown = _unknown(out)
    for share in unknown.mean(axis=0):  # age, sex, localization
        assert 0.45 <= share <= 0.55
    # independent fields: all three unknown in rate**3 of the images (a served image without
    # metadata), each pair in rate**2
    assert unknown.all(axis=1).mean() == pytest.approx(0.5**3, abs=0.03)
    assert (unknown[:, 0] & unknown[:, 1]).mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_array_equal(np.asarray(out["image"]), x["image"])
    # a field not dropped keeps its value and dtype
    kept = ~unknown
    np.testing.assert_array_equal(np.asarray(out["age"])[kept[:, 0]], x["age"][kept[:, 0]])
    np.testing.assert_array_equal(np.asarray(out["sex"])[kept[:, 1]], x["sex"][kept[:, 1]])
    np.testing.assert_array_equal(np.asarray(out["localization"])[kept[:, 2]], x["localization"][kept[:, 2]])
    assert [np.asarray(out[k]).dtype for k in ("age", "sex", "localization")] == [
        np.float32, np.int32, np.int32,
    ]  # fmt: skip

    unchanged = metadata_dropout(x, 0.0, seed=[7, 0])
    for k in x:
        np.testing.assert_array_equal(np.asarray(unchanged[k]), x[k])
    assert _unknown(metadata_dropout(x, 1.0, seed=[7, 0])).all()


def test_the_same_seed_gives_the_same_mask_another_seed_another():
    x = _batch(500)
    a = _unknown(metadata_dropout(x, 0.3, seed=[11, 0]))
    b = _unknown(metadata_dropout(x, 0.3, seed=[11, 0]))
    c = _unknown(metadata_dropout(x, 0.3, seed=[12, 0]))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@pytest.mark.parametrize(("rate", "ok"), [(-0.1, False), (0.0, True), (1.0, True), (1.5, False)])
def test_the_rate_is_a_probability(rate, ok):
    raw = {"train": {"common": {"metadata_dropout": rate}}}
    if ok:
        assert parse_params(raw).train.common.metadata_dropout == rate
    else:
        with pytest.raises(ParamsError, match=r"train\.common\.metadata_dropout"):
            parse_params(raw)


# --------------------------------------------------------------------------- the pipeline


def _pipeline(prepared: Path, rate: float, seed: int = 3):
    # A shuffle buffer of 1 keeps the (cached) read order: an image keeps its place in every
    # epoch, so a mask that differs between epochs is a new draw, not the same draw moved.
    return make_datasets(
        prepared, n_train=42, with_meta=True, batch=8, shuffle_buffer=1, seed=seed, cache=True,
        metadata_dropout_rate=rate,
    )  # fmt: skip


def _epoch(ds) -> dict[str, np.ndarray]:
    """One pass over a dataset: its features, concatenated."""
    rows = [x for x, _ in ds.as_numpy_iterator()]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _by_image(features) -> dict[bytes, np.ndarray]:
    """image bytes -> [age, sex, localization] (the tiny set's images are all distinct)."""
    return {
        img.tobytes(): np.array([a, s, loc], dtype=np.float64)
        for img, a, s, loc in zip(features["image"], features["age"], features["sex"],
                                  features["localization"], strict=True)
    }  # fmt: skip


def test_training_batches_lose_metadata_anew_each_epoch_deterministically_val_never(prepared):
    import keras
    import tensorflow as tf

    from skinlesion.model.tfdata import read_split_numpy

    # as train.common.deterministic: true does (skinlesion.model.distribute.configure_runtime)
    keras.utils.set_random_seed(3)
    tf.config.experimental.enable_op_determinism()
    truth = read_split_numpy(prepared, "train")
    original = _by_image({"image": truth.images, "age": truth.age, "sex": truth.sex,
                          "localization": truth.localization})  # fmt: skip
    assert len(original) == 42
    assert not _unknown({"age": truth.age, "sex": truth.sex, "localization": truth.localization}).all(1).any()

    train, val = _pipeline(prepared, 0.5)
    assert int(train.cardinality()) == 6  # zipped with the infinite random stream: still 42 / 8 batches
    epochs = [_epoch(train) for _ in range(4)]
    masks = []
    for feats in epochs:
        rows = _by_image(feats)
        assert rows.keys() == original.keys()  # every image once, pixels untouched
        mask = np.zeros((42, 3), dtype=bool)
        for i, (key, got) in enumerate(sorted(rows.items())):
            want = original[key]
            same = np.isclose(got, want, rtol=0, atol=0, equal_nan=True)
            unknown_now = np.array([np.isnan(got[0]), got[1] == SEX_UNKNOWN, got[2] == LOC_UNKNOWN])
            assert (same | unknown_now).all(), "a field changed to something other than unknown"
            mask[i] = ~same
        masks.append(mask)
    # each epoch draws anew (4 epochs x 42 images x 3 fields at rate 0.5: clearly not constant)
    assert all((masks[0] != m).any() for m in masks[1:])
    assert 0.3 < np.mean([m.mean() for m in masks]) < 0.7
    # a rebuilt pipeline with the same seed replays the same epochs
    train_again, _ = _pipeline(prepared, 0.5)
    for feats in epochs[:2]:
        again = _epoch(train_again)
        for k in feats:
            np.testing.assert_array_equal(again[k], feats[k])

    # the validation set keeps every field, in file order, epoch after epoch
    want_val = read_split_numpy(prepared, "val")
    for _ in range(2):
        got = _epoch(val)
        np.testing.assert_array_equal(got["image"], want_val.images)
        np.testing.assert_array_equal(got["age"], want_val.age)  # NaN == NaN for assert_array_equal
        np.testing.assert_array_equal(got["sex"], want_val.sex)
        np.testing.assert_array_equal(got["localization"], want_val.localization)

    # rate 0: the training metadata as read
    plain, _ = _pipeline(prepared, 0.0)
    rows = _by_image(_epoch(plain))
    for key, want in original.items():
        np.testing.assert_array_equal(rows[key], want)
