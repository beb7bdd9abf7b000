"""The ``retrain`` flow: reproduce the DVC pipeline, report, and promote the candidate if it is
at least as good as production.

Each stage is one task running ``dvc repro --single-item STAGE`` in DAG order (the stage list
and the DAG come from ``dvc stage list`` / ``dvc dag``, after the params overrides are applied,
so foreach items such as ``train@mobilenetv2`` follow ``train.backbones``). DVC stays the record:
a Prefect run and a plain ``dvc repro`` leave the same dvc.lock and cache. Stage output lines go
to the task's run logger, so the Prefect UI shows them. Tasks are retried with backoff only on
transient failures (another DVC process holding the lock, network errors), never on a failed
validation or a crashed stage. Stages that do not depend on each other (``train@a``,
``train@b``) run concurrently when more than one GPU is visible, one GPU each.

Every run publishes a markdown summary (artifact ``retrain-summary``) and the metrics diff
against production (table ``retrain-metrics-diff``); for a bundle fusing metadata both show each
metric "with metadata" and "image only". The gate and the promotion live in :mod:`flows.promote`
(a fusion candidate must reach the recall target in both input modes). Before the gate, the
production bundle is scored on the candidate's test images it has not seen (task
``score-production``): the AUC check is a paired comparison on the same images, and the summary
and ``production.json`` show it (images paired, images left out, both bundles' numbers, the
difference and its CI).

The gate judges with the committed thresholds (``promote.*`` and ``calibrate.target_recall`` in
params.yaml at git HEAD), never with this run's ``params_overrides``: the run under judgement
must not set its own bar. Only the operator's ``gate_overrides`` parameter changes a threshold,
for that run, loudly (run log, summary artifact, production record). The paired bootstrap's seed
and replicates are the committed ``base.seed`` and ``evaluate.bootstrap_samples`` too. The
summary also says whether the candidate learned from production's data version or a newer one.

Run it once, locally, with no server (ephemeral API)::

    python -m flows.retrain --help

Deployed (``prefect.yaml``): ``prefect deployment run 'retrain/on-demand'``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from flows.dvcops import (
    DvcError,
    Layout,
    PushFailed,
    StageFailed,
    apply_overrides,
    committed_text,
    diff_metrics,
    dvc_argv,
    has_remote,
    load_pipeline,
    lock_hashes,
    metrics_diff_rev,
    metrics_show,
    push_to_remote,
    run_quiet,
    run_stage,
    set_params,
)
from flows.promote import (
    PAIRED_GATE_KEY,
    PairedGate,
    commit_and_tag,
    decide,
    dirty_code,
    dvc_track,
    free_tag,
    gate_metrics,
    head_commit,
    in_git,
    paired_production,
    promote_bundle,
    read_production,
    tag_exists,
    utc_tag,
)
from flows.report import RunReport, _table, diff_table, fmt, mode_label, render_summary
from skinlesion.core.errors import ParamsError
from skinlesion.measure.paired import PAIRED_KEYS
from skinlesion.model.bundle import SEEN_FILE
from skinlesion.params.load import Params, load_params, parse_params

__all__ = [
    "Gate",
    "compare_data",
    "data_versions",
    "resolve_gate",
    "retrain",
    "retry_if_transient",
    "gpu_devices",
    "main",
    "merge_extra_sources",
    "parse_extra_sources",
]

SUMMARY_KEY = "retrain-summary"
DIFF_KEY = "retrain-metrics-diff"


class RetrainFailed(RuntimeError):
    """The run stopped; the summary artifact says where and why."""


def retry_if_transient(task, task_run, state) -> bool:  # noqa: ARG001 (Prefect's signature)
    """Prefect's ``retry_condition_fn``: retry only what a retry can fix (see ``is_transient``)."""
    try:
        state.result()
    except DvcError as e:
        return e.transient
    except Exception:
        return False
    return False


# Lock contention clears in seconds, a flaky network in tens of seconds: 3 s, 6 s, 12 s (+jitter).
_RETRY: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=3),
    "retry_jitter_factor": 0.3,
    "retry_condition_fn": retry_if_transient,
    # DVC is the cache: Prefect must never skip a task because it saw the same inputs before.
    "cache_policy": NONE,
}


def gpu_devices(env: dict[str, str] | None = None) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what ``nvidia-smi -L``
    lists; [] on a CPU machine. (TensorFlow is not imported for this: it takes seconds.)"""
    env = dict(os.environ) if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for d in visible.split(","):
            d = d.strip()
            if not d or d.startswith("-"):  # CUDA stops at the first invalid id ("-1" hides all)
                break
            ids.append(d)
        return ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, _ in enumerate(x for x in out.splitlines() if x.startswith("GPU "))]


# --------------------------------------------------------------------------- tasks


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger (lines reach the Prefect UI); a plain one under ``task.fn()`` in tests."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="apply-params", cache_policy=NONE)
def apply_params(root: str, overrides: dict[str, Any]) -> bool:
    """Write the overrides into params.yaml and keep them (as ``dvc exp run -S`` does)."""
    changed = set_params(Path(root) / Layout(Path(root)).params, overrides)
    _logger().info("params.yaml %s: %s", "updated" if changed else "already had", overrides)
    return changed


@task(name="plan", **_RETRY)
def plan(root: str, stages: list[str] | None, exclude: list[str]) -> list[list[str]]:
    """The stages to reproduce, in waves of mutually independent stages."""
    pipeline = load_pipeline(Path(root))
    waves = pipeline.levels(pipeline.resolve(stages, exclude=exclude))
    _logger().info("plan: %s", " -> ".join(" + ".join(w) for w in waves))
    return waves


@task(name="dvc-repro", task_run_name="dvc repro {stage}", **_RETRY)
def reproduce(root: str, stage: str, device: str | None = None, pull: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item STAGE`` with its output streamed to the run log."""
    logger = _logger()
    logger.info("dvc repro --single-item %s%s", stage, f" (GPU {device})" if device is not None else "")
    run = run_stage(Path(root), stage, on_line=logger.info, device=device, pull=pull)
    logger.info("%s: %s in %.1f s", stage, "up to date" if run.status == "skipped" else "ran", run.seconds)
    return asdict(run)


@task(name="promote", **_RETRY)
def promote_candidate(root: str, record: dict[str, Any], git_tag: str | None) -> dict[str, Any]:
    """Copy the bundle to production (one rename), ``dvc add`` it, commit the record and tag it."""
    layout = Layout(Path(root))
    logger = _logger()
    promote_bundle(layout, record)
    dvc_track(layout)
    out: dict[str, Any] = {"path": layout.production, "tag": None, "commit": None}
    if git_tag:
        out["commit"] = commit_and_tag(layout, git_tag, f"{git_tag}: promote {layout.bundle}")
        out["tag"] = git_tag
    logger.info("promoted %s -> %s %s", layout.bundle, layout.production, out["tag"] or "")
    return out


@task(name="score-production", cache_policy=NONE)
def score_production(root: str, samples: int, seed: int) -> PairedGate:
    """Production's answers for the candidate's test images it has not seen, compared with the
    candidate's own lesion by lesion (TensorFlow loads here, in the flow's process)."""
    return _score_production(Layout(Path(root)), samples, seed)


def _score_production(layout: Layout, samples: int, seed: int) -> PairedGate:
    logger = _logger()
    served = _served(layout)
    logger.info("scoring %s on the candidate's test images (%s)", layout.production, served)
    out = paired_production(
        layout.path(layout.production),
        layout.path(served),
        layout.path(layout.raw) / "images",
        samples=samples,
        seed=seed,
        names={"production": layout.production, "served": served, "images": f"{layout.raw}/images"},
    )
    if out.unavailable:
        logger.warning("no paired comparison: %s", out.unavailable)
    else:
        logger.info(
            "paired: %d images (%d left out: seen by production), %s",
            out.n_images,
            out.n_left_out,
            "; ".join(f"{m.mode} {PAIRED_GATE_KEY} {m.diffs[PAIRED_GATE_KEY].diff:+.3f}" for m in out.modes),
        )
    return out


def _served(layout: Layout) -> str:
    """The calibrate stage's served test answers (its --served folder in dvc.yaml)."""
    return layout.served


@task(name="dvc-push", **_RETRY)
def push(root: str) -> str:
    # --run-cache: another machine's `dvc repro --pull` then restores unchanged stages' outputs
    # even before this run's dvc.lock reaches it through git. PushFailed names the remote and
    # says that nothing local (a promotion included) was undone.
    _logger().info("dvc push --run-cache")
    done = push_to_remote(Path(root))
    return f"pushed {done.files_pushed} file(s) to {done.remote} ({done.url})"


# --------------------------------------------------------------------------- the flow


def _run_wave(root: str, wave: list[str], devices: list[str], pull: bool) -> list[dict[str, Any]]:
    """One wave: one stage after another, or with several GPUs up to one stage per GPU at once."""
    if len(devices) <= 1 or len(wave) == 1:
        return [reproduce(root, stage, pull=pull) for stage in wave]
    done: list[dict[str, Any]] = []
    for i in range(0, len(wave), len(devices)):
        chunk = wave[i : i + len(devices)]
        pairs = zip(chunk, devices, strict=False)
        futures = [reproduce.submit(root, s, device=d, pull=pull) for s, d in pairs]
        wait(futures)
        errors = []
        for f in futures:
            try:
                done.append(f.result())
            except Exception as e:  # the others' results still go into the summary
                errors.append(e)
        if errors:
            raise errors[0]
    return done


# --------------------------------------------------------------------------- the gate's thresholds

# What an operator may change for one run (gate_overrides). calibrate.target_recall is also a
# gate input (the recall bar while promote.min_test_recall is null), but it is the calibrate
# stage's knob: overriding it retunes the candidate's threshold, so it is not a gate override.
GATE_KEYS = ("promote.max_auc_drop", "promote.min_test_recall")
GATE_INPUTS = (*GATE_KEYS, "calibrate.target_recall")
# Read from the committed params too: the paired bootstrap's seed and replicates.
PAIRED_INPUTS = ("base.seed", "evaluate.bootstrap_samples")


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


def _gate_values(p: Params) -> dict[str, Any]:
    return {
        "promote.max_auc_drop": p.promote.max_auc_drop,
        "promote.min_test_recall": p.promote.min_test_recall,
        "calibrate.target_recall": p.calibrate.target_recall,
    }


def _recall_bar(values: Mapping[str, Any]) -> float:
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
        raise RetrainFailed(
            f"gate_overrides: {bad[0]!r} is not a gate threshold; use {' or '.join(GATE_KEYS)}"
        )
    try:
        committed_params = _gate_params(committed_raw)
    except ParamsError as e:
        raise RetrainFailed(f"{source}: {e}") from None
    committed = _gate_values(committed_params)
    try:
        used = _gate_values(_gate_params(committed_raw, overrides))
    except ParamsError as e:
        raise RetrainFailed(f"gate_overrides: {e}") from None
    # calibrate.target_recall is a gate input only while the committed min_test_recall is null.
    inputs = GATE_INPUTS if committed["promote.min_test_recall"] is None else GATE_KEYS
    ignored = {k: v for k, v in (params_overrides or {}).items() if k in inputs and v != committed[k]}
    return Gate(
        target_recall=_recall_bar(used),
        max_auc_drop=used["promote.max_auc_drop"],
        source=source,
        committed=committed,
        overrides=overrides,
        ignored=ignored,
        seed=committed_params.base.seed,
        bootstrap_samples=committed_params.evaluate.bootstrap_samples,
    )


def _committed_params(layout: Layout, git: bool) -> tuple[dict[str, Any], str]:
    """The params the gate's thresholds come from, and a label saying which they are.

    params.yaml at git HEAD, not the file as it was before this run's overrides: overrides are
    kept in params.yaml (as ``dvc exp run -S`` keeps them), so that file also holds every earlier
    run's, and one run's ``promote.max_auc_drop=1`` would loosen the gate of all later runs. HEAD
    moves only by a commit: a reviewed change, or a promotion, which pins the committed gate
    (:func:`_pin_committed_gate`). Outside git, or before params.yaml is committed, there is no
    such record: the file before this run's overrides is the fallback, and the log says so.
    Call it before the overrides are applied.
    """
    logger = _logger()
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


def _pin_committed_gate(layout: Layout, gate: Gate) -> dict[str, Any]:
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
        _logger().warning("params.yaml: gate thresholds pinned to the committed ones: %s", pins)
    return pins


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


def gate_markdown(gate: Mapping[str, Any], layout: Layout) -> list[str]:
    """The summary's sections on the gate's thresholds and the data versions (``report.gate``)."""
    lines: list[str] = []
    th = gate.get("thresholds")
    if th:
        committed = th["committed"]
        lines += ["## Gate thresholds", ""]
        if th["overrides"]:
            shown = ", ".join(
                f"`{k}={v}` (committed: {fmt(committed[k])})" for k, v in th["overrides"].items()
            )
            lines += [f"**GATE OVERRIDDEN by the operator (gate_overrides), this run only:** {shown}.", ""]
        lines += _table(
            ["threshold", "committed", "this run's gate"],
            [
                ("test malignant recall, in every input mode of the bundle (`promote.min_test_recall`, "
                 "null: `calibrate.target_recall`)",
                 fmt(_recall_bar(committed)), fmt(th["target_recall"])),
                ("AUC drop allowed (`promote.max_auc_drop`; paired: the lower bound of the CI of the "
                 "macro AUC difference on the same images)", fmt(committed["promote.max_auc_drop"]),
                 fmt(th["max_auc_drop"])),
                ("paired lesion bootstrap: replicates, seed (`evaluate.bootstrap_samples`, `base.seed`)",
                 *[f"{th['bootstrap_samples']}, seed {th['seed']}"] * 2),
            ],
        )  # fmt: skip
        lines += ["", f"Committed values from {th['source']}."]
        if th["ignored"]:
            shown = ", ".join(f"`{k}={v}`" for k, v in th["ignored"].items())
            lines += [
                f"params_overrides of gate inputs, not used by the gate: {shown} (they configure "
                "the candidate: an overridden `calibrate.target_recall` retunes its threshold; "
                "thresholds change only through gate_overrides)."
            ]
        lines += [""]
    data = gate.get("data")
    if data and data["status"] != "no production":
        titles = {"same": "same as production", "newer": "NEWER than production's"}
        title = titles.get(data["status"], "unknown")
        lines += [f"## Data version: {title}", "", data["note"][:1].upper() + data["note"][1:] + ".", ""]
        rows = []
        for path in layout.data_outputs:
            old, new = data["production"].get(path), data["candidate"].get(path)
            if old is None and new is None:
                continue
            verdict = "—" if old is None or new is None else ("same" if old == new else "changed")
            rows.append((f"`{path}`", f"`{old}`" if old else "—", f"`{new}`" if new else "—", verdict))
        lines += _table(["output (md5 in dvc.lock)", "production", "candidate", ""], rows) + [""]
    if gate.get("paired"):
        lines += paired_markdown(gate["paired"], (th or {}).get("max_auc_drop"))
    return lines


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


def paired_markdown(paired: Mapping[str, Any], max_auc_drop: float | None) -> list[str]:
    """The summary's section on the paired comparison (``PairedGate.as_dict()``)."""
    lines = ["## Paired comparison with production", ""]
    if paired.get("unavailable"):
        lines += [
            f"Not compared on the same images: {paired['unavailable']}. The AUC checks compare each "
            "bundle's stored test metrics.",
            "",
        ]
        return lines
    level = round(100 * paired["level"])
    failed = f", less {paired['n_failed']} production could not score" if paired["n_failed"] else ""
    rule = (
        f" The gate: the lower bound of the {PAIRED_GATE_KEY} CI >= {-max_auc_drop:+.3f} in every input mode."
        if max_auc_drop is not None
        else ""
    )
    first = paired["modes"][0]
    lines += [
        f"Both bundles scored on the same **{first['n_images']}** test images ({first['n_lesions']} "
        f"lesions): the candidate's {paired['n_test']} test images less **{paired['n_left_out']}** "
        f"({paired['n_lesions_left_out']} lesions) production trained, tuned or calibrated on{failed}. "
        f"Difference = candidate - production, {level}% CI of {paired['samples']} lesion-bootstrap "
        f"replicates (seed {paired['seed']}).{rule}",
        "",
    ]
    rows = []
    for m in paired["modes"]:
        for key in PAIRED_KEYS:
            d = m["metrics"].get(key)
            if d is None:
                continue
            ci = f"[{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]"
            shown = f"**{key}**" if key == PAIRED_GATE_KEY else key
            rows.append((mode_label(m["mode"]), shown, fmt(d["production"]), fmt(d["candidate"]),
                         _signed(d["diff"]), ci))  # fmt: skip
    lines += _table(["input mode", "metric", "production", "candidate", "difference", f"{level}% CI"], rows)
    lines += [""] + [f"- {note}" for note in paired.get("notes") or []]
    return lines + ([""] if paired.get("notes") else [])


def render(report: RunReport, layout: Layout) -> str:
    """The summary artifact: :func:`flows.report.render_summary` with the gate's thresholds and
    the data versions just before its gate table."""
    md = render_summary(report, layout)
    extra = gate_markdown(report.gate or {}, layout)
    if not extra:
        return md
    marker = "## Promotion gate\n"
    at = md.find(marker)
    block = "\n".join(extra) + "\n"
    return md[:at] + block + md[at:] if at >= 0 else md.rstrip() + "\n\n" + block


def _links(layout: Layout) -> list[str]:
    """Plots rendered by ``dvc plots show`` and the HTML/markdown reports the stages wrote."""
    reports = layout.path(layout.reports)
    if not reports.is_dir():
        return []
    found = sorted(reports.glob("**/index.html")) + sorted(reports.glob("*.md"))
    found += sorted(reports.glob("*/*.md"))
    return [str(p.relative_to(layout.root)) for p in found][:30]


def _render_plots(layout: Layout) -> None:
    try:
        run_quiet(dvc_argv("plots", "show", "--out", layout.plots_out), layout.root, timeout=300)
    except DvcError as e:
        _logger().warning("dvc plots show failed (summary lists no plots): %s", e)


def _overrides(
    backbones: list[str] | None,
    params_overrides: dict[str, Any] | None,
    extra_sources: list[str] | None = None,
    current_extra: Sequence[str] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if backbones:
        # The ensemble must be a subset of what is trained: by default, all of it.
        out["train.backbones"] = list(backbones)
        out["ensemble.members"] = list(backbones)
    out.update(params_overrides or {})
    if extra_sources:
        base = out.get("download.extra_sources", current_extra)
        out["download.extra_sources"] = merge_extra_sources(base, extra_sources)
    return out


def parse_extra_sources(value: str | None) -> list[str]:
    """The retrain's ``extra_sources`` parameter: a JSON list of paths (what the drift event
    carries), or one path; None or empty means none."""
    text = (value or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RetrainFailed(f"extra_sources: not a JSON list of paths ({e.msg}): {text[:200]}") from None
        if not all(isinstance(x, str) and x.strip() for x in items):
            raise RetrainFailed(f"extra_sources: every entry must be a non-empty path: {text[:200]}")
        return [x.strip() for x in items]
    return [text]


def merge_extra_sources(current: Sequence[str], new: Sequence[str]) -> list[str]:
    """``current`` then the entries of ``new`` it lacks: order kept, no duplicates."""
    out: list[str] = []
    for path in [*current, *new]:
        if path not in out:
            out.append(path)
    return out


def _publish(report: RunReport, layout: Layout, diff: dict | None) -> None:
    try:
        _create_artifacts(report, layout, diff)
    except Exception as e:  # never hide the run's own outcome behind an artifact error
        _logger().error("could not publish the artifacts: %s", e)


def _create_artifacts(report: RunReport, layout: Layout, diff: dict | None) -> None:
    overridden = ((report.gate or {}).get("thresholds") or {}).get("overrides")
    create_markdown_artifact(
        markdown=render(report, layout),
        key=SUMMARY_KEY,
        description=f"retrain: {report.outcome}" + (" (GATE OVERRIDDEN)" if overridden else ""),
    )
    if diff is not None:
        create_table_artifact(
            table=diff_table(diff),
            key=DIFF_KEY,
            description=f"dvc metrics diff, production ({report.diff_against}) -> this run's candidate",
        )


@flow(name="retrain", description="Reproduce the DVC pipeline, report, and promote if the gate holds.")
def retrain(
    stages: list[str] | None = None,
    backbones: list[str] | None = None,
    params_overrides: dict[str, Any] | None = None,
    promote: bool = True,
    extra_sources: str | None = None,
    gate_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Reproduce the pipeline and promote the candidate bundle if it passes the gate.

    Args:
        stages: dvc.yaml stages to reproduce, with everything upstream of them (``train`` means
            every ``train@...``); default: all but ``drift`` (the monitor flow's).
        backbones: train these (sets ``train.backbones`` and ``ensemble.members``).
        params_overrides: ``{"train.common.epochs": 1, ...}`` written into params.yaml and kept,
            like ``dvc exp run -S``. They configure the candidate, never the gate that judges it:
            that uses the committed ``promote.*`` and ``calibrate.target_recall``.
        promote: promote a candidate that passes the gate (false: report the gate only).
        extra_sources: labelled batches (folders in HAM10000 layout) to add to the training data:
            a JSON list of paths, or one path. Appended to ``download.extra_sources`` (kept in
            params.yaml, duplicates skipped), so ``download`` merges them into the next data
            version. The drift monitor's event passes them through the deployment trigger.
        gate_overrides: the operator's change of a gate threshold for this run only, e.g.
            ``{"promote.max_auc_drop": 0.02}`` (keys: ``promote.max_auc_drop``,
            ``promote.min_test_recall``). Logged as a warning and recorded in the summary
            artifact and the production record; never written to params.yaml.
    """
    logger = get_run_logger()
    layout = Layout(Path.cwd().resolve())
    root = str(layout.root)
    report = RunReport(flow_run=flow_run.get_name() or "local")
    result: dict[str, Any] = {"promoted": False, "reason": "", "tag": None, "stages": {}}
    diff: dict | None = None
    try:
        if not (layout.root / "dvc.yaml").is_file():
            raise RetrainFailed(f"no dvc.yaml in {root}: run the flow from the repository root")
        extra = parse_extra_sources(extra_sources)
        current = load_params(layout.path(layout.params)).download.extra_sources if extra else ()
        overrides = _overrides(backbones, params_overrides, extra, current)
        report.overrides = overrides
        git = in_git(layout.root)
        # Before the overrides are written: the bar is set before the candidate exists.
        gate = resolve_gate(*_committed_params(layout, git), gate_overrides, overrides)
        _log_gate(gate)
        if overrides:
            apply_params(root, overrides)
        params = load_params(layout.path(layout.params))
        waves = plan(root, stages, list(layout.not_retrain))
        report.planned = [s for w in waves for s in w]
        devices = gpu_devices()
        report.devices = devices
        remote = has_remote(layout.root)
        for wave in waves:
            try:
                report.stage_runs += _run_wave(root, wave, devices, remote)
            except StageFailed as e:
                report.failed_stage, report.failure = e.stage, e.tail
                raise RetrainFailed(f"stage {e.stage!r} failed: {_last(e.tail)}") from e
        result["stages"] = {s["stage"]: s["status"] for s in report.stage_runs}

        report.metrics = metrics_show(layout.root)
        report.data_version = lock_hashes(layout.root).get(layout.raw)
        report.git_commit = head_commit(layout.root) if git else None
        _render_plots(layout)
        report.links = _links(layout)

        production = read_production(layout)
        diff, report.diff_against = _diff_against(layout, production, report.metrics, git)
        _gate_and_promote(layout, report, result, params, production, gate, promote=promote, git=git)
        if remote:  # a remote is configured: share this run's outputs (and production) through it
            try:
                pushed = push(root)
            except PushFailed as e:
                if report.promotion:  # the promotion stands; the summary says the remote is behind
                    report.promotion["pushed"] = f"FAILED: {e}"
                raise
            if report.promotion:
                report.promotion["pushed"] = pushed
        elif report.promotion:
            report.promotion["pushed"] = "no DVC remote configured"
    except Exception as e:
        report.outcome = "failed"
        if not report.failure and not report.failed_stage:
            report.failure = f"{type(e).__name__}: {e}"
        report.reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not report.metrics:  # what the stages that did run wrote (e.g. the validation result)
            with contextlib.suppress(Exception):  # a broken dvc.yaml: the failure says so already
                report.metrics = metrics_show(layout.root)
        report.links = report.links or _links(layout)
        _publish(report, layout, diff)
        if isinstance(e, RetrainFailed):
            raise
        raise RetrainFailed(report.reason) from e

    _publish(report, layout, diff)
    result["reason"] = report.reason
    result["gate"] = report.gate
    logger.info("retrain: %s (%s)", report.outcome, report.reason)
    name = "Completed" if result["promoted"] else "Not promoted"
    return Completed(message=f"{report.outcome}: {report.reason}"[:500], name=name, data=result)


def _diff_against(
    layout: Layout, production: dict[str, Any] | None, snapshot: dict[str, dict[str, Any]], git: bool
) -> tuple[dict, str]:
    """``dvc metrics diff`` of the workspace against production's tag; without a tag, the same
    table from the metrics production.json saved."""
    tag = (production or {}).get("git_tag")
    if git and tag and tag_exists(layout.root, tag):
        return metrics_diff_rev(layout.root, tag), f"git tag `{tag}`"
    label = f"`{layout.production}/production.json`" if production else "none yet"
    return diff_metrics((production or {}).get("metrics") or {}, snapshot), label


def _log_gate(gate: Gate) -> None:
    logger = _logger()
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


def _gate_and_promote(
    layout: Layout,
    report: RunReport,
    result: dict[str, Any],
    params: Params,
    production: dict[str, Any] | None,
    gate: Gate,
    *,
    promote: bool,
    git: bool,
) -> None:
    """Decide on the candidate this run built and promote it if it passes (and ``promote``).

    ``params`` is this run's (overrides applied): it says whether to tag, never how high the
    bar is; ``gate`` does (:func:`resolve_gate`).
    """
    if layout.bundle_stage not in report.planned:
        report.outcome = "not promoted"
        report.reason = f"this run did not reproduce {layout.bundle_stage!r}"
        return
    paired = _paired(layout, production, gate)
    decision = decide(
        gate_metrics(report.metrics, layout),
        gate_metrics(production.get("metrics") or {}, layout) if production else None,
        target_recall=gate.target_recall,
        max_auc_drop=gate.max_auc_drop,
        paired=paired,
    )
    lock = lock_hashes(layout.root)
    is_paired = paired is not None and paired.unavailable is None
    data = compare_data(data_versions(lock, layout), production, layout, paired=is_paired)
    report.gate = {**decision.as_dict(), "thresholds": gate.as_dict(), "data": data}
    if paired is not None:
        report.gate["paired"] = paired.as_dict()
    reason = decision.reason
    if gate.overrides:
        reason += " (gate overridden: " + ", ".join(f"{k}={v}" for k, v in gate.overrides.items()) + ")"
    if not decision.promote:
        report.outcome, report.reason = "not promoted", reason
        return
    if not promote:
        report.outcome = "not promoted"
        report.reason = f"promote=false (the gate would have promoted: {reason})"
        return
    now = datetime.now(UTC)
    tag = free_tag(layout.root, utc_tag(now)) if git and params.promote.git_tag else None
    pinned = _pin_committed_gate(layout, gate) if tag else {}
    record = {
        "promoted_at": now.isoformat(timespec="seconds"),
        "git_tag": tag,
        "source_commit": report.git_commit,
        "dirty_code": dirty_code(layout.root) if git else [],
        # What the model learned and was tested from: data/raw (kept for older readers) and
        # every data output dvc.lock versions; the next run's summary compares against these.
        "data_version": report.data_version,
        "data_versions": data["candidate"],
        "dvc_lock": lock,
        "metrics": report.metrics,
        "gate": report.gate,
        "gate_overrides": dict(gate.overrides),
        "gate_pinned": pinned,
        "params": yaml.safe_load(layout.path(layout.params).read_text(encoding="utf-8")),
        "flow_run": {"id": str(flow_run.get_id() or ""), "name": report.flow_run},
    }
    report.promotion = promote_candidate(str(layout.root), record, tag)
    if gate.overrides:
        report.promotion["gate_overrides"] = ", ".join(f"{k}={v}" for k, v in gate.overrides.items())
    report.outcome, report.reason = "promoted", reason
    result["promoted"], result["tag"] = True, tag


def _paired(layout: Layout, production: dict[str, Any] | None, gate: Gate) -> PairedGate | None:
    """The paired comparison with production (None before the first promotion). A production
    bundle without seen.json falls back here, before anything loads TensorFlow."""
    if production is None:
        return None
    if (layout.path(layout.production) / SEEN_FILE).is_file():
        return score_production(str(layout.root), gate.bootstrap_samples, gate.seed)
    # no task run: the comparison stops at the missing file and says so
    return _score_production(layout, gate.bootstrap_samples, gate.seed)


def _last(text: str) -> str:
    """The line of a stage's output that says what went wrong (the stage's, not dvc's wrapper)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    own = [ln for ln in lines if not ln.startswith(("ERROR: failed to reproduce", "Running stage", "> "))]
    errors = [ln for ln in own if any(w in ln.lower() for w in ("error", "failed", "exception"))]
    return (errors or own or lines or [""])[-1][:300]


# --------------------------------------------------------------------------- command line


def _parse_set(items: list[str], flag: str = "--set") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)  # "1" -> 1, "[a, b]" -> list, as dvc exp run -S
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.retrain",
        description=(
            "Run the retrain flow once, here, with no Prefect server (Prefect's ephemeral API): "
            "reproduce the DVC pipeline from the current directory (the repository root), write the "
            "summary artifacts, and promote the candidate bundle to models/production if the gate "
            "holds. For scheduled and on-demand runs through a server, see prefect.yaml "
            "(prefect deployment run 'retrain/on-demand')."
        ),
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help="reproduce these stages and what they need (default: all but drift)",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        metavar="NAME",
        help="train these backbones (sets train.backbones and ensemble.members)",
    )
    parser.add_argument(
        "--set",
        "-S",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help="override a parameter, e.g. -S train.common.epochs=1 (kept in params.yaml, "
        "as with dvc exp run -S); repeatable",
    )
    parser.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="gates",
        help="change a gate threshold for this run only (promote.max_auc_drop, "
        "promote.min_test_recall); logged and recorded, never written to params.yaml. "
        "--set never changes the gate, which uses the committed params.yaml; repeatable",
    )
    parser.add_argument("--no-promote", action="store_true", help="evaluate the gate but never promote")
    parser.add_argument(
        "--extra-source",
        action="append",
        default=[],
        metavar="PATH",
        dest="extra_sources",
        help="a labelled batch (HAM10000 layout) to add to download.extra_sources; repeatable",
    )
    args = parser.parse_args(argv)
    overrides = _parse_set(args.sets)
    gate_overrides = _parse_set(args.gates, "--gate")
    try:
        result = retrain(
            stages=args.stages,
            backbones=args.backbones,
            params_overrides=overrides or None,
            promote=not args.no_promote,
            extra_sources=json.dumps(args.extra_sources) if args.extra_sources else None,
            gate_overrides=gate_overrides or None,
        )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: retrain failed: {first}", file=sys.stderr)
        return 1
    verdict = f"promoted as {result['tag'] or 'models/production'}" if result["promoted"] else "not promoted"
    print(f"retrain: {verdict}: {result['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
