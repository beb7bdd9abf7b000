"""The ensemble and calibrate stages on small synthetic prediction files (no TensorFlow needed).

The members' predictions are written in the evaluate stage's format by its own function, with
probabilities that carry a known amount of signal, so the fitted numbers can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import calibrate, ensemble
from stages.common import CLASSES, MALIGNANT, StageError
from stages.metrics import log_loss, malignant_score, operating_point
from stages.params import parse_params
from stages.predictions import labels, predictions_frame, probabilities, read_predictions, write_predictions

MAL_IDX = [CLASSES.index(c) for c in MALIGNANT]


def _meta(n: int, rng: np.random.Generator, prefix: str) -> pd.DataFrame:
    # lesions of 1-3 images; every class present; ~half malignant so thresholds are meaningful
    y = np.tile(np.arange(len(CLASSES)), n // len(CLASSES) + 1)[:n]
    rng.shuffle(y)
    lesion = np.cumsum(rng.random(n) < 0.6)
    return pd.DataFrame(
        {
            "image_id": [f"ISIC_{prefix}{i:06d}" for i in range(n)],
            "lesion_id": [f"HAM_{prefix}{j:06d}" for j in lesion],
            "dx": np.asarray(CLASSES)[y],
            "age": [("" if i % 9 == 0 else f"{20 + (i * 7) % 65}.0") for i in range(n)],
            "sex": np.where(np.arange(n) % 2 == 0, "male", "female"),
            "localization": np.asarray(["back", "face", "lower extremity"])[np.arange(n) % 3],
        }
    )


def _member_probs(y: np.ndarray, signal: float, over: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy probabilities, ``over`` times too confident: x = noise + signal * onehot(y) has the
    calibrated log-posterior signal * x, and these are softmax(over * signal * x)."""
    x = rng.normal(size=(y.size, len(CLASSES))) + signal * np.eye(len(CLASSES))[y]
    z = over * signal * x
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def members(tmp_path: Path) -> Path:
    """data/predictions with two members: a good one and a weak one (val 280, test 210 images)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "predictions"
    metas = {"val": _meta(280, rng, "v"), "test": _meta(210, rng, "t")}
    for name, signal in (("mobilenetv2", 2.5), ("custom_cnn", 0.8)):
        for split, meta in metas.items():
            y = labels(meta)
            (root / name).mkdir(parents=True, exist_ok=True)
            write_predictions(
                predictions_frame(meta, _member_probs(y, signal, 3.0, rng)), root / name / f"{split}.csv"
            )
    return root


def _params(**sections):
    return parse_params(
        {
            "train": {"backbones": ["mobilenetv2", "custom_cnn"]},
            "evaluate": {"bootstrap_samples": 50, **sections.get("evaluate", {})},
            "ensemble": {"members": ["mobilenetv2", "custom_cnn"], **sections.get("ensemble", {})},
            "calibrate": {"bootstrap_samples": 100, **sections.get("calibrate", {})},
        }
    )


def _run_ensemble(members: Path, out: Path, **sections) -> ensemble.EnsembleResult:
    p = _params(**sections)
    return ensemble.run(
        p.ensemble,
        p.evaluate,
        seed=1,
        predictions_dir=members,
        out_dir=out / "ensemble",
        metrics_path=out / "ensemble.json",
        plots_dir=out / "ensemble_plots",
    )


def _prepared(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    counts = {s: {c: 3 for c in CLASSES} for s in ("train", "val", "test")}
    manifest = {
        "format_version": 1,
        "image_size": 32,
        "aspect": "crop",
        "classes": list(CLASSES),
        "splits": {
            s: {"n": 21, "class_counts": c, "shards": [], "csv": f"{s}.csv"} for s, c in counts.items()
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _models(root: Path) -> Path:
    for i, name in enumerate(("mobilenetv2", "custom_cnn")):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model.keras").write_bytes(bytes([i]) * 100)
    return root


def _run_calibrate(tmp: Path, out: Path, lock: Path | None = None, **sections) -> calibrate.CalibrateResult:
    p = _params(**sections)
    import dataclasses

    return calibrate.run(
        p.calibrate,
        seed=1,
        ensemble_dir=out / "ensemble",
        ensemble_metrics_path=out / "ensemble.json",
        models_dir=_models(tmp / "models"),
        prepared_dir=_prepared(tmp / "prepared"),
        bundle_dir=out / "bundle",
        metrics_path=out / "calibration.json",
        plots_dir=out / "calibration_plots",
        card_path=out / "model_card.md",
        all_params=dataclasses.asdict(p),
        data_md5=calibrate.data_version(lock, "data/prepared") if lock else None,
    )


# ---------------------------------------------------------------- ensemble


def test_ensemble_fitted_weights_on_simplex_and_not_worse_than_equal(members, tmp_path):
    out = tmp_path / "out"
    res = _run_ensemble(members, out)
    w = np.array(res.weights)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0) and w[0] > w[1]  # the good member leads
    m = json.loads((out / "ensemble.json").read_text())
    assert m["weight_mobilenetv2"] == pytest.approx(w[0], abs=1e-6)
    assert m["val_log_loss"] <= m["val_log_loss_equal_weights"] + 1e-9

    # the ensemble's files are the weighted average of the members', row by row
    for split in ("val", "test"):
        ens = read_predictions(out / "ensemble" / f"{split}.csv")
        parts = [read_predictions(members / name / f"{split}.csv") for name in res.members]
        expected = sum(wi * probabilities(p) for wi, p in zip(w, parts, strict=True))
        np.testing.assert_allclose(probabilities(ens), expected, atol=1e-8)
        assert ens["image_id"].tolist() == parts[0]["image_id"].tolist()
    assert json.loads((out / "ensemble" / "weights.json").read_text())["members"] == [
        "mobilenetv2",
        "custom_cnn",
    ]


def test_ensemble_metrics_have_member_keys_and_best_member_check(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    m = json.loads((out / "ensemble.json").read_text())
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "mel_recall",
        "malignant_auc",
        "malignant_pauc_tpr80",
        *(f"{k}_{c}" for k in ("precision", "recall", "f1", "auc") for c in CLASSES),
    ):
        assert key in m and f"{key}_ci_low" in m and f"{key}_ci_high" in m, key
        if m[key] is not None:
            assert m[f"{key}_ci_low"] <= m[key] + 1e-9 and m[key] <= m[f"{key}_ci_high"] + 1e-9, key
    assert m["best_member"] == "mobilenetv2"
    assert m["ensemble_minus_best_macro_auc"] == pytest.approx(
        m["macro_auc"] - m["best_member_macro_auc"], abs=1e-5
    )
    assert m["worst_subgroup"].split("=")[0] in ("localization", "sex", "age_band")
    assert (out / "ensemble_plots" / "confusion.csv").is_file()
    assert {p.name for p in (out / "ensemble_plots" / "roc").iterdir()} == {
        f"{c}.csv" for c in (*CLASSES, "malignant")
    }


def test_equal_weights_and_single_member(members, tmp_path):
    res = _run_ensemble(members, tmp_path / "a", ensemble={"weights": "equal"})
    assert res.weights == (0.5, 0.5)
    res = _run_ensemble(members, tmp_path / "b", ensemble={"members": ["custom_cnn"]})
    assert res.weights == (1.0,)
    m = json.loads((tmp_path / "b" / "ensemble.json").read_text())
    assert m["ensemble_minus_best_macro_auc"] == pytest.approx(0.0, abs=1e-6)


def test_ensemble_refuses_members_on_different_images(members, tmp_path):
    df = pd.read_csv(members / "custom_cnn" / "test.csv", dtype=str, keep_default_na=False)
    df.iloc[1:].to_csv(members / "custom_cnn" / "test.csv", index=False)
    with pytest.raises(
        Exception, match=r"test: member 'custom_cnn' lacks ISIC_t000000 compared with 'mobilenetv2'"
    ):
        _run_ensemble(members, tmp_path / "out")
    assert not (tmp_path / "out" / "ensemble").exists()  # nothing half-written


def test_ensemble_missing_member_names_the_file(members, tmp_path):
    (members / "custom_cnn" / "val.csv").unlink()
    with pytest.raises(StageError, match=r"custom_cnn/val.csv: predictions not found; run the evaluate"):
        _run_ensemble(members, tmp_path / "out")


def test_ensemble_main_reports_one_line(members, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(
        "train: {backbones: [mobilenetv2, custom_cnn]}\nensemble: {members: [mobilenetv2, resnet50]}\n"
    )
    rc = ensemble.main(
        [
            "--params",
            str(params),
            "--predictions",
            str(members),
            "--out",
            str(tmp_path / "e"),
            "--metrics",
            str(tmp_path / "e.json"),
            "--plots",
            str(tmp_path / "p"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "ensemble.members: ['resnet50'] not in train.backbones" in err[0]


# ---------------------------------------------------------------- calibrate


def test_calibrate_meets_target_on_val_and_improves_nll(members, tmp_path):
    # one member, 3x over-confident: the temperature cools it, helping NLL and ECE on val and test
    single = tmp_path / "single"
    _run_ensemble(members, single, ensemble={"members": ["mobilenetv2"]})
    res = _run_calibrate(tmp_path, single)
    assert 2.0 < res.temperature < 4.5
    m = res.metrics
    assert m["val_nll_after"] < m["val_nll_before"] and m["nll_after"] < m["nll_before"]
    assert m["val_ece_after"] < m["val_ece_before"] and m["ece_after"] < m["ece_before"]

    out = tmp_path / "out"
    _run_ensemble(members, out)
    res = _run_calibrate(tmp_path, out)
    m = json.loads((out / "calibration.json").read_text())
    assert m["val_nll_after"] <= m["val_nll_before"]  # never worse on the data it was fitted on
    # the threshold reaches the target recall on val, recomputed here from the files
    val = read_predictions(out / "ensemble" / "val.csv")
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["temperature"] == res.temperature and len(bundle["class_bias"]) == len(CLASSES)
    logits = val[[f"logit_{c}" for c in CLASSES]].to_numpy() / res.temperature + np.array(
        bundle["class_bias"]
    )
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    is_mal = np.isin(labels(val), MAL_IDX)
    op = operating_point(is_mal, malignant_score(p), res.threshold)
    assert op["recall"] >= 0.95 and m["val_malignant_recall"] == pytest.approx(op["recall"], abs=1e-6)
    for key in (
        "threshold",
        "test_malignant_recall",
        "test_specificity",
        "test_ppv",
        "referrals_per_100",
        "ece_before",
        "ece_after",
        "temperature",
    ):
        assert isinstance(m[key], float), key
    assert (
        m["test_malignant_recall_ci_low"] <= m["test_malignant_recall"] <= m["test_malignant_recall_ci_high"]
    )
    assert 0 < m["referrals_per_100"] <= 100
    # plots: reliability CSVs whose counts cover the test set, and a PNG
    rel = pd.read_csv(out / "calibration_plots" / "reliability" / "after.csv")
    assert len(rel) == 15 and rel["count"].sum() == 210
    assert (out / "calibration_plots" / "reliability.png").stat().st_size > 1000


def test_test_labels_never_fit_anything(members, tmp_path):
    """Poisoning the test labels changes the test metrics but not weights, T or threshold."""
    clean = tmp_path / "clean"
    r_ens = _run_ensemble(members, clean)
    r_cal = _run_calibrate(tmp_path, clean)

    rng = np.random.default_rng(9)
    for name in ("mobilenetv2", "custom_cnn"):
        path = members / name / "test.csv"
        df = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str, "dx": str}, keep_default_na=False)
        df["dx"] = rng.permutation(df["dx"].to_numpy()) if name == "mobilenetv2" else None
        if name == "custom_cnn":  # members must agree on truth: same poisoned labels
            df["dx"] = pd.read_csv(members / "mobilenetv2" / "test.csv", dtype=str)["dx"]
        df.to_csv(path, index=False)
    poisoned = tmp_path / "poisoned"
    p_ens = _run_ensemble(members, poisoned)
    p_cal = _run_calibrate(tmp_path, poisoned)

    assert p_ens.weights == r_ens.weights
    assert p_cal.temperature == r_cal.temperature
    assert p_cal.threshold == r_cal.threshold
    assert p_ens.metrics["macro_auc"] < r_ens.metrics["macro_auc"] - 0.1  # the poison did bite
    assert p_cal.metrics["test_malignant_recall"] != r_cal.metrics["test_malignant_recall"]


def test_lower_ci_bound_is_more_cautious(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    point = _run_calibrate(tmp_path, out, calibrate={"target_recall": 0.9})
    low = _run_calibrate(tmp_path, out, calibrate={"target_recall": 0.9, "recall_bound": "lower_ci"})
    assert low.threshold <= point.threshold
    assert low.metrics["val_malignant_recall_bound"] >= 0.9 - 1e-9
    assert low.metrics["val_malignant_recall"] >= point.metrics["val_malignant_recall"]


def test_bundle_and_model_card(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n    - path: data/prepared\n"
        "      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n      size: 10\n      nfiles: 2\n"
    )
    res = _run_calibrate(tmp_path, out, lock=lock)
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["classes"] == list(CLASSES) and bundle["malignant"] == ["akiec", "bcc", "mel"]
    assert bundle["image_size"] == 32
    assert bundle["temperature"] == res.temperature and bundle["threshold"] == res.threshold
    assert bundle["data_version"]["md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert bundle["data_version"]["path"] == (tmp_path / "prepared").as_posix()
    assert bundle["params"]["calibrate"]["target_recall"] == 0.95
    assert [m["name"] for m in bundle["members"]] == ["mobilenetv2", "custom_cnn"]
    for i, m in enumerate(bundle["members"]):
        copied = out / "bundle" / m["path"]
        assert copied.read_bytes() == bytes([i]) * 100  # the member model itself, copied
        assert len(m["md5"]) == 32
    assert sum(m["weight"] for m in bundle["members"]) == pytest.approx(1.0)

    card = (out / "model_card.md").read_text()
    assert card == (out / "bundle" / "model_card.md").read_text()
    for text in (
        "## Intended use",
        "## Data and split protocol",
        "## Known limits",
        "Medical disclaimer",
        "not a medical device",
        "0123456789abcdef0123456789abcdef.dir",
        "| localization | back |",
        f"T = {res.temperature:.3f}",
        f">= {res.threshold:.4f}",
        "| macro_auc |",
        f"Worst subgroup by malignant recall (among groups with >= 5 malignant test images): "
        f"**{res.metrics['worst_subgroup']}**",
        "fitted on validation log-loss only",
    ):
        assert text in card, text
    ens = json.loads((out / "ensemble.json").read_text())
    assert f"{ens['macro_auc']:.3f} ({ens['macro_auc_ci_low']:.3f} to {ens['macro_auc_ci_high']:.3f})" in card


def test_calibrate_failure_keeps_the_previous_bundle(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    _run_calibrate(tmp_path, out)
    before = (out / "bundle" / "bundle.json").read_text()
    (tmp_path / "models" / "custom_cnn" / "model.keras").unlink()
    p = _params()
    import dataclasses

    with pytest.raises(StageError, match=r"custom_cnn/model.keras: member model not found"):
        calibrate.run(
            p.calibrate,
            seed=1,
            ensemble_dir=out / "ensemble",
            ensemble_metrics_path=out / "ensemble.json",
            models_dir=tmp_path / "models",
            prepared_dir=tmp_path / "prepared",
            bundle_dir=out / "bundle",
            metrics_path=out / "calibration.json",
            plots_dir=out / "calibration_plots",
            card_path=out / "model_card.md",
            all_params=dataclasses.asdict(p),
            data_md5=None,
        )
    assert (out / "bundle" / "bundle.json").read_text() == before


def test_data_version_absent_lock(tmp_path):
    assert calibrate.data_version(tmp_path / "nope.lock", "data/prepared") is None


def test_calibrate_val_without_malignant_is_a_clear_error(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    val = read_predictions(out / "ensemble" / "val.csv")
    val = val[~val["dx"].isin(MALIGNANT)]
    write_predictions(val, out / "ensemble" / "val.csv")
    with pytest.raises(StageError, match="validation split has no malignant case"):
        _run_calibrate(tmp_path, out)


def test_log_loss_of_files_matches_metrics(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    m = json.loads((out / "ensemble.json").read_text())
    test = read_predictions(out / "ensemble" / "test.csv")
    assert m["log_loss"] == pytest.approx(log_loss(labels(test), probabilities(test)), abs=1e-5)


def test_calibrate_main_one_line_error_and_success(members, tmp_path, capsys):
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text("train: {backbones: [mobilenetv2, custom_cnn]}\ncalibrate: {bootstrap_samples: 20}\n")
    args = ["--params", str(params), "--ensemble", str(out / "ensemble"), "--ensemble-metrics",
            str(out / "ensemble.json"), "--models", str(_models(tmp_path / "models")), "--prepared",
            str(_prepared(tmp_path / "prepared")), "--lock", str(tmp_path / "none.lock"), "--bundle",
            str(out / "bundle"), "--metrics", str(out / "cal.json"), "--plots", str(out / "plots"),
            "--card", str(out / "card.md")]  # fmt: skip
    assert calibrate.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {out / 'ensemble' / 'val.csv'}: predictions not found; run the ensemble stage first"
    ]
    _run_ensemble(members, out)
    assert calibrate.main(args) == 0
    assert "the bundle's data version is unknown" in capsys.readouterr().err
    assert json.loads((out / "bundle" / "bundle.json").read_text())["data_version"]["md5"] is None
    assert set(json.loads((out / "cal.json").read_text())) >= {
        "threshold",
        "test_malignant_recall",
        "ece_after",
    }
