"""The resume store of training: ``<backup>`` (a folder that outlives a killed run, see
:class:`Backup`) holds ``state.json`` and the weight files it names.

After every epoch the train stage writes, in this order: the epoch's weights as
``best-<epoch>.npz`` when it is a new best; ``epoch-<epoch>/`` (weights and optimizer);
``state.json`` naming both (one rename: the commit); and only then deletes the files the previous
state named. So at every instant the state on disk, its checkpoint and its best weights belong to
the same epochs; what a killed run wrote after its last commit is deleted on resume. The state
also carries early stopping's and ReduceLROnPlateau's counters and the current learning rate
(see :mod:`skinlesion.model.callbacks`), so a resumed run stops and decays where the
uninterrupted one would. A different configuration or data (another :func:`config_fingerprint`)
discards the backup. The custom multi-worker loop commits only at phase ends, so a killed
cluster restarts its unfinished phase.

No TensorFlow here: the weights are read and written through the model's own methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.outputs import atomic_dir, atomic_file, failpoint

log = logging.getLogger(__name__)

__all__ = [
    "DONE",
    "FAILPOINT_ENV",
    "STATE",
    "STATE_VERSION",
    "Backup",
    "TrainState",
    "best_file_name",
    "config_fingerprint",
    "phase_file_name",
    "resume_failpoint",
]

STATE = "state.json"
DONE = "DONE"
STATE_VERSION = 2  # 1: Keras BackupAndRestore beside the state (not resumable any more)
# Test hook (see resume_failpoint): names a point between the resume writes where the process kills itself.
FAILPOINT_ENV = "SKINLESION_TRAIN_FAILPOINT"


def config_fingerprint(config: dict[str, Any]) -> str:
    """The resume key of a run's configuration: a backup with another one is discarded."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
            names.add(phase_file_name(self.phases_done[-1]))
        return {n for n in names if n}


def phase_file_name(index: int) -> str:
    """The weights a finished phase leaves (see :meth:`Backup.save_phase`)."""
    return f"phase-{index}.npz"


def resume_failpoint(point: str, epoch: int) -> None:
    """Test hook (``skinlesion.core.outputs.failpoint``): ``SKINLESION_TRAIN_FAILPOINT=<point>[@N]`` kills
    this process at ``point`` of the first epoch >= N. Points: ``after_best_weights`` (new best
    weights written, state not yet), ``after_checkpoint`` (epoch checkpoint written, state not
    yet), ``after_commit``. tests/unit/model/test_train_resume.py kills a real run inside those windows.
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
        name = best_file_name(epoch)
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
        name = phase_file_name(index)
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


def best_file_name(epoch: int) -> str:
    """The weights after ``epoch`` kept as a best (see :meth:`Backup.save_best`)."""
    return f"best-{epoch:04d}.npz"


def _save_weights_npz(model: Any, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        np.savez(fh, *model.get_weights())
