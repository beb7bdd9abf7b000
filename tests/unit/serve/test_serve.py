# Long: every test shares one module-scoped bundle and predictor (built once: TensorFlow is slow).
"""The predictor and the prediction CLI: probabilities, determinism, error rows, outputs, risk, Grad-CAM.

Most tests run one small bundle, built once per module the way ``calibrate`` lays it out (an
untrained custom CNN at 32 px: these tests are about what serving does with a model's output,
not about how good the model is). The real-data tests run the real command on the 124 HAM10000
originals in ../shared and skip when they are absent.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.predict import collect, main, run
from serve.predictor import DECISION_NOTES, DEFAULT_RISK, RISK_NOTE, Predictor, RiskLevels, default_bundle
from skinlesion.core.errors import StageError
from skinlesion.core.schema import CLASSES, LOCALIZATIONS, SEXES
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    MODE_RULE,
    UNKNOWN_LOCALIZATION,
    UNKNOWN_SEX,
    MetaArrays,
)
from tests.builders.bundles import DEMO_DATA, SIZE, with_training_data, write_bundle
from tests.builders.images import make_bomb, make_truncated
from tests.conftest import make_jpeg

REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- fixtures and makers


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two good JPEGs, a truncated JPEG, a text file named .jpg and a decompression bomb."""
    folder = tmp_path / "images"
    make_jpeg(folder / "a_good.jpg", size=(200, 150), seed=1)
    make_jpeg(folder / "b_good.jpg", size=(120, 90), seed=2)
    make_truncated(folder / "c_truncated.jpg")
    (folder / "d_notes.jpg").write_text("these are my notes, not a photograph\n")
    make_bomb(folder / "e_bomb.png")
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- without a model


class FakeBundle:
    """What :class:`Predictor` uses of a bundle (image-only, threshold 0.4); probabilities chosen
    per image by its first pixel."""

    classes = list(CLASSES)
    meta = {"created": "2026-01-02T03:04:05Z", "data_version": {"md5": "feedbeef" * 4}, "params": {}}
    modes = (IMAGE_ONLY,)
    image_size = 8
    aspect = "crop"
    root = Path("/nonexistent")

    def __init__(self, table: dict[int, list[float]], prior: list[float] | None = None):
        self.table, self.prior = table, prior
        self.calls: list[int] = []

    def threshold(self, mode: str = IMAGE_ONLY) -> float:
        return {IMAGE_ONLY: 0.4}[mode]

    def decide(self, probs, modes=None):
        from skinlesion.measure.metrics import balanced_decision

        return balanced_decision(probs, self.prior)

    def row_modes(self, n, meta):
        from skinlesion.measure.scoring import row_modes

        return row_modes(meta, n, self.modes)

    def score(self, images, meta=None):
        from skinlesion.model.bundle import Scored

        self.calls.append(len(images))
        probs = np.array([self.table[int(im[0, 0, 0])] for im in images])
        return Scored(probs, self.row_modes(len(images), meta), np.zeros((len(images), 2)))

    def malignant_score(self, probs):
        from skinlesion.measure.metrics import malignant_score

        return malignant_score(probs, self.classes)


REAL_DATA = {
    "source": "local:../shared/data/ham10000", "synthetic": False, "data_version": "89abcdef" * 4 + ".dir",
    "extra_sources": [],
}  # fmt: skip


def _probs(**kw: float) -> list[float]:
    rest = (1.0 - sum(kw.values())) / (len(CLASSES) - len(kw))
    return [kw.get(c, rest) for c in CLASSES]


def test_risk_levels_default_custom_and_bad_specs():
    default = RiskLevels.parse(DEFAULT_RISK, CLASSES)
    assert [default.level(c) for c in CLASSES] == ["Moderate", "High", "Low", "Low", "High", "Low", "Low"]
    custom = RiskLevels.parse("nv=Check, vasc=Urgent, *=Routine", CLASSES)
    assert (custom.level("nv"), custom.level("vasc"), custom.level("mel")) == ("Check", "Urgent", "Routine")
    with pytest.raises(StageError, match=r"--risk: unknown class 'melanoma'; the bundle's classes are"):
        RiskLevels.parse("melanoma=High", CLASSES)
    with pytest.raises(StageError, match=r"--risk: 'mel' is not CLASS=LEVEL"):
        RiskLevels.parse("mel", CLASSES)


def test_top3_malignant_refer_and_risk_from_the_probabilities():
    fake = FakeBundle({
        1: _probs(mel=0.25, nv=0.55, bcc=0.08),  # the other four get 0.03 each
        2: _probs(akiec=0.55, bcc=0.05, mel=0.05),
        3: _probs(bcc=0.40, nv=0.35),
    })  # fmt: skip
    p = Predictor(fake)
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (1, 2, 3)])
    probs, modes = p.probabilities(images)
    assert modes.tolist() == [IMAGE_ONLY] * 3
    first, second, third = (p.read(str(i), row) for i, row in enumerate(probs))
    assert [c for c, _ in first.top] == ["nv", "mel", "bcc"]
    assert [v for _, v in first.top] == pytest.approx([0.55, 0.25, 0.08])
    assert first.malignant_prob == pytest.approx(0.25 + 0.08 + 0.03)
    assert (first.risk, first.refer) == ("Low", False)
    # the top class decides the risk level; the malignant flag is read separately
    assert (second.risk, second.refer) == ("Moderate", True)
    assert (third.risk, third.refer) == ("High", True)
    assert [first.predicted, second.predicted, third.predicted] == ["nv", "akiec", "bcc"]
    assert {(x.mode, x.threshold) for x in (first, second, third)} == {(IMAGE_ONLY, 0.4)}


def test_a_balanced_decision_picks_the_class_against_its_prior_and_the_risk_follows_the_referral():
    # calibrated probabilities follow the population (nv 55%); against the priors the melanoma
    # score stands out: 0.25 / 0.10 > 0.55 / 0.70
    prior = [0.03, 0.05, 0.11, 0.02, 0.10, 0.67, 0.02]
    fake = FakeBundle({1: _probs(mel=0.25, nv=0.55, bcc=0.08)}, prior=prior)
    p = Predictor(fake)
    (pred,) = (p.read("x", row) for row in p.probabilities(np.full((1, 8, 8, 3), 1, np.uint8))[0])
    assert pred.top[0][0] == "nv"  # the probabilities are reported as calibrated
    assert pred.predicted == "mel"
    # P(malignant) 0.36 < 0.4: not referred, so the badge is a benign class's level, not mel's High
    assert (pred.refer, pred.risk, pred.risk_class) == (False, "Low", "nv")
    row = pred.as_row(CLASSES, {})
    assert row["predicted"] == "mel" and row["top1"] == "nv" and row["risk_class"] == "nv"
    assert (row["mode"], row["threshold"], row["refer"]) == (IMAGE_ONLY, 0.4, False)  # 0.36 < 0.4


@pytest.mark.parametrize(
    ("probs", "prior", "want"),
    [
        # (refer, predicted, risk, risk_class)
        (_probs(nv=0.50, mel=0.30, bcc=0.10), None, (True, "nv", "High", "mel")),  # refer beside nv: not Low
        (_probs(nv=0.50, akiec=0.35, bcc=0.02), None, (True, "nv", "Moderate", "akiec")),
        (_probs(bcc=0.40, mel=0.30), None, (True, "bcc", "High", "bcc")),  # the decision is malignant
        (_probs(nv=0.80, bkl=0.10), None, (False, "nv", "Low", "nv")),
        (
            _probs(vasc=0.30, nv=0.50),
            [0.03, 0.05, 0.11, 0.02, 0.11, 0.67, 0.01],
            (False, "vasc", "Low", "vasc"),
        ),
    ],
)
def test_the_risk_level_is_read_on_the_side_of_the_referral(probs, prior, want):
    p = Predictor(FakeBundle({1: probs}, prior=prior))
    (pred,) = (p.read("x", row) for row in p.probabilities(np.full((1, 8, 8, 3), 1, np.uint8))[0])
    assert (pred.refer, pred.predicted, pred.risk, pred.risk_class) == want
    # the default levels: "Low" never beside refer, "High"/"Moderate" never without it
    assert (pred.risk != "Low") == pred.refer


def test_refer_is_at_or_above_the_threshold():
    fake = FakeBundle({1: _probs(mel=0.2, bcc=0.1, akiec=0.1), 2: _probs(mel=0.2, bcc=0.1, akiec=0.0999)})
    p = Predictor(fake)
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (1, 2)])
    at, below = (p.read("x", row) for row in p.probabilities(images)[0])
    assert at.malignant_prob == pytest.approx(0.4) and at.refer
    assert not below.refer


def test_a_model_output_that_is_not_finite_is_an_error_row_never_a_prediction():
    from serve.decode import Decoded
    from serve.predictor import NOT_FINITE

    fake = FakeBundle({1: _probs(nv=0.9), 2: [float("nan")] * len(CLASSES)})
    p = Predictor(fake)
    decoded = [Decoded(np.full((8, 8, 3), v, np.uint8), None) for v in (1, 2)]
    good, bad = p.predict_decoded(["good.jpg", "bad.jpg"], decoded)
    assert good.ok and good.predicted == "nv"
    assert not bad.ok and bad.error == NOT_FINITE and bad.as_row(CLASSES, {})["status"] == "error"


def test_identical_inputs_are_computed_once_and_get_identical_numbers():
    fake = FakeBundle({1: _probs(nv=0.9), 2: _probs(bkl=0.6)})
    p = Predictor(fake)
    one, two = np.full((8, 8, 3), 1, np.uint8), np.full((8, 8, 3), 2, np.uint8)
    first, _ = p.probabilities(np.stack([one, two, one]))
    again, _ = p.probabilities(np.stack([two, one]))
    assert fake.calls == [2]  # the repeat within the batch and the later batch reused the result
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_array_equal(again[1], first[0])
    p0 = Predictor(FakeBundle({1: _probs(nv=0.9)}), cache_size=0)
    p0.probabilities(one[None])
    p0.probabilities(one[None])
    assert p0.bundle.calls == [1, 1]


def test_an_image_only_row_is_one_model_input_whatever_metadata_came_with_it():
    # an image-only row is fed every field unknown: with metadata given or not, the model input is
    # the same, so it is computed once (and gets the same numbers in any later batch)
    fake = FakeBundle({1: _probs(nv=0.9)})
    p = Predictor(fake)
    one = np.full((1, 8, 8, 3), 1, np.uint8)
    male, back = SEXES.index("male"), LOCALIZATIONS.index("back")
    first, _ = p.probabilities(one)
    for meta in (MetaArrays.unknown(1), MetaArrays.of([(45.0, male, back)])):  # no metadata mode here
        again, modes = p.probabilities(one, meta)
        assert modes.tolist() == [IMAGE_ONLY]
        np.testing.assert_array_equal(again, first)
    assert fake.calls == [1]
    # a bundle with a metadata mode: complete metadata is another model input, partial is not
    fused = FakeBundle({1: _probs(nv=0.9)})
    fused.modes = (METADATA, IMAGE_ONLY)
    p = Predictor(fused)
    p.probabilities(one)
    p.probabilities(one, MetaArrays.of([(45.0, male, back)]))
    p.probabilities(one, MetaArrays.of([(45.0, UNKNOWN_SEX, back)]))
    assert fused.calls == [1, 1]


def test_version_names_training_data_creation_time_and_data_version():
    v = Predictor(FakeBundle({})).version
    assert v["created"] == "2026-01-02T03:04:05Z" and v["data_version"] == "feedbeef" * 4
    # a bundle older than its training_data record, and no params to read it from: said so
    assert v["label"] == "2026-01-02T03:04:05Z, prepared data feedbeef"
    assert v["trained_on"].startswith("training data: unknown (a bundle older than its training_data record")
    assert v["synthetic"] is None and v["training_data"] is None
    fake = FakeBundle({})
    fake.meta = {**fake.meta, "training_data": DEMO_DATA}
    v = Predictor(fake).version
    assert v["trained_on"] == (
        "trained on synthetic demo data (not real dermoscopy) — do not use on real images (data d70be3bf)"
    )
    assert v["synthetic"] is True and v["training_data"] == DEMO_DATA
    assert v["label"] == "2026-01-02T03:04:05Z, data d70be3bf"  # the raw data's version, once recorded


def test_default_bundle_prefers_production(tmp_path):
    (tmp_path / "models" / "ensemble").mkdir(parents=True)
    assert default_bundle(tmp_path) == tmp_path / "models" / "ensemble"
    (tmp_path / "models" / "production").mkdir()
    assert default_bundle(tmp_path) == tmp_path / "models" / "ensemble"  # no bundle.json yet
    (tmp_path / "models" / "production" / "bundle.json").write_text("{}")
    assert default_bundle(tmp_path) == tmp_path / "models" / "production"


def test_collect_folders_csv_and_missing_paths(tmp_path):
    make_jpeg(tmp_path / "f" / "x.jpg")
    make_jpeg(tmp_path / "f" / "sub" / "y.png")
    (tmp_path / "f" / "readme.txt").write_text("not listed: not an image suffix")
    (tmp_path / "empty").mkdir()
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,label\nf/x.jpg,nv\n{tmp_path / 'f' / 'sub' / 'y.png'},mel\n,bkl\n")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("image_id\nISIC_1\n")
    items = collect([str(tmp_path / "f"), str(lst), str(tmp_path / "empty"), "nope.jpg", str(bad_csv)])
    names = [n for n, _, _ in items]
    assert names[:2] == [str(tmp_path / "f" / "sub" / "y.png"), str(tmp_path / "f" / "x.jpg")]
    assert items[2] == ("f/x.jpg", str(tmp_path / "f" / "x.jpg"), None)  # relative to the CSV's folder
    assert items[4][2] == "line 4: empty 'path'"
    assert items[5][2].startswith("no image files (.jpg .jpeg .png")
    assert items[6] == ("nope.jpg", "nope.jpg", None)  # its "file not found" comes when decoded
    assert items[7][2] == "no 'path' column (columns: ['image_id'])"


# --------------------------------------------------------------------------- with a real bundle


def test_probabilities_are_the_bundles_and_sum_to_one(predictor, tmp_path):
    from skinlesion.core.images import load_image

    paths = [make_jpeg(tmp_path / f"{i}.jpg", size=(90, 60), seed=i) for i in range(5)]
    pixels = np.stack([load_image(p, SIZE, "crop") for p in paths])
    probs, modes = Predictor(predictor.bundle, cache_size=0).probabilities(pixels)
    _emb, direct = predictor.bundle.predict(pixels)
    np.testing.assert_array_equal(probs, direct)  # the recipe is the bundle's own, not a copy
    assert modes.tolist() == [IMAGE_ONLY] * 5
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_cli_error_rows_name_each_bad_file_and_the_exit_code_is_1(bundle_dir, mixed_folder, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    args = [str(mixed_folder), str(tmp_path / "missing.jpg"), "--bundle", str(bundle_dir), "--out", str(out)]
    rc = main([*args, "--no-progress"])
    assert rc == 1
    printed = capsys.readouterr().out.splitlines()
    rows = _rows(out)
    by_name = {Path(r["image"]).name: r for r in rows}
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error", "error", "error"]
    assert by_name["c_truncated.jpg"]["error"].startswith(
        "truncated or damaged image file (image file is truncated"
    )
    assert by_name["d_notes.jpg"]["error"] == "cannot identify image file: not an image Pillow can read"
    assert by_name["e_bomb.png"]["error"] == (
        "30000x30000 pixels is over the limit of 100,000,000 (decompression-bomb guard)"
    )
    assert by_name["missing.jpg"]["error"] == "file not found"
    for name in ("c_truncated.jpg", "d_notes.jpg", "e_bomb.png", "missing.jpg"):
        line = next(x for x in printed if Path(x.split("\t")[0]).name == name)
        assert line.split("\t")[1] == "ERROR" and line.split("\t")[2] == by_name[name]["error"]
    for r in rows[:2]:
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1.0) < 1e-6
        assert float(r["malignant_prob"]) == pytest.approx(
            sum(float(r[f"prob_{c}"]) for c in ("akiec", "bcc", "mel"))
        )
        assert r["refer"] == str(float(r["malignant_prob"]) >= float(r["threshold"]))
        assert r["top1"] == max(CLASSES, key=lambda c: float(r[f"prob_{c}"]))
        assert r["bundle_created"] == "2026-11-30T12:00:00Z"
        assert r["bundle_data_version"] == "0123456789abcdef0123456789abcdef"


def test_cli_exit_0_and_json_output_when_all_are_good(bundle_dir, tmp_path, capsys):
    for i in range(3):
        make_jpeg(tmp_path / "in" / f"{i}.jpg", size=(64, 48), seed=i)
    out = tmp_path / "pred.json"
    assert main([str(tmp_path / "in"), "--bundle", str(bundle_dir), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["bundle"]["created"] == "2026-11-30T12:00:00Z"
    assert doc["bundle"]["thresholds"] == {IMAGE_ONLY: 0.3}
    assert doc["bundle"]["modes"] == [IMAGE_ONLY]
    assert "not a medical device" in doc["bundle"]["disclaimer"]
    assert len(doc["predictions"]) == 3
    for row in doc["predictions"]:
        assert row["status"] == "ok" and row["error"] == ""
        assert abs(sum(row[f"prob_{c}"] for c in CLASSES) - 1.0) < 1e-6
        assert row["risk"] in ("High", "Moderate", "Low")
        assert (row["mode"], row["threshold"]) == (IMAGE_ONLY, 0.3)
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert len(lines) == 3 and all("refer=" in x and "malignant=" in x for x in lines)


def test_same_image_twice_gives_identical_numbers_across_batches_and_runs(bundle_dir, tmp_path):
    img = make_jpeg(tmp_path / "lesion.jpg", size=(300, 200), seed=7)
    others = [str(make_jpeg(tmp_path / f"o{i}.jpg", size=(80, 60), seed=20 + i)) for i in range(4)]
    paths = [str(img), *others, str(img)]  # batch size 4: the two copies run in batches of 4 and 2
    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}.csv"
        run(paths, bundle=bundle_dir, out=out, batch_size=4, progress=False)
        outs.append(_rows(out))
    first, last = outs[0][0], outs[0][-1]
    numbers = [k for k in first if k.startswith("prob_") or k in ("malignant_prob", "top1_prob")]
    assert [first[k] for k in numbers] == [last[k] for k in numbers]
    assert outs[0] == outs[1]  # a second run prints the same digits


def test_custom_risk_mapping_on_the_command_line(bundle_dir, tmp_path):
    make_jpeg(tmp_path / "a.jpg", seed=3)
    out = tmp_path / "p.csv"
    run([str(tmp_path / "a.jpg")], bundle=bundle_dir, out=out, risk="*=Review", progress=False)
    assert _rows(out)[0]["risk"] == "Review"
    with pytest.raises(StageError, match="unknown class 'melanoma'"):
        run([str(tmp_path / "a.jpg")], bundle=bundle_dir, risk="melanoma=High", progress=False)


def test_a_demo_bundle_says_so_on_the_first_line_and_help_explains_the_columns(bundle_dir, tmp_path, capsys):
    demo = with_training_data(bundle_dir, tmp_path / "demo", DEMO_DATA)
    make_jpeg(tmp_path / "a.jpg", seed=3)
    out = tmp_path / "p.csv"
    assert main([str(tmp_path / "a.jpg"), "--bundle", str(demo), "--out", str(out), "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "# trained on synthetic demo data (not real dermoscopy) — do not use on real images (data d70be3bf)"
    )
    (row,) = _rows(out)
    assert row["risk_class"] in CLASSES and (row["risk"] == "Low") == (row["refer"] == "False")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "decision (predicted in --out files) = the bundle's class decision" in text
    assert (
        "so a rare class (vasc, df) can be predicted while a common one (nv) is the most probable (top1)"
        in text
    )
    assert "(so it never reads Low beside refer)" in text


def test_bad_arguments_are_one_line_errors(bundle_dir, tmp_path, capsys):
    make_jpeg(tmp_path / "a.jpg")
    assert main([str(tmp_path / "a.jpg"), "--bundle", str(bundle_dir), "--out", str(tmp_path / "x.txt")]) == 1
    assert "error: --out" in capsys.readouterr().err
    assert main([str(tmp_path / "a.jpg"), "--bundle", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'nowhere'}: no such folder (give a model bundle folder, e.g. models/ensemble)"
    )
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "a.jpg"), "--bundle", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'empty' / 'bundle.json'}: not found; {tmp_path / 'empty'} is not a model "
        "bundle (the calibrate stage writes one: `dvc repro calibrate`)"
    )


# --------------------------------------------------------------------------- output paths, bundle values


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _unwritable_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """``(arguments, the error line)`` for outputs that cannot be written, made at test time."""
    folder, file, png = tmp_path / "a_folder", tmp_path / "file.txt", tmp_path / "cams.png"
    folder.mkdir()
    file.write_text("a regular file")
    png.write_bytes(b"\x89PNG not a folder")
    txt = tmp_path / "rows.txt"
    cases = [
        (["--out", str(folder)],
         f"--out {folder}: is a folder; give a file name (e.g. {folder / 'NAME'}.csv)"),
        (["--out", str(file / "out.csv")], f"--out {file / 'out.csv'}: {file} is a file, not a folder"),
        (["--out", str(txt)], f"--out {txt}: use a .csv or .json file name"),
        (["--explain", str(png)],
         f"--explain {png}: a file is there; give a folder (a new or an existing one)"),
        (["--explain", str(file / "cams")], f"--explain {file / 'cams'}: {file} is a file, not a folder"),
    ]  # fmt: skip
    if os.geteuid() != 0:  # root ignores permission bits: the file.txt cases above stand in for it
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out, cams = locked / "out.csv", locked / "cams"
        cases += [
            (["--out", str(out)], f"--out {out}: folder {locked} is not writable"),
            (["--explain", str(cams)], f"--explain {cams}: folder {locked} is not writable"),
        ]
    return cases


def test_a_bad_output_path_is_one_line_before_the_bundle_or_the_inputs_are_read(tmp_path, capsys):
    # --bundle names no folder and the image does not exist: the output path error still comes
    # first, so nothing was loaded or predicted before it
    for extra, message in _unwritable_cases(tmp_path):
        rc = main(
            [str(tmp_path / "nowhere.jpg"), "--bundle", str(tmp_path / "no-bundle"), *extra, "--no-progress"]
        )
        out, err = capsys.readouterr()
        assert rc == 1, extra
        assert _error_lines(err) == [f"error: {message}"], extra
        assert out == ""  # no header, no row
    assert sorted(p.name for p in (tmp_path / "a_folder").iterdir()) == []


def test_output_checks_do_not_import_tensorflow(tmp_path):
    # the real command in a fresh interpreter: the refusal comes before TensorFlow is imported
    (tmp_path / "a_folder").mkdir()
    code = (
        "import sys; from serve.predict import main; "
        f"rc = main([{str(tmp_path / 'x.jpg')!r}, '--out', {str(tmp_path / 'a_folder')!r}]); "
        "print('tensorflow' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout.strip() == "False", proc.stderr
    folder = tmp_path / "a_folder"
    assert _error_lines(proc.stderr) == [
        f"error: --out {folder}: is a folder; give a file name (e.g. {folder / 'NAME'}.csv)"
    ]


def test_an_existing_out_file_is_replaced_an_existing_explain_folder_added_to_new_ones_made(
    bundle_dir, tmp_path
):
    make_jpeg(tmp_path / "a.jpg", size=(80, 60), seed=5)
    out, cams = tmp_path / "p.csv", tmp_path / "cams"
    out.write_text("yesterday's rows\n")
    cams.mkdir()
    (cams / "notes.txt").write_text("kept")
    args = [str(tmp_path / "a.jpg"), "--bundle", str(bundle_dir), "--out", str(out), "--explain", str(cams)]
    assert main([*args, "--no-progress"]) == 0
    rows = _rows(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert sorted(p.name for p in cams.iterdir()) == ["a.gradcam.png", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.csv.tmp")] == []
    # folders that do not exist yet are created (in a writable folder)
    out, cams = tmp_path / "new" / "deeper" / "p.json", tmp_path / "new" / "cams"
    args = [str(tmp_path / "a.jpg"), "--bundle", str(bundle_dir), "--out", str(out), "--explain", str(cams)]
    assert main([*args, "--no-progress"]) == 0
    assert len(json.loads(out.read_text())["predictions"]) == 1 and len(list(cams.iterdir())) == 1


T = "image_only: 'temperature' must be a number in [0.001, 1000], got "


def _bad_copy(bundle_dir: Path, root: Path, key: str, literal: str, member: bool = False) -> Path:
    """A copy of the (format-1) test bundle whose bundle.json has ``key`` written as ``literal``."""
    shutil.copytree(bundle_dir, root)
    meta = json.loads((root / "bundle.json").read_text())
    (meta["members"][0] if member else meta)[key] = "@@"
    (root / "bundle.json").write_text(json.dumps(meta).replace('"@@"', literal))
    return root


@pytest.mark.parametrize(
    ("key", "literal", "member", "message"),
    [
        ("threshold", "NaN", False, "image_only: 'threshold' must be a number in [0, 1], got nan"),
        ("threshold", "2.0", False, "image_only: 'threshold' must be a number in [0, 1], got 2.0"),
        ("threshold", "-1", False, "image_only: 'threshold' must be a number in [0, 1], got -1"),
        ("threshold", '"abc"', False, "image_only: 'threshold' must be a number in [0, 1], got 'abc'"),
        ("temperature", "0", False, T + "0"),
        ("temperature", "-1.5", False, T + "-1.5"),
        ("temperature", "Infinity", False, T + "inf"),
        ("weight", '"abc"', True, "member 'custom_cnn' 'weight' must be a finite number >= 0, got 'abc'"),
        ("weight", "NaN", True, "member 'custom_cnn' 'weight' must be a finite number >= 0, got nan"),
        ("weight", "0", True, "member 'weight's must have a positive sum, got 0"),
        ("image_size", '"abc"', False, "'image_size' must be a whole number of pixels in 8..2048, got 'abc'"),
        ("image_size", "-1", False, "'image_size' must be a whole number of pixels in 8..2048, got -1"),
    ],
)  # fmt: skip
def test_a_bad_bundle_value_is_one_error_line_and_nothing_is_predicted(
    bundle_dir, tmp_path, capsys, key, literal, member, message
):
    root = _bad_copy(bundle_dir, tmp_path / "bad", key, literal, member)
    make_jpeg(tmp_path / "a.jpg", seed=2)
    out = tmp_path / "p.csv"
    rc = main([str(tmp_path / "a.jpg"), "--bundle", str(root), "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 1  # never exit 0 with nobody referred, never NaN probabilities marked ok
    assert _error_lines(err) == [f"error: {root / 'bundle.json'}: {message}"]
    assert stdout == "" and not out.exists()


def test_explain_writes_one_overlay_per_image_with_unique_names(bundle_dir, tmp_path):
    from PIL import Image

    make_jpeg(tmp_path / "a" / "lesion.jpg", size=(200, 150), seed=1)
    make_jpeg(tmp_path / "b" / "lesion.jpg", size=(200, 150), seed=2)
    out = tmp_path / "p.csv"
    run([str(tmp_path / "a"), str(tmp_path / "b")], bundle=bundle_dir, out=out, explain=tmp_path / "cams",
        progress=False)  # fmt: skip
    rows = _rows(out)
    names = sorted(Path(r["gradcam"]).name for r in rows)
    assert names == ["lesion-2.gradcam.png", "lesion.gradcam.png"]
    with Image.open(rows[0]["gradcam"]) as im:
        assert im.size == (512, 256) and im.mode == "RGB"


def test_decode_workers_give_the_same_rows_as_one_process(predictor, mixed_folder):
    for i in range(8):
        make_jpeg(mixed_folder / f"z{i}.jpg", size=(90, 70), seed=40 + i)
    items = collect([str(mixed_folder)])
    runs = [
        [x.as_row(predictor.classes, predictor.version)
         for x in predictor.predict_paths(items, batch_size=4, workers=workers, progress=False)]
        for workers in (1, 2)
    ]  # fmt: skip
    assert [r["image"] for r in runs[0]] == [r["image"] for r in runs[1]]
    assert [r["error"] for r in runs[0]] == [r["error"] for r in runs[1]]
    assert sum(r["status"] == "ok" for r in runs[0]) == 10
    for a, b in zip(*runs, strict=True):
        assert [a[f"prob_{c}"] for c in CLASSES] == [b[f"prob_{c}"] for c in CLASSES]


# --------------------------------------------------------------------------- input modes (metadata)


@pytest.fixture(scope="module")
def fusion_dir(tmp_path_factory) -> Path:
    """A format-2 bundle with a member that takes the metadata, and both operating points
    (metadata: threshold 0.2, argmax; image_only: threshold 0.35, balanced)."""
    return write_bundle(
        tmp_path_factory.mktemp("fusion"), fusion=True, size=SIZE, seed=2, training_data=REAL_DATA
    )


def _meta_csv(tmp_path: Path) -> Path:
    folder = tmp_path / "batch"
    for i, name in enumerate("abcd"):
        make_jpeg(folder / f"{name}.jpg", size=(90, 60), seed=10 + i)
    path = folder / "list.csv"
    path.write_text(
        "path,age,sex,localization\n"
        "a.jpg,45,male,back\n"  # line 2: all known -> metadata
        "b.jpg,,female,face\n"  # line 3: age unknown -> image_only
        "c.jpg,50,robot,back\n"  # line 4: not a sex -> an error row
        "d.jpg,60,Female,unknown\n"  # line 5: site unknown -> image_only
        "a.jpg,,,\n"  # line 6: the first image again, nothing known -> image_only
    )
    return path


BAD_SEX = "sex 'robot' is not one of ['male', 'female', 'unknown']"


def test_collect_reads_the_metadata_columns_and_names_a_bad_value(tmp_path):
    path = _meta_csv(tmp_path)
    folder = path.parent
    items = collect([str(path)])
    male, female, unk_sex = SEXES.index("male"), SEXES.index("female"), SEXES.index("unknown")
    assert items[0] == ("a.jpg", str(folder / "a.jpg"), None, (45.0, male, LOCALIZATIONS.index("back")))
    assert items[1][:3] == ("b.jpg", str(folder / "b.jpg"), None) and np.isnan(items[1][3][0])
    assert items[1][3][1:] == (female, LOCALIZATIONS.index("face"))
    assert items[2] == ("c.jpg", str(folder / "c.jpg"), f"{path} line 4: {BAD_SEX}")
    assert items[3][3] == (60.0, female, UNKNOWN_LOCALIZATION)
    assert np.isnan(items[4][3][0]) and items[4][3][1:] == (unk_sex, UNKNOWN_LOCALIZATION)
    # a CSV with only some of the columns: the others are unknown
    ages = tmp_path / "ages.csv"
    ages.write_text("path,age\nbatch/a.jpg,45\nbatch/b.jpg,200\n")
    got = collect([str(ages)])
    assert got[0][3] == (45.0, unk_sex, UNKNOWN_LOCALIZATION)
    assert got[1][2] == f"{ages} line 3: age '200' is outside 0..120 years"


def _probs_of(row: dict) -> list[float]:
    return [float(row[f"prob_{c}"]) for c in CLASSES]


def test_cli_scores_each_csv_row_in_its_mode_and_a_bad_value_is_that_rows_error(fusion_dir, tmp_path, capsys):
    path = _meta_csv(tmp_path)
    plain = path.parent / "a.jpg"  # the first image once more, as a plain path: no metadata at all
    out = tmp_path / "pred.csv"
    rc = main([str(path), str(plain), "--bundle", str(fusion_dir), "--out", str(out), "--no-progress"])
    assert rc == 1  # one row failed, the others were predicted
    printed = capsys.readouterr().out.splitlines()
    header = [x for x in printed if x.startswith("#")]
    assert header[0] == "# trained on HAM10000 via local:../shared/data/ham10000 (data 89abcdef)"
    assert header[1].startswith(f"# bundle {fusion_dir} (2026-11-30T12:00:00Z, data 89abcdef); ")
    assert "refer when malignant >= 0.200 (metadata), 0.350 (image_only). " in header[1]
    assert header[2] == f"# modes: {MODE_RULE}"
    # the columns explained where they are read: a decision that is not top-1 is no mystery
    assert header[3] == f"# risk = {RISK_NOTE}; decision = {DECISION_NOTES['balanced']}"
    assert header[4] == "# image\trisk\trefer\tmalignant/threshold\tdecision\ttop-3\tmode\tbundle"

    rows = _rows(out)
    assert [r["image"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "a.jpg", str(plain)]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert [r["mode"] for r in rows] == [METADATA, IMAGE_ONLY, "", IMAGE_ONLY, IMAGE_ONLY, IMAGE_ONLY]
    assert rows[2]["error"] == f"{path} line 4: {BAD_SEX}" and rows[2]["threshold"] == ""
    thresholds = {METADATA: 0.2, IMAGE_ONLY: 0.35}
    for r in (x for x in rows if x["status"] == "ok"):
        assert float(r["threshold"]) == thresholds[r["mode"]]
        assert r["refer"] == str(float(r["malignant_prob"]) >= float(r["threshold"]))
        assert abs(sum(_probs_of(r)) - 1.0) < 1e-6
    # one image: with all its metadata one answer; with none of it (or none given) the image-only one
    assert _probs_of(rows[4]) == _probs_of(rows[5])
    assert _probs_of(rows[0]) != _probs_of(rows[4])

    lines = [x.split("\t") for x in printed if not x.startswith("#")]
    assert ["c.jpg", "ERROR", f"{path} line 4: {BAD_SEX}"] in lines
    ok = [x for x in lines if x[1] != "ERROR"]
    assert [x[6] for x in ok] == [METADATA, IMAGE_ONLY, IMAGE_ONLY, IMAGE_ONLY, IMAGE_ONLY]
    assert ok[0][3].endswith("/0.200") and ok[1][3].endswith("/0.350")
    assert [x[4] for x in ok] == [f"decision={r['predicted']}" for r in rows if r["status"] == "ok"]

    doc_path = tmp_path / "pred.json"
    assert main([str(path), "--bundle", str(fusion_dir), "--out", str(doc_path), "--no-progress"]) == 1
    doc = json.loads(doc_path.read_text())
    assert doc["bundle"]["trained_on"] == header[0][2:] and doc["bundle"]["training_data"] == REAL_DATA
    assert doc["bundle"]["columns"]["predicted"] == DECISION_NOTES["balanced"]
    assert doc["bundle"]["modes"] == [METADATA, IMAGE_ONLY]
    assert doc["bundle"]["thresholds"] == thresholds and doc["bundle"]["mode_rule"] == MODE_RULE
    assert [r["mode"] for r in doc["predictions"]] == [METADATA, IMAGE_ONLY, "", IMAGE_ONLY, IMAGE_ONLY]
    assert doc["predictions"][2]["threshold"] is None and doc["predictions"][0]["threshold"] == 0.2


def test_cli_says_a_bundle_without_fusion_does_not_use_metadata(bundle_dir, tmp_path, capsys):
    path = _meta_csv(tmp_path)
    path.write_text("path,age,sex,localization\na.jpg,45,male,back\nb.jpg,,female,face\n")
    out = tmp_path / "pred.json"
    assert main([str(path), "--bundle", str(bundle_dir), "--out", str(out), "--no-progress"]) == 0
    header = [x for x in capsys.readouterr().out.splitlines() if x.startswith("#")]
    assert header[0].startswith("# training data: unknown (a bundle older than its training_data record")
    assert "refer when malignant >= 0.300 (image_only). " in header[1]
    assert header[2] == (
        "# mode: image_only (this bundle's members do not use metadata; age/sex/site are ignored)"
    )
    # an argmax bundle: the decision is the top class
    assert header[3] == f"# risk = {RISK_NOTE}; decision = {DECISION_NOTES['argmax']}"
    doc = json.loads(out.read_text())
    assert doc["bundle"]["modes"] == [IMAGE_ONLY] and doc["bundle"]["thresholds"] == {IMAGE_ONLY: 0.3}
    assert doc["bundle"]["mode_rule"] == "image_only: this bundle does not use metadata"
    assert [(r["status"], r["mode"], r["threshold"]) for r in doc["predictions"]] == [
        ("ok", IMAGE_ONLY, 0.3), ("ok", IMAGE_ONLY, 0.3),
    ]  # fmt: skip


def test_the_same_image_with_other_metadata_is_another_model_input(fusion_dir):
    p = Predictor.load(fusion_dir)
    assert p.modes == (METADATA, IMAGE_ONLY) and p.thresholds == {METADATA: 0.2, IMAGE_ONLY: 0.35}
    img = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    male, back = SEXES.index("male"), LOCALIZATIONS.index("back")
    meta = MetaArrays.of([(45.0, male, back), (np.nan, UNKNOWN_SEX, UNKNOWN_LOCALIZATION),
                          (45.0, male, back), (45.0, UNKNOWN_SEX, back), (70.0, male, back)])  # fmt: skip
    probs, modes = p.probabilities(np.repeat(img, 5, axis=0), meta)
    assert modes.tolist() == [METADATA, IMAGE_ONLY, METADATA, IMAGE_ONLY, METADATA]
    np.testing.assert_array_equal(probs[0], probs[2])
    np.testing.assert_array_equal(probs[1], probs[3])  # partly known: scored as image-only
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[0], probs[4])  # another age
    again, again_modes = p.probabilities(img)  # no metadata at all: the image-only answer
    np.testing.assert_array_equal(again[0], probs[1])
    assert again_modes.tolist() == [IMAGE_ONLY]
    preds = [p.read(str(i), row, str(m)) for i, (row, m) in enumerate(zip(probs, modes, strict=True))]
    assert [(x.mode, x.threshold) for x in preds[:2]] == [(METADATA, 0.2), (IMAGE_ONLY, 0.35)]
    assert all(x.refer == (x.malignant_prob >= x.threshold) for x in preds)
    rows = [x.as_row(p.classes, p.version) for x in preds[:2]]
    assert [(r["mode"], r["threshold"]) for r in rows] == [(METADATA, 0.2), (IMAGE_ONLY, 0.35)]


# --------------------------------------------------------------------------- Grad-CAM


def _known_model():
    """uint8 image -> preprocess -> nested backbone (8x8 average pooling: a 4x4x3 map) -> gap ->
    softmax whose class-0 logit is 8 x the mean red: Grad-CAM for class 0 must light up the red."""
    import keras
    from keras import layers

    from skinlesion.model.networks import Preprocess

    inp = keras.Input((SIZE, SIZE, 3), name="backbone_input")
    backbone = keras.Model(inp, layers.AveragePooling2D(8)(inp), name="backbone")
    image = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = backbone(Preprocess("unit", name="preprocess")(image))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    head = layers.Dense(len(CLASSES), activation="softmax", name="probs")
    out = head(x)
    kernel = np.zeros((3, len(CLASSES)), np.float32)
    kernel[0, 0] = 8.0
    head.set_weights([kernel, np.zeros(len(CLASSES), np.float32)])
    return keras.Model(image, out)


def test_gradcam_lights_up_the_region_that_raises_the_class():
    from serve.gradcam import GradCam

    img = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    img[0, :8, :8, 0] = 255  # red in the top-left cell of the 4x4 map
    img[1, 24:, 8:16, 0] = 255  # bottom row, second column
    heat = GradCam(_known_model()).heatmaps(img, np.array([0, 0]))
    assert heat.shape == (2, 4, 4)
    assert np.unravel_index(heat[0].argmax(), (4, 4)) == (0, 0) and heat[0, 0, 0] == pytest.approx(1.0)
    assert np.unravel_index(heat[1].argmax(), (4, 4)) == (3, 1)
    assert heat[0].sum() == pytest.approx(1.0)  # nothing elsewhere
    # a class the red lowers: no positive evidence anywhere, an all-zero map (not a uniform one)
    kernel_neg = GradCam(_known_model())
    kernel_neg.head.kernel.assign(-kernel_neg.head.kernel.numpy())
    assert kernel_neg.heatmaps(img, np.array([0, 0])).max() == 0.0


@pytest.mark.parametrize(("backbone", "fusion"), [("custom_cnn", True), ("mobilenetv2", False)])
def test_gradcam_finds_the_feature_map_of_each_layout(backbone, fusion):
    from serve.gradcam import GradCam, feature_map_tensor
    from skinlesion.model.bundle import Bundle, Member
    from skinlesion.model.networks import ModelSpec, build_backbone, build_model

    bb, _ = build_backbone(backbone, SIZE, "none")
    model = build_model(ModelSpec(backbone=backbone, image_size=SIZE, fusion=fusion), bb, pretrained=False)
    assert tuple(feature_map_tensor(model).shape[1:3]) == tuple(bb.output.shape[1:3])
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    member = Member("m", 1.0, model, fusion)
    fake = Bundle(Path("."), {"image_size": SIZE}, [member], None, "m")  # only model_inputs is used
    heat = GradCam(model).heatmaps(fake.model_inputs(images, fusion), np.array([0, 4, 5]))
    assert heat.shape == (3, *bb.output.shape[1:3])
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0


def test_overlay_is_image_and_map_side_by_side():
    from serve.gradcam import overlay

    display = np.full((64, 64, 3), 200, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    out = overlay(display, heat)
    assert out.shape == (64, 128, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :64], display)
    assert not np.array_equal(out[0, 64], out[63, 127])  # hot corner vs cold corner


# --------------------------------------------------------------------------- the real command, real data


@pytest.mark.slow
@pytest.mark.realdata
def test_real_command_on_the_124_originals(shared_ham, bundle_dir, tmp_path):
    out = tmp_path / "pred.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "serve.predict", str(shared_ham / "originals_600x450"),
         "--bundle", str(bundle_dir), "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [x for x in proc.stdout.splitlines() if not x.startswith("#")]
    assert len(printed) == 124
    rows = _rows(out)
    assert len(rows) == 124 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert abs(sum(float(r[f"prob_{c}"]) for c in CLASSES) - 1.0) < 1e-6


@pytest.mark.slow
@pytest.mark.realdata
def test_real_command_on_a_folder_with_two_bad_files(shared_ham, bundle_dir, tmp_path):
    originals = sorted((shared_ham / "originals_600x450").glob("*.jpg"))
    folder = tmp_path / "batch"
    folder.mkdir()
    for p in originals[:2]:
        shutil.copy(p, folder / p.name)
    make_truncated(folder / "cut_off.jpg", originals[2])
    (folder / "report.jpg").write_text("Referral letter, not an image.\n")
    proc = subprocess.run(
        [sys.executable, "-m", "serve.predict", str(folder), "--bundle", str(bundle_dir), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = [x.split("\t") for x in proc.stdout.splitlines() if not x.startswith("#")]
    errors = {Path(r[0]).name: r[2] for r in rows if r[1] == "ERROR"}
    assert sorted(errors) == ["cut_off.jpg", "report.jpg"]
    assert errors["cut_off.jpg"].startswith("truncated or damaged image file")
    assert errors["report.jpg"].startswith("cannot identify image file")
    assert sorted(Path(r[0]).name for r in rows if r[1] != "ERROR") == sorted(p.name for p in originals[:2])
