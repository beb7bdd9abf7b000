"""``python -m tools.compare`` between real git revisions and DVC experiments.

A tmp git + DVC repository whose two stages take milliseconds: ``download`` writes a HAM10000
metadata table (``data.lesions`` lesions from ``data.first``), ``calibrate`` writes the served
test predictions (data/served/test.csv, a DVC output) and metrics/headline.json from them, with
probabilities that rank the true class up by ``served.signal`` (each image's own noise is drawn
from its number, so an image scores the same in every data version). No training: what is tested
is what the command reads from each revision and what it says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from skinlesion.measure.paired import PAIRED_KEYS
from tests.conftest import run_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
DVC = [sys.executable, "-m", "dvc"]
COMPARE = [sys.executable, "-m", "tools.compare", "--no-progress"]

PARAMS = """\
data: {lesions: 150, first: 0}
served: {signal: 3.0, noise_seed: 10}
evaluate: {bootstrap_samples: 200, ci_level: 0.95}
calibrate: {ece_bins: 15}
"""

DVC_YAML = """\
stages:
  download:
    cmd: python make_data.py
    deps: [make_data.py]
    params: [data]
    outs: [data/raw]
  calibrate:
    cmd: python make_served.py
    deps: [make_served.py, data/raw]
    params: [served]
    outs: [data/served]
    metrics:
      - metrics/headline.json:
          cache: false
"""

MAKE_DATA = """\
import yaml
from pathlib import Path

from skinlesion.core.schema import CLASSES

p = yaml.safe_load(open("params.yaml"))["data"]
rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
for lesion in range(p["first"], p["first"] + p["lesions"]):
    for j in range(1 + lesion % 3):
        rows.append(f"HAM_{lesion:07d},ISIC_{3 * lesion + j:07d},{CLASSES[lesion % 7]},histo,50.0,male,back")
Path("data/raw").mkdir(parents=True, exist_ok=True)
Path("data/raw/metadata.csv").write_text("\\n".join(rows) + "\\n")
"""

MAKE_SERVED = """\
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import expected_calibration_error, malignant_score
from skinlesion.measure.paired import served_statistics

p = yaml.safe_load(open("params.yaml"))["served"]
meta = pd.read_csv("data/raw/metadata.csv", dtype=str, keep_default_na=False)
y = meta["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
ids = [int(i[5:]) for i in meta["image_id"]]
noise = np.stack([np.random.default_rng([p["noise_seed"], i]).normal(size=7) for i in ids])
logits = noise + p["signal"] * np.eye(7)[y]
probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
df = meta[["image_id", "lesion_id", "dx", "age", "sex", "localization"]].copy()
for j, c in enumerate(CLASSES):
    df[f"prob_{c}"] = probs[:, j]
for j, c in enumerate(CLASSES):
    df[f"logit_{c}"] = np.log(probs[:, j])
df["mode"] = "image_only"
df["malignant_prob"] = malignant_score(probs)
df["threshold"] = 0.3
df["refer"] = df["malignant_prob"] >= 0.3
df["predicted"] = np.asarray(CLASSES)[probs.argmax(axis=1)]
Path("data/served").mkdir(parents=True, exist_ok=True)
df.to_csv("data/served/test.csv", index=False)
head = served_statistics(df)
head["ece_after"] = expected_calibration_error(probs, y, 15)
Path("metrics").mkdir(exist_ok=True)
Path("metrics/headline.json").write_text(json.dumps(head, indent=1))
"""


def images_of(lesions: range) -> int:
    return sum(1 + lesion % 3 for lesion in lesions)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Commit ``empty`` (the pipeline, never run), then ``v1`` (run, outputs in the DVC cache)."""
    root = tmp_path_factory.mktemp("compare") / "repo"
    root.mkdir()
    for name, text in {
        "params.yaml": PARAMS, "dvc.yaml": DVC_YAML, "make_data.py": MAKE_DATA, "make_served.py": MAKE_SERVED,
    }.items():  # fmt: skip
        (root / name).write_text(text)
    run_cmd(["git", "init", "-q"], root)
    # dvc exp run commits as the repository's user
    run_cmd(["git", "config", "user.email", "t@t"], root)
    run_cmd(["git", "config", "user.name", "t"], root)
    run_cmd([*DVC, "init", "-q"], root)
    run_cmd([*GIT, "add", "-A"], root)
    run_cmd([*GIT, "commit", "-qm", "pipeline"], root)
    run_cmd([*GIT, "tag", "empty"], root)
    run_cmd([*DVC, "repro", "-q"], root)
    run_cmd([*GIT, "add", "-A"], root)
    run_cmd([*GIT, "commit", "-qm", "run"], root)
    run_cmd([*GIT, "tag", "v1"], root)
    return root


def compare(repo: Path, *args: str, check: bool = True):
    return run_cmd([*COMPARE, "--repo", str(repo), *args], repo, check=check, timeout=300)


def metric_line(stdout: str, key: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(key + " "))


def test_a_revision_against_its_own_workspace_is_identical_and_nothing_is_significant(repo):
    out = compare(repo, "v1").stdout
    assert "# compare A = v1 (" in out and "vs  B = workspace" in out
    assert "# params: none differ" in out and "(same)" in out
    assert "test.csv (mode image_only): 300 images, 150 lesions" in out
    for key in PAIRED_KEYS:
        line = metric_line(out, key)
        assert "+0.000" in line or "+0.0 " in line, line
        assert line.endswith("not significant (CI includes 0)"), line
    assert "no noise band measured (make noise)" in out
    assert out.rstrip().endswith("no headline metric differs significantly")


def test_an_experiment_without_signal_is_named_significantly_worse_on_macro_auc(repo, tmp_path):
    run_cmd([*DVC, "exp", "run", "-q", "-S", "served.signal=0.0", "-n", "nosignal"], repo, timeout=600)
    out_json = tmp_path / "cmp.json"
    proc = compare(repo, "v1", "nosignal", "--json", str(out_json))
    out = proc.stdout
    assert "B = nosignal (experiment " in out
    assert "#   served.signal: 3.0 -> 0.0" in out
    line = metric_line(out, "macro_auc")
    assert "significant, B worse" in line and "not significant" not in line, line
    assert "significant: macro_auc (B worse, " in out
    result = json.loads(out_json.read_text())
    assert "macro_auc" in result["significant"]
    m = result["modes"]["test.csv"]["metrics"]["macro_auc"]
    assert m["hi"] < 0 and m["a"] > 0.9 and m["b"] < 0.7
    assert result["a"]["headline"]["macro_auc"] == pytest.approx(m["a"])
    assert result["bootstrap"] == {"samples": 200, "seed": 0, "level": 0.95}

    # The same difference, with a noise band of 0.9 measured on B: within noise, not significant.
    # (dvc exp run applied the experiment to the workspace: B = workspace is the experiment.)
    noise = {
        "format_version": 1, "seeds": [1, 2, 3], "cost_s": 1.0, "data": "x",
        "ensemble": {"macro_auc": {"mean": 0.9, "sd": 0.3, "min": 0.4, "max": 1.0, "band": 0.9}},
        "members": {},
    }  # fmt: skip
    (repo / "metrics" / "noise.json").write_text(json.dumps(noise))
    try:
        out = compare(repo, "v1").stdout
    finally:
        (repo / "metrics" / "noise.json").unlink()
    assert "# noise bands: metrics/noise.json" in out
    assert metric_line(out, "macro_auc").endswith("not significant (within noise: |B-A| <= band 0.9)")
    # a metric the noise file has no band for: the CI alone decides
    assert "no noise band measured" in metric_line(out, "malignant_auc")


def test_another_data_version_is_counted_and_compared_on_the_common_images(repo):
    run_cmd(
        [*DVC, "exp", "run", "-q", "-S", "served.signal=3.0", "-S", "data.first=20", "-n", "shifted"],
        repo, timeout=600,
    )  # fmt: skip
    out = compare(repo, "v1", "shifted").stdout
    common, only_a, only_b = images_of(range(20, 150)), images_of(range(20)), images_of(range(150, 170))
    assert (
        f"the two runs' test sets differ: {common} images in common, {only_a} only in A, {only_b} only in B"
    ) in out
    assert "--rescore" in out
    assert "#   data.first: 0 -> 20" in out
    # each image scores the same in both data versions: nothing differs on the common images
    assert f"test.csv (mode image_only): {common} images" in out
    assert out.rstrip().endswith("no headline metric differs significantly")


def test_a_revision_that_never_ran_calibrate_is_named_with_the_fix(repo):
    proc = compare(repo, "empty", "v1", check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: empty (") and "no data/served at that revision" in err
    assert "dvc repro calibrate" in err


def test_an_unknown_name_and_a_bundle_the_run_lacks_are_one_line_each(repo, tmp_path):
    proc = compare(repo, "nosuchrev", check=False)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: nosuchrev: not a git revision or a DVC experiment name")
    )
    # --rescore needs A's bundle; this pipeline has none
    proc = compare(repo, "v1", "--rescore", check=False)
    assert proc.returncode == 1
    assert "no models/ensemble at that revision" in proc.stderr.strip().splitlines()[-1]
    # --json is checked before any work
    proc = compare(repo, "v1", "--json", str(tmp_path), check=False)
    assert proc.returncode == 1 and "--json" in proc.stderr and "is a folder" in proc.stderr


def test_a_clone_without_the_data_says_to_fetch_it(repo, tmp_path):
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(repo), str(clone)], tmp_path)  # git only: no DVC cache, no remote
    proc = compare(clone, "v1", "v1", check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert (
        err.startswith("error: v1 (") and "data/served: made at that revision but its data is not in" in err
    )
    assert "dvc fetch -A data/served" in err


def test_rescore_scores_a_bundle_on_b_test_split_leaving_out_what_it_trained_on(tiny_built, tmp_path):
    """A = the built pipeline's commit; B = its workspace whose test split also holds 12 of A's
    training images (as a new data version can move a lesion from train to test). --rescore
    scores A's real bundle on B's test images through the serving path and leaves those 12 out."""
    import pandas as pd

    from tests.e2e.conftest import copy_workspace

    work = copy_workspace(tiny_built, tmp_path / "work")
    served = pd.read_csv(work / "data/served/test.csv", dtype=str, keep_default_na=False)
    split = pd.read_csv(work / "data/validated/split.csv", dtype=str, keep_default_na=False)
    meta = pd.read_csv(work / "data/raw/metadata.csv", dtype=str, keep_default_na=False)
    moved = split[split["split"] == "train"].head(12)[["image_id"]].merge(meta, on="image_id")
    extra = served.head(len(moved)).copy()
    for col in ("image_id", "lesion_id", "dx", "age", "sex", "localization"):
        extra[col] = moved[col].to_numpy()
    pd.concat([served, extra]).to_csv(work / "data/served/test.csv", index=False)

    plain = compare(work, "HEAD", "--samples", "50").stdout
    assert f"{len(served)} images in common, 0 only in A, 12 only in B" in plain

    out = compare(work, "HEAD", "--rescore", "--samples", "50").stdout
    lesions = moved["lesion_id"].nunique()
    assert (
        f"# rescored: A's bundle on B's test split ({len(served) + 12} images): 12 images ({lesions} "
        "lesions) left out that A trained, tuned or calibrated on (HEAD:models/ensemble/seen.json); "
        "0 could not be scored"
    ) in out
    # what remains is A's own test split: the bundle served again gives back its reported answers
    assert f"test.csv (mode image_only): {len(served)} images" in out
    for key in PAIRED_KEYS:
        assert "+0.000" in metric_line(out, key) or "+0.0 " in metric_line(out, key)
    assert out.rstrip().endswith("no headline metric differs significantly")
