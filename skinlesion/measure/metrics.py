"""Pure metric and fitting functions shared by the evaluate, ensemble and calibrate stages.

Arrays in, numbers out; no I/O, no TensorFlow, randomness only through a ``Generator`` passed in.
Conventions:

* ``y`` holds class indices into :data:`skinlesion.core.schema.CLASSES`; ``probs`` is ``(n, n_classes)``.
* A value that is undefined on the data (the AUC of a class with no cases, the precision of a
  class that is neither present nor predicted) is ``nan``; macro averages skip those classes.
* "malignant" is mel + bcc + akiec, scored by the sum of their three probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import log_softmax, logsumexp, softmax
from scipy.stats import rankdata

from skinlesion.core.schema import CLASSES, MALIGNANT

__all__ = [
    "apply_calibration",
    "balanced_accuracy",
    "balanced_decision",
    "binary_auc",
    "bootstrap_ci",
    "classification_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "fit_simplex_weights",
    "fit_temperature",
    "fit_temperature_bias",
    "lesion_bootstrap_indices",
    "log_loss",
    "macro_auc",
    "macro_f1",
    "malignant_score",
    "nll_with_calibration",
    "operating_point",
    "partial_auc_above_tpr",
    "per_class_prf",
    "recall_first_threshold",
    "reliability_table",
    "roc_curve",
]

_EPS = 1e-15


# --------------------------------------------------------------------------- classification


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class from a confusion matrix.

    Recall is nan for a class with no actual cases (it cannot be measured). Precision of a class
    that has cases but is never predicted is 0 (a real miss); nan only when the class is neither
    present nor predicted. F1 follows recall: nan when recall is, 0 when P + R = 0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    actual = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(actual > 0, tp / actual, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.where(actual > 0, 0.0, np.nan))
        denom = precision + recall
        f1 = np.where(np.isnan(recall), np.nan, np.where(denom > 0, 2 * precision * recall / denom, 0.0))
    return precision, recall, f1


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (the ISIC 2018 ranking metric)."""
    _, recall, _ = per_class_prf(confusion_matrix(y_true, y_pred, n_classes))
    return _nanmean(recall)


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); nan with one class only."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes present with both outcomes (nan if none).

    The one definition of the project: training's checkpoint monitor and the reports use it."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    return _nanmean(np.array([binary_auc(y == i, probs[:, i]) for i in range(probs.shape[1])]))


def macro_f1(y: np.ndarray, pred: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mean F1 of the class decision ``pred`` over the class indices ``labels`` (nan if none).

    Per class, F1 = 2 TP / (actual + predicted), 0 for a class neither present nor predicted:
    scikit-learn's ``f1_score(average="macro", labels=labels, zero_division=0)``, float for float.
    The caller names the classes: training's per-epoch validation score passes those in ``y`` or
    ``pred`` (a class predicted but absent scores 0). :func:`classification_metrics` reports the
    mean of :func:`per_class_prf`'s F1 (2PR / (P + R)) over the classes present in ``y``: this
    function with those labels up to the last bit of a float, kept so the reports stay
    bit-identical.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return float("nan")
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = int(max(labels.max(), y.max(initial=-1), pred.max(initial=-1))) + 1
    cm = confusion_matrix(y, pred, n)
    tp = np.diag(cm)[labels].astype(np.float64)
    denom = (cm.sum(axis=1)[labels] + cm.sum(axis=0)[labels]).astype(np.float64)
    f1 = np.where(denom > 0, 2.0 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    return float(np.mean(f1))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf.

    A case counts as positive at threshold t when ``score >= t``.
    """
    y = np.asarray(y, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    s, ys = score[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(ys)[last_of_tie]
    fps = last_of_tie + 1 - tps
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.size + 1, np.nan)
        fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def partial_auc_above_tpr(y: np.ndarray, score: np.ndarray, min_tpr: float = 0.80) -> float:
    """The ISIC 2024 challenge metric: area under the ROC curve restricted to TPR >= ``min_tpr``.

    Same definition as the official scorer (Kurtansky, MSKCC, 2024): flip labels and scores, take
    the ROC area for FPR in [0, 1 - min_tpr] with a linearly interpolated end point, unscaled.
    The range is [0, 1 - min_tpr]: 0.2 is perfect at 80%, a random ranking scores about 0.02.
    Equivalently, the integral over FPR of max(TPR - min_tpr, 0).
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr!r}")
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(~y, -np.asarray(score, dtype=np.float64))
    max_fpr = 1.0 - min_tpr
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    if stop < fpr.size:
        end = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
        fpr = np.r_[fpr[:stop], max_fpr]
        tpr = np.r_[tpr[:stop], end]
    return float(np.trapezoid(tpr, fpr))


def malignant_score(probs: np.ndarray, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """P(malignant) = P(mel) + P(bcc) + P(akiec)."""
    idx = [classes.index(c) for c in MALIGNANT]
    return np.asarray(probs)[:, idx].sum(axis=1)


def malignant_truth(y: np.ndarray, classes: Sequence[str] = CLASSES) -> np.ndarray:
    idx = np.array([classes.index(c) for c in MALIGNANT])
    return np.isin(np.asarray(y), idx)


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, *, min_tpr: float = 0.80
) -> dict[str, float]:
    """Every headline metric of one prediction set, as a flat dict (nan where undefined).

    The class decision is the arg-max; ``malignant_recall`` / ``malignant_specificity`` are for
    that decision (top-1 class is malignant), the threshold-free ones use :func:`malignant_score`.
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1 = per_class_prf(cm)
    aucs = np.array([binary_auc(y == i, probs[:, i]) for i in range(k)])  # macro_auc's terms
    mal_true = malignant_truth(y, classes)
    mal_pred = malignant_truth(pred, classes)
    mal_score = malignant_score(probs, classes)
    out: dict[str, float] = {
        "n_images": float(y.size),
        "accuracy": float(np.mean(pred == y)) if y.size else float("nan"),
        "balanced_accuracy": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "macro_auc": _nanmean(aucs),
        "malignant_auc": binary_auc(mal_true, mal_score),
        "malignant_pauc_tpr80": partial_auc_above_tpr(mal_true, mal_score, min_tpr),
        "malignant_recall": _ratio((mal_pred & mal_true).sum(), mal_true.sum()),
        "malignant_specificity": _ratio((~mal_pred & ~mal_true).sum(), (~mal_true).sum()),
        "mel_recall": float(recall[classes.index("mel")]),
    }
    for i, c in enumerate(classes):
        out[f"precision_{c}"] = float(precision[i])
        out[f"recall_{c}"] = float(recall[i])
        out[f"f1_{c}"] = float(f1[i])
        out[f"auc_{c}"] = float(aucs[i])
    return out


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped away from 0)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(p, _EPS, 1.0))))


# --------------------------------------------------------------------------- calibration


def reliability_table(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability per equal-width confidence bin ``((b-1)/B, b/B]``.

    Returns arrays ``bin_low``, ``bin_high``, ``count``, ``confidence`` (mean top probability)
    and ``accuracy`` (share of correct top-1), the last two nan for empty bins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    # ceil(conf * B) - 1 puts conf exactly on an edge into the lower bin, as (lo, hi] says.
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
        acc = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_low": edges[:-1],
        "bin_high": edges[1:],
        "count": count,
        "confidence": mean_conf,
        "accuracy": acc,
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of (bin share) * |accuracy - mean confidence|."""
    t = reliability_table(probs, y, n_bins)
    n = t["count"].sum()
    if n == 0:
        return float("nan")
    used = t["count"] > 0
    return float(np.sum(t["count"][used] / n * np.abs(t["accuracy"][used] - t["confidence"][used])))


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature minimising NLL on (validation) logits; never worse than T = 1.

    A 1-D bounded search over log T: NLL in 1/T is convex, so this finds the optimum within the
    bounds; the explicit comparison with T = 1 guarantees the fit can only help on the data it
    was fitted on, whatever the optimiser does at a bound.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if len(y) == 0:
        return 1.0
    res = optimize.minimize_scalar(
        lambda log_t: nll_with_calibration(logits, y, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(np.exp(res.x))
    return t if nll_with_calibration(logits, y, t) < nll_with_calibration(logits, y, 1.0) else 1.0


def _calibrated_logits(logits: np.ndarray, temperature: float, bias: Sequence[float] | None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)[None, :]
    return z


def apply_calibration(
    logits: np.ndarray, temperature: float, bias: Sequence[float] | None = None
) -> np.ndarray:
    """``softmax(logits / T + b)``: temperature scaling, with a per-class bias when ``bias`` is given."""
    return softmax(_calibrated_logits(logits, temperature, bias), axis=1)


def nll_with_calibration(
    logits: np.ndarray, y: np.ndarray, temperature: float, bias: Sequence[float] | None = None
) -> float:
    """Mean NLL at the true class of ``softmax(logits / T + b)`` (``b`` = 0 when ``bias`` is None).

    Computed with log-softmax rather than log(softmax): exact for confident wrong answers, whose
    probability underflows to 0 in float64 long before their log-probability does.
    """
    lp = log_softmax(_calibrated_logits(logits, temperature, bias), axis=1)
    return float(-np.mean(lp[np.arange(len(y)), np.asarray(y, dtype=np.int64)]))


def fit_temperature_bias(
    logits: np.ndarray, y: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling (Alexandari et al., ICML 2020): the temperature and the
    per-class bias (mean zero) minimising NLL on (validation) logits; never worse than the
    temperature alone, which it starts from.

    Why a bias: models trained with class weights (this pipeline's default) shift every logit by
    a per-class amount, their learned prior. One temperature cannot undo a shift that differs by
    class; on the real-data run it left ECE at 0.056, the bias brings it to 0.022.
    """
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = logits.shape[1]
    t0 = fit_temperature(logits, y, bounds=bounds)
    if len(y) == 0:
        return t0, np.zeros(k)
    lo, hi = np.log(bounds[0]), np.log(bounds[1])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # theta = (log T, b_1 .. b_K); NLL and its exact gradient (for L-BFGS-B)
        t = np.exp(theta[0])
        z = logits / t + theta[1:][None, :]
        p = softmax(z, axis=1)
        onehot = np.zeros_like(p)
        onehot[np.arange(len(y)), y] = 1.0
        nll = float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))
        g_z = (p - onehot) / len(y)
        g_log_t = float(np.sum(g_z * (-logits / t)))
        return nll, np.concatenate([[g_log_t], g_z.sum(axis=0)])

    start = np.concatenate([[np.log(t0)], np.zeros(k)])
    res = optimize.minimize(
        objective, start, jac=True, method="L-BFGS-B", bounds=[(lo, hi)] + [(-20.0, 20.0)] * k
    )
    t, bias = float(np.exp(res.x[0])), res.x[1:] - res.x[1:].mean()  # softmax ignores a common shift
    if nll_with_calibration(logits, y, t, bias) < nll_with_calibration(logits, y, t0):
        return t, bias
    return t0, np.zeros(k)


def balanced_decision(probs: np.ndarray, prior: Sequence[float] | None) -> np.ndarray:
    """The predicted class: ``argmax p(c|x) / prior_c`` (``argmax p`` without a prior).

    Calibrated posteriors follow the population's class mix, so their argmax favours the common
    class (nv); dividing by the prior gives the decision that maximises balanced accuracy, which
    weighs a missed melanoma like a missed naevus. Measured on the real-data run: balanced
    accuracy 0.473 by argmax of the bias-calibrated probabilities, 0.666 by this rule.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if prior is None:
        return probs.argmax(axis=1)
    return (probs / np.clip(np.asarray(prior, dtype=np.float64), 1e-12, None)[None, :]).argmax(axis=1)


# --------------------------------------------------------------------------- ensembling


def fit_simplex_weights(member_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights on the simplex minimising the log-loss of ``sum_m w_m * probs_m`` on (val) data.

    ``member_probs`` is ``(n_members, n, n_classes)``. Softmax parameterisation keeps the weights
    positive and summing to one without constraints; the result is never worse than equal
    weights on the data it was fitted on (equal weights are returned when the fit does not help).
    """
    p = np.asarray(member_probs, dtype=np.float64)
    m = p.shape[0]
    equal = np.full(m, 1.0 / m)
    if m == 1 or len(y) == 0:
        return equal
    p_true = p[:, np.arange(len(y)), np.asarray(y, dtype=np.int64)].T  # (n, m)
    log_p = np.log(np.clip(p_true, _EPS, 1.0))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_w = theta - logsumexp(theta)
        mix = logsumexp(log_p + log_w, axis=1)  # log sum_m w_m p_m
        loss = -np.mean(mix)
        # d(-mean log mix)/d theta_j = w_j - mean(w_j p_j / mix)
        resp = np.exp(log_p + log_w - mix[:, None])
        grad = np.exp(log_w) - resp.mean(axis=0)
        return float(loss), grad

    res = optimize.minimize(objective, np.zeros(m), jac=True, method="L-BFGS-B")
    w = softmax(res.x)
    fitted = -np.mean(np.log(np.clip(p_true @ w, _EPS, None)))
    base = -np.mean(np.log(np.clip(p_true @ equal, _EPS, None)))
    return w if fitted <= base else equal


# --------------------------------------------------------------------------- bootstrap


def lesion_bootstrap_indices(
    groups: Sequence, n_samples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield ``n_samples`` index arrays, each resampling *lesions* with replacement.

    Every image of a drawn lesion comes along (as many times as the lesion is drawn), so the
    interval reflects the lesion as the independent unit: images of one lesion are near copies.
    """
    _, lesion_of = np.unique(np.asarray(groups), return_inverse=True)
    n_lesions = int(lesion_of.max()) + 1 if lesion_of.size else 0
    images = np.arange(lesion_of.size)
    for _ in range(n_samples):
        drawn = np.bincount(rng.integers(0, n_lesions, n_lesions), minlength=n_lesions)
        yield np.repeat(images, drawn[lesion_of])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], Mapping[str, float]],
    groups: Sequence,
    n_samples: int,
    rng: np.random.Generator,
    *,
    level: float = 0.95,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every value ``statistic(index_array)`` returns, resampling lesions.

    Replicates where a value is undefined (nan, e.g. a class not drawn) are skipped for that key.
    """
    if n_samples <= 0:
        return {}
    it = lesion_bootstrap_indices(groups, n_samples, rng)
    if progress is not None:
        it = progress(it)
    rows = [statistic(idx) for idx in it]
    return {key: percentile_ci([r[key] for r in rows], level) for key in rows[0]}


def percentile_ci(replicates: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates, those that are nan (a statistic undefined
    on that draw) left out; (nan, nan) when none is defined."""
    v = np.asarray(replicates, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2
    return (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)))


def paired_mean_ci(
    diff: np.ndarray, groups: Sequence, n_samples: int, rng: np.random.Generator, *, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a per-image paired difference (e.g. member A's log-loss minus B's on the same
    images) and its lesion-bootstrap percentile CI: every replicate draws lesions with
    replacement and takes the mean over all their images. (nan, nan, nan) for no images."""
    d = np.asarray(diff, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan, math.nan)
    _, lesion_of = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(lesion_of, weights=d)
    counts = np.bincount(lesion_of).astype(np.float64)
    if n_samples <= 0:
        return (float(d.mean()), math.nan, math.nan)
    draws = rng.integers(0, sums.size, (n_samples, sums.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return (float(d.mean()), *percentile_ci(means, level))


# --------------------------------------------------------------------------- recall-first threshold


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    recall: float  # point recall on the fitting data at the threshold
    recall_lower: float  # bootstrap lower bound (equals recall when bound == "point")
    specificity: float


def recall_first_threshold(
    is_malignant: np.ndarray,
    score: np.ndarray,
    target_recall: float,
    *,
    bound: str = "point",
    groups: Sequence | None = None,
    n_samples: int = 1000,
    rng: np.random.Generator | None = None,
    level: float = 0.95,
) -> ThresholdChoice:
    """The highest threshold (so the smallest loss of specificity) whose malignant recall, on
    this data, is at least ``target_recall``; a case is flagged when ``score >= threshold``.

    ``bound="lower_ci"`` asks the lower end of a lesion-bootstrap CI of the recall to meet the
    target instead of the point value, a safety margin for small validation sets. The returned
    threshold sits half-way between the last malignant score that must be caught and the next
    lower score: any value in that gap gives the same result here, the middle is least fragile.
    """
    y = np.asarray(is_malignant, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if not y.any():
        raise ValueError("no malignant cases: the recall-first threshold cannot be chosen")
    pos_scores = np.unique(s[y])[::-1]  # candidate thresholds, high to low
    if bound == "point":
        sorted_pos = np.sort(s[y])
        caught = (y.sum() - np.searchsorted(sorted_pos, pos_scores, side="left")) / y.sum()
        ok = caught >= target_recall - 1e-12
        lower = caught
    elif bound == "lower_ci":
        if groups is None or rng is None:
            raise ValueError("bound='lower_ci' needs groups and rng")
        rec = np.empty((n_samples, pos_scores.size))
        for b, idx in enumerate(lesion_bootstrap_indices(groups, n_samples, rng)):
            yb, sb = y[idx], s[idx]
            n_pos = yb.sum()
            # caught at each candidate = positives with score >= t (sorted search, vectorised)
            sorted_pos = np.sort(sb[yb])
            caught_b = n_pos - np.searchsorted(sorted_pos, pos_scores, side="left")
            rec[b] = caught_b / n_pos if n_pos else np.nan
        lower = np.nanquantile(rec, (1.0 - level) / 2, axis=0)
        ok = lower >= target_recall - 1e-12
    else:
        raise ValueError(f"bound must be 'point' or 'lower_ci', got {bound!r}")
    # recall only grows as the threshold falls, so the first candidate that meets it is the one
    k = int(np.argmax(ok)) if ok.any() else pos_scores.size - 1
    t_hi = pos_scores[k]
    below = s[s < t_hi]
    threshold = float((t_hi + below.max()) / 2) if below.size else float(t_hi)
    op = operating_point(y, s, threshold)
    return ThresholdChoice(threshold, op["recall"], float(lower[k]), op["specificity"])


def operating_point(
    is_malignant: np.ndarray, score: np.ndarray, threshold: float, groups: Sequence | None = None
) -> dict[str, float]:
    """Recall, specificity and PPV of ``score >= threshold`` per image, and referrals per 100
    lesions (a lesion is referred when any of its images is flagged; per image without groups)."""
    y = np.asarray(is_malignant, dtype=bool)
    flag = np.asarray(score, dtype=np.float64) >= threshold
    out = {
        "recall": _ratio((flag & y).sum(), y.sum()),
        "specificity": _ratio((~flag & ~y).sum(), (~y).sum()),
        "ppv": _ratio((flag & y).sum(), flag.sum()),
    }
    if groups is None:
        out["referrals_per_100"] = 100.0 * _ratio(flag.sum(), flag.size)
    else:
        _, lesion_of = np.unique(np.asarray(groups), return_inverse=True)
        referred = np.bincount(lesion_of, weights=flag.astype(np.float64)) > 0
        out["referrals_per_100"] = 100.0 * _ratio(referred.sum(), referred.size)
    return out


# --------------------------------------------------------------------------- helpers


def _nanmean(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
