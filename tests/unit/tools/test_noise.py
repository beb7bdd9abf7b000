"""The noise file (tools/noisefile.py): bands, its format; what a noise run (tools/noise.py) checks
before it starts."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from skinlesion.core.errors import ParamsError
from skinlesion.params.load import parse_params
from tools.noise import code_paths, missing_from_runs, params_digest, run_values, tail
from tools.noisefile import (
    NOISE_FORMAT_VERSION,
    NoiseFileError,
    band,
    member_bands,
    noise_bands,
    noise_record,
    spread,
)
from tools.runs import lock_out_md5


def test_band_is_the_range_or_two_sd_of_a_difference_whichever_is_larger():
    # three runs 0.80, 0.82, 0.84: range 0.04; sd 0.02 -> 2*sqrt(2)*0.02 = 0.0566
    assert band([0.80, 0.82, 0.84]) == pytest.approx(2 * math.sqrt(2) * 0.02)
    # two runs: sd = range / sqrt(2), so 2*sqrt(2)*sd = 2 * range
    assert band([0.5, 0.6]) == pytest.approx(0.2)
    # with 6+ runs the range can win: two extremes around a tight middle
    assert band([0.0, 0.5, 0.5, 0.5, 0.5, 1.0]) == pytest.approx(1.0)
    assert band([1.0, 1.0, 1.0]) == 0.0
    assert math.isnan(band([0.9])) and math.isnan(band([]))
    s = spread([0.80, None, 0.84, float("nan"), 0.82])
    assert s["mean"] == pytest.approx(0.82) and s["min"] == 0.80 and s["max"] == 0.84
    assert s["sd"] == pytest.approx(0.02) and s["band"] == pytest.approx(band([0.8, 0.82, 0.84]), abs=1e-6)
    assert spread([0.7]) == {"mean": 0.7, "sd": None, "min": 0.7, "max": 0.7, "band": None}
    assert spread([None]) == dict.fromkeys(("mean", "sd", "min", "max", "band"))


def _record(tmp_path, seeds=(1, 2, 3)):
    runs = []
    for i, _ in enumerate(seeds):
        head = {"macro_auc": 0.80 + 0.01 * i, "ece_after": 0.05, "macro_auc_image_only": None}
        ev = {"mobilenetv2": {"val_macro_auc": 0.7 + 0.02 * i, "macro_auc": 0.75, "balanced_accuracy": 0.4}}
        runs.append(run_values(head, ev, {"weight_mobilenetv2": 0.25 * i, "weight_custom_cnn": 1.0}))
    return noise_record(list(seeds), runs, cost_s=12.5, data="abc", params="def")


def test_the_noise_file_round_trips_through_noise_bands(tmp_path):
    rec = _record(tmp_path)
    assert rec["format_version"] == NOISE_FORMAT_VERSION and rec["seeds"] == [1, 2, 3]
    assert rec["cost_s"] == 12.5 and rec["data"] == "abc"
    ens = rec["ensemble"]
    assert set(ens["macro_auc"]) == {"mean", "sd", "min", "max", "band"}
    assert ens["macro_auc"]["min"] == 0.80 and ens["macro_auc"]["max"] == pytest.approx(0.82)
    assert ens["ece_after"]["band"] == 0.0  # identical in every run: measured, no spread
    assert ens["macro_auc_image_only"]["band"] is None  # no run has it
    mob = rec["members"]["mobilenetv2"]
    assert mob["weight"]["max"] == 0.5 and mob["val_macro_auc"]["band"] > 0
    assert mob["val_malignant_auc"]["mean"] is None  # absent from the eval file: None, not 0
    assert rec["runs"]["seed_offset_2"]["macro_auc"] == pytest.approx(0.81)
    path = tmp_path / "metrics" / "noise.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rec, allow_nan=False))  # JSON proper: no NaN anywhere
    bands = noise_bands(path)
    assert set(bands) == {"macro_auc", "ece_after"}  # keys without a band are left out
    assert bands["macro_auc"] == pytest.approx(band([0.80, 0.81, 0.82]), abs=1e-6)
    assert member_bands(path)["mobilenetv2"]["weight"] == pytest.approx(band([0, 0.25, 0.5]), abs=1e-6)


def test_no_noise_file_means_no_bands_and_a_bad_one_is_named(tmp_path):
    assert noise_bands(tmp_path / "absent.json") == {} and member_bands(tmp_path / "absent.json") == {}
    bad = tmp_path / "noise.json"
    bad.write_text("{not json")
    with pytest.raises(NoiseFileError, match=r"noise\.json: not JSON"):
        noise_bands(bad)
    rec = _record(tmp_path)
    bad.write_text(json.dumps({**rec, "format_version": 99}))
    with pytest.raises(NoiseFileError, match=r"noise\.json: format_version 99; this code reads 1"):
        noise_bands(bad)
    rec["ensemble"]["macro_auc"]["band"] = -0.1
    bad.write_text(json.dumps(rec))
    with pytest.raises(NoiseFileError, match=r"ensemble\.macro_auc\.band: -0\.1 is not a non-negative"):
        noise_bands(bad)
    bad.write_text(json.dumps({"format_version": 1, "ensemble": {}}))
    with pytest.raises(NoiseFileError, match="'members' is missing"):
        noise_bands(bad)


def test_params_digest_ignores_only_the_seed_offset():
    a = {"base": {"seed": 42}, "train": {"seed_offset": 1, "common": {"epochs": 20}}}
    b = {"base": {"seed": 42}, "train": {"seed_offset": 7, "common": {"epochs": 20}}}
    c = {"base": {"seed": 42}, "train": {"seed_offset": 1, "common": {"epochs": 3}}}
    assert params_digest(a) == params_digest(b) != params_digest(c)
    assert a["train"]["seed_offset"] == 1  # not modified in place
    lock = {"stages": {"download": {"outs": [{"path": "data/raw", "md5": "42ab.dir"}]}}}
    assert lock_out_md5(lock, "data/raw") == "42ab.dir" and lock_out_md5(lock, "data/split") is None


def test_seed_offset_is_a_validated_train_param():
    assert parse_params({"train": {"seed_offset": 3}}).train.seed_offset == 3
    assert parse_params({}).train.seed_offset == 0
    with pytest.raises(ParamsError, match="train.seed_offset: -1 is below the minimum 0"):
        parse_params({"train": {"seed_offset": -1}})
    with pytest.raises(ParamsError, match="train.seed_offset: expected an integer"):
        parse_params({"train": {"seed_offset": "1"}})


def test_untracked_code_would_be_missing_from_a_temp_run():
    dvc_yaml = {
        "stages": {
            "prepare": {
                "deps": ["stages/prepare.py", "skinlesion/measure/metrics.py", "data/raw"],
                "outs": ["data/prepared"],
            },
            "train": {
                "foreach": ["a"],
                "do": {"deps": ["stages/train.py", "data/prepared", "models/${item}"]},
            },
            "download": {"deps": ["stages/download.py"], "outs": [{"data/raw": {"persist": True}}]},
        }
    }
    code = code_paths(dvc_yaml)
    assert code == {
        "stages/prepare.py",
        "skinlesion/measure/metrics.py",
        "stages/train.py",
        "stages/download.py",
    }
    # a new library module beside a listed one: the listed one may import it
    untracked = [
        "skinlesion/measure/paired.py",
        "notes.txt",
        "tests/unit/tools/test_x.py",
        "params.yaml",
        "stages/data.csv",
    ]
    assert missing_from_runs(untracked, code) == ["skinlesion/measure/paired.py", "params.yaml"]


def test_tail_keeps_the_last_lines_without_progress_bar_redraws():
    text = "a\n\nprogress 10%\rprogress 100%\nerror: boom\n"
    assert tail(text, 2) == "progress 100%\nerror: boom"


def test_the_cli_refuses_bad_seeds_and_sets_naming_them(tmp_path):
    def cli(*args):
        return subprocess.run(
            ["python", "-m", "tools.noise", *args], capture_output=True, text=True, cwd=tmp_path
        )

    (tmp_path / "params.yaml").write_text("train:\n  common: {epochs: 2}\n")
    r = cli("--seeds", "0")
    assert r.returncode == 1 and "error: --seeds 0: give at least 1" in r.stderr
    r = cli("--seeds", "2", "--set", "train.seed_offset=5")
    assert (
        r.returncode == 1 and "error: --set train.seed_offset: the noise runs set it themselves" in r.stderr
    )
    r = cli("--seeds", "2", "--set", "train.common.epochs=-3")
    assert r.returncode == 1
    assert "error: --set train.common.epochs=-3: train.common.epochs: -3 is below the minimum 1" in r.stderr
    # a folder that is no git repository: said before anything runs, no file written
    r = cli("--seeds", "2", "--set", "train.common.epochs=1")
    assert r.returncode == 1 and "not a git repository with a commit" in r.stderr
    assert not (tmp_path / "metrics").exists()
