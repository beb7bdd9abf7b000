"""Committed params profiles (tools.profile) and the leakage audit's split helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.leakage_audit import image_level_split, sibling_share
from skinlesion.core.errors import StageError
from skinlesion.params.load import parse_params
from tools.profile import build_overrides, flatten, main, merge, read_profile

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("profile", sorted((REPO / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_profile_is_valid_on_the_committed_params(profile):
    merged, overrides = merge(REPO / "params.yaml", read_profile(profile), [])
    p = parse_params(merged)
    assert overrides
    for key, value in overrides.items():
        node = p
        for part in key.split("."):
            node = getattr(node, part)
        assert node == (tuple(value) if isinstance(value, list) else value), key
    # an ensemble member that is not trained would fail at the ensemble stage, hours later
    assert set(p.ensemble.members) <= set(p.train.backbones)


def test_overrides_become_dvc_set_params_and_bad_keys_are_named(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("train:\n  backbones: [mobilenetv2, custom_cnn, resnet_small]\n  common: {epochs: 3}\n")
    out = build_overrides(REPO / "params.yaml", read_profile(prof), ["evaluate.tta=true"])
    assert out == {"train.backbones": "[mobilenetv2, custom_cnn, resnet_small]", "train.common.epochs": "3",
                   "evaluate.tta": "true"}  # fmt: skip
    assert main([str(prof), "--print", "--set", "download.source=local:/data/ham"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dvc exp run -S ") and "-S download.source=local:/data/ham" in printed
    prof.write_text("train:\n  common: {epochs: -1}\n")
    with pytest.raises(StageError, match="train.common.epochs"):
        build_overrides(REPO / "params.yaml", read_profile(prof), [])
    assert main([str(prof), "--print"]) == 1
    assert "train.common.epochs" in capsys.readouterr().err
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    with pytest.raises(StageError, match="not found"):
        read_profile(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(StageError, match="mapping"):
        read_profile(tmp_path / "list.yaml")


def test_image_level_split_is_stratified_and_leaks_lesions():
    rng = np.random.default_rng(0)
    lesion = np.repeat(np.arange(400), 2)  # 400 lesions of 2 images
    meta = pd.DataFrame({
        "image_id": [f"ISIC_{i:07d}" for i in range(800)],
        "lesion_id": [f"HAM_{x:07d}" for x in lesion],
        "dx": np.where(lesion % 4 == 0, "mel", "nv"),
    })  # fmt: skip
    meta = meta.iloc[rng.permutation(len(meta))]
    split = image_level_split(meta, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1)
    assert len(split) == 800 and split["image_id"].is_unique
    share = split.groupby("dx")["split"].value_counts(normalize=True)
    assert share["mel", "test"] == pytest.approx(0.15, abs=0.01)
    assert share["nv", "train"] == pytest.approx(0.70, abs=0.01)
    # the leak the audit measures: with 2 images per lesion, ~70% of test lesions have a sibling in train
    assert 0.5 < sibling_share(split) < 0.9
    assert split.equals(
        image_level_split(
            meta.sample(frac=1, random_state=3), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1
        )
    )
    lesion_no = split["lesion_id"].str[4:].astype(int)
    lesion_split = split.assign(split=np.where(lesion_no % 7 == 0, "test", "train"))
    assert sibling_share(lesion_split) == 0.0


def test_run_timed_passes_output_through_and_times_each_stage(tmp_path, capfd, monkeypatch):
    import json
    import sys

    from tools.profile import run_timed, write_record

    script = (
        "import sys, time\n"
        "print(\"Running stage 'split':\", flush=True); time.sleep(0.3)\n"
        "sys.stdout.write('progress 50%\\r'); sys.stdout.flush()\n"
        "print(\"Running stage 'train@custom_cnn':\", flush=True); time.sleep(0.1)\n"
        "sys.exit(3)\n"
    )
    rc, seconds = run_timed([sys.executable, "-c", script])
    assert rc == 3
    assert list(seconds) == ["split", "train@custom_cnn"]
    assert seconds["split"] >= 0.3 and 0.1 <= seconds["train@custom_cnn"] < seconds["split"]
    assert "progress 50%\r" in capfd.readouterr().out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "eval").mkdir(parents=True)
    (tmp_path / "metrics" / "eval" / "a.json").write_text('{"macro_auc": 0.9}')
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    write_record(tmp_path / "results" / "r.json", command="dvc exp run -S x=1", profile=Path("p.yaml"),
                 seconds=seconds, total=90.0)  # fmt: skip
    rec = json.loads((tmp_path / "results" / "r.json").read_text())
    assert rec["command"] == "dvc exp run -S x=1" and rec["wall_minutes"] == 1.5
    assert rec["metrics"] == {"metrics/eval/a.json": {"macro_auc": 0.9}}
    import hashlib

    assert rec["dvc_lock_md5"] == hashlib.md5(b"schema: '2.0'\n").hexdigest()


def test_the_record_keeps_only_the_metrics_of_this_runs_stages(tmp_path, monkeypatch):
    """dvc.lock keeps the entries of a foreach item a params change removed (the demo's
    evaluate@mobilenetv2 after a real run without it): the current stage list decides."""
    import json

    from tools.profile import lock_outputs, write_record

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "eval").mkdir(parents=True)
    for name in ("a", "b"):
        (tmp_path / "metrics" / "eval" / f"{name}.json").write_text('{"macro_auc": 0.9}')
    (tmp_path / "metrics" / "split.json").write_text('{"n": 1}')
    lock = {"schema": "2.0", "stages": {
        f"evaluate@{n}": {"cmd": "x", "outs": [{"path": f"metrics/eval/{n}.json"}]} for n in ("a", "b")
    }}  # fmt: skip
    lock["stages"]["split"] = {"cmd": "y", "outs": [{"path": "metrics/split.json"}]}
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    assert lock_outputs(tmp_path / "dvc.lock", ["evaluate@a", "split"]) == [
        Path("metrics/eval/a.json"),
        Path("metrics/split.json"),
    ]
    # outside a DVC project the stage list is unknown: every stage in the lock counts
    write_record(tmp_path / "r.json", command="c", profile=Path("p.yaml"), seconds={}, total=1.0)
    assert set(json.loads((tmp_path / "r.json").read_text())["metrics"]) == {
        "metrics/eval/a.json",
        "metrics/eval/b.json",
        "metrics/split.json",
    }
    import tools.profile

    monkeypatch.setattr(tools.profile, "current_stages", lambda: ["evaluate@a", "split"])
    write_record(tmp_path / "r.json", command="c", profile=Path("p.yaml"), seconds={}, total=1.0)
    assert set(json.loads((tmp_path / "r.json").read_text())["metrics"]) == {
        "metrics/eval/a.json",
        "metrics/split.json",
    }


def test_a_bad_set_value_is_named_as_set_and_a_bad_profile_value_as_the_profile(tmp_path, capsys):
    """issue 22: a --set error said "profile:", sending the user to a file that was fine."""
    prof = tmp_path / "p.yaml"
    prof.write_text("train:\n  common: {epochs: 3}\n")
    assert main([str(prof), "--print", "--set", "evaluate.ci_level=7", "--set", "evaluate.tta=true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set evaluate.ci_level=7: evaluate.ci_level: 7")
    assert "profile" not in err and "evaluate.tta" not in err
    assert main([str(prof), "--print", "--set", "nosuch.key=1"]) == 1
    assert capsys.readouterr().err.startswith("error: --set nosuch.key=1: ")
    prof.write_text("train:\n  common: {epochs: -1}\n")
    assert main([str(prof), "--print", "--set", "evaluate.tta=true"]) == 1
    assert capsys.readouterr().err.startswith(f"error: profile {prof}: train.common.epochs: -1")
    assert main([str(prof), "--print", "--set", "novalue"]) == 1
    assert "error: --set 'novalue': expected key=value" in capsys.readouterr().err


def test_the_record_keeps_only_the_members_its_params_trained(tmp_path, monkeypatch):
    """issue 22: after `make real` (resnet_small, custom_cnn), the demo's metrics/eval/mobilenetv2.json
    and metrics/train/mobilenetv2.json are still on disk; the params of the run say they are not its."""
    import json

    import tools.profile
    from tools.profile import write_record

    monkeypatch.chdir(tmp_path)
    for bb in ("mobilenetv2", "custom_cnn", "resnet_small"):
        for kind in ("eval", "train"):
            (tmp_path / "metrics" / kind).mkdir(parents=True, exist_ok=True)
            (tmp_path / "metrics" / kind / f"{bb}.json").write_text('{"macro_auc": 0.9}')
    (tmp_path / "metrics" / "train" / "mobilenetv2").mkdir()
    (tmp_path / "metrics" / "train" / "mobilenetv2" / "metrics.json").write_text('{"step": 3}')
    (tmp_path / "metrics" / "ensemble.json").write_text('{"weight_custom_cnn": 0.5}')
    (tmp_path / "params.yaml").write_text("train:\n  backbones: [resnet_small, custom_cnn]\n")
    # a lock that lists every stage (DVC keeps stale foreach entries) and no stage list from DVC
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    monkeypatch.setattr(tools.profile, "current_stages", lambda: None)
    write_record(tmp_path / "r.json", command="c", profile=Path("p.yaml"), seconds={}, total=1.0)
    assert set(json.loads((tmp_path / "r.json").read_text())["metrics"]) == {
        "metrics/ensemble.json",
        "metrics/eval/custom_cnn.json",
        "metrics/eval/resnet_small.json",
        "metrics/train/custom_cnn.json",
        "metrics/train/resnet_small.json",
    }


def test_a_gpu_profile_without_a_gpu_stops_before_any_stage_runs(capsys):
    """profiles/gpu.yaml asks train.device: gpu: on tensorflow-cpu the runner refuses at once, with
    the train stage's line, instead of after the data stages have run for minutes."""
    from skinlesion.model.distribute import visible_gpus

    try:
        visible_gpus("gpu")
    except Exception:
        pass
    else:
        pytest.skip("this machine has a GPU")
    rc = main([str(REPO / "profiles" / "gpu.yaml"), "--params", str(REPO / "params.yaml")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.startswith("dvc exp run ")  # the command it would have run, and nothing ran
    assert "Running stage" not in out + err
    assert err.strip().splitlines()[-1].startswith("error: train.device: gpu, but TensorFlow")
    assert "make setup GPU=1" in err
