"""Evaluate stage: one trained backbone on the validation and test splits.

Writes

* ``<out>/{val,test}.csv`` - one row per image, in the prepared split's order: image_id,
  lesion_id, dx (true), age, sex, localization, ``prob_<dx>`` (the 7 probabilities) and
  ``logit_<dx>`` = log(prob) (so temperature scaling also works after averaging members).
  A fusion member is scored with the split's own metadata as ``serve`` would (rows with any
  field unknown image-only), and again image-only into ``{val,test}_image_only.csv``;
* ``<metrics>`` - flat JSON of the test metrics (:func:`skinlesion.measure.metrics.classification_metrics`;
  a fusion member's image-only ones again with the suffix ``_image_only``) each with
  ``<key>_ci_low`` / ``<key>_ci_high`` from a lesion-level bootstrap, a few validation numbers
  (``val_*``) and the worst subgroup;
* ``<plots>/`` - ``confusion.csv`` (actual,predicted per test image, DVC's confusion template),
  ``confusion_normalized.png`` (row-normalised), ``roc/<dx>.csv`` and ``pr/<dx>.csv`` (one curve
  per class plus ``malignant``), ``confidence_grid.png`` (test images with the model's best,
  median and worst confidence in the true class, per class) and ``subgroups.csv``.

The report functions (:func:`read_predictions`, :func:`report`, :func:`write_plots`) live in
:mod:`skinlesion.measure.predictions`, shared with the ensemble and calibrate stages, so a member and the
ensemble are measured identically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, write_json
from skinlesion.core.schema import CLASSES
from skinlesion.core.splits import EVAL_SPLITS
from skinlesion.measure.predictions import (  # noqa: F401 (re-exported: the report helpers live there)
    META_COLUMNS,
    SUBGROUP_ATTRIBUTES,
    age_band,
    age_band_names,
    confidence_grid,
    confidence_picks,
    json_value,
    labels,
    logit_columns,
    metrics_with_ci,
    predictions_frame,
    prob_columns,
    probabilities,
    read_predictions,
    report,
    subgroup_table,
    worst_subgroup,
    write_plots,
    write_predictions,
)
from skinlesion.measure.scoring import (
    IMAGE_ONLY,
    METADATA,
    MODES,
    MetaArrays,
    member_probabilities,
    mode_inputs,
    mode_suffix,
    row_modes,
)
from skinlesion.params.base import BaseParams
from skinlesion.params.evaluate import EvaluateParams
from skinlesion.params.schema import load_sections
from skinlesion.params.train import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    backbone: str
    n_val: int
    n_test: int
    metrics: dict[str, Any]


def split_meta(arrays: Any) -> MetaArrays:
    """The metadata of a prepared split (``SplitArrays``) as a fusion member takes it."""
    return MetaArrays(arrays.age, arrays.sex, arrays.localization)


def predict(
    model: Any, arrays: Any, *, batch_size: int, tta: bool, mode: str = METADATA, call: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """A member's probabilities for a whole split (``SplitArrays``) in an input mode, and the
    mode each row used: the scoring path the bundle serves with (:mod:`skinlesion.measure.scoring`).

    ``mode`` ``metadata``: each row as ``serve`` would score it given the split's own metadata
    (rows with any field unknown image-only); ``image_only``: every field unknown. A member
    without fusion ignores metadata (every row image-only). ``call``: the model as a graph
    (:func:`skinlesion.model.networks.as_graph`), built once by a caller that predicts several times.
    """
    from skinlesion.model.networks import as_graph

    takes_meta = len(model.inputs) > 1
    n = len(arrays.images)
    meta = split_meta(arrays) if mode == METADATA else None
    modes = row_modes(meta, n, MODES if takes_meta else (IMAGE_ONLY,))
    fed = mode_inputs(meta, modes)
    probs = member_probabilities(
        call or as_graph(model),
        arrays.images,
        fed,
        takes_meta=takes_meta,
        tta=tta,
        batch_size=batch_size,
        progress=f"predict ({mode})",
    )
    return probs, modes


def member_modes(model: Any) -> tuple[str, ...]:
    """The input modes a member is evaluated in: both with fusion, ``image_only`` without."""
    return MODES if len(model.inputs) > 1 else (IMAGE_ONLY,)


def predictions_name(split: str, mode: str, modes: Sequence[str]) -> str:
    """``val.csv`` (the metadata mode, or the only one) and ``val_image_only.csv``."""
    return f"{split}{mode_suffix(mode, modes)}.csv"


def _check_probs(probs: np.ndarray, n: int, where: str, classes: Sequence[str]) -> None:
    if probs.shape != (n, len(classes)):
        raise StageError(f"{where}: model output has shape {probs.shape}, expected ({n}, {len(classes)})")
    if not np.all(np.isfinite(probs)):
        raise StageError(f"{where}: model output holds NaN or inf")
    sums = probs.sum(axis=1)
    if np.any(np.abs(sums - 1) > 1e-3) or np.any(probs < 0):
        raise StageError(
            f"{where}: model output is not a probability distribution (row sums {sums.min():.3f}"
            f"..{sums.max():.3f}); the model must end in a softmax"
        )


# --------------------------------------------------------------------------- stage


def run(
    params: EvaluateParams,
    *,
    backbone: str,
    seed: int,
    model_dir: Path,
    prepared_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
) -> EvaluateResult:
    from skinlesion.model.tfdata import load_manifest, read_split_numpy

    model_path = Path(model_dir) / "model.keras"
    if not model_path.is_file():
        raise StageError(f"{model_path}: not found; run the train stage for {backbone!r} first")
    manifest = load_manifest(prepared_dir)
    classes = tuple(manifest.get("classes", CLASSES))
    if classes != CLASSES:
        raise StageError(
            f"{Path(prepared_dir) / 'manifest.json'}: classes {list(classes)} differ from {list(CLASSES)}"
        )

    from skinlesion.model.networks import as_graph, load_model

    log.info("loading %s", model_path)
    try:
        model = load_model(model_path)
    except Exception as e:  # a corrupt or foreign file: say which, not a Keras traceback
        raise StageError(f"{model_path}: cannot load the model ({type(e).__name__}: {e})") from None

    call = as_graph(model)  # one traced graph for every split and mode
    modes = member_modes(model)
    frames: dict[tuple[str, str], pd.DataFrame] = {}
    test_images = None
    for split in EVAL_SPLITS:
        arr = read_split_numpy(prepared_dir, split)
        csv_path = Path(prepared_dir) / manifest["splits"][split]["csv"]
        meta = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        if meta["image_id"].tolist() != arr.image_ids.tolist():
            raise StageError(f"{csv_path}: rows are not in shard order; rerun the prepare stage")
        if len(meta) == 0:
            raise StageError(f"{csv_path}: split {split!r} is empty")
        for mode in modes:
            log.info(
                "%s: predicting %d %s images (%s)%s",
                backbone, len(meta), split, mode, " with flip TTA" if params.tta else "",
            )  # fmt: skip
            probs, _ = predict(model, arr, batch_size=params.batch_size, tta=params.tta, mode=mode, call=call)
            _check_probs(probs, len(meta), str(model_path), classes)
            frames[split, mode] = predictions_frame(meta, probs, classes)
        if split == "test":  # kept for the confidence grid; val's pixels are dropped here
            test_images = arr.images

    rng = np.random.default_rng(seed)
    metrics: dict[str, Any] = {}
    table = None
    for mode in modes:
        m, t = report(
            frames["test", mode], frames["val", mode], params, rng, desc=f"{backbone} {mode} bootstrap"
        )
        metrics.update({f"{k}{mode_suffix(mode, modes)}": v for k, v in m.items()})
        table = t if table is None else table

    with atomic_dir(out_dir) as tmp:
        for split, mode in frames:
            write_predictions(frames[split, mode], tmp / predictions_name(split, mode, modes))
    with atomic_dir(plots_dir) as tmp:
        write_plots(tmp, frames["test", modes[0]], table, images=test_images, title=backbone)
    write_json(metrics_path, metrics)
    log.info(
        "%s test: macro AUC %s [%s, %s], balanced acc %s, malignant AUC %s, worst subgroup %s",
        backbone,
        metrics["macro_auc"],
        metrics["macro_auc_ci_low"],
        metrics["macro_auc_ci_high"],
        metrics["balanced_accuracy"],
        metrics["malignant_auc"],
        metrics["worst_subgroup"],
    )
    return EvaluateResult(backbone, len(frames["val", modes[0]]), len(frames["test", modes[0]]), metrics)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.evaluate",
        description="Evaluate one trained backbone on val and test: predictions, metrics with "
        "lesion-bootstrap CIs, plots and a subgroup report.",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (evaluate, base.seed)"
    )
    ap.add_argument("--backbone", required=True, help="backbone name, as in train.backbones")
    ap.add_argument(
        "--model", type=Path, required=True, help="folder holding model.keras (models/<backbone>)"
    )
    ap.add_argument("--prepared", type=Path, required=True, help="prepared shards folder (data/prepared)")
    ap.add_argument("--out", type=Path, required=True, help="predictions folder to write (val.csv, test.csv)")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder to write")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(args.params, base=BaseParams, evaluate=EvaluateParams, train=TrainParams)
        if args.backbone not in params.train.backbones:
            raise StageError(
                f"--backbone {args.backbone!r} is not in train.backbones {list(params.train.backbones)}"
            )
        run(
            params.evaluate,
            backbone=args.backbone,
            seed=params.base.seed,
            model_dir=args.model,
            prepared_dir=args.prepared,
            out_dir=args.out,
            metrics_path=args.metrics,
            plots_dir=args.plots,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
