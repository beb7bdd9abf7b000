"""``tools.compare`` (and the runs it reads, ``tools.runs``): the verdict of a paired comparison, on seeded
synthetic served frames.

A served frame is what the calibrate stage writes to data/served/test.csv; these are drawn
with a known signal, so an identical copy, a degraded copy and a copy within the noise band each
have one right answer. The commands against real git/DVC revisions are in
tests/e2e/test_compare_revisions.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import malignant_score
from skinlesion.measure.paired import PAIRED_KEYS, PairedDiff, pair
from skinlesion.model.seen import Seen
from tools.compare import (
    ECE_KEY,
    ModeResult,
    Settings,
    compare_mode,
    differing_test_sets,
    ece_row,
    format_table,
    params_diff,
    verdict,
)
from tools.runs import lock_out_md5, lock_tracks

N_SAMPLES = 300


def served_frame(
    seed: int, *, n_lesions: int = 150, signal: float = 3.0, noise_seed: int | None = None
) -> pd.DataFrame:
    """A served test frame: 1-3 images per lesion, every class, probabilities that rank the true
    class up by ``signal``; ``seed`` draws the images and labels, ``noise_seed`` the scores."""
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    counts = rng.integers(1, 4, n_lesions)
    lesion_dx = np.arange(n_lesions) % k  # every class present
    lesion = np.repeat(np.arange(n_lesions), counts)
    y = lesion_dx[lesion]
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed).normal(size=(len(y), k))
    logits = noise + signal * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    score = malignant_score(probs)
    df = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(len(y))],
            "lesion_id": [f"HAM_{i:07d}" for i in lesion],
            "dx": np.asarray(CLASSES)[y],
            "age": "50.0",
            "sex": "male",
            "localization": "back",
        }
    )
    for j, c in enumerate(CLASSES):
        df[f"prob_{c}"] = probs[:, j]
    for j, c in enumerate(CLASSES):
        df[f"logit_{c}"] = np.log(probs[:, j])
    df["mode"] = "image_only"
    df["malignant_prob"] = score
    df["threshold"] = 0.3
    df["refer"] = score >= 0.3
    df["predicted"] = np.asarray(CLASSES)[probs.argmax(axis=1)]
    return df


def degrade(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The same images, the probabilities of other rows: a model that knows nothing."""
    out = frame.copy()
    cols = [f"prob_{c}" for c in CLASSES] + ["malignant_prob", "refer", "predicted"]
    perm = np.random.default_rng(seed).permutation(len(out))
    out[cols] = frame[cols].to_numpy()[perm]
    return out


def rows_by_key(a: pd.DataFrame, b: pd.DataFrame, bands: dict | None = None):
    _, rows = compare_mode(a, b, suffix="", bands=bands or {}, n_samples=N_SAMPLES, seed=0, level=0.95)
    return {r.key: r for r in rows}


# --------------------------------------------------------------------------- the verdicts


def test_an_identical_copy_differs_by_zero_on_every_metric_and_nothing_is_significant():
    a = served_frame(1)
    rows = rows_by_key(a, a.copy())
    assert list(rows) == [*PAIRED_KEYS, ECE_KEY]
    for key, r in rows.items():
        assert r.a == pytest.approx(r.b) and r.diff == 0.0, key
        assert not r.significant, key
    for key in PAIRED_KEYS:
        assert (rows[key].lo, rows[key].hi) == (0.0, 0.0)
        assert rows[key].verdict == "not significant (CI includes 0)"
    assert rows[ECE_KEY].lo is None and rows[ECE_KEY].verdict == "unpaired, no CI"


def test_a_model_that_knows_nothing_is_significantly_worse_on_macro_auc():
    a = served_frame(1)
    rows = rows_by_key(a, degrade(a, seed=5))
    r = rows["macro_auc"]
    assert r.a > 0.9 and r.b < 0.65
    assert r.hi < 0 and r.significant
    # no noise file: the CI alone decides, and the verdict says a band is missing
    assert r.verdict == "significant, B worse (CI only: no noise band measured, make noise)"


def test_a_difference_inside_the_noise_band_is_not_significant_even_when_the_ci_excludes_zero():
    a = served_frame(1)
    b = degrade(a, seed=5)
    wide = rows_by_key(a, b, {"macro_auc": 0.9, "malignant_auc": 0.01})
    assert wide["macro_auc"].hi < 0  # the CI still excludes 0 ...
    assert not wide["macro_auc"].significant  # ... but the band is wider than the difference
    assert wide["macro_auc"].verdict == "not significant (within noise: |B-A| <= band 0.9)"
    assert wide["malignant_auc"].significant and wide["malignant_auc"].verdict == "significant, B worse"
    assert wide["macro_auc"].band == 0.9 and wide["test_specificity"].band is None


def test_two_draws_of_the_same_model_are_not_significant():
    # the same images and signal, other score noise: what two seeds of one training look like
    a, b = served_frame(1, noise_seed=10), served_frame(1, noise_seed=11)
    rows = rows_by_key(a, b)
    assert rows["macro_auc"].lo < 0 < rows["macro_auc"].hi
    assert not rows["macro_auc"].significant


def test_the_image_only_mode_reads_its_own_bands():
    a = served_frame(1)
    _, rows = compare_mode(
        a, degrade(a, 5), suffix="_image_only", bands={"macro_auc": 0.9, "macro_auc_image_only": 0.01},
        n_samples=50, seed=0, level=0.95,
    )  # fmt: skip
    assert rows[0].key == "macro_auc" and rows[0].band == 0.01 and rows[0].significant


def test_lower_is_better_names_the_direction():
    fewer = PairedDiff("referrals_per_100", 60.0, 20.0, -40.0, -50.0, -30.0)
    assert verdict(fewer, None)[1].startswith("significant, B better")
    worse_ece = ece_row("ece_after", 0.05, 0.20, band=0.02)
    assert (
        worse_ece.verdict == "unpaired, no CI; beyond the noise band, B worse" and not worse_ece.significant
    )
    assert ece_row("ece_after", 0.05, 0.06, band=0.02).verdict == "unpaired, no CI; within noise"


def test_an_undefined_metric_is_not_a_verdict():
    d = PairedDiff("test_malignant_recall", math.nan, math.nan, math.nan, math.nan, math.nan)
    assert verdict(d, 0.1) == (False, "n/a (undefined on these images)")
    r = ece_row("ece_after", None, 0.1, None)
    assert math.isnan(r.diff) and r.verdict == "n/a"


def test_the_table_shows_every_metric_with_its_ci_and_verdict():
    a = served_frame(1)
    pairing, rows = compare_mode(a, degrade(a, 5), suffix="", bands={}, n_samples=50, seed=0, level=0.95)
    m = ModeResult(
        "", "test.csv", "image_only", "image_only", pairing.n_images, pairing.n_lesions, 0, 0, rows
    )
    lines = format_table(m, 0.95)
    assert lines[0].split()[:5] == ["metric", "A", "B", "B-A", "95%"]
    assert len(lines) == 1 + len(rows)
    assert "(unpaired)" in lines[-1] and lines[-1].startswith("ece_after")
    assert "-0.000" not in "\n".join(lines)


def test_the_bootstrap_is_seeded():
    a = served_frame(1)
    b = degrade(a, 5)
    one = rows_by_key(a, b)["macro_auc"]
    two = rows_by_key(a, b)["macro_auc"]
    assert (one.lo, one.hi) == (two.lo, two.hi)


# --------------------------------------------------------------------------- test sets


def test_different_test_sets_are_counted():
    a = served_frame(1)
    b = pd.concat([a.iloc[10:], served_frame(2).iloc[:7].assign(image_id=lambda d: "NEW_" + d["image_id"])])
    note = differing_test_sets(pair(a, b))
    assert note == (
        f"the two runs' test sets differ: {len(a) - 10} images in common, 10 only in A, 7 only in B"
    )
    assert differing_test_sets(pair(a, a)) is None


def test_no_common_image_asks_for_rescore():
    a = served_frame(1)
    b = a.assign(image_id="OTHER_" + a["image_id"])
    with pytest.raises(StageError, match="no test image in common .*--rescore"):
        compare_mode(a, b, suffix="", bands={}, n_samples=10, seed=0, level=0.95)


def test_the_same_image_with_another_label_is_refused():
    a = served_frame(1)
    b = a.copy()
    b.loc[3, "dx"] = "vasc" if b.loc[3, "dx"] != "vasc" else "nv"
    with pytest.raises(StageError, match=f"another label .*first: {a.loc[3, 'image_id']}"):
        compare_mode(a, b, suffix="", bands={}, n_samples=10, seed=0, level=0.95)


def test_rescoring_leaves_out_every_image_whose_lesion_or_image_a_has_seen():
    b_test = served_frame(1, n_lesions=20)
    lesion_seen = b_test["lesion_id"].iloc[0]  # a lesion A trained on, all its images
    image_seen = b_test["image_id"].iloc[-1]  # an image A calibrated on (e.g. a cross-id duplicate)
    keep = Seen(frozenset({lesion_seen}), frozenset({image_seen})).unseen_rows(b_test)
    left = b_test[~keep]
    assert set(left["lesion_id"]) >= {lesion_seen}
    assert (b_test["lesion_id"] == lesion_seen).sum() + 1 == len(left)
    assert image_seen in set(left["image_id"])


# --------------------------------------------------------------------------- what changed


def test_params_diff_lists_the_dotted_keys_that_differ():
    a = {
        "base": {"seed": 42},
        "calibrate": {"target_recall": 0.95, "ece_bins": 15},
        "train": {"backbones": ["a"]},
    }
    b = {**a, "base": {"seed": 43}, "train": {"backbones": ["a", "b"]}, "noise": {"seeds": 3}}
    assert params_diff(a, b) == [
        ("base.seed", 42, 43),
        ("noise.seeds", None, 3),
        ("train.backbones", ["a"], ["a", "b"]),
    ]
    assert params_diff(a, a) == []


def test_the_data_version_is_data_raw_md5_in_the_lock():
    lock = {
        "stages": {
            "download": {"outs": [{"path": "data/raw", "md5": "abc.dir"}]},
            "calibrate": {"outs": [{"path": "models/ensemble", "md5": "m.dir"}, {"path": "data/served"}]},
        }
    }
    assert lock_out_md5(lock, "data/raw") == "abc.dir"
    assert lock_out_md5(lock, "data/other") is None and lock_out_md5(None, "data/raw") is None
    assert lock_tracks(lock, "data/served/test.csv") == "data/served"
    assert lock_tracks(lock, "data/served") == "data/served"
    assert lock_tracks(lock, "data/servedX/test.csv") is None


def test_settings_come_from_b_params_unless_given():
    s = Settings.of(
        {"evaluate": {"bootstrap_samples": 200, "ci_level": 0.9}, "calibrate": {"ece_bins": 10}}, None, 3
    )
    assert s == Settings(200, 3, 0.9, 10)
    assert Settings.of({"evaluate": {"bootstrap_samples": 0}}, None, 0).samples == 1000
    assert Settings.of({}, 50, 0).samples == 50
    with pytest.raises(StageError, match="--samples must be >= 1, got 0"):
        Settings.of({}, 0, 0)


def test_what_a_bundle_has_seen_is_its_seen_json_else_its_split_train_and_val_rows(tmp_path):
    from skinlesion.core.outputs import write_json
    from skinlesion.model.seen import SEEN_FILE, seen_record
    from tools.rescore import seen_of_a
    from tools.runs import Layout, Run, RunData, RunFiles

    layout = Layout()
    bundle = tmp_path / layout.bundle
    bundle.mkdir(parents=True)
    with RunFiles(tmp_path, Run("workspace", None), tmp_path / "scratch") as files:
        a = RunData(files.run, frames={}, modes={}, headline=None, params={}, data_md5=None, files=files)
        with pytest.raises(
            StageError, match=r"^workspace: no data/validated/split.csv: run `dvc repro validate`"
        ):
            seen_of_a(a, bundle, layout)
        split = tmp_path / layout.split
        split.parent.mkdir(parents=True)
        split.write_text(
            "image_id,lesion_id,group_id,dx,split,assigned_split\n"
            "I1,L1,0,nv,train,train\nI2,L2,1,mel,val,val\nI3,L3,2,bcc,test,test\n"
        )
        seen, source = seen_of_a(a, bundle, layout)  # an older bundle: no seen.json
        assert (seen.lesion_ids, seen.image_ids) == ({"L1", "L2"}, {"I1", "I2"})
        assert source == "data/validated/split.csv, train + val rows: the bundle has no seen.json"

        frame = pd.DataFrame({"image_id": ["I9"], "lesion_id": ["L9"], "split": ["train"]})
        write_json(bundle / SEEN_FILE, seen_record(frame))
        seen, source = seen_of_a(a, bundle, layout)
        assert (seen.lesion_ids, seen.image_ids) == ({"L9"}, {"I9"})
        assert source == f"models/ensemble/{SEEN_FILE}"


def test_a_fusion_run_is_compared_mode_by_mode_each_with_its_own_band(tmp_path):
    """A workspace run with test.csv (metadata mode) and test_image_only.csv; B's image-only
    answers know nothing, its metadata answers are A's."""
    import json

    from skinlesion.measure.paired import headline, served_statistics
    from tools.compare import compare_frames
    from tools.runs import Layout, Run, RunFiles, load_run

    def write_run(root, frames):
        served = root / "data" / "served"
        served.mkdir(parents=True)
        head = {}
        for sfx, frame in frames.items():
            frame.to_csv(served / f"test{sfx}.csv", index=False)
            head.update({k + sfx: v for k, v in served_statistics(frame).items()})
        (root / "metrics").mkdir()
        (root / "metrics" / "headline.json").write_text(json.dumps(head))
        return RunFiles(root, Run("workspace", None), root / "scratch")

    a_frame = served_frame(1)
    files_a = write_run(tmp_path / "a", {"": a_frame, "_image_only": a_frame})
    files_b = write_run(tmp_path / "b", {"": a_frame, "_image_only": degrade(a_frame, 5)})
    a, b = load_run(files_a, Layout()), load_run(files_b, Layout())
    assert a.modes == {"": "metadata", "_image_only": "image_only"}
    assert set(a.headline) == set(headline({}, ("", "_image_only"))) - {"ece_after", "ece_after_image_only"}
    settings = Settings(100, 0, 0.95, 15)
    results, notes = compare_frames(
        a.frames,
        a.modes,
        b,
        bands={"macro_auc": 0.5},
        settings=settings,
        reported_a=a.headline,
        progress=False,
    )
    assert notes == [] and [m.file for m in results] == ["test.csv", "test_image_only.csv"]
    first, image_only = ({r.key: r for r in m.rows} for m in results)
    assert not first["macro_auc"].significant and first["macro_auc"].band == 0.5
    # the band of the first mode is not the image-only mode's: none measured there
    assert image_only["macro_auc"].band is None and image_only["macro_auc"].significant
    # B without the image-only file: that mode is named, not compared
    (tmp_path / "b" / "data" / "served" / "test_image_only.csv").unlink()
    b = load_run(RunFiles(tmp_path / "b", Run("workspace", None), tmp_path / "s2"), Layout())
    results, notes = compare_frames(
        a.frames, a.modes, b, bands={}, settings=settings, reported_a=a.headline, progress=False
    )
    assert [m.file for m in results] == ["test.csv"]
    assert results[0].mode_a == "metadata" and results[0].mode_b == "image_only"
    assert notes == ["test_image_only.csv: only A has this mode (image_only): not compared"]
