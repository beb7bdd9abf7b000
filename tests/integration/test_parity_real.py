"""What is reported is what is served, on real images with metadata fusion (issue 19).

A small real-data bundle whose member fuses age, sex and site is built by the stages' own
commands; ``serve.predict`` on the test split's JPEG files, with and without their metadata,
must give back the calibrate stage's reported test probabilities, modes, thresholds and
referrals. Changing either side alone (the serving path or the evaluation path) fails it.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.integration.parity import check_parity
from tests.integration.real_bundle import build

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def fusion_bundle(shared_ham, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-real")
    bundle, _held = build(shared_ham, root, n_images=700, seed=3, fusion=True, epochs=1)
    return root, bundle


def test_serve_predict_gives_back_the_reported_test_probabilities_in_both_modes(fusion_bundle, tmp_path):
    root, bundle = fusion_bundle
    meta = json.loads((bundle / "bundle.json").read_text())
    assert set(meta["operating_points"]) == {"metadata", "image_only"}
    diffs = check_parity(root / "served", root / "raw" / "images", bundle, tmp_path)
    assert set(diffs) == {"test.csv", "test_image_only.csv"}
    served = pd.read_csv(root / "served" / "test.csv", keep_default_na=False)
    # HAM10000 rows with all three fields known are scored with metadata, the rest image-only
    assert (served["mode"] == "metadata").mean() > 0.9


def test_reported_metrics_are_computed_from_the_served_predictions(fusion_bundle):
    """calibration.json's test recall is the served files' recall, mode by mode."""
    root, _bundle = fusion_bundle
    cal = json.loads((root / "calibration.json").read_text())
    for name, suffix in (("test.csv", ""), ("test_image_only.csv", "_image_only")):
        served = pd.read_csv(root / "served" / name, keep_default_na=False)
        malignant = served["dx"].isin(["mel", "bcc", "akiec"])
        refer = served["refer"].astype(str) == "True"
        recall = (refer & malignant).sum() / malignant.sum()
        assert cal[f"test_malignant_recall{suffix}"] == pytest.approx(recall, abs=1e-6)
