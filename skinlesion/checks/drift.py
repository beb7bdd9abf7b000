"""The drift check's statistics and verdict: a batch's per-image table against a bundle's reference.

The per-image table is :mod:`skinlesion.measure.imagefeatures`' (size, compression, brightness,
contrast, colour, saturation, sharpness, dark corners; the best member's embedding, the predicted
class and its calibrated confidence); the comparison is Evidently 0.7's:

* ``DataDriftPreset`` over the per-image features, a few PCA components of the embedding (fitted
  on the reference) and the predicted class, with the stat tests and thresholds of params.yaml;
  ``dataset_drift`` when at least ``drift.drift_share`` of them drifted;
* ``EmbeddingsDrift`` on the raw embedding vectors (``embedding_drift``);
* a single-feature alarm: a shift of at least ``drift.alarm_threshold`` reference standard
  deviations in one feature.

:func:`compare` runs them and gives the verdict; :func:`too_few_verdict` is the verdict of a batch
too small for any test. The stage entry (:mod:`stages.drift`) reads the files and writes the
outputs (:mod:`skinlesion.checks.drift_report`).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.checks.drift_metadata import value_text
from skinlesion.measure.imagefeatures import IMAGE_FEATURES, MODEL_FEATURES, PRED_CLASS
from skinlesion.params.drift import DriftParams

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
PC_PREFIX = "emb_pc"
# Metadata columns compared when both the reference and a labelled batch have them.
META_NUM = ("age",)
META_CAT = ("sex", "localization")
# Evidently's EmbeddingsDrift draws a t-SNE of up to 2,500 + 2,500 points for its plot only
# (~20 s on 2 cores); 500 + 500 show the same picture in ~2 s. The drift score uses every row.
EMBEDDING_PLOT_SAMPLE = 500
# The smallest batch (of distinct images) a drift test is run on. Measured on Evidently 0.7.23:
# 1 image fails its EmbeddingsDrift classifier (one class in a half of its 50/50 split) and the
# Cramer-von Mises test; 2 images fail the t-SNE density of its embedding plot (a singular
# covariance); from 3 the reports run, but the classifier's split (fixed seed, not stratified)
# still puts every batch row in one half for some reference sizes: 4 sizes up to 3,000 rows
# (drift.reference.max_images) with 10 images, 3 sizes up to 10,000 rows (HAM10000 has 10,015
# images) with 11, none with 12. This is the floor below which no statistic is defined, whatever
# the thresholds; it is not a floor for a reliable verdict: on real HAM10000 thumbnails, clean
# batches of 20 / 30 / 40-50 / 60-100 images had half of their image features past
# num_threshold 0.2 by sampling noise alone in 15/20, 8/20, 1/20, 0/20 draws. That minimum depends
# on the thresholds, so it would be a param (drift.min_images, in skinlesion/params/).
MIN_IMAGES = 12
TOO_FEW = "too few images"


def pca_columns(
    ref_emb: np.ndarray, cur_emb: np.ndarray, k: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``k`` principal components of the embedding, fitted on the reference only."""
    k = min(k, ref_emb.shape[1], max(len(ref_emb) - 1, 0))
    cols = [f"{PC_PREFIX}{i + 1}" for i in range(k)]
    if k == 0:
        return pd.DataFrame(index=range(len(ref_emb))), pd.DataFrame(index=range(len(cur_emb)))
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(ref_emb)
    return (
        pd.DataFrame(pca.transform(ref_emb), columns=cols),
        pd.DataFrame(pca.transform(cur_emb), columns=cols),
    )


def js_distance(ref: pd.Series, cur: pd.Series, classes: Sequence[str]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two class mixes."""
    from scipy.spatial.distance import jensenshannon

    p = ref.value_counts(normalize=True).reindex(classes, fill_value=0.0).to_numpy()
    q = cur.value_counts(normalize=True).reindex(classes, fill_value=0.0).to_numpy()
    return float(jensenshannon(p, q, base=2))


def drift_method(params: DriftParams) -> Any:
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    cls = {
        "model": ModelDriftMethod,
        "mmd": MMDDriftMethod,
        "distance": DistanceDriftMethod,
        "ratio": RatioDriftMethod,
    }[params.embedding_method]
    return cls(threshold=params.embedding_threshold)


def evidently_report(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    *,
    numerical: list[str],
    categorical: list[str],
    tested: list[str],
    embedding_cols: list[str],
    params: DriftParams,
) -> tuple[Any, dict[str, Any]]:
    """Run the Evidently report (per-feature tests on ``tested`` only); return the snapshot and
    what it found, flat.

    When Evidently's ``EmbeddingsDrift`` fails on a batch (its classifier's split, or the density
    of its t-SNE plot on embeddings that are all alike), the report is made without it and the
    embedding score is computed by the same method directly, or left out; ``notes`` says which.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embeddings_drift
    from evidently.metrics import EmbeddingsDrift, UniqueValueCount
    from evidently.presets import DataDriftPreset

    embeddings_drift.SAMPLE_CONSTANT = EMBEDDING_PLOT_SAMPLE  # see EMBEDDING_PLOT_SAMPLE
    definition = DataDefinition(
        numerical_columns=numerical,
        categorical_columns=categorical,
        embeddings={EMBEDDING: embedding_cols} if embedding_cols else None,
    )
    columns = numerical + categorical

    def report(with_embedding: bool) -> Any:
        metrics: list[Any] = [UniqueValueCount(column=PRED_CLASS)]
        if tested:
            metrics.insert(
                0,
                DataDriftPreset(
                    columns=tested,
                    drift_share=params.drift_share,
                    num_method=params.num_method,
                    num_threshold=params.num_threshold,
                    cat_method=params.cat_method,
                    cat_threshold=params.cat_threshold,
                ),
            )
        if with_embedding:
            metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=drift_method(params)))
        with warnings.catch_warnings():
            # Evidently divides by a column's spread for its plots; a constant column (every image
            # 200x150) warns on every run without changing a result.
            warnings.simplefilter("ignore", RuntimeWarning)
            return Report(metrics, metadata={"project": params.project}).run(
                Dataset.from_pandas(cur[columns + embedding_cols], data_definition=definition),
                Dataset.from_pandas(ref[columns + embedding_cols], data_definition=definition),
            )

    found: dict[str, Any] = {"values": {}, "embedding_score": None, "notes": []}
    try:
        snapshot = report(bool(embedding_cols))
    except Exception as e:
        if not embedding_cols:
            raise
        snapshot = report(False)  # anything else that fails fails again here, with its traceback
        failed = f"Evidently's EmbeddingsDrift failed on this batch ({_one_line(e)})"
        method = params.embedding_method
        score, why = embedding_score(ref[embedding_cols], cur[embedding_cols], params)
        found["embedding_score"] = score
        found["notes"].append(
            f"{failed}: the score is the {method} method's, computed without its plot"
            if why is None
            else f"{failed}, and its {method} method alone fails too ({why}): no embedding test"
        )
        log.warning("%s", found["notes"][-1])
    for m in snapshot.dict()["metrics"]:
        cfg = m["config"]
        kind = cfg["type"].rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            found["values"][cfg["column"]] = float(m["value"])
        elif kind == "EmbeddingsDrift":
            found["embedding_score"] = float(m["value"])
    score = found["embedding_score"]
    if score is not None and not np.isfinite(score):
        found["embedding_score"] = None
        found["notes"].append(
            f"the embedding drift score is undefined on this batch ({score}): no embedding test"
        )
    found["methods"] = {
        c: (params.cat_method, params.cat_threshold)
        if c in categorical
        else (params.num_method, params.num_threshold)
        for c in columns
    }
    return snapshot, found


def embedding_score(
    ref_emb: pd.DataFrame, cur_emb: pd.DataFrame, params: DriftParams
) -> tuple[float | None, str | None]:
    """The embedding drift score of ``drift.embedding_method`` alone (no plot), or None and why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score, _drifted, _name = drift_method(params)(cur_emb.copy(), ref_emb.copy())
    except Exception as e:  # the method's own failure on this batch: no score, said why
        return None, _one_line(e)
    score = float(score)
    return (score, None) if np.isfinite(score) else (None, f"score {score}")


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def count_distinct(frame: pd.DataFrame, embeddings: np.ndarray) -> int:
    """How many of the batch's images are different pictures: copies of one photograph (the same
    pixels, whatever the file) are one sample, so rows equal in size, pixel features and
    embedding count once; file size and JPEG quality are left out."""
    pixels = [c for c in IMAGE_FEATURES if c not in ("file_kb", "jpeg_quality")]
    table = np.column_stack([frame[pixels].to_numpy(dtype=float), embeddings])
    return len(pd.DataFrame(table).drop_duplicates())


def untestable(ref: pd.Series, cur: pd.Series, method: str, kind: str) -> tuple[str, bool] | None:
    """Why a feature gets no statistic on this batch, and whether it counts as not drifted; or None.

    One and the same value in the reference and the batch (every image 200x150): the two are
    identical, so not drifted; it is tested all the same when ``method`` gives a number on one
    value (wasserstein gives 0), and skipped when it does not (t_test: NaN; anderson: an error).
    Fewer than :data:`MIN_IMAGES` known values in the batch (an age known for 3 images), or none
    in the reference: not testable. ``kind``: num or cat.
    """
    r, c = ref.dropna(), cur.dropna()
    if not len(r):
        return "no values in the reference", False
    if len(c) < MIN_IMAGES:
        return f"{len(c)} known value(s) in the batch (< {MIN_IMAGES}): too few to test", False
    values = set(r.unique()) | set(c.unique())
    if len(values) == 1 and not defined_on_one_value(method, kind):
        value = value_text(next(iter(values)))
        return (
            f"one value ({value}) in the reference and the batch: identical, counted as not drifted "
            f"({method} is undefined on one value)",
            True,
        )
    return None


@functools.cache
def defined_on_one_value(method: str, kind: str) -> bool:
    """Whether Evidently's test ``method`` gives a number when both samples hold one same value."""
    from evidently.legacy.calculations.stattests.registry import get_stattest

    value = "a" if kind == "cat" else 1.0
    ref, cur = pd.Series([value] * 2 * MIN_IMAGES), pd.Series([value] * MIN_IMAGES)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = get_stattest(ref, cur, kind, method)(ref, cur, kind, None).drift_score
        return bool(np.isfinite(float(score)))
    except Exception:  # the test fails on it: that is the answer
        return False


def normed_wasserstein(ref: pd.Series, cur: pd.Series) -> float:
    """Wasserstein distance in reference standard deviations (Evidently's formula and floor)."""
    from scipy.stats import wasserstein_distance

    r = pd.to_numeric(ref, errors="coerce").dropna().to_numpy(dtype=float)
    c = pd.to_numeric(cur, errors="coerce").dropna().to_numpy(dtype=float)
    if not len(r) or not len(c):
        return 0.0
    return float(wasserstein_distance(r, c) / max(float(np.std(r)), 0.001))


def drifted(value: float, method: str, threshold: float) -> bool:
    """Evidently's rule: distances drift at >= threshold, p-values below it."""
    from evidently.legacy.calculations.stattests.registry import get_stattest

    st = get_stattest(pd.Series([0.0, 1.0]), pd.Series([0.0, 1.0]), "num", method)
    p_value_test = "p_value" in st.display_name.lower() or method in (
        "ks", "chisquare", "z", "t_test", "anderson", "cramer_von_mises", "mannw", "fisher_exact", "g_test",
        "emperical_mmd",
    )  # fmt: skip
    return value < threshold if p_value_test else value >= threshold


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found: the verdict's metrics (in ``metrics/drift.json``'s order),
    Evidently's snapshot, and the embedding drift score unrounded (the metrics hold it rounded)."""

    metrics: dict[str, Any]
    snapshot: Any
    embedding_score: float | None


def compare(
    ref_frame: pd.DataFrame,
    ref_emb: np.ndarray,
    cur_frame: pd.DataFrame,
    cur_emb: np.ndarray,
    joined: pd.DataFrame,
    *,
    n_labelled: int,
    classes: Sequence[str],
    params: DriftParams,
    seed: int,
) -> Comparison:
    """The drift tests of a batch (``cur_*``) against the reference (``ref_*``), and the verdict.

    ``*_frame``: the per-image tables (:func:`skinlesion.measure.imagefeatures.split_embeddings`),
    ``*_emb`` their embeddings; ``joined``: the batch's metadata rows in ``cur_frame``'s order (an
    image without a usable row: unknown), compared when ``n_labelled`` and the reference has them.
    The verdict is drift when the share of drifted features reaches ``drift.drift_share``, the
    embedding drifted, or one feature moved past ``drift.alarm_threshold``.
    """
    ref_pc, cur_pc = pca_columns(ref_emb, cur_emb, params.pca_components, seed)
    ref = pd.concat([ref_frame.reset_index(drop=True), ref_pc], axis=1)
    cur = pd.concat([cur_frame, cur_pc], axis=1)
    numerical = [*IMAGE_FEATURES, *MODEL_FEATURES, *ref_pc.columns]
    categorical = [PRED_CLASS]
    have = [c for c in (*META_NUM, *META_CAT) if c in ref.columns]
    if n_labelled and have:
        for c in have:
            values = pd.Series(joined[c].to_numpy())  # images without a usable row: unknown
            cur[c] = (values.astype(float) if c in META_NUM else values.fillna("unknown")).to_numpy()
        numerical += [c for c in META_NUM if c in have]
        categorical += [c for c in META_CAT if c in have]

    skipped: dict[str, str] = {}
    identical: list[str] = []
    for c in numerical + categorical:
        kind, method = ("cat", params.cat_method) if c in categorical else ("num", params.num_method)
        why = untestable(ref[c], cur[c], method, kind)
        if why is not None:
            skipped[c] = why[0]
            if why[1]:
                identical.append(c)
    tested = [c for c in numerical + categorical if c not in skipped]
    emb_cols = [f"emb_{i}" for i in range(ref_emb.shape[1])]
    ref_all = pd.concat([ref, pd.DataFrame(ref_emb, columns=emb_cols)], axis=1)
    cur_all = pd.concat([cur, pd.DataFrame(cur_emb, columns=emb_cols)], axis=1)
    snapshot, found = evidently_report(
        ref_all, cur_all, numerical=numerical, categorical=categorical, tested=tested,
        embedding_cols=emb_cols, params=params,
    )  # fmt: skip
    scores: dict[str, float] = {}
    for c in tested:
        v = found["values"].get(c)
        if v is not None and np.isfinite(v):
            scores[c] = v
        else:
            skipped[c] = f"{found['methods'][c][0]} gave no number on this batch ({v}): not tested"
    drifted_features = [c for c, v in scores.items() if drifted(v, *found["methods"][c])]
    # Features identical in both count as not drifted; untested ones do not count at all.
    n_counted = len(scores) + len(identical)
    share = len(drifted_features) / n_counted if n_counted else 0.0
    shifts = {c: normed_wasserstein(ref[c], cur[c]) for c in numerical if c not in skipped}
    alarm_features = [c for c, v in shifts.items() if v >= params.alarm_threshold]
    dataset_drift = bool(n_counted) and share >= params.drift_share
    emb_score = found["embedding_score"]
    # Evidently's own rule for every embedding method (without bootstrap): score > threshold.
    embedding_drift = None if emb_score is None else bool(emb_score > params.embedding_threshold)
    detected = bool(dataset_drift or embedding_drift or alarm_features)
    out = {
        "verdict": "drift detected" if detected else "no drift detected",
        "verdict_reason": None,
        "drift_detected": detected,
        "dataset_drift": bool(dataset_drift),
        "drift_share": round(share, 6),
        "n_features": len(numerical) + len(categorical),
        "n_tested_features": len(scores),
        "n_drifted_features": len(drifted_features),
        "drifted_features": drifted_features,
        "feature_scores": {c: round(v, 6) for c, v in scores.items()},
        "skipped_features": skipped,
        "feature_alarm": bool(alarm_features),
        "alarm_features": alarm_features,
        "max_feature_shift": round(max(shifts.values(), default=0.0), 6),
        "embedding_drift": embedding_drift,
        "embedding_drift_score": None if emb_score is None else round(float(emb_score), 6),
        "prediction_class_shift": round(js_distance(ref[PRED_CLASS], cur[PRED_CLASS], classes), 6),
        "notes": found["notes"],
    }
    return Comparison(out, snapshot, emb_score)


def too_few_verdict(n_images: int, n_distinct: int) -> dict[str, Any]:
    """The verdict's metrics for a batch too small (or too uniform) for any test: said, not guessed."""
    reason = (
        f"too few images for a drift test: {n_images} < {MIN_IMAGES}"
        if n_images < MIN_IMAGES
        else f"too few distinct images for a drift test: {n_distinct} < {MIN_IMAGES} "
        f"({n_images} images, the others copies of them)"
    )
    return {
        "verdict": TOO_FEW,
        "verdict_reason": reason,
        "drift_detected": None,
        "dataset_drift": None,
        "drift_share": None,
        "n_features": 0,
        "n_tested_features": 0,
        "n_drifted_features": 0,
        "drifted_features": [],
        "feature_scores": {},
        "skipped_features": {},
        "feature_alarm": None,
        "alarm_features": [],
        "max_feature_shift": None,
        "embedding_drift": None,
        "embedding_drift_score": None,
        "prediction_class_shift": None,
        "notes": ["no snapshot in the Evidently workspace: no test was run"],
    }
