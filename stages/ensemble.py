"""Ensemble stage: a weighted average of the members' probabilities.

Reads ``<predictions>/<member>/{val,test}.csv`` (written by evaluate@<member>) for every member in
``ensemble.members``. The weights are equal, or fitted on the validation split only (the simplex
weights minimising validation log-loss; never worse there than equal weights). Writes

* ``<out>/{val,test}.csv`` - the ensemble's predictions in the members' format (so calibrate and
  any report read one format); with fusion members also ``{val,test}_image_only.csv`` (members
  scored image-only; one set of weights, fitted on the validation rows of both modes), and
  ``<out>/weights.json`` (members, weights and modes);
* ``<metrics>`` - the same keys as a member's metrics, plus ``weight_<member>``, the best single
  member on test (``best_member``, ``best_member_macro_auc``) and ``ensemble_minus_best_macro_auc``,
  so a run always shows whether the ensemble beats its best member;
* ``<plots>/`` - confusion, ROC/PR per class and the subgroup table, as for a member.

Why ``<out>`` is not inside the members' predictions folder: the stage depends on that whole
folder (DVC cannot list a dependency per member from params), and an output inside one's own
dependency is refused by DVC.
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
from skinlesion.measure.metrics import classification_metrics, fit_simplex_weights, log_loss, paired_mean_ci
from skinlesion.measure.predictions import (
    json_value,
    labels,
    predictions_frame,
    probabilities,
    read_predictions,
    report,
    write_plots,
    write_predictions,
)
from skinlesion.measure.scoring import IMAGE_ONLY, MODES, mix, mode_suffix
from skinlesion.params.base import BaseParams
from skinlesion.params.ensemble import EnsembleParams, check_members_trained
from skinlesion.params.evaluate import EvaluateParams
from skinlesion.params.schema import load_sections
from skinlesion.params.train import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleResult:
    members: tuple[str, ...]
    weights: tuple[float, ...]
    metrics: dict[str, Any]


def align_members(frames: dict[str, pd.DataFrame], split: str) -> pd.DataFrame:
    """Reorder every member's rows like the first member's; all must hold the same images
    with the same true labels (they come from one prepared split)."""
    names = list(frames)
    ref = frames[names[0]]
    ref_ids = ref["image_id"]
    for name in names[1:]:
        df = frames[name]
        missing = sorted(set(ref_ids) - set(df["image_id"]))
        extra = sorted(set(df["image_id"]) - set(ref_ids))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has extra {extra[0]}"
            raise StageError(
                f"{split}: member {name!r} {what} compared with {names[0]!r}; "
                "evaluate every member on the same prepared data"
            )
        df = df.set_index("image_id").loc[ref_ids].reset_index()
        if not np.array_equal(df["dx"].to_numpy(), ref["dx"].to_numpy()):
            i = int(np.flatnonzero(df["dx"].to_numpy() != ref["dx"].to_numpy())[0])
            raise StageError(
                f"{split}: members {names[0]!r} and {name!r} disagree on the true dx of {ref_ids.iloc[i]}"
            )
        frames[name] = df
    return ref


def ensemble_modes(predictions_dir: Path, members: Sequence[str]) -> tuple[str, ...]:
    """Both modes when a member was evaluated image-only beside its metadata mode, else image-only."""
    fusion = any(
        (predictions_dir / m / f"val{mode_suffix(IMAGE_ONLY, MODES)}.csv").is_file() for m in members
    )
    return MODES if fusion else (IMAGE_ONLY,)


def member_predictions(member_dir: Path, split: str, mode: str, modes: Sequence[str]) -> Path:
    """A member's predictions file for a mode; a member without fusion has one file for both."""
    own = member_dir / f"{split}{mode_suffix(mode, modes)}.csv"
    return own if own.is_file() else member_dir / f"{split}.csv"


@dataclass(frozen=True)
class WeightChoice:
    weights: np.ndarray
    method: str  # what was done: "equal" | "fitted" | "equal (val cannot tell the members apart)"
    detail: str  # the evidence, for the log and the metrics


def choose_weights(
    kind: str,
    val_member_probs: np.ndarray,
    y_val: np.ndarray,
    groups: Sequence | None = None,
    *,
    names: Sequence[str] | None = None,
    n_samples: int = 1000,
    level: float = 0.95,
    rng: np.random.Generator | None = None,
) -> WeightChoice:
    """Equal weights, or simplex weights fitted on validation data (the only data it sees).

    A fit on a small val set can put almost all the weight on one member by chance when the
    members are equally good (the demo gave 0.98 / 0.02 on one seed and 0.11 / 0.89 on another).
    So ``fitted`` first asks whether val can tell the members apart: the member with the lowest
    val log-loss against each other one, the paired lesion-bootstrap CI of their per-image
    log-loss difference. When every such CI includes 0, the weights are equal (and say so)."""
    m = val_member_probs.shape[0]
    equal = np.full(m, 1.0 / m)
    if kind == "equal" or m == 1:
        return WeightChoice(
            equal, "equal", "equal weights (ensemble.weights: equal)" if m > 1 else "one member"
        )
    y = np.asarray(y_val, dtype=np.int64)
    p_true = np.clip(val_member_probs[:, np.arange(len(y)), y], 1e-12, 1.0)
    loss = -np.log(p_true)  # (members, images)
    best = int(np.argmin(loss.mean(axis=1)))
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    rng = rng if rng is not None else np.random.default_rng(0)
    names = list(names) if names is not None else [f"member {i}" for i in range(m)]
    apart = []
    notes = []
    for j in range(m):
        if j == best:
            continue
        mean, lo, hi = paired_mean_ci(loss[j] - loss[best], groups, n_samples, rng, level=level)
        # worse than the best beyond chance: the CI of (its loss - best's loss) lies above 0
        apart.append(bool(lo > 0))
        notes.append(
            f"val log-loss {names[j]} - {names[best]} {mean:+.4f}, {level:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
        )
    evidence = "; ".join(notes)
    if not any(apart):
        return WeightChoice(equal, "equal (val cannot tell the members apart)", evidence)
    return WeightChoice(fit_simplex_weights(val_member_probs, y), "fitted", evidence)


def run(
    params: EnsembleParams,
    eval_params: EvaluateParams,
    *,
    seed: int,
    predictions_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    classes: Sequence[str] = CLASSES,
) -> EnsembleResult:
    members = tuple(params.members)
    modes = ensemble_modes(Path(predictions_dir), members)
    frames: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
    for mode in modes:
        for split in EVAL_SPLITS:
            frames[split, mode] = {
                m: read_predictions(
                    member_predictions(Path(predictions_dir) / m, split, mode, modes), classes
                )
                for m in members
            }
    meta = {key: align_members(frames[key], f"{key[0]} ({key[1]})") for key in frames}
    stacked = {key: np.stack([probabilities(frames[key][m], classes) for m in members]) for key in frames}
    # One set of weights for every mode, fitted on the validation rows of all of them: the
    # bundle mixes its members the same way whatever the input.
    val_probs = np.concatenate([stacked["val", mode] for mode in modes], axis=1)
    y_val_all = np.concatenate([labels(meta["val", mode], classes) for mode in modes])
    val_groups = np.concatenate([meta["val", mode]["lesion_id"].to_numpy() for mode in modes])
    choice = choose_weights(
        params.weights, val_probs, y_val_all, val_groups, names=members,
        n_samples=eval_params.bootstrap_samples, level=eval_params.ci_level,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    weights = choice.weights
    log.info(
        "weights (%s on val %s: %s): %s", choice.method, " + ".join(modes), choice.detail,
        dict(zip(members, np.round(weights, 4).tolist(), strict=True)),
    )  # fmt: skip

    ens = {key: predictions_frame(meta[key], mix(stacked[key], weights), classes) for key in frames}
    rng = np.random.default_rng(seed)
    metrics: dict[str, Any] = {}
    table = None
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        m, t = report(
            ens["test", mode],
            ens["val", mode],
            eval_params,
            rng,
            classes=classes,
            desc=f"ensemble {mode} bootstrap",
        )
        table = t if table is None else table
        # The check the ensemble exists for: is it better than simply using its best member?
        y_test = labels(meta["test", mode], classes)
        member_auc = {
            name: classification_metrics(y_test, stacked["test", mode][i], classes)["macro_auc"]
            for i, name in enumerate(members)
        }
        best = max(members, key=lambda k: -np.inf if np.isnan(member_auc[k]) else member_auc[k])
        extra: dict[str, Any] = {f"member_macro_auc_{k}": member_auc[k] for k in members}
        extra["best_member"] = best
        extra["best_member_macro_auc"] = member_auc[best]
        extra["ensemble_minus_best_macro_auc"] = (
            m["macro_auc"] - member_auc[best] if m["macro_auc"] is not None else float("nan")
        )
        y_val = labels(meta["val", mode], classes)
        extra["val_log_loss_equal_weights"] = log_loss(
            y_val, mix(stacked["val", mode], np.full(len(members), 1 / len(members)))
        )
        m.update({k: json_value(v) for k, v in extra.items()})
        metrics.update({f"{k}{sfx}": v for k, v in m.items()})
    metrics.update({f"weight_{k}": json_value(float(w)) for k, w in zip(members, weights, strict=True)})
    metrics["weights_method"] = choice.method
    metrics["weights_evidence"] = choice.detail
    first = modes[0]
    best = metrics["best_member"]

    with atomic_dir(out_dir) as tmp:
        for split, mode in ens:
            write_predictions(ens[split, mode], tmp / f"{split}{mode_suffix(mode, modes)}.csv")
        write_json(
            tmp / "weights.json",
            {"members": list(members), "weights": [float(w) for w in weights], "method": params.weights,
             "method_used": choice.method, "evidence": choice.detail, "modes": list(modes)},
        )  # fmt: skip
    with atomic_dir(plots_dir) as tmp:
        write_plots(tmp, ens["test", first], table, title="ensemble")
    write_json(metrics_path, metrics)
    log.info(
        "ensemble test macro AUC %s vs best member %s (%s): %+.4f",
        metrics["macro_auc"],
        best,
        metrics["best_member_macro_auc"],
        metrics["ensemble_minus_best_macro_auc"] or 0.0,
    )
    return EnsembleResult(members, tuple(float(w) for w in weights), metrics)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stages.ensemble",
        description="Average the members' probabilities (weights equal or fitted on val only) and "
        "report the ensemble against its best member.",
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (ensemble, evaluate)"
    )
    ap.add_argument(
        "--predictions", type=Path, required=True, help="members' predictions folder (data/predictions)"
    )
    ap.add_argument("--out", type=Path, required=True, help="ensemble predictions folder to write")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--plots", type=Path, required=True, help="plots folder to write")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        params = load_sections(
            args.params, base=BaseParams, ensemble=EnsembleParams, evaluate=EvaluateParams, train=TrainParams
        )
        check_members_trained(params.ensemble, params.train.backbones)
        run(
            params.ensemble,
            params.evaluate,
            seed=params.base.seed,
            predictions_dir=args.predictions,
            out_dir=args.out,
            metrics_path=args.metrics,
            plots_dir=args.plots,
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
