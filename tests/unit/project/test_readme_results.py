"""What the README and docs/results.md report is what the recorded run measured.

Both show the served bundle's test metrics (``results/real-cpu.json``, the calibrate stage's
``metrics/calibration.json``) and its external validation (``results/real-cpu.external.json``,
written by ``serve.evaluate``): the README a five-row table, docs/results.md the full one. Every
number in those tables must be those files' value at the precision shown; a re-run that changes
them, or an edit of a document alone, fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
HEADER = "| served bundle, 95% lesion-bootstrap CIs |"

# Row label -> metric key; each row's 4 value columns: test (metadata, image only), then the
# external hold-out (metadata, image only).
ROWS = {
    "macro AUC": "macro_auc",
    "macro AUC per lesion": "lesion_macro_auc",
    "balanced accuracy of the bundle's decision": "balanced_accuracy_decision",
    "malignant threshold (chosen on val, recall >= 0.95)": "threshold",
    "malignant recall per image": "test_malignant_recall",
    "malignant recall per lesion": "lesion_test_malignant_recall",
    "specificity": "test_specificity",
    "referrals per 100 lesions": "referrals_per_100",
    "ECE after calibration (before)": "ece_after",
}
# The README's short table: these five rows, nothing else.
README_ROWS = [
    "macro AUC",
    "balanced accuracy of the bundle's decision",
    "malignant recall per image",
    "specificity",
    "referrals per 100 lesions",
]
DOCS = {"README.md": README_ROWS, "docs/results.md": list(ROWS)}


def _table(doc: str) -> dict[str, list[str]]:
    text = (REPO / doc).read_text(encoding="utf-8")
    assert text.count(HEADER) == 1, f"{doc}: expected one results table starting {HEADER!r}"
    start = text.index(HEADER)
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:5]
    return rows


def _sources() -> list[dict]:
    record = json.loads((REPO / "results" / "real-cpu.json").read_text(encoding="utf-8"))
    cal = record["metrics"]["metrics/calibration.json"]
    ext = json.loads((REPO / "results" / "real-cpu.external.json").read_text(encoding="utf-8"))["modes"]
    image_only = {k.removesuffix("_image_only"): v for k, v in cal.items() if k.endswith("_image_only")}
    return [cal, image_only, ext["metadata"], ext["image_only"]]


def _check(cell: str, values: dict, key: str, where: str) -> None:
    numbers = NUMBER.findall(cell.replace("**", ""))
    assert numbers, f"{where}: no number in {cell!r}"
    shown = numbers[0]
    digits = len(shown.split(".")[1]) if "." in shown else 0
    assert float(shown) == round(values[key], digits), f"{where}: shows {shown}, recorded {values[key]}"
    ci = re.search(r"\[(-?[\d.]+), (-?[\d.]+)\]", cell)
    if ci:
        for end, text in zip(("_ci_low", "_ci_high"), ci.groups(), strict=True):
            d = len(text.split(".")[1])
            assert float(text) == round(values[key + end], d), f"{where}{end}: shows {text}"


@pytest.mark.parametrize(("doc", "label"), [(doc, label) for doc, labels in DOCS.items() for label in labels])
def test_every_number_of_the_results_tables_is_the_recorded_one(doc, label):
    table, sources = _table(doc), _sources()
    assert label in table, f"{doc}: the results table lost its row {label!r}"
    for column, (cell, values) in enumerate(zip(table[label], sources, strict=True)):
        if cell == "same":
            continue
        _check(cell, values, ROWS[label], f"{doc}: {label} column {column + 1}")


def test_the_readme_table_has_the_five_rows_and_no_other():
    assert list(_table("README.md")) == README_ROWS


def test_the_table_counts_are_the_recorded_ones():
    cells, sources = _table("docs/results.md")["images / lesions / malignant images"], _sources()
    for cell, values in ((cells[0], sources[0]), (cells[2], sources[2])):
        n, lesions, malignant = (int(x.replace(",", "")) for x in re.findall(r"[\d,]+", cell))
        assert (n, lesions, malignant) == (
            int(values["n_images"]),
            int(values["n_lesions"]),
            int(values["test_n_malignant"]),
        )


def test_the_readme_counts_of_the_hold_out_are_the_recorded_ones():
    """The README's sentence about the hold-out (748 images of 550 lesions) is the record's."""
    flat = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    ext = _sources()[2]
    assert f"{int(ext['n_images'])} images of {int(ext['n_lesions'])} lesions" in flat
