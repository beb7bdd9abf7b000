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
metric "with metadata" and "image only". The gate lives in :mod:`flows.gate` (a fusion candidate
must reach the recall target in both input modes; its summary sections: :mod:`flows.gate_report`),
the promotion in :mod:`flows.promote`. Before
the gate, the production bundle is scored on the candidate's test images it has not seen (task
``score-production``, :mod:`flows.gate_paired`): the AUC check is a paired comparison on the same
images, and the summary and ``production.json`` show it (images paired, images left out, both
bundles' numbers, the difference and its CI).

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
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from flows.dvcops import (
    DvcError,
    Layout,
    PushFailed,
    StageFailed,
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
from flows.gate import Gate, GateError, committed_params, judge, log_gate, pin_committed_gate, resolve_gate
from flows.gate_paired import PAIRED_GATE_KEY, PairedGate, paired_production
from flows.gate_report import render_retrain_summary
from flows.promote import (
    commit_and_tag,
    dvc_track,
    free_tag,
    head_commit,
    in_git,
    production_record,
    promote_bundle,
    read_production,
    tag_exists,
    utc_tag,
)
from flows.report import RunReport, diff_table
from flows.runlog import run_logger
from skinlesion.model.bundle_json import PRODUCTION_RECORD
from skinlesion.model.seen import SEEN_FILE
from skinlesion.params.load import Params, load_params

__all__ = [
    "RetrainFailed",
    "gate_and_promote",
    "gpu_devices",
    "main",
    "merge_extra_source_params",
    "paired_comparison",
    "parse_extra_sources",
    "parse_set",
    "retrain",
    "retry_if_transient",
    "run_overrides",
]

SUMMARY_KEY = "retrain-summary"
DIFF_KEY = "retrain-metrics-diff"


class RetrainFailed(RuntimeError):
    """The run stopped; the summary artifact says where and why."""


# --------------------------------------------------------------------------- the flow


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
        overrides = run_overrides(backbones, params_overrides, extra, current)
        report.overrides = overrides
        git = in_git(layout.root)
        # Before the overrides are written: the bar is set before the candidate exists.
        try:
            gate = resolve_gate(*committed_params(layout, git), gate_overrides, overrides)
        except GateError as e:
            raise RetrainFailed(str(e)) from None
        log_gate(gate)
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
        gate_and_promote(layout, report, result, params, production, gate, promote=promote, git=git)
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


def gate_and_promote(
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
    lock = lock_hashes(layout.root)
    verdict = judge(report.metrics, production, gate, paired, lock, layout)
    report.gate = verdict.summary
    if not verdict.promote:
        report.outcome, report.reason = "not promoted", verdict.reason
        return
    if not promote:
        report.outcome = "not promoted"
        report.reason = f"promote=false (the gate would have promoted: {verdict.reason})"
        return
    now = datetime.now(UTC)
    tag = free_tag(layout.root, utc_tag(now)) if git and params.promote.git_tag else None
    pinned = pin_committed_gate(layout, gate) if tag else {}
    record = production_record(
        layout,
        now=now,
        tag=tag,
        source_commit=report.git_commit,
        git=git,
        data_version=report.data_version,
        data_versions=verdict.data["candidate"],
        lock=lock,
        metrics=report.metrics,
        gate=report.gate,
        gate_overrides=gate.overrides,
        gate_pinned=pinned,
        flow_run={"id": str(flow_run.get_id() or ""), "name": report.flow_run},
    )
    report.promotion = promote_candidate(str(layout.root), record, tag)
    if gate.overrides:
        report.promotion["gate_overrides"] = gate.overrides_text()
    report.outcome, report.reason = "promoted", verdict.reason
    result["promoted"], result["tag"] = True, tag


def _paired(layout: Layout, production: dict[str, Any] | None, gate: Gate) -> PairedGate | None:
    """The paired comparison with production (None before the first promotion). A production
    bundle without seen.json falls back here, before anything loads TensorFlow."""
    if production is None:
        return None
    if (layout.path(layout.production) / SEEN_FILE).is_file():
        return score_production(str(layout.root), gate.bootstrap_samples, gate.seed)
    # no task run: the comparison stops at the missing file and says so
    return paired_comparison(layout, gate.bootstrap_samples, gate.seed)


def _diff_against(
    layout: Layout, production: dict[str, Any] | None, snapshot: dict[str, dict[str, Any]], git: bool
) -> tuple[dict, str]:
    """``dvc metrics diff`` of the workspace against production's tag; without a tag, the same
    table from the metrics production.json saved."""
    tag = (production or {}).get("git_tag")
    if git and tag and tag_exists(layout.root, tag):
        return metrics_diff_rev(layout.root, tag), f"git tag `{tag}`"
    label = f"`{layout.production}/{PRODUCTION_RECORD}`" if production else "none yet"
    return diff_metrics((production or {}).get("metrics") or {}, snapshot), label


def _last(text: str) -> str:
    """The line of a stage's output that says what went wrong (the stage's, not dvc's wrapper)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    own = [ln for ln in lines if not ln.startswith(("ERROR: failed to reproduce", "Running stage", "> "))]
    errors = [ln for ln in own if any(w in ln.lower() for w in ("error", "failed", "exception"))]
    return (errors or own or lines or [""])[-1][:300]


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
        run_logger(__name__).warning("dvc plots show failed (summary lists no plots): %s", e)


def _publish(report: RunReport, layout: Layout, diff: dict | None) -> None:
    try:
        _create_artifacts(report, layout, diff)
    except Exception as e:  # never hide the run's own outcome behind an artifact error
        run_logger(__name__).error("could not publish the artifacts: %s", e)


def _create_artifacts(report: RunReport, layout: Layout, diff: dict | None) -> None:
    overridden = ((report.gate or {}).get("thresholds") or {}).get("overrides")
    create_markdown_artifact(
        markdown=render_retrain_summary(report, layout),
        key=SUMMARY_KEY,
        description=f"retrain: {report.outcome}" + (" (GATE OVERRIDDEN)" if overridden else ""),
    )
    if diff is not None:
        create_table_artifact(
            table=diff_table(diff),
            key=DIFF_KEY,
            description=f"dvc metrics diff, production ({report.diff_against}) -> this run's candidate",
        )


# --------------------------------------------------------------------------- the run's parameters


def run_overrides(
    backbones: list[str] | None,
    params_overrides: dict[str, Any] | None,
    extra_sources: list[str] | None = None,
    current_extra: Sequence[str] = (),
) -> dict[str, Any]:
    """The params.yaml overrides of one run: ``backbones`` (trained and ensembled), the
    ``params_overrides``, and the ``extra_sources`` appended to ``current_extra``."""
    out: dict[str, Any] = {}
    if backbones:
        # The ensemble must be a subset of what is trained: by default, all of it.
        out["train.backbones"] = list(backbones)
        out["ensemble.members"] = list(backbones)
    out.update(params_overrides or {})
    if extra_sources:
        base = out.get("download.extra_sources", current_extra)
        out["download.extra_sources"] = merge_extra_source_params(base, extra_sources)
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


def merge_extra_source_params(current: Sequence[str], new: Sequence[str]) -> list[str]:
    """``current`` then the entries of ``new`` it lacks: order kept, no duplicates."""
    out: list[str] = []
    for path in [*current, *new]:
        if path not in out:
            out.append(path)
    return out


# --------------------------------------------------------------------------- tasks


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


@task(name="apply-params", cache_policy=NONE)
def apply_params(root: str, overrides: dict[str, Any]) -> bool:
    """Write the overrides into params.yaml and keep them (as ``dvc exp run -S`` does)."""
    changed = set_params(Path(root) / Layout(Path(root)).params, overrides)
    run_logger(__name__).info("params.yaml %s: %s", "updated" if changed else "already had", overrides)
    return changed


@task(name="plan", **_RETRY)
def plan(root: str, stages: list[str] | None, exclude: list[str]) -> list[list[str]]:
    """The stages to reproduce, in waves of mutually independent stages."""
    pipeline = load_pipeline(Path(root))
    waves = pipeline.levels(pipeline.resolve(stages, exclude=exclude))
    run_logger(__name__).info("plan: %s", " -> ".join(" + ".join(w) for w in waves))
    return waves


@task(name="dvc-repro", task_run_name="dvc repro {stage}", **_RETRY)
def reproduce(root: str, stage: str, device: str | None = None, pull: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item STAGE`` with its output streamed to the run log."""
    logger = run_logger(__name__)
    logger.info("dvc repro --single-item %s%s", stage, f" (GPU {device})" if device is not None else "")
    run = run_stage(Path(root), stage, on_line=logger.info, device=device, pull=pull)
    logger.info("%s: %s in %.1f s", stage, "up to date" if run.status == "skipped" else "ran", run.seconds)
    return asdict(run)


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


@task(name="score-production", cache_policy=NONE)
def score_production(root: str, samples: int, seed: int) -> PairedGate:
    """Production's answers for the candidate's test images it has not seen, compared with the
    candidate's own lesion by lesion (TensorFlow loads here, in the flow's process)."""
    return paired_comparison(Layout(Path(root)), samples, seed)


def paired_comparison(layout: Layout, samples: int, seed: int) -> PairedGate:
    """:func:`flows.gate_paired.paired_production` on the workspace's paths, logged."""
    logger = run_logger(__name__)
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


@task(name="promote", **_RETRY)
def promote_candidate(root: str, record: dict[str, Any], git_tag: str | None) -> dict[str, Any]:
    """Copy the bundle to production (one rename), ``dvc add`` it, commit the record and tag it."""
    layout = Layout(Path(root))
    logger = run_logger(__name__)
    promote_bundle(layout, record)
    dvc_track(layout)
    out: dict[str, Any] = {"path": layout.production, "tag": None, "commit": None}
    if git_tag:
        out["commit"] = commit_and_tag(layout, git_tag, f"{git_tag}: promote {layout.bundle}")
        out["tag"] = git_tag
    logger.info("promoted %s -> %s %s", layout.bundle, layout.production, out["tag"] or "")
    return out


@task(name="dvc-push", **_RETRY)
def push(root: str) -> str:
    # --run-cache: another machine's `dvc repro --pull` then restores unchanged stages' outputs
    # even before this run's dvc.lock reaches it through git. PushFailed names the remote and
    # says that nothing local (a promotion included) was undone.
    run_logger(__name__).info("dvc push --run-cache")
    done = push_to_remote(Path(root))
    return f"pushed {done.files_pushed} file(s) to {done.remote} ({done.url})"


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


# --------------------------------------------------------------------------- command line


def parse_set(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` items of ``flag`` as a dict, each value parsed as YAML."""
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
    overrides = parse_set(args.sets)
    gate_overrides = parse_set(args.gates, "--gate")
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
