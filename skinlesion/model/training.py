"""One training run, in parts (the train stage, ``stages/train.py``, calls them in this order):

* :func:`build_job` — the runtime (devices, strategy), the model, the phase plan, the datasets and
  the loss, plus the config that ``config.json`` records and the resume fingerprint is taken from;
* :func:`resume_point` — the phases left to run and the epoch training resumes after;
* :func:`fit_phase` — fit one phase (Keras ``fit``, or the custom multi-worker loop) and commit
  its end to the resume store;
* :func:`write_outputs` — the best epoch's weights (with precise BN when training from scratch)
  to the model folder, the flat metrics, DVCLive's end; the resume folder becomes a DONE marker.

The kept weights are those of the best epoch by ``train.common.monitor``. TensorFlow is imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.schema import CLASSES
from skinlesion.model.phases import Phase, plan_phases
from skinlesion.model.resume import Backup, TrainState, config_fingerprint, phase_file_name
from skinlesion.model.traindata import Prepared, make_datasets
from skinlesion.model.workers import WorkerPaths
from skinlesion.params.train import TrainCommonParams, TrainParams

log = logging.getLogger(__name__)

__all__ = ["Job", "build_job", "fit_phase", "make_optimizer", "resume_point", "write_outputs"]


@dataclass
class Job:
    """One training run, built: runtime, model, phase plan, datasets and loss, plus the config that
    ``config.json`` records and the resume fingerprint is taken from."""

    backbone: str
    data: Prepared
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
        return config_fingerprint(self.config)


def build_job(params: TrainParams, backbone: str, data: Prepared, seed: int) -> Job:
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
    from skinlesion.model.callbacks import EpochEval

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
    train_ds, val_ds = make_datasets(
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

    evaluator = EpochEval(val_ds, loss_fn, data.n_train, predict_np)
    return Job(
        backbone, data, common, rt, model, pretrained, weights_used, phases, config, train_ds, evaluator,
        loss_fn, cw, global_batch, steps_per_epoch,
    )  # fmt: skip


def resume_point(job: Job, state: TrainState, backup: Backup) -> tuple[list[Phase], int]:
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
        job.model.set_weights(backup.read_weights(phase_file_name(state.phases_done[-1])))
    return pending, resumed_from


def fit_phase(job: Job, phase: Phase, state: TrainState, backup: Backup, live_logger: Any) -> None:
    """Fit one phase (from the state's checkpoint when it is the phase a killed run was in), then
    commit its end: the weights it leaves, then the state that marks it done."""
    import keras
    import tensorflow as tf

    from skinlesion.model import callbacks as cb
    from skinlesion.model import losses
    from skinlesion.model import networks as models

    common, rt, model = job.common, job.rt, job.model
    with rt.strategy.scope():
        n_trainable = models.set_trainable(model, phase.depth, freeze_bn=job.pretrained)
        optimizer = make_optimizer(phase, common, job.steps_per_epoch)
    log.info(
        "phase %s: epochs %d-%d, unfreeze %s, %d trainable weight tensors, lr %.1e",
        phase.name, phase.start + 1, phase.end, "none" if phase.depth is None else phase.depth,
        n_trainable, phase.learning_rate,
    )  # fmt: skip
    resume = state.checkpoint is not None  # only ever the first unfinished phase's
    counters = state.counters if resume else {}
    resumable: dict[str, Any] = {}
    if common.early_stopping_patience > 0:
        resumable["early_stopping"] = cb.ResumableEarlyStopping(
            backup, counters.get("early_stopping"), monitor=common.monitor,
            patience=common.early_stopping_patience,
        )  # fmt: skip
    if common.schedule == "plateau":
        resumable["plateau"] = cb.ResumablePlateau(
            counters.get("plateau"), monitor=common.monitor, factor=common.plateau_factor,
            patience=common.plateau_patience, min_lr=phase.learning_rate * common.min_lr_ratio,
        )  # fmt: skip
    recorder = cb.Recorder(state, backup, phase, common.epochs, common.monitor, live_logger, resumable,
                           commit_each_epoch=not job.multi)  # fmt: skip
    progress = cb.Progress(job.steps_per_epoch, common.epochs)
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


def write_outputs(
    job: Job, state: TrainState, backup: Backup, where: WorkerPaths, live_logger: Any, resumed_from: int,
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


def _recalibrate_bn(job: Job, summary: dict[str, Any]) -> dict[str, Any]:
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


def _summary(job: Job, state: TrainState, resumed_from: int, t_start: float) -> dict[str, Any]:
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


def make_optimizer(phase: Phase, common: Any, steps_per_epoch: int) -> Any:
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


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None
