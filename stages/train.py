"""Train stage (``train@<backbone>``): one classifier per backbone from the prepared shards.

Reads ``data/prepared`` (TFRecord shards + manifest, see :mod:`stages.tfdata`) and writes, for one
backbone:

* ``<out>/model.keras`` — takes raw uint8 RGB (augmentation and the family's preprocessing are
  inside), loads with ``safe_mode=True`` once :mod:`stages.models` is imported;
* ``<out>/config.json`` (everything the run was built from), ``<out>/history.csv`` / ``.json``;
* ``<metrics>`` — flat JSON for ``dvc metrics``: best val macro AUC / F1, epochs, wall time,
  images/s, which weights were used;
* ``<live>/`` — DVCLive per-epoch metrics and plots (``dvc plots``).

Training runs in phases: the new head alone on a frozen pretrained backbone, then one or more
fine-tuning phases with the top N backbone layers unfrozen (``train.backbone.<bb>.unfreeze``).
A backbone without pretrained weights (custom_cnn, or the offline fallback) trains whole in a
single phase. The kept weights are those of the best epoch by ``train.common.monitor``.

Resume: every epoch ends with a Keras ``BackupAndRestore`` backup (weights, optimizer, epoch)
plus this stage's state (history, best epoch) in ``<backup>``, a folder that outlives a killed
run. The next run with the same params and data continues from the last finished epoch; a
different configuration discards the backup. ``<out>`` is replaced atomically at the very end,
so a failed or killed run leaves the previous model untouched.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import CLASSES, StageError, atomic_dir, atomic_file, run_main, setup_logging, write_json
from stages.metrics import macro_auc
from stages.params import TrainParams, load_params

log = logging.getLogger(__name__)

__all__ = [
    "Phase",
    "TrainResult",
    "plan_phases",
    "macro_auc",
    "macro_f1",
    "run",
    "main",
]

STATE = "state.json"
DONE = "DONE"


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


# --------------------------------------------------------------------------- resume state


@dataclass
class TrainState:
    """What survives a killed run besides the Keras backup: history, best epoch, done phases."""

    fingerprint: str
    history: list[dict[str, float]] = field(default_factory=list)
    phases_done: list[int] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None

    def save(self, backup: Path) -> None:
        with atomic_file(backup / STATE, "w", encoding="utf-8") as fh:
            json.dump(dataclasses.asdict(self), fh, allow_nan=True)

    @classmethod
    def load_or_new(cls, backup: Path, fingerprint: str) -> TrainState:
        path = backup / STATE
        if path.is_file() and not (backup / DONE).exists():
            try:
                state = cls(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:
                log.warning("%s: unreadable (%s); starting afresh", path, e)
            else:
                if state.fingerprint == fingerprint:
                    return state
                log.info("%s: from a different configuration or data; starting afresh", backup)
        if backup.exists():
            shutil.rmtree(backup)
        backup.mkdir(parents=True)
        state = cls(fingerprint=fingerprint)
        state.save(backup)
        return state


def _backup_epoch(phase_dir: Path) -> int | None:
    """The epoch Keras's BackupAndRestore will resume from in ``phase_dir`` (None: no backup)."""
    meta = phase_dir / "training_metadata.json"
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TrainResult:
    backbone: str
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    resumed_from_epoch: int


# --------------------------------------------------------------------------- TF parts


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
) -> tuple[Any, Any]:
    """Training (shuffled, batched, prefetched) and validation datasets from the shards.

    ``augment``: Keras augmentation layers to run here, on batches, instead of inside the model
    (only when the model is XLA-compiled; images stay uint8 so the model's input is unchanged).
    """
    import keras
    import tensorflow as tf

    from stages.tfdata import read_split

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


def _make_callbacks_module() -> Any:
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

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs if logs is not None else {}
            train_s = time.perf_counter() - self.t0
            probs = np.concatenate([self.predict(x) for x, _ in self.val_ds])
            logs["val_loss"] = float(self.loss_fn(self.y_val_onehot, probs))
            logs["val_accuracy"] = float(np.mean(probs.argmax(1) == self.y_val))
            logs["val_macro_auc"] = macro_auc(self.y_val, probs)
            logs["val_macro_f1"] = macro_f1(self.y_val, probs)
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["train_seconds"] = train_s
            logs["images_per_s"] = self.n_train / train_s if train_s > 0 else 0.0
            logs["seconds"] = time.perf_counter() - self.t0

    class Recorder(keras.callbacks.Callback):
        """History row, best-epoch weights, the per-epoch log line and DVCLive, once per epoch."""

        def __init__(self, state: TrainState, backup: Path, phase: Phase, total_epochs: int, monitor: str,
                     live: Any):  # fmt: skip
            super().__init__()
            self.state, self.backup, self.phase = state, backup, phase
            self.total, self.monitor, self.live = total_epochs, monitor, live

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = dict(logs or {})
            row = {"epoch": epoch + 1, "phase": self.phase.index}
            row.update({k: float(v) for k, v in logs.items() if np.isscalar(v)})
            self.state.history.append(row)
            value = row.get(self.monitor, float("nan"))
            if math.isfinite(value) and (self.state.best_value is None or value > self.state.best_value):
                self.state.best_value, self.state.best_epoch = value, epoch + 1
                _save_weights_npz(self.model, self.backup / "best.npz")
            log.info(
                "epoch %d/%d [%s] loss %.4f acc %.3f | val_loss %.4f val_acc %.3f val_macro_auc %.4f "
                "val_macro_f1 %.4f | lr %.2e | %.1f s, %.0f img/s%s",
                epoch + 1, self.total, self.phase.name, row.get("loss", float("nan")),
                row.get("accuracy", float("nan")), row["val_loss"], row["val_accuracy"],
                row["val_macro_auc"], row["val_macro_f1"], row["lr"], row["seconds"],
                row["images_per_s"], "  *best*" if self.state.best_epoch == epoch + 1 else "",
            )  # fmt: skip
            _live_log(self.live, row)

    class EpochBackup(keras.callbacks.BackupAndRestore):
        """Keras's BackupAndRestore that also persists this stage's state, written *first*.

        If a kill lands between the two writes, the state holds one epoch more than the
        backup; the resumed run drops history rows from the resumed epoch on, so nothing is
        counted twice.
        """

        def __init__(self, backup_dir: str, state: TrainState, root: Path):
            super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
            self.state, self.root = state, root

        def _save_model(self) -> None:
            self.state.save(self.root)
            super()._save_model()

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

    return EpochEval, Recorder, EpochBackup, Progress


def _save_weights_npz(model: Any, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        np.savez(fh, *model.get_weights())


def _load_weights_npz(model: Any, path: Path) -> None:
    with np.load(path) as z:
        model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])


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
    bbp = params.for_backbone(backbone)
    common = params.common

    from stages.tfdata import load_manifest

    manifest = load_manifest(prepared)
    if tuple(manifest.get("classes", ())) != CLASSES:
        raise StageError(
            f"{prepared}/manifest.json: classes {manifest.get('classes')} differ from {list(CLASSES)}"
        )
    image_size = int(manifest["image_size"])
    train_counts, val_counts = _class_counts(manifest, "train"), _class_counts(manifest, "val")
    n_train, n_val = sum(train_counts), sum(val_counts)
    if n_train == 0 or n_val == 0:
        raise StageError(
            f"{prepared}: the train split has {n_train} images and val {n_val}; both must be > 0"
        )

    # TensorFlow from here on: the runtime (devices, strategy) must come first.
    from stages.distribute import configure_runtime

    rt = configure_runtime(
        params.strategy,
        params.mixed_precision,
        params.jit_compile,
        seed=seed,
        deterministic=common.deterministic,
    )
    import keras
    import tensorflow as tf

    from stages import losses, models

    batch = bbp.batch_size or common.batch_size
    global_batch = batch * rt.replicas
    multi = rt.kind == "multi_worker"
    steps_per_epoch = (n_train // global_batch) if multi else math.ceil(n_train / global_batch)
    if steps_per_epoch == 0:
        raise StageError(
            f"{prepared}: {n_train} training images, fewer than one global batch of {global_batch}"
        )

    weights_req = params.weights_for(backbone)
    # XLA wanted: explicitly, or by Keras's "auto" on a GPU (see ModelSpec.augment_in_model)
    xla = rt.jit_compile is True or (rt.jit_compile == "auto" and rt.gpus > 0)
    cw = losses.class_weights(train_counts, power=common.class_weight_power)
    spec = models.ModelSpec(
        backbone=backbone,
        image_size=image_size,
        head=bbp.head,
        dropout=bbp.dropout,
        funnel_units=bbp.funnel_units,
        fusion=bbp.fusion,
        fusion_units=bbp.fusion_units,
        **dataclasses.asdict(common.augment),
        output_bias=models.output_bias_from_counts(train_counts),
        seed=seed,
        augment_in_model=not xla,
    )
    with rt.strategy.scope():
        bb_model, weights_used = models.build_backbone(
            backbone, image_size, weights_req, fallback=params.weights_fallback
        )
        pretrained = weights_used != "scratch"
        model = models.build_model(spec, bb_model, pretrained=pretrained)
    if multi:
        models.synchronize_batchnorm(model)
    phases = plan_phases(
        common.epochs,
        pretrained=pretrained,
        head_epochs=bbp.head_epochs,
        unfreeze=bbp.unfreeze,
        learning_rate=bbp.learning_rate,
        finetune_learning_rate=bbp.finetune_learning_rate,
    )
    config = {
        "backbone": backbone,
        "seed": seed,
        "train": {
            "common": dataclasses.asdict(common),
            "backbone": dataclasses.asdict(bbp),
            "weights": weights_req,
            "weights_fallback": params.weights_fallback,
            "strategy": params.strategy,
            "mixed_precision": params.mixed_precision,
            "jit_compile": params.jit_compile,
        },
        "weights_used": weights_used,
        "image_size": image_size,
        "classes": list(CLASSES),
        "inputs": ["image", "age", "sex", "localization"] if bbp.fusion else ["image"],
        "preprocessing": models.BACKBONE_FAMILIES[backbone][1],
        "augmentation_in": "tf.data" if xla else "model",
        "class_weights": [round(float(w), 6) for w in cw],
        "train_class_counts": train_counts,
        "phases": [dataclasses.asdict(p) for p in phases],
        "global_batch": global_batch,
        "replicas": rt.replicas,
        "prepared_manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
    }
    fingerprint = _fingerprint(config)
    state = TrainState.load_or_new(backup, fingerprint)
    log.info(
        "%s: %d train / %d val images at %d px; weights %s; %d parameters; phases %s",
        backbone, n_train, n_val, image_size, weights_used, model.count_params(),
        ", ".join(f"{p.name} (epochs {p.start + 1}-{p.end}, unfreeze {p.depth})" for p in phases),
    )  # fmt: skip

    train_ds, val_ds = _datasets(
        prepared,
        n_train=n_train,
        with_meta=bbp.fusion,
        batch=global_batch,
        shuffle_buffer=common.shuffle_buffer,
        seed=seed,
        cache=common.cache,
        drop_remainder=multi,
        augment=models.augmentation_layers(spec) if xla else None,
    )
    loss_fn = losses.make_loss(
        common.loss, cw, gamma=common.focal_gamma, label_smoothing=common.label_smoothing
    )
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict_np(x: Any) -> np.ndarray:
        return np.asarray(predict(x))

    EpochEval, Recorder, EpochBackup, Progress = _make_callbacks_module()
    evaluator = EpochEval(val_ds, loss_fn, n_train, predict_np)

    # Where an interrupted run left off: after its finished phases, plus the epochs of the next
    # phase that Keras's backup holds (the multi-worker loop restarts an unfinished phase).
    pending = [p for p in phases if p.index not in state.phases_done]
    if pending:
        in_phase = None if multi else _backup_epoch(backup / f"phase-{pending[0].index}")
        resumed_from = pending[0].start if in_phase is None else in_phase
    else:
        resumed_from = phases[-1].end
    state.history = [r for r in state.history if r["epoch"] <= resumed_from]
    _recompute_best(state, common.monitor)
    if resumed_from:
        log.info(
            "resuming %s after epoch %d of %d (backup in %s)", backbone, resumed_from, common.epochs, backup
        )
    if state.phases_done:
        _load_weights_npz(model, backup / f"phase-{state.phases_done[-1]}.npz")
    live_logger = _open_live(live)
    for row in state.history:  # replay, so the DVCLive curves cover the whole training
        _live_log(live_logger, row)

    for phase in pending:
        phase_dir = backup / f"phase-{phase.index}"
        with rt.strategy.scope():
            n_trainable = models.set_trainable(model, phase.depth, freeze_bn=pretrained)
            optimizer = _optimizer(phase, common, steps_per_epoch)
        log.info(
            "phase %s: epochs %d-%d, unfreeze %s, %d trainable weight tensors, lr %.1e",
            phase.name, phase.start + 1, phase.end, "none" if phase.depth is None else phase.depth,
            n_trainable, phase.learning_rate,
        )  # fmt: skip
        callbacks: list[Any] = [evaluator]
        if common.early_stopping_patience > 0:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=common.monitor,
                    mode="max",
                    patience=common.early_stopping_patience,
                    restore_best_weights=True,
                    verbose=0,
                )  # fmt: skip
            )
        if common.schedule == "plateau":
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor=common.monitor,
                    mode="max",
                    factor=common.plateau_factor,
                    patience=common.plateau_patience,
                    min_lr=phase.learning_rate * common.min_lr_ratio,
                    verbose=0,
                )  # fmt: skip
            )
        callbacks.append(Recorder(state, backup, phase, common.epochs, common.monitor, live_logger))
        callbacks.append(Progress(steps_per_epoch, common.epochs))

        if multi:
            from stages.distribute import custom_fit

            loss_none = losses.make_loss(
                common.loss, cw, gamma=common.focal_gamma, label_smoothing=common.label_smoothing,
                reduction="none",
            )  # fmt: skip
            with rt.strategy.scope():
                custom_fit(
                    model, rt, train_ds, loss_none=loss_none, optimizer=optimizer, global_batch=global_batch,
                    initial_epoch=phase.start, epochs=phase.end, callbacks=callbacks,
                )  # fmt: skip
        else:
            callbacks.append(EpochBackup(str(phase_dir), state, backup))
            with rt.strategy.scope():
                model.compile(
                    optimizer=optimizer,
                    loss=loss_fn,
                    metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                    jit_compile=rt.jit_compile,
                )
            log.info("XLA (jit_compile) %s", "on" if model.jit_compile is True else "off")
            model._initial_epoch = None  # Keras keeps a restored epoch on the model across fit calls
            try:
                model.fit(
                    train_ds, epochs=phase.end, initial_epoch=phase.start, callbacks=callbacks, verbose=0,
                    shuffle=False,
                )  # fmt: skip
            except tf.errors.DataLossError as e:
                raise StageError(
                    f"{prepared}: a training shard is corrupt ({e.message.splitlines()[0]}); "
                    "rerun the prepare stage (dvc repro -f prepare)"
                ) from None
        _save_weights_npz(model, backup / f"phase-{phase.index}.npz")
        state.phases_done.append(phase.index)
        state.save(backup)

    if state.best_epoch is not None and (backup / "best.npz").is_file():
        _load_weights_npz(model, backup / "best.npz")
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), state.history[-1])
    epoch_rows = [r for r in state.history if "images_per_s" in r]
    summary: dict[str, Any] = {
        "backbone": backbone,
        "weights_used": weights_used if weights_used in ("imagenet", "scratch") else "file",
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
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "global_batch": global_batch,
        "replicas": rt.replicas,
        "strategy": rt.kind,
        "mixed_precision": rt.mixed_precision,
        "params": int(model.count_params()),
    }

    with atomic_dir(out) as tmp:
        _export(model, tmp / "model.keras")
        write_json(tmp / "config.json", {**config, "fingerprint": fingerprint, "result": summary})
        _write_history(tmp, state.history)
    write_json(metrics, summary)
    if live_logger is not None:
        live_logger.end()
    # Training is complete: the backup is no longer a resume point. Keep only a marker (the
    # folder is a DVC output, and a marker says why it is empty).
    shutil.rmtree(backup, ignore_errors=True)
    backup.mkdir(parents=True, exist_ok=True)
    (backup / DONE).write_text(f"{fingerprint}\n")
    log.info(
        "%s: best epoch %d of %d: val macro AUC %.4f, macro F1 %.4f; %.0f img/s; %s written in %.0f s",
        backbone, summary["best_epoch"], summary["epochs_run"], best.get("val_macro_auc", float("nan")),
        best.get("val_macro_f1", float("nan")), summary["images_per_s"], out / "model.keras",
        summary["seconds"],
    )  # fmt: skip
    return TrainResult(backbone, out / "model.keras", summary, list(state.history), resumed_from)


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def _recompute_best(state: TrainState, monitor: str) -> None:
    vals = [(r.get(monitor, float("nan")), int(r["epoch"])) for r in state.history]
    vals = [(v, e) for v, e in vals if math.isfinite(v)]
    if vals:
        v, e = max(vals, key=lambda t: (t[0], -t[1]))
        state.best_value, state.best_epoch = v, e
    else:
        state.best_value = state.best_epoch = None


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
        p = load_params(args.params)
        run(
            p.train,
            backbone=args.backbone,
            prepared=args.prepared,
            out=args.out,
            metrics=args.metrics,
            live=args.live,
            backup=args.backup,
            seed=p.base.seed,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
