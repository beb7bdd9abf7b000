"""Predictions files and the report builder shared by evaluate, ensemble and calibrate.

A member (``evaluate``), the ensemble and the calibrated bundle are measured by the same code:
the predictions CSV format (:func:`predictions_frame`, :func:`read_predictions`), the metrics
with lesion-bootstrap CIs (:func:`report`), the subgroup table and the plots
(:func:`write_plots`). No stage module imports another; this is where what they share lives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import (
    balanced_accuracy,
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    log_loss,
    malignant_score,
    malignant_truth,
    operating_point,
    roc_curve,
)
from skinlesion.params.evaluate import EvaluateParams

log = logging.getLogger(__name__)

META_COLUMNS = ("image_id", "lesion_id", "dx", "age", "sex", "localization")
SUBGROUP_ATTRIBUTES = ("localization", "sex", "age_band")


# --------------------------------------------------------------------------- prediction frames


def prob_columns(classes: Sequence[str] = CLASSES) -> list[str]:
    return [f"prob_{c}" for c in classes]


def logit_columns(classes: Sequence[str] = CLASSES) -> list[str]:
    return [f"logit_{c}" for c in classes]


def predictions_frame(
    meta: pd.DataFrame, probs: np.ndarray, classes: Sequence[str] = CLASSES
) -> pd.DataFrame:
    """The predictions CSV's rows: metadata, probabilities and log-probabilities ("logits").

    The logits are log(p) rather than the network's pre-softmax values: softmax(log p) = p, and
    averaged members have no pre-softmax values, so one definition serves members and ensemble.
    """
    probs = np.asarray(probs, dtype=np.float64)
    df = meta.loc[:, list(META_COLUMNS)].reset_index(drop=True).copy()
    df[prob_columns(classes)] = probs
    df[logit_columns(classes)] = np.log(np.clip(probs, 1e-12, 1.0))
    return df


def read_predictions(
    path: str | Path, classes: Sequence[str] = CLASSES, *, producer: str = "evaluate"
) -> pd.DataFrame:
    """Read and check a predictions CSV; errors name the file, the column and the row."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "dx": str}, keep_default_na=False)
    except FileNotFoundError:
        raise StageError(f"{path}: predictions not found; run the {producer} stage first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise StageError(f"{path}: cannot parse predictions CSV: {e}") from None
    needed = [*META_COLUMNS, *prob_columns(classes), *logit_columns(classes)]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise StageError(f"{path}: missing column(s) {missing}")
    bad_dx = ~df["dx"].isin(classes)
    if bad_dx.any():
        i = int(np.flatnonzero(bad_dx)[0])
        raise StageError(f"{path}: row {i + 2}: dx {df['dx'].iloc[i]!r} is not one of {list(classes)}")
    for col in (*prob_columns(classes), *logit_columns(classes)):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StageError(
                f"{path}: row {i + 2}: column {col} holds {df[col].iloc[i]!r}, not a finite number"
            )
        df[col] = values.astype(np.float64)
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
        raise StageError(f"{path}: image_id {dup} appears twice")
    return df


def complete_metadata(df: pd.DataFrame) -> np.ndarray:
    """Rows whose age, sex and localization are all known (the rows a fusion bundle scores with
    its metadata operating point; see skinlesion.measure.scoring)."""
    age = pd.to_numeric(df["age"].astype(str).str.strip().replace("", "nan"), errors="coerce")
    sex = df["sex"].astype(str).str.strip().str.lower()
    loc = df["localization"].astype(str).str.strip().str.lower()
    return (np.isfinite(age.to_numpy(dtype=np.float64)) & ~sex.isin(["", "unknown"]).to_numpy()
            & ~loc.isin(["", "unknown"]).to_numpy())  # fmt: skip


def labels(df: pd.DataFrame, classes: Sequence[str] = CLASSES) -> np.ndarray:
    return df["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)


def probabilities(df: pd.DataFrame, classes: Sequence[str] = CLASSES) -> np.ndarray:
    return df[prob_columns(classes)].to_numpy(dtype=np.float64)


def write_predictions(df: pd.DataFrame, path: Path) -> None:
    # 9 significant digits: enough that metrics recomputed from the CSV match to ~1e-8.
    df.to_csv(path, index=False, float_format="%.9g", lineterminator="\n")


def lesion_probabilities(
    groups: Sequence, probs: np.ndarray, y: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Lesion-level aggregation: the mean probability over each lesion's images.

    A clinician decides per lesion, and a lesion photographed three times should get one
    answer, not three. Returns (lesion key per row of the output, mean probabilities, the
    lesion's label: its most frequent image label, ties to the lower class index)."""
    keys, lesion_of = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.bincount(lesion_of, minlength=keys.size).astype(np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    mean = np.stack([np.bincount(lesion_of, weights=probs[:, j], minlength=keys.size)
                     for j in range(probs.shape[1])], axis=1) / counts[:, None]  # fmt: skip
    label = None
    if y is not None:
        votes = np.zeros((keys.size, probs.shape[1]))
        np.add.at(votes, (lesion_of, np.asarray(y, dtype=np.int64)), 1.0)
        label = votes.argmax(axis=1)
    return keys, mean, label


# The lesion-level metrics reported beside the image-level ones (prefix ``lesion_``).
LESION_KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "malignant_auc", "mel_recall")


def lesion_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    groups: Sequence,
    n_samples: int,
    rng: np.random.Generator,
    *,
    level: float = 0.95,
    classes: Sequence[str] = CLASSES,
    desc: str = "lesion bootstrap",
    progress: bool = True,
) -> dict[str, float]:
    """``lesion_<key>`` (+ CIs) for :data:`LESION_KEYS`, on the lesion-averaged probabilities."""
    keys, mean, label = lesion_probabilities(groups, probs, y)
    m = metrics_with_ci(
        label, mean, keys, n_samples, rng, level=level, classes=classes, desc=desc, progress=progress
    )
    out = {"lesion_n": float(keys.size)}
    for k in LESION_KEYS:
        for suffix in ("", "_ci_low", "_ci_high"):
            if f"{k}{suffix}" in m:
                out[f"lesion_{k}{suffix}"] = m[f"{k}{suffix}"]
    return out


# --------------------------------------------------------------------------- metrics + subgroups


def json_value(v: Any) -> Any:
    """JSON has no NaN: an undefined metric is written as null."""
    if isinstance(v, (float, np.floating)):
        return None if not np.isfinite(v) else round(float(v), 6) + 0.0  # + 0.0: no "-0.0"
    if isinstance(v, np.integer):
        return int(v)
    return v


def metrics_with_ci(
    y: np.ndarray,
    probs: np.ndarray,
    groups: Sequence,
    n_samples: int,
    rng: np.random.Generator,
    *,
    level: float = 0.95,
    classes: Sequence[str] = CLASSES,
    desc: str = "bootstrap",
    progress: bool = True,
) -> dict[str, float]:
    """:func:`classification_metrics` plus ``<key>_ci_low/_ci_high`` from a lesion bootstrap."""
    point = classification_metrics(y, probs, classes)
    point_keys = [k for k in point if k != "n_images"]

    def stat(idx: np.ndarray) -> dict[str, float]:
        m = classification_metrics(y[idx], probs[idx], classes)
        return {k: m[k] for k in point_keys}

    ci = bootstrap_ci(
        stat,
        groups,
        n_samples,
        rng,
        level=level,
        progress=lambda it: tqdm(
            it, total=n_samples, desc=desc, unit="rep", leave=False, disable=not progress
        ),
    )
    out = dict(point)
    for k in point_keys:
        lo, hi = ci.get(k, (np.nan, np.nan))
        out[f"{k}_ci_low"], out[f"{k}_ci_high"] = lo, hi
    return out


def age_band_names(edges: Sequence[int]) -> list[str]:
    """The band labels in age order, ``unknown`` last."""
    names = [f"<{edges[0]}"] if edges else []
    names += [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    names += [f"{edges[-1]}+"] if edges else ["all"]
    return [*names, "unknown"]


def age_band(age: pd.Series, edges: Sequence[int]) -> pd.Series:
    """``<30``, ``30-44``, ..., ``75+`` or ``unknown`` for each age (edges are upper-exclusive)."""
    values = pd.to_numeric(age, errors="coerce").to_numpy(dtype=np.float64)
    names = age_band_names(edges)[:-1]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    out = np.array(names, dtype=object)[np.clip(idx, 0, len(names) - 1)]
    out[np.isnan(values)] = "unknown"
    return pd.Series(out, index=age.index, dtype=object)


def subgroup_table(
    df: pd.DataFrame,
    probs: np.ndarray,
    age_edges: Sequence[int],
    *,
    malignant_flag: np.ndarray | None = None,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """Recall per class and malignant recall for every value of localization, sex and age band.

    ``malignant_flag`` is the malignant decision per image; by default "the top-1 class is
    malignant" (a member has no threshold yet), the calibrate stage passes its threshold's flags.
    """
    y = labels(df, classes)
    pred = np.asarray(probs).argmax(axis=1)
    is_mal = malignant_truth(y, classes)
    flag = malignant_truth(pred, classes) if malignant_flag is None else np.asarray(malignant_flag, bool)
    attrs = {
        "localization": df["localization"].astype(str).replace("", "unknown"),
        "sex": df["sex"].astype(str).replace("", "unknown"),
        "age_band": age_band(df["age"], age_edges),
    }
    rows = []
    for attr, values in attrs.items():
        present = set(values.unique())
        order = (
            [b for b in age_band_names(age_edges) if b in present] if attr == "age_band" else sorted(present)
        )
        for value in order:
            m = (values == value).to_numpy()
            n_mal = int(is_mal[m].sum())
            row: dict[str, Any] = {
                "attribute": attr,
                "group": value,
                "n_images": int(m.sum()),
                "n_lesions": int(df.loc[m, "lesion_id"].nunique()),
                "n_malignant": n_mal,
                "malignant_recall": (flag[m] & is_mal[m]).sum() / n_mal if n_mal else np.nan,
            }
            for i, c in enumerate(classes):
                n_c = int((y[m] == i).sum())
                row[f"n_{c}"] = n_c
                row[f"recall_{c}"] = (pred[m][y[m] == i] == i).mean() if n_c else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def worst_subgroup(table: pd.DataFrame, min_malignant: int) -> dict[str, Any]:
    """The subgroup with the lowest malignant recall among those with enough malignant cases."""
    eligible = table[table["n_malignant"] >= min_malignant].sort_values(
        ["malignant_recall", "n_malignant"], ascending=[True, False], kind="mergesort"
    )
    if eligible.empty:
        return {
            "worst_subgroup": "none",
            "worst_subgroup_malignant_recall": None,
            "worst_subgroup_n_malignant": 0,
        }
    w = eligible.iloc[0]
    return {
        "worst_subgroup": f"{w['attribute']}={w['group']}",
        "worst_subgroup_malignant_recall": float(w["malignant_recall"]),
        "worst_subgroup_n_malignant": int(w["n_malignant"]),
    }


def report(
    test: pd.DataFrame,
    val: pd.DataFrame | None,
    params: EvaluateParams,
    rng: np.random.Generator,
    *,
    classes: Sequence[str] = CLASSES,
    desc: str = "bootstrap",
    progress: bool = True,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The metrics JSON (test metrics with CIs, ``val_*``, worst subgroup) and the subgroup table."""
    y, probs = labels(test, classes), probabilities(test, classes)
    metrics = metrics_with_ci(
        y,
        probs,
        test["lesion_id"].to_numpy(),
        params.bootstrap_samples,
        rng,
        level=params.ci_level,
        classes=classes,
        desc=desc,
        progress=progress,
    )
    metrics["n_lesions"] = float(test["lesion_id"].nunique())
    metrics["log_loss"] = log_loss(y, probs)
    metrics.update(
        lesion_metrics(y, probs, test["lesion_id"].to_numpy(), params.bootstrap_samples, rng,
                       level=params.ci_level, classes=classes, desc=f"{desc} (lesions)", progress=progress)
    )  # fmt: skip
    if val is not None:
        yv, pv = labels(val, classes), probabilities(val, classes)
        vm = classification_metrics(yv, pv, classes)
        for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "malignant_auc"):
            metrics[f"val_{k}"] = vm[k]
        metrics["val_log_loss"] = log_loss(yv, pv)
    table = subgroup_table(test, probs, params.age_bands, classes=classes)
    metrics.update(worst_subgroup(table, params.subgroup_min_malignant))
    return {k: json_value(v) for k, v in metrics.items()}, table


# --------------------------------------------------------------------------- served predictions


@dataclass(frozen=True)
class Served:
    """A bundle's answers for labelled images (as ``serve`` gives them), one row per image."""

    probs: np.ndarray  # calibrated [N, K]
    modes: np.ndarray  # the input mode each row was scored in (skinlesion.measure.scoring)
    score: np.ndarray  # P(mel) + P(bcc) + P(akiec)
    threshold: np.ndarray  # the malignant threshold of the row's mode
    decisions: np.ndarray  # predicted class index (the row's mode's decision)

    def frame(self, meta: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
        """The served predictions file: metadata, probabilities, mode, threshold, refer, predicted."""
        df = predictions_frame(meta, self.probs, classes)
        df["mode"] = self.modes
        df["malignant_prob"] = self.score
        df["threshold"] = self.threshold
        df["refer"] = self.score >= self.threshold
        df["predicted"] = np.asarray(classes)[self.decisions]
        return df


def served_report(
    meta: pd.DataFrame,
    served: Served,
    params: EvaluateParams,
    rng: np.random.Generator,
    *,
    ece_bins: int = 15,
    classes: Sequence[str] = CLASSES,
    desc: str = "served bootstrap",
    progress: bool = True,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """What a bundle delivers on labelled images: the metrics the calibrate stage reports for
    its test split and ``serve.evaluate`` for any labelled folder (one definition for both).

    ``meta``: one row per image (image_id, lesion_id, dx, age, sex, localization). Gives the
    classification metrics with lesion-bootstrap CIs (:func:`report`, per image and per lesion),
    the malignant operating point at each row's own threshold (``test_malignant_recall``,
    ``test_specificity``, ``test_ppv``, ``referrals_per_100`` with CIs, and per lesion), ECE and
    NLL of the calibrated probabilities, the balanced accuracy of the bundle's decision, the
    share of rows scored with metadata, and the subgroup table with the worst subgroup.
    """
    y = labels(meta, classes)
    frame = served.frame(meta, classes)
    out: dict[str, Any] = {}
    headline, _ = report(frame, None, params, rng, classes=classes, desc=desc, progress=progress)
    out.update({k: v for k, v in headline.items() if not k.startswith("worst_subgroup")})
    out["ece_after"] = expected_calibration_error(served.probs, y, ece_bins)
    out["nll_after"] = float(-np.mean(np.log(np.clip(served.probs[np.arange(len(y)), y], 1e-300, 1.0))))
    out["balanced_accuracy_decision"] = balanced_accuracy(y, served.decisions, len(classes))
    # What the bundle tells a user is its decision (e.g. the balanced rule), not the arg-max of
    # its probabilities: per-class recall and precision of that decision.
    for i, c in enumerate(classes):
        truth, said = y == i, served.decisions == i
        out[f"recall_{c}_decision"] = float(np.mean(said[truth])) if truth.any() else np.nan
        out[f"precision_{c}_decision"] = float(np.mean(truth[said])) if said.any() else np.nan
    out["mel_recall_decision"] = out.get("recall_mel_decision", np.nan)
    out["share_metadata"] = float(np.mean(served.modes == "metadata"))

    # Each row against its own mode's threshold: the flag is score - threshold >= 0.
    margin = served.score - served.threshold
    is_mal = malignant_truth(y, classes)
    groups = meta["lesion_id"].to_numpy()
    op = operating_point(is_mal, margin, 0.0, groups)
    out.update(
        {
            "test_malignant_recall": op["recall"],
            "test_specificity": op["specificity"],
            "test_ppv": op["ppv"],
            "referrals_per_100": op["referrals_per_100"],
            "test_n_malignant": float(is_mal.sum()),
            "test_n_lesions": float(len(np.unique(groups))),
        }
    )
    # Lesion level: the lesion's mean margin over its threshold (its mean score, one threshold).
    _, lesion_margin, _ = lesion_probabilities(groups, margin[:, None])
    _, lesion_of = np.unique(groups, return_inverse=True)
    lesion_mal = np.bincount(lesion_of, weights=is_mal) > 0
    lop = operating_point(lesion_mal, lesion_margin[:, 0], 0.0)
    out["lesion_test_malignant_recall"] = lop["recall"]
    out["lesion_test_specificity"] = lop["specificity"]
    out["lesion_test_n_malignant"] = float(lesion_mal.sum())
    # Referrals are per lesion: a lesion drawn twice by the bootstrap counts twice, so weight each
    # lesion's referral by how often it was drawn (its image count in the replicate / its size).
    size = np.bincount(lesion_of)
    referred = np.bincount(lesion_of, weights=(margin >= 0.0).astype(np.float64)) > 0

    def stat(idx: np.ndarray) -> dict[str, float]:
        o = operating_point(is_mal[idx], margin[idx], 0.0)
        drawn = np.bincount(lesion_of[idx], minlength=size.size) / size
        o["referrals_per_100"] = 100.0 * float(drawn @ referred) / float(drawn.sum())
        return o

    ci = bootstrap_ci(stat, groups, params.bootstrap_samples, rng, level=params.ci_level)
    for key, name in (
        ("recall", "test_malignant_recall"),
        ("specificity", "test_specificity"),
        ("ppv", "test_ppv"),
        ("referrals_per_100", "referrals_per_100"),
    ):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = ci.get(key, (np.nan, np.nan))
    table = subgroup_table(
        meta, served.probs, params.age_bands, malignant_flag=margin >= 0.0, classes=classes
    )
    out.update(worst_subgroup(table, params.subgroup_min_malignant))
    return {k: json_value(v) for k, v in out.items()}, table


# --------------------------------------------------------------------------- plots


def _curve_frames(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, tuple]:
    """name -> (roc frame fpr,tpr ; pr frame recall,precision) for each class and 'malignant'."""
    targets = {c: (y == i, probs[:, i]) for i, c in enumerate(classes)}
    targets["malignant"] = (malignant_truth(y, classes), malignant_score(probs, classes))
    out = {}
    for name, (truth, score) in targets.items():
        if truth.all() or not truth.any():
            continue  # a curve needs both positives and negatives
        fpr, tpr, _ = roc_curve(truth, score)
        n_pos = truth.sum()
        tp = tpr[1:] * n_pos
        fp = fpr[1:] * (~truth).sum()
        roc = pd.DataFrame({"fpr": fpr, "tpr": tpr})
        pr = pd.DataFrame({"recall": tpr[1:], "precision": tp / np.maximum(tp + fp, 1)})
        out[name] = (roc.round(6), pr.round(6))
    return out


def write_plots(
    plots_dir: Path,
    df: pd.DataFrame,
    table: pd.DataFrame,
    *,
    images: np.ndarray | None = None,
    title: str = "",
    classes: Sequence[str] = CLASSES,
) -> None:
    """Write every plot file into ``plots_dir`` (which must exist and be empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, probs = labels(df, classes), probabilities(df, classes)
    pred = probs.argmax(axis=1)
    pd.DataFrame({"actual": np.asarray(classes)[y], "predicted": np.asarray(classes)[pred]}).to_csv(
        plots_dir / "confusion.csv", index=False, lineterminator="\n"
    )
    for sub in ("roc", "pr"):
        (plots_dir / sub).mkdir()
    for name, (roc, pr) in _curve_frames(y, probs, classes).items():
        roc.to_csv(plots_dir / "roc" / f"{name}.csv", index=False, lineterminator="\n")
        pr.to_csv(plots_dir / "pr" / f"{name}.csv", index=False, lineterminator="\n")
    table.to_csv(plots_dir / "subgroups.csv", index=False, float_format="%.4f", lineterminator="\n")

    k = len(classes)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i].sum():
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}\n({cm[i, j]})",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title} confusion (row-normalised, counts)".strip())
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(plots_dir / "confusion_normalized.png", dpi=100)
    plt.close(fig)

    if images is not None:
        confidence_grid(plots_dir / "confidence_grid.png", images, y, probs, classes=classes, title=title)


def confidence_picks(y: np.ndarray, probs: np.ndarray, n_classes: int) -> list[list[int | None]]:
    """Per class: indices of the images with the best, median and worst P(true class)."""
    conf = probs[np.arange(len(y)), y]
    picks = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if idx.size == 0:
            picks.append([None, None, None])
            continue
        order = idx[np.argsort(-conf[idx], kind="mergesort")]
        picks.append([int(order[0]), int(order[(order.size - 1) // 2]), int(order[-1])])
    return picks


def confidence_grid(
    path: Path,
    images: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    *,
    classes: Sequence[str] = CLASSES,
    title: str = "",
) -> None:
    import matplotlib.pyplot as plt

    picks = confidence_picks(y, probs, len(classes))
    fig, axes = plt.subplots(len(classes), 3, figsize=(6, 2 * len(classes)), squeeze=False)
    for c, row in enumerate(picks):
        for j, (label, i) in enumerate(zip(("best", "median", "worst"), row, strict=True)):
            ax = axes[c, j]
            ax.axis("off")
            if i is None:
                ax.text(0.5, 0.5, f"{classes[c]}: no cases", ha="center", va="center", fontsize=8)
                continue
            ax.imshow(images[i])
            top = classes[int(probs[i].argmax())]
            ax.set_title(f"{classes[c]} {label}\np={probs[i, c]:.2f} top={top}", fontsize=7)
    fig.suptitle(f"{title} test images by confidence in the true class".strip(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- model inference
