"""Class weights, output-bias priors and the two training losses, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from skinlesion.model.losses import (  # noqa: E402
    CategoricalFocalLoss,
    WeightedCrossEntropy,
    class_weights,
    log_priors,
    make_loss,
)


def test_class_weights_balanced_by_hand():
    # N = 100, K = 3: N / (K n_c) = 100/30, 100/90, 100/180; their count-weighted mean is already 1.
    w = class_weights([10, 30, 60], power=1.0)
    np.testing.assert_allclose(w, [10 / 3, 10 / 9, 5 / 9], rtol=1e-12)


def test_class_weights_sqrt_rescaled_to_mean_one_by_hand():
    raw = [math.sqrt(100 / 30), math.sqrt(100 / 90), math.sqrt(100 / 180)]
    mean = (10 * raw[0] + 30 * raw[1] + 60 * raw[2]) / 100  # 0.946...
    w = class_weights([10, 30, 60], power=0.5)
    np.testing.assert_allclose(w, [r / mean for r in raw], rtol=1e-12)
    assert float(np.dot(w, [10, 30, 60])) == pytest.approx(100.0)
    assert w[0] > w[1] > w[2]


def test_class_weights_power_zero_is_uniform_and_cap_and_empty_class():
    np.testing.assert_allclose(class_weights([5, 50, 500], power=0.0), [1, 1, 1])
    w = class_weights([0, 10, 90], power=1.0)
    assert w[0] == 0.0  # a class without images gets no weight, not inf
    np.testing.assert_allclose(w[1:], [5.0, 50 / 90], rtol=1e-12)
    assert class_weights([1, 99], power=1.0, max_weight=2.0)[0] == 2.0


@pytest.mark.parametrize(
    "counts, message",
    [([], "non-empty"), ([3, -1], "non-negative"), ([0, 0], "no training images")],
)
def test_class_weights_bad_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        class_weights(counts)


def test_log_priors_smoothed():
    p = np.exp(log_priors([9, 0, 90]))  # +1 each: 10, 1, 91 of 102
    np.testing.assert_allclose(p, [10 / 102, 1 / 102, 91 / 102], rtol=1e-12)


def test_focal_loss_by_hand():
    y = np.array([[0, 1, 0], [1, 0, 0]], dtype=np.float32)
    p = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], dtype=np.float32)
    alpha = [1.0, 2.0, 3.0]
    # image 1: -alpha_1 (1 - 0.7)^2 ln 0.7; image 2: -alpha_0 (1 - 0.5)^2 ln 0.5; batch mean
    hand = (-2.0 * 0.3**2 * math.log(0.7) + -1.0 * 0.5**2 * math.log(0.5)) / 2
    loss = CategoricalFocalLoss(alpha=alpha, gamma=2.0)
    assert float(loss(y, p)) == pytest.approx(hand, rel=1e-5)
    # gamma 3 changes only the exponent
    hand3 = (-2.0 * 0.3**3 * math.log(0.7) + -1.0 * 0.5**3 * math.log(0.5)) / 2
    assert float(CategoricalFocalLoss(alpha=alpha, gamma=3.0)(y, p)) == pytest.approx(hand3, rel=1e-5)


def test_focal_gamma_zero_without_alpha_is_cross_entropy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=5).astype(np.float32)
    y = np.eye(7, dtype=np.float32)[rng.integers(0, 7, 5)]
    ce = keras.losses.CategoricalCrossentropy()(y, p)
    assert float(CategoricalFocalLoss(alpha=None, gamma=0.0)(y, p)) == pytest.approx(float(ce), rel=1e-5)


def test_weighted_ce_by_hand_and_label_smoothing():
    y = np.array([[0, 1, 0], [0, 0, 1]], dtype=np.float32)
    p = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]], dtype=np.float32)
    hand = (-2.0 * math.log(0.7) + -3.0 * math.log(0.4)) / 2
    assert float(WeightedCrossEntropy([1.0, 2.0, 3.0])(y, p)) == pytest.approx(hand, rel=1e-5)
    # smoothing 0.3 over 3 classes: targets 0.1 / 0.8 / 0.1, weight still the true class's
    t = [0.1, 0.8, 0.1]
    img1 = -2.0 * sum(ti * math.log(pi) for ti, pi in zip(t, p[0], strict=True))
    img2 = -3.0 * sum(ti * math.log(pi) for ti, pi in zip([0.1, 0.1, 0.8], p[1], strict=True))
    got = WeightedCrossEntropy([1.0, 2.0, 3.0], label_smoothing=0.3)(y, p)
    assert float(got) == pytest.approx((img1 + img2) / 2, rel=1e-5)


def test_make_loss_and_serialization_round_trip():
    loss = make_loss("focal", [1.0, 2.0], gamma=1.5, label_smoothing=0.1)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, CategoricalFocalLoss)
    assert (again.alpha, again.gamma, again.label_smoothing) == ([1.0, 2.0], 1.5, 0.1)
    assert isinstance(make_loss("weighted_ce", [1.0]), WeightedCrossEntropy)
    per_image = make_loss("weighted_ce", [1.0, 3.0], reduction="none")(
        np.eye(2, dtype=np.float32), np.full((2, 2), 0.5, np.float32)
    )
    np.testing.assert_allclose(np.asarray(per_image), [math.log(2), 3 * math.log(2)], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        make_loss("mse", [1.0])
