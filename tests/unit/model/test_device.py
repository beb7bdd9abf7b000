"""train.device: a profile that asks for a GPU stops at the start of train, in one line, when
TensorFlow sees none (the refusal runs here, on a CPU-only TensorFlow, as a real subprocess)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.schema import CLASSES
from skinlesion.params.load import load_params, parse_params
from tests.conftest import write_raw

REPO = Path(__file__).resolve().parents[3]


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _prepared(root: Path) -> Path:
    """A real prepared folder: JPEGs through ``stages.prepare.run``, 4 a class (train, train, val, test)."""
    from stages import prepare

    rows = [
        {"lesion_id": f"HAM_{i:07d}", "image_id": f"ISIC_{i:07d}", "dx": dx}
        for i, dx in enumerate(c for c in CLASSES for _ in range(4))
    ]
    raw = write_raw(root / "raw", rows, size=(40, 32))
    with open(root / "split.csv", "w", newline="") as fh:
        w = csv.DictWriter(
            fh, fieldnames=["image_id", "lesion_id", "group_id", "dx", "split"], lineterminator="\n"
        )
        w.writeheader()
        for i, r in enumerate(rows):
            split = ("train", "train", "val", "test")[i % 4]
            w.writerow({"image_id": r["image_id"], "lesion_id": r["lesion_id"], "group_id": r["lesion_id"],
                        "dx": r["dx"], "split": split})  # fmt: skip
    p = parse_params({"prepare": {"image_size": 32, "workers": 1, "shard_size": 16}}).prepare
    prepare.run(p, raw_dir=raw, split_csv=root / "split.csv", out_dir=root / "prepared")
    return root / "prepared"


def test_params_yaml_and_the_gpu_profile_say_which_device():
    assert load_params(REPO / "params.yaml").train.device == "auto"  # CPU machines train as before
    profile = yaml.safe_load((REPO / "profiles" / "gpu.yaml").read_text())
    assert profile["train"]["device"] == "gpu"
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "train.device" in dvc["stages"]["train"]["do"]["params"]


def test_an_unknown_device_names_the_key():
    raw = {"train": {"backbones": ["custom_cnn"], "device": "cuda"}, "ensemble": {"members": ["custom_cnn"]}}
    with pytest.raises(ParamsError, match=r"train\.device: 'cuda' is not one of"):
        parse_params(raw)


def test_auto_and_cpu_train_without_a_gpu():
    from skinlesion.model.distribute import visible_gpus

    assert visible_gpus("cpu") == []
    if not visible_gpus("auto"):  # a CPU machine: gpu must refuse, in one line
        with pytest.raises(StageError, match=r"^train\.device: gpu, but TensorFlow \S+ sees no GPU: .*"):
            visible_gpus("gpu")
    with pytest.raises(StageError, match="train.device: unknown device 'tpu'"):
        visible_gpus("tpu")


def test_a_gpu_profile_without_a_gpu_stops_at_the_start_of_train_in_one_line(tmp_path):
    prepared = _prepared(tmp_path)
    params = {
        "train": {"backbones": ["custom_cnn"], "weights": "none", "device": "gpu",
                  "common": {"epochs": 1, "batch_size": 4}},
        "ensemble": {"members": ["custom_cnn"]},
    }  # fmt: skip
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.train", "--params", str(pfile), "--backbone", "custom_cnn",
           "--prepared", str(prepared), "--out", str(out / "model"), "--metrics", str(out / "m.json"),
           "--live", str(out / "live"), "--backup", str(out / "ckpt")]  # fmt: skip
    # CUDA_VISIBLE_DEVICES='': a GPU machine refuses too (its CUDA build then sees none).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    tf_cpu, tf_cuda = _installed("tensorflow-cpu"), _installed("tensorflow")
    if tf_cpu and not tf_cuda:  # what `make setup` installs: the line says how to get the GPU build
        assert len(lines) == 1, proc.stderr  # one line: no traceback, not even TensorFlow's import log
        assert lines[0] == (
            f"error: train.device: gpu, but TensorFlow {tf_cpu} sees no GPU: the installed build, "
            f"tensorflow-cpu {tf_cpu}, has no CUDA (`pip show tensorflow-cpu`); install the CUDA build "
            "with `make setup GPU=1`, or set train.device: auto to train on the CPU"
        )
    else:  # the CUDA build (make setup GPU=1) with the GPUs hidden
        assert "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("error: train.device: gpu, but TensorFlow ")
        assert "sees no GPU" in lines[-1] and "CUDA_VISIBLE_DEVICES=''" in lines[-1], lines[-1]
    assert not out.exists()  # stopped before any work: no model, metrics, logs or resume folder
