"""Calibrate stage: temperature scaling, the recall-first malignant threshold, the model bundle.

Everything is fitted on the validation split; the test split is only reported on.

1. Calibration of the ensemble's logits (log of the averaged probabilities), fitted on val NLL
   (never worse than T = 1 there): ``calibrate.method`` ``temperature`` (one T) or
   ``temperature_bias`` (T and a per-class bias: undoes the prior shift of class-weighted
   training). ECE (15-bin, top-label) before and after, on val and test, and a reliability
   diagram (``<plots>/reliability.png`` and ``reliability/{before,after}.csv``). The predicted
   class is ``argmax p`` or, with ``calibrate.decision: balanced``, ``argmax p / prior`` (the
   validation class shares): calibrated probabilities follow the population, the decision
   weighs every class alike.
2. The malignant threshold on the calibrated P(mel) + P(bcc) + P(akiec): on val, the highest
   threshold whose malignant recall reaches ``calibrate.target_recall`` (the point value, or the
   lower end of its lesion-bootstrap CI with ``recall_bound: lower_ci``). Then reported on test
   without re-tuning: recall (with CI), specificity, PPV and referrals per 100 lesions.
3. The bundle ``<bundle>/``: the member models (copied), ``bundle.json`` (members, weights,
   temperature, threshold, classes, image size, the params and the data version it came from)
   and the model card, also written to ``<card>``. The folder is replaced in one rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from stages.bundle import REFERENCE_KEY, file_md5, write_drift_reference
from stages.common import (
    CLASSES,
    MALIGNANT,
    StageError,
    atomic_dir,
    atomic_file,
    run_main,
    setup_logging,
    write_json,
)
from stages.metrics import (
    apply_calibration,
    balanced_accuracy,
    balanced_decision,
    bootstrap_ci,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_bias,
    malignant_score,
    malignant_truth,
    nll_with_calibration,
    operating_point,
    recall_first_threshold,
    reliability_table,
)
from stages.params import CalibrateParams, DriftReferenceParams, load_params
from stages.predictions import (
    json_value,
    labels,
    lesion_probabilities,
    logit_columns,
    read_predictions,
    subgroup_table,
    worst_subgroup,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
DISCLAIMER = (
    "**Medical disclaimer.** This model is research software. It is not a medical device, has not "
    "been cleared or approved by any regulator, and must not be used to diagnose, treat or rule out "
    "skin cancer or any other condition. Its output is a decision-support signal for trained "
    "clinicians reviewing dermoscopic images; a low score never replaces examination, biopsy or "
    "the judgement of a dermatologist. Anyone worried about a skin lesion should see a doctor."
)


@dataclass(frozen=True)
class CalibrateResult:
    temperature: float
    threshold: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Calibration:
    """What is fitted on validation data: the only numbers the test split never influences."""

    temperature: float
    threshold: float
    val_recall: float
    val_recall_lower: float
    val_specificity: float
    bias: tuple[float, ...] | None = None  # per-class logit bias (method temperature_bias)
    prior: tuple[float, ...] | None = None  # the decision's class prior (decision balanced)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ensemble logits."""
        return apply_calibration(logits, self.temperature, self.bias)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted class index of each row of calibrated probabilities."""
        return balanced_decision(probs, self.prior)


# --------------------------------------------------------------------------- pure core


def fit_calibration(
    val_logits: np.ndarray,
    y_val: np.ndarray,
    groups_val: Sequence,
    params: CalibrateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> Calibration:
    """Temperature (and bias), then the recall-first threshold on the calibrated validation scores."""
    bias: tuple[float, ...] | None = None
    if params.method == "temperature_bias":
        t, b = fit_temperature_bias(val_logits, y_val)
        bias = tuple(round(float(v), 6) for v in b)
    else:
        t = fit_temperature(val_logits, y_val)
    prior = None
    if params.decision == "balanced":
        counts = np.bincount(np.asarray(y_val, dtype=np.int64), minlength=len(classes)).astype(np.float64)
        # the empirical shares; a class absent from val gets half a case instead of an infinite boost
        prior = tuple(round(float(v), 6) for v in np.maximum(counts, 0.5) / counts.sum())
    score = malignant_score(apply_calibration(val_logits, t, bias), classes)
    is_mal = malignant_truth(y_val, classes)
    if not is_mal.any():
        raise StageError(
            "validation split has no malignant case (mel, bcc, akiec): no threshold can be chosen"
        )
    choice = recall_first_threshold(
        is_mal,
        score,
        params.target_recall,
        bound=params.recall_bound,
        groups=np.asarray(groups_val),
        n_samples=params.bootstrap_samples,
        rng=rng,
        level=params.ci_level,
    )
    if choice.recall_lower < params.target_recall:
        log.warning(
            "the %s recall cannot reach %.3f on val even at the lowest threshold (%.3f)",
            params.recall_bound,
            params.target_recall,
            choice.recall_lower,
        )
    return Calibration(
        t, choice.threshold, choice.recall, choice.recall_lower, choice.specificity, bias=bias, prior=prior
    )


def calibration_metrics(
    cal: Calibration,
    val: pd.DataFrame,
    test: pd.DataFrame,
    params: CalibrateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> dict[str, float]:
    """ECE/NLL before and after, and the operating point on test (fixed threshold, with CIs)."""
    out: dict[str, float] = {
        "temperature": cal.temperature,
        "threshold": cal.threshold,
        "target_recall": params.target_recall,
        "val_malignant_recall": cal.val_recall,
        "val_malignant_recall_bound": cal.val_recall_lower,
        "val_specificity": cal.val_specificity,
    }
    for name, df in (("val", val), ("test", test)):
        y = labels(df, classes)
        logits = df[logit_columns(classes)].to_numpy(dtype=np.float64)
        prefix = "" if name == "test" else "val_"
        calibrated = cal.probs(logits)
        out[f"{prefix}ece_before"] = expected_calibration_error(
            apply_calibration(logits, 1.0), y, params.ece_bins
        )
        out[f"{prefix}ece_after"] = expected_calibration_error(calibrated, y, params.ece_bins)
        out[f"{prefix}nll_before"] = nll_with_calibration(logits, y, 1.0)
        out[f"{prefix}nll_after"] = nll_with_calibration(logits, y, cal.temperature, cal.bias)
        # the bundle's class decision on calibrated probabilities (calibrate.decision)
        out[f"{prefix}balanced_accuracy_decision"] = balanced_accuracy(
            y, cal.decide(calibrated), len(classes)
        )

    y = labels(test, classes)
    logits = test[logit_columns(classes)].to_numpy(dtype=np.float64)
    score = malignant_score(cal.probs(logits), classes)
    is_mal = malignant_truth(y, classes)
    groups = test["lesion_id"].to_numpy()
    op = operating_point(is_mal, score, cal.threshold, groups)
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
    # Lesion level: the lesion's mean calibrated malignant probability against the same threshold.
    lesion_keys, lesion_score, _ = lesion_probabilities(groups, score[:, None])
    lesion_mal = np.bincount(np.unique(groups, return_inverse=True)[1], weights=is_mal) > 0
    lop = operating_point(lesion_mal, lesion_score[:, 0], cal.threshold)
    out["lesion_test_malignant_recall"] = lop["recall"]
    out["lesion_test_specificity"] = lop["specificity"]
    out["lesion_test_n_malignant"] = float(lesion_mal.sum())
    # Referrals are per lesion: a lesion drawn twice by the bootstrap counts twice, so weight each
    # lesion's referral by how often it was drawn (its image count in the replicate / its size).
    _, lesion_of = np.unique(groups, return_inverse=True)
    size = np.bincount(lesion_of)
    referred = np.bincount(lesion_of, weights=(score >= cal.threshold).astype(np.float64)) > 0

    def stat(idx: np.ndarray) -> dict[str, float]:
        o = operating_point(is_mal[idx], score[idx], cal.threshold)
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
    return out


def data_version(lock_path: Path, prepared: str) -> str | None:
    """The DVC hash of ``prepared`` recorded in ``dvc.lock`` (None when it is not there)."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return None
    target = Path(prepared).as_posix().rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(str(out.get("path", ""))).as_posix().rstrip("/") == target:
                return out.get("md5") or out.get("hash")
    return None


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def model_card(
    *,
    bundle: dict[str, Any],
    ens_metrics: dict[str, Any],
    cal_metrics: dict[str, Any],
    subgroups: pd.DataFrame,
    split_counts: dict[str, dict[str, int]],
) -> str:
    """The model card as Markdown (pure: everything it shows is passed in)."""
    members = ", ".join(f"{m['name']} (weight {m['weight']:.3f})" for m in bundle["members"])
    level = int(round(100 * bundle["params"]["evaluate"]["ci_level"]))

    def with_ci(key: str, src: dict[str, Any]) -> str:
        lo, hi = src.get(f"{key}_ci_low"), src.get(f"{key}_ci_high")
        ci = f" ({_fmt(lo)} to {_fmt(hi)})" if lo is not None and hi is not None else ""
        return f"{_fmt(src.get(key))}{ci}"

    lines = [
        "# Model card: skin-lesion ensemble (HAM10000, 7 classes)",
        "",
        DISCLAIMER,
        "",
        f"Generated {bundle['created']} by the `calibrate` stage. Data version (DVC hash of "
        f"`{bundle['data_version']['path']}`): `{bundle['data_version']['md5'] or 'unknown'}`.",
        "",
        "## Intended use",
        "",
        "- Decision support for clinicians triaging **dermoscopic** images of single skin lesions: "
        "calibrated probabilities for the 7 HAM10000 diagnoses and a malignant flag (mel, bcc or "
        "akiec) set for high sensitivity, so that a flagged lesion is reviewed first or referred.",
        "- Research and teaching on reproducible ML pipelines.",
        "- **Not** intended for: clinical photographs or phone pictures, lesions outside the 7 "
        "classes (e.g. squamous cell carcinoma outside akiec, rare tumours), children, use "
        "without a clinician, or ruling out cancer.",
        "",
        "## Model",
        "",
        f"- Members: {members}; probabilities averaged with these weights ("
        + (
            "equal weights"
            if bundle["params"]["ensemble"]["weights"] == "equal"
            else "fitted on validation log-loss only"
        )
        + ").",
        f"- Input: RGB uint8 images resized to {bundle['image_size']}x{bundle['image_size']}.",
        f"- Calibration on the log of the averaged probabilities: temperature T = {bundle['temperature']:.3f}"
        + (
            ", then a per-class bias ("
            + ", ".join(f"{c} {v:+.2f}" for c, v in zip(bundle["classes"], bundle["class_bias"], strict=True))
            + ")"
            if bundle.get("class_bias")
            else ""
        )
        + ", fitted on validation NLL.",
        "- Predicted class: "
        + (
            "the highest calibrated probability divided by the class's validation share (balanced: "
            "every class weighs alike, so it can differ from the most probable class)."
            if bundle.get("decision") == "balanced"
            else "the highest calibrated probability."
        ),
        f"- Malignant flag: P(mel) + P(bcc) + P(akiec) >= {bundle['threshold']:.4f}, chosen on validation "
        f"as the highest threshold with malignant recall >= {bundle['target_recall']:.2f} "
        f"({bundle['recall_bound']} bound).",
        "",
        "## Data and split protocol",
        "",
        "- HAM10000 (Tschandl et al., 2018): dermoscopic images of pigmented lesions from Vienna and "
        "Queensland, 7 diagnoses, several images per lesion.",
        "- Split by lesion: every image of a lesion, and every near-duplicate image (perceptual-hash "
        "clusters, verified), falls in one split; stratified by diagnosis. Train fits the networks, "
        "validation picks checkpoints, ensemble weights, temperature and threshold; **test is only "
        "reported on**.",
        "",
        "| split | images | " + " | ".join(CLASSES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CLASSES) + " |",
    ]
    for split, counts in split_counts.items():
        lines.append(
            f"| {split} | {sum(counts.values())} | "
            + " | ".join(str(counts.get(c, 0)) for c in CLASSES)
            + " |"
        )
    lines += [
        "",
        f"## Test metrics ({level}% CIs from a lesion-level bootstrap)",
        "",
        "| metric | value (CI) |",
        "| --- | --- |",
    ]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "malignant_auc",
        "malignant_pauc_tpr80",
        "mel_recall",
    ):
        lines.append(f"| {key} | {with_ci(key, ens_metrics)} |")
    lines += [
        f"| best single member ({ens_metrics.get('best_member')}) macro_auc | "
        f"{_fmt(ens_metrics.get('best_member_macro_auc'))} |",
        "",
        "| class | precision | recall | F1 | AUC |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in CLASSES:
        lines.append(
            f"| {c} | {_fmt(ens_metrics.get(f'precision_{c}'))} | {with_ci(f'recall_{c}', ens_metrics)} | "
            f"{_fmt(ens_metrics.get(f'f1_{c}'))} | {with_ci(f'auc_{c}', ens_metrics)} |"
        )
    lines += [
        "",
        "## Calibration and the malignant operating point",
        "",
        f"- ECE (15-bin, top-label) on test: {_fmt(cal_metrics.get('ece_before'))} before, "
        f"{_fmt(cal_metrics.get('ece_after'))} after calibration; balanced accuracy of the predicted "
        f"class {_fmt(cal_metrics.get('balanced_accuracy_decision'))}.",
        "- On test at the fixed threshold: malignant recall "
        f"{with_ci('test_malignant_recall', cal_metrics)}, "
        f"specificity {with_ci('test_specificity', cal_metrics)}, PPV {with_ci('test_ppv', cal_metrics)}, "
        f"{_fmt(cal_metrics.get('referrals_per_100'), 1)} referrals per 100 lesions "
        f"({int(cal_metrics.get('test_n_malignant') or 0)} malignant test images).",
        "",
        "## Subgroups (test, malignant flag at the threshold)",
        "",
        "| attribute | group | images | lesions | malignant | malignant recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in subgroups.itertuples(index=False):
        lines.append(
            f"| {r.attribute} | {r.group} | {r.n_images} | {r.n_lesions} | {r.n_malignant} "
            f"| {_fmt(r.malignant_recall)} |"
        )
    min_mal = bundle["params"]["evaluate"]["subgroup_min_malignant"]
    worst = cal_metrics.get("worst_subgroup", "none")
    lines += [
        "",
        f"Worst subgroup by malignant recall (among groups with >= {min_mal} malignant test images): "
        + (
            f"**{worst}**, recall {_fmt(cal_metrics.get('worst_subgroup_malignant_recall'))} "
            f"on {cal_metrics.get('worst_subgroup_n_malignant')} malignant images."
            if worst != "none"
            else "none qualifies."
        ),
        "",
        "## Known limits",
        "",
        "- HAM10000 comes from two centres and mostly light skin types; performance on darker "
        "skin, other devices and other populations is unknown.",
        "- Rare classes (df, vasc, akiec) have few test lesions: their CIs are wide, and subgroups "
        "with few malignant cases say little (see the table's counts).",
        "- The threshold was chosen at the validation split's prevalence; PPV and referral rates "
        "change with the prevalence of the setting it is used in.",
        "- Images are downscaled; fine dermoscopic structures may be lost.",
        "- The labels include follow-up and consensus diagnoses, not only histopathology.",
    ]
    if bundle["params"].get("download", {}).get("source") == "synthetic":
        lines.append(
            "- **This bundle was trained on the embedded synthetic demo data**: its numbers say "
            "nothing about real lesions."
        )
    lines += ["", DISCLAIMER, ""]
    return "\n".join(lines)


def reliability_plot(
    path: Path, before: dict[str, np.ndarray], after: dict[str, np.ndarray], ece: tuple
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for name, t, e in (("before", before, ece[0]), ("after", after, ece[1])):
        used = t["count"] > 0
        ax.plot(t["confidence"][used], t["accuracy"][used], marker="o", label=f"{name} (ECE {e:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on test, calibration fitted on val")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class DriftReference:
    """Where the drift reference stored in the bundle comes from (see stages.bundle)."""

    raw_dir: Path  # data/raw: images/<image_id>.jpg
    split_csv: Path  # the validated split
    params: DriftReferenceParams
    max_pixels: int
    workers: int = 0


def run(
    params: CalibrateParams,
    *,
    seed: int,
    ensemble_dir: Path,
    ensemble_metrics_path: Path,
    models_dir: Path,
    prepared_dir: Path,
    bundle_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    card_path: Path,
    all_params: dict[str, Any],
    data_md5: str | None,
    reference: DriftReference | None = None,
    classes: Sequence[str] = CLASSES,
) -> CalibrateResult:
    ensemble_dir = Path(ensemble_dir)
    val = read_predictions(ensemble_dir / "val.csv", classes, producer="ensemble")
    test = read_predictions(ensemble_dir / "test.csv", classes, producer="ensemble")
    weights_path = ensemble_dir / "weights.json"
    try:
        weights = json.loads(weights_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{weights_path}: not found; run the ensemble stage first") from None
    try:
        ens_metrics = json.loads(Path(ensemble_metrics_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{ensemble_metrics_path}: not found; run the ensemble stage first") from None

    from stages.tfdata import load_manifest  # no TensorFlow: the manifest is plain JSON

    manifest = load_manifest(prepared_dir)
    if data_md5 is None:
        log.warning(
            "no DVC hash recorded for %s in dvc.lock: the bundle's data version is unknown", prepared_dir
        )

    rng = np.random.default_rng(seed)
    y_val = labels(val, classes)
    cal = fit_calibration(
        val[logit_columns(classes)].to_numpy(dtype=np.float64),
        y_val,
        val["lesion_id"].to_numpy(),
        params,
        rng,
        classes,
    )
    log.info(
        "temperature %.4f, threshold %.4f (val recall %.3f, bound %.3f, specificity %.3f)",
        cal.temperature,
        cal.threshold,
        cal.val_recall,
        cal.val_recall_lower,
        cal.val_specificity,
    )
    metrics = calibration_metrics(cal, val, test, params, rng, classes)
    log.info(
        "test: malignant recall %.3f, specificity %.3f, PPV %.3f, %.1f referrals/100 lesions; "
        "ECE %.4f -> %.4f",
        metrics["test_malignant_recall"],
        metrics["test_specificity"],
        metrics["test_ppv"],
        metrics["referrals_per_100"],
        metrics["ece_before"],
        metrics["ece_after"],
    )

    test_logits = test[logit_columns(classes)].to_numpy(dtype=np.float64)
    cal_probs = cal.probs(test_logits)
    flags = malignant_score(cal_probs, classes) >= cal.threshold
    eval_p = all_params.get("evaluate", {})
    subgroups = subgroup_table(
        test, cal_probs, eval_p.get("age_bands", (30, 45, 60, 75)), malignant_flag=flags, classes=classes
    )
    metrics.update(worst_subgroup(subgroups, int(eval_p.get("subgroup_min_malignant", 5))))

    members = []
    for name, w in zip(weights["members"], weights["weights"], strict=True):
        src = Path(models_dir) / name / "model.keras"
        if not src.is_file():
            raise StageError(f"{src}: member model not found; run the train stage for {name!r}")
        members.append({"name": name, "weight": float(w), "path": f"members/{name}/model.keras", "src": src})
    bundle = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "classes": list(classes),
        "malignant": list(MALIGNANT),
        "image_size": int(manifest["image_size"]),
        "aspect": manifest.get("aspect"),
        "members": [],
        "temperature": cal.temperature,
        "class_bias": list(cal.bias) if cal.bias is not None else None,
        "decision": "balanced" if cal.prior is not None else "argmax",
        "class_prior": list(cal.prior) if cal.prior is not None else None,
        "threshold": cal.threshold,
        "target_recall": params.target_recall,
        "recall_bound": params.recall_bound,
        "recipe": (
            "p = sum_m weight_m * model_m(image); calibrated = softmax(log(p) / temperature "
            "+ class_bias); predicted class = argmax calibrated / class_prior (decision balanced) "
            "or argmax calibrated; malignant flag = calibrated[mel] + calibrated[bcc] "
            "+ calibrated[akiec] >= threshold"
        ),
        "data_version": {"path": Path(prepared_dir).as_posix(), "md5": data_md5},
        "params": all_params,
        "metrics": {k: json_value(v) for k, v in metrics.items()},
    }

    split_counts = {
        split: {c: int(n) for c, n in manifest["splits"][split].get("class_counts", {}).items()}
        for split in ("train", "val", "test")
        if split in manifest.get("splits", {})
    }
    with atomic_dir(bundle_dir) as tmp:
        for m in members:
            dest = tmp / m["path"]
            dest.parent.mkdir(parents=True)
            shutil.copy2(m["src"], dest)
            bundle["members"].append(
                {"name": m["name"], "weight": m["weight"], "path": m["path"], "md5": file_md5(dest)}
            )
        card = model_card(
            bundle=bundle,
            ens_metrics=ens_metrics,
            cal_metrics=metrics,
            subgroups=subgroups,
            split_counts=split_counts,
        )
        write_json(tmp / "bundle.json", bundle)
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
        if reference is not None:
            # Built with the members as they now are in the bundle, then recorded in bundle.json.
            bundle[REFERENCE_KEY] = write_drift_reference(
                tmp,
                raw_dir=reference.raw_dir,
                split_csv=reference.split_csv,
                split=reference.params.split,
                max_images=reference.params.max_images,
                stats_size=reference.params.stats_size,
                max_pixels=reference.max_pixels,
                draft_gap=float(manifest.get("draft_gap", 2.0)),
                seed=seed,
                workers=reference.workers,
            )
            write_json(tmp / "bundle.json", bundle)
    with atomic_file(card_path, "w", encoding="utf-8") as fh:
        fh.write(card)

    with atomic_dir(plots_dir) as tmp:
        before = reliability_table(
            apply_calibration(test_logits, 1.0), labels(test, classes), params.ece_bins
        )
        after = reliability_table(cal_probs, labels(test, classes), params.ece_bins)
        (tmp / "reliability").mkdir()
        for name, t in (("before", before), ("after", after)):
            pd.DataFrame(t).round(6).to_csv(
                tmp / "reliability" / f"{name}.csv", index=False, lineterminator="\n"
            )
        reliability_plot(
            tmp / "reliability.png", before, after, (metrics["ece_before"], metrics["ece_after"])
        )
        subgroups.to_csv(tmp / "subgroups.csv", index=False, float_format="%.4f", lineterminator="\n")
    out = {k: json_value(v) for k, v in metrics.items()}
    write_json(metrics_path, out)
    return CalibrateResult(cal.temperature, cal.threshold, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.calibrate",
        description="Temperature scaling and the recall-first malignant threshold, both fitted on "
        "val and reported on test; writes the model bundle and the model card.",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (calibrate, base.seed)"
    )
    ap.add_argument(
        "--ensemble",
        type=Path,
        required=True,
        help="ensemble predictions folder (val.csv, test.csv, weights.json)",
    )
    ap.add_argument("--ensemble-metrics", type=Path, required=True, help="the ensemble stage's metrics JSON")
    ap.add_argument(
        "--models", type=Path, required=True, help="folder of the member models (<models>/<name>/model.keras)"
    )
    ap.add_argument(
        "--prepared", type=Path, required=True, help="prepared data folder (its manifest and DVC hash)"
    )
    ap.add_argument(
        "--lock", type=Path, default=Path("dvc.lock"), help="dvc.lock to read the data version from"
    )
    ap.add_argument("--bundle", type=Path, required=True, help="model bundle folder to write")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder to write")
    ap.add_argument("--card", type=Path, required=True, help="model card Markdown to write")
    ap.add_argument(
        "--raw",
        type=Path,
        help="raw data folder (images/<image_id>.jpg): with --split, the bundle gets "
        "the drift reference (features and embeddings of drift.reference.split)",
    )
    ap.add_argument("--split", type=Path, help="validated split CSV (image_id, split)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_params(args.params)
        md5 = data_version(args.lock, args.prepared.as_posix())
        run(
            params.calibrate,
            seed=params.base.seed,
            ensemble_dir=args.ensemble,
            ensemble_metrics_path=args.ensemble_metrics,
            models_dir=args.models,
            prepared_dir=args.prepared,
            bundle_dir=args.bundle,
            metrics_path=args.metrics,
            plots_dir=args.plots,
            card_path=args.card,
            all_params=dataclasses.asdict(params),
            data_md5=md5,
            reference=(
                DriftReference(
                    args.raw,
                    args.split,
                    params.drift.reference,
                    params.drift.max_pixels,
                    params.drift.workers,
                )  # fmt: skip
                if args.raw and args.split
                else None
            ),
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
