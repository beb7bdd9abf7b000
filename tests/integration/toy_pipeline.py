"""A toy DVC repository with the pipeline's shape (download -> split -> validate -> prepare ->
train@bb -> evaluate@bb -> ensemble -> calibrate) whose stages take milliseconds, so the retrain
flow's logic runs against the real ``dvc`` and a real Prefect API in seconds.

The stages write the metric files the flow reads (same paths, same keys). Knobs, all in the
project's real params.yaml:

* ``validate.min_class_count >= 1000``: the validate stage fails with a summary on stderr and
  writes ``metrics/validation.json`` with ``passed: 0``, as the real one does.
* ``train.common.epochs``: the candidate's AUCs are ``0.70 + 0.02 * epochs`` (capped).
* the test malignant recall is always 0.96: ``calibrate.target_recall`` above it fails the gate.
* ``train.backbone.<bb>.fusion: true`` for any trained backbone makes the bundle fuse metadata:
  ``metrics/ensemble.json`` and ``metrics/calibration.json`` then carry every key again with the
  suffix ``_image_only`` (AUCs 0.02 below, recall 0.96), as the real stages write them. With
  ``train.common.metadata_dropout: 0`` as well (the fusion layer never saw an image without
  metadata) the image-only recall is 0.30: the gate refuses the candidate on that mode alone.
* env ``TOY_TRAIN_SECONDS``: each train stage sleeps that long and records its
  ``CUDA_VISIBLE_DEVICES`` and start/end times in ``models/<bb>/run.json``.
* env ``TOY_REAL``: a folder with a real bundle (``bundle/``), JPEGs (``images/``), the
  bundle's served test answers (``served.csv``) and ``seen.json``. download copies the images
  into ``data/raw/images``; calibrate makes that bundle the candidate (with ``seen.json``) and
  its served answers ``data/served/test.csv``, so the gate can score production for real.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STAGE_SCRIPT = r"""
import json, os, shutil, sys, time
from pathlib import Path

import yaml

p = yaml.safe_load(open("params.yaml"))
stage, *rest = sys.argv[1:]


def out(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) if not isinstance(data, str) else data)


auc = min(0.99, 0.70 + 0.02 * p["train"]["common"]["epochs"])
fusion = any(p["train"]["backbone"][bb]["fusion"] for bb in p["train"]["backbones"])
image_only_recall = 0.96 if p["train"]["common"]["metadata_dropout"] > 0 else 0.30
real = os.environ.get("TOY_REAL")


def image_only(metrics, **changed):
    # a fusion bundle's metrics: every key again with the suffix _image_only
    if not fusion:
        return metrics
    return {**metrics, **{k + "_image_only": changed.get(k, v) for k, v in metrics.items()}}


if stage == "download":
    out("data/raw/metadata.csv", "lesion_id,image_id,dx\n" + "HAM_1,ISIC_0000001,nv\n" * 11)
    if real:
        shutil.copytree(Path(real) / "images", "data/raw/images")
elif stage == "split":
    out("data/split/split.csv", "image_id,split\n")
    out("metrics/split.json", {"n_train": 7, "n_val": 2, "n_test": 2, "n_groups": 9, "leakage": 0})
elif stage == "validate":
    ok = p["validate"]["min_class_count"] < 1000
    fails = 0 if ok else 7
    out("metrics/validation.json", {"passed": int(ok), "n_rows": 11, "metadata_fail_class_count": fails})
    out("reports/validation/index.html", "<html>toy data docs</html>")
    if not ok:
        print("validation FAILED: metadata: class count below validate.min_class_count "
              "(7 classes, e.g. akiec: 1 row < 1000)", file=sys.stderr)
        sys.exit(1)
    out("data/validated/split.csv", "image_id,split\n")
elif stage == "prepare":
    out("data/prepared/shard-0.txt", "x")
elif stage == "train":
    print(f"training {rest[0]}", flush=True)
    start = time.time()
    time.sleep(float(os.environ.get("TOY_TRAIN_SECONDS", "0")))
    out(f"models/{rest[0]}/model.txt", f"{rest[0]} epochs={p['train']['common']['epochs']}")
    out(f"models/{rest[0]}/run.json", {"device": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                       "start": start, "end": time.time()})
elif stage == "evaluate":
    out(f"metrics/eval/{rest[0]}.json", {
        "accuracy": 0.61234567, "balanced_accuracy": 0.5, "macro_f1": 0.4, "macro_auc": auc - 0.01,
        "macro_auc_ci_low": auc - 0.05, "macro_auc_ci_high": auc + 0.03, "malignant_auc": auc,
    })
elif stage == "ensemble":
    out("metrics/ensemble.json", image_only({"accuracy": 0.65, "balanced_accuracy": 0.55, "macro_f1": 0.45,
        "macro_auc": auc, "malignant_auc": auc + 0.01, "malignant_auc_ci_low": auc - 0.03,
        "malignant_auc_ci_high": auc + 0.04}, macro_auc=auc - 0.02, malignant_auc=auc - 0.01,
        malignant_auc_ci_low=auc - 0.05, malignant_auc_ci_high=auc + 0.02))
elif stage == "calibrate":
    if real:
        shutil.rmtree("models/ensemble", ignore_errors=True)
        shutil.copytree(Path(real) / "bundle", "models/ensemble")
        shutil.copy(Path(real) / "seen.json", "models/ensemble/seen.json")
        Path("data/served").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(real) / "served.csv", "data/served/test.csv")
    else:
        out("models/ensemble/bundle.json", {"members": p["train"]["backbones"], "threshold": 0.2,
            "target_recall": p["calibrate"]["target_recall"]})
    out("metrics/calibration.json", {**image_only({"threshold": 0.2, "test_malignant_recall": 0.96,
        "test_specificity": 0.5, "test_ppv": 0.3, "referrals_per_100": 61.0, "ece_before": 0.1,
        "ece_after": 0.05}, test_malignant_recall=image_only_recall, threshold=0.25),
        "target_recall": p["calibrate"]["target_recall"]})
"""

DVC_YAML = """\
stages:
  download:
    cmd: python toy_stage.py download
    deps: [toy_stage.py]
    outs: [data/raw]
  split:
    cmd: python toy_stage.py split
    deps: [data/raw]
    outs: [data/split]
    metrics:
      - metrics/split.json:
          cache: false
  validate:
    cmd: python toy_stage.py validate
    deps: [data/raw, data/split]
    params: [validate]
    outs:
      - data/validated
      - reports/validation:
          cache: false
    metrics:
      - metrics/validation.json:
          cache: false
  prepare:
    cmd: python toy_stage.py prepare
    deps: [data/validated]
    outs: [data/prepared]
  train:
    foreach: ${train.backbones}
    do:
      cmd: python toy_stage.py train ${item}
      deps: [data/prepared]
      params: [train.common]
      outs: ["models/${item}"]
  evaluate:
    foreach: ${train.backbones}
    do:
      cmd: python toy_stage.py evaluate ${item}
      deps: ["models/${item}"]
      params: [train.common]
      metrics:
        - "metrics/eval/${item}.json":
            cache: false
  ensemble:
    cmd: python toy_stage.py ensemble
    deps: [metrics/eval]
    params: [ensemble, train.common, train.backbone]
    metrics:
      - metrics/ensemble.json:
          cache: false
  calibrate:
    cmd: python toy_stage.py calibrate
    deps: [metrics/ensemble.json]
    params: [calibrate, train.common, train.backbone]
    outs: [models/ensemble]
    metrics:
      - metrics/calibration.json:
          cache: false
"""


def _run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


def make_toy_repo(dest: Path) -> Path:
    """A git + DVC repository at ``dest`` with the toy pipeline and the project's params.yaml."""
    dest.mkdir(parents=True)
    (dest / "toy_stage.py").write_text(STAGE_SCRIPT)
    (dest / "dvc.yaml").write_text(DVC_YAML)
    # The project's params, with the one knob the toy's numbers derive from pinned, so the
    # expected AUCs (0.70 + 0.02 * 5) do not move when the project's default epochs change.
    params = (REPO / "params.yaml").read_text()
    params, n = re.subn(r"(?m)^(    epochs: )\d+", r"\g<1>5", params)
    assert n == 1, "train.common.epochs not found in params.yaml"
    (dest / "params.yaml").write_text(params)
    (dest / ".gitignore").write_text("/reports/plots/\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run(["git", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    _run([*git, "add", "-A"], dest)
    _run([*git, "commit", "-qm", "toy"], dest)
    return dest
