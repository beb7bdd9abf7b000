"""Calibrate stage: temperature scaling, the recall-first malignant threshold, the model bundle.

Everything is fitted on the validation split; the test split is only reported on.

1. Calibration of the ensemble's logits (log of the averaged probabilities), fitted on val NLL
   (never worse than T = 1 there), one operating point per input mode
   (:mod:`skinlesion.measure.calibration`): ``calibrate.method`` ``temperature`` (one T) or
   ``temperature_bias`` (T and a per-class bias: undoes the prior shift of class-weighted
   training); the predicted class is ``argmax p`` or, with ``calibrate.decision: balanced``,
   ``argmax p / prior`` (the validation class shares). ECE (15-bin, top-label) before and after,
   on val and test, and a reliability diagram (``<plots>/reliability.png`` and
   ``reliability/{before,after}.csv``).
2. The malignant threshold on the calibrated P(mel) + P(bcc) + P(akiec): on val, the highest
   threshold whose malignant recall reaches ``calibrate.target_recall`` (the point value, or the
   lower end of its lesion-bootstrap CI with ``recall_bound: lower_ci``). Then reported on test
   without re-tuning: recall (with CI), specificity, PPV and referrals per 100 lesions, every test
   number the written bundle's own answer for the test images.
3. The bundle ``<bundle>/`` (:mod:`skinlesion.model.bundle_write`): the member models (copied),
   ``bundle.json`` (members, weights, operating points, classes, image size, the params, the data
   version it came from and ``training_data``: the source and raw data version every face of the
   bundle names first), ``seen.json``, the drift reference and the model card
   (:mod:`skinlesion.measure.card`), also written to ``<card>``. The folder is replaced in one rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from skinlesion.core.cli import run_main, setup_logging
from skinlesion.core.errors import StageError
from skinlesion.core.outputs import atomic_dir, atomic_file, write_json
from skinlesion.core.schema import CLASSES
from skinlesion.core.splits import EVAL_SPLITS, SPLITS
from skinlesion.measure.calibration import fit_modes, report_modes, report_params, write_reliability
from skinlesion.measure.card import model_card
from skinlesion.measure.paired import headline
from skinlesion.measure.predictions import read_predictions, write_predictions
from skinlesion.measure.scoring import IMAGE_ONLY, mode_suffix
from skinlesion.model.bundle_json import read_training_data, trained_on, write_bundle_json
from skinlesion.model.bundle_write import bundle_meta, copy_members, member_files
from skinlesion.model.drift_reference import REFERENCE_KEY, write_drift_reference
from skinlesion.model.seen import seen_of_split, write_seen
from skinlesion.params.calibrate import CalibrateParams
from skinlesion.params.drift import DriftReferenceParams
from skinlesion.params.load import load_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrateResult:
    temperature: float
    threshold: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class DriftReference:
    """Where the drift reference stored in the bundle comes from (skinlesion.model.drift_reference)."""

    raw_dir: Path  # data/raw: images/<image_id>.jpg
    split_csv: Path  # the validated split
    params: DriftReferenceParams
    max_pixels: int
    workers: int = 0

    def write(self, bundle_dir: Path, bundle: Any, draft_gap: float, seed: int) -> dict[str, Any]:
        """The reference, computed with ``bundle`` (the folder's, loaded): its bundle.json entry."""
        return write_drift_reference(
            bundle_dir, raw_dir=self.raw_dir, split_csv=self.split_csv, split=self.params.split,
            max_images=self.params.max_images, stats_size=self.params.stats_size, max_pixels=self.max_pixels,
            draft_gap=draft_gap, seed=seed, workers=self.workers, bundle=bundle,
        )  # fmt: skip


@dataclass(frozen=True)
class Ensemble:
    """What the ensemble stage wrote: members and weights, the input modes, each split's predictions."""

    weights: dict[str, Any]
    modes: tuple[str, ...]
    frames: dict[tuple[str, str], pd.DataFrame]  # (split, mode) -> predictions
    metrics: dict[str, Any]


def data_version(lock_path: Path, prepared: str) -> str | None:
    """The DVC hash of ``prepared`` recorded in ``dvc.lock`` (None when it is not there)."""
    try:
        lock = yaml.safe_load(Path(lock_path).read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return None
    target = Path(prepared).as_posix().rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(str(out.get("path", ""))).as_posix().rstrip("/") == target:
                return out.get("md5") or out.get("hash")
    return None


def read_ensemble(ensemble_dir: Path, metrics_path: Path, classes: Sequence[str]) -> Ensemble:
    weights_path = Path(ensemble_dir) / "weights.json"
    try:
        weights = json.loads(weights_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{weights_path}: not found; run the ensemble stage first") from None
    modes = tuple(weights.get("modes") or (IMAGE_ONLY,))
    frames = {
        (split, mode): read_predictions(
            Path(ensemble_dir) / f"{split}{mode_suffix(mode, modes)}.csv", classes, producer="ensemble"
        )
        for split in EVAL_SPLITS
        for mode in modes
    }
    try:
        metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{metrics_path}: not found; run the ensemble stage first") from None
    return Ensemble(weights, modes, frames, metrics)


def run(
    params: CalibrateParams,
    *,
    seed: int,
    ensemble_dir: Path,
    ensemble_metrics_path: Path,
    models_dir: Path,
    prepared_dir: Path,
    bundle_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    card_path: Path,
    all_params: dict[str, Any],
    data_md5: str | None,
    served_dir: Path | None = None,
    reference: DriftReference | None = None,
    split_csv: Path | None = None,
    headline_path: Path | None = None,
    raw_md5: str | None = None,
    classes: Sequence[str] = CLASSES,
) -> CalibrateResult:
    """``split_csv``: the validated split, recorded in the bundle as what it has seen (train and
    val lesions: :data:`skinlesion.model.seen.SEEN_FILE`); ``headline_path``: the few metrics runs
    are compared by (:func:`skinlesion.measure.paired.headline`); ``raw_md5``: the DVC md5 of the
    raw data, the version in the bundle's ``training_data`` (what it says it was trained on)."""
    ens = read_ensemble(Path(ensemble_dir), ensemble_metrics_path, classes)
    modes = ens.modes

    from skinlesion.model.tfdata import load_manifest  # no TensorFlow: the manifest is plain JSON

    manifest = load_manifest(prepared_dir)
    if data_md5 is None:
        log.warning(
            "no DVC hash recorded for %s in dvc.lock: the bundle's data version is unknown", prepared_dir
        )
    seen = seen_of_split(split_csv) if split_csv is not None else None

    rng = np.random.default_rng(seed)
    fits = fit_modes(ens.frames, modes, params, rng, classes)
    members = member_files(models_dir, ens.weights["members"], ens.weights["weights"])
    meta = bundle_meta(
        image_size=manifest["image_size"],
        aspect=manifest.get("aspect"),
        points={mode: fits[mode].point().to_json() for mode in modes},
        target_recall=params.target_recall,
        recall_bound=params.recall_bound,
        prepared_dir=prepared_dir,
        data_md5=data_md5,
        all_params=all_params,
        raw_md5=raw_md5,
        classes=classes,
    )
    split_counts = {
        split: {c: int(n) for c, n in manifest["splits"][split].get("class_counts", {}).items()}
        for split in SPLITS
        if split in manifest.get("splits", {})
    }
    with atomic_dir(bundle_dir) as tmp:
        meta["members"] = copy_members(tmp, members)
        write_bundle_json(tmp, meta)
        if seen is not None:
            write_seen(tmp, seen)
        # The reported test numbers: the bundle just written, scoring the test images the way
        # serve.predict does (one scoring path; tests/integration/test_parity.py holds them equal).
        from skinlesion.model.bundle import Bundle, served_predictions
        from skinlesion.model.tfdata import read_split_numpy

        loaded = Bundle.load(tmp)
        arrays = read_split_numpy(prepared_dir, "test")
        if ens.frames["test", modes[0]]["image_id"].tolist() != arrays.image_ids.tolist():
            raise StageError(
                f"{ensemble_dir}: test rows are not in the prepared order; rerun the ensemble stage"
            )
        served = {mode: served_predictions(loaded, arrays, mode) for mode in modes}
        report = report_modes(
            fits, ens.frames, served, params, report_params(all_params, params), rng, classes
        )
        meta["metrics"] = report.metrics
        card = model_card(
            bundle=meta,
            ens_metrics=ens.metrics,
            per_mode=report.per_mode,
            subgroups=report.subgroups,
            split_counts=split_counts,
            training=read_training_data(meta),
            trained_on=trained_on(meta),
        )
        (tmp / "model_card.md").write_text(card, encoding="utf-8")
        if reference is not None:
            # Built with the members just scored (not loaded a second time), then recorded in bundle.json.
            meta[REFERENCE_KEY] = reference.write(tmp, loaded, float(manifest.get("draft_gap", 2.0)), seed)
        write_bundle_json(tmp, meta)
    with atomic_file(card_path, "w", encoding="utf-8") as fh:
        fh.write(card)
    if served_dir is not None:
        with atomic_dir(served_dir) as tmp:
            for mode, df in report.frames.items():
                write_predictions(df, tmp / f"test{mode_suffix(mode, modes)}.csv")

    metrics = report.metrics
    first = modes[0]
    with atomic_dir(plots_dir) as tmp:
        write_reliability(
            tmp, ens.frames["test", first], report.frames[first],
            (metrics["ece_before"], metrics["ece_after"]), params.ece_bins, classes,
        )  # fmt: skip
        report.subgroups.to_csv(tmp / "subgroups.csv", index=False, float_format="%.4f", lineterminator="\n")
    write_json(metrics_path, metrics)
    if headline_path is not None:
        write_json(headline_path, headline(metrics, [mode_suffix(m, modes) for m in modes]))
    return CalibrateResult(fits[first].temperature, fits[first].threshold, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.calibrate",
        description="Temperature scaling and the recall-first malignant threshold, both fitted on "
        "val and reported on test; writes the model bundle and the model card.",
    )
    arg = ap.add_argument
    # fmt: off
    arg("--params", type=Path, default=Path("params.yaml"), help="params file (calibrate, base.seed)")
    arg("--ensemble", type=Path, required=True, help="ensemble predictions folder (val.csv, test.csv, "
        "weights.json)")
    arg("--ensemble-metrics", type=Path, required=True, help="the ensemble stage's metrics JSON")
    arg("--models", type=Path, required=True, help="folder of the member models "
        "(<models>/<name>/model.keras)")
    arg("--prepared", type=Path, required=True, help="prepared data folder (its manifest and DVC hash)")
    arg("--lock", type=Path, default=Path("dvc.lock"), help="dvc.lock to read the data version from")
    arg("--bundle", type=Path, required=True, help="model bundle folder to write")
    arg("--metrics", type=Path, required=True, help="metrics JSON to write")
    arg("--plots", type=Path, required=True, help="plots folder to write")
    arg("--card", type=Path, required=True, help="model card Markdown to write")
    arg("--served", type=Path, help="folder to write the bundle's own test predictions to (test.csv, and "
        "test_image_only.csv with fusion): what serve.predict answers for those images")
    arg("--raw", type=Path, help="raw data folder (images/<image_id>.jpg): with --split, the bundle gets "
        "the drift reference (features and embeddings of drift.reference.split)")
    arg("--split", type=Path, help="validated split CSV (image_id, lesion_id, split): recorded in the bundle "
        "as the lesions it has seen (seen.json) and, with --raw, the drift reference's rows")
    arg("--headline", type=Path, help="metrics JSON to write with only the headline metrics (at most 7 per "
        "input mode), the file runs are compared by (make compare, dvc metrics diff --targets)")
    arg("-v", "--verbose", action="store_true")
    # fmt: on
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        # The whole file: the bundle records every section (serving reads prepare, validate, drift
        # and evaluate from it; the card, ensemble and download), so calibrate depends on them all.
        params = load_params(args.params)
        run(
            params.calibrate,
            seed=params.base.seed,
            ensemble_dir=args.ensemble,
            ensemble_metrics_path=args.ensemble_metrics,
            models_dir=args.models,
            prepared_dir=args.prepared,
            bundle_dir=args.bundle,
            metrics_path=args.metrics,
            plots_dir=args.plots,
            card_path=args.card,
            served_dir=args.served,
            split_csv=args.split,
            headline_path=args.headline,
            all_params=dataclasses.asdict(params),
            data_md5=data_version(args.lock, args.prepared.as_posix()),
            raw_md5=data_version(args.lock, args.raw.as_posix()) if args.raw else None,
            reference=(
                DriftReference(
                    args.raw,
                    args.split,
                    params.drift.reference,
                    params.drift.max_pixels,
                    params.drift.workers,
                )  # fmt: skip
                if args.raw and args.split
                else None
            ),
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
