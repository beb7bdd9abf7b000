"""The phase plan of a training run: the new head alone on a frozen pretrained backbone, then one
or more fine-tuning phases with the top N backbone layers unfrozen (``train.backbone.<bb>.unfreeze``).
A backbone without pretrained weights (custom_cnn, or the offline fallback) trains whole in a
single phase. Pure: no TensorFlow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Phase", "plan_phases"]


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
