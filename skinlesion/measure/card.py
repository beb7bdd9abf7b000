"""The model card: the Markdown ``calibrate`` writes into the bundle and to ``<card>``.

Its text is the Jinja2 template ``templates/model_card.md.j2``; :func:`model_card` renders it from
what it is passed (pure: no file but the template is read). Every test number it shows is the
bundle's own answer for the test images (``per_mode``: the served metrics of each input mode),
never the ensemble's uncalibrated predictions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2
import numpy as np
import pandas as pd

from skinlesion.core.schema import CLASSES
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA

TEMPLATES = Path(__file__).resolve().parent / "templates"
CARD_TEMPLATE = "model_card.md.j2"
DISCLAIMER = (
    "**Medical disclaimer.** This model is research software. It is not a medical device, has not "
    "been cleared or approved by any regulator, and must not be used to diagnose, treat or rule out "
    "skin cancer or any other condition. Its output is a decision-support signal for trained "
    "clinicians reviewing dermoscopic images; a low score never replaces examination, biopsy or "
    "the judgement of a dermatologist. Anyone worried about a skin lesion should see a doctor."
)
MODE_NAMES = {METADATA: "with age, sex and site", IMAGE_ONLY: "image only"}
# The rows of the test-metrics table: (label, served metric key).
TEST_METRICS = (
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


class TrainingFacts(Protocol):
    """What the card says about the training data (``skinlesion.model.bundle_json.TrainingData``)."""

    source: str
    synthetic: bool
    data_version: str | None


def fmt(v: Any, digits: int = 3) -> str:
    """A metric as the card and the stage's log show it: ``digits`` decimals, "n/a" for none or NaN."""
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def with_ci(key: str, metrics: dict[str, Any]) -> str:
    """``metrics[key]`` and, when both ends are there, its CI: ``0.812 (0.790 to 0.835)``."""
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" ({fmt(lo)} to {fmt(hi)})" if lo is not None and hi is not None else ""
    return f"{fmt(metrics.get(key))}{ci}"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["f"] = format  # {{ x|f(".3f") }} is f"{x:.3f}"
    env.filters["fmt"] = fmt
    return env.get_template(CARD_TEMPLATE)


def model_card(
    *,
    bundle: dict[str, Any],
    ens_metrics: dict[str, Any],
    per_mode: dict[str, dict[str, Any]],
    subgroups: pd.DataFrame,
    split_counts: dict[str, dict[str, int]],
    training: TrainingFacts | None,
    trained_on: str,
    classes: Sequence[str] = CLASSES,
) -> str:
    """The model card as Markdown.

    ``bundle``: the bundle's ``bundle.json`` content; ``ens_metrics``: the ensemble stage's metrics
    (its best member); ``per_mode``: each input mode's served test metrics, the bundle's main mode
    first; ``subgroups``: the main mode's subgroup table; ``split_counts``: images per class of each
    split; ``training`` and ``trained_on``: what the bundle was trained on
    (``skinlesion.model.bundle_json.read_training_data`` and ``trained_on``: the card's first line,
    so a demo bundle is never taken for a real one).
    """
    modes = list(per_mode)
    first = per_mode[modes[0]]

    def class_bias(point: dict[str, Any]) -> str:
        if not point.get("class_bias"):
            return "none"
        return ", ".join(f"{c} {v:+.2f}" for c, v in zip(bundle["classes"], point["class_bias"], strict=True))

    return _template().render(
        bundle=bundle,
        trained_on=trained_on,
        training=training,
        synthetic=bool(training and training.synthetic),
        disclaimer=DISCLAIMER,
        modes=modes,
        mode_names=MODE_NAMES,
        class_bias=class_bias,
        classes=list(classes),
        split_counts=split_counts,
        level=int(round(100 * bundle["params"]["evaluate"]["ci_level"])),
        test_metrics=TEST_METRICS,
        per_mode=per_mode,
        with_ci=with_ci,
        first=first,
        n_malignant=int(first.get("test_n_malignant") or 0),
        ens_metrics=ens_metrics,
        subgroups=list(subgroups.itertuples(index=False)),
        worst=first.get("worst_subgroup", "none"),
    )
