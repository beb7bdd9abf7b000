"""The evaluate stage: real prepared shards (via the prepare stage) and a tiny saved Keras model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.params.load import parse_params
from stages import evaluate
from stages.evaluate import (
    age_band,
    confidence_picks,
    predictions_frame,
    read_predictions,
    subgroup_table,
    worst_subgroup,
)
from tests.conftest import write_raw

SIZE = 16


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "image_id": f"ISIC_{i:07d}",
                "lesion_id": f"HAM_{i // 2:07d}",  # two images per lesion, same split
                "dx": CLASSES[(i // 2) % len(CLASSES)],
                "age": "" if i % 10 == 9 else f"{25 + 5 * (i % 12)}.0",
                "sex": SEXES[(i // 2) % 2],
                "localization": LOCALIZATIONS[(i // 2) % 4],
                "split": ("train", "val", "test")[(i // 2) % 3],
            }
        )
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("eval")
    rows = _rows(84)  # 42 lesions, 14 per split, every class in every split
    raw = write_raw(root / "raw", rows, size=(40, 30))
    with open(root / "split.csv", "w", newline="") as fh:
        w = csv.DictWriter(
            fh, fieldnames=["image_id", "lesion_id", "group_id", "dx", "split"], lineterminator="\n"
        )
        w.writeheader()
        for r in rows:
            w.writerow(
                {"group_id": r["lesion_id"], **{k: r[k] for k in ("image_id", "lesion_id", "dx", "split")}}
            )
    params = parse_params({"prepare": {"image_size": SIZE, "workers": 1}}).prepare
    prepare(params, raw_dir=raw, split_csv=root / "split.csv", out_dir=root / "prepared")
    return root / "prepared"


def _tiny_model(path: Path, *, fusion: bool = False) -> Path:
    """Raw uint8 image -> softmax over 7 classes; with ``fusion`` it also takes the metadata."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    inputs = image
    if fusion:
        age = keras.Input((), dtype="float32", name="age")
        sex = keras.Input((), dtype="int32", name="sex")
        loc = keras.Input((), dtype="int32", name="localization")
        from skinlesion.model.networks import MetadataEncoding  # the project's layer: NaN age = unknown

        meta = MetadataEncoding()([age, sex, loc])
        x = keras.layers.Concatenate()([x, meta])
        inputs = {"image": image, "age": age, "sex": sex, "localization": loc}
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    path.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, out).save(path / "model.keras")
    return path


def _run(prepared: Path, tmp: Path, model_dir: Path, **evaluate_params) -> evaluate.EvaluateResult:
    p = parse_params({"evaluate": {"bootstrap_samples": 40, **evaluate_params}}).evaluate
    return evaluate.run(
        p,
        backbone="tiny",
        seed=3,
        model_dir=model_dir,
        prepared_dir=prepared,
        out_dir=tmp / "pred",
        metrics_path=tmp / "eval.json",
        plots_dir=tmp / "plots",
    )


def test_evaluate_writes_predictions_metrics_and_plots(prepared, tmp_path):
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    model_dir = _tiny_model(tmp_path / "model")
    res = _run(prepared, tmp_path, model_dir)
    assert (res.n_val, res.n_test) == (28, 28)

    # predictions: prepared order, the model's own probabilities, logits = log(prob)
    model = load_model(model_dir / "model.keras")
    for split in ("val", "test"):
        df = read_predictions(tmp_path / "pred" / f"{split}.csv")
        ref = pd.read_csv(prepared / f"{split}.csv", dtype=str, keep_default_na=False)
        assert df["image_id"].tolist() == ref["image_id"].tolist()
        assert (
            df["dx"].tolist() == ref["dx"].tolist() and df["lesion_id"].tolist() == ref["lesion_id"].tolist()
        )
        assert df["localization"].tolist() == ref["localization"].tolist()
        arr = read_split_numpy(prepared, split)
        expected = model.predict(arr.images, verbose=0)
        probs = df[[f"prob_{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        np.testing.assert_allclose(df[[f"logit_{c}" for c in CLASSES]].to_numpy(), np.log(probs), atol=1e-6)

    m = json.loads((tmp_path / "eval.json").read_text())
    keys = [
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "mel_recall",
        "malignant_auc",
        "malignant_pauc_tpr80",
    ] + [f"{k}_{c}" for k in ("precision", "recall", "f1", "auc") for c in CLASSES]
    for key in keys:
        assert key in m and f"{key}_ci_low" in m and f"{key}_ci_high" in m, key
        if m[key] is not None and m[f"{key}_ci_low"] is not None:
            assert m[f"{key}_ci_low"] - 1e-9 <= m[key] <= m[f"{key}_ci_high"] + 1e-9, key
    assert 0.0 <= m["malignant_pauc_tpr80"] <= 0.2
    # a member without fusion has one input mode: no _image_only files or keys
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["test.csv", "val.csv"]
    assert not any(k.endswith("_image_only") for k in m)
    assert m["n_images"] == 28 and m["n_lesions"] == 14
    assert {"val_macro_auc", "val_log_loss", "worst_subgroup", "worst_subgroup_malignant_recall"} <= set(m)

    plots = tmp_path / "plots"
    conf = pd.read_csv(plots / "confusion.csv")
    assert (
        len(conf) == 28
        and conf["actual"].tolist() == read_predictions(tmp_path / "pred" / "test.csv")["dx"].tolist()
    )
    for c in (*CLASSES, "malignant"):
        roc = pd.read_csv(plots / "roc" / f"{c}.csv")
        assert list(roc.columns) == ["fpr", "tpr"] and roc.iloc[0].tolist() == [0.0, 0.0]
        assert roc.iloc[-1].tolist() == [1.0, 1.0] and roc["fpr"].is_monotonic_increasing
        assert list(pd.read_csv(plots / "pr" / f"{c}.csv").columns) == ["recall", "precision"]
    sub = pd.read_csv(plots / "subgroups.csv")
    for attr in ("localization", "sex", "age_band"):
        assert sub.loc[sub["attribute"] == attr, "n_images"].sum() == 28
    for png in ("confusion_normalized.png", "confidence_grid.png"):
        with Image.open(plots / png) as im:
            assert im.size[0] > 300 and im.size[1] > 300

    # same seed, same CIs: the bootstrap is seeded
    m1 = json.loads((tmp_path / "eval.json").read_text())
    _run(prepared, tmp_path, model_dir)
    assert json.loads((tmp_path / "eval.json").read_text()) == m1


def test_tta_averages_the_four_flips(prepared, tmp_path):
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    model_dir = _tiny_model(tmp_path / "model")
    _run(prepared, tmp_path, model_dir, tta=True, bootstrap_samples=0)
    model = load_model(model_dir / "model.keras")
    x = read_split_numpy(prepared, "test").images
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    expected = np.mean([model.predict(np.ascontiguousarray(v), verbose=0) for v in views], axis=0)
    got = read_predictions(tmp_path / "pred" / "test.csv")[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, model.predict(x, verbose=0), atol=1e-4)  # the flips did something


def test_fusion_model_gets_the_metadata(prepared, tmp_path):
    from skinlesion.measure.predictions import complete_metadata
    from skinlesion.measure.scoring import MetaArrays, model_inputs
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    model_dir = _tiny_model(tmp_path / "model", fusion=True)
    res = _run(prepared, tmp_path, model_dir, bootstrap_samples=0)
    assert res.n_test == 28
    m = json.loads((tmp_path / "eval.json").read_text())
    assert m["macro_auc_ci_low"] is None  # no bootstrap asked for: no CI, not a fake one
    # both input modes: the metadata one unsuffixed, the image-only one in its own files and keys
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "test.csv", "test_image_only.csv", "val.csv", "val_image_only.csv",
    ]  # fmt: skip
    assert {"macro_auc", "macro_auc_image_only", "worst_subgroup_image_only"} <= set(m)
    assert res.metrics["macro_auc_image_only"] == m["macro_auc_image_only"]

    model = load_model(model_dir / "model.keras")
    probs = [f"prob_{c}" for c in CLASSES]
    for split in ("val", "test"):
        arr = read_split_numpy(prepared, split)
        with_meta = read_predictions(tmp_path / "pred" / f"{split}.csv")
        image_only = read_predictions(tmp_path / "pred" / f"{split}_image_only.csv")
        assert with_meta["image_id"].tolist() == image_only["image_id"].tolist() == arr.image_ids.tolist()
        complete = complete_metadata(with_meta)
        assert 0 < complete.sum() < len(complete)  # both kinds of rows in the split
        meta = MetaArrays(arr.age, arr.sex, arr.localization)
        fed = model.predict(model_inputs(arr.images, meta, True), verbose=0)
        unknown = model.predict(model_inputs(arr.images, None, True), verbose=0)
        # a row with all its metadata is scored with it; any other row as image-only (as serve does)
        np.testing.assert_allclose(with_meta[probs].to_numpy()[complete], fed[complete], atol=1e-6)
        np.testing.assert_allclose(with_meta[probs].to_numpy()[~complete], unknown[~complete], atol=1e-6)
        np.testing.assert_allclose(image_only[probs].to_numpy(), unknown, atol=1e-6)
        assert not np.allclose(fed[complete], unknown[complete], atol=1e-4)  # the metadata mattered


def test_predict_says_which_mode_each_row_used(prepared, tmp_path):
    from skinlesion.measure.scoring import IMAGE_ONLY, METADATA
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    arr = read_split_numpy(prepared, "test")
    complete = np.isfinite(arr.age)  # sex and site are always known in this set
    assert 0 < complete.sum() < len(complete)
    fusion = load_model(_tiny_model(tmp_path / "fusion", fusion=True) / "model.keras")
    probs, modes = evaluate.predict(fusion, arr, batch_size=5, tta=False, mode=METADATA)
    assert probs.shape == (28, 7) and modes.tolist() == np.where(complete, METADATA, IMAGE_ONLY).tolist()
    alone, alone_modes = evaluate.predict(fusion, arr, batch_size=64, tta=False, mode=IMAGE_ONLY)
    assert alone_modes.tolist() == [IMAGE_ONLY] * 28
    np.testing.assert_allclose(probs[~complete], alone[~complete], atol=1e-6)
    assert evaluate.member_modes(fusion) == (METADATA, IMAGE_ONLY)
    # a member without fusion has one mode: metadata asked for or not, the same image-only answer
    plain = load_model(_tiny_model(tmp_path / "plain") / "model.keras")
    assert evaluate.member_modes(plain) == (IMAGE_ONLY,)
    p_meta, m_meta = evaluate.predict(plain, arr, batch_size=64, tta=False, mode=METADATA)
    p_img, _ = evaluate.predict(plain, arr, batch_size=64, tta=False, mode=IMAGE_ONLY)
    assert m_meta.tolist() == [IMAGE_ONLY] * 28
    np.testing.assert_array_equal(p_meta, p_img)


def test_missing_model_and_bad_backbone_are_one_line_errors(prepared, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train: {backbones: [custom_cnn]}\nensemble: {members: [custom_cnn]}\n")
    common = [
        "--params",
        str(params),
        "--prepared",
        str(prepared),
        "--out",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--plots",
        str(tmp_path / "p"),
    ]
    rc = evaluate.main([*common, "--backbone", "custom_cnn", "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [
        f"error: {tmp_path / 'nomodel' / 'model.keras'}: not found; "
        "run the train stage for 'custom_cnn' first"
    ]
    rc = evaluate.main([*common, "--backbone", "resnet50", "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["error: --backbone 'resnet50' is not in train.backbones ['custom_cnn']"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()


def test_non_softmax_model_is_refused(prepared, tmp_path):
    import keras

    image = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1.0)(image))
    (tmp_path / "m").mkdir()
    keras.Model(image, keras.layers.Dense(7)(x)).save(tmp_path / "m" / "model.keras")  # no softmax
    with pytest.raises(StageError, match="not a probability distribution .* must end in a softmax"):
        _run(prepared, tmp_path, tmp_path / "m")


# ---------------------------------------------------------------- pure helpers


def test_age_bands():
    ages = pd.Series(["5.0", "29.9", "30.0", "44", "45", "75.0", "", "85"])
    assert age_band(ages, (30, 45, 60, 75)).tolist() == [
        "<30",
        "<30",
        "30-44",
        "30-44",
        "45-59",
        "75+",
        "unknown",
        "75+",
    ]


def test_subgroup_table_and_worst_subgroup_by_hand():
    # face: 2 malignant (mel caught, bcc missed) ; back: 3 malignant, all caught ; nv cases benign
    meta = pd.DataFrame(
        {
            "image_id": [f"I{i}" for i in range(7)],
            "lesion_id": ["L0", "L1", "L2", "L3", "L3", "L4", "L5"],
            "dx": ["mel", "bcc", "nv", "mel", "mel", "akiec", "nv"],
            "age": ["50", "50", "20", "70", "70", "", "80"],
            "sex": ["male", "male", "female", "female", "female", "male", ""],
            "localization": ["face", "face", "face", "back", "back", "back", "back"],
        }
    )
    pred = ["mel", "nv", "nv", "mel", "bcc", "akiec", "mel"]
    probs = np.eye(7)[[CLASSES.index(p) for p in pred]] * 0.9 + 0.1 / 7
    df = predictions_frame(meta, probs)
    t = subgroup_table(df, probs, (30, 60))
    face = t[(t.attribute == "localization") & (t.group == "face")].iloc[0]
    assert (face.n_images, face.n_lesions, face.n_malignant, face.malignant_recall) == (3, 3, 2, 0.5)
    assert face.recall_mel == 1.0 and face.recall_bcc == 0.0 and np.isnan(face.recall_df)
    back = t[(t.attribute == "localization") & (t.group == "back")].iloc[0]
    assert (back.n_images, back.n_lesions, back.n_malignant, back.malignant_recall) == (4, 3, 3, 1.0)
    assert back.recall_mel == 0.5  # the second mel image went to bcc: malignant, but not mel
    assert set(t[t.attribute == "sex"].group) == {"male", "female", "unknown"}
    assert t[t.attribute == "age_band"].group.tolist() == ["<30", "30-59", "60+", "unknown"]  # age order
    assert worst_subgroup(t, 2) == {
        "worst_subgroup": "localization=face",
        "worst_subgroup_malignant_recall": 0.5,
        "worst_subgroup_n_malignant": 2,
    }
    assert worst_subgroup(t, 10)["worst_subgroup"] == "none"
    # with the calibrate stage's threshold flags instead of the top-1 decision
    flags = np.array([True, True, False, False, False, False, False])
    t2 = subgroup_table(df, probs, (30, 60), malignant_flag=flags)
    assert t2[(t2.attribute == "localization") & (t2.group == "back")].malignant_recall.iloc[0] == 0.0


def test_confidence_picks_best_median_worst():
    y = np.array([0, 0, 0, 1])
    probs = np.zeros((4, 7))
    probs[:, 0] = [0.2, 0.9, 0.5, 0.0]
    probs[3, 1] = 0.7
    picks = confidence_picks(y, probs, 7)
    assert picks[0] == [1, 2, 0] and picks[1] == [3, 3, 3] and picks[2] == [None, None, None]


def test_read_predictions_names_file_row_and_column(tmp_path):
    meta = pd.DataFrame(
        {
            "image_id": ["a", "b"],
            "lesion_id": ["x", "y"],
            "dx": ["nv", "mel"],
            "age": ["", "1"],
            "sex": ["male", "male"],
            "localization": ["back", "back"],
        }
    )
    df = predictions_frame(meta, np.full((2, 7), 1 / 7))
    path = tmp_path / "p.csv"
    df.assign(dx=["nv", "melanoma"]).to_csv(path, index=False)
    with pytest.raises(StageError, match=r"p.csv: row 3: dx 'melanoma' is not one of"):
        read_predictions(path)
    df.assign(prob_nv=[0.1, "oops"]).to_csv(path, index=False)
    with pytest.raises(StageError, match=r"p.csv: row 3: column prob_nv holds 'oops', not a finite number"):
        read_predictions(path)
    df.drop(columns=["logit_vasc"]).to_csv(path, index=False)
    with pytest.raises(StageError, match=r"p.csv: missing column\(s\) \['logit_vasc'\]"):
        read_predictions(path)


def test_lesion_level_aggregation_averages_a_lesions_images():
    from skinlesion.measure.predictions import lesion_metrics, lesion_probabilities

    # lesion A: two images, one confidently wrong (class 1), one mildly right (class 0);
    # the mean still says class 1 (0.45 vs 0.55). Lesion B: a single image, right.
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    keys, mean, label = lesion_probabilities(["A", "A", "B"], probs, np.array([0, 0, 1]))
    assert keys.tolist() == ["A", "B"]
    np.testing.assert_allclose(mean, [[0.45, 0.55], [0.3, 0.7]])
    assert label.tolist() == [0, 1]
    # The same through the metrics, with the 7 classes: nv (5) and mel (4) take the 2 columns.
    p7 = np.zeros((3, 7))
    p7[:, [5, 4]] = probs
    m = lesion_metrics(np.array([5, 5, 4]), p7, ["A", "A", "B"], 0, np.random.default_rng(0))
    assert m["lesion_n"] == 2 and m["lesion_accuracy"] == 0.5 and m["lesion_mel_recall"] == 1.0
