"""Train stage (``train@<backbone>``): one classifier per backbone from the prepared shards.

Reads ``data/prepared`` (TFRecord shards + manifest, see :mod:`skinlesion.model.tfdata`) and writes, for one
backbone:

* ``<out>/model.keras`` — takes raw uint8 RGB (augmentation and the family's preprocessing are
  inside), loads with ``safe_mode=True`` once :mod:`skinlesion.model.networks` is imported;
* ``<out>/config.json`` (everything the run was built from), ``<out>/history.csv`` / ``.json``;
* ``<metrics>`` — flat JSON for ``dvc metrics``: best val macro AUC / F1, epochs, wall time,
  images/s, which weights were used;
* ``<live>/`` — DVCLive per-epoch metrics and plots (``dvc plots``).

Training runs in phases: the new head alone on a frozen pretrained backbone, then one or more
fine-tuning phases with the top N backbone layers unfrozen (``train.backbone.<bb>.unfreeze``).
A backbone without pretrained weights (custom_cnn, or the offline fallback) trains whole in a
single phase. The kept weights are those of the best epoch by ``train.common.monitor``.

:func:`run` reads as its parts: build the model and data (:func:`_build`), find the resume point
(:func:`_resume_point`), fit one phase (:func:`_fit_phase`), write the outputs
(:func:`_write_outputs`).

Resume: ``<backup>`` (a folder that outlives a killed run, see :class:`Backup`) holds
``state.json`` and the weight files it names. After every epoch the stage writes, in this order:
the epoch's weights as ``best-<epoch>.npz`` when it is a new best; ``epoch-<epoch>/`` (weights and
optimizer); ``state.json`` naming both (one rename: the commit); and only then deletes the files
the previous state named. So at every instant the state on disk, its checkpoint and its best
weights belong to the same epochs; what a killed run wrote after its last commit is deleted on
resume. The state also carries early stopping's and ReduceLROnPlateau's counters and the current
learning rate, so a resumed run stops and decays where the uninterrupted one would. A different
configuration or data discards the backup. ``<out>`` is replaced atomically at the very end, so a
failed or killed run leaves the previous model untouched.

Multi-worker (``train.strategy: multi_worker``): every worker trains the same model, but only the
chief (TF_CONFIG's ``chief`` task, else worker 0) writes ``<out>``, ``<metrics>`` and ``<live>``;
the others write theirs into a temp folder they delete at the end, so two workers on one host
never write the same file. Each worker keeps its own resume folder (``<backup>`` on the chief,
``<backup>.<task><index>`` on the others); the custom multi-worker loop commits only at phase
ends, so a killed cluster restarts its unfinished phase.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, atomic_file, failpoint, write_json
from skinlesion.core.schema import CLASSES
from skinlesion.measure.metrics import macro_auc
from skinlesion.params.base import BaseParams
from skinlesion.params.schema import load_sections
from skinlesion.params.train import TrainCommonParams, TrainParams

log = logging.getLogger(__name__)

__all__ = [
    "Backup",
    "Phase",
    "TrainResult",
    "TrainState",
    "WorkerPaths",
    "callback_types",
    "is_chief",
    "plan_phases",
    "macro_auc",
    "macro_f1",
    "metadata_dropout",
    "run",
    "main",
    "worker_paths",
]

STATE = "state.json"
DONE = "DONE"
STATE_VERSION = 2  # 1: Keras BackupAndRestore beside the state (not resumable any more)
# Test hook (see _failpoint): names a point between the resume writes where the process kills itself.
FAILPOINT_ENV = "SKINLESION_TRAIN_FAILPOINT"


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class Phase:
    """One ``fit`` call: epochs ``start..end-1`` (global, 0-based) with a fixed trainable set."""

    index: int
    name: str  # "head" | "finetune<k>" | "full"
    depth: int | None  # None: backbone frozen; -1: all layers trainable; N: the top N
    start: int
    end: int
    learning_rate: float

    @property
    def epochs(self) -> int:
        return self.end - self.start


def plan_phases(
    epochs: int,
    *,
    pretrained: bool,
    head_epochs: int,
    unfreeze: Sequence[int],
    learning_rate: float,
    finetune_learning_rate: float,
) -> list[Phase]:
    """Split the epoch budget into the head-only phase and the fine-tuning phases.

    Without pretrained weights there is nothing to protect, so the whole network trains from
    the first epoch. Otherwise ``head_epochs`` (capped by the budget) go to the head alone and
    the rest is shared equally between the ``unfreeze`` phases, later (deeper) phases taking the
    remainder; a phase left with no epoch is dropped. No ``unfreeze`` entry: head only.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if not pretrained:
        return [Phase(0, "full", -1, 0, epochs, learning_rate)]
    if not unfreeze:
        return [Phase(0, "head", None, 0, epochs, learning_rate)]
    phases: list[Phase] = []
    head = min(head_epochs, epochs)
    if head > 0:
        phases.append(Phase(0, "head", None, 0, head, learning_rate))
    rest, n = epochs - head, len(unfreeze)
    base, extra = divmod(rest, n)
    start = head
    for k, depth in enumerate(unfreeze):
        size = base + (1 if k >= n - extra else 0)
        if size == 0:
            continue
        phases.append(
            Phase(len(phases), f"finetune{k + 1}", depth, start, start + size, finetune_learning_rate)
        )
        start += size
    return phases


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 of the argmax prediction over the classes seen in truth or prediction."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, probs.argmax(axis=1), average="macro", zero_division=0))


def _fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _class_counts(manifest: dict[str, Any], split: str) -> list[int]:
    info = manifest["splits"][split]
    counts = info.get("class_counts")
    if isinstance(counts, dict):
        return [int(counts.get(c, 0)) for c in CLASSES]
    if isinstance(counts, list) and len(counts) == len(CLASSES):
        return [int(c) for c in counts]
    raise StageError(f"manifest.json: splits.{split}.class_counts is missing or malformed: {counts!r}")


def is_chief(tf_config: Mapping[str, Any]) -> bool:
    """Whether this TF_CONFIG task is the cluster's chief: TensorFlow's own rule, the ``chief``
    task when the cluster lists one, else worker 0."""
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


# --------------------------------------------------------------------------- resume state


@dataclass
class TrainState:
    """The resume point, as committed to ``<backup>/state.json``.

    It names every weight file a resumed run needs; each was written before the state that names
    it, so a committed state never points at a missing file or at another epoch's weights.
    """

    fingerprint: str
    version: int = STATE_VERSION
    history: list[dict[str, float]] = field(default_factory=list)
    phases_done: list[int] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_file: str | None = None  # weights of best_epoch
    # Inside the first unfinished phase: weights + optimizer after `epoch` (1-based) epochs ...
    epoch: int = 0
    checkpoint: str | None = None
    stopped: bool = False  # ... and whether early stopping ended that phase there
    # That phase's early stopping / ReduceLROnPlateau state ({"early_stopping": {...}, "plateau": {...}}).
    counters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def files(self) -> set[str]:
        """The names in ``<backup>`` this state needs (besides ``state.json``)."""
        names = {self.best_file, self.checkpoint}
        names.add(self.counters.get("early_stopping", {}).get("weights"))
        if self.phases_done:
            names.add(_phase_file(self.phases_done[-1]))
        return {n for n in names if n}


def _phase_file(index: int) -> str:
    return f"phase-{index}.npz"


def _failpoint(point: str, epoch: int) -> None:
    """Test hook (``skinlesion.core.outputs.failpoint``): ``SKINLESION_TRAIN_FAILPOINT=<point>[@N]`` kills
    this process at ``point`` of the first epoch >= N. Points: ``after_best_weights`` (new best
    weights written, state not yet), ``after_checkpoint`` (epoch checkpoint written, state not
    yet), ``after_commit``. tests/unit/test_train_resume.py kills a real run inside those windows.
    """
    failpoint(FAILPOINT_ENV, point, epoch)


class Backup:
    """The resume folder: ``state.json`` (the commit record) and the weight files it names.

    Writes come in a fixed order (weights, then the state naming them, then removal of what the
    previous state named), each file or folder atomically, so a kill at any instant leaves a
    committed state whose files are all present and belong to the epochs it records.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def load_or_new(self, fingerprint: str) -> TrainState:
        """The committed state of an earlier run with the same fingerprint, or a fresh one."""
        path = self.root / STATE
        if path.is_file() and not (self.root / DONE).exists():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                state = TrainState(**raw) if raw.get("version") == STATE_VERSION else None
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("%s: unreadable (%s); starting afresh", path, e)
            else:
                if state is not None and state.fingerprint == fingerprint:
                    self._prune(state)  # what a killed run wrote after its last commit
                    return state
                log.info("%s: from a different configuration, data or version; starting afresh", self.root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        state = TrainState(fingerprint=fingerprint)
        self.commit(state)
        return state

    def save_best(self, model: Any, epoch: int) -> str:
        """Write the weights after ``epoch`` under that epoch's own name (the previous best stays
        until a state no longer names it)."""
        name = _best_file(epoch)
        _save_weights_npz(model, self.root / name)
        return name

    def save_checkpoint(self, model: Any, epoch: int) -> str:
        """Weights and optimizer slots after ``epoch`` (Keras's ``.weights.h5`` holds both)."""
        name = f"epoch-{epoch:04d}"
        with atomic_dir(self.root / name) as tmp:
            model.save_weights(tmp / "model.weights.h5")
        return name

    def save_phase(self, model: Any, index: int) -> str:
        """The weights a finished phase leaves (after early stopping restored its best)."""
        name = _phase_file(index)
        _save_weights_npz(model, self.root / name)
        return name

    def restore_checkpoint(self, model: Any, name: str) -> None:
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # slots must exist to be loaded into
        model.load_weights(self.root / name / "model.weights.h5")

    def read_weights(self, name: str) -> list[np.ndarray]:
        with np.load(self.root / name) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    def commit(self, state: TrainState) -> None:
        """Write ``state`` (one atomic rename), then remove the files it no longer names."""
        with atomic_file(self.root / STATE, "w", encoding="utf-8") as fh:
            json.dump(dataclasses.asdict(state), fh, allow_nan=True)
        self._prune(state)

    def finish(self, fingerprint: str) -> None:
        """Training is complete: the folder is no longer a resume point. Keep only a marker (the
        folder is a DVC output, and the marker says why it is empty); the marker comes first, so
        a kill half-way never leaves a resumable state of a finished run."""
        (self.root / DONE).write_text(f"{fingerprint}\n")
        for p in self.root.iterdir():
            if p.name != DONE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _prune(self, state: TrainState) -> None:
        keep = state.files() | {STATE}
        for p in self.root.iterdir():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TrainResult:
    backbone: str
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int
    chief: bool = True  # False: a non-chief worker, whose outputs went to a deleted temp folder


# --------------------------------------------------------------------------- TF parts


def metadata_dropout(features: Mapping[str, Any], rate: float, seed: Any) -> dict[str, Any]:
    """A batch of fusion features with each of age, sex and localization replaced by "unknown"
    (NaN age, ``SEXES.index("unknown")``, ``LOCALIZATIONS.index("unknown")``), independently per
    image and field, with probability ``rate``; ``image`` and any other key pass through.

    Why: the bundle and the service feed a fusion member all three unknown when an image comes
    without metadata, a combination that is rare in the training set (HAM10000 has almost every
    field filled in); dropping fields at random puts it, and every partial case, in the training
    distribution (all three unknown in ``rate**3`` of the images). ``seed`` is a stateless seed
    (shape ``[2]`` integers): the same seed gives the same mask, under TF op determinism too.
    """
    import tensorflow as tf

    from skinlesion.core.schema import LOCALIZATIONS, SEXES

    if rate <= 0:
        return dict(features)
    age = tf.convert_to_tensor(features["age"])
    sex = tf.convert_to_tensor(features["sex"])
    loc = tf.convert_to_tensor(features["localization"])
    drop = tf.random.stateless_uniform([tf.shape(age)[0], 3], seed=seed) < rate
    return {
        **features,
        "age": tf.where(drop[:, 0], tf.constant(float("nan"), age.dtype), age),
        "sex": tf.where(drop[:, 1], tf.constant(SEXES.index("unknown"), sex.dtype), sex),
        "localization": tf.where(drop[:, 2], tf.constant(LOCALIZATIONS.index("unknown"), loc.dtype), loc),
    }


def _datasets(
    prepared: Path,
    *,
    n_train: int,
    with_meta: bool,
    batch: int,
    shuffle_buffer: int,
    seed: int,
    cache: bool,
    drop_remainder: bool = False,
    augment: list[Any] | None = None,
    metadata_dropout_rate: float = 0.0,
) -> tuple[Any, Any]:
    """Training (shuffled, batched, prefetched) and validation datasets from the shards.

    ``augment``: Keras augmentation layers to run here, on batches, instead of inside the model
    (only when the model is XLA-compiled; images stay uint8 so the model's input is unchanged).
    ``metadata_dropout_rate`` (with ``with_meta``): :func:`metadata_dropout` on the training
    batches, drawn anew every epoch; the validation set keeps its metadata.
    """
    import keras
    import tensorflow as tf

    from skinlesion.model.tfdata import read_split

    k = len(CLASSES)

    def onehot(x: Any, y: Any) -> Any:
        return x, tf.one_hot(y, k)

    train = (
        read_split(prepared, "train", with_meta=with_meta, ordered=False)
        # Interleaved shards have an unknown length; stating it lets Keras count the steps.
        .apply(tf.data.experimental.assert_cardinality(n_train))
        .map(onehot, num_parallel_calls=tf.data.AUTOTUNE)
    )
    if cache:
        # Decoded uint8 images: ~12 KB each at 64 px; the shards are read once, later epochs
        # come from memory. Caching before the shuffle keeps the per-epoch reshuffle.
        train = train.cache()
    train = train.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).batch(
        batch, drop_remainder=drop_remainder
    )
    if with_meta and metadata_dropout_rate > 0:
        # After the cache, so every epoch draws new masks. One int64 per batch from a seeded
        # stream that re-seeds each iteration (epoch) deterministically seeds a stateless draw:
        # reruns with the same seed drop the same fields, with TF op determinism on. An op seed
        # of its own: with the shuffle's, the masks would come from the shuffle's random stream.
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)

        def drop_meta(xy: Any, r: Any) -> Any:
            x, y = xy
            return metadata_dropout(x, metadata_dropout_rate, tf.stack([r, tf.zeros_like(r)])), y

        train = tf.data.Dataset.zip((train, draws)).map(drop_meta, num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        pipeline = keras.Sequential(augment, name="augment")

        def augment_batch(x: Any, y: Any) -> Any:
            image = x["image"] if with_meta else x
            image = pipeline(tf.cast(image, tf.float32), training=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
            return ({**x, "image": image} if with_meta else image), y

        train = train.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
    train = train.prefetch(tf.data.AUTOTUNE)
    val = read_split(prepared, "val", with_meta=with_meta, ordered=True).map(onehot).batch(batch).cache()
    return train, val.prefetch(tf.data.AUTOTUNE)


class CallbackTypes(NamedTuple):
    EpochEval: type
    Recorder: type
    EarlyStopping: type
    Plateau: type
    Progress: type


def callback_types() -> CallbackTypes:
    """Keras callback classes of this stage (defined lazily: Keras must not load at import)."""
    import keras

    class EpochEval(keras.callbacks.Callback):
        """Validation at epoch end, exact sklearn macro AUC / F1, timing and images/s.

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
            return {
                "val_loss": float(self.loss_fn(self.y_val_onehot, probs)),
                "val_accuracy": float(np.mean(probs.argmax(1) == self.y_val)),
                "val_macro_auc": macro_auc(self.y_val, probs),
                "val_macro_f1": macro_f1(self.y_val, probs),
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
                _failpoint("after_best_weights", done)
            if self.commit_each_epoch:
                state.checkpoint = self.backup.save_checkpoint(self.model, done)
                _failpoint("after_checkpoint", done)
                state.epoch, state.stopped, state.counters = done, bool(self.model.stop_training), counters
                self.backup.commit(state)
                _failpoint("after_commit", done)
            log.info(
                "epoch %d/%d [%s] loss %.4f acc %.3f | val_loss %.4f val_acc %.3f val_macro_auc %.4f "
                "val_macro_f1 %.4f | lr %.2e | %.1f s, %.0f img/s%s",
                done, self.total, self.phase.name, row.get("loss", float("nan")),
                row.get("accuracy", float("nan")), row["val_loss"], row["val_accuracy"],
                row["val_macro_auc"], row["val_macro_f1"], row["lr"], row["seconds"],
                row["images_per_s"], "  *best*" if state.best_epoch == done else "",
            )  # fmt: skip
            _live_log(self.live, row)

    class EarlyStopping(keras.callbacks.EarlyStopping):
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
            if self.best is None:
                return {"wait": int(self.wait), "best": None, "best_epoch": None, "weights": None}
            epoch = int(self.best_epoch) + 1  # Keras counts from 0, the history from 1
            return {"wait": int(self.wait), "best": float(self.best), "best_epoch": epoch,
                    "weights": _best_file(epoch)}  # fmt: skip

    class Plateau(keras.callbacks.ReduceLROnPlateau):
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
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.total}", unit="step",
                            leave=False, disable=None)  # fmt: skip

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.bar is not None:
                self.bar.close()

    return CallbackTypes(EpochEval, Recorder, EarlyStopping, Plateau, Progress)


def _best_file(epoch: int) -> str:
    return f"best-{epoch:04d}.npz"


def _save_weights_npz(model: Any, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        np.savez(fh, *model.get_weights())


def _live_log(live: Any, row: dict[str, float]) -> None:
    if live is None:
        return
    live.step = int(row["epoch"])
    for key in ("loss", "accuracy", "lr", "seconds", "images_per_s"):
        if key in row:
            live.log_metric(f"train/{key}", row[key])
    for key in ("loss", "accuracy", "macro_auc", "macro_f1"):
        if f"val_{key}" in row:
            live.log_metric(f"val/{key}", row[f"val_{key}"])
    live.next_step()


def _optimizer(phase: Phase, common: Any, steps_per_epoch: int) -> Any:
    """AdamW for one phase: warm-up + cosine decay, or a constant rate for ReduceLROnPlateau."""
    import keras

    lr: Any = phase.learning_rate
    if common.schedule == "cosine":
        total = max(1, phase.epochs * steps_per_epoch)
        warmup = min(common.warmup_epochs * steps_per_epoch, total // 2)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=phase.learning_rate / 10 if warmup else phase.learning_rate,
            decay_steps=max(1, total - warmup),
            alpha=common.min_lr_ratio,
            warmup_target=phase.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=common.weight_decay)
    # Decay shrinks weights towards 0; for biases, BN/LayerNorm gains and the fusion scale that
    # is a bias toward "no effect", not regularisation.
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "scale"])
    return opt


def _export(model: Any, path: Path) -> None:
    """Save an uncompiled copy: no optimizer slots (2x the weights), nothing to compile on load."""
    import keras

    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    clean.save(path)


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(out / "history.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    (out / "history.json").write_text(json.dumps(history, indent=1, allow_nan=True) + "\n")


class _PlainLive:
    """DVCLive's metric files (``plots/metrics/<name>.tsv``, ``metrics.json``) without DVCLive.

    Used only when DVCLive cannot start: dvclive 3.49 raises "Empty git repo" inside a git
    repository that has no commit yet (a fresh ``git init``), and the plots declared in
    dvc.yaml must exist all the same.
    """

    def __init__(self, directory: Path):
        self.dir, self.step = Path(directory), 0
        shutil.rmtree(self.dir / "plots" / "metrics", ignore_errors=True)
        self.latest: dict[str, float] = {}

    def log_metric(self, name: str, value: float) -> None:
        path = self.dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(f"step\t{name.rsplit('/', 1)[-1]}\n")
            fh.write(f"{self.step}\t{value}\n")
        self.latest[name] = value

    def next_step(self) -> None:
        summary: dict[str, Any] = {"step": self.step}
        for name, value in self.latest.items():
            group, _, key = name.rpartition("/")
            summary.setdefault(group, {})[key] = value
        (self.dir / "metrics.json").write_text(json.dumps(summary, indent=4, allow_nan=True) + "\n")
        self.step += 1

    def end(self) -> None:
        pass


def _open_live(live_dir: Path | None) -> Any:
    if live_dir is None:
        return None
    from dvclive import Live

    try:
        # dvcyaml=None: the plots are declared in the project's dvc.yaml; DVCLive must not write one.
        return Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    except Exception as e:  # scmrepo's SCMError("Empty git repo") and kin: logging must not stop training
        log.warning("DVCLive could not start (%s); writing its plot files directly to %s", e, live_dir)
        return _PlainLive(live_dir)


# --------------------------------------------------------------------------- run, in parts


@dataclass(frozen=True)
class _Prepared:
    """What the prepared folder's manifest says about the shards."""

    path: Path
    manifest: dict[str, Any]
    image_size: int
    train_counts: list[int]
    n_train: int
    n_val: int


def _read_prepared(prepared: Path) -> _Prepared:
    from skinlesion.model.tfdata import load_manifest

    manifest = load_manifest(prepared)
    if tuple(manifest.get("classes", ())) != CLASSES:
        raise StageError(
            f"{prepared}/manifest.json: classes {manifest.get('classes')} differ from {list(CLASSES)}"
        )
    train_counts, val_counts = _class_counts(manifest, "train"), _class_counts(manifest, "val")
    n_train, n_val = sum(train_counts), sum(val_counts)
    if n_train == 0 or n_val == 0:
        raise StageError(
            f"{prepared}: the train split has {n_train} images and val {n_val}; both must be > 0"
        )
    return _Prepared(prepared, manifest, int(manifest["image_size"]), train_counts, n_train, n_val)


@dataclass
class _Job:
    """One training run, built: runtime, model, phase plan, datasets and loss, plus the config that
    ``config.json`` records and the resume fingerprint is taken from."""

    backbone: str
    data: _Prepared
    common: TrainCommonParams
    rt: Any  # skinlesion.model.distribute.Runtime
    model: Any
    pretrained: bool
    weights_used: str
    phases: list[Phase]
    config: dict[str, Any]
    train_ds: Any
    evaluator: Any  # the EpochEval every phase shares (it holds the validation labels)
    loss_fn: Any
    class_weights: Any
    global_batch: int
    steps_per_epoch: int

    @property
    def multi(self) -> bool:
        return self.rt.kind == "multi_worker"

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.config)


def _build(params: TrainParams, backbone: str, data: _Prepared, seed: int) -> _Job:
    """Build the model and data: the runtime first (devices and the strategy must precede any
    other TensorFlow work), then the model under the strategy, the phase plan, the datasets."""
    bbp, common = params.for_backbone(backbone), params.common
    from skinlesion.model.distribute import configure_runtime

    rt = configure_runtime(
        params.strategy, params.mixed_precision, params.jit_compile, device=params.device, seed=seed,
        deterministic=common.deterministic,
    )  # fmt: skip
    import tensorflow as tf

    from skinlesion.model import losses
    from skinlesion.model import networks as models

    multi = rt.kind == "multi_worker"
    global_batch = (bbp.batch_size or common.batch_size) * rt.replicas
    # The multi-worker loop drops the last partial batch: collectives need equal steps everywhere.
    steps_per_epoch = (data.n_train // global_batch) if multi else math.ceil(data.n_train / global_batch)
    if steps_per_epoch == 0:
        raise StageError(
            f"{data.path}: {data.n_train} training images, fewer than one global batch of {global_batch}"
        )
    weights_req = params.weights_for(backbone)
    # XLA wanted: explicitly, or by Keras's "auto" on a GPU (see ModelSpec.augment_in_model)
    xla = rt.jit_compile is True or (rt.jit_compile == "auto" and rt.gpus > 0)
    cw = losses.class_weights(data.train_counts, power=common.class_weight_power)
    spec = models.ModelSpec(
        backbone=backbone, image_size=data.image_size, head=bbp.head, dropout=bbp.dropout,
        funnel_units=bbp.funnel_units, fusion=bbp.fusion, fusion_units=bbp.fusion_units,
        **dataclasses.asdict(common.augment), output_bias=models.output_bias_from_counts(data.train_counts),
        seed=seed, augment_in_model=not xla,
    )  # fmt: skip
    with rt.strategy.scope():
        bb_model, weights_used = models.build_backbone(
            backbone, data.image_size, weights_req, fallback=params.weights_fallback
        )
        pretrained = weights_used != "scratch"
        model = models.build_model(spec, bb_model, pretrained=pretrained)
    if multi:
        models.synchronize_batchnorm(model)
    phases = plan_phases(
        common.epochs, pretrained=pretrained, head_epochs=bbp.head_epochs, unfreeze=bbp.unfreeze,
        learning_rate=bbp.learning_rate, finetune_learning_rate=bbp.finetune_learning_rate,
    )  # fmt: skip
    config = {
        "backbone": backbone,
        "seed": seed,
        "train": {
            "common": dataclasses.asdict(common),
            "backbone": dataclasses.asdict(bbp),
            "weights": weights_req,
            "weights_fallback": params.weights_fallback,
            "device": params.device,
            "strategy": params.strategy,
            "mixed_precision": params.mixed_precision,
            "jit_compile": params.jit_compile,
        },
        "weights_used": weights_used,
        "image_size": data.image_size,
        "classes": list(CLASSES),
        "inputs": ["image", "age", "sex", "localization"] if bbp.fusion else ["image"],
        "preprocessing": models.BACKBONE_FAMILIES[backbone][1],
        "augmentation_in": "tf.data" if xla else "model",
        "class_weights": [round(float(w), 6) for w in cw],
        "train_class_counts": data.train_counts,
        "phases": [dataclasses.asdict(p) for p in phases],
        "global_batch": global_batch,
        "replicas": rt.replicas,
        "prepared_manifest_sha256": hashlib.sha256(
            json.dumps(data.manifest, sort_keys=True).encode()
        ).hexdigest(),
    }
    log.info(
        "%s: %d train / %d val images at %d px; weights %s; %d parameters; phases %s",
        backbone, data.n_train, data.n_val, data.image_size, weights_used, model.count_params(),
        ", ".join(f"{p.name} (epochs {p.start + 1}-{p.end}, unfreeze {p.depth})" for p in phases),
    )  # fmt: skip
    if bbp.fusion and common.metadata_dropout > 0:
        log.info(
            "%s: metadata dropout %.2f: each of age, sex, localization -> unknown per training image "
            "and epoch (all three in %.1f%%)", backbone, common.metadata_dropout,
            100 * common.metadata_dropout**3,
        )  # fmt: skip
    train_ds, val_ds = _datasets(
        data.path, n_train=data.n_train, with_meta=bbp.fusion, batch=global_batch,
        shuffle_buffer=common.shuffle_buffer, seed=seed, cache=common.cache, drop_remainder=multi,
        augment=models.augmentation_layers(spec) if xla else None,
        metadata_dropout_rate=common.metadata_dropout,
    )  # fmt: skip
    loss_fn = losses.make_loss(
        common.loss, cw, gamma=common.focal_gamma, label_smoothing=common.label_smoothing
    )
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict_np(x: Any) -> np.ndarray:
        return np.asarray(predict(x))

    evaluator = callback_types().EpochEval(val_ds, loss_fn, data.n_train, predict_np)
    return _Job(
        backbone, data, common, rt, model, pretrained, weights_used, phases, config, train_ds, evaluator,
        loss_fn, cw, global_batch, steps_per_epoch,
    )  # fmt: skip


def _resume_point(job: _Job, state: TrainState, backup: Backup) -> tuple[list[Phase], int]:
    """The phases left to run and the epoch training resumes after (0: from the start).

    A committed epoch checkpoint continues the first unfinished phase from its epoch; without one
    (the multi-worker loop keeps none) that phase starts over from the weights the last finished
    phase left.
    """
    pending = [p for p in job.phases if p.index not in state.phases_done]
    if not pending:
        resumed_from = job.phases[-1].end
    elif state.checkpoint is not None:
        resumed_from = state.epoch
    else:
        resumed_from = pending[0].start
    if resumed_from:
        log.info(
            "resuming %s after epoch %d of %d (backup in %s)",
            job.backbone, resumed_from, job.common.epochs, backup.root,
        )  # fmt: skip
    if state.phases_done:
        job.model.set_weights(backup.read_weights(_phase_file(state.phases_done[-1])))
    return pending, resumed_from


def _fit_phase(job: _Job, phase: Phase, state: TrainState, backup: Backup, live_logger: Any) -> None:
    """Fit one phase (from the state's checkpoint when it is the phase a killed run was in), then
    commit its end: the weights it leaves, then the state that marks it done."""
    import keras
    import tensorflow as tf

    from skinlesion.model import losses
    from skinlesion.model import networks as models

    common, rt, model, types = job.common, job.rt, job.model, callback_types()
    with rt.strategy.scope():
        n_trainable = models.set_trainable(model, phase.depth, freeze_bn=job.pretrained)
        optimizer = _optimizer(phase, common, job.steps_per_epoch)
    log.info(
        "phase %s: epochs %d-%d, unfreeze %s, %d trainable weight tensors, lr %.1e",
        phase.name, phase.start + 1, phase.end, "none" if phase.depth is None else phase.depth,
        n_trainable, phase.learning_rate,
    )  # fmt: skip
    resume = state.checkpoint is not None  # only ever the first unfinished phase's
    counters = state.counters if resume else {}
    resumable: dict[str, Any] = {}
    if common.early_stopping_patience > 0:
        resumable["early_stopping"] = types.EarlyStopping(
            backup, counters.get("early_stopping"), monitor=common.monitor,
            patience=common.early_stopping_patience,
        )  # fmt: skip
    if common.schedule == "plateau":
        resumable["plateau"] = types.Plateau(
            counters.get("plateau"), monitor=common.monitor, factor=common.plateau_factor,
            patience=common.plateau_patience, min_lr=phase.learning_rate * common.min_lr_ratio,
        )  # fmt: skip
    recorder = types.Recorder(state, backup, phase, common.epochs, common.monitor, live_logger, resumable,
                              commit_each_epoch=not job.multi)  # fmt: skip
    progress = types.Progress(job.steps_per_epoch, common.epochs)
    callbacks = [job.evaluator, *resumable.values(), recorder, progress]
    if job.multi:
        from skinlesion.model.distribute import custom_fit

        loss_none = losses.make_loss(
            common.loss, job.class_weights, gamma=common.focal_gamma, label_smoothing=common.label_smoothing,
            reduction="none",
        )  # fmt: skip
        with rt.strategy.scope():
            custom_fit(
                model, rt, job.train_ds, loss_none=loss_none, optimizer=optimizer, callbacks=callbacks,
                global_batch=job.global_batch, initial_epoch=phase.start, epochs=phase.end,
            )  # fmt: skip
    else:
        with rt.strategy.scope():
            model.compile(optimizer=optimizer, loss=job.loss_fn, jit_compile=rt.jit_compile,
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])  # fmt: skip
        log.info("XLA (jit_compile) %s", "on" if model.jit_compile is True else "off")
        start = phase.start
        if resume:
            backup.restore_checkpoint(model, state.checkpoint)
            # An early stop had ended the phase: fit runs no epoch, but early stopping's
            # on_train_end still restores the phase's best weights, as the killed run would have.
            start = phase.end if state.stopped else state.epoch
        try:
            model.fit(job.train_ds, epochs=phase.end, initial_epoch=start, callbacks=callbacks, verbose=0,
                      shuffle=False)  # fmt: skip
        except tf.errors.DataLossError as e:
            raise StageError(
                f"{job.data.path}: a training shard is corrupt ({e.message.splitlines()[0]}); "
                "rerun the prepare stage (dvc repro -f prepare)"
            ) from None
    backup.save_phase(model, phase.index)
    state.phases_done.append(phase.index)
    state.checkpoint, state.stopped, state.counters = None, False, {}
    backup.commit(state)


@dataclass(frozen=True)
class WorkerPaths:
    """Where this process writes its outputs and keeps its resume folder."""

    out: Path
    metrics: Path
    live: Path | None
    backup: Path
    chief: bool = True


@contextlib.contextmanager
def worker_paths(
    tf_config: Mapping[str, Any] | None, *, out: Path, metrics: Path, live: Path | None, backup: Path
) -> Iterator[WorkerPaths]:
    """The requested paths, for a single-process run or the multi-worker chief; for any other
    worker, ``out``/``metrics``/``live`` inside a temp folder that is deleted on exit.

    Every worker runs the whole stage (each collective needs all of them), but only one copy of
    the (identical) outputs is wanted, and two workers on one host or file system would write
    the same files. A non-chief keeps a resume folder of its own beside ``backup``: had it
    started over while the chief resumed, the two would run different phases.
    """
    if tf_config is None or is_chief(tf_config):
        yield WorkerPaths(out, metrics, live, backup)
        return
    task = tf_config.get("task", {})
    tag = f"{task.get('type', 'worker')}{task.get('index', 0)}"
    scratch = Path(tempfile.mkdtemp(prefix=f"skinlesion-train-{tag}-"))
    log.info("%s is not the chief: its model, metrics and DVCLive files go to %s (deleted at the end)",
             tag, scratch)  # fmt: skip
    try:
        yield WorkerPaths(
            scratch / out.name, scratch / metrics.name, None if live is None else scratch / "live",
            backup.with_name(f"{backup.name}.{tag}"), chief=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_outputs(
    job: _Job, state: TrainState, backup: Backup, where: WorkerPaths, live_logger: Any, resumed_from: int,
    t_start: float,
) -> dict[str, Any]:  # fmt: skip
    """Write the outputs from the best epoch's weights: the model folder (one rename), the metrics,
    DVCLive's end; then the resume folder becomes a DONE marker. Returns the metrics."""
    model = job.model
    if state.best_file is not None:
        model.set_weights(backup.read_weights(state.best_file))
    summary = _summary(job, state, resumed_from, t_start)
    if job.common.recalibrate_bn and not job.pretrained:
        summary.update(_recalibrate_bn(job, summary))
    with atomic_dir(where.out) as tmp:
        _export(model, tmp / "model.keras")
        write_json(tmp / "config.json", {**job.config, "fingerprint": job.fingerprint, "result": summary})
        _write_history(tmp, state.history)
    write_json(where.metrics, summary)
    if live_logger is not None:
        live_logger.end()
    backup.finish(job.fingerprint)
    if job.multi:  # every worker logs it: equal digests show the workers stayed in sync
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights()))
        rt = job.rt
        log.info("worker %d of %d: weights sha256 %s", rt.worker_index, rt.workers, digest.hexdigest())
    best = next(r for r in state.history if r["epoch"] == summary["best_epoch"])
    log.info(
        "%s: best epoch %d of %d: val macro AUC %.4f, macro F1 %.4f; %.0f img/s; %s written in %.0f s",
        job.backbone, summary["best_epoch"], summary["epochs_run"], best.get("val_macro_auc", float("nan")),
        best.get("val_macro_f1", float("nan")), summary["images_per_s"], where.out / "model.keras",
        summary["seconds"],
    )  # fmt: skip
    return summary


def _recalibrate_bn(job: _Job, summary: dict[str, Any]) -> dict[str, Any]:
    """Precise BN (``models.recalibrate_batchnorm``) over the training split, in file order at
    the per-replica training batch; returns the validation numbers after it, for the metrics
    (the ``best_val_*`` keys in ``summary`` are the epoch's, measured with the running statistics
    on these same weights: the "before" of the log line, without another validation pass)."""
    from skinlesion.model import networks as models
    from skinlesion.model.tfdata import read_split

    t0 = time.perf_counter()
    per_replica = job.global_batch // job.rt.replicas
    images = read_split(job.data.path, "train", with_meta=False, ordered=True).map(lambda x, y: x)
    n = models.recalibrate_batchnorm(job.model, tqdm(
        images.batch(per_replica), total=math.ceil(job.data.n_train / per_replica), unit="batch",
        desc=f"{job.backbone}: precise BN", mininterval=2.0, leave=False,
    ))  # fmt: skip
    after = job.evaluator.score()

    def show(v: float | None, digits: int) -> str:  # the summary's keys are None when not finite
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    log.info(
        "%s: precise BN over %d training images (%d layers, %.0f s): val macro AUC %s -> %s, "
        "accuracy %s -> %s", job.backbone, job.data.n_train, n, time.perf_counter() - t0,
        show(summary["best_val_macro_auc"], 4), show(after["val_macro_auc"], 4),
        show(summary["best_val_accuracy"], 3), show(after["val_accuracy"], 3),
    )  # fmt: skip
    return {f"final_{k}": _finite(v) for k, v in after.items()}


def _summary(job: _Job, state: TrainState, resumed_from: int, t_start: float) -> dict[str, Any]:
    """The flat metrics ``dvc metrics`` reads: the best epoch's validation numbers and the run's."""
    common, rt = job.common, job.rt
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), state.history[-1])
    epoch_rows = [r for r in state.history if "images_per_s" in r]
    return {
        "backbone": job.backbone,
        "weights_used": job.weights_used if job.weights_used in ("imagenet", "scratch") else "file",
        "epochs_planned": common.epochs,
        "epochs_run": len(state.history),
        "best_epoch": int(best["epoch"]),
        "monitor": common.monitor,
        "best_val_macro_auc": _finite(best.get("val_macro_auc")),
        "best_val_macro_f1": _finite(best.get("val_macro_f1")),
        "best_val_loss": _finite(best.get("val_loss")),
        "best_val_accuracy": _finite(best.get("val_accuracy")),
        "images_per_s": _finite(float(np.mean([r["images_per_s"] for r in epoch_rows])))
        if epoch_rows
        else 0.0,
        "epoch_seconds_mean": _finite(float(np.mean([r["seconds"] for r in epoch_rows])))
        if epoch_rows
        else 0.0,
        "train_seconds": round(float(sum(r.get("train_seconds", 0.0) for r in state.history)), 3),
        "seconds": round(time.perf_counter() - t_start, 3),  # this run's wall time
        "resumed_from_epoch": resumed_from,
        "n_train": job.data.n_train,
        "n_val": job.data.n_val,
        "image_size": job.data.image_size,
        "global_batch": job.global_batch,
        "replicas": rt.replicas,
        "strategy": rt.kind,
        "mixed_precision": rt.mixed_precision,
        "params": int(job.model.count_params()),
    }


# --------------------------------------------------------------------------- run


def run(
    params: TrainParams,
    *,
    backbone: str,
    prepared: Path,
    out: Path,
    metrics: Path,
    live: Path | None = None,
    backup: Path | None = None,
    seed: int = 42,
) -> TrainResult:
    """Train ``backbone`` on ``prepared``; write the model folder, metrics and DVCLive logs."""
    t_start = time.perf_counter()
    prepared, out, metrics = Path(prepared), Path(out), Path(metrics)
    backup = Path(backup) if backup is not None else out.with_name(out.name + ".ckpt")
    if backbone not in params.backbones:
        raise StageError(f"train.backbones: {backbone!r} is not listed ({list(params.backbones)})")
    from skinlesion.model.distribute import visible_gpus

    visible_gpus(params.device)  # a GPU run without a GPU stops here, before any data is read
    job = _build(params, backbone, _read_prepared(prepared), seed)
    # configure_runtime (in _build) has checked TF_CONFIG already.
    tf_config = json.loads(os.environ["TF_CONFIG"]) if job.multi else None
    with worker_paths(tf_config, out=out, metrics=metrics, live=live, backup=backup) as where:
        store = Backup(where.backup)
        state = store.load_or_new(job.fingerprint)
        pending, resumed_from = _resume_point(job, state, store)
        live_logger = _open_live(where.live)
        for row in state.history:  # replay, so the DVCLive curves cover the whole training
            _live_log(live_logger, row)
        for phase in pending:
            _fit_phase(job, phase, state, store, live_logger)
        summary = _write_outputs(job, state, store, where, live_logger, resumed_from, t_start)
    return TrainResult(backbone, out / "model.keras", summary, list(state.history), resumed_from, where.chief)


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.train",
        description="Train one backbone's classifier on the prepared shards (DVC stage train@<backbone>).",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)"
    )
    ap.add_argument("--backbone", required=True, help="one of train.backbones, e.g. mobilenetv2")
    ap.add_argument("--prepared", type=Path, required=True, help="prepared folder (manifest.json + shards)")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write (replaced atomically)")
    ap.add_argument("--metrics", type=Path, required=True, help="flat metrics JSON to write")
    ap.add_argument("--live", type=Path, default=None, help="DVCLive folder for per-epoch metrics and plots")
    ap.add_argument(
        "--backup", type=Path, default=None,
        help="resume folder kept across killed runs (default: <out>.ckpt next to --out)",
    )  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def body() -> int:
        p = load_sections(args.params, base=BaseParams, train=TrainParams)
        run(
            p.train,
            backbone=args.backbone,
            prepared=args.prepared,
            out=args.out,
            metrics=args.metrics,
            live=args.live,
            backup=args.backup,
            seed=p.base.seed + p.train.seed_offset,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
