"""Resume of the train stage: the on-disk state and the weights it names agree at every instant,
and early stopping's and ReduceLROnPlateau's counters continue where a killed run left them.

The kill test uses the stage's failpoint hook (``SKINLESION_TRAIN_FAILPOINT``, see
``skinlesion.model.resume.resume_failpoint``) to SIGKILL a real training process inside the window
between two of its resume writes, which a timed external kill almost never hits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from skinlesion.measure.metrics import macro_auc
from skinlesion.model.phases import Phase
from skinlesion.model.resume import FAILPOINT_ENV, Backup, TrainState
from tests.builders.training import raw_params, train_cli, write_params

REPO = Path(__file__).resolve().parents[3]

MONITOR = "val_macro_auc"


def _val_auc(model, prepared: Path, weights: list[np.ndarray]) -> float:
    from skinlesion.model.tfdata import read_split_numpy

    val = read_split_numpy(prepared, "val")
    model.set_weights(weights)
    return macro_auc(val.labels, model.predict(val.images, verbose=0))


def _npz(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _early_stop_epoch(counters: dict, rows: list[dict], patience: int) -> int | None:
    """Keras's early-stopping rule continued from ``counters`` over ``rows``: the epoch it stops at."""
    wait, best = counters["wait"], counters["best"]
    for row in rows:
        wait += 1
        if best is None or row[MONITOR] > best:
            best, wait = row[MONITOR], 0
        elif wait >= patience:
            return int(row["epoch"])
    return None


@pytest.mark.slow
def test_kill_between_best_weights_and_state_resumes_consistently(prepared, tmp_path):
    """SIGKILL right after a new best's weights are written, before the state that records them:
    the state left on disk names weights that are its best epoch's, and the resumed run continues
    early stopping's count instead of starting it over."""
    epochs, patience = 8, 3
    # recalibrate_bn off: the saved model must be exactly the best epoch's weights (precise BN
    # would replace its BN statistics; tests/unit/model/test_train.py covers that path)
    raw = raw_params(common={"epochs": epochs, "schedule": "plateau", "plateau_patience": 1,
                              "early_stopping_patience": patience, "recalibrate_bn": False})  # fmt: skip
    raw["base"] = {"seed": 1}  # a seed whose run gains again after epochs without gain (the CPU run is exact)
    pfile = write_params(tmp_path / "params.yaml", raw)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(FAILPOINT_ENV, None)
    cmd, ckpt = train_cli(tmp_path, prepared, pfile), tmp_path / "ckpt"

    # the first new best from epoch 4 on: by then early stopping has counted an epoch without gain
    killed = subprocess.run(cmd, cwd=REPO, env={**env, FAILPOINT_ENV: "after_best_weights@4"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((ckpt / "state.json").read_text())
    k = state["epoch"] + 1  # the epoch the kill interrupted
    assert f"killing this process at after_best_weights, count {k}" in killed.stderr
    at_kill = tmp_path / "at-kill"  # the resumed run rewrites the folder; keep what the kill left
    shutil.copytree(ckpt, at_kill)
    assert not (tmp_path / "model").exists()
    es = state["counters"]["early_stopping"]
    assert es["wait"] >= 1, "no epoch without gain before the kill: the counter check would show nothing"

    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming custom_cnn after epoch {k - 1} of {epochs}" in res.stderr
    from skinlesion.model.networks import load_model

    model = load_model(tmp_path / "model" / "model.keras")

    # 1. what the kill left: the state's best weights score exactly its recorded best value
    assert state["best_epoch"] < k and [r["epoch"] for r in state["history"]] == list(range(1, k))
    recorded = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    assert state["best_value"] == recorded[MONITOR]
    assert _val_auc(model, prepared, _npz(at_kill / state["best_file"])) == pytest.approx(
        state["best_value"], abs=1e-4
    )
    assert (at_kill / state["checkpoint"]).is_dir()

    # 2. the resumed run: its model is its recorded best epoch's
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == k - 1
    assert _val_auc(model, prepared, _weights_of(tmp_path)) == pytest.approx(
        m["best_val_macro_auc"], abs=1e-4
    )

    # 3. early stopping continued its count from the state (a fresh count would stop elsewhere)
    assert (
        f"early stopping resumes: {es['wait']} epoch(s) without gain since epoch {es['best_epoch']}"
        in res.stderr
    )
    hist = json.loads((tmp_path / "model" / "history.json").read_text())
    resumed = [r for r in hist if r["epoch"] >= k]
    assert m["epochs_run"] == (_early_stop_epoch(es, resumed, patience) or epochs)
    assert sorted(p.name for p in ckpt.iterdir()) == ["DONE"]


def _weights_of(root: Path) -> list[np.ndarray]:
    from skinlesion.model.networks import load_model

    return load_model(root / "model" / "model.keras").get_weights()


# --------------------------------------------------------------------------- the callbacks alone

VALUES = [0.50, 0.60, 0.55, 0.58, 0.61, 0.59, 0.59, 0.59, 0.59, 0.59]


def _drive(root: Path, *, kill_after: int | None = None) -> tuple[list[tuple], list[np.ndarray] | None]:
    """Feed VALUES to the stage's early stopping, plateau and recorder callbacks as ``fit`` would,
    resuming from whatever ``root`` holds. Each epoch's weights are filled with its number, so
    restored weights show which epoch they come from. ``kill_after``: stop dead after that epoch
    (no on_train_end; only the folder survives)."""
    import keras

    from skinlesion.model import callbacks as cb

    backup = Backup(root)
    state = backup.load_or_new("fingerprint")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)  # as fit has by the first epoch's end
    es = cb.ResumableEarlyStopping(backup, state.counters.get("early_stopping"), monitor=MONITOR, patience=3)
    plateau = cb.ResumablePlateau(
        state.counters.get("plateau"), monitor=MONITOR, factor=0.5, patience=1, min_lr=1e-4
    )
    phase = Phase(0, "full", -1, 0, len(VALUES), 1e-2)
    recorder = cb.Recorder(state, backup, phase, len(VALUES), MONITOR, None,
                           {"early_stopping": es, "plateau": plateau})  # fmt: skip
    callbacks = keras.callbacks.CallbackList([es, plateau, recorder], model=model)
    if state.checkpoint is not None:
        backup.restore_checkpoint(model, state.checkpoint)
    callbacks.on_train_begin()
    trace = []
    for epoch in range(state.epoch, len(VALUES)):
        model.set_weights([np.full_like(w, epoch + 1) for w in model.get_weights()])
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        logs = {MONITOR: VALUES[epoch], "val_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.5, "lr": lr,
                "seconds": 0.0, "images_per_s": 0.0}  # fmt: skip
        callbacks.on_epoch_end(epoch, logs)
        trace.append((epoch + 1, es.wait, es.best, plateau.wait, lr, model.stop_training))
        if model.stop_training:
            break
        if kill_after == epoch + 1:
            return trace, None
    callbacks.on_train_end()
    return trace, model.get_weights()


def test_early_stopping_and_plateau_counters_survive_a_resume(tmp_path):
    """Killed after any epoch and resumed from the folder, the callbacks decide as the
    uninterrupted run does: epochs without gain, learning-rate cuts, the stop, and the best
    weights restored at the end."""
    reference, final = _drive(tmp_path / "reference")
    stop = reference[-1][0]
    assert reference[-1][-1] and stop < len(VALUES)  # the sequence does make early stopping stop
    assert len({row[4] for row in reference}) > 2  # ... and the plateau cut the learning rate twice
    np.testing.assert_array_equal(final[0], np.full_like(final[0], 5))  # epoch 5 was the best
    for k in range(1, stop):
        root = tmp_path / f"killed-after-{k}"
        before, _ = _drive(root, kill_after=k)
        state = TrainState(**json.loads((root / "state.json").read_text()))
        assert state.epoch == k and (root / state.best_file).is_file()
        after, weights = _drive(root)
        assert before + after == reference, f"killed after epoch {k}"
        np.testing.assert_array_equal(weights[0], final[0])
