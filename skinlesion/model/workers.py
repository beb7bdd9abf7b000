"""Where each process of a training run writes (``train.strategy: multi_worker``).

Every worker trains the same model, but only the chief (TF_CONFIG's ``chief`` task, else worker 0)
writes ``<out>``, ``<metrics>`` and ``<live>``; the others write theirs into a temp folder they
delete at the end, so two workers on one host never write the same file. Each worker keeps its own
resume folder (``<backup>`` on the chief, ``<backup>.<task><index>`` on the others). No TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["WorkerPaths", "is_chief", "worker_paths"]


def is_chief(tf_config: Mapping[str, Any]) -> bool:
    """Whether this TF_CONFIG task is the cluster's chief: TensorFlow's own rule, the ``chief``
    task when the cluster lists one, else worker 0."""
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


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
