"""Same machine, same bits (issue 20 item 2): the demo's two members, trained by the real
``python -m stages.train`` in separate processes (as ``dvc repro`` runs them) on the same tiny
prepared data with the same params and seed, give identical weights and metrics; another
``train.seed_offset`` gives other weights, so the check can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.builders.training import make_prepared

MEMBERS = ("mobilenetv2", "custom_cnn")  # the demo's ensemble
# Keys that measure the machine (wall time, throughput), not the model.
MACHINE = ("seconds", "per_s")


def _train(root: Path, prepared: Path, backbone: str, seed_offset: int) -> tuple[list[np.ndarray], dict]:
    params = {
        "train": {
            "backbones": list(MEMBERS),
            "weights": "none",
            "seed_offset": seed_offset,
            "common": {"epochs": 2, "batch_size": 8},
        },
        "ensemble": {"members": list(MEMBERS)},
    }
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable, "-m", "stages.train", "--params", str(root / "params.yaml"), "--backbone", backbone,
        "--prepared", str(prepared), "--out", str(root / "model"), "--metrics", str(root / "metrics.json"),
        "--backup", str(root / "ckpt"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-3000:]
    from skinlesion.model.networks import load_model

    weights = load_model(root / "model" / "model.keras").get_weights()
    metrics = json.loads((root / "metrics.json").read_text())
    return weights, {k: v for k, v in metrics.items() if not any(t in k for t in MACHINE)}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", MEMBERS)
def test_same_data_params_and_seed_give_the_same_model_another_seed_offset_does_not(backbone, tmp_path):
    prepared = make_prepared(tmp_path / "data", per_class=10, size=32)
    a_w, a_m = _train(tmp_path / "a", prepared, backbone, 0)
    b_w, b_m = _train(tmp_path / "b", prepared, backbone, 0)
    assert len(a_w) == len(b_w) > 0
    for i, (x, y) in enumerate(zip(a_w, b_w, strict=True)):
        np.testing.assert_array_equal(
            x, y, err_msg=f"{backbone}: weight {i} differs between two same-seed runs"
        )
    assert a_m == b_m
    assert a_m["epochs_run"] == 2 and "best_val_macro_auc" in a_m
    c_w, c_m = _train(tmp_path / "c", prepared, backbone, 1)
    assert any(not np.array_equal(x, y) for x, y in zip(a_w, c_w, strict=True)), (
        f"{backbone}: train.seed_offset 1 trained the very same weights as 0"
    )
