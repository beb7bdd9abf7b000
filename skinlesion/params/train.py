"""The ``train`` section: backbones, the common recipe, per-backbone knobs, device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from skinlesion.params.schema import ParamsError, bounded

BACKBONES = (
    "efficientnetb0",
    "efficientnetb1",
    "efficientnetb3",
    "mobilenet",
    "mobilenetv2",
    "resnet50",
    "densenet121",
    "custom_cnn",
    "resnet_small",
)


@dataclass(frozen=True)
class AugmentParams:
    """Random augmentation, applied inside the model and active only while training."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal_and_vertical"
    rotation: float = bounded(
        0.5, lo=0.0, hi=0.5
    )  # fraction of a full turn: 0.5 = any angle (lesions have no "up")
    zoom: float = bounded(0.1, lo=0.0, hi=0.9)  # +- fraction of the side
    shift: float = bounded(0.05, lo=0.0, hi=0.5)  # +- fraction of the side
    brightness: float = bounded(0.1, lo=0.0, hi=1.0)  # +- fraction of the 0-255 range
    contrast: float = bounded(0.1, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class TrainCommonParams:
    """Knobs every backbone shares (changing one retrains every backbone)."""

    epochs: int = bounded(5, lo=1, hi=10_000)  # the whole budget: head-only + fine-tuning phases
    batch_size: int = bounded(32, lo=1, hi=4096)  # per replica (device)
    loss: Literal["focal", "weighted_ce"] = "focal"
    focal_gamma: float = bounded(2.0, lo=0.0, hi=10.0)
    # class weight = (N / (K n_c)) ** power, rescaled to mean 1 per image: 1 = "balanced", 0 = off
    class_weight_power: float = bounded(0.5, lo=0.0, hi=2.0)
    label_smoothing: float = bounded(0.0, lo=0.0, hi=0.5)
    weight_decay: float = bounded(1e-4, lo=0.0, hi=1.0)  # AdamW, decoupled; biases and norms excluded
    schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = bounded(1, lo=0, hi=1000)  # linear warm-up per phase (cosine schedule)
    min_lr_ratio: float = bounded(0.01, lo=0.0, hi=1.0)  # cosine floor, as a fraction of the peak
    plateau_factor: float = bounded(0.5, lo=0.01, hi=0.99)
    plateau_patience: int = bounded(2, lo=0, hi=1000)
    early_stopping_patience: int = bounded(5, lo=0, hi=10_000)  # epochs without gain; 0 = off
    monitor: Literal["val_macro_auc", "val_macro_f1"] = "val_macro_auc"  # best-checkpoint choice
    augment: AugmentParams = field(default_factory=AugmentParams)
    shuffle_buffer: int = bounded(4096, lo=1, hi=10_000_000)
    cache: bool = True  # keep the decoded training set in memory after the first epoch
    deterministic: bool = True  # tf op determinism (exact reruns on CPU; may be slower on GPU)
    # precise BatchNorm after training (from-scratch backbones): the saved model's BN statistics
    # are recomputed over the training images under the final weights (models.recalibrate_batchnorm)
    recalibrate_bn: bool = True
    # Metadata dropout (fusion members only; no effect on the others): each of age, sex and
    # localization of a training image is replaced by "unknown", independently, with this
    # probability, drawn anew every epoch. An image served without metadata (all three unknown,
    # as the bundle and the service feed a fusion member) is then in the training distribution
    # (rate**3 of the training images) instead of a combination the fusion layer never saw.
    metadata_dropout: float = bounded(0.5, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class BackboneParams:
    """Knobs of one backbone (changing them retrains only that backbone)."""

    head: Literal["gap", "funnel"] = "gap"  # GAP+dropout+dense, or a 3-layer swish funnel
    dropout: float = bounded(0.3, lo=0.0, hi=0.95)
    funnel_units: int = bounded(256, lo=8, hi=8192)  # widths units, units/2, units/4
    fusion: bool = False  # gate image features with age, sex, localization
    fusion_units: int = bounded(32, lo=1, hi=4096)
    learning_rate: float = bounded(1e-3, lo=1e-8, hi=10.0)  # head phase, and training from scratch
    finetune_learning_rate: float = bounded(1e-4, lo=1e-8, hi=10.0)
    head_epochs: int = bounded(2, lo=0, hi=10_000)  # frozen-backbone epochs before unfreezing
    # One fine-tuning phase per entry: the top N backbone layers trainable (-1 = all). The epochs
    # left after the head phase are shared equally between the phases.
    unfreeze: tuple[int, ...] = (-1,)
    batch_size: int = bounded(0, lo=0, hi=4096)  # 0 = train.common.batch_size
    weights: str = ""  # "" = train.weights; else "imagenet" | "none" | a local weights file


@dataclass(frozen=True)
class BackboneTable:
    efficientnetb0: BackboneParams = field(default_factory=BackboneParams)
    efficientnetb1: BackboneParams = field(default_factory=BackboneParams)
    efficientnetb3: BackboneParams = field(default_factory=BackboneParams)
    mobilenet: BackboneParams = field(default_factory=BackboneParams)
    mobilenetv2: BackboneParams = field(default_factory=BackboneParams)
    resnet50: BackboneParams = field(default_factory=BackboneParams)
    densenet121: BackboneParams = field(default_factory=BackboneParams)
    custom_cnn: BackboneParams = field(default_factory=lambda: BackboneParams(dropout=0.5, head_epochs=0))
    resnet_small: BackboneParams = field(default_factory=lambda: BackboneParams(head_epochs=0))


@dataclass(frozen=True)
class TrainParams:
    backbones: tuple[str, ...] = ("mobilenetv2", "custom_cnn")
    weights: str = "imagenet"  # "imagenet" | "none" | path to a weights file
    weights_fallback: Literal["scratch", "fail"] = "scratch"
    # gpu: stop at the start when TensorFlow sees no GPU (a GPU profile must not train on the CPU
    # unnoticed); auto: the GPUs TensorFlow sees, else the CPU; cpu: hide the GPUs.
    device: Literal["auto", "gpu", "cpu"] = "auto"
    # auto: MirroredStrategy when more than one GPU is visible, else the default strategy;
    # multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (one model over several hosts).
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    mixed_precision: Literal["auto", "on", "off"] = "auto"  # auto: on when a GPU is visible
    jit_compile: Literal["auto", "on", "off"] = "auto"  # auto: Keras decides (XLA on GPU only)
    # Added to base.seed for training only (init, shuffle, augmentation, dropout): runs that differ
    # in it share data and split, so their spread is training noise (python -m tools.noise).
    seed_offset: int = bounded(0, lo=0, hi=1_000_000)
    common: TrainCommonParams = field(default_factory=TrainCommonParams)
    backbone: BackboneTable = field(default_factory=BackboneTable)

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ParamsError("train.backbones: list at least one backbone")
        for b in self.backbones:
            if b not in BACKBONES:
                raise ParamsError(f"train.backbones: unknown backbone {b!r}; choose from {BACKBONES}")
        if len(set(self.backbones)) != len(self.backbones):
            raise ParamsError(f"train.backbones: listed twice: {list(self.backbones)}")
        for f in dataclasses.fields(BackboneTable):
            for d in getattr(self.backbone, f.name).unfreeze:
                if d == 0 or d < -1:
                    raise ParamsError(
                        f"train.backbone.{f.name}.unfreeze: {d} is not a layer count; "
                        "use N >= 1 (top N layers) or -1 (all layers)"
                    )

    def for_backbone(self, name: str) -> BackboneParams:
        """The settings of one backbone (``train.backbone.<name>``)."""
        if name not in BACKBONES:
            raise ParamsError(f"train.backbone: unknown backbone {name!r}; choose from {BACKBONES}")
        return getattr(self.backbone, name)

    def weights_for(self, name: str) -> str:
        """``train.backbone.<name>.weights`` when set, else ``train.weights``."""
        return self.for_backbone(name).weights or self.weights
