"""The promotion gate: the bar a candidate bundle is judged by, and the decision.

A candidate bundle (``models/ensemble``) replaces production (``models/production``) only if

* its ``test_malignant_recall`` reaches ``calibrate.target_recall`` in every input mode it has
  (a bundle fusing metadata has two: ``test_malignant_recall``, each test image with its own
  metadata, and ``test_malignant_recall_image_only``, every image without; a bundle without
  fusion has the first only), and
* the candidate's macro AUC is not worse than production's by more than ``promote.max_auc_drop``
  on the same images: both bundles' answers for the candidate's test split, less every image
  whose lesion or image production trained, tuned or calibrated on (``seen.json``), compared
  lesion by lesion (:mod:`flows.gate_paired`); the lower bound of the paired 95% CI of the
  difference (candidate - production) must be at least ``-promote.max_auc_drop`` in every kind of
  request (a negative tolerance demands an improvement). With no production model yet the AUCs
  are not compared. A production bundle the comparison cannot use (no ``seen.json``: older than
  it; unloadable; nothing left to pair) falls back to the unpaired check, each bundle's stored
  ``malignant_auc`` and ``macro_auc``, mode by mode, and the decision says so.

The gate judges with the committed thresholds (``promote.*`` and ``calibrate.target_recall`` in
params.yaml at git HEAD, :func:`committed_params`), never with a run's ``params_overrides``: the
run under judgement must not set its own bar. Only the operator's ``gate_overrides`` change a
threshold, for one run (:func:`resolve_gate`). The paired bootstrap's seed and replicates are the
committed ``base.seed`` and ``evaluate.bootstrap_samples`` too. The decision also says whether the
candidate learned from production's data version or a newer one (:func:`compare_data`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from flows.dvcops import Layout, apply_overrides, committed_text, set_params
from flows.gate_paired import PAIRED_GATE_KEY, PairedGate, PairedMode
from flows.promote import head_commit
from flows.report import mode_label
from flows.runlog import run_logger
from skinlesion.core.errors import ParamsError
from skinlesion.measure.scoring import IMAGE_ONLY, IMAGE_ONLY_SUFFIX, METADATA, MODES, mode_suffix
from skinlesion.params.load import Params, load_params, parse_params

__all__ = [
    "GATE_AUC_KEYS",
    "GATE_INPUTS",
    "GATE_KEYS",
    "Decision",
    "Gate",
    "GateCheck",
    "GateError",
    "Verdict",
    "committed_params",
    "compare_data",
    "data_versions",
    "decide",
    "gate_metrics",
    "gate_modes",
    "judge",
    "log_gate",
    "pin_committed_gate",
    "recall_bar",
    "resolve_gate",
]

# What an operator may change for one run (gate_overrides). calibrate.target_recall is also a
# gate input (the recall bar while promote.min_test_recall is null), but it is the calibrate
# stage's knob: overriding it retunes the candidate's threshold, so it is not a gate override.
GATE_KEYS = ("promote.max_auc_drop", "promote.min_test_recall")
GATE_INPUTS = (*GATE_KEYS, "calibrate.target_recall")
# Read from the committed params too: the paired bootstrap's seed and replicates.
PAIRED_INPUTS = ("base.seed", "evaluate.bootstrap_samples")

RECALL_KEY = "test_malignant_recall"
GATE_AUC_KEYS = ("malignant_auc", "macro_auc")
# Float noise must not flip a decision taken on metrics rounded nowhere.
_EPS = 1e-9


class GateError(RuntimeError):
    """The gate cannot be set: a bad ``gate_overrides`` key or value, unusable committed params."""


@dataclass(frozen=True)
class Gate:
    """The thresholds the gate judges this run's candidate with, and where they came from."""

    target_recall: float
    max_auc_drop: float
    source: str  # where the committed values were read
    committed: dict[str, Any]  # GATE_INPUTS as committed (defaults filled in)
    # The paired comparison's lesion bootstrap: the committed base.seed, evaluate.bootstrap_samples
    # (fewer replicates give a narrower 2.5% quantile: a run must not choose them for itself).
    seed: int
    bootstrap_samples: int
    overrides: dict[str, Any] = field(default_factory=dict)  # the operator's gate_overrides
    ignored: dict[str, Any] = field(default_factory=dict)  # params_overrides of GATE_INPUTS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def overrides_text(self) -> str:
        """The operator's gate_overrides in one line: ``promote.max_auc_drop=0.5, ...``."""
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items())


@dataclass(frozen=True)
class GateCheck:
    """One row of the gate's table: a recall or AUC check on the candidate."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concludes, and every check it made."""

    promote: bool
    reason: str
    checks: tuple[GateCheck, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


# --------------------------------------------------------------------------- the thresholds


def _gate_values(p: Params) -> dict[str, Any]:
    return {
        "promote.max_auc_drop": p.promote.max_auc_drop,
        "promote.min_test_recall": p.promote.min_test_recall,
        "calibrate.target_recall": p.calibrate.target_recall,
    }


def recall_bar(values: Mapping[str, Any]) -> float:
    """The recall bar of gate inputs (:data:`GATE_INPUTS`): ``promote.min_test_recall``, or while
    it is null ``calibrate.target_recall``."""
    floor = values["promote.min_test_recall"]
    return values["calibrate.target_recall"] if floor is None else floor


def _gate_params(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Params:
    """The gate inputs of a parsed params.yaml (the rest left at its defaults), validated."""
    sections: dict[str, Any] = {"promote": {}, "calibrate": {}}
    for key in (*GATE_INPUTS, *PAIRED_INPUTS):
        section, name = key.split(".")
        sections.setdefault(section, {})
        node = raw.get(section) if isinstance(raw, Mapping) else None
        if isinstance(node, Mapping) and name in node:
            sections[section][name] = node[name]
    return parse_params(apply_overrides(sections, overrides or {}))


def resolve_gate(
    committed_raw: Mapping[str, Any],
    source: str,
    gate_overrides: Mapping[str, Any] | None = None,
    params_overrides: Mapping[str, Any] | None = None,
) -> Gate:
    """The gate for one run: the committed thresholds, changed only by ``gate_overrides``.

    ``params_overrides`` configure the candidate (an overridden ``calibrate.target_recall`` does
    retune its threshold) but never the bar it is judged against: they are only noted.
    """
    overrides = dict(gate_overrides or {})
    bad = [k for k in overrides if k not in GATE_KEYS]
    if bad:
        raise GateError(f"gate_overrides: {bad[0]!r} is not a gate threshold; use {' or '.join(GATE_KEYS)}")
    try:
        parsed = _gate_params(committed_raw)
    except ParamsError as e:
        raise GateError(f"{source}: {e}") from None
    committed = _gate_values(parsed)
    try:
        used = _gate_values(_gate_params(committed_raw, overrides))
    except ParamsError as e:
        raise GateError(f"gate_overrides: {e}") from None
    # calibrate.target_recall is a gate input only while the committed min_test_recall is null.
    inputs = GATE_INPUTS if committed["promote.min_test_recall"] is None else GATE_KEYS
    ignored = {k: v for k, v in (params_overrides or {}).items() if k in inputs and v != committed[k]}
    return Gate(
        target_recall=recall_bar(used),
        max_auc_drop=used["promote.max_auc_drop"],
        source=source,
        committed=committed,
        overrides=overrides,
        ignored=ignored,
        seed=parsed.base.seed,
        bootstrap_samples=parsed.evaluate.bootstrap_samples,
    )


def committed_params(layout: Layout, git: bool) -> tuple[dict[str, Any], str]:
    """The params the gate's thresholds come from, and a label saying which they are.

    params.yaml at git HEAD, not the file as it was before this run's overrides: overrides are
    kept in params.yaml (as ``dvc exp run -S`` keeps them), so that file also holds every earlier
    run's, and one run's ``promote.max_auc_drop=1`` would loosen the gate of all later runs. HEAD
    moves only by a commit: a reviewed change, or a promotion, which pins the committed gate
    (:func:`pin_committed_gate`). Outside git, or before params.yaml is committed, there is no
    such record: the file before this run's overrides is the fallback, and the log says so.
    Call it before the overrides are applied.
    """
    logger = run_logger(__name__)
    working = yaml.safe_load(layout.path(layout.params).read_text(encoding="utf-8")) or {}
    text = committed_text(layout.root, layout.params) if git else None
    if text is None:
        logger.warning(
            "the gate's thresholds come from %s as it was before this run's overrides (not "
            "committed in git): overrides kept there by earlier runs count; commit it",
            layout.params,
        )
        return working, f"`{layout.params}` before this run's overrides (not in git)"
    committed = yaml.safe_load(text) or {}
    with contextlib.suppress(ParamsError):
        ours, theirs = _gate_values(_gate_params(working)), _gate_values(_gate_params(committed))
        uncommitted = {k: v for k, v in ours.items() if v != theirs[k]}
        if uncommitted:
            logger.warning(
                "%s holds uncommitted gate inputs %s (committed: %s): the gate uses the committed "
                "ones; commit them, or pass gate_overrides",
                layout.params,
                uncommitted,
                {k: theirs[k] for k in uncommitted},
            )
    rev = head_commit(layout.root) or "HEAD"
    return committed, f"`{layout.params}` at git HEAD ({rev[:12]})"


def pin_committed_gate(layout: Layout, gate: Gate) -> dict[str, Any]:
    """Before the promotion commits params.yaml: set promote.* so that, committed, it sets the
    gate this run was judged by without its gate_overrides (those hold for one run). Otherwise
    this run's kept params_overrides would become the next run's committed thresholds. A
    ``calibrate.target_recall`` override stays (dvc.lock records it): the committed recall bar
    then moves to promote.min_test_recall. Returns what it wrote."""
    current = _gate_values(load_params(layout.path(layout.params)))
    want = gate.committed
    pins: dict[str, Any] = {}
    if current["promote.max_auc_drop"] != want["promote.max_auc_drop"]:
        pins["promote.max_auc_drop"] = want["promote.max_auc_drop"]
    floor = want["promote.min_test_recall"]
    if floor is None and current["calibrate.target_recall"] != want["calibrate.target_recall"]:
        floor = want["calibrate.target_recall"]  # null would now mean this run's target
    if current["promote.min_test_recall"] != floor:
        pins["promote.min_test_recall"] = floor
    if pins:
        set_params(layout.path(layout.params), pins)
        run_logger(__name__).warning("params.yaml: gate thresholds pinned to the committed ones: %s", pins)
    return pins


def log_gate(gate: Gate) -> None:
    """Say in the run log which bar this run's candidate will be judged by, and any override."""
    logger = run_logger(__name__)
    if gate.overrides:
        logger.warning(
            "GATE OVERRIDDEN by the operator for this run: %s (committed: %s); recorded in the "
            "summary artifact and, if promoted, the production record",
            gate.overrides,
            {k: gate.committed[k] for k in gate.overrides},
        )
    if gate.ignored:
        logger.warning(
            "params_overrides %s configure the candidate only: the gate judges it with the "
            "committed %s (a threshold changes only through gate_overrides)",
            gate.ignored,
            {k: gate.committed[k] for k in gate.ignored},
        )
    logger.info(
        "gate: test malignant recall >= %.3f in every input mode, AUC drop <= %.3f (paired with "
        "production: lower bound of the 95%% CI of the macro AUC difference, %d replicates, seed %d) (%s)",
        gate.target_recall,
        gate.max_auc_drop,
        gate.bootstrap_samples,
        gate.seed,
        gate.source,
    )


# --------------------------------------------------------------------------- the decision


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def gate_modes(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The input modes a flat gate dict has numbers for: both when it holds any image-only key
    (a bundle fusing metadata), else the one mode of a bundle without fusion."""
    if any(k + IMAGE_ONLY_SUFFIX in metrics for k in (RECALL_KEY, *GATE_AUC_KEYS)):
        return MODES
    return (IMAGE_ONLY,)


def _recall_check(candidate: Mapping[str, Any], key: str, name: str, target_recall: float) -> GateCheck:
    recall = _num(candidate.get(key))
    if recall is None:
        return GateCheck(key, False, f"{name} missing or not a number in the candidate")
    ok = recall >= target_recall - _EPS
    op = ">=" if ok else "<"
    return GateCheck(key, ok, f"{name} {recall:.3f} {op} target {target_recall:.3f}")


def _auc_check(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    key: str,
    name: str,
    max_auc_drop: float,
    *,
    prod_key: str | None,
) -> GateCheck:
    """``prod_key``: production's number to compare with; None when production has none for
    this mode (the candidate's number is shown, not compared)."""
    cand = _num(candidate.get(key))
    if cand is None:
        return GateCheck(key, False, f"{name} missing or not a number in the candidate")
    if production is None:
        return GateCheck(key, True, f"{name} {cand:.3f} (no production model yet)")
    if prod_key is None:
        return GateCheck(key, True, f"{name} {cand:.3f} (not compared: production has no image-only numbers)")
    prod = _num(production.get(prod_key))
    if prod is None:
        return GateCheck(key, True, f"{name} {cand:.3f} (production has no {prod_key} to compare)")
    delta = cand - prod
    ok = delta >= -max_auc_drop - _EPS
    rule = f"drop allowed {max_auc_drop:.3f}" if max_auc_drop >= 0 else f"gain required {-max_auc_drop:.3f}"
    verdict = "ok" if ok else "too low"
    return GateCheck(key, ok, f"{name} {cand:.3f} vs production {prod:.3f} ({delta:+.3f}; {rule}): {verdict}")


def _paired_check(pm: PairedMode, modes: Sequence[str], max_auc_drop: float, paired: PairedGate) -> GateCheck:
    """The macro AUC of one kind of request: the CI's lower bound against the tolerance."""
    key = PAIRED_GATE_KEY + mode_suffix(pm.mode, modes)
    name = f"{key} ({mode_label(pm.mode)})" if len(modes) > 1 else key
    d = pm.diffs[PAIRED_GATE_KEY]
    ok = d.lo >= -max_auc_drop - _EPS
    op = ">=" if ok else "<"
    rule = f"drop allowed {max_auc_drop:.3f}" if max_auc_drop >= 0 else f"gain required {-max_auc_drop:.3f}"
    return GateCheck(
        key,
        ok,
        f"{name} {d.b:.3f} vs production {d.a:.3f} on the same {pm.n_images} test images "
        f"({paired.n_left_out} left out: seen by production): {d.diff:+.3f}, "
        f"{round(100 * paired.level)}% CI [{d.lo:+.3f}, {d.hi:+.3f}] ({rule}: CI lower bound {d.lo:+.3f} "
        f"{op} {-max_auc_drop:+.3f}): {'ok' if ok else 'too low'}",
    )


def decide(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    *,
    target_recall: float,
    max_auc_drop: float,
    paired: PairedGate | None = None,
) -> Decision:
    """The gate, on flat metric dicts (``test_malignant_recall``, ``malignant_auc``, ``macro_auc``,
    and for a bundle fusing metadata the same keys again with ``_image_only``: :func:`gate_metrics`).

    The recall must reach the target in every mode the candidate has: a fusion bundle that finds
    melanomas only when it is given age, sex and site would miss them in every request without.
    ``production`` is None when no model has been promoted yet.

    ``paired`` (:func:`paired_production`): both bundles on the same images; the macro AUC of
    each kind of request passes when the lower bound of the paired CI of candidate - production
    is at least ``-max_auc_drop``. Without it (None, or ``unavailable``, said in the reason) the
    stored AUCs are compared mode with mode where production has the mode's numbers too; what is
    not compared (production is older than input modes, or the candidate has one mode and
    production two) is said in the reason.
    """
    modes = gate_modes(candidate)
    fusion = len(modes) > 1
    checks: list[GateCheck] = []
    for mode in modes:
        key = RECALL_KEY + mode_suffix(mode, modes)
        name = f"{key} ({mode_label(mode)})" if fusion else key
        checks.append(_recall_check(candidate, key, name, target_recall))
    n_recall = len(checks)
    notes: list[str] = []
    if production is not None and paired is not None and paired.unavailable is None:
        kinds = [pm.mode for pm in paired.modes]
        checks += [_paired_check(pm, kinds, max_auc_drop, paired) for pm in paired.modes]
        notes += paired.notes
    else:
        checks += _unpaired_checks(candidate, production, modes, max_auc_drop, notes)
        if production is not None and paired is not None:
            notes.append(
                f"not compared on the same images: {paired.unavailable}; the AUC checks compare each "
                "bundle's stored test metrics"
            )

    failed = [c.detail for c in checks if not c.passed]
    if failed:
        return Decision(False, "; ".join(failed + notes), tuple(checks))
    if production is None:
        recalls = "; ".join(c.detail for c in checks[:n_recall])
        return Decision(True, f"no production model yet; {recalls}", tuple(checks))
    return Decision(True, "; ".join([c.detail for c in checks] + notes), tuple(checks))


def _unpaired_checks(
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
    modes: Sequence[str],
    max_auc_drop: float,
    notes: list[str],
) -> list[GateCheck]:
    """Each bundle's stored AUCs, mode by mode where production has the mode's numbers (what is
    not compared is added to ``notes``)."""
    fusion = len(modes) > 1
    prod_fusion = production is not None and len(gate_modes(production)) > 1
    checks: list[GateCheck] = []
    for mode in modes:
        sfx = mode_suffix(mode, modes)
        for base in GATE_AUC_KEYS:
            key = base + sfx
            name = f"{key} ({mode_label(mode)})" if fusion else key
            # production's number for this mode: its own key when it has the mode; a one-mode
            # production has no image-only numbers to set beside a fusion candidate's
            prod_key = key if (not sfx or prod_fusion) else None
            checks.append(_auc_check(candidate, production, key, name, max_auc_drop, prod_key=prod_key))
    if production is not None and fusion and not prod_fusion:
        notes.append(
            "production has no image-only metrics (a one-mode bundle): only the AUCs "
            f"{mode_label(METADATA)} are compared, the image-only ones are not"
        )
    if production is not None and not fusion and prod_fusion:
        notes.append(
            "the candidate has one input mode, production two: its AUCs are compared with "
            f"production's {mode_label(METADATA)}, production's image-only ones are not"
        )
    return checks


def gate_metrics(snapshot: Mapping[str, Mapping[str, Any]], layout: Layout) -> dict[str, Any]:
    """The gate's flat inputs from a metrics snapshot ({file: {key: value}}): the recall and the
    AUCs of the bundle as served (the calibration metrics: the calibrate stage scores the test
    images with the bundle itself); the AUCs from the ensemble's metrics only for a snapshot
    whose calibration metrics have none (made before they were reported there). Each
    ``_image_only`` key too where the file has it (a bundle fusing metadata), so :func:`decide`
    judges every mode."""
    calibration = snapshot.get(layout.calibration_metrics) or {}
    ensemble = snapshot.get(layout.ensemble_metrics) or {}
    aucs = calibration if all(k in calibration for k in GATE_AUC_KEYS) else ensemble
    out = {RECALL_KEY: calibration.get(RECALL_KEY), **{k: aucs.get(k) for k in GATE_AUC_KEYS}}
    for source, keys in ((calibration, (RECALL_KEY,)), (aucs, GATE_AUC_KEYS)):
        out.update({k + IMAGE_ONLY_SUFFIX: source[k + IMAGE_ONLY_SUFFIX] for k in keys
                    if k + IMAGE_ONLY_SUFFIX in source})  # fmt: skip
    return out


# --------------------------------------------------------------------------- data versions


def data_versions(lock: Mapping[str, str], layout: Layout) -> dict[str, str]:
    """The md5s dvc.lock holds for the data a model learns and is tested from."""
    return {p: lock[p] for p in layout.data_outputs if p in lock}


def compare_data(
    candidate: Mapping[str, str],
    production: Mapping[str, Any] | None,
    layout: Layout,
    *,
    paired: bool = False,
) -> dict[str, Any]:
    """Whether the candidate learned from production's data version (``same``) or another one
    (``newer``: production's record is older than this run, so unless someone rolled the data
    back, the current dvc.lock holds newer data); ``unknown`` when a record lacks versions.
    ``paired``: the gate scored both bundles on the same images (the note then says so)."""
    out: dict[str, Any] = {"candidate": dict(candidate), "production": {}, "changed": [], "note": ""}
    if production is None:
        return {**out, "status": "no production"}
    prod = production.get("data_versions") or data_versions(production.get("dvc_lock") or {}, layout)
    if not prod and production.get("data_version"):  # a record older than data_versions
        prod = {layout.raw: production["data_version"]}
    out["production"] = dict(prod)
    compared = [p for p in layout.data_outputs if p in prod and p in candidate]
    if not compared:
        note = "no data version to compare: whether both were tested on the same images is unknown"
        return {**out, "status": "unknown", "note": note}
    changed = [p for p in compared if prod[p] != candidate[p]]
    if not changed:
        note = "same data version as production: the metrics compare the same test set"
        if len(compared) < len(layout.data_outputs):
            note += f" (as far as {', '.join(compared)} show)"
        return {**out, "status": "same", "note": note}
    if paired:
        note = (
            f"trained on newer data than production ({', '.join(changed)} changed): the AUC checks "
            "compare the two on the candidate's test images production has not seen (see the "
            "paired comparison)"
        )
    else:
        note = (
            f"trained on newer data than production ({', '.join(changed)} changed): the test sets "
            "may differ, so the AUC checks compare production's numbers on its own test set with the "
            "candidate's on this one, not the two models on the same images"
        )
    return {**out, "status": "newer", "changed": changed, "note": note}


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """The gate on one candidate: the decision, its ``reason`` (with the operator's gate_overrides
    named), and ``summary``, what the run's summary and the production record show under
    ``gate``: the checks, the thresholds, the data versions and the paired comparison."""

    promote: bool
    reason: str
    summary: dict[str, Any]
    data: dict[str, Any]  # compare_data's answer: ``candidate`` holds the candidate's versions


def judge(
    metrics: Mapping[str, Mapping[str, Any]],
    production: Mapping[str, Any] | None,
    gate: Gate,
    paired: PairedGate | None,
    lock: Mapping[str, str],
    layout: Layout,
) -> Verdict:
    """Decide on the candidate whose metrics snapshot is ``metrics`` against the production
    record ``production`` (None before the first promotion) with ``gate``'s thresholds;
    ``paired``: the comparison on the same images (:func:`flows.gate_paired.paired_production`),
    ``lock``: dvc.lock's output md5s (:func:`flows.dvcops.lock_hashes`)."""
    decision = decide(
        gate_metrics(metrics, layout),
        gate_metrics(production.get("metrics") or {}, layout) if production else None,
        target_recall=gate.target_recall,
        max_auc_drop=gate.max_auc_drop,
        paired=paired,
    )
    is_paired = paired is not None and paired.unavailable is None
    data = compare_data(data_versions(lock, layout), production, layout, paired=is_paired)
    summary = {**decision.as_dict(), "thresholds": gate.as_dict(), "data": data}
    if paired is not None:
        summary["paired"] = paired.as_dict()
    reason = decision.reason
    if gate.overrides:
        reason += " (gate overridden: " + gate.overrides_text() + ")"
    return Verdict(decision.promote, reason, summary, data)
