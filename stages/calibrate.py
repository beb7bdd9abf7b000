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
   temperature, threshold, classes, image size, the params, the data version it came from and
   ``training_data``: the source and raw data version every face of the bundle names first)
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

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, atomic_file, write_json
from skinlesion.core.schema import CLASSES, MALIGNANT
from skinlesion.core.tables import read_table
from skinlesion.measure.metrics import (
    apply_calibration,
    balanced_accuracy,
    balanced_decision,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_bias,
    malignant_score,
    malignant_truth,
    nll_with_calibration,
    recall_first_threshold,
    reliability_table,
)
from skinlesion.measure.paired import headline
from skinlesion.measure.predictions import (
    Served,
    complete_metadata,
    json_value,
    labels,
    logit_columns,
    prob_columns,
    read_predictions,
    served_report,
    write_predictions,
)
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    MODE_RULE,
    MetaArrays,
    OperatingPoint,
    malignant_flags,
    mode_suffix,
)
from skinlesion.model.bundle import (
    BUNDLE_FORMAT_VERSION,
    BUNDLE_JSON,
    REFERENCE_KEY,
    SEEN_FILE,
    TRAINING_DATA_KEY,
    TrainingData,
    file_md5,
    read_training_data,
    seen_record,
    trained_on,
    write_drift_reference,
)
from skinlesion.params.base import BaseParams
from skinlesion.params.calibrate import CalibrateParams
from skinlesion.params.drift import DriftParams, DriftReferenceParams
from skinlesion.params.evaluate import EvaluateParams
from skinlesion.params.schema import load_sections

log = logging.getLogger(__name__)

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

    def point(self) -> OperatingPoint:
        """What the bundle stores for this mode."""
        return OperatingPoint(self.temperature, self.threshold, self.bias, self.prior)


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
    served: Served,
    params: CalibrateParams,
    eval_params: EvaluateParams,
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The fitted calibration on val, and the served test report (:func:`served_report`).

    Validation numbers come from the fitted calibration; every test number comes from
    ``served``, the bundle's own answers for the test images (:func:`served_predictions`), and
    ``test`` (the ensemble's uncalibrated predictions) gives only the "before" values.
    """
    out: dict[str, Any] = {
        "temperature": cal.temperature,
        "threshold": cal.threshold,
        "target_recall": params.target_recall,
        "val_malignant_recall": cal.val_recall,
        "val_malignant_recall_bound": cal.val_recall_lower,
        "val_specificity": cal.val_specificity,
    }
    y = labels(val, classes)
    logits = val[logit_columns(classes)].to_numpy(dtype=np.float64)
    calibrated = cal.probs(logits)
    out["val_ece_before"] = expected_calibration_error(apply_calibration(logits, 1.0), y, params.ece_bins)
    out["val_ece_after"] = expected_calibration_error(calibrated, y, params.ece_bins)
    out["val_nll_before"] = nll_with_calibration(logits, y, 1.0)
    out["val_nll_after"] = nll_with_calibration(logits, y, cal.temperature, cal.bias)
    # the bundle's class decision on calibrated probabilities (calibrate.decision)
    out["val_balanced_accuracy_decision"] = balanced_accuracy(y, cal.decide(calibrated), len(classes))

    y = labels(test, classes)
    before = test[logit_columns(classes)].to_numpy(dtype=np.float64)
    out["ece_before"] = expected_calibration_error(apply_calibration(before, 1.0), y, params.ece_bins)
    out["nll_before"] = nll_with_calibration(before, y, 1.0)
    served_m, table = served_report(test, served, eval_params, rng, ece_bins=params.ece_bins, classes=classes)
    out.update(served_m)
    return out, table


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
    per_mode: dict[str, dict[str, Any]],
    subgroups: pd.DataFrame,
    split_counts: dict[str, dict[str, int]],
) -> str:
    """The model card as Markdown (pure: everything it shows is passed in).

    Every test number is the bundle's own answer for the test images (``per_mode``: the served
    metrics of each input mode), never the ensemble's uncalibrated predictions.
    """
    members = ", ".join(f"{m['name']} (weight {m['weight']:.3f})" for m in bundle["members"])
    level = int(round(100 * bundle["params"]["evaluate"]["ci_level"]))
    modes = list(per_mode)
    points = bundle["operating_points"]
    # The first line says what the bundle was trained on: a demo bundle is never taken for a real one.
    data = read_training_data(bundle)
    synthetic = bool(data and data.synthetic)

    def with_ci(key: str, src: dict[str, Any]) -> str:
        lo, hi = src.get(f"{key}_ci_low"), src.get(f"{key}_ci_high")
        ci = f" ({_fmt(lo)} to {_fmt(hi)})" if lo is not None and hi is not None else ""
        return f"{_fmt(src.get(key))}{ci}"

    mode_names = {METADATA: "with age, sex and site", IMAGE_ONLY: "image only"}
    lines = [
        f"# Model card: skin-lesion ensemble {trained_on(bundle)}",
        "",
        DISCLAIMER,
        "",
    ]
    if synthetic:
        lines += [
            "> **Trained on synthetic images drawn by the project's demo generator, not on real "
            "lesions.** It exists to exercise the pipeline; its predictions on real dermoscopy "
            "images mean nothing.",
            "",
        ]
    lines += [
        f"Generated {bundle['created']} by the `calibrate` stage. Data version (DVC hash of "
        f"`{bundle['data_version']['path']}`): `{bundle['data_version']['md5'] or 'unknown'}`"
        + (
            f"; raw data (source `{data.source}`, its DVC hash): `{data.data_version}`."
            if data is not None and data.data_version
            else "."
        ),
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
        "- Input modes: "
        + (
            "**with metadata** (age, sex and anatomical site all known) and **image only** (anything "
            "else: the image alone, every field treated as unknown). The members were trained with "
            "metadata dropout so an image without metadata is in distribution; each mode has its own "
            "calibration and malignant threshold, fitted on validation images scored that way, and a "
            "prediction says which mode it used."
            if len(modes) > 1
            else "**image only** (the members do not use metadata)."
        ),
        "",
        "| mode | temperature | class bias | decision | malignant threshold |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in modes:
        pt = points[mode]
        bias = ", ".join(f"{c} {v:+.2f}" for c, v in zip(bundle["classes"], pt["class_bias"], strict=True)) \
            if pt.get("class_bias") else "none"  # fmt: skip
        lines.append(
            f"| {mode_names[mode]} | {pt['temperature']:.3f} | {bias} | {pt['decision']} "
            f"| {pt['threshold']:.4f} |"
        )
    lines += [
        "",
        "Calibration works on the log of the averaged probabilities (temperature, then the class bias), "
        "fitted on validation NLL. Predicted class: "
        + (
            "the highest calibrated probability divided by the class's validation share (balanced: "
            "every class weighs alike, so it can differ from the most probable class)."
            if points[modes[0]].get("decision") == "balanced"
            else "the highest calibrated probability."
        )
        + f" Malignant flag: P(mel) + P(bcc) + P(akiec) >= the mode's threshold, chosen on validation as "
        f"the highest threshold with malignant recall >= {bundle['target_recall']:.2f} "
        f"({bundle['recall_bound']} bound).",
        "",
        "## Data and split protocol",
        "",
        (
            "- Synthetic images drawn by the project's demo generator in HAM10000's layout (7 diagnoses, "
            "several images per lesion, age, sex and site): not dermoscopy, not patients."
            if synthetic
            else "- HAM10000 (Tschandl et al., 2018): dermoscopic images of pigmented lesions from Vienna "
            "and Queensland, 7 diagnoses, several images per lesion"
            + (f" (source `{data.source}`)." if data is not None else ".")
        ),
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
    header = " | ".join(mode_names[m] for m in modes)
    lines += [
        "",
        f"## Test metrics, as served ({level}% CIs from a lesion-level bootstrap)",
        "",
        "The bundle itself scored the test images, exactly as `serve.predict` does"
        + (
            " (with metadata: each image with its own age, sex and site, by the mode rule)."
            if len(modes) > 1
            else "."
        ),
        "",
        f"| metric | {header} |",
        "| --- | " + " | ".join("---" for _ in modes) + " |",
    ]
    rows = (
        ("balanced accuracy of the bundle's decision", "balanced_accuracy_decision"),
        ("mel recall of the bundle's decision", "mel_recall_decision"),
        ("macro AUC", "macro_auc"),
        ("macro AUC per lesion", "lesion_macro_auc"),
        ("malignant AUC", "malignant_auc"),
        ("malignant pAUC (TPR >= 0.8)", "malignant_pauc_tpr80"),
        ("malignant recall at the threshold", "test_malignant_recall"),
        ("specificity at the threshold", "test_specificity"),
        ("PPV at the threshold", "test_ppv"),
        ("referrals per 100 lesions", "referrals_per_100"),
        ("malignant recall per lesion", "lesion_test_malignant_recall"),
        ("ECE after calibration", "ece_after"),
        ("accuracy of the arg-max", "accuracy"),
        ("balanced accuracy of the arg-max", "balanced_accuracy"),
        ("macro F1 of the arg-max", "macro_f1"),
    )
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(with_ci(key, per_mode[m]) for m in modes) + " |")
    first = per_mode[modes[0]]
    lines += [
        "",
        f"Malignant recall and specificity are at the mode's fixed threshold "
        f"({int(first.get('test_n_malignant') or 0)} malignant test images); ECE (15-bin, top-label) "
        f"{_fmt(first.get('ece_before'))} before calibration.",
        f"Best single member ({ens_metrics.get('best_member')}), uncalibrated, macro AUC "
        f"{_fmt(ens_metrics.get('best_member_macro_auc'))}.",
        "",
        f"| class ({mode_names[modes[0]]}) | precision of the decision | recall of the decision | AUC |",
        "| --- | --- | --- | --- |",
    ]
    for c in CLASSES:
        lines.append(
            f"| {c} | {_fmt(first.get(f'precision_{c}_decision'))} "
            f"| {_fmt(first.get(f'recall_{c}_decision'))} | {with_ci(f'auc_{c}', first)} |"
        )
    lines += [
        "",
        f"## Subgroups (test, {mode_names[modes[0]]}, malignant flag at the threshold)",
        "",
        "| attribute | group | images | lesions | malignant | malignant recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in subgroups.itertuples(index=False):
        lines.append(
            f"| {r.attribute} | {r.group} | {r.n_images} | {r.n_lesions} | {r.n_malignant} "
            f"| {_fmt(r.malignant_recall)} |"
        )
    cal_metrics = first
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
    if synthetic:
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
    """Where the drift reference stored in the bundle comes from (see skinlesion.model.bundle)."""

    raw_dir: Path  # data/raw: images/<image_id>.jpg
    split_csv: Path  # the validated split
    params: DriftReferenceParams
    max_pixels: int
    workers: int = 0


def served_predictions(bundle: Any, arrays: Any, mode: str) -> Served:
    """The bundle's answers for a prepared split, in ``mode``: exactly what ``serve`` computes
    for those image files (with their metadata in the ``metadata`` mode)."""
    meta = MetaArrays(arrays.age, arrays.sex, arrays.localization) if mode == METADATA else None
    out = bundle.score(arrays.images, meta)
    score, thr = malignant_flags(out.probs, out.modes, bundle.points, bundle.classes)
    return Served(out.probs, out.modes, score, thr, bundle.decide(out.probs, out.modes))


def fit_modes(
    frames: dict[tuple[str, str], pd.DataFrame],
    modes: Sequence[str],
    params: CalibrateParams,
    rng: np.random.Generator,
    classes: Sequence[str],
) -> dict[str, Calibration]:
    """One calibration per input mode, each fitted on the validation rows served in that mode."""
    fits: dict[str, Calibration] = {}
    for mode in modes:
        val = frames["val", mode]
        if mode == METADATA:
            # Only rows with all three fields known are ever served with this operating point.
            val = val[complete_metadata(val)]
            if val.empty:
                raise StageError(
                    "calibrate: no validation image has age, sex and localization all known: the "
                    "metadata operating point cannot be fitted (train without fusion, or fix the metadata)"
                )
        log.info("%s: fitting on %d validation images", mode, len(val))
        fits[mode] = fit_calibration(
            val[logit_columns(classes)].to_numpy(dtype=np.float64),
            labels(val, classes),
            val["lesion_id"].to_numpy(),
            params,
            rng,
            classes,
        )
        c = fits[mode]
        log.info(
            "%s: temperature %.4f, threshold %.4f (val recall %.3f, bound %.3f, specificity %.3f)",
            mode, c.temperature, c.threshold, c.val_recall, c.val_recall_lower, c.val_specificity,
        )  # fmt: skip
    return fits


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
    served_dir: Path | None = None,
    reference: DriftReference | None = None,
    split_csv: Path | None = None,
    headline_path: Path | None = None,
    raw_md5: str | None = None,
    classes: Sequence[str] = CLASSES,
) -> CalibrateResult:
    """``split_csv``: the validated split, recorded in the bundle as what it has seen (train and
    val lesions: :data:`skinlesion.model.bundle.SEEN_FILE`); ``headline_path``: the few metrics runs are
    compared by (:func:`skinlesion.measure.paired.headline`); ``raw_md5``: the DVC md5 of the raw data, the
    version in the bundle's ``training_data`` (what it says it was trained on)."""
    ensemble_dir = Path(ensemble_dir)
    weights_path = ensemble_dir / "weights.json"
    try:
        weights = json.loads(weights_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{weights_path}: not found; run the ensemble stage first") from None
    modes = tuple(weights.get("modes") or (IMAGE_ONLY,))
    frames = {
        (split, mode): read_predictions(
            ensemble_dir / f"{split}{mode_suffix(mode, modes)}.csv", classes, producer="ensemble"
        )
        for split in ("val", "test")
        for mode in modes
    }
    try:
        ens_metrics = json.loads(Path(ensemble_metrics_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{ensemble_metrics_path}: not found; run the ensemble stage first") from None

    from skinlesion.model.tfdata import load_manifest  # no TensorFlow: the manifest is plain JSON

    manifest = load_manifest(prepared_dir)
    if data_md5 is None:
        log.warning(
            "no DVC hash recorded for %s in dvc.lock: the bundle's data version is unknown", prepared_dir
        )

    seen = None
    if split_csv is not None:
        seen = seen_record(
            read_table(split_csv, required=("image_id", "lesion_id", "split"), unique="image_id",
                       hint="run the split and validate stages first")
        )  # fmt: skip

    rng = np.random.default_rng(seed)
    fits = fit_modes(frames, modes, params, rng, classes)

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
        "operating_points": {mode: fits[mode].point().to_json() for mode in modes},
        "mode_rule": MODE_RULE if len(modes) > 1 else "image_only: the members do not use metadata",
        "target_recall": params.target_recall,
        "recall_bound": params.recall_bound,
        "recipe": (
            "mode = metadata if the bundle has it and age, sex and localization are all known, else "
            "image_only (every field unknown); p = sum_m weight_m * model_m(image, metadata of the mode); "
            "calibrated = softmax(log(p) / temperature + class_bias) with the mode's operating point; "
            "predicted class = argmax calibrated / class_prior (decision balanced) or argmax calibrated; "
            "malignant flag = calibrated[mel] + calibrated[bcc] + calibrated[akiec] >= the mode's threshold"
        ),
        "data_version": {"path": Path(prepared_dir).as_posix(), "md5": data_md5},
        # what every face of the bundle names first (skinlesion.model.bundle.TrainingData): the source from
        # the download params, the version of the raw data (raw_md5: data/raw in dvc.lock)
        TRAINING_DATA_KEY: TrainingData.of_params(all_params.get("download") or {}, raw_md5).to_json(),
        "params": all_params,
    }

    split_counts = {
        split: {c: int(n) for c, n in manifest["splits"][split].get("class_counts", {}).items()}
        for split in ("train", "val", "test")
        if split in manifest.get("splits", {})
    }
    eval_p = all_params.get("evaluate", {})
    report_params = EvaluateParams(
        bootstrap_samples=int(eval_p.get("bootstrap_samples", params.bootstrap_samples)),
        ci_level=float(eval_p.get("ci_level", params.ci_level)),
        age_bands=tuple(eval_p.get("age_bands", (30, 45, 60, 75))),
        subgroup_min_malignant=int(eval_p.get("subgroup_min_malignant", 5)),
    )
    metrics: dict[str, Any] = {}
    per_mode: dict[str, dict[str, Any]] = {}
    subgroups = None
    served_frames: dict[str, pd.DataFrame] = {}
    with atomic_dir(bundle_dir) as tmp:
        for m in members:
            dest = tmp / m["path"]
            dest.parent.mkdir(parents=True)
            shutil.copy2(m["src"], dest)
            bundle["members"].append(
                {"name": m["name"], "weight": m["weight"], "path": m["path"], "md5": file_md5(dest)}
            )
        write_json(tmp / BUNDLE_JSON, bundle)
        if seen is not None:
            write_json(tmp / SEEN_FILE, seen)

        # The reported test numbers: the bundle just written, scoring the test images the way
        # serve.predict does (one scoring path; tests/integration/test_parity.py holds them equal).
        from skinlesion.model.bundle import Bundle
        from skinlesion.model.tfdata import read_split_numpy

        loaded = Bundle.load(tmp)
        arrays = read_split_numpy(prepared_dir, "test")
        test_meta = frames["test", modes[0]]
        if test_meta["image_id"].tolist() != arrays.image_ids.tolist():
            raise StageError(
                f"{ensemble_dir}: test rows are not in the prepared order; rerun the ensemble stage"
            )
        for mode in modes:
            sfx = mode_suffix(mode, modes)
            served = served_predictions(loaded, arrays, mode)
            served_frames[mode] = served.frame(test_meta, classes)
            m, table = calibration_metrics(
                fits[mode],
                frames["val", mode],
                frames["test", mode],
                served,
                params,
                report_params,
                rng,
                classes,
            )
            subgroups = table if subgroups is None else subgroups
            per_mode[mode] = {k: json_value(v) for k, v in m.items()}
            metrics.update({f"{k}{sfx}": v for k, v in per_mode[mode].items()})
            log.info(
                "test, served %s: malignant recall %s, specificity %s, %s referrals/100 lesions; "
                "macro AUC %s; ECE %s -> %s",
                mode, *(_fmt(m.get(k)) for k in ("test_malignant_recall", "test_specificity",
                "referrals_per_100", "macro_auc", "ece_before", "ece_after")),
            )  # fmt: skip
        assert subgroups is not None
        bundle["metrics"] = metrics
        card = model_card(
            bundle=bundle,
            ens_metrics=ens_metrics,
            per_mode=per_mode,
            subgroups=subgroups,
            split_counts=split_counts,
        )
        write_json(tmp / BUNDLE_JSON, bundle)
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
                bundle=loaded,  # the members just scored, not loaded a second time
            )
            write_json(tmp / BUNDLE_JSON, bundle)
    with atomic_file(card_path, "w", encoding="utf-8") as fh:
        fh.write(card)
    if served_dir is not None:
        with atomic_dir(served_dir) as tmp:
            for mode, df in served_frames.items():
                write_predictions(df, tmp / f"test{mode_suffix(mode, modes)}.csv")

    first = modes[0]
    test_first = frames["test", first]
    with atomic_dir(plots_dir) as tmp:
        y_test = labels(test_first, classes)
        before = reliability_table(
            apply_calibration(test_first[logit_columns(classes)].to_numpy(dtype=np.float64), 1.0),
            y_test, params.ece_bins,
        )  # fmt: skip
        after = reliability_table(
            served_frames[first][prob_columns(classes)].to_numpy(), y_test, params.ece_bins
        )
        (tmp / "reliability").mkdir()
        for name, t in (("before", before), ("after", after)):
            pd.DataFrame(t).round(6).to_csv(
                tmp / "reliability" / f"{name}.csv", index=False, lineterminator="\n"
            )
        reliability_plot(
            tmp / "reliability.png", before, after, (metrics["ece_before"], metrics["ece_after"])
        )
        subgroups.to_csv(tmp / "subgroups.csv", index=False, float_format="%.4f", lineterminator="\n")
    write_json(metrics_path, metrics)
    if headline_path is not None:
        write_json(headline_path, headline(metrics, [mode_suffix(m, modes) for m in modes]))
    return CalibrateResult(fits[first].temperature, fits[first].threshold, metrics)


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
        "--served", type=Path,
        help="folder to write the bundle's own test predictions to (test.csv, and test_image_only.csv "
        "with fusion): what serve.predict answers for those images",
    )  # fmt: skip
    ap.add_argument(
        "--raw",
        type=Path,
        help="raw data folder (images/<image_id>.jpg): with --split, the bundle gets "
        "the drift reference (features and embeddings of drift.reference.split)",
    )
    ap.add_argument(
        "--split", type=Path,
        help="validated split CSV (image_id, lesion_id, split): recorded in the bundle as the lesions it has "
        "seen (seen.json) and, with --raw, the drift reference's rows",
    )  # fmt: skip
    ap.add_argument(
        "--headline", type=Path,
        help="metrics JSON to write with only the headline metrics (at most 7 per input mode), the file "
        "runs are compared by (make compare, dvc metrics diff --targets)",
    )  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, base=BaseParams, calibrate=CalibrateParams, drift=DriftParams)
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
            served_dir=args.served,
            split_csv=args.split,
            headline_path=args.headline,
            all_params=dataclasses.asdict(params),
            data_md5=md5,
            raw_md5=data_version(args.lock, args.raw.as_posix()) if args.raw else None,
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
