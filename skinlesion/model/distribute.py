"""Devices and distribution for the train stage: GPUs, mixed precision, XLA, tf.distribute.

* :func:`visible_gpus` applies ``train.device``: ``gpu`` stops with one line when TensorFlow sees
  no GPU (most often the CPU-only ``tensorflow-cpu`` of ``make setup``; ``make setup GPU=1``
  installs the CUDA build), ``cpu`` hides the GPUs, ``auto`` takes what is there. The train stage
  calls it first, before it reads any data.
* :func:`configure_runtime` turns ``train.strategy`` / ``mixed_precision`` / ``jit_compile`` into a
  :class:`Runtime` (the strategy object and the resolved switches). It must run before any other
  TensorFlow work of the process: memory growth and the multi-worker collective setup can only
  be changed before TensorFlow initialises its devices.
* :func:`custom_fit` is the training loop for ``train.strategy: multi_worker``. Keras 3
  ``Model.fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: "Attempt to
  convert a value (PerReplica...)"), so one epoch is ``strategy.run`` over
  ``experimental_distribute_dataset`` with ``tf.nn.compute_average_loss``; Keras callbacks are
  driven by hand so early stopping, the best checkpoint and the logs behave as under ``fit``.

``CUDA_VISIBLE_DEVICES`` needs no code: TensorFlow only sees the GPUs it lists, which is how a
flow pins one backbone per GPU.

Launching one training over several hosts (e.g. one Prefect worker per GPU host, each running
the same flow run step): every host runs the same command with its own task index, and all
must start within TensorFlow's collective timeout::

    TF_CONFIG='{"cluster": {"worker": ["gpu1:12345", "gpu2:12345"]},
                "task": {"type": "worker", "index": 0}}'   # 1 on gpu2
    dvc repro train@efficientnetb0          # with train.strategy: multi_worker in params.yaml

``train.common.batch_size`` is per replica; the global batch is that times the replica count.
Only the chief (the ``chief`` task, else worker 0) writes the model, metrics and DVCLive files;
the other workers write into a temp folder they delete, so run ``dvc repro`` (and ``dvc push``)
on the chief only and start the others with ``python -m stages.train ...`` and the same
arguments (``dvc repro`` there would fail at the end: its outputs are not on that host).
Resume after a kill is per phase here (the custom loop keeps no epoch backup).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skinlesion.core.errors import StageError

log = logging.getLogger(__name__)

__all__ = ["Runtime", "configure_runtime", "custom_fit", "visible_gpus"]


@dataclass
class Runtime:
    strategy: Any  # tf.distribute.Strategy
    kind: str  # "default" | "mirrored" | "multi_worker"
    replicas: int
    gpus: int
    mixed_precision: bool
    jit_compile: bool | str  # what Model.compile receives: True, False or "auto"
    worker_index: int = 0  # multi-worker task index (0 = chief)
    workers: int = 1

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


def _tf_config() -> dict[str, Any]:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise StageError(
            "train.strategy: multi_worker needs the TF_CONFIG environment variable, e.g. "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        )
    try:
        cfg = json.loads(raw)
        workers = cfg["cluster"]["worker"]
        index = int(cfg["task"]["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"TF_CONFIG: not a valid multi-worker cluster spec ({e}): {raw[:200]}") from None
    if not 0 <= index < len(workers):
        raise StageError(f"TF_CONFIG: task index {index} is outside the {len(workers)} workers")
    return cfg


def visible_gpus(device: str = "auto") -> list[Any]:
    """The GPUs a training under ``train.device`` uses: all TensorFlow sees (``auto``), none
    (``cpu``: hidden from TensorFlow for the rest of the process), or at least one (``gpu``: else
    a :class:`StageError` whose one line says why there is none and how to get one)."""
    if device not in ("auto", "gpu", "cpu"):
        raise StageError(f"train.device: unknown device {device!r}; choose auto, gpu or cpu")
    installed = _tensorflow_dists()
    if device == "gpu" and set(installed) == {"tensorflow-cpu"} and not _device_plugins():
        # The CPU-only build cannot see a GPU: say so before importing TensorFlow, whose import
        # costs seconds and prints its own log lines above the one that matters.
        raise StageError(_no_gpu(installed["tensorflow-cpu"], installed, cuda=False))
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # this process has initialised its devices with the GPUs visible
            raise StageError(
                "train.device: cpu, but TensorFlow already uses the GPUs in this process; start a new "
                "one (or set CUDA_VISIBLE_DEVICES='')"
            ) from None
        return []
    if device == "gpu" and not gpus:
        raise StageError(_no_gpu(tf.__version__, installed, cuda=tf.test.is_built_with_cuda()))
    return gpus


def _tensorflow_dists() -> dict[str, str]:
    """The TensorFlow builds pip installed here, name -> version (both: a broken venv)."""
    from importlib import metadata

    found = {}
    for dist in ("tensorflow-cpu", "tensorflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def _device_plugins() -> bool:
    """Whether a PluggableDevice plugin (site-packages/tensorflow-plugins) could give even the
    CPU-only build a GPU, so only TensorFlow itself can tell."""
    import site
    from pathlib import Path

    return any((Path(d) / "tensorflow-plugins").is_dir() for d in site.getsitepackages())


def _no_gpu(version: str, installed: dict[str, str], *, cuda: bool) -> str:
    build = " and ".join(f"{d} {v}" for d, v in installed.items()) or "not a pip package"
    show = f" (`pip show {next(iter(installed))}`)" if installed else ""
    fallback = "or set train.device: auto to train on the CPU"
    if cuda:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f" and CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""
        why = (
            f"the installed build, {build}, has CUDA but finds no device; check the NVIDIA driver "
            f"(`nvidia-smi`){hidden}, {fallback}"
        )
    else:
        why = (
            f"the installed build, {build}, has no CUDA{show}; install the CUDA build with "
            f"`make setup GPU=1`, {fallback}"
        )
    return f"train.device: gpu, but TensorFlow {version} sees no GPU: {why}"


def configure_runtime(
    strategy: str = "auto",
    mixed_precision: str = "auto",
    jit_compile: str = "auto",
    *,
    device: str = "auto",
    seed: int = 0,
    deterministic: bool = True,
) -> Runtime:
    """Set up devices, precision, seeds and the distribution strategy for one training run."""
    import keras
    import tensorflow as tf

    gpus = visible_gpus(device)
    for gpu in gpus:
        # Grow GPU memory on demand instead of grabbing it all, so several trainings (or a
        # training and an evaluation) can share one card. RuntimeError: devices already
        # initialised (a second run in one process); the first setting stands.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)

    worker_index, workers = 0, 1
    if strategy == "multi_worker":
        cfg = _tf_config()
        worker_index, workers = int(cfg["task"]["index"]), len(cfg["cluster"]["worker"])
        # Collective ops need every worker to create the strategy before any other TF op.
        strat = tf.distribute.MultiWorkerMirroredStrategy()
        kind = "multi_worker"
    elif strategy == "mirrored" or (strategy == "auto" and len(gpus) > 1):
        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strat = tf.distribute.MirroredStrategy(devices=[d.name for d in logical])
        kind = "mirrored"
    elif strategy in ("auto", "default"):
        strat = tf.distribute.get_strategy()
        kind = "default"
    else:
        raise StageError(f"train.strategy: unknown strategy {strategy!r}")

    mixed = mixed_precision == "on" or (mixed_precision == "auto" and bool(gpus))
    # Always set the policy: a previous run in the same process may have left mixed_float16.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    if mixed and not gpus:
        log.warning("train.mixed_precision: on without a GPU: float16 on a CPU is slow and gains nothing")

    jit: bool | str = {"on": True, "off": False}.get(jit_compile, "auto")

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()

    runtime = Runtime(
        strategy=strat,
        kind=kind,
        replicas=int(strat.num_replicas_in_sync),
        gpus=len(gpus),
        mixed_precision=mixed,
        jit_compile=jit,
        worker_index=worker_index,
        workers=workers,
    )
    log.info(
        "devices: %d GPU(s); strategy %s with %d replica(s)%s; mixed precision %s; XLA %s",
        runtime.gpus,
        kind,
        runtime.replicas,
        f" (worker {worker_index} of {workers})" if kind == "multi_worker" else "",
        "on" if mixed else "off",
        jit,
    )
    return runtime


def custom_fit(
    model: Any,
    runtime: Runtime,
    dataset: Any,
    *,
    loss_none: Callable[[Any, Any], Any],
    optimizer: Any,
    global_batch: int,
    initial_epoch: int,
    epochs: int,
    callbacks: list[Any],
) -> None:
    """Train ``model`` for epochs ``initial_epoch..epochs-1`` with a custom distributed step.

    ``dataset`` yields *global* batches (``drop_remainder=True``, so every worker runs the same
    number of steps, which collective all-reduces require); the strategy shards it between the
    workers. ``loss_none`` returns one loss per image. The optimizer sums the replicas'
    gradients, and ``compute_average_loss`` divides by the global batch, so an update equals the
    single-device update on the whole global batch.
    """
    import keras
    import tensorflow as tf

    strategy = runtime.strategy
    options = tf.data.Options()
    # Shard by element: the prepared set may be a single TFRecord file, too few to split by file.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dist = strategy.experimental_distribute_dataset(dataset.with_options(options))
    if runtime.mixed_precision and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.optimizer = optimizer  # so callbacks (and the log line's learning rate) see it

    def replica_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            per_image = loss_none(y, probs)
            loss = tf.nn.compute_average_loss(per_image, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.cast(tf.equal(tf.argmax(probs, -1), tf.argmax(y, -1)), tf.float32)
        return tf.reduce_sum(per_image), tf.reduce_sum(correct), tf.cast(tf.shape(per_image)[0], tf.float32)

    @tf.function
    def train_step(x: Any, y: Any) -> Any:
        out = strategy.run(replica_step, args=(x, y))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in out]

    cbs = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    cbs.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        cbs.on_epoch_begin(epoch)
        total = correct = seen = 0.0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(dist):
            cbs.on_train_batch_begin(step)
            s, c, n = train_step(x, y)
            total, correct, seen = total + float(s), correct + float(c), seen + float(n)
            cbs.on_train_batch_end(step, {})
        if seen == 0:
            raise StageError(f"the training set is smaller than one global batch ({global_batch} images)")
        logs = {"loss": total / seen, "accuracy": correct / seen}
        log.debug("epoch %d: %d images in %.1f s", epoch + 1, int(seen), time.perf_counter() - t0)
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end()
