"""The parity check: ``serve.predict`` on the test split's own image files gives back the
probabilities the calibrate stage reported (its ``--served`` files), in every input mode.

Used by the demo-pipeline test (tests/e2e/test_parity.py) and the real-data fusion test
(tests/integration/test_parity_real.py). The prediction runs as a user runs it: the CLI in a
subprocess, on a CSV naming the JPEG files (and their age, sex and site for the metadata mode).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.core.schema import CLASSES

TOLERANCE = 1e-6  # the served files keep 9 significant digits; measured differences ~5e-10
PROBS = [f"prob_{c}" for c in CLASSES]


def predict_cli(inputs: pd.DataFrame, bundle: Path, work: Path, name: str) -> pd.DataFrame:
    """Run ``python -m serve.predict`` on a CSV of ``inputs``; return its ``--out`` rows."""
    csv_in, csv_out = work / f"{name}-input.csv", work / f"{name}-predictions.csv"
    inputs.to_csv(csv_in, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "serve.predict", str(csv_in), "--bundle", str(bundle), "--out", str(csv_out),
         "--no-progress"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_csv(csv_out, keep_default_na=False)


def check_parity(served_dir: Path, images_dir: Path, bundle: Path, work: Path) -> dict[str, float]:
    """Assert serve.predict == the calibrate stage's served test predictions, per mode.

    Returns the max absolute probability difference per served file."""
    files = sorted(served_dir.glob("test*.csv"))
    assert files, f"{served_dir}: no served test predictions (the calibrate stage's --served)"
    out = {}
    for f in files:
        served = pd.read_csv(f, dtype={"image_id": str, "age": str, "sex": str, "localization": str},
                             keep_default_na=False)  # fmt: skip
        image_only = f.stem.endswith("_image_only")
        inputs = pd.DataFrame({"path": [str(images_dir / f"{i}.jpg") for i in served["image_id"]]})
        if not image_only:
            for col in ("age", "sex", "localization"):
                inputs[col] = served[col]
        got = predict_cli(inputs, bundle, work, f.stem)
        assert (got["status"] == "ok").all(), got.loc[got["status"] != "ok", ["image", "error"]].head()
        assert len(got) == len(served)
        diff = np.abs(got[PROBS].to_numpy(dtype=np.float64) - served[PROBS].to_numpy(dtype=np.float64))
        out[f.name] = float(diff.max())
        assert diff.max() <= TOLERANCE, f"{f.name}: serve.predict differs from calibrate by {diff.max():.3g}"
        assert got["mode"].tolist() == served["mode"].tolist(), f"{f.name}: modes differ"
        assert (got["refer"].astype(str) == served["refer"].astype(str)).all(), f"{f.name}: referrals differ"
        assert got["predicted"].tolist() == served["predicted"].tolist(), f"{f.name}: decisions differ"
        np.testing.assert_allclose(
            got["threshold"].astype(float), served["threshold"].astype(float), rtol=0, atol=1e-9
        )
    return out
