"""The ``monitor`` flow: check every new batch of images in the inbox for drift, once.

A batch is a sub-folder of the inbox (``drift.inbox``). It is known by its name and a
fingerprint of its files (relative path, size, mtime), kept in a ledger
(``<drift.monitor_state>/ledger.json``, written atomically), so a batch is never checked twice
and a batch whose files changed is checked again. Each new or changed batch is one task running
the drift check (``python -m stages.drift``) from the repository root, its output lines going to
the run log; the flow itself only composes.

For every batch checked the flow publishes a markdown artifact ``drift-<batch slug>`` (verdict,
drifted features, embedding score, class shift, unreadable files, the report's path), and at the
end ``monitor-summary``. On drift it emits the Prefect event ``skinlesion.drift.detected`` (the
batch is the resource); the ``retrain/on-demand`` deployment's trigger in ``prefect.yaml`` runs
on it. The event hands labelled batches (a HAM10000 metadata CSV in the folder) to that retrain
in its payload's ``extra_sources``; the retrain appends them to ``download.extra_sources``, so
they join the next data version. ``drift.trigger_retrain: false`` (or the flow parameter)
labels the event so that the trigger ignores it.

A labelled batch (its metadata table has a ``dx`` column: the drift check says ``labelled``) is
also scored against its labels, as an external validation of the bundle: ``python -m
serve.evaluate`` (a subprocess, so TensorFlow stays out of this process) writes
``batches/<batch>/evaluation.json``, whose headline metrics, per input mode ("with metadata",
"image only"), go into the batch's artifact and, with a workspace, into the Evidently project
``<drift.project>: external validation``. That check is an extra: when it fails the monitor logs
a warning and carries on; the drift verdict, the event and the ledger never depend on it.

The flow composes: :mod:`flows.ledger` (which batches to check, what became of them),
:mod:`flows.monitor_report` (the artifacts), :mod:`flows.evaluation` (the external validation).

Run it once, locally, with no server (ephemeral API; an event then starts nothing)::

    python -m flows.monitor --help

Deployed (``prefect.yaml``): ``prefect deployment run 'monitor/daily'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from flows.dvcops import Layout, stream_command, subprocess_env
from flows.evaluation import EVALUATION_FILE, add_evaluation_to_workspace, evaluation_project, read_evaluation
from flows.ledger import (
    LEDGER,
    Batch,
    LedgerError,
    load_ledger,
    mark_handed_over,
    pending_labelled,
    plan_checks,
    record_check,
    save_ledger,
    scan_inbox,
)
from flows.monitor_report import (
    evaluation_note,
    listed,
    render_batch,
    render_monitor_summary,
    slug,
    summary_line,
    verdict_text,
)
from flows.report import fmt
from flows.runlog import run_logger
from skinlesion.model.bundle_json import BUNDLE_JSON, choose_bundle, is_bundle
from skinlesion.params.load import load_params

__all__ = [
    "EVENT",
    "BatchCommandFailed",
    "DriftCheckFailed",
    "EvaluationFailed",
    "MonitorFailed",
    "MonitorRun",
    "bundle_to_check",
    "check_batch",
    "check_one",
    "drift_event",
    "evaluate_batch",
    "main",
    "monitor",
    "publish",
]

EVENT = "skinlesion.drift.detected"
RESOURCE_PREFIX = "skinlesion.batch."
SUMMARY_KEY = "monitor-summary"
# Under drift.monitor_state: batches/<batch>/drift.json and batches/<batch>/report/index.html.
# Not under reports/drift: that folder is the `drift` stage's DVC output, which `dvc repro drift`
# replaces as a whole (and a promotion commits reports/ to git; each report is ~5 MB of HTML).
BATCHES = "batches"


class MonitorFailed(RuntimeError):
    """The monitor could not run, or a batch check failed (the summary artifact says which)."""


class BatchCommandFailed(RuntimeError):
    """A command run on one batch exited non-zero; ``error`` is the line it printed."""

    what = "command"

    def __init__(self, batch: str, returncode: int, tail: Sequence[str]) -> None:
        errors = [ln for ln in tail if ln.startswith("error: ")]
        # `error: ...` is the command's one-line verdict on a bad batch (missing/empty folder, no
        # readable image, a bundle without a drift reference); anything else is a crash.
        self.expected = returncode == 1 and bool(errors)
        last = (errors or [ln for ln in tail if ln.strip()] or [f"exit {returncode}"])[-1]
        self.error = last.removeprefix("error: ")[:500]
        self.batch = batch
        self.returncode = returncode
        self.tail = "\n".join(tail)
        super().__init__(f"{self.what} of {batch!r} failed (exit {returncode}): {self.error}")


class DriftCheckFailed(BatchCommandFailed):
    """``stages.drift`` exited non-zero for a batch."""

    what = "drift check"


class EvaluationFailed(BatchCommandFailed):
    """``serve.evaluate`` exited non-zero for a labelled batch (or wrote no usable result)."""

    what = "external validation"


# --------------------------------------------------------------------------- the flow


@flow(
    name="monitor",
    description="Check new image batches in the inbox for drift; on drift emit skinlesion.drift.detected.",
)
def monitor(
    inbox: str | None = None,
    trigger_retrain: bool | None = None,
    bundle: str | None = None,
) -> dict[str, Any]:
    """Check every new or changed batch (sub-folder) of the inbox for drift, once.

    Args:
        inbox: folder whose sub-folders are the batches (default: ``drift.inbox``; relative
            paths are relative to the repository root).
        trigger_retrain: whether a drift event may start the retrain deployment (default:
            ``drift.trigger_retrain``). False still emits the event, labelled
            ``skinlesion.retrain: "false"``, which the retrain trigger does not match.
        bundle: the model bundle to check against (default: ``models/production`` when a
            promotion made it, else ``models/ensemble``).

    Returns ``{"checked": [...], "drifted": [...], "failed": [...], "skipped": [...], ...}``
    (batch names); ends Failed, after publishing every artifact, when a batch check failed.
    """
    logger = get_run_logger()
    layout = Layout(Path.cwd().resolve())
    root = layout.root
    if not (root / "dvc.yaml").is_file():
        raise MonitorFailed(f"no dvc.yaml in {root}: run the flow from the repository root")
    params = load_params(layout.path(layout.params)).drift
    inbox_dir = _resolve(root, inbox or params.inbox)
    if inbox is not None and not inbox_dir.is_dir():
        # Asked for by name: a typo must fail, not pass as "0 checked". The default inbox
        # (drift.inbox) may not exist yet on a fresh clone: nothing to check, said below.
        raise MonitorFailed(f"inbox {inbox_dir}: folder not found (the inbox parameter: {inbox})")
    state = _resolve(root, params.monitor_state)
    retrain_on = params.trigger_retrain if trigger_retrain is None else bool(trigger_retrain)
    workspace = str(_resolve(root, params.workspace)) if params.workspace else None
    run_name = flow_run.get_name() or "local"

    ledger_path = state / LEDGER
    try:
        ledger = load_ledger(ledger_path)
    except LedgerError as e:
        raise MonitorFailed(str(e)) from None
    todo, seen = plan_checks(scan_inbox(inbox_dir), ledger)
    summary: dict[str, Any] = {
        "flow_run": run_name,
        "inbox": str(inbox_dir),
        "inbox_exists": inbox_dir.is_dir(),
        "bundle": None,
        "trigger_retrain": retrain_on,
        "checked": [],
        "drifted": [],
        "failed": [],
        "skipped": [b.name for b in seen],
        "events": [],
    }
    if not summary["inbox_exists"]:
        logger.warning("inbox %s not found: nothing to check", inbox_dir)
    logger.info(
        "inbox %s: %d batch(es) to check (%s), %d already seen",
        inbox_dir, len(todo), ", ".join(f"{b.name} ({why})" for b, why in todo) or "none", len(seen),
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    failures: list[DriftCheckFailed] = []
    if todo:
        run = MonitorRun(
            root=root,
            params=layout.path(layout.params),
            bundle=bundle_to_check(layout, bundle),
            state=state,
            workspace=workspace,
            retrain_on=retrain_on,
            ledger=ledger,
            ledger_path=ledger_path,
            name=run_name,
            summary=summary,
            project=params.project,
        )
        summary["bundle"] = str(run.bundle)
        logger.info("bundle: %s", run.bundle)
        for batch, why in todo:
            try:
                rows.append(check_one(run, batch, why))
            except DriftCheckFailed as e:
                failures.append(e)
                rows.append((f"`{batch.name}`", f"FAILED: {e.error[:120]}", "—", "—", "—", "—"))

    publish(SUMMARY_KEY, render_monitor_summary(summary, rows), summary_line(summary))
    logger.info("monitor: %s", summary_line(summary))
    if failures:
        detail = "; ".join(f"{f.batch}: {f.error}" for f in failures)
        raise MonitorFailed(f"{len(failures)} of {len(todo)} batch check(s) failed: {detail}"[:1000])
    return summary


@dataclass
class MonitorRun:
    """What every batch check of one monitor run shares."""

    root: Path
    params: Path
    bundle: Path
    state: Path
    workspace: str | None
    retrain_on: bool
    ledger: dict[str, Any]
    ledger_path: Path
    name: str
    summary: dict[str, Any]
    project: str = ""  # the Evidently project of the drift checks (drift.project)


def check_one(run: MonitorRun, batch: Batch, why: str) -> tuple[str, ...]:
    """Check one batch, publish it, emit its drift event, record it; its summary-table row.
    Raises :class:`DriftCheckFailed` (after publishing and, for a bad batch, recording it)."""
    out_dir = run.state / BATCHES / batch.name
    metrics_path, report_dir = out_dir / "drift.json", out_dir / "report"
    report = report_dir / "index.html"
    key = f"drift-{slug(batch.name)}"
    try:
        metrics = check_batch(
            str(run.root), batch.name, str(batch.path), str(run.bundle), str(report_dir),
            str(metrics_path), run.workspace, params=str(run.params),
        )  # fmt: skip
    except DriftCheckFailed as e:
        run.summary["failed"].append(batch.name)
        run_logger(__name__).error("%s: %s", batch.name, e.error)
        if e.expected:  # a bad batch: not checked again until its files change
            record_check(run.ledger, batch, at=_now(), flow_run_name=run.name, error=e.error)
            save_ledger(run.ledger_path, run.ledger)
        publish(key, render_batch(batch, why, failure=e), f"drift check {batch.name}: FAILED")
        raise

    run.summary["checked"].append(batch.name)
    entry = record_check(
        run.ledger, batch, at=_now(), flow_run_name=run.name, metrics=metrics,
        metrics_path=metrics_path, report=report,
    )  # fmt: skip
    evaluation, evaluation_error = None, None
    if metrics.get("labelled"):
        evaluation, evaluation_error = _evaluate(run, batch, out_dir / EVALUATION_FILE)
        entry["evaluation"] = str(out_dir / EVALUATION_FILE) if evaluation is not None else None
        entry["evaluation_error"] = evaluation_error
    drift = bool(metrics.get("drift_detected"))
    note, event_cell = None, "—"
    if drift:
        run.summary["drifted"].append(batch.name)
        note, event_cell = _emit_drift(
            run.ledger, batch, metrics, run.retrain_on, report, metrics_path, run.summary
        )
    save_ledger(run.ledger_path, run.ledger)
    publish(
        key,
        render_batch(
            batch, why, metrics=metrics, report=report, retrain_note=note, evaluation=evaluation,
            evaluation_error=evaluation_error,
        ),
        f"drift check {batch.name}: {verdict_text(metrics)}",
    )  # fmt: skip
    labelled = fmt(bool(metrics.get("labelled")))
    if evaluation is not None or evaluation_error is not None:
        labelled += f"; {evaluation_note(evaluation, evaluation_error)}"
    return (
        f"`{batch.name}`", verdict_text(metrics), fmt(metrics.get("drift_share")),
        fmt(metrics.get("embedding_drift_score")), labelled, event_cell,
    )  # fmt: skip


def _evaluate(run: MonitorRun, batch: Batch, out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Score a labelled batch with ``serve.evaluate`` (and record it in the Evidently workspace).
    Never raises: a failure is logged as a warning and returned as the error line."""
    logger = run_logger(__name__)
    try:
        evaluation = evaluate_batch(str(run.root), batch.name, str(batch.path), str(run.bundle), str(out))
    except Exception as e:  # the drift check stands whatever happens here
        error = e.error if isinstance(e, EvaluationFailed) else f"{type(e).__name__}: {e}"
        logger.warning("%s: external validation failed, the drift check stands: %s", batch.name, error)
        return None, error
    logger.info("%s: external validation: %s", batch.name, evaluation_note(evaluation))
    if run.workspace and run.project:
        try:
            project_id = add_evaluation_to_workspace(
                evaluation, Path(run.workspace), evaluation_project(run.project), batch.name
            )
            logger.info("%s: external validation added to the Evidently workspace (project %s)",
                        batch.name, project_id)  # fmt: skip
        except Exception as e:  # the time series misses one point; the artifact has the numbers
            logger.warning("%s: could not add the external validation to the Evidently workspace %s: %s",
                           batch.name, run.workspace, e)  # fmt: skip
    return evaluation, None


def _emit_drift(
    ledger: dict[str, Any],
    batch: Batch,
    metrics: Mapping[str, Any],
    retrain_on: bool,
    report: Path,
    metrics_path: Path,
    summary: dict[str, Any],
) -> tuple[str, str]:
    """Emit the drift event; hand the pending labelled batches over when it may start a retrain.
    Returns the artifact's retrain note and the summary table's event cell."""
    logger = run_logger(__name__)
    extra = pending_labelled(ledger)
    resource, payload = drift_event(
        batch, metrics, retrain=retrain_on, extra_sources=extra, report=report, metrics_path=metrics_path
    )
    event = emit_event(EVENT, resource=resource, payload=payload)
    if event is None:  # Prefect logged why; the batches stay pending for the next drift event
        logger.error("%s: could not emit %s (no Prefect API?): no retrain starts", batch.name, EVENT)
        return "the drift event could not be emitted (see the run log)", "not emitted"
    summary["events"].append(str(event.id))
    if not retrain_on:
        logger.info("%s: emitted %s (retrain trigger off)", batch.name, EVENT)
        return f"trigger off: `{EVENT}` emitted with `skinlesion.retrain: false`", "emitted (trigger off)"
    mark_handed_over(ledger, extra, at=_now(), event_id=str(event.id))
    logger.info(
        "%s: emitted %s; labelled batches handed to the retrain: %s", batch.name, EVENT, extra or "none"
    )
    return (
        f"`{EVENT}` emitted: the trigger starts `retrain/on-demand` with extra_sources {listed(extra)}",
        "emitted",
    )


EVENT_METRICS = (
    "drift_detected",
    "dataset_drift",
    "drift_share",
    "n_drifted_features",
    "drifted_features",
    "feature_alarm",
    "alarm_features",
    "embedding_drift",
    "embedding_drift_score",
    "prediction_class_shift",
    "n_images",
    "n_unreadable",
    "labelled",
    "n_labelled",
)


def drift_event(
    batch: Batch,
    metrics: Mapping[str, Any],
    *,
    retrain: bool,
    extra_sources: Sequence[str],
    report: Path,
    metrics_path: Path,
) -> tuple[dict[str, str], dict[str, Any]]:
    """The resource (labels are strings, what the trigger matches on) and the payload of a
    ``skinlesion.drift.detected`` event. ``extra_sources`` travels as a JSON string: the retrain
    trigger's template passes it unchanged to the flow's ``extra_sources`` parameter."""
    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{batch.name}",
        "prefect.resource.name": batch.name,
        "skinlesion.retrain": "true" if retrain else "false",
        "skinlesion.labelled": "true" if metrics.get("labelled") else "false",
    }
    payload = {
        "batch": batch.name,
        "path": str(batch.path),
        "fingerprint": batch.fingerprint,
        **{k: metrics.get(k) for k in EVENT_METRICS},
        "report": str(report),
        "metrics": str(metrics_path),
        "extra_sources": json.dumps(list(extra_sources)),
    }
    return resource, payload


def bundle_to_check(layout: Layout, bundle: str | None) -> Path:
    """``bundle`` if given; else production when a promotion made one; else the last candidate
    (:func:`skinlesion.model.bundle_json.choose_bundle`)."""
    if bundle:
        chosen = _resolve(layout.root, bundle)
        if not is_bundle(chosen):
            raise MonitorFailed(
                f"bundle: {chosen}: no {BUNDLE_JSON} (a folder made by `dvc repro calibrate`)"
            )
        return chosen
    chosen = choose_bundle(layout.path(layout.production), layout.path(layout.bundle))
    if is_bundle(chosen):
        return chosen
    raise MonitorFailed(
        f"no model bundle in {layout.production} or {layout.bundle}: build one first "
        "(prefect deployment run 'retrain/on-demand', or dvc repro calibrate)"
    )


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- tasks


@task(name="drift-check", task_run_name="drift check {name}", cache_policy=NONE)
def check_batch(
    root: str,
    name: str,
    images: str,
    bundle: str,
    report_dir: str,
    metrics_path: str,
    workspace: str | None,
    params: str = "params.yaml",
) -> dict[str, Any]:
    """``python -m stages.drift`` on one batch, its output lines in the run log; its metrics.

    Not retried: a bad batch fails the same way again. Raises :class:`DriftCheckFailed`.
    """
    logger = run_logger(__name__)
    metrics = Path(metrics_path)
    metrics.unlink(missing_ok=True)  # a failed re-check must not leave the last one's verdict
    argv = [
        sys.executable, "-m", "stages.drift", "--params", params, "--bundle", bundle, "--images", images,
        "--report", report_dir, "--metrics", metrics_path, "--name", name,
        *(["--workspace", workspace] if workspace else ["--no-workspace"]),
    ]  # fmt: skip
    logger.info("python -m stages.drift --images %s --bundle %s", images, bundle)
    returncode, tail = stream_command(argv, Path(root), on_line=logger.info, env=subprocess_env())
    if returncode != 0:
        raise DriftCheckFailed(name, returncode, tail)
    return json.loads(metrics.read_text(encoding="utf-8"))


@task(name="external-validation", task_run_name="evaluate {name}", cache_policy=NONE)
def evaluate_batch(root: str, name: str, images: str, bundle: str, out_path: str) -> dict[str, Any]:
    """``python -m serve.evaluate`` on one labelled batch, its output lines in the run log; its
    result (:func:`read_evaluation`). Not retried. Raises :class:`EvaluationFailed`.

    Exit 1 with the result written means rows were left out (named in it, and in the artifact):
    the others were scored, so that is a result, not a failure.
    """
    logger = run_logger(__name__)
    out = Path(out_path)
    out.unlink(missing_ok=True)  # a failed re-check must not leave the last one's numbers
    argv = [
        sys.executable, "-m", "serve.evaluate", images, "--bundle", bundle, "--out", out_path,
        "--no-progress",
    ]  # fmt: skip
    logger.info("python -m serve.evaluate %s --bundle %s", images, bundle)
    returncode, tail = stream_command(argv, Path(root), on_line=logger.info, env=subprocess_env())
    if returncode != 0 and not (returncode == 1 and out.is_file()):
        raise EvaluationFailed(name, returncode, tail)
    try:
        return read_evaluation(out)
    except ValueError as e:
        raise EvaluationFailed(name, returncode or 1, [*tail, f"error: {e}"]) from None


@task(name="publish", task_run_name="publish {key}", cache_policy=NONE)
def publish(key: str, markdown: str, description: str) -> None:
    """One markdown artifact; an artifact error is logged, never the run's outcome."""
    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:
        run_logger(__name__).error("could not publish artifact %s: %s", key, e)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor",
        description=(
            "Run the monitor flow once, here, with no Prefect server (Prefect's ephemeral API): check "
            "every new or changed batch (sub-folder) of the inbox for drift against the model bundle, "
            "publish an artifact per batch, and remember what was checked. With no PREFECT_API_URL a "
            "drift event starts no retrain (no server, no trigger) and labelled batches stay pending "
            "for the next drift event. For the daily deployment see prefect.yaml "
            "(prefect deployment run 'monitor/daily')."
        ),
    )
    parser.add_argument("--inbox", help="folder of batches (default: params' drift.inbox)")
    parser.add_argument("--bundle", help="model bundle (default: models/production, else models/ensemble)")
    parser.add_argument(
        "--no-trigger",
        action="store_true",
        help="label drift events so the retrain trigger ignores them (drift.trigger_retrain: false)",
    )
    args = parser.parse_args(argv)
    if args.inbox is not None and not Path(args.inbox).expanduser().is_dir():
        # Before Prefect starts: a mistyped folder is one line, exit 1, never "0 checked".
        print(
            f"error: --inbox {args.inbox}: folder not found (a folder whose sub-folders are the batches)",
            file=sys.stderr,
        )
        return 1
    trigger: bool | None = False if args.no_trigger else None
    if trigger is None and not get_current_settings().api.url:
        # Prefect's ephemeral API runs no trigger: an event marked for retraining would hand the
        # labelled batches over to a retrain that never starts. They stay pending instead.
        print("no Prefect server configured (PREFECT_API_URL): drift events will not start a retrain")
        trigger = False
    try:
        result = monitor(inbox=args.inbox, bundle=args.bundle, trigger_retrain=trigger)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: monitor failed: {first}", file=sys.stderr)
        return 1
    print(
        f"monitor: {summary_line(result)}"
        + (f"; drift in {', '.join(result['drifted'])}" if result["drifted"] else "")
        + (
            ""
            if result["inbox_exists"]
            else f"; inbox {result['inbox']} not found (drift.inbox): nothing to check"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
