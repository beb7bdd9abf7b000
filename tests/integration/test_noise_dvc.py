"""``python -m tools.noise`` against the real ``dvc exp run --temp`` on a toy repository whose
stages take milliseconds: the seeds run as experiments, the noise file holds their spread, the
workspace is left exactly as it was, and a failing seed is named with dvc's last lines."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.noisefile import noise_bands, read_noise

REPO = Path(__file__).resolve().parents[2]

# Every metric is a function of train.seed_offset, so the spread is known exactly.
STAGE = r"""
import json, os, sys
from pathlib import Path
import yaml

p = yaml.safe_load(open("params.yaml"))
stage, *rest = sys.argv[1:]
off = p["train"]["seed_offset"]


def out(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(data, str):  # 6 digits, as the real stages write them
        data = json.dumps({k: round(v, 6) for k, v in data.items()})
    Path(path).write_text(data)


if stage == "download":
    out("data/raw/metadata.csv", "lesion_id,image_id,dx\n")
elif stage == "train":
    if str(off) == os.environ.get("TOY_FAIL_SEED"):
        print(f"toy: training {rest[0]} failed at seed offset {off}", file=sys.stderr)
        sys.exit(1)
    out(f"models/{rest[0]}/model.txt", f"{rest[0]} {off}")
elif stage == "evaluate":
    bb = rest[0]
    out(f"metrics/eval/{bb}.json", {"val_macro_auc": 0.70 + 0.01 * off, "macro_auc": 0.75,
                                    "malignant_auc": 0.7, "balanced_accuracy": 0.5})
elif stage == "calibrate":
    members = p["ensemble"]["members"]
    out("metrics/ensemble.json", {f"weight_{bb}": (0.5 if off % 2 else 1.0) if i == 0 else 0.5
                                  for i, bb in enumerate(members)})
    head = {"macro_auc": 0.80 + 0.01 * off, "malignant_auc": 0.85, "test_malignant_recall": 0.95,
            "test_specificity": 0.5 - 0.02 * off, "referrals_per_100": 50.0 + off,
            "balanced_accuracy_decision": 0.6, "ece_after": 0.05}
    out("metrics/calibration.json", {**head, "threshold": 0.2})
    out("metrics/headline.json", head)
"""

DVC_YAML = """\
stages:
  download:
    cmd: python toy_stage.py download
    deps: [toy_stage.py]
    outs: [data/raw]
  train:
    foreach: ${train.backbones}
    do:
      cmd: python toy_stage.py train ${item}
      deps: [toy_stage.py, data/raw]
      params: [base.seed, train.seed_offset, train.common]
      outs: ["models/${item}"]
  evaluate:
    foreach: ${train.backbones}
    do:
      cmd: python toy_stage.py evaluate ${item}
      deps: [toy_stage.py, "models/${item}"]
      params: [train.seed_offset]
      metrics:
        - "metrics/eval/${item}.json":
            cache: false
  calibrate:
    cmd: python toy_stage.py calibrate
    deps: [toy_stage.py, metrics/eval]
    params: [ensemble, train.seed_offset]
    metrics:
      - metrics/calibration.json:
          cache: false
      - metrics/headline.json:
          cache: false
      - metrics/ensemble.json:
          cache: false
metrics:
  - metrics/noise.json
"""


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kw)


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.is_file() else "dvc"


GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def make_toy(root: Path) -> Path:
    """A committed git + DVC repo at ``root``, its pipeline run once (seed offset 0), clean."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root.mkdir(parents=True)
    (root / "toy_stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for cmd in (["git", "init", "-q"], [_dvc(), "init", "-q"], [_dvc(), "repro", "-q"],
                [*GIT, "add", "-A"], [*GIT, "commit", "-qm", "toy"]):  # fmt: skip
        r = _run(cmd, root)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("noise") / "repo")


def _noise(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "tools.noise", *args], root, env={**os.environ, **env})


def _workspace(root: Path) -> tuple[str, str, str]:
    status = _run(["git", "status", "--porcelain", "-uall"], root).stdout
    return (
        status,
        hashlib.md5((root / "params.yaml").read_bytes()).hexdigest(),
        (root / "dvc.lock").read_text(),
    )


@pytest.mark.slow
def test_noise_runs_each_seed_as_an_experiment_and_writes_the_spread(toy):
    before = _workspace(toy)
    r = _noise(toy, "--seeds", "3", "--set", "train.common.epochs=2")
    assert r.returncode == 0, r.stderr
    # one progress line per run, with its time and an ETA
    done = [line for line in r.stderr.splitlines() if " done in " in line]
    assert len(done) == 3 and "seed 1/3 done in" in done[0] and "ETA" in done[0]
    assert "macro_auc 0.8100" in done[0]
    rec = read_noise(toy / "metrics" / "noise.json")
    assert rec["seeds"] == [1, 2, 3] and rec["cost_s"] > 0 and len(rec["seconds_per_seed"]) == 3
    lock = yaml.safe_load((toy / "dvc.lock").read_text())
    assert rec["data"] == lock["stages"]["download"]["outs"][0]["md5"]
    assert rec["set"] == ["train.common.epochs=2"] and rec["experiments"] == [
        "noise-s1",
        "noise-s2",
        "noise-s3",
    ]
    auc = rec["ensemble"]["macro_auc"]
    assert auc["min"] == pytest.approx(0.81) and auc["max"] == pytest.approx(0.83)
    assert auc["sd"] == pytest.approx(0.01) and auc["band"] == pytest.approx(2 * 2**0.5 * 0.01, abs=1e-6)
    assert rec["ensemble"]["ece_after"]["band"] == 0.0
    assert noise_bands(toy / "metrics" / "noise.json")["referrals_per_100"] == pytest.approx(
        2 * 2**0.5, abs=1e-6
    )
    members = rec["members"]
    assert set(members) == {"mobilenetv2", "custom_cnn"}  # ensemble.members of the params
    assert members["mobilenetv2"]["val_macro_auc"]["max"] == pytest.approx(0.73)
    assert members["mobilenetv2"]["weight"]["min"] == 0.5 and members["mobilenetv2"]["weight"]["max"] == 1.0
    # the workspace is exactly as it was: same status, params and lock (the noise file aside)
    after = _workspace(toy)
    assert after[1:] == before[1:]
    assert after[0].replace("?? metrics/noise.json\n", "") == before[0]
    # the experiments are kept, named, and carry their seed (dvc exp show reads them)
    shown = _run([_dvc(), "exp", "show", "--json"], toy)
    assert shown.returncode == 0 and all(f"noise-s{i}" in shown.stdout for i in (1, 2, 3))
    # the noise file is one of the project's metrics (dvc.yaml top-level metrics:)
    m = _run([_dvc(), "metrics", "show", "--json"], toy)
    assert m.returncode == 0 and "metrics/noise.json" in m.stdout
    # again, with --remove: the earlier experiments of the same names are replaced, then removed
    r = _noise(toy, "--seeds", "2", "--remove", "--out", "metrics/noise2.json")
    assert r.returncode == 0, r.stderr
    assert "replacing experiment noise-s1" in r.stderr
    assert read_noise(toy / "metrics" / "noise2.json")["experiments"] == []
    left = _run([_dvc(), "exp", "list", "--name-only"], toy).stdout.split()
    assert "noise-s1" not in left and "noise-s2" not in left and "noise-s3" in left


@pytest.mark.slow
def test_a_failing_seed_is_named_with_dvcs_last_lines_and_nothing_is_written(toy):
    before = _workspace(toy)
    r = _noise(toy, "--seeds", "3", "--first", "11", "--out", "metrics/failed.json", TOY_FAIL_SEED="12")
    assert r.returncode == 1
    err = r.stderr
    assert re.search(
        r"error: seed 12 \(train.seed_offset=12\): dvc exp run failed \(exit \d+\); its last lines:", err
    )
    assert "toy: training mobilenetv2 failed at seed offset 12" in err
    assert "full log: " in err and "noise-s12.log" in err
    assert "seed 1/3 done" in err and "seed 3/3" not in err  # stopped at the failure
    assert not (toy / "metrics" / "failed.json").exists()
    assert _workspace(toy) == before


@pytest.mark.slow
def test_untracked_code_is_refused_before_anything_runs(toy):
    extra = toy / "toy_helper.py"
    # dvc.yaml lists toy_stage.py as a dep: a new .py beside it is code a run would lack
    extra.write_text("X = 1\n")
    try:
        r = _noise(toy, "--seeds", "2", "--out", "metrics/never.json")
        assert r.returncode == 1
        assert "untracked files the runs need would be missing from them" in r.stderr
        assert "toy_helper.py; commit them or `git add` them first" in r.stderr
        assert not (toy / "metrics" / "never.json").exists()
    finally:
        extra.unlink()


@pytest.mark.slow
def test_the_reproduction_verdict_judges_by_the_committed_noise_band(tmp_path):
    """The whole chain for real: make noise, commit its file, then runs of other seeds are WITHIN
    NOISE or DIFFERS by that band, with the first differing artifact and the params named."""
    toy = make_toy(tmp_path / "repo")

    def verdict() -> str:
        r = _run([sys.executable, "-m", "tools.summary", "--metrics", "metrics", "--diff", "HEAD"], toy)
        assert r.returncode == 0, r.stderr
        return r.stdout[r.stdout.index("reproduction:") :]

    assert verdict().startswith("reproduction: REPRODUCED the committed run (HEAD): ")
    assert _noise(toy, "--seeds", "3", "--remove").returncode == 0
    assert verdict().startswith("reproduction: REPRODUCED")  # the noise file is no run output
    for cmd in ([*GIT, "add", "metrics/noise.json"], [*GIT, "commit", "-qm", "noise"]):
        assert _run(cmd, toy).returncode == 0
    # seed offset 2 against the committed 0: macro_auc +0.02 against a band of 0.037 (the runs of
    # offsets 1..3 and the committed run, 0: macro_auc 0.80..0.83, sd 0.0129, band 2 sqrt 2 sd)
    assert _run([_dvc(), "exp", "run", "-S", "train.seed_offset=2"], toy).returncode == 0
    text = verdict()
    assert text.startswith("reproduction: WITHIN NOISE of the committed run (HEAD): ")
    assert "every headline metric within its noise band (largest: " in text
    assert "params differ (dvc params diff HEAD): train.seed_offset" in text
    # seed offset 5: macro_auc +0.05, beyond; the first artifact is the first member's model
    assert _run([_dvc(), "exp", "run", "-S", "train.seed_offset=5"], toy).returncode == 0
    text = verdict()
    assert text.startswith("reproduction: DIFFERS from the committed run (HEAD): ")
    assert "headline macro_auc: 0.8 -> 0.85, |diff| 0.05, band 0.03651 (beyond)" in text
    assert "first artifact that differs: models/mobilenetv2 (stage train@mobilenetv2) differs: md5 " in text
    assert "    params differ: train.seed_offset" in text
