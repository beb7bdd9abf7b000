"""The model card (skinlesion.measure.card) renders the same Markdown, byte for byte, as the
``model_card`` function it replaced (stages/calibrate.py before issue 23), for fixed inputs.

The expected files in ``tests/unit/measure/fixtures/model_card/`` were written by that old function
from the inputs below (one file per case); a change to the card's text changes them on purpose.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from skinlesion.core.schema import CLASSES
from skinlesion.measure.card import model_card
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA
from skinlesion.model.bundle_json import read_training_data, trained_on

EXPECTED = Path(__file__).resolve().parent / "fixtures" / "model_card"
CASES = ("synthetic_one_mode", "real_two_modes", "old_bundle_params_only", "no_training_record")


def _served(shift: float, *, ci: bool = True) -> dict[str, Any]:
    """A served-metrics dict with every key the card reads (some without CI, one NaN, one None)."""
    keys = ("balanced_accuracy_decision", "mel_recall_decision", "macro_auc", "lesion_macro_auc",
            "malignant_auc", "malignant_pauc_tpr80", "test_malignant_recall", "test_specificity",
            "test_ppv", "referrals_per_100", "lesion_test_malignant_recall", "ece_after", "accuracy",
            "balanced_accuracy", "macro_f1")  # fmt: skip
    out: dict[str, Any] = {}
    for k, key in enumerate(keys):
        v = round(0.5 + shift + 0.0311 * k, 6)
        out[key] = v
        if ci and k % 3 != 2:  # every third metric has no CI
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = round(v - 0.04, 6), round(v + 0.0351, 6)
    out["referrals_per_100"] = 41.23456
    out["lesion_macro_auc"] = math.nan  # shown as n/a
    out["malignant_pauc_tpr80"] = None
    for j, c in enumerate(CLASSES):
        out[f"precision_{c}_decision"] = round(0.6 + 0.05 * j - shift, 6)
        out[f"recall_{c}_decision"] = None if c == "df" else round(0.7 - 0.04 * j, 6)
        out[f"auc_{c}"] = round(0.8 + 0.02 * j, 6)
        out[f"auc_{c}_ci_low"], out[f"auc_{c}_ci_high"] = round(0.75 + 0.02 * j, 6), round(0.85 + 0.02 * j, 6)
    out["auc_vasc_ci_low"] = None  # half a CI: none shown
    out.update(test_n_malignant=37.0, ece_before=0.08765, worst_subgroup="localization=back",
               worst_subgroup_malignant_recall=0.8125, worst_subgroup_n_malignant=16)  # fmt: skip
    return out


def _point(t: float, thr: float, *, bias: bool, decision: str) -> dict[str, Any]:
    return {
        "temperature": t,
        "threshold": thr,
        "class_bias": [round(0.37 * (k - 3) + 0.004, 6) for k in range(len(CLASSES))] if bias else None,
        "class_prior": [round(1 / len(CLASSES), 6)] * len(CLASSES) if decision == "balanced" else None,
        "decision": decision,
    }


def _subgroups() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "attribute": ["age_band", "localization", "localization", "sex"],
            "group": ["<30", "back", "face", "female"],
            "n_images": [40, 55, 12, 101],
            "n_lesions": [31, 44, 10, 80],
            "n_malignant": [3, 16, 0, 40],
            "malignant_recall": [1.0, 0.8125, float("nan"), 0.9],
        }
    )


def _inputs(case: str) -> dict[str, Any]:
    """The card's inputs for one case (what calibrate passes it)."""
    bundle: dict[str, Any] = {
        "created": "2026-11-30T12:34:56Z",
        "classes": list(CLASSES),
        "image_size": 96,
        "members": [{"name": "mobilenetv2", "weight": 0.6172}, {"name": "custom_cnn", "weight": 0.3828}],
        "operating_points": {IMAGE_ONLY: _point(1.61072, 0.485712, bias=True, decision="balanced")},
        "target_recall": 0.95,
        "recall_bound": "point",
        "data_version": {"path": "data/prepared", "md5": None},
        "training_data": {
            "source": "synthetic",
            "synthetic": True,
            "data_version": None,
            "extra_sources": [],
        },  # fmt: skip
        "params": {
            "evaluate": {"ci_level": 0.95, "subgroup_min_malignant": 5},
            "ensemble": {"weights": "equal"},
            "download": {"source": "synthetic"},
        },
    }
    per_mode = {IMAGE_ONLY: _served(0.0)}
    ens = {"best_member": "mobilenetv2", "best_member_macro_auc": 0.91234}
    split_counts = {
        "train": {c: 10 + k for k, c in enumerate(CLASSES)},
        "val": {c: 3 for c in CLASSES if c != "df"},  # a class absent from a split: 0
        "test": {c: 4 + 2 * k for k, c in enumerate(CLASSES)},
    }
    if case == "real_two_modes":
        bundle["operating_points"] = {
            METADATA: _point(0.80876, 0.333021, bias=True, decision="argmax"),
            IMAGE_ONLY: _point(1.08494, 0.315343, bias=False, decision="argmax"),
        }
        bundle.update(recall_bound="lower_ci", target_recall=0.9)
        bundle["data_version"]["md5"] = "0123456789abcdef0123456789abcdef.dir"
        bundle["training_data"] = {
            "source": "local:../shared/data/ham10000", "synthetic": False,
            "data_version": "d70be3bfadb2483d56766cffbe49fd5d.dir", "extra_sources": ["../inbox/clinic_b"],
        }  # fmt: skip
        bundle["params"]["ensemble"]["weights"] = "fitted"
        bundle["params"]["evaluate"] = {"ci_level": 0.9, "subgroup_min_malignant": 8}
        per_mode = {METADATA: _served(0.05), IMAGE_ONLY: _served(-0.02, ci=False)}
        per_mode[METADATA]["worst_subgroup"] = "none"
        ens["best_member_macro_auc"] = math.nan
    elif case == "old_bundle_params_only":  # older than its training_data record: the params say
        del bundle["training_data"]
        bundle["params"]["download"] = {"source": "dataverse"}
        bundle["data_version"]["md5"] = "feedfacefeedfacefeedfacefeedface.dir"
    elif case == "no_training_record":  # neither says: the card says unknown
        del bundle["training_data"]
        del bundle["params"]["download"]
        ens = {}
    return {
        "bundle": bundle,
        "ens_metrics": ens,
        "per_mode": per_mode,
        "subgroups": _subgroups(),
        "split_counts": split_counts,
    }


@pytest.mark.parametrize("case", CASES)
def test_the_card_renders_the_old_functions_markdown_byte_for_byte(case):
    inputs = _inputs(case)
    before = copy.deepcopy({k: v for k, v in inputs.items() if k != "subgroups"})
    bundle = inputs["bundle"]
    card = model_card(**inputs, training=read_training_data(bundle), trained_on=trained_on(bundle))
    expected = (EXPECTED / f"{case}.md").read_bytes().decode("utf-8")
    assert card == expected
    assert {k: v for k, v in inputs.items() if k != "subgroups"} == before  # the inputs are not changed


def test_the_cases_cover_each_branch_of_the_card():
    cards = {c: (EXPECTED / f"{c}.md").read_text(encoding="utf-8") for c in CASES}
    assert "Trained on synthetic images" in cards["synthetic_one_mode"]
    assert "raw data (source `local:../shared/data/ham10000`" in cards["real_two_modes"]
    assert "(source `dataverse`)." in cards["old_bundle_params_only"]
    assert "training data: unknown" in cards["no_training_record"].splitlines()[0]
    assert "none qualifies." in cards["real_two_modes"] and "n/a" in cards["synthetic_one_mode"]
