"""The pure metric / fitting functions against values worked out by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import (
    apply_calibration,
    balanced_accuracy,
    balanced_decision,
    binary_auc,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    fit_simplex_weights,
    fit_temperature,
    fit_temperature_bias,
    lesion_bootstrap_indices,
    log_loss,
    malignant_score,
    nll_with_calibration,
    operating_point,
    partial_auc_above_tpr,
    per_class_prf,
    recall_first_threshold,
    reliability_table,
)

Y3 = np.array([0, 0, 0, 1, 1, 2])
P3 = np.array([0, 0, 1, 1, 1, 2])

# ---------------------------------------------------------------- class decisions


def test_confusion_and_per_class_prf_by_hand():
    cm = confusion_matrix(Y3, P3, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    precision, recall, f1 = per_class_prf(cm)
    np.testing.assert_allclose(recall, [2 / 3, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1.0, 2 / 3, 1.0])
    np.testing.assert_allclose(f1, [0.8, 0.8, 1.0])


def test_balanced_accuracy_by_hand_and_absent_class_skipped():
    assert balanced_accuracy(Y3, P3, 3) == pytest.approx(8 / 9)
    assert balanced_accuracy(Y3, P3, 3) == pytest.approx(balanced_accuracy_score(Y3, P3))
    # a 4th class with no cases and no predictions cannot be measured: it must not count as 0
    assert balanced_accuracy(Y3, P3, 4) == pytest.approx(8 / 9)
    _, recall, _ = per_class_prf(confusion_matrix(Y3, P3, 4))
    assert np.isnan(recall[3])


def test_never_predicted_class_has_precision_zero_not_nan():
    precision, recall, f1 = per_class_prf(confusion_matrix([0, 1], [0, 0], 2))
    assert precision[1] == 0.0 and recall[1] == 0.0 and f1[1] == 0.0


# ---------------------------------------------------------------- AUC family

PROBS_AUC = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.3, 0.6, 0.1],
        [0.5, 0.3, 0.2],
        [0.2, 0.2, 0.6],
        [0.1, 0.3, 0.6],
    ]
)
Y_AUC = np.array([0, 0, 1, 1, 2, 2])


def test_per_class_and_macro_auc_by_hand():
    # class 0: positives .7,.4 vs negatives .3,.5,.2,.1 -> 7 of 8 pairs won
    assert binary_auc(Y_AUC == 0, PROBS_AUC[:, 0]) == pytest.approx(7 / 8)
    # class 1: positives .6,.3 vs .2,.5,.2,.3 -> 4 + 2 + one tie (1/2) = 6.5 of 8
    assert binary_auc(Y_AUC == 1, PROBS_AUC[:, 1]) == pytest.approx(6.5 / 8)
    assert binary_auc(Y_AUC == 2, PROBS_AUC[:, 2]) == 1.0
    macro = np.mean([binary_auc(i == Y_AUC, PROBS_AUC[:, i]) for i in range(3)])
    assert macro == pytest.approx((7 / 8 + 6.5 / 8 + 1) / 3)
    assert macro == pytest.approx(roc_auc_score(Y_AUC, PROBS_AUC, multi_class="ovr", average="macro"))


def test_auc_undefined_with_one_class():
    assert np.isnan(binary_auc([1, 1], [0.2, 0.3]))


def test_pauc_above_80_tpr_by_hand():
    # ROC: (0,0) -> (0,.5) -> (.5,.5) -> (.5,1) -> (1,1). Area above TPR .8 = .2 * (1 - .5) = .1
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.1])
    assert binary_auc(y, s) == pytest.approx(0.75)
    assert partial_auc_above_tpr(y, s) == pytest.approx(0.1)
    assert partial_auc_above_tpr(y, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.2)  # perfect
    assert partial_auc_above_tpr(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.0)  # reversed
    assert partial_auc_above_tpr(y, s, min_tpr=0.0) == pytest.approx(0.75)  # whole curve = AUC


def test_pauc_matches_the_isic_kaggle_formula_on_random_data():
    # The Kaggle notebook version: McClish-standardised sklearn pAUC on flipped labels, unscaled.
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    s = np.round(rng.random(400) + 0.6 * y, 2)  # rounding makes ties
    max_fpr = 0.2
    scaled = roc_auc_score(~y, -s, max_fpr=max_fpr)
    expected = 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5)
    assert partial_auc_above_tpr(y, s) == pytest.approx(expected, abs=1e-12)
    # a random ranking sits near the 0.02 floor
    assert partial_auc_above_tpr(y, rng.random(400)) == pytest.approx(0.02, abs=0.015)


def test_classification_metrics_keys_and_malignant_score():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 4)
    probs = rng.dirichlet(np.ones(7), size=y.size)
    probs[np.arange(y.size), y] += 2.0  # always right
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["macro_auc"] == 1.0 and m["malignant_auc"] == 1.0 and m["mel_recall"] == 1.0
    assert m["malignant_pauc_tpr80"] == pytest.approx(0.2)
    for c in CLASSES:
        assert {f"precision_{c}", f"recall_{c}", f"f1_{c}", f"auc_{c}"} <= set(m)
    ms = malignant_score(probs)
    idx = [CLASSES.index(c) for c in ("mel", "bcc", "akiec")]
    np.testing.assert_allclose(ms, probs[:, idx].sum(axis=1))


# ---------------------------------------------------------------- calibration


def test_ece_by_hand():
    # confidences .9 (right), .9 (wrong) -> bin (13/15, 14/15]: |.5 - .9| * 2/4
    # confidences .6 (right), .55 (right) -> bin (8/15, 9/15]: |1 - .575| * 2/4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, y, 15) == pytest.approx(0.2 + 0.2125)


def test_ece_bin_edges_are_right_closed():
    # with 4 bins a confidence of exactly .75 belongs to (.5, .75], not (.75, 1]
    t = reliability_table(np.array([[0.75, 0.25]]), np.array([0]), 4)
    assert t["count"].tolist() == [0, 0, 1, 0]
    assert expected_calibration_error(np.array([[0.75, 0.25]]), np.array([0]), 4) == pytest.approx(0.25)


def test_temperature_fixes_overconfidence_and_never_worsens_nll():
    rng = np.random.default_rng(1)
    n, k = 600, 7
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    over = logits * 4.0  # same ranking, far too confident
    t = fit_temperature(over, y)
    assert 2.5 < t < 6.0
    assert nll_with_calibration(over, y, t) < nll_with_calibration(over, y, 1.0)
    assert expected_calibration_error(apply_calibration(over, t), y) < expected_calibration_error(
        apply_calibration(over, 1.0), y
    )
    for seed in range(15):
        r = np.random.default_rng(seed)
        lg = r.normal(size=(50, k)) * r.uniform(0.1, 5)
        yy = r.integers(0, k, 50)
        assert nll_with_calibration(lg, yy, fit_temperature(lg, yy)) <= nll_with_calibration(lg, yy, 1.0)


# ---------------------------------------------------------------- ensembling


def test_simplex_weights_prefer_the_good_member_and_beat_equal_weights():
    rng = np.random.default_rng(2)
    n, k = 300, 7
    y = rng.integers(0, k, n)
    good = np.full((n, k), 0.05)
    good[np.arange(n), y] = 0.7
    noise = rng.dirichlet(np.ones(k), size=n)
    members = np.stack([good / good.sum(1, keepdims=True), noise, (good + noise) / 2])
    w = fit_simplex_weights(members, y)
    assert w.shape == (3,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w[0] > w[1]
    mix = np.tensordot(w, members, axes=1)
    assert log_loss(y, mix) <= log_loss(y, members.mean(axis=0)) + 1e-12


def test_simplex_weights_single_member_is_one():
    assert fit_simplex_weights(np.ones((1, 3, 7)) / 7, np.array([0, 1, 2])).tolist() == [1.0]


# ---------------------------------------------------------------- bootstrap


def test_lesion_bootstrap_keeps_images_of_a_lesion_together():
    groups = np.array(["a", "a", "a", "b", "c", "c", "d"])
    sizes = {"a": 3, "b": 1, "c": 2, "d": 1}
    samples = list(lesion_bootstrap_indices(groups, 200, np.random.default_rng(0)))
    for idx in samples:
        counts = np.bincount(idx, minlength=groups.size)
        for g in sizes:
            c = counts[groups == g]
            assert np.all(c == c[0]), f"lesion {g} split: {c}"  # all its images, equally often
        # 4 lesions drawn per replicate: total images = sum of drawn lesions' sizes
        assert sum(counts[groups == g][0] for g in sizes) == 4
    # seeded: same seed, same replicates
    again = list(lesion_bootstrap_indices(groups, 200, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(samples, again, strict=True))


def test_bootstrap_ci_by_hand_on_two_lesions():
    # two lesions: values 0 (1 image) and 1 (3 images). The image-mean over a replicate is
    # 0 (both draws lesion 0), 1 (both lesion 1) or 3/4 (one each): the 95% CI spans [0, 1].
    values = np.array([0.0, 1.0, 1.0, 1.0])
    groups = np.array([0, 1, 1, 1])
    ci = bootstrap_ci(
        lambda idx: {"mean": values[idx].mean()}, groups, 400, np.random.default_rng(5), level=0.95
    )
    assert ci["mean"] == (0.0, 1.0)
    seen = {
        float(values[idx].mean()) for idx in lesion_bootstrap_indices(groups, 100, np.random.default_rng(5))
    }
    assert seen == {0.0, 0.75, 1.0}  # an image-level bootstrap would also give 0.25 and 0.5


# ---------------------------------------------------------------- recall-first threshold

Y_MAL = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
S_MAL = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])


def test_recall_first_threshold_by_hand():
    # positives high->low .9 .8 .7 .2: recall .25 .5 .75 1. Target .75 -> catch down to .7; the
    # next lower score is .6, so the threshold is their midpoint and no negative is flagged.
    c = recall_first_threshold(Y_MAL, S_MAL, 0.75)
    assert c.threshold == pytest.approx(0.65)
    assert (c.recall, c.specificity) == (0.75, 1.0)
    # target 1: must catch .2; next lower score .1 -> threshold .15; negatives .6 .3 flagged
    c = recall_first_threshold(Y_MAL, S_MAL, 1.0)
    assert c.threshold == pytest.approx(0.15)
    assert (c.recall, c.specificity) == (1.0, 0.5)


def test_threshold_meets_target_on_random_val_and_lower_ci_is_stricter():
    rng = np.random.default_rng(4)
    n = 500
    y = rng.random(n) < 0.25
    s = rng.random(n) * 0.7 + 0.3 * y
    groups = np.arange(n) // 2
    for target in (0.8, 0.9, 0.95, 0.99):
        c = recall_first_threshold(y, s, target)
        assert operating_point(y, s, c.threshold)["recall"] >= target
        # it is the *highest* such threshold: anything above the lowest caught score misses
        lowest_caught = s[y][s[y] >= c.threshold].min()
        assert operating_point(y, s, np.nextafter(lowest_caught, 1))["recall"] < target
    point = recall_first_threshold(y, s, 0.9)
    low = recall_first_threshold(
        y, s, 0.9, bound="lower_ci", groups=groups, n_samples=300, rng=np.random.default_rng(0)
    )
    assert low.threshold < point.threshold and low.recall_lower >= 0.9 and low.recall > point.recall


def test_threshold_without_malignant_cases_is_an_error():
    with pytest.raises(ValueError, match="no malignant cases"):
        recall_first_threshold(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), 0.95)


def test_operating_point_referrals_per_100_lesions():
    y = np.array([1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.9, 0.2, 0.8, 0.7, 0.1])
    groups = ["m", "m", "x", "x", "z"]  # lesion x has two flagged images: one referral
    op = operating_point(y, s, 0.5, groups)
    assert (
        op["recall"] == 0.5
        and op["specificity"] == pytest.approx(1 / 3)
        and op["ppv"] == pytest.approx(1 / 3)
    )
    assert op["referrals_per_100"] == pytest.approx(100 * 2 / 3)


def test_temperature_bias_recovers_a_scale_and_a_per_class_shift():
    # true posteriors softmax(z); the model reports 2 z + shift (over-confident, prior-shifted,
    # as class-weighted training leaves it): T = 2 and bias = -shift / 2 (mean-centred) undo it
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.5, (20_000, 5))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    shift = np.array([1.0, -0.5, 0.0, 0.8, -1.3])
    logits = 2 * z + shift
    t, bias = fit_temperature_bias(logits, y)
    assert t == pytest.approx(2.0, rel=0.05)
    want = -shift / 2
    np.testing.assert_allclose(bias, want - want.mean(), atol=0.06)
    assert abs(bias.mean()) < 1e-9
    t_only = fit_temperature(logits, y)
    assert nll_with_calibration(logits, y, t, bias) < nll_with_calibration(logits, y, t_only) - 0.01
    np.testing.assert_allclose(apply_calibration(logits, t, bias), apply_calibration(logits / t + bias, 1.0))


def test_temperature_bias_is_never_worse_than_temperature_alone_and_handles_no_data():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (40, 7))
    y = rng.integers(0, 7, 40)
    t, bias = fit_temperature_bias(logits, y)
    t0 = fit_temperature(logits, y)
    assert nll_with_calibration(logits, y, t, bias) <= nll_with_calibration(logits, y, t0) + 1e-12
    assert fit_temperature_bias(np.zeros((0, 3)), np.zeros(0, int))[1].tolist() == [0.0, 0.0, 0.0]


def test_balanced_decision_by_hand():
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
    assert balanced_decision(probs, None).tolist() == [0, 0]
    # against priors 0.8 / 0.1 / 0.1: 0.75, 3.0, 1.0 and 0.625, 1.0, 4.0
    assert balanced_decision(probs, [0.8, 0.1, 0.1]).tolist() == [1, 2]


def test_nll_is_exact_for_a_confident_wrong_answer():
    # p(true class) = exp(-800) underflows to 0 in float64; the NLL is still 800, not a clipped 690
    logits = np.array([[0.0, 800.0], [3.0, 0.0]])
    y = np.array([0, 0])
    expected = (800.0 + np.log1p(np.exp(-800.0))) / 2 + np.log1p(np.exp(-3.0)) / 2
    assert nll_with_calibration(logits, y, 1.0) == pytest.approx(expected, rel=1e-12)
    # a bias of +800 on class 0 undoes it
    assert nll_with_calibration(logits, y, 1.0, [800.0, 0.0]) < 1.0
