# Long: one small world (members, predictions, a prepared folder) shared by the ensemble and calibrate tests.
"""The ensemble and calibrate stages on a small real world: members evaluated, mixed, calibrated.

A tiny prepared folder (``stages.prepare.run`` on flat-colour JPEGs) whose images carry a known
amount of signal: each image's colour is drawn around its class's mean colour, so a model that
reads the mean colour as a Gaussian classifier gives the true posterior, and one that multiplies
those logits by 3 is three times too confident. The members are such models, saved as real Keras
files (the fusion ones also read age, sex and site through the project's ``MetadataEncoding``);
their prediction files are written by the evaluate stage's own functions (``predict`` and
``predictions_frame``), so ``calibrate`` can score the test split with the bundle it writes and
report the served numbers on the same images the ensemble's files hold.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, HAM_COLUMNS, LOCALIZATIONS, MALIGNANT, SEXES
from skinlesion.measure.calibration import fit_calibration
from skinlesion.measure.metrics import log_loss, malignant_score, operating_point
from skinlesion.measure.predictions import (
    complete_metadata,
    labels,
    logit_columns,
    predictions_frame,
    probabilities,
    read_predictions,
    write_predictions,
)
from skinlesion.measure.scoring import IMAGE_ONLY, METADATA, MODE_RULE, MODES
from skinlesion.params.load import parse_params
from stages import calibrate, ensemble
from tests.conftest import make_jpeg

MAL_IDX = [CLASSES.index(c) for c in MALIGNANT]
SIZE = 16
# Per class, images in each split: val 280 and test 210 images (every class, ~43% malignant).
PER_CLASS = {"train": 2, "val": 40, "test": 30}
# Class mean colours (RGB in [0, 1]) on the corners of a cube, and the spread of an image's
# colour around its class's mean: neighbours are 1.7 spreads apart, so classes overlap.
MEANS = np.array([[0.3, 0.3, 0.3], [0.7, 0.3, 0.3], [0.3, 0.7, 0.3], [0.3, 0.3, 0.7],
                  [0.7, 0.7, 0.3], [0.7, 0.3, 0.7], [0.3, 0.7, 0.7]])  # fmt: skip
SPREAD = 0.12
N_META = 2 + len(SEXES) + len(LOCALIZATIONS)  # MetadataEncoding's width
# A fusion member's logit shift when the age is known (so only for rows scored with metadata):
# it leaves those rows miscalibrated in their own way, which only their operating point undoes.
AGE_KNOWN_SHIFT = np.array([0.0, 0.0, 0.0, 0.0, -1.0, 1.5, 0.0])


# --------------------------------------------------------------------------- the small world


def _write_raw(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``raw/metadata.csv`` + ``raw/images/*.jpg`` and ``split.csv``: lesions of 1-2 images;
    about a third of the images with some metadata unknown."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    rows, i = [], 0
    sites = [s for s in LOCALIZATIONS if s != "unknown"]
    for split, n in PER_CLASS.items():
        for c, dx in enumerate(CLASSES):
            for j in range(n):
                colour = np.clip(MEANS[c] + rng.normal(0, SPREAD, 3), 0, 1)
                image_id = f"ISIC_{i:07d}"
                make_jpeg(raw / "images" / f"{image_id}.jpg", size=(24, 18),
                          color=tuple(int(round(255 * v)) for v in colour))  # fmt: skip
                lesion = f"HAM_{split}{c}{j // 2:04d}"
                rows.append({
                    "lesion_id": lesion, "image_id": image_id, "group_id": lesion, "dx": dx,
                    "dx_type": "histo", "split": split,
                    "age": "" if i % 5 == 0 else f"{20 + (i * 7) % 65}.0",
                    "sex": "unknown" if i % 7 == 3 else SEXES[i % 2],
                    "localization": "unknown" if i % 9 == 4 else sites[i % len(sites)],
                })  # fmt: skip
                i += 1
    with open(raw / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HAM_COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(root / "split.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "lesion_id", "group_id", "dx", "split"],
                           lineterminator="\n", extrasaction="ignore")  # fmt: skip
        w.writeheader()
        w.writerows(rows)
    return raw, root / "split.csv"


def _colour_model(path: Path, *, over: float, channels: int = 3, fusion: bool = False) -> Path:
    """``uint8 image -> mean colour -> softmax``: the Gaussian classifier's logits x ``over``,
    reading only the first ``channels`` colours (a weaker member with fewer). With ``fusion``
    the metadata come in through ``MetadataEncoding`` and shift the logits when the age is known."""
    import keras

    from skinlesion.model.networks import MetadataEncoding

    mu = MEANS[:, :channels]
    kernel = np.zeros((3, len(CLASSES)))
    kernel[:channels] = over * mu.T / SPREAD**2
    bias = -over * (mu**2).sum(1) / (2 * SPREAD**2)
    image = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Rescaling(1 / 255.0)(image))
    inputs: object = image
    if fusion:
        age = keras.Input((), dtype="float32", name="age")
        sex = keras.Input((), dtype="int32", name="sex")
        loc = keras.Input((), dtype="int32", name="localization")
        x = keras.layers.Concatenate()([x, MetadataEncoding()([age, sex, loc])])
        inputs = {"image": image, "age": age, "sex": sex, "localization": loc}
        meta_kernel = np.zeros((N_META, len(CLASSES)))
        meta_kernel[1] = AGE_KNOWN_SHIFT  # the "age known" flag
        kernel = np.concatenate([kernel, meta_kernel])
    head = keras.layers.Dense(len(CLASSES), activation="softmax", name="probs")
    model = keras.Model(inputs, head(x))
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


@dataclasses.dataclass(frozen=True)
class World:
    prepared: Path
    models: dict[str, Path]  # kind ("plain" / "fusion") -> <models>/<name>/model.keras
    predictions: dict[str, Path]  # kind -> <predictions>/<name>/{val,test}[_image_only].csv


def _evaluate_members(models_dir: Path, prepared: Path, out: Path) -> Path:
    """Each member's prediction files as the evaluate stage writes them (its own functions)."""
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy
    from stages.evaluate import member_modes, predict, predictions_name

    for name in ("mobilenetv2", "custom_cnn"):
        model = load_model(models_dir / name / "model.keras")
        modes = member_modes(model)
        for split in ("val", "test"):
            arrays = read_split_numpy(prepared, split)
            meta = pd.read_csv(prepared / f"{split}.csv", dtype=str, keep_default_na=False)
            for mode in modes:
                probs, _ = predict(model, arrays, batch_size=64, tta=False, mode=mode)
                path = out / name / predictions_name(split, mode, modes)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_predictions(predictions_frame(meta, probs), path)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from stages import prepare

    root = tmp_path_factory.mktemp("world")
    raw, split_csv = _write_raw(root)
    p = parse_params({"prepare": {"image_size": SIZE, "workers": 1}}).prepare
    prepare.run(p, raw_dir=raw, split_csv=split_csv, out_dir=root / "prepared")
    models, predictions = {}, {}
    for kind, fusion in (("plain", False), ("fusion", True)):
        # the good member: every colour, 3x too confident; the weak one: red and green only
        _colour_model(root / kind / "models" / "mobilenetv2" / "model.keras", over=3.0, fusion=fusion)
        _colour_model(root / kind / "models" / "custom_cnn" / "model.keras", over=3.0, channels=2,
                      fusion=fusion)  # fmt: skip
        models[kind] = root / kind / "models"
        predictions[kind] = _evaluate_members(models[kind], root / "prepared", root / kind / "predictions")
    return World(root / "prepared", models, predictions)


@pytest.fixture
def members(world, tmp_path: Path) -> Path:
    """data/predictions with two members, a good one and a weak one (val 280, test 210 images)."""
    return Path(shutil.copytree(world.predictions["plain"], tmp_path / "predictions"))


@pytest.fixture
def fusion_members(world, tmp_path: Path) -> Path:
    """The same with fusion members: each evaluated with metadata and image-only."""
    return Path(shutil.copytree(world.predictions["fusion"], tmp_path / "predictions"))


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


def _models(world: World, root: Path, kind: str = "plain") -> Path:
    """The member models (a copy a test may damage)."""
    if not root.exists():
        shutil.copytree(world.models[kind], root)
    return root


def _run_calibrate(
    world: World, tmp: Path, out: Path, lock: Path | None = None, *, kind: str = "plain",
    served: Path | None = None, **sections,
) -> calibrate.CalibrateResult:  # fmt: skip
    p = _params(**sections)
    return calibrate.run(
        p.calibrate,
        seed=1,
        ensemble_dir=out / "ensemble",
        ensemble_metrics_path=out / "ensemble.json",
        models_dir=_models(world, tmp / f"models_{kind}", kind),
        prepared_dir=world.prepared,
        bundle_dir=out / "bundle",
        metrics_path=out / "calibration.json",
        plots_dir=out / "calibration_plots",
        card_path=out / "model_card.md",
        all_params=dataclasses.asdict(p),
        data_md5=calibrate.data_version(lock, "data/prepared") if lock else None,
        served_dir=served,
    )


def _point(bundle: dict, mode: str = IMAGE_ONLY) -> dict:
    return bundle["operating_points"][mode]


# ---------------------------------------------------------------- ensemble


def test_ensemble_fitted_weights_on_simplex_and_not_worse_than_equal(members, tmp_path):
    from skinlesion.measure.scoring import mix

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
        np.testing.assert_allclose(mix([probabilities(p) for p in parts], w), expected, atol=1e-12)
        assert ens["image_id"].tolist() == parts[0]["image_id"].tolist()
    weights = json.loads((out / "ensemble" / "weights.json").read_text())
    assert weights["members"] == ["mobilenetv2", "custom_cnn"]
    assert weights["modes"] == [IMAGE_ONLY]  # no fusion member: one mode, no _image_only files
    assert sorted(p.name for p in (out / "ensemble").iterdir()) == ["test.csv", "val.csv", "weights.json"]
    assert not any(k.endswith("_image_only") for k in m)


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
    first = df["image_id"].iloc[0]
    df.iloc[1:].to_csv(members / "custom_cnn" / "test.csv", index=False)
    with pytest.raises(
        StageError,
        match=rf"test \(image_only\): member 'custom_cnn' lacks {first} compared with 'mobilenetv2'",
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


def test_calibrate_meets_target_on_val_and_improves_nll(world, members, tmp_path):
    # one member, 3x over-confident: the temperature cools it, helping NLL and ECE on val, and on
    # test, where "after" is the written bundle's own answer for the same images
    single = tmp_path / "single"
    _run_ensemble(members, single, ensemble={"members": ["mobilenetv2"]})
    res = _run_calibrate(world, tmp_path, single)
    assert 2.0 < res.temperature < 4.5
    m = res.metrics
    assert m["val_nll_after"] < m["val_nll_before"] and m["nll_after"] < m["nll_before"]
    assert m["val_ece_after"] < m["val_ece_before"] and m["ece_after"] < m["ece_before"]

    out = tmp_path / "out"
    _run_ensemble(members, out)
    res = _run_calibrate(world, tmp_path, out)
    m = json.loads((out / "calibration.json").read_text())
    assert m["val_nll_after"] <= m["val_nll_before"]  # never worse on the data it was fitted on
    # the threshold reaches the target recall on val, recomputed here from the files
    val = read_predictions(out / "ensemble" / "val.csv")
    point = _point(json.loads((out / "bundle" / "bundle.json").read_text()))
    assert point["temperature"] == res.temperature and len(point["class_bias"]) == len(CLASSES)
    logits = val[[f"logit_{c}" for c in CLASSES]].to_numpy() / res.temperature + np.array(point["class_bias"])
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
    assert m["share_metadata"] == 0.0  # no fusion member: every test image served image-only
    # plots: reliability CSVs whose counts cover the test set, and a PNG
    rel = pd.read_csv(out / "calibration_plots" / "reliability" / "after.csv")
    assert len(rel) == 15 and rel["count"].sum() == 210
    assert (out / "calibration_plots" / "reliability.png").stat().st_size > 1000


def test_test_labels_never_fit_anything(world, members, tmp_path):
    """Poisoning the test labels changes the test metrics but not weights, T or threshold."""
    clean = tmp_path / "clean"
    r_ens = _run_ensemble(members, clean)
    r_cal = _run_calibrate(world, tmp_path, clean)

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
    p_cal = _run_calibrate(world, tmp_path, poisoned)

    assert p_ens.weights == r_ens.weights
    assert p_cal.temperature == r_cal.temperature
    assert p_cal.threshold == r_cal.threshold
    assert p_ens.metrics["macro_auc"] < r_ens.metrics["macro_auc"] - 0.1  # the poison did bite
    assert p_cal.metrics["test_malignant_recall"] != r_cal.metrics["test_malignant_recall"]
    assert p_cal.metrics["macro_auc"] < r_cal.metrics["macro_auc"] - 0.1  # the served report too


def test_lower_ci_bound_is_more_cautious(world, members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    point = _run_calibrate(world, tmp_path, out, calibrate={"target_recall": 0.9})
    low = _run_calibrate(world, tmp_path, out, calibrate={"target_recall": 0.9, "recall_bound": "lower_ci"})
    assert low.threshold <= point.threshold
    assert low.metrics["val_malignant_recall_bound"] >= 0.9 - 1e-9
    assert low.metrics["val_malignant_recall"] >= point.metrics["val_malignant_recall"]


def test_bundle_and_model_card(world, members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n    - path: data/prepared\n"
        "      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n      size: 10\n      nfiles: 2\n"
    )
    res = _run_calibrate(world, tmp_path, out, lock=lock)
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["classes"] == list(CLASSES) and bundle["malignant"] == ["akiec", "bcc", "mel"]
    assert bundle["image_size"] == SIZE
    assert bundle["format_version"] == 2 and list(bundle["operating_points"]) == [IMAGE_ONLY]
    point = _point(bundle)
    assert point["temperature"] == res.temperature and point["threshold"] == res.threshold
    assert point["decision"] == "balanced" and len(point["class_prior"]) == len(CLASSES)
    assert "temperature" not in bundle and "threshold" not in bundle  # one place for each number
    assert bundle["mode_rule"] == "image_only: the members do not use metadata"
    assert bundle["data_version"]["md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert bundle["data_version"]["path"] == world.prepared.as_posix()
    assert bundle["params"]["calibrate"]["target_recall"] == 0.95
    assert [m["name"] for m in bundle["members"]] == ["mobilenetv2", "custom_cnn"]
    for m in bundle["members"]:
        copied = out / "bundle" / m["path"]
        # the member model itself, copied
        assert copied.read_bytes() == (tmp_path / "models_plain" / m["name"] / "model.keras").read_bytes()
        assert len(m["md5"]) == 32
    assert sum(m["weight"] for m in bundle["members"]) == pytest.approx(1.0)
    metrics = json.loads((out / "calibration.json").read_text())
    assert bundle["metrics"] == metrics

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
        f"| image only | {res.temperature:.3f} |",
        f"| balanced | {res.threshold:.4f} |",
        "**image only** (the members do not use metadata)",
        "| macro AUC |",
        "| balanced accuracy of the bundle's decision |",
        f"Worst subgroup by malignant recall (among groups with >= 5 malignant test images): "
        f"**{res.metrics['worst_subgroup']}**",
        "fitted on validation log-loss only",
    ):
        assert text in card, text
    assert res.metrics["worst_subgroup"] != "none"
    # what the bundle was trained on comes first: download.source is synthetic by default
    assert bundle["training_data"] == {
        "source": "synthetic", "synthetic": True, "data_version": None, "extra_sources": [],
    }  # fmt: skip
    assert card.splitlines()[0] == (
        "# Model card: skin-lesion ensemble trained on synthetic demo data (not real dermoscopy) — do not "
        "use on real images (data version not recorded)"
    )
    assert "Synthetic images drawn by the project's demo generator" in card and "Tschandl" not in card
    # every test number in the card is the bundle's own (served), with its CI
    served_auc = (
        f"| macro AUC | {metrics['macro_auc']:.3f} ({metrics['macro_auc_ci_low']:.3f} to "
        f"{metrics['macro_auc_ci_high']:.3f}) |"
    )
    assert served_auc in card
    decision = f"| balanced accuracy of the bundle's decision | {metrics['balanced_accuracy_decision']:.3f} |"
    assert decision in card
    ens = json.loads((out / "ensemble.json").read_text())
    best = f"Best single member ({ens['best_member']}), uncalibrated, macro AUC "
    assert f"{best}{ens['best_member_macro_auc']:.3f}" in card


def test_calibrate_failure_keeps_the_previous_bundle(world, members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    _run_calibrate(world, tmp_path, out)
    before = (out / "bundle" / "bundle.json").read_text()
    (tmp_path / "models_plain" / "custom_cnn" / "model.keras").unlink()
    p = _params()

    with pytest.raises(StageError, match=r"custom_cnn/model.keras: member model not found"):
        calibrate.run(
            p.calibrate,
            seed=1,
            ensemble_dir=out / "ensemble",
            ensemble_metrics_path=out / "ensemble.json",
            models_dir=tmp_path / "models_plain",
            prepared_dir=world.prepared,
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


def test_calibrate_val_without_malignant_is_a_clear_error(world, members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    val = read_predictions(out / "ensemble" / "val.csv")
    val = val[~val["dx"].isin(MALIGNANT)]
    write_predictions(val, out / "ensemble" / "val.csv")
    with pytest.raises(StageError, match="validation split has no malignant case"):
        _run_calibrate(world, tmp_path, out)


def test_log_loss_of_files_matches_metrics(members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    m = json.loads((out / "ensemble.json").read_text())
    test = read_predictions(out / "ensemble" / "test.csv")
    assert m["log_loss"] == pytest.approx(log_loss(labels(test), probabilities(test)), abs=1e-5)


def test_calibrate_main_one_line_error_and_success(world, members, tmp_path, capsys):
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text("train: {backbones: [mobilenetv2, custom_cnn]}\ncalibrate: {bootstrap_samples: 20}\n")
    args = ["--params", str(params), "--ensemble", str(out / "ensemble"), "--ensemble-metrics",
            str(out / "ensemble.json"), "--models", str(_models(world, tmp_path / "models_plain")),
            "--prepared", str(world.prepared), "--lock", str(tmp_path / "none.lock"), "--bundle",
            str(out / "bundle"), "--metrics", str(out / "cal.json"), "--plots", str(out / "plots"),
            "--card", str(out / "card.md")]  # fmt: skip
    assert calibrate.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'ensemble' / 'weights.json'}: not found; run the ensemble stage first"]
    _run_ensemble(members, out)
    assert calibrate.main(args) == 0
    assert "the bundle's data version is unknown" in capsys.readouterr().err
    assert json.loads((out / "bundle" / "bundle.json").read_text())["data_version"]["md5"] is None
    assert set(json.loads((out / "cal.json").read_text())) >= {
        "threshold",
        "test_malignant_recall",
        "ece_after",
    }


def test_a_real_source_and_the_raw_data_version_are_recorded_and_open_the_card(
    world, members, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _run_ensemble(members, out)
    params = tmp_path / "params.yaml"
    params.write_text(
        "download: {source: 'local:../shared/data/ham10000', extra_sources: [../inbox/clinic_b]}\n"
        "train: {backbones: [mobilenetv2, custom_cnn]}\ncalibrate: {bootstrap_samples: 20}\n"
    )
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  download:\n    cmd: x\n    outs:\n    - path: data/raw\n"
        "      hash: md5\n      md5: d70be3bfadb2483d56766cffbe49fd5d.dir\n      size: 10\n      nfiles: 2\n"
    )
    monkeypatch.chdir(tmp_path)  # --raw data/raw is looked up in the lock as the stage wrote it
    args = ["--params", str(params), "--ensemble", str(out / "ensemble"), "--ensemble-metrics",
            str(out / "ensemble.json"), "--models", str(_models(world, tmp_path / "models_plain")),
            "--prepared", str(world.prepared), "--lock", str(lock), "--raw", "data/raw", "--bundle",
            str(out / "bundle"), "--metrics", str(out / "cal.json"), "--plots", str(out / "plots"),
            "--card", str(out / "card.md")]  # fmt: skip
    assert calibrate.main(args) == 0
    from skinlesion.model.bundle_json import read_bundle_json, trained_on

    bundle = read_bundle_json(out / "bundle")  # read back through the checks
    assert bundle["training_data"] == {
        "source": "local:../shared/data/ham10000", "synthetic": False,
        "data_version": "d70be3bfadb2483d56766cffbe49fd5d.dir", "extra_sources": ["../inbox/clinic_b"],
    }  # fmt: skip
    line = (
        "trained on HAM10000 via local:../shared/data/ham10000 (data d70be3bf; with labelled batches "
        "../inbox/clinic_b)"
    )
    assert trained_on(bundle) == line
    card = (out / "card.md").read_text()
    assert card.splitlines()[0] == f"# Model card: skin-lesion ensemble {line}"
    assert "synthetic" not in card.lower() and "HAM10000 (Tschandl et al., 2018)" in card
    assert (
        "raw data (source `local:../shared/data/ham10000`, its DVC hash): "
        "`d70be3bfadb2483d56766cffbe49fd5d.dir`" in card
    )


# ---------------------------------------------------------------- fusion: two input modes


def _fit(df: pd.DataFrame) -> dict:
    """The operating point calibrate fits on these validation rows (its own function)."""
    cal = fit_calibration(
        df[logit_columns()].to_numpy(dtype=np.float64), labels(df), df["lesion_id"].to_numpy(),
        _params().calibrate, np.random.default_rng(0),
    )  # fmt: skip
    return cal.point().to_json()


def _same_point(got: dict, want: dict) -> None:
    assert got["decision"] == want["decision"]
    for key in ("temperature", "threshold", "class_bias", "class_prior"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_fusion_members_give_two_operating_points_each_fitted_on_its_own_rows(
    world, fusion_members, tmp_path
):
    from skinlesion.measure.scoring import MetaArrays
    from skinlesion.model.bundle import Bundle
    from skinlesion.model.tfdata import read_split_numpy

    out = tmp_path / "out"
    _run_ensemble(fusion_members, out)
    assert json.loads((out / "ensemble" / "weights.json").read_text())["modes"] == [METADATA, IMAGE_ONLY]
    assert sorted(p.name for p in (out / "ensemble").iterdir()) == [
        "test.csv", "test_image_only.csv", "val.csv", "val_image_only.csv", "weights.json",
    ]  # fmt: skip
    ens = json.loads((out / "ensemble.json").read_text())
    assert {"macro_auc", "macro_auc_image_only", "best_member", "best_member_image_only"} <= set(ens)

    served = tmp_path / "served"
    res = _run_calibrate(world, tmp_path, out, kind="fusion", served=served)
    bundle = json.loads((out / "bundle" / "bundle.json").read_text())
    assert bundle["format_version"] == 2 and set(bundle["operating_points"]) == set(MODES)
    assert bundle["mode_rule"] == MODE_RULE
    meta_point, image_point = _point(bundle, METADATA), _point(bundle, IMAGE_ONLY)
    assert (res.temperature, res.threshold) == (meta_point["temperature"], meta_point["threshold"])

    # the metadata point: fitted on the validation rows with all three fields known, only those
    val = read_predictions(out / "ensemble" / "val.csv")
    complete = complete_metadata(val)
    assert 0.3 < complete.mean() < 0.9
    _same_point(meta_point, _fit(val[complete]))
    everything = _fit(val)
    assert (
        max(abs(a - b) for a, b in zip(everything["class_bias"], meta_point["class_bias"], strict=True))
        > 0.05
    )
    # the image-only point: every validation row, scored image-only
    _same_point(image_point, _fit(read_predictions(out / "ensemble" / "val_image_only.csv")))
    assert meta_point["temperature"] != image_point["temperature"]

    # calibration.json: the metadata mode unsuffixed, every key again with _image_only
    m = json.loads((out / "calibration.json").read_text())
    for key in ("threshold", "temperature", "test_malignant_recall", "test_specificity", "test_ppv",
                "referrals_per_100", "macro_auc", "balanced_accuracy", "ece_before", "ece_after",
                "share_metadata", "target_recall", "val_malignant_recall"):  # fmt: skip
        assert key in m and f"{key}_image_only" in m, key
    # (the metrics file keeps 6 decimals; the bundle keeps every digit)
    assert m["threshold"] == pytest.approx(meta_point["threshold"], abs=5e-7)
    assert m["threshold_image_only"] == pytest.approx(image_point["threshold"], abs=5e-7)
    assert m["temperature"] == pytest.approx(meta_point["temperature"], abs=5e-7)
    assert m["temperature_image_only"] == pytest.approx(image_point["temperature"], abs=5e-7)
    assert m["target_recall"] == 0.95
    test = read_predictions(out / "ensemble" / "test.csv")
    assert m["share_metadata"] == pytest.approx(complete_metadata(test).mean())
    assert m["share_metadata_image_only"] == 0.0
    assert bundle["metrics"] == m

    # the served files are the written bundle's answers for the test images, row by row in its mode
    arrays = read_split_numpy(world.prepared, "test")
    b = Bundle.load(out / "bundle")
    prob_cols = [f"prob_{c}" for c in CLASSES]
    for name, meta in (("test.csv", MetaArrays(arrays.age, arrays.sex, arrays.localization)),
                       ("test_image_only.csv", None)):  # fmt: skip
        s = b.score(arrays.images, meta)
        df = pd.read_csv(served / name, dtype={"image_id": str}, keep_default_na=False)
        assert df["image_id"].tolist() == arrays.image_ids.tolist()
        np.testing.assert_allclose(df[prob_cols].to_numpy(), s.probs, atol=1e-8)
        assert df["mode"].tolist() == s.modes.tolist()
        thresholds = [bundle["operating_points"][x]["threshold"] for x in s.modes]
        np.testing.assert_allclose(df["threshold"].to_numpy(dtype=float), thresholds, atol=1e-8)
        assert df["refer"].astype(str).tolist() == [str(v) for v in s.probs[:, MAL_IDX].sum(1) >= thresholds]
    modes = pd.read_csv(served / "test.csv", keep_default_na=False)["mode"].to_numpy()
    np.testing.assert_array_equal(modes == METADATA, complete_metadata(test))

    card = (out / "model_card.md").read_text()
    assert "| metric | with age, sex and site | image only |" in card
    assert f"| with age, sex and site | {meta_point['temperature']:.3f} |" in card
    assert f"| image only | {image_point['temperature']:.3f} |" in card
    for point in (meta_point, image_point):
        assert f"| {point['decision']} | {point['threshold']:.4f} |" in card


def test_a_metadata_point_needs_validation_rows_with_complete_metadata(world, fusion_members, tmp_path):
    out = tmp_path / "out"
    _run_ensemble(fusion_members, out)
    val = read_predictions(out / "ensemble" / "val.csv")
    write_predictions(val.assign(age=""), out / "ensemble" / "val.csv")
    with pytest.raises(StageError, match="no validation image has age, sex and localization all known"):
        _run_calibrate(world, tmp_path, out, kind="fusion")
    assert not (out / "bundle").exists()


def _member_probs(y: np.ndarray, skills: list[float], rng: np.random.Generator) -> np.ndarray:
    out = []
    for skill in skills:
        logits = rng.normal(0, 1, (len(y), 7))
        logits[np.arange(len(y)), y] += skill
        out.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    return np.stack(out)


def test_fitted_weights_fall_back_to_equal_when_val_cannot_tell_members_apart():
    """Two members of the same skill (independent noise): a fit would tilt by chance; the rule
    gives equal weights and says why. A clearly worse member is told apart and the fit runs."""
    from stages.ensemble import choose_weights

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 150)
    groups = np.arange(150) // 2
    same = choose_weights(
        "fitted", _member_probs(y, [1.5, 1.5], rng), y, groups, names=["a", "b"], rng=np.random.default_rng(1)
    )
    assert same.method == "equal (val cannot tell the members apart)"
    assert same.weights.tolist() == [0.5, 0.5]
    assert "val log-loss" in same.detail and "CI [" in same.detail
    apart = choose_weights(
        "fitted", _member_probs(y, [3.0, 0.0], rng), y, groups, names=["a", "b"], rng=np.random.default_rng(1)
    )
    assert apart.method == "fitted"
    assert apart.weights[0] > 0.8  # the skilled member carries the mix
    assert "val log-loss b - a +" in apart.detail
