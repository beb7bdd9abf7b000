"""The Keras callbacks of a training run, in the order ``fit`` gets them:

* :class:`EpochEval` — validation at epoch end (exact macro AUC / F1), timing and images/s;
* :class:`ResumableEarlyStopping`, :class:`ResumablePlateau` — Keras's early stopping and
  ReduceLROnPlateau, continued after a resume from the counters :mod:`skinlesion.model.resume`
  keeps;
* :class:`Recorder` — the history row, the best weights, the commit of the resume point, the log
  line and DVCLive;
* :class:`Progress` — a tqdm bar over an epoch's steps.

They work under ``fit`` and under the custom multi-worker loop
(:func:`skinlesion.model.distribute.custom_fit`) alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import macro_auc, macro_f1
from skinlesion.model.live import live_log
from skinlesion.model.phases import Phase
from skinlesion.model.resume import Backup, TrainState, best_file_name, resume_failpoint

log = logging.getLogger(__name__)

__all__ = ["EpochEval", "Progress", "Recorder", "ResumableEarlyStopping", "ResumablePlateau"]


class EpochEval(keras.callbacks.Callback):
    """Validation at epoch end, exact macro AUC / F1 (:mod:`skinlesion.measure.metrics`), timing and images/s.

    Runs first in the callback list and writes into ``logs``, so early stopping, the
    plateau schedule, the best checkpoint and the loggers all see the same numbers, under
    ``fit`` and under the custom multi-worker loop alike.
    """

    def __init__(self, val_ds: Any, loss_fn: Any, n_train: int, predict: Any):
        super().__init__()
        self.val_ds, self.loss_fn, self.n_train, self.predict = val_ds, loss_fn, n_train, predict
        self.y_val = np.concatenate([np.argmax(y, -1) for _, y in val_ds.as_numpy_iterator()])
        self.y_val_onehot = np.eye(len(CLASSES), dtype=np.float32)[self.y_val]

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.t0 = time.perf_counter()

    def score(self) -> dict[str, float]:
        """The model's validation loss, accuracy, macro AUC and macro F1 now."""
        probs = np.concatenate([self.predict(x) for x, _ in self.val_ds])
        pred = probs.argmax(1)
        return {
            "val_loss": float(self.loss_fn(self.y_val_onehot, probs)),
            "val_accuracy": float(np.mean(pred == self.y_val)),
            "val_macro_auc": macro_auc(self.y_val, probs),
            # over the classes in truth or prediction: one predicted but absent scores 0
            "val_macro_f1": macro_f1(self.y_val, pred, np.union1d(self.y_val, pred)),
        }

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs = logs if logs is not None else {}
        train_s = time.perf_counter() - self.t0
        logs.update(self.score())
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["train_seconds"] = train_s
        logs["images_per_s"] = self.n_train / train_s if train_s > 0 else 0.0
        logs["seconds"] = time.perf_counter() - self.t0


class Recorder(keras.callbacks.Callback):
    """Once per epoch, after the callbacks that update counters: the history row, the best
    weights, the commit of the resume point, then the log line and DVCLive.

    ``resumable`` names the callbacks whose counters the state carries. The commit order is
    the one :class:`Backup` describes; the failpoints mark the windows between its writes.
    ``commit_each_epoch`` False (the multi-worker loop keeps no epoch checkpoint): the state
    is committed only at the phase's end, and best weights wait there under their own names.
    """

    def __init__(self, state: TrainState, backup: Backup, phase: Phase, total_epochs: int, monitor: str,
                 live: Any, resumable: Mapping[str, Any], commit_each_epoch: bool = True):  # fmt: skip
        super().__init__()
        self.state, self.backup, self.phase = state, backup, phase
        self.total, self.monitor, self.live = total_epochs, monitor, live
        self.resumable, self.commit_each_epoch = dict(resumable), commit_each_epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        done, state = epoch + 1, self.state
        row = {"epoch": done, "phase": self.phase.index}
        row.update({k: float(v) for k, v in dict(logs or {}).items() if np.isscalar(v)})
        state.history.append(row)
        value = row.get(self.monitor, float("nan"))
        new_best = math.isfinite(value) and (state.best_value is None or value > state.best_value)
        counters = {name: cb.counters() for name, cb in self.resumable.items()}
        # Early stopping restores its own best at the phase's end; in a fine-tuning phase that
        # can be another epoch than the overall best, and a resumed run needs its weights too.
        phase_best = counters.get("early_stopping", {}).get("best_epoch") == done
        if new_best or phase_best:
            name = self.backup.save_best(self.model, done)
            if new_best:
                state.best_value, state.best_epoch, state.best_file = value, done, name
            resume_failpoint("after_best_weights", done)
        if self.commit_each_epoch:
            state.checkpoint = self.backup.save_checkpoint(self.model, done)
            resume_failpoint("after_checkpoint", done)
            state.epoch, state.stopped, state.counters = done, bool(self.model.stop_training), counters
            self.backup.commit(state)
            resume_failpoint("after_commit", done)
        log.info(
            "epoch %d/%d [%s] loss %.4f acc %.3f | val_loss %.4f val_acc %.3f val_macro_auc %.4f "
            "val_macro_f1 %.4f | lr %.2e | %.1f s, %.0f img/s%s",
            done, self.total, self.phase.name, row.get("loss", float("nan")),
            row.get("accuracy", float("nan")), row["val_loss"], row["val_accuracy"],
            row["val_macro_auc"], row["val_macro_f1"], row["lr"], row["seconds"],
            row["images_per_s"], "  *best*" if state.best_epoch == done else "",
        )  # fmt: skip
        live_log(self.live, row)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping (best weights restored at the phase's end) that continues after a
    resume: Keras resets its counters in ``on_train_begin``, so a resumed phase would wait
    ``patience`` epochs more than an uninterrupted one and restore only a best seen since."""

    def __init__(self, backup: Backup, restored: Mapping[str, Any] | None = None, **kw: Any):
        super().__init__(mode="max", restore_best_weights=True, verbose=0, **kw)
        self.backup, self.restored = backup, dict(restored or {})

    def on_train_begin(self, logs: Any = None) -> None:
        super().on_train_begin(logs)
        r = self.restored
        if r.get("best_epoch") is None:
            return
        self.wait, self.best, self.best_epoch = int(r["wait"]), float(r["best"]), int(r["best_epoch"]) - 1
        self.best_weights = self.backup.read_weights(r["weights"])
        log.info(
            "early stopping resumes: %d epoch(s) without gain since epoch %d (%s %.4f), patience %d",
            self.wait, r["best_epoch"], self.monitor, self.best, self.patience,
        )  # fmt: skip

    def counters(self) -> dict[str, Any]:
        """What the resume state keeps of this callback (``restored`` on resume)."""
        if self.best is None:
            return {"wait": int(self.wait), "best": None, "best_epoch": None, "weights": None}
        epoch = int(self.best_epoch) + 1  # Keras counts from 0, the history from 1
        return {"wait": int(self.wait), "best": float(self.best), "best_epoch": epoch,
                "weights": best_file_name(epoch)}  # fmt: skip


class ResumablePlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras's ReduceLROnPlateau that continues after a resume: its counters (reset by Keras in
    ``on_train_begin``) and the learning rate it has reached come back from the state."""

    def __init__(self, restored: Mapping[str, Any] | None = None, **kw: Any):
        super().__init__(mode="max", verbose=0, **kw)
        self.restored = dict(restored or {})

    def on_train_begin(self, logs: Any = None) -> None:
        super().on_train_begin(logs)
        r = self.restored
        if not r:
            return
        self.wait, self.cooldown_counter = int(r["wait"]), int(r["cooldown_counter"])
        self.best = r["best"]
        self.model.optimizer.learning_rate = float(r["lr"])
        log.info(
            "learning-rate plateau resumes: lr %.2e, %d epoch(s) without gain, cooldown %d",
            r["lr"], self.wait, self.cooldown_counter,
        )  # fmt: skip

    def counters(self) -> dict[str, Any]:
        """What the resume state keeps of this callback (``restored`` on resume)."""
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter), "best": best,
                "lr": lr}  # fmt: skip


class Progress(keras.callbacks.Callback):
    """A tqdm bar over the steps of an epoch (silent when stderr is not a terminal)."""

    def __init__(self, steps: int, total_epochs: int):
        super().__init__()
        self.steps, self.total = steps, total_epochs
        self.bar: Any = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.total}", unit="step",
                        leave=False, disable=None)  # fmt: skip

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.bar is not None:
            self.bar.close()
