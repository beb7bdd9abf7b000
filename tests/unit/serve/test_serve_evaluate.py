"""``python -m serve.evaluate``: a bundle measured on a labelled folder, through the serving path.

Two tiny real bundles are built once per module the way ``calibrate`` lays them out (untrained
custom CNNs at 32 px: what is tested is what the command does with a model's answers): a fusion
bundle in format 2 with ``metadata`` and ``image_only`` operating points, and an image-only
bundle in format 1. The folders are real JPEGs and a HAM10000_metadata.csv in tmp_path.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serve import predict
from serve.evaluate import check_rows, main, report_params, run
from skinlesion.core.schema import CLASSES, HAM_COLUMNS
from skinlesion.measure.predictions import Served, served_report
from tests.builders.bundles import make_evaluate_bundle
from tests.builders.images import make_truncated
from tests.conftest import make_jpeg

BOOT = 40
# 24 images of 17 lesions, every class but df (so auc_df is undefined: null in the JSON); three
# rows with some metadata unknown (scored image-only in the metadata mode too).
ROWS = [
    # lesion, dx, age, sex, localization; images of one lesion follow each other
    ("L01", "nv", "45.0", "male", "back"), ("L01", "nv", "45.0", "male", "back"),
    ("L02", "nv", "30.0", "female", "trunk"), ("L03", "nv", "", "female", "trunk"),
    ("L04", "nv", "60.0", "unknown", "face"), ("L05", "nv", "50.0", "male", "unknown"),
    ("L06", "mel", "70.0", "male", "back"), ("L06", "mel", "70.0", "male", "back"),
    ("L07", "mel", "65.0", "female", "lower extremity"), ("L08", "mel", "55.0", "male", "face"),
    ("L09", "bcc", "75.0", "male", "face"), ("L09", "bcc", "75.0", "male", "face"),
    ("L10", "bcc", "80.0", "female", "neck"), ("L11", "akiec", "70.0", "male", "scalp"),
    ("L12", "akiec", "85.0", "female", "hand"), ("L13", "bkl", "60.0", "male", "back"),
    ("L13", "bkl", "60.0", "male", "back"), ("L14", "bkl", "40.0", "female", "chest"),
    ("L15", "vasc", "35.0", "female", "abdomen"), ("L15", "vasc", "35.0", "female", "abdomen"),
    ("L16", "nv", "25.0", "male", "upper extremity"), ("L16", "nv", "25.0", "male", "upper extremity"),
    ("L17", "bkl", "50.0", "female", "back"), ("L17", "bkl", "50.0", "female", "back"),
]  # fmt: skip


# --------------------------------------------------------------------------- makers


def write_folder(root: Path, rows=ROWS, *, sub: str = "HAM10000_images_part_1", extra=()) -> Path:
    """A labelled folder in HAM10000 layout: HAM10000_metadata.csv + ``sub/<image_id>.jpg``.

    ``extra``: raw metadata rows (dicts, image file written only when ``image`` is true)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(HAM_COLUMNS)
        for i, (lesion, dx, age, sex, loc) in enumerate(rows):
            image_id = f"ISIC_{i:07d}"
            w.writerow([lesion, image_id, dx, "histo", age, sex, loc])
            make_jpeg(root / sub / f"{image_id}.jpg", size=(60 + 4 * (i % 5), 45 + 3 * (i % 4)), seed=i)
        for r in extra:
            w.writerow([r.get(c, "") for c in HAM_COLUMNS])
            if r.get("image"):
                make_jpeg(root / sub / f"{r['image_id']}.jpg", size=(64, 48), seed=99)
    return root


@pytest.fixture(scope="module")
def fusion_bundle(tmp_path_factory) -> Path:
    return make_evaluate_bundle(tmp_path_factory.mktemp("fusion"), fusion=True)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> Path:
    return make_evaluate_bundle(tmp_path_factory.mktemp("image"), fusion=False, synthetic=True, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("labelled") / "ours")


# --------------------------------------------------------------------------- the row checks (pure)


def test_check_rows_names_each_bad_row_with_its_line_column_and_value():
    table = pd.DataFrame(
        [
            ["L1", "a", "nv", "histo", "40.0", "male", "back"],
            ["L2", "b", "nv", "histo", "40.0", "robot", "back"],
            ["L3", "c", "melanoma", "histo", "40.0", "male", "back"],
            ["L4", "d", "nv", "histo", "old", "male", "back"],
            ["", "e", "nv", "histo", "40.0", "male", "back"],
            ["L6", "f", "nv", "histo", "40.0", "male", "back"],
            ["L7", "g", "nv", "histo", "", "", ""],
            ["L8", "g", "mel", "histo", "", "", ""],
            ["L9", "h", "nv", "histo", "40.0", "female", "elbow"],
        ],
        columns=HAM_COLUMNS,
    )
    images = {k: Path(f"/x/{k}.jpg") for k in "abcdeg h".replace(" ", "")}
    good, metas, skipped = check_rows(
        table, list(range(2, 11)), images, table_name="meta.csv", folder="/x"
    )  # fmt: skip
    assert good == [0]
    assert metas[0][0] == 40.0
    got = {(s.image_id, s.line): s.reason for s in skipped}
    assert got == {
        ("b", 3): "sex 'robot' is not one of ['male', 'female', 'unknown']",
        ("c", 4): f"dx 'melanoma' is not one of {list(CLASSES)}",
        ("d", 5): "age 'old' is not a number (years, or empty when unknown)",
        ("e", 6): "empty lesion_id (the lesion-level metrics and the CIs group images by lesion)",
        ("f", 7): "no image file f.jpg (or .jpeg) below /x",
        ("g", 8): "image_id g is listed on lines 8, 9: its label is ambiguous, none is used",
        ("g", 9): "image_id g is listed on lines 8, 9: its label is ambiguous, none is used",
        ("h", 10): got[("h", 10)],
    }
    assert got[("h", 10)].startswith("localization 'elbow' is not one of ['abdomen', 'acral'")
    assert skipped[0].message() == (
        "skipped image_id b: meta.csv line 3: sex 'robot' is not one of ['male', 'female', 'unknown']"
    )


def test_report_params_take_the_bundles_evaluate_settings_and_the_bootstrap_option():
    ev, bins = report_params({"params": {"evaluate": {"ci_level": 0.9, "tta": True, "gone_key": 1},
                                         "calibrate": {"ece_bins": 10}}}, 7)  # fmt: skip
    assert (ev.ci_level, ev.bootstrap_samples, bins) == (0.9, 7, 10)
    ev, bins = report_params({}, None)
    assert (ev.ci_level, ev.bootstrap_samples, bins) == (0.95, 1000, 15)


# --------------------------------------------------------------------------- with real bundles


def _served_from_rows(rows: list[dict]) -> Served:
    """What serve.predict's JSON rows say, as the report builder takes it."""
    return Served(
        probs=np.array([[r[f"prob_{c}"] for c in CLASSES] for r in rows], dtype=np.float64),
        modes=np.array([r["mode"] for r in rows], dtype=object),
        score=np.array([r["malignant_prob"] for r in rows], dtype=np.float64),
        threshold=np.array([r["threshold"] for r in rows], dtype=np.float64),
        decisions=np.array([CLASSES.index(r["predicted"]) for r in rows], dtype=np.int64),
    )


def test_metrics_equal_served_report_of_serve_predicts_rows_in_both_modes(fusion_bundle, folder, tmp_path):
    result = run(folder, bundle=fusion_bundle, bootstrap=BOOT, progress=False, workers=1)
    assert list(result["modes"]) == ["metadata", "image_only"]
    assert result["n_images"] == len(ROWS) and result["n_skipped"] == 0

    meta = pd.read_csv(folder / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    paths = [str(folder / "HAM10000_images_part_1" / f"{i}.jpg") for i in meta["image_id"]]
    bundle_meta = json.loads((fusion_bundle / "bundle.json").read_text())
    params, bins = report_params(bundle_meta, BOOT)
    for mode, columns in (("metadata", ["age", "sex", "localization"]), ("image_only", [])):
        listing = tmp_path / f"{mode}.csv"
        meta.assign(path=paths)[["path", *columns]].to_csv(listing, index=False)
        out = tmp_path / f"{mode}.json"
        predict.run([str(listing)], bundle=fusion_bundle, out=out, progress=False, workers=1)
        rows = json.loads(out.read_text())["predictions"]
        assert [r["status"] for r in rows] == ["ok"] * len(ROWS)
        expected, _ = served_report(meta, _served_from_rows(rows), params, np.random.default_rng(0),
                                    ece_bins=bins)  # fmt: skip
        got = dict(result["modes"][mode])
        assert got.pop("threshold") == bundle_meta["operating_points"][mode]["threshold"]
        assert got == expected, mode
    md, io = result["modes"]["metadata"], result["modes"]["image_only"]
    # 3 of 24 rows lack a field: the rule scores them image-only in the metadata mode too
    assert md["share_metadata"] == pytest.approx(21 / 24, abs=1e-6) and io["share_metadata"] == 0.0
    assert md["n_lesions"] == io["n_lesions"] == 17 and md["test_n_malignant"] == 9
    assert md["lesion_test_n_malignant"] == 7
    for key in ("macro_auc", "lesion_macro_auc", "test_malignant_recall", "test_specificity",
                "referrals_per_100", "ece_after", "balanced_accuracy_decision"):  # fmt: skip
        assert key in md and key in io
    assert md["macro_auc_ci_low"] is not None and md["test_malignant_recall_ci_high"] is not None


def test_an_image_only_bundle_is_measured_image_only_and_a_synthetic_one_is_flagged(
    image_bundle, folder, tmp_path, capsys
):
    out = tmp_path / "m.json"
    rc = main([str(folder), "--bundle", str(image_bundle), "--out", str(out), "--bootstrap", "20",
               "--no-progress", "--plots", str(tmp_path / "plots")])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert list(doc["modes"]) == ["image_only"]
    assert doc["bundle"]["synthetic"] is True and doc["bundle"]["modes"] == ["image_only"]
    assert "image_only only: this bundle's members do not use metadata" in printed
    assert "!!! WARNING: this bundle was trained on SYNTHETIC demo data" in printed
    assert "not a medical device" in printed
    assert "2026-11-30T12:00:00Z, prepared data 01234567" in printed  # the bundle's label
    # first: what it was trained on (an older bundle: read from its params, and said so)
    assert printed.splitlines()[0].startswith(
        "# trained on synthetic demo data (not real dermoscopy) — do not use on real images (data version "
        "not recorded; read from the params"
    )
    assert "macro AUC [90% CI]" in printed  # the bundle's own CI level
    header = next(line for line in printed.splitlines() if line.strip().startswith("image_only"))
    assert "metadata" not in header
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion_image_only.png", "subgroups_image_only.csv"
    ]  # fmt: skip
    assert (tmp_path / "plots" / "confusion_image_only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_rows_and_files_are_named_the_rest_scored_in_both_modes_exit_1(fusion_bundle, tmp_path, capsys):
    root = write_folder(
        tmp_path / "batch",
        ROWS[:10],
        extra=[
            {"lesion_id": "L90", "image_id": "ISIC_robot", "dx": "nv", "age": "40", "sex": "robot",
             "localization": "back", "image": True},
            {"lesion_id": "L91", "image_id": "ISIC_nofile", "dx": "mel", "age": "40", "sex": "male",
             "localization": "back"},
            {"lesion_id": "L92", "image_id": "ISIC_cut", "dx": "bcc", "age": "40", "sex": "male",
             "localization": "back"},
        ],
    )  # fmt: skip
    make_truncated(root / "HAM10000_images_part_1" / "ISIC_cut.jpg", seed=7)
    (root / "HAM10000_images_part_1" / "ISIC_unlabelled.jpg").write_bytes(
        (root / "HAM10000_images_part_1" / "ISIC_0000000.jpg").read_bytes()
    )  # an image without a row: not scored, not an error
    out = tmp_path / "m.json"
    rc = main(
        [str(root), "--bundle", str(fusion_bundle), "--out", str(out), "--bootstrap", "0", "--no-progress"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    table = root / "HAM10000_metadata.csv"
    cut = root / "HAM10000_images_part_1" / "ISIC_cut.jpg"
    assert (f"skipped image_id ISIC_robot: {table} line 12: sex 'robot' is not one of "
            "['male', 'female', 'unknown']") in err  # fmt: skip
    assert (
        f"skipped image_id ISIC_nofile: {table} line 13: "
        f"no image file ISIC_nofile.jpg (or .jpeg) below {root}" in err
    )
    assert f"skipped image_id ISIC_cut: {cut}: truncated or damaged image file" in err
    doc = json.loads(out.read_text())
    assert doc["n_rows"] == 13 and doc["n_images"] == 10 and doc["n_skipped"] == 3
    by_id = {s["image_id"]: s for s in doc["skipped"]}
    assert by_id["ISIC_robot"] == {
        "image_id": "ISIC_robot", "file": str(table), "line": 12,
        "reason": "sex 'robot' is not one of ['male', 'female', 'unknown']",
    }  # fmt: skip
    assert by_id["ISIC_cut"]["file"] == str(cut) and by_id["ISIC_cut"]["line"] is None
    assert by_id["ISIC_cut"]["reason"].startswith("truncated or damaged image file")
    # both modes on the same 10 images
    assert doc["modes"]["metadata"]["n_images"] == doc["modes"]["image_only"]["n_images"] == 10
    assert doc["modes"]["metadata"]["macro_auc_ci_low"] is None  # --bootstrap 0: no CIs


def test_out_json_holds_the_bundle_the_folder_and_json_safe_metrics(fusion_bundle, folder, tmp_path):
    out = tmp_path / "deep" / "m.json"
    result = run(folder, bundle=fusion_bundle, out=out, bootstrap=10, progress=False, workers=1)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert set(doc) == {"bundle", "folder", "metadata_table", "n_rows", "n_images", "n_skipped", "skipped",
                        "ci_level", "bootstrap_samples", "seed", "modes"}  # fmt: skip
    assert doc["folder"] == str(folder) and doc["metadata_table"] == str(folder / "HAM10000_metadata.csv")
    assert (doc["n_rows"], doc["n_images"], doc["n_skipped"], doc["skipped"]) == (24, 24, 0, [])
    assert (doc["ci_level"], doc["bootstrap_samples"]) == (0.9, 10)
    b = doc["bundle"]
    assert b["path"] == str(fusion_bundle) and b["label"] == "2026-11-30T12:00:00Z, prepared data 01234567"
    assert b["trained_on"].startswith("trained on HAM10000 via local:somewhere (data version not recorded")
    assert b["thresholds"] == {"metadata": 0.22, "image_only": 0.3} and b["synthetic"] is False
    assert b["modes"] == list(doc["modes"]) == ["metadata", "image_only"] and "all known" in b["mode_rule"]
    for mode in ("metadata", "image_only"):
        m = doc["modes"][mode]
        assert m["auc_df"] is None and m["recall_df"] is None  # no df image: undefined, null
        assert m["n_images"] == 24 and m["lesion_n"] == 17
        assert m["threshold"] == b["thresholds"][mode]
    assert doc == json.loads(json.dumps(result))


def test_a_zip_of_the_folder_is_read_like_the_folder(image_bundle, folder, tmp_path):
    archive = tmp_path / "ours.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, Path("ours") / p.relative_to(folder))
    a = run(archive, bundle=image_bundle, bootstrap=0, progress=False, workers=1)
    b = run(folder, bundle=image_bundle, bootstrap=0, progress=False, workers=1)
    assert a["metadata_table"] == f"{archive}/ours/HAM10000_metadata.csv"
    assert a["modes"] == b["modes"] and a["n_images"] == 24


# --------------------------------------------------------------------------- output paths, bundle values


def test_a_bad_output_path_is_one_line_before_the_folder_or_the_bundle_is_read(tmp_path, capsys):
    folder, file, png = tmp_path / "a_folder", tmp_path / "file.txt", tmp_path / "plots.png"
    folder.mkdir()
    file.write_text("a regular file")
    png.write_bytes(b"\x89PNG not a folder")
    cases = [
        (["--out", str(folder)],
         f"--out {folder}: is a folder; give a file name (e.g. {folder / 'NAME'}.json)"),
        (["--out", str(file / "m.json")], f"--out {file / 'm.json'}: {file} is a file, not a folder"),
        (["--out", str(tmp_path / "m.csv")], f"--out {tmp_path / 'm.csv'}: use a .json file name"),
        (["--plots", str(png)], f"--plots {png}: a file is there; give a folder (a new or an existing one)"),
        (["--plots", str(file / "plots")], f"--plots {file / 'plots'}: {file} is a file, not a folder"),
    ]  # fmt: skip
    if os.geteuid() != 0:  # root ignores permission bits: the file.txt cases stand in for it
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        cases += [
            (
                ["--out", str(locked / "m.json")],
                f"--out {locked / 'm.json'}: folder {locked} is not writable",
            ),
            (["--plots", str(locked / "p")], f"--plots {locked / 'p'}: folder {locked} is not writable"),
        ]
    # neither the labelled folder nor the bundle exists: the output path is refused first
    for extra, message in cases:
        rc = main(
            [str(tmp_path / "no-folder"), "--bundle", str(tmp_path / "no-bundle"), *extra, "--no-progress"]
        )
        out, err = capsys.readouterr()
        assert rc == 1, extra
        assert [line for line in err.splitlines() if line.strip()] == [f"error: {message}"], extra
        assert out == ""


def test_an_existing_out_file_is_replaced_and_an_existing_plots_folder_is_added_to(
    image_bundle, folder, tmp_path
):
    out, plots = tmp_path / "m.json", tmp_path / "plots"
    out.write_text("last week's numbers\n")
    plots.mkdir()
    (plots / "notes.txt").write_text("kept")
    args = [str(folder), "--bundle", str(image_bundle), "--out", str(out), "--plots", str(plots)]
    assert main([*args, "--bootstrap", "0", "--no-progress"]) == 0
    assert json.loads(out.read_text())["n_images"] == 24
    assert sorted(p.name for p in plots.iterdir()) == [
        "confusion_image_only.png", "notes.txt", "subgroups_image_only.csv"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "literal", "message"),
    [
        ("threshold", "NaN", "image_only: 'threshold' must be a number in [0, 1], got nan"),
        ("threshold", "2.0", "image_only: 'threshold' must be a number in [0, 1], got 2.0"),
        ("temperature", "0", "image_only: 'temperature' must be a number in [0.001, 1000], got 0"),
        ("image_size", '"abc"', "'image_size' must be a whole number of pixels in 8..2048, got 'abc'"),
    ],
)
def test_a_bad_bundle_value_is_one_error_line_and_nothing_is_measured(
    image_bundle, folder, tmp_path, capsys, key, literal, message
):
    root = tmp_path / "bad"
    shutil.copytree(image_bundle, root)
    meta = json.loads((root / "bundle.json").read_text())
    meta[key] = "@@"
    (root / "bundle.json").write_text(json.dumps(meta).replace('"@@"', literal))
    out = tmp_path / "m.json"
    rc = main([str(folder), "--bundle", str(root), "--out", str(out), "--bootstrap", "0", "--no-progress"])
    printed, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {root / 'bundle.json'}: {message}"
    ]
    assert printed == "" and not out.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "error: {p}/nowhere: no such folder (give a labelled folder or .zip in "
         "HAM10000 layout: a metadata table and <image_id>.jpg files)"),
        (lambda p: make_jpeg(p / "imgs" / "a.jpg").parent,
         "error: {p}/imgs: no HAM10000 metadata table found (a .csv or .tab whose header has "
         "lesion_id,image_id,dx,...)"),
        (lambda p: write_folder(p / "bad", [("L1", "nv", "40.0", "robot", "back")]),
         "error: {p}/bad: no usable labelled image: all 1 metadata row(s) skipped, e.g. image_id "
         "ISIC_0000000: {p}/bad/HAM10000_metadata.csv line 2: sex 'robot' is not one of "
         "['male', 'female', 'unknown']"),
    ],
    ids=["missing-folder", "no-table", "nothing-usable"],
)  # fmt: skip
def test_an_unusable_folder_is_one_error_line_and_exit_1(image_bundle, tmp_path, capsys, make, message):
    target = make(tmp_path)
    rc = main([str(target), "--bundle", str(image_bundle), "--no-progress"])
    assert rc == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [message.format(p=tmp_path)]


def test_help_says_what_it_is_for(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "How does this model do on OUR images?" in text
    assert "--bootstrap N" in text and "not a medical device" in text
