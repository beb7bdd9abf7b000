"""The train stage: phase plan, metrics, a full run on tiny prepared shards, resume, determinism,
distribution (MirroredStrategy on two logical CPUs, MultiWorkerMirroredStrategy on 127.0.0.1)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from skinlesion.core.errors import ParamsError, StageError
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import macro_auc, macro_f1
from skinlesion.model.phases import Phase, plan_phases
from skinlesion.model.workers import WorkerPaths, is_chief, worker_paths
from skinlesion.params.load import load_params, parse_params
from skinlesion.params.train import BACKBONES
from stages.train import main, run
from tests.builders.training import raw_params, train_cli, train_paths, write_params

REPO = Path(__file__).resolve().parents[3]


def _params(bb: str = "custom_cnn", **kw):
    return parse_params(raw_params(bb, **kw)).train


def _weights(path: Path) -> list[np.ndarray]:
    from skinlesion.model.networks import load_model

    return load_model(path).get_weights()


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """One complete run exercising the non-default paths: fusion, funnel head, plateau, XLA."""
    root = tmp_path_factory.mktemp("trained")
    params = _params(
        common={"epochs": 3, "schedule": "plateau", "deterministic": False, "monitor": "val_macro_auc"},
        backbone={"fusion": True, "head": "funnel", "funnel_units": 32, "dropout": 0.1},
        jit_compile="on",
    )
    return root, run(params, backbone="custom_cnn", prepared=prepared, seed=3, **train_paths(root))


# --------------------------------------------------------------------------- pure core


def test_plan_phases():
    kw = dict(learning_rate=1e-3, finetune_learning_rate=1e-4)
    assert plan_phases(5, pretrained=False, head_epochs=2, unfreeze=[20], **kw) == [
        Phase(0, "full", -1, 0, 5, 1e-3)
    ]
    assert plan_phases(7, pretrained=True, head_epochs=2, unfreeze=[20, -1], **kw) == [
        Phase(0, "head", None, 0, 2, 1e-3),
        Phase(1, "finetune1", 20, 2, 4, 1e-4),
        Phase(2, "finetune2", -1, 4, 7, 1e-4),  # the deeper phase takes the remainder
    ]
    assert plan_phases(2, pretrained=True, head_epochs=5, unfreeze=[-1], **kw) == [
        Phase(0, "head", None, 0, 2, 1e-3)
    ]
    # one epoch left for three fine-tuning phases: only the deepest runs
    assert plan_phases(3, pretrained=True, head_epochs=2, unfreeze=[10, 20, -1], **kw)[1:] == [
        Phase(1, "finetune3", -1, 2, 3, 1e-4)
    ]
    assert plan_phases(4, pretrained=True, head_epochs=1, unfreeze=[], **kw) == [
        Phase(0, "head", None, 0, 4, 1e-3)
    ]
    assert plan_phases(4, pretrained=True, head_epochs=0, unfreeze=[-1], **kw) == [
        Phase(0, "finetune1", -1, 0, 4, 1e-4)
    ]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        plan_phases(0, pretrained=False, head_epochs=0, unfreeze=[], **kw)


def test_macro_auc_and_f1_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1, 0], [0.4, 0.5, 0.1, 0], [0.3, 0.6, 0.1, 0], [0.1, 0.7, 0.2, 0],
                      [0.2, 0.2, 0.6, 0]])  # fmt: skip
    # class 0: positives {0.8, 0.4} vs negatives {0.3, 0.1, 0.2}: all 6 pairs ordered -> 1.0
    # class 1: positives {0.6, 0.7} vs {0.1, 0.5, 0.2}: 6/6 -> 1.0
    # class 2: positive {0.6} vs {0.1, 0.1, 0.1, 0.2}: 1.0; class 3 never occurs: left out, not 0.5
    assert macro_auc(y, probs) == pytest.approx(1.0)
    probs[4, 2] = 0.15  # now below 0.2 of image 4 (class 1): class 2 AUC 3/4
    assert macro_auc(y, probs) == pytest.approx((1 + 1 + 0.75) / 3)
    # argmax [0, 1, 1, 1, 0] (a tie goes to the first class): class 0 P = R = 1/2 -> F1 0.5;
    # class 1 P = 2/3, R = 1 -> F1 0.8; class 2 never predicted -> 0
    pred = probs.argmax(1)
    assert macro_f1(y, pred, np.union1d(y, pred)) == pytest.approx((0.5 + 0.8 + 0) / 3)  # training's classes
    assert macro_f1(y, pred, [0, 1]) == pytest.approx((0.5 + 0.8) / 2)
    assert np.isnan(macro_f1(y, pred, []))
    # a class predicted but absent: 0 among training's classes, not averaged in by the reports'
    y, pred = np.array([0, 0]), np.array([0, 1])  # class 0: P = 1, R = 1/2 -> F1 2/3
    assert macro_f1(y, pred, np.union1d(y, pred)) == pytest.approx(1 / 3)
    assert macro_f1(y, pred, np.flatnonzero(np.bincount(y))) == pytest.approx(2 / 3)


def test_macro_f1_is_sklearns_float_for_float():
    """The training curves committed by the demo were computed by scikit-learn's f1_score: the
    project's macro_f1 must give the very same floats (2 TP / (actual + predicted) per class)."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for n in (5, 37, 102, 500):
        y = rng.choice(7, n, p=[0.05, 0.05, 0.1, 0.01, 0.1, 0.67, 0.02])
        pred = rng.dirichlet(np.full(7, 0.3), n).argmax(1)
        expected = f1_score(y, pred, average="macro", zero_division=0)
        assert macro_f1(y, pred, np.union1d(y, pred)) == expected  # exactly
    assert np.isnan(macro_auc(np.zeros(3, int), np.full((3, 2), 0.5)))


def test_params_yaml_has_an_entry_for_every_backbone_and_valid_members():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(raw["train"]["backbone"]) == sorted(BACKBONES)  # dvc fails on a missing key
    p = load_params(REPO / "params.yaml")
    assert set(p.ensemble.members) <= set(p.train.backbones)
    assert p.train.for_backbone("custom_cnn").head_epochs == 0


@pytest.mark.parametrize(
    "raw, message",
    [
        (raw_params(backbone={"unfreeze": [0]}),
         "train.backbone.custom_cnn.unfreeze: 0 is not a layer count"),
        (raw_params(backbone={"unfreze": [1]}), "train.backbone.custom_cnn.unfreze: unknown key"),
        (raw_params(common={"monitor": "val_loss"}), "train.common.monitor: 'val_loss' is not one of"),
        (raw_params(strategy="tpu"), "train.strategy: 'tpu' is not one of"),
        ({"train": {"backbones": ["custom_cnn", "custom_cnn"]}, "ensemble": {"members": ["custom_cnn"]}},
         "train.backbones: listed twice"),
    ],
)  # fmt: skip
def test_bad_train_params(raw, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        parse_params(raw)


def test_dvc_stage_lists_params_per_backbone():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert stage["foreach"] == "${train.backbones}"
    do = stage["do"]
    assert "--backbone ${item}" in do["cmd"] and "--out models/${item}" in do["cmd"]
    assert "train.backbone.${item}" in do["params"] and "train.common" in do["params"]
    assert "train" not in do["params"]  # the whole section would retrain every backbone on any edit
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in do["outs"]}
    assert outs["models/${item}"]["models/${item}"]["persist"] is True
    assert outs["models/${item}.ckpt"]["models/${item}.ckpt"]["persist"] is True


# --------------------------------------------------------------------------- full runs


def test_run_writes_model_metrics_history_and_plots(trained, prepared):
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    root, res = trained
    m = json.loads((root / "metrics.json").read_text())
    assert m == res.metrics
    assert all(not isinstance(v, (dict, list)) for v in m.values())  # flat, for dvc metrics diff
    assert m["epochs_run"] == 3 and m["weights_used"] == "scratch" and m["strategy"] == "default"
    assert m["n_train"] == 42 and m["n_val"] == 21 and m["resumed_from_epoch"] == 0
    assert m["images_per_s"] > 0 and m["seconds"] >= m["train_seconds"] > 0

    with open(root / "model" / "history.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in hist] == [1, 2, 3]
    assert json.loads((root / "model" / "history.json").read_text()) == res.history
    aucs = [float(r["val_macro_auc"]) for r in hist]
    assert m["best_val_macro_auc"] == pytest.approx(max(aucs), abs=1e-6)
    assert m["best_epoch"] == 1 + int(np.argmax(aucs))
    assert m["best_val_macro_auc"] > 0.7  # one colour per class: clearly learnable

    cfg = json.loads((root / "model" / "config.json").read_text())
    assert cfg["inputs"] == ["image", "age", "sex", "localization"]
    assert cfg["augmentation_in"] == "tf.data"  # jit_compile: on
    assert cfg["preprocessing"] == "unit" and cfg["classes"] == list(CLASSES)
    assert cfg["train"]["backbone"]["head"] == "funnel"

    # the saved model holds the best epoch's weights with its BN statistics recomputed (precise
    # BN, from scratch): recomputing its val AUC gives the final_* numbers the metrics report
    val = read_split_numpy(prepared, "val")
    model = load_model(root / "model" / "model.keras")
    probs = model.predict(
        {"image": val.images, "age": val.age, "sex": val.sex, "localization": val.localization}, verbose=0
    )
    assert macro_auc(val.labels, probs) == pytest.approx(m["final_val_macro_auc"], abs=1e-4)
    assert np.mean(probs.argmax(1) == val.labels) == pytest.approx(m["final_val_accuracy"], abs=1e-6)

    tsv = (root / "live" / "plots" / "metrics" / "val" / "macro_auc.tsv").read_text().splitlines()
    assert tsv[0] == "step\tmacro_auc" and [line.split("\t")[0] for line in tsv[1:]] == ["1", "2", "3"]
    assert (root / "live" / "plots" / "metrics" / "train" / "images_per_s.tsv").is_file()
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["DONE"]


def test_failed_run_keeps_the_previous_model(trained, prepared, tmp_path):
    root, _ = trained
    out = tmp_path / "model"
    shutil.copytree(root / "model", out)
    before = (out / "model.keras").read_bytes()
    broken = tmp_path / "prepared"
    shutil.copytree(prepared, broken)
    shard = sorted(broken.glob("train-*.tfrecord"))[1]
    shard.write_bytes(shard.read_bytes()[:-40])  # a truncated record
    with pytest.raises(StageError, match=r"a training shard is corrupt .*rerun the prepare stage"):
        run(_params(common={"epochs": 1}), backbone="custom_cnn", prepared=broken, out=out,
            metrics=tmp_path / "m.json", backup=tmp_path / "ckpt")  # fmt: skip
    assert (out / "model.keras").read_bytes() == before
    assert not (tmp_path / "m.json").exists()


def test_pretrained_weights_file_trains_in_phases_with_bn_frozen(prepared, tmp_path):
    """A local weights file makes the backbone 'pretrained': head phase, then two unfreeze phases."""
    import keras

    from skinlesion.model.networks import build_backbone

    keras.utils.set_random_seed(11)
    src, _ = build_backbone("custom_cnn", 32, "none")
    weights = tmp_path / "warm.weights.h5"
    src.save_weights(weights)
    params = _params(common={"epochs": 3, "early_stopping_patience": 0},
                     backbone={"weights": str(weights), "head_epochs": 1, "unfreeze": [3, -1]})  # fmt: skip
    res = run(params, backbone="custom_cnn", prepared=prepared, seed=1, **train_paths(tmp_path))
    assert res.metrics["weights_used"] == "file"
    assert [r["phase"] for r in res.history] == [0, 1, 2]
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert [p["name"] for p in cfg["phases"]] == ["head", "finetune1", "finetune2"]
    from skinlesion.model.networks import load_model

    bb = load_model(tmp_path / "model" / "model.keras").get_layer("backbone")
    for layer in bb.layers:
        ref = src.get_layer(layer.name).get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            for a, b in zip(layer.get_weights(), ref, strict=True):  # frozen, inference mode
                np.testing.assert_array_equal(a, b)
    # the bottom conv was trainable only in the last phase (unfreeze -1) and did move
    assert not np.array_equal(bb.get_layer("block1_conv1").get_weights()[0],
                              src.get_layer("block1_conv1").get_weights()[0])  # fmt: skip


@pytest.mark.slow
def test_without_precise_bn_the_model_is_the_best_epoch_as_trained(prepared, tmp_path):
    from skinlesion.model.networks import load_model
    from skinlesion.model.tfdata import read_split_numpy

    params = _params(common={"epochs": 2, "recalibrate_bn": False})
    res = run(params, backbone="custom_cnn", prepared=prepared, seed=3, **train_paths(tmp_path))
    assert not any(k.startswith("final_") for k in res.metrics)
    val = read_split_numpy(prepared, "val")
    probs = load_model(tmp_path / "model" / "model.keras").predict(val.images, verbose=0)
    assert macro_auc(val.labels, probs) == pytest.approx(res.metrics["best_val_macro_auc"], abs=1e-4)


def test_same_seed_same_weights_other_seed_differs(prepared, tmp_path):
    params = _params(common={"epochs": 1})
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run(params, backbone="custom_cnn", prepared=prepared, seed=seed, **train_paths(tmp_path / name))
        runs[name] = _weights(tmp_path / name / "model" / "model.keras")
    for x, y in zip(runs["a"], runs["b"], strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(runs["a"], runs["c"], strict=True))


# --------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line(tmp_path, capsys):
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(raw_params()))
    args = ["--params", str(pfile), "--out", str(tmp_path / "m"), "--metrics", str(tmp_path / "m.json")]
    assert main([*args, "--backbone", "custom_cnn", "--prepared", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'nope' / 'manifest.json'}: not found; run the prepare stage first"
    assert main([*args, "--backbone", "resnet50", "--prepared", str(tmp_path)]) == 1
    assert "error: train.backbones: 'resnet50' is not listed (['custom_cnn'])" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill(prepared, tmp_path):
    pfile = write_params(
        tmp_path / "params.yaml", raw_params(common={"epochs": 8, "early_stopping_patience": 0})
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    meta = tmp_path / "ckpt" / "state.json"  # the commit record: "epoch" epochs are in its checkpoint
    proc = subprocess.Popen(train_cli(tmp_path, prepared, pfile), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if meta.is_file():
                try:
                    if json.loads(meta.read_text())["epoch"] >= 1:
                        break
                except (ValueError, KeyError):
                    pass  # caught mid-write
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = json.loads(meta.read_text())["epoch"]
    assert 1 <= done < 8
    assert not (tmp_path / "model").exists()  # a killed run leaves no half output

    res = subprocess.run(train_cli(tmp_path, prepared, pfile), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming custom_cnn after epoch {done} of 8" in res.stderr
    assert "epoch 1/8" not in res.stderr  # the finished epochs are not run again
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == done and m["epochs_run"] == 8
    hist = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [r["epoch"] for r in hist] == list(range(1, 9))
    tsv = (tmp_path / "live" / "plots" / "metrics" / "val" / "macro_auc.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 8  # curves cover the epochs of both runs
    assert m["best_val_macro_auc"] > 0.7


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(prepared, tmp_path):
    # Logical devices can only be configured before TensorFlow initialises: a fresh interpreter.
    code = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from skinlesion.core.cli import setup_logging
        from skinlesion.params.load import parse_params
        from stages.train import run
        setup_logging()
        params = parse_params({json.dumps(raw_params(strategy="mirrored", common={"epochs": 1}))}).train
        res = run(params, backbone="custom_cnn", prepared={str(prepared)!r}, out={str(tmp_path / "model")!r},
                  metrics={str(tmp_path / "m.json")!r}, backup={str(tmp_path / "ckpt")!r}, seed=1)
        print(json.dumps(res.metrics))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["strategy"] == "mirrored" and m["replicas"] == 2 and m["global_batch"] == 16
    assert m["epochs_run"] == 1 and np.isfinite(m["best_val_loss"])
    assert "strategy mirrored with 2 replica(s)" in res.stderr
    assert all(np.all(np.isfinite(w)) for w in _weights(tmp_path / "model" / "model.keras"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_two_processes_identical_weights_only_the_chief_writes(prepared, tmp_path):
    """Two workers on 127.0.0.1 with the same command line: both train to the same weights, only
    the chief writes the model, metrics and DVCLive files, the other deletes its temp copies."""
    pfile = write_params(tmp_path / "params.yaml", raw_params(strategy="multi_worker", common={"epochs": 1}))
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        (tmp_path / f"tmp{i}").mkdir()
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="3",
                   TMPDIR=str(tmp_path / f"tmp{i}"))  # fmt: skip
        log = open(tmp_path / f"w{i}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(train_cli(tmp_path, prepared, pfile), cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    try:
        for proc, _ in procs:
            proc.wait(300)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    for i in range(2):
        assert f"(worker {i} of 2)" in logs[i]
    digests = [re.findall(r"worker \d of 2: weights sha256 (\w+)", text) for text in logs]
    assert len(digests[0]) == 1 and digests[0] == digests[1]  # the workers ended with identical weights
    m = json.loads((tmp_path / "metrics.json").read_text())  # the chief's
    assert m["strategy"] == "multi_worker" and m["replicas"] == 2 and m["epochs_run"] == 1
    assert (tmp_path / "model" / "model.keras").is_file() and (tmp_path / "live" / "metrics.json").is_file()
    assert "worker1 is not the chief" in logs[1] and "is not the chief" not in logs[0]
    assert list((tmp_path / "tmp1").iterdir()) == []  # the non-chief's outputs were deleted
    assert sorted(p.name for p in (tmp_path / "ckpt.worker1").iterdir()) == ["DONE"]  # its own resume folder


@pytest.mark.parametrize(
    "cluster, task, chief",
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
    ],
)
def test_the_chief_is_tf_configs_chief_task_else_worker_0(cluster, task, chief):
    assert is_chief({"cluster": cluster, "task": task}) is chief


def test_only_the_chief_writes_the_requested_paths_others_a_temp_folder_they_delete(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    paths = {"out": tmp_path / "model", "metrics": tmp_path / "m.json", "live": tmp_path / "live",
             "backup": tmp_path / "ckpt"}  # fmt: skip
    cluster = {"worker": ["a:1", "b:1"]}
    for tf_config in (None, {"cluster": cluster, "task": {"type": "worker", "index": 0}}):
        with worker_paths(tf_config, **paths) as where:
            assert where == WorkerPaths(**paths, chief=True)
    with (
        pytest.raises(RuntimeError, match="boom"),
        worker_paths({"cluster": cluster, "task": {"type": "worker", "index": 1}}, **paths) as where,
    ):
        assert not where.chief and where.backup == tmp_path / "ckpt.worker1"
        (scratch,) = (tmp_path / "tmp").iterdir()
        assert {where.out.parent, where.metrics.parent, where.live.parent} == {scratch}
        where.out.mkdir()
        (where.out / "model.keras").write_text("x")
        where.metrics.write_text("{}")
        raise RuntimeError("boom")  # deleted on the way out, whatever the outcome
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # nothing at the requested paths


@pytest.mark.gpu
def test_each_concurrent_stage_sees_only_its_own_gpu():
    """Where GPUs are present: one stage process per GPU id the retrain flow would hand on
    (``CUDA_VISIBLE_DEVICES=<id>``), all at once; each one's runtime sees exactly one GPU, each a
    different one, the one that id names."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU visible")
    from flows.dvcops import subprocess_env
    from flows.retrain import gpu_devices

    probe = textwrap.dedent("""
        import json
        from skinlesion.model.distribute import configure_runtime
        rt = configure_runtime("auto", "off", "off")
        from tensorflow.python.client import device_lib
        buses = [d.physical_device_desc.split("pci bus id: ")[1].split(",")[0]
                 for d in device_lib.list_local_devices() if d.device_type == "GPU"]
        print(json.dumps({"gpus": rt.gpus, "kind": rt.kind, "buses": buses}))
    """)

    def start(extra: dict[str, str]) -> subprocess.Popen:
        env = subprocess_env({"TF_CPP_MIN_LOG_LEVEL": "3", **extra})  # as the flow starts a stage
        return subprocess.Popen([sys.executable, "-c", probe], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def result(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    devices = gpu_devices()
    every = result(start({}))["buses"]  # all the GPUs, in the order device ids count them
    seen = [result(p) for p in [start({"CUDA_VISIBLE_DEVICES": d}) for d in devices]]
    assert [r["gpus"] for r in seen] == [1] * len(devices)
    assert all(r["kind"] == "default" for r in seen)  # one GPU: no MirroredStrategy
    assert [r["buses"] for r in seen] == [[bus] for bus in every]  # each its own, and a different one


def test_multi_worker_without_tf_config_is_a_clear_error(prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(
        StageError, match="train.strategy: multi_worker needs the TF_CONFIG environment variable"
    ):
        run(
            _params(strategy="multi_worker"),
            backbone="custom_cnn",
            prepared=prepared,
            **train_paths(tmp_path),
        )
