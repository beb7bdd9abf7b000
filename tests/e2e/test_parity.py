"""What is reported is what is served, on the demo pipeline run by ``dvc repro`` (issue 19).

``serve.predict`` on the test split's own JPEG files (data/raw/images) must give back the
probabilities, modes, thresholds and referrals the calibrate stage reported in data/served.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.parity import check_parity

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_serve_predict_on_the_demo_test_images_gives_back_the_calibrate_stage_probabilities(
    tiny_built, tmp_path
):
    bundle = tiny_built / "models" / "ensemble"
    meta = json.loads((bundle / "bundle.json").read_text())
    # the demo's members do not fuse metadata: one operating point, image-only
    assert list(meta["operating_points"]) == ["image_only"]
    diffs = check_parity(
        tiny_built / "data" / "served", tiny_built / "data" / "raw" / "images", bundle, tmp_path
    )
    assert list(diffs) == ["test.csv"]
