"""The promotion gate's paired comparison (issue 20, item 6): the candidate and production on the
same test images, decided on the lower bound of the paired CI of the macro AUC difference.

The decision tests use seeded synthetic served frames (no model); the scoring tests score a real
(untrained) bundle on real JPEGs through the serving path, as the flow does."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from flows.dvcops import Layout
from flows.gate import decide
from flows.gate_paired import (
    PairedGate,
    compare_served,
    leave_out_seen,
    paired_production,
    request_modes,
    score_requests,
)
from flows.gate_report import gate_markdown, render_retrain_summary
from flows.report import RunReport
from flows.retrain import paired_comparison
from skinlesion.core.schema import CLASSES
from skinlesion.measure.predictions import write_predictions
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA
from skinlesion.model.seen import Seen
from tests.builders.bundles import make_bundle
from tests.builders.frames import served, with_probs
from tests.conftest import make_jpeg

# What the calibrate stage stored for each bundle: production's stored AUCs far above the
# candidate's, so a decision that passes can only have come from the paired comparison.
CANDIDATE = {"test_malignant_recall": 0.96, "malignant_auc": 0.70, "macro_auc": 0.70}
PRODUCTION = {"test_malignant_recall": 0.95, "malignant_auc": 0.99, "macro_auc": 0.99}


def logits_of(frame: pd.DataFrame) -> np.ndarray:
    return np.log(frame[[f"prob_{c}" for c in CLASSES]].to_numpy())


def jittered(frame: pd.DataFrame, seed: int, sd: float = 0.15) -> pd.DataFrame:
    """The same model retrained: every probability moved a little (noise only)."""
    rng = np.random.default_rng(seed)
    return with_probs(frame, logits_of(frame) + rng.normal(0, sd, (len(frame), len(CLASSES))))


def degraded(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A truly worse model: half the images get another image's probabilities."""
    rng = np.random.default_rng(seed)
    logits = logits_of(frame)
    half = rng.choice(len(frame), len(frame) // 2, replace=False)
    logits[half] = logits[rng.permutation(half)]
    return with_probs(frame, logits)


def gate_of(candidate: dict, production: dict, **counts) -> PairedGate:
    modes = compare_served(candidate, production, samples=400, seed=42)
    return PairedGate(modes, samples=400, seed=42, **{"n_test": modes[0].n_images, **counts})


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_candidate_worse_by_noise_only_passes(seed):
    prod = served()
    paired = gate_of({IMAGE_ONLY: jittered(prod, seed)}, {IMAGE_ONLY: prod})
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.01, paired=paired)
    assert d.promote, d.reason
    [recall, auc] = d.checks
    assert recall.detail == "test_malignant_recall 0.960 >= target 0.950"
    diff = paired.modes[0].diffs["macro_auc"]
    assert abs(diff.diff) < 0.01 and diff.lo < diff.diff < diff.hi
    n = paired.modes[0].n_images
    assert auc.name == "macro_auc" and auc.detail == (
        f"macro_auc {diff.b:.3f} vs production {diff.a:.3f} on the same {n} test images (0 left out: seen "
        f"by production): {diff.diff:+.3f}, 95% CI [{diff.lo:+.3f}, {diff.hi:+.3f}] (drop allowed 0.010: "
        f"CI lower bound {diff.lo:+.3f} >= -0.010): ok"
    )
    # the stored AUCs (0.70 against 0.99) played no part
    assert "0.990" not in d.reason and "malignant_auc" not in d.reason


def test_a_truly_worse_candidate_fails_and_the_reason_names_the_ci():
    prod = served()
    paired = gate_of({IMAGE_ONLY: degraded(prod, 5)}, {IMAGE_ONLY: prod}, n_left_out=12)
    diff = paired.modes[0].diffs["macro_auc"]
    assert diff.hi < -0.05  # far beyond any noise
    # a candidate whose stored AUCs look better than production's still fails
    d = decide({**PRODUCTION, "test_malignant_recall": 0.96}, PRODUCTION, target_recall=0.95,
               max_auc_drop=0.01, paired=paired)  # fmt: skip
    assert not d.promote
    assert d.reason == (
        f"macro_auc {diff.b:.3f} vs production {diff.a:.3f} on the same {paired.modes[0].n_images} test "
        f"images (12 left out: seen by production): {diff.diff:+.3f}, 95% CI [{diff.lo:+.3f}, "
        f"{diff.hi:+.3f}] (drop allowed 0.010: CI lower bound {diff.lo:+.3f} < -0.010): too low"
    )
    # with a tolerance as wide as the loss, the same candidate passes: the rule is the lower bound
    wide = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=-diff.lo + 0.001, paired=paired)
    assert wide.promote


def test_a_negative_tolerance_demands_a_gain_the_ci_shows():
    prod = served()
    same = gate_of({IMAGE_ONLY: prod}, {IMAGE_ONLY: prod})
    diff = same.modes[0].diffs["macro_auc"]
    assert (diff.diff, diff.lo, diff.hi) == (0.0, 0.0, 0.0)
    assert decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.0, paired=same).promote
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=-0.01, paired=same)
    assert not d.promote and "gain required 0.010: CI lower bound +0.000 < +0.010): too low" in d.reason
    better = gate_of({IMAGE_ONLY: prod}, {IMAGE_ONLY: degraded(prod, 5)})
    assert decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=-0.01, paired=better).promote


def test_the_recall_requirement_holds_as_before():
    prod = served()
    paired = gate_of({IMAGE_ONLY: prod}, {IMAGE_ONLY: prod})
    d = decide({**CANDIDATE, "test_malignant_recall": 0.9}, PRODUCTION, target_recall=0.95,
               max_auc_drop=0.01, paired=paired)  # fmt: skip
    assert not d.promote and d.reason == "test_malignant_recall 0.900 < target 0.950"
    first = decide(CANDIDATE, None, target_recall=0.95, max_auc_drop=0.01, paired=None)
    assert (
        first.promote
        and first.reason == "no production model yet; test_malignant_recall 0.960 >= target 0.950"
    )


def test_each_kind_of_request_is_compared_and_a_worse_one_fails():
    """A fusion candidate after a one-mode production: compared on requests with metadata (production
    answers them image-only) and without; worse on the second only, it fails on that one."""
    assert request_modes((METADATA, IMAGE_ONLY), (IMAGE_ONLY,)) == (METADATA, IMAGE_ONLY)
    assert request_modes((IMAGE_ONLY,), (IMAGE_ONLY,)) == (IMAGE_ONLY,)
    prod = served()
    candidate = {METADATA: jittered(prod, 1), IMAGE_ONLY: degraded(prod, 5)}
    paired = gate_of(
        candidate, {METADATA: prod, IMAGE_ONLY: prod}, notes=("production does not use metadata",)
    )
    fusion = {**CANDIDATE, "test_malignant_recall_image_only": 0.96}
    d = decide(fusion, PRODUCTION, target_recall=0.95, max_auc_drop=0.01, paired=paired)
    assert not d.promote
    assert [(c.name, c.passed) for c in d.checks] == [
        ("test_malignant_recall", True), ("test_malignant_recall_image_only", True),
        ("macro_auc", True), ("macro_auc_image_only", False),
    ]  # fmt: skip
    assert d.checks[2].detail.startswith("macro_auc (with metadata) ")
    assert d.reason.startswith("macro_auc_image_only (image only) ") and "95% CI [" in d.reason
    assert d.reason.endswith("; production does not use metadata")


def test_production_without_seen_json_falls_back_and_says_so(tmp_path):
    prod_dir = tmp_path / "models" / "production"
    prod_dir.mkdir(parents=True)
    (prod_dir / "bundle.json").write_text("{}")
    paired = paired_production(prod_dir, tmp_path / "served", tmp_path / "images", samples=100, seed=1,
                               names={"production": "models/production"})  # fmt: skip
    assert paired.modes == () and paired.unavailable == (
        "models/production has no seen.json (a bundle from before it was recorded): which images it "
        "learned from is unknown"
    )
    d = decide({**CANDIDATE, "macro_auc": 0.985}, PRODUCTION, target_recall=0.95, max_auc_drop=0.01,
               paired=paired)  # fmt: skip
    assert not d.promote  # the stored malignant AUC 0.70 vs 0.99
    assert d.reason == (
        "malignant_auc 0.700 vs production 0.990 (-0.290; drop allowed 0.010): too low; not compared on "
        f"the same images: {paired.unavailable}; the AUC checks compare each bundle's stored test metrics"
    )
    ok = decide(PRODUCTION, PRODUCTION, target_recall=0.95, max_auc_drop=0.01, paired=paired)
    assert ok.promote and ok.reason.endswith("the AUC checks compare each bundle's stored test metrics")
    assert "macro_auc 0.990 vs production 0.990 (+0.000; drop allowed 0.010): ok" in ok.reason
    # a damaged seen.json, or no bootstrap replicates: the same fallback, said
    (prod_dir / "seen.json").write_text('{"format_version": 99}')
    bad = paired_production(prod_dir, tmp_path / "served", tmp_path / "images", samples=100, seed=1)
    assert bad.unavailable.startswith(f"{prod_dir}/seen.json: format_version 99, this code reads 1")
    (prod_dir / "seen.json").write_text(json.dumps({"format_version": 1, "lesion_ids": [], "image_ids": []}))
    none = paired_production(prod_dir, tmp_path / "served", tmp_path / "images", samples=0, seed=1)
    assert none.unavailable == "evaluate.bootstrap_samples is 0: no paired CI"
    missing = paired_production(prod_dir, tmp_path / "served", tmp_path / "images", samples=10, seed=1)
    assert missing.unavailable.startswith("the candidate's served test answers: ")
    assert missing.unavailable == (
        f"the candidate's served test answers: {tmp_path}/served/test.csv: predictions not found; run the "
        "calibrate stage first"
    )


def test_what_production_has_seen_is_left_out():
    frame = served(n_lesions=20)
    lesion = frame["lesion_id"].iloc[0]
    image = frame.loc[frame["lesion_id"] != lesion, "image_id"].iloc[0]
    kept, n_images, n_lesions = leave_out_seen(frame, Seen(frozenset({lesion}), frozenset({image})))
    by_lesion = int((frame["lesion_id"] == lesion).sum())
    assert (n_images, n_lesions) == (by_lesion + 1, 2)
    assert len(kept) == len(frame) - n_images
    assert lesion not in set(kept["lesion_id"]) and image not in set(kept["image_id"])


def test_the_summary_shows_the_paired_comparison(tmp_path):
    prod = served()
    paired = gate_of({IMAGE_ONLY: jittered(prod, 1)}, {IMAGE_ONLY: prod}, n_left_out=7, n_lesions_left_out=3)
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.01, paired=paired)
    gate = {**d.as_dict(), "thresholds": None, "paired": paired.as_dict()}
    json.dumps(gate, allow_nan=False)  # production.json holds it
    md = "\n".join(gate_markdown(gate, Layout(tmp_path)))
    n = paired.modes[0].n_images
    assert "## Paired comparison with production" in md
    assert f"Both bundles scored on the same **{n}** test images" in md
    assert (
        f"the candidate's {n} test images less **7** (3 lesions) production trained, tuned or calibrated"
        in md
    )
    assert "95% CI of 400 lesion-bootstrap replicates (seed 42)" in md
    diff = paired.modes[0].diffs["macro_auc"]
    assert (
        f"| image only | **macro_auc** | {diff.a:.3f} | {diff.b:.3f} | {diff.diff:+.3f} | "
        f"[{diff.lo:+.3f}, {diff.hi:+.3f}] |" in md
    )
    assert "| image only | malignant_auc |" in md and "| image only | referrals_per_100 |" in md
    report = RunReport(flow_run="t", outcome="promoted", gate=gate)
    full = render_retrain_summary(report, Layout(tmp_path))
    assert full.index("## Paired comparison with production") < full.index("## Promotion gate")
    assert f"| macro_auc | pass | macro_auc {diff.b:.3f} vs production" in full

    fallback = {**gate, "paired": PairedGate(unavailable="models/production has no seen.json").as_dict()}
    md2 = "\n".join(gate_markdown(fallback, Layout(tmp_path)))
    assert (
        "Not compared on the same images: models/production has no seen.json. The AUC checks compare "
        "each bundle's stored test metrics." in md2
    )


# --------------------------------------------------------------------------- scoring production


@pytest.fixture(scope="module")
def production_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("production"))


def _workspace(tmp_path, bundle, n_lesions: int = 24):
    """A repository layout: models/production (the bundle + seen.json), data/raw/images (real
    JPEGs) and the candidate's data/served/test.csv: production's own answers for those images."""
    import shutil

    layout = Layout(tmp_path)
    prod = layout.path(layout.production)
    shutil.copytree(bundle, prod)
    rows = served(n_lesions=n_lesions, seed=3)[["image_id", "lesion_id", "dx", "age", "sex", "localization"]]
    rows.loc[rows.index[::4], "age"] = ""  # metadata unknown for some: image-only in any bundle
    images = layout.path(layout.raw) / "images"
    for k, i in enumerate(rows["image_id"]):
        make_jpeg(images / f"{i}.jpg", size=(48, 40), seed=k)
    frames, failed, modes = score_requests(prod, rows, images, (IMAGE_ONLY,))
    assert failed == {} and modes == (IMAGE_ONLY,)
    (tmp_path / "data" / "served").mkdir(parents=True)
    write_predictions(frames[IMAGE_ONLY], tmp_path / "data" / "served" / "test.csv")
    seen_lesion = rows["lesion_id"].iloc[-1]
    (prod / "seen.json").write_text(json.dumps({
        "format_version": 1, "splits": ["train", "val"], "lesion_ids": [seen_lesion], "image_ids": [],
    }))  # fmt: skip
    return layout, rows, int((rows["lesion_id"] == seen_lesion).sum())


def test_production_is_scored_on_the_candidates_unseen_test_images(tmp_path, production_bundle):
    """The flow's step, on a real bundle and real JPEGs: the candidate here is production itself
    (its served answers), so every paired difference is exactly 0 and the gate passes; a lesion
    production has seen is left out and counted; an image production cannot read is named."""
    layout, rows, n_seen = _workspace(tmp_path, production_bundle)
    broken = rows["image_id"].iloc[0]
    (layout.path(layout.raw) / "images" / f"{broken}.jpg").write_bytes(b"not a jpeg")
    paired = paired_comparison(layout, 50, 42)
    assert paired.unavailable is None, paired.unavailable
    assert (paired.n_test, paired.n_left_out, paired.n_lesions_left_out, paired.n_failed) == (
        len(rows),
        n_seen,
        1,
        1,
    )
    [mode] = paired.modes
    assert mode.mode == IMAGE_ONLY and mode.n_images == len(rows) - n_seen - 1
    assert paired.notes[0].startswith(f"1 image(s) production could not score left out (first: {broken}: ")
    for key in ("macro_auc", "malignant_auc", "test_malignant_recall", "referrals_per_100"):
        d = mode.diffs[key]
        assert abs(d.diff) < 1e-6 and abs(d.lo) < 1e-6 and abs(d.hi) < 1e-6, (key, d)
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.0, paired=paired)
    assert (
        d.promote
        and f"on the same {mode.n_images} test images ({n_seen} left out: seen by production): +0.000"
        in d.reason
    )


def test_a_worse_candidate_on_real_images_fails(tmp_path, production_bundle):
    layout, rows, _ = _workspace(tmp_path, production_bundle)
    served_csv = tmp_path / "data" / "served" / "test.csv"
    frame = pd.read_csv(served_csv, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)
    # the candidate is sure of the wrong class for every image
    wrong = (np.array([CLASSES.index(d) for d in frame["dx"]]) + 1) % len(CLASSES)
    logits = np.full((len(frame), len(CLASSES)), -6.0)
    logits[np.arange(len(frame)), wrong] = 6.0
    worse = with_probs(frame, logits)
    for c in CLASSES:  # the served file's log-probabilities
        worse[f"logit_{c}"] = np.log(worse[f"prob_{c}"])
    write_predictions(worse, served_csv)
    paired = paired_comparison(layout, 50, 42)
    assert paired.unavailable is None, paired.unavailable
    d = decide(CANDIDATE, PRODUCTION, target_recall=0.95, max_auc_drop=0.05, paired=paired)
    assert not d.promote and "95% CI [" in d.reason and d.reason.endswith("): too low")
