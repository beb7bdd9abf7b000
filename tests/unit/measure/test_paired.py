"""The paired comparison of two runs (skinlesion/measure/paired.py) and the bundle's record of what it saw."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import malignant_score
from skinlesion.measure.paired import (
    HEADLINE_KEYS,
    PAIRED_KEYS,
    headline,
    pair,
    paired_bootstrap,
    served_statistics,
)
from skinlesion.measure.predictions import Served, served_report
from skinlesion.model.seen import SEEN_FILE, read_seen, seen_record
from skinlesion.params.evaluate import EvaluateParams

K = len(CLASSES)


def _meta(n: int, rng: np.random.Generator) -> pd.DataFrame:
    dx = rng.choice(CLASSES, size=n, p=[0.05, 0.08, 0.12, 0.03, 0.15, 0.52, 0.05])
    return pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "lesion_id": [f"HAM_{i // 2:07d}" for i in range(n)],  # two images per lesion
            "dx": dx,
            "age": 50.0,
            "sex": "male",
            "localization": "back",
        }
    )


def _served(meta: pd.DataFrame, skill: float, rng: np.random.Generator, threshold: float = 0.3) -> Served:
    """Probabilities that point at the true class with strength ``skill`` (0: noise)."""
    y = meta["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    logits = rng.normal(0, 1, (len(meta), K))
    logits[np.arange(len(meta)), y] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    score = malignant_score(probs)
    n = len(meta)
    return Served(probs, np.full(n, "image_only"), score, np.full(n, threshold), probs.argmax(1))


def test_served_statistics_are_the_calibrate_stages_metrics():
    """One definition: what a comparison measures from a served file is what calibrate reports."""
    rng = np.random.default_rng(0)
    meta = _meta(300, rng)
    served = _served(meta, 2.0, rng)
    reported, _ = served_report(meta, served, EvaluateParams(bootstrap_samples=0), rng, progress=False)
    frame = served.frame(meta)
    got = served_statistics(frame)
    assert set(got) == set(PAIRED_KEYS)
    for key in PAIRED_KEYS:
        assert got[key] == pytest.approx(reported[key], abs=1e-6), key  # the report keeps 6 digits
    # the same through a CSV round trip (refer as text), as compare reads data/served/test.csv
    again = served_statistics(pd.read_csv(pd.io.common.StringIO(frame.to_csv(index=False))))
    assert again == pytest.approx(got)


def test_identical_runs_are_not_significant():
    rng = np.random.default_rng(1)
    meta = _meta(240, rng)
    frame = _served(meta, 2.0, rng).frame(meta)
    out = paired_bootstrap(pair(frame, frame.copy()), n_samples=200, rng=np.random.default_rng(2))
    for key, d in out.items():
        assert d.diff == 0 and d.lo == 0 and d.hi == 0, key
        assert not d.significant(None) and not d.significant(0.0)


def test_a_truly_worse_run_is_significant_and_a_noise_band_can_absorb_it():
    rng = np.random.default_rng(3)
    meta = _meta(400, rng)
    good = _served(meta, 3.0, rng).frame(meta)
    bad = _served(meta, 0.5, np.random.default_rng(4)).frame(meta)
    out = paired_bootstrap(pair(good, bad), n_samples=300, rng=np.random.default_rng(5))
    d = out["macro_auc"]
    assert d.diff < -0.1 and d.hi < 0, d
    assert d.significant(None) and d.significant(0.01)
    # a difference smaller than the run-to-run noise band is not called significant
    assert not d.significant(abs(d.diff) + 0.01)


def test_pairing_counts_images_only_one_run_scored_and_refuses_other_labels():
    rng = np.random.default_rng(6)
    meta = _meta(100, rng)
    frame = _served(meta, 2.0, rng).frame(meta)
    p = pair(frame.iloc[:80], frame.iloc[20:])
    assert (p.n_images, p.only_a, p.only_b) == (60, 20, 20)
    assert p.a["image_id"].tolist() == p.b["image_id"].tolist()
    other = frame.copy()
    other.loc[5, "dx"] = "vasc" if other.loc[5, "dx"] != "vasc" else "nv"
    with pytest.raises(ValueError, match="ISIC_0000005"):
        pair(frame, other)
    with pytest.raises(ValueError, match="no test image in common"):
        paired_bootstrap(pair(frame.iloc[:10], frame.iloc[10:]), n_samples=10, rng=rng)


def test_headline_is_small():
    metrics = {f"{k}{s}": 0.5 for k in HEADLINE_KEYS for s in ("", "_image_only")} | {"other": 1}
    both = headline(metrics, ["", "_image_only"])
    assert len(both) <= 15 and "other" not in both
    assert set(headline(metrics)) == set(HEADLINE_KEYS)


def test_seen_record_round_trip_and_errors(tmp_path):
    split = pd.DataFrame(
        {
            "image_id": ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"],
            "lesion_id": ["L1", "L2", "L2", "L3"],
            "split": ["train", "val", "test", "test"],
        }
    )
    (tmp_path / SEEN_FILE).write_text(json.dumps(seen_record(split)))
    seen = read_seen(tmp_path)
    assert seen is not None
    assert seen.lesion_ids == {"L1", "L2"} and seen.image_ids == {"ISIC_1", "ISIC_2"}
    # ISIC_3 is a test image of a lesion the bundle trained on: left out; ISIC_4 is unseen
    assert seen.unseen(["L2", "L3"], ["ISIC_3", "ISIC_4"]).tolist() == [False, True]
    assert read_seen(tmp_path / "absent") is None
    (tmp_path / SEEN_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StageError, match=r"seen\.json: format_version 99"):
        read_seen(tmp_path)
