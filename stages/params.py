"""Typed, validated view of ``params.yaml``.

``params.yaml`` is read here and nowhere else. Every section becomes a frozen dataclass; the
loader walks the dataclass fields, so an unknown or misspelled key, a missing key, a wrong type
or a value out of range fails at load time with a message naming the full key
(``split.fractions.train``), never later as a ``KeyError`` deep inside a stage.

Bounds live next to the field (``_f(0.7, lo=0, hi=1)``), choices are ``Literal`` types, and
rules that tie several fields together live in ``__post_init__`` and raise :class:`ParamsError`.
A stage receives its own section (``load_params(path).split``), never the whole file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.common import CLASSES, DX_TYPES, LOCALIZATIONS, SEXES

__all__ = ["ParamsError", "Params", "load_params", "parse_params"]


class ParamsError(ValueError):
    """A problem in params.yaml; the message always names the key."""


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    """A dataclass field with inclusive numeric bounds checked by the loader."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or default_factory for mutable defaults")
    return field(default=default, metadata={"lo": lo, "hi": hi}, **kw)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class BaseParams:
    seed: int = _f(42, lo=0, hi=2**31 - 1)


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded default data set: HAM10000-shaped, drawn procedurally from the seed."""

    n_images: int = _f(700, lo=7, hi=200_000)
    width: int = _f(200, lo=32, hi=4096)
    height: int = _f(150, lo=32, hi=4096)
    max_images_per_lesion: int = _f(6, lo=1, hi=6)
    jpeg_quality: int = _f(90, lo=50, hi=100)
    # Fraction of lesions drawn a second time under a different lesion_id (same physical lesion
    # catalogued twice, as happens in real archives): the split stage must still group them.
    cross_id_duplicate_rate: float = _f(0.02, lo=0.0, hi=0.5)
    # Fraction of lesions drawn part-way towards a look-alike class (a naevus that looks like a
    # melanoma): keeps the task learnable but not perfectly separable, as in real dermoscopy.
    atypical_rate: float = _f(0.2, lo=0.0, hi=1.0)
    # Whose set it is (stages/synthetic.py's PROFILES): default, or another clinic with its own
    # patients and dermatoscope (colour cast, lighting, vignette, export): a drifted batch. Each
    # clinic's image_ids and lesion_ids come from its own range: it can join the default set.
    profile: Literal["default", "clinic_b", "clinic_c"] = "default"


@dataclass(frozen=True)
class DataverseParams:
    """Harvard Dataverse release of HAM10000 (doi:10.7910/DVN/DBW86T)."""

    base_url: str = "https://dataverse.harvard.edu"
    doi: str = "doi:10.7910/DVN/DBW86T"
    files: tuple[str, ...] = (
        "HAM10000_images_part_1.zip",
        "HAM10000_images_part_2.zip",
        "HAM10000_metadata.tab",
    )
    timeout_s: float = _f(30.0, lo=0.1, hi=3600)
    retries: int = _f(5, lo=0, hi=50)
    backoff_s: float = _f(2.0, lo=0.0, hi=600)
    chunk_bytes: int = _f(1 << 20, lo=1024, hi=1 << 30)
    # A listed file with neither checksum nor size cannot be verified: refuse it, or warn loudly.
    unverified: Literal["refuse", "warn"] = "refuse"


@dataclass(frozen=True)
class DownloadParams:
    # "synthetic" | "dataverse" | "local:PATH" (folder or .zip in HAM10000 layout; a relative
    # PATH is taken from the repository root, where dvc runs the stage).
    source: str = "synthetic"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    dataverse: DataverseParams = field(default_factory=DataverseParams)
    # More labelled data merged with the source into data/raw: each a PATH as local:PATH takes
    # (folder or .zip in HAM10000 layout, relative to the repository root), e.g. a new batch.
    extra_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, extra in enumerate(self.extra_sources):
            key = f"download.extra_sources[{i}]"
            if not extra.strip():
                raise ParamsError(f"{key}: empty path; give a folder or .zip in HAM10000 layout")
            if extra.startswith("local:"):
                raise ParamsError(f"{key}: write the path without 'local:' ({extra[len('local:') :]!r})")
        if self.source in ("synthetic", "dataverse"):
            return
        if self.source.startswith("local:") and len(self.source) > len("local:"):
            return
        raise ParamsError(
            f"download.source: unknown source {self.source!r}; use 'synthetic', 'dataverse' or 'local:PATH'"
        )

    @property
    def local_path(self) -> Path | None:
        return Path(self.source[len("local:") :]) if self.source.startswith("local:") else None

    @property
    def extra_paths(self) -> tuple[Path, ...]:
        return tuple(Path(extra) for extra in self.extra_sources)


@dataclass(frozen=True)
class FractionsParams:
    train: float = _f(0.70, lo=0.0, hi=1.0)
    val: float = _f(0.15, lo=0.0, hi=1.0)
    test: float = _f(0.15, lo=0.0, hi=1.0)

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamsError(f"split.fractions: train+val+test must be 1.0, got {total:g}")
        if min(self.train, self.val, self.test) <= 0:
            raise ParamsError("split.fractions: every fraction must be > 0")


@dataclass(frozen=True)
class SplitParams:
    # pHash Hamming radius for *candidate* retrieval only; candidates are verified before grouping.
    hash_radius: int = _f(8, lo=0, hi=32)
    # Verification: best normalised cross-correlation of the two high-passed grey thumbnails
    # over flips, rotations and shifts; a pair is a duplicate at or above the threshold.
    verify_threshold: float = _f(0.55, lo=-1.0, hi=1.0)
    # Candidates scoring below this at half resolution skip the full-resolution pass.
    verify_prefilter: float = _f(0.3, lo=-1.0, hi=1.0)
    max_group_size: int = _f(12, lo=1, hi=1000)
    fractions: FractionsParams = field(default_factory=FractionsParams)
    dedupe_majority_in_train: bool = False
    eval_images: Literal["all", "canonical"] = "all"
    workers: int = _f(0, lo=0, hi=256)  # 0 = all cores


@dataclass(frozen=True)
class ValidateParams:
    image_id_pattern: str = r"^ISIC_\d{7}$"
    min_class_count: int = _f(5, lo=0, hi=1_000_000)
    on_image_error: Literal["fail", "quarantine"] = "fail"
    on_non_rgb: Literal["convert", "reject"] = "convert"
    # A PNG (or other non-JPEG) named .jpg: convert = accept it (prepare decodes by content and
    # converts to RGB); reject = a failing image, like a grayscale one under on_non_rgb: reject.
    on_non_jpeg: Literal["convert", "reject"] = "convert"
    # The allowed metadata values; empty sex/localization are allowed (prepare reads "unknown").
    classes: tuple[str, ...] = CLASSES
    dx_types: tuple[str, ...] = DX_TYPES
    sexes: tuple[str, ...] = SEXES
    localizations: tuple[str, ...] = LOCALIZATIONS
    min_side: int = _f(32, lo=1, hi=100_000)
    max_side: int = _f(8192, lo=1, hi=100_000)
    # 100 MP; at most 1 GP: a larger cap would let one header allocate gigabytes (a bomb)
    max_pixels: int = _f(100_000_000, lo=1, hi=1_000_000_000)
    fraction_tolerance: float = _f(0.05, lo=0.0, hi=1.0)
    workers: int = _f(0, lo=0, hi=256)

    def __post_init__(self) -> None:
        try:
            re.compile(self.image_id_pattern)
        except re.error as e:
            raise ParamsError(f"validate.image_id_pattern: not a valid regex: {e}") from None
        if self.min_side > self.max_side:
            raise ParamsError("validate.min_side must be <= validate.max_side")
        for name in ("classes", "dx_types", "sexes", "localizations"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ParamsError(f"validate.{name}: list each value once, at least one")


@dataclass(frozen=True)
class PrepareParams:
    image_size: int = _f(64, lo=16, hi=1024)
    aspect: Literal["pad", "crop"] = "crop"
    shard_size: int = _f(2048, lo=1, hi=1_000_000)  # images per TFRecord shard
    # JPEG draft decoding keeps the final resampling step >= this factor (Pillow's reducing_gap):
    # 1 is fastest, 2 is close to a full-resolution resize, >= 3 indistinguishable from it.
    draft_gap: float = _f(2.0, lo=1.0, hi=16.0)
    workers: int = _f(0, lo=0, hi=256)  # 0 = all cores


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
    rotation: float = _f(
        0.5, lo=0.0, hi=0.5
    )  # fraction of a full turn: 0.5 = any angle (lesions have no "up")
    zoom: float = _f(0.1, lo=0.0, hi=0.9)  # +- fraction of the side
    shift: float = _f(0.05, lo=0.0, hi=0.5)  # +- fraction of the side
    brightness: float = _f(0.1, lo=0.0, hi=1.0)  # +- fraction of the 0-255 range
    contrast: float = _f(0.1, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class TrainCommonParams:
    """Knobs every backbone shares (changing one retrains every backbone)."""

    epochs: int = _f(5, lo=1, hi=10_000)  # the whole budget: head-only + fine-tuning phases
    batch_size: int = _f(32, lo=1, hi=4096)  # per replica (device)
    loss: Literal["focal", "weighted_ce"] = "focal"
    focal_gamma: float = _f(2.0, lo=0.0, hi=10.0)
    # class weight = (N / (K n_c)) ** power, rescaled to mean 1 per image: 1 = "balanced", 0 = off
    class_weight_power: float = _f(0.5, lo=0.0, hi=2.0)
    label_smoothing: float = _f(0.0, lo=0.0, hi=0.5)
    weight_decay: float = _f(1e-4, lo=0.0, hi=1.0)  # AdamW, decoupled; biases and norms excluded
    schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = _f(1, lo=0, hi=1000)  # linear warm-up per phase (cosine schedule)
    min_lr_ratio: float = _f(0.01, lo=0.0, hi=1.0)  # cosine floor, as a fraction of the peak
    plateau_factor: float = _f(0.5, lo=0.01, hi=0.99)
    plateau_patience: int = _f(2, lo=0, hi=1000)
    early_stopping_patience: int = _f(5, lo=0, hi=10_000)  # epochs without gain; 0 = off
    monitor: Literal["val_macro_auc", "val_macro_f1"] = "val_macro_auc"  # best-checkpoint choice
    augment: AugmentParams = field(default_factory=AugmentParams)
    shuffle_buffer: int = _f(4096, lo=1, hi=10_000_000)
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
    metadata_dropout: float = _f(0.5, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class BackboneParams:
    """Knobs of one backbone (changing them retrains only that backbone)."""

    head: Literal["gap", "funnel"] = "gap"  # GAP+dropout+dense, or a 3-layer swish funnel
    dropout: float = _f(0.3, lo=0.0, hi=0.95)
    funnel_units: int = _f(256, lo=8, hi=8192)  # widths units, units/2, units/4
    fusion: bool = False  # gate image features with age, sex, localization
    fusion_units: int = _f(32, lo=1, hi=4096)
    learning_rate: float = _f(1e-3, lo=1e-8, hi=10.0)  # head phase, and training from scratch
    finetune_learning_rate: float = _f(1e-4, lo=1e-8, hi=10.0)
    head_epochs: int = _f(2, lo=0, hi=10_000)  # frozen-backbone epochs before unfreezing
    # One fine-tuning phase per entry: the top N backbone layers trainable (-1 = all). The epochs
    # left after the head phase are shared equally between the phases.
    unfreeze: tuple[int, ...] = (-1,)
    batch_size: int = _f(0, lo=0, hi=4096)  # 0 = train.common.batch_size
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
    # in it share data and split, so their spread is training noise (python -m stages.noise).
    seed_offset: int = _f(0, lo=0, hi=1_000_000)
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


@dataclass(frozen=True)
class EvaluateParams:
    # Lesion-level bootstrap replicates for the 95% CIs (0 = no CIs).
    bootstrap_samples: int = _f(1000, lo=0, hi=100_000)
    ci_level: float = _f(0.95, lo=0.5, hi=0.999)
    tta: bool = False  # average over the 4 flips (none, left-right, up-down, both)
    batch_size: int = _f(64, lo=1, hi=4096)
    # Upper-exclusive edges of the age bands of the subgroup report: [30, 45] -> <30, 30-44, 45+.
    age_bands: tuple[int, ...] = (30, 45, 60, 75)
    # A subgroup is a candidate for "worst subgroup" only with at least this many malignant cases.
    subgroup_min_malignant: int = _f(5, lo=1, hi=1_000_000)

    def __post_init__(self) -> None:
        if list(self.age_bands) != sorted(set(self.age_bands)):
            raise ParamsError(f"evaluate.age_bands: must be strictly increasing, got {list(self.age_bands)}")


@dataclass(frozen=True)
class EnsembleParams:
    members: tuple[str, ...] = ("mobilenetv2", "custom_cnn")
    # equal | fitted (weights on the simplex minimising validation log-loss; test never used)
    weights: Literal["equal", "fitted"] = "fitted"

    def __post_init__(self) -> None:
        if not self.members:
            raise ParamsError("ensemble.members: list at least one member")
        if len(set(self.members)) != len(self.members):
            raise ParamsError(f"ensemble.members: listed twice: {list(self.members)}")


@dataclass(frozen=True)
class CalibrateParams:
    target_recall: float = _f(0.95, lo=0.0, hi=1.0)
    # point: the validation recall meets the target; lower_ci: the lower end of its lesion
    # bootstrap CI does (a safety margin for small validation sets).
    recall_bound: Literal["point", "lower_ci"] = "point"
    # temperature: one T; temperature_bias: T and a per-class logit bias, fitted on val NLL (undoes
    # the prior shift of class-weighted training; see metrics.fit_temperature_bias)
    method: Literal["temperature", "temperature_bias"] = "temperature_bias"
    # the predicted class: argmax of the calibrated probabilities, or balanced: argmax p / prior
    # (val class shares), the decision that maximises balanced accuracy
    decision: Literal["argmax", "balanced"] = "balanced"
    ece_bins: int = _f(15, lo=2, hi=1000)
    bootstrap_samples: int = _f(1000, lo=10, hi=100_000)  # for recall_bound: lower_ci
    ci_level: float = _f(0.95, lo=0.5, hi=0.999)


# Inside the repository but never ours to write: git's and DVC's own folders (a hook is code).
_NOT_WRITABLE = (".git", ".dvc")


def _inside_repo(key: str, value: str) -> None:
    """A path the pipeline *writes* must stay inside the repository: relative, no ``..``, no
    ``~`` (the monitor flow expands it), not the root itself, not in .git or .dvc. A params
    change (``dvc exp run -S``, a deployment's overrides) must not write anywhere else.
    Paths the pipeline only reads (download.source, download.extra_sources, drift.new_images,
    drift.inbox) may be anywhere."""
    why = ""
    p = Path(value)
    if not value.strip():
        why = "an empty path"
    elif p.is_absolute() or value.startswith("\\"):
        why = "an absolute path"
    elif value.startswith("~"):
        why = "a home-relative path"
    elif ".." in p.parts:
        why = "a path through '..'"
    elif not p.parts:
        why = "the repository root itself"
    elif p.parts[0] in _NOT_WRITABLE:
        why = f"inside {p.parts[0]}/ ({p.parts[0][1:]}'s own folder)"
    if why:
        raise ParamsError(
            f"{key}: {value!r} must be a relative path inside the repository, e.g. 'data/monitor', "
            f"not {why}: the pipeline writes there"
        )


# Evidently's stat tests (evidently.legacy.calculations.stattests), by column kind.
NUM_STATTESTS = (
    "wasserstein", "ks", "psi", "kl_div", "jensenshannon", "hellinger", "anderson",
    "cramer_von_mises", "mannw", "ed", "t_test", "emperical_mmd",
)  # fmt: skip
CAT_STATTESTS = (
    "jensenshannon", "chisquare", "psi", "kl_div", "hellinger", "z", "TVD", "fisher_exact", "g_test",
)  # fmt: skip


@dataclass(frozen=True)
class DriftReferenceParams:
    """The reference table ``calibrate`` stores in the bundle: changing it rebuilds the bundle."""

    split: Literal["train", "val"] = "train"
    # A seeded sample of the split keeps the bundle small and the report fast on large sets.
    max_images: int = _f(3000, lo=50, hi=10_000_000)
    # Long side (px) of the view brightness, colour and sharpness are measured on.
    stats_size: int = _f(128, lo=16, hi=2048)


@dataclass(frozen=True)
class DemoBatchParams:
    """The demo's batch of "new" images: the synthetic source drawn with another device profile."""

    profile: Literal["default", "clinic_b", "clinic_c"] = "clinic_b"  # download.synthetic.profile choices
    n_images: int = _f(300, lo=7, hi=100_000)
    seed: int = _f(7, lo=0, hi=2**31 - 1)


@dataclass(frozen=True)
class DriftParams:
    # The batch the `drift` stage checks: a folder of images (relative to the repository root,
    # or absolute), optionally with a HAM10000 metadata CSV. Only read, never written.
    new_images: str = "data/incoming/demo-clinic-b"
    reference: DriftReferenceParams = field(default_factory=DriftReferenceParams)
    # Per-feature tests (Evidently's names) and their thresholds: for the distance tests
    # (wasserstein, jensenshannon) a feature drifts when the distance is >= the threshold; for
    # p-value tests (ks, chisquare ...) when p < the threshold.
    num_method: str = "wasserstein"
    num_threshold: float = _f(0.2, lo=0.0, hi=100.0)
    cat_method: str = "jensenshannon"
    cat_threshold: float = _f(0.1, lo=0.0, hi=1.0)
    # dataset_drift when at least this share of the per-image features drifted (Evidently's rule).
    drift_share: float = _f(0.5, lo=0.0, hi=1.0)
    # A single feature whose whole distribution moved by >= this many reference standard
    # deviations (normed Wasserstein distance, whatever num_method is) also flags the batch: a
    # blur or a recompression moves one or two features a lot, not half of them a little.
    alarm_threshold: float = _f(1.0, lo=0.0, hi=1000.0)
    # Evidently's EmbeddingsDrift method on the raw embedding: model (a classifier told to tell
    # the two apart; drift when its ROC AUC >= threshold), mmd, distance or ratio.
    embedding_method: Literal["model", "mmd", "distance", "ratio"] = "model"
    embedding_threshold: float = _f(0.6, lo=0.0, hi=1.0)
    pca_components: int = _f(5, lo=0, hi=64)  # embedding PCA components in the per-feature report
    max_pixels: int = _f(40_000_000, lo=1_000, hi=1_000_000_000)  # refused from the header above
    workers: int = _f(0, lo=0, hi=256)  # 0 = all cores
    # Every check is also a snapshot in this local Evidently workspace (`evidently ui --workspace`).
    workspace: str = "evidently_workspace"
    project: str = "skin-lesion drift"
    # The monitor flow: batches (sub-folders) dropped here are checked once each.
    inbox: str = "data/inbox"
    monitor_state: str = "data/monitor"
    # On drift the monitor emits skinlesion.drift.detected; false marks the event so the retrain
    # deployment's trigger ignores it (the check and its report still happen).
    trigger_retrain: bool = True
    demo_batch: DemoBatchParams = field(default_factory=DemoBatchParams)

    def __post_init__(self) -> None:
        if self.num_method not in NUM_STATTESTS:
            raise ParamsError(f"drift.num_method: {self.num_method!r} is not one of {list(NUM_STATTESTS)}")
        if self.cat_method not in CAT_STATTESTS:
            raise ParamsError(f"drift.cat_method: {self.cat_method!r} is not one of {list(CAT_STATTESTS)}")
        if not self.new_images:
            raise ParamsError("drift.new_images: empty; give the folder of new images to check")
        for key in ("workspace", "monitor_state"):
            _inside_repo(f"drift.{key}", getattr(self, key))


@dataclass(frozen=True)
class PromoteParams:
    """The retrain flow's promotion gate (flows/promote.py). No DVC stage reads this section, so
    changing it reruns nothing."""

    # The candidate may lose at most this much malignant_auc and macro_auc against production;
    # a negative value demands an improvement of at least that much.
    max_auc_drop: float = _f(0.01, lo=-1.0, hi=1.0)
    # The test malignant recall a candidate must reach; null = calibrate.target_recall (the
    # recall the threshold was tuned for on val).
    min_test_recall: float | None = _f(None, lo=0.0, hi=1.0)
    # In a git repository: commit the pipeline record (dvc.lock, params, metrics,
    # models/production.dvc) and tag it model-<UTC time>, so `dvc metrics diff <tag>` works.
    git_tag: bool = True


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    split: SplitParams = field(default_factory=SplitParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    drift: DriftParams = field(default_factory=DriftParams)
    promote: PromoteParams = field(default_factory=PromoteParams)

    def __post_init__(self) -> None:
        unknown = set(self.ensemble.members) - set(self.train.backbones)
        if unknown:
            raise ParamsError(
                f"ensemble.members: {sorted(unknown)} not in train.backbones {list(self.train.backbones)}"
            )


# --------------------------------------------------------------------------- loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's shape."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arm, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        # YAML's `1e3` is a float and `true` is a bool: neither is an int here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ParamsError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {_type_name(tp)}")  # a bug in this module


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ParamsError(f"{prefix}{key}: unknown key{hint}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            continue  # the dataclass default applies
        value = _convert(raw[name], hints[name], key)
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if value is None:  # an optional knob left unset: no bounds to check
            kwargs[name] = value
            continue
        if lo is not None and value < lo:
            raise ParamsError(f"{key}: {value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ParamsError(f"{key}: {value!r} is above the maximum {hi}")
        kwargs[name] = value
    return cls(**kwargs)


def parse_params(raw: dict[str, Any] | None) -> Params:
    """Build :class:`Params` from an already-parsed mapping (tests feed dicts directly)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params: expected a mapping at the top level, got {type(raw).__name__}")
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` naming the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
