"""Drift reaches retraining through Prefect, for real: a Prefect server on 127.0.0.1,
``prefect deploy --all`` (``monitor/daily`` and the retrain deployment's trigger), a process
worker, a first ``retrain/on-demand`` run so a bundle exists, then batches dropped in the inbox
of a fresh repository copy (TINY pipeline):

* a clean, unlabelled batch: ``monitor/daily`` checks it, publishes its artifact, and no retrain
  starts;
* a drifted, labelled batch (another device profile): ``monitor/daily`` emits
  ``skinlesion.drift.detected``, the trigger (the automation, not this test) starts exactly one
  ``retrain`` run whose ``extra_sources`` carries the batch; the run completes with the batch's
  rows in ``data/raw`` and publishes its metrics diff;
* a third ``monitor/daily`` run finds nothing new.

Server and worker are stopped at the end, also when the test fails."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows.dvcops import set_params
from flows.monitor import EVENT
from flows.monitor_report import slug
from tests.conftest import run_cmd
from tests.e2e.conftest import (
    PREFECT,
    TINY,
    Background,
    inspect_run,
    prefect_cli,
    read_deployment,
    run_deployment,
    wait_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INBOX = "data/inbox"
CLEAN = "clean-2026-11-01"
DRIFTED = "clinic-b-2026-11-02"
# How long "no retrain starts" is watched: the trigger fires within seconds of an event (the
# worker polls every 10 s), so a run it started would show up well within this.
QUIET_SECONDS = 45


def _api(env: dict[str, str], path: str, body: dict | None = None) -> object:
    response = httpx.post(f"{env['PREFECT_API_URL']}{path}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def _retrain_runs(env) -> dict[str, dict]:
    """Runs of ``retrain/on-demand`` (the scheduler adds future runs of ``retrain/weekly``)."""
    deployment = read_deployment("retrain/on-demand", env)["id"]
    runs = _api(env, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}}})
    return {r["id"]: r for r in runs}


def _new_retrain_runs(env, known: set[str], *, wait: float) -> dict[str, dict]:
    """Retrain runs that are not in ``known``, polled for up to ``wait`` seconds (returns as soon
    as one appears; then a few seconds more, so a second one would be seen too)."""
    deadline = time.monotonic() + wait
    while True:
        new = {i: r for i, r in _retrain_runs(env).items() if i not in known}
        if new:
            time.sleep(15)
            return {i: r for i, r in _retrain_runs(env).items() if i not in known}
        if time.monotonic() > deadline:
            return {}
        time.sleep(3)


def _drift_events(env, *, at_least: int, wait: float = 90) -> list[dict]:
    """The persisted ``skinlesion.drift.detected`` events, polled until there are ``at_least``
    (or ``wait`` seconds pass). The server stores events asynchronously: its event persister
    writes them in batches on a flush interval, so an event the flow emitted a moment ago can be
    missing from ``/events/filter`` for a few seconds (on a loaded 2-core CI machine, longer),
    although automations, which read the live stream, have already seen it."""
    deadline = time.monotonic() + wait
    while True:
        events = _api(env, "/events/filter", {"filter": {"event": {"name": [EVENT]}}})["events"]
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        time.sleep(2)


def _artifact(key: str, flow_run_id: str, env) -> dict:
    found = _api(
        env,
        "/artifacts/filter",
        {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}},
    )
    assert found, f"no artifact {key!r} from flow run {flow_run_id}"
    return found[0]


def _draw_batch(repo: Path, name: str, *, seed: int, n: int, profile: str | None = None) -> Path:
    """A HAM10000-layout batch drawn by the synthetic source at the TINY pipeline's image size."""
    out = repo / INBOX / name
    args = [
        "python", "-m", "skinlesion.sources.synthetic", "--out", str(out), "--n-images", str(n),
        "--seed", str(seed),
        "--width", str(TINY["download.synthetic.width"]), "--height", str(TINY["download.synthetic.height"]),
        *(["--profile", profile] if profile else []),
    ]  # fmt: skip
    run_cmd(args, repo)
    return out


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_drifted_batch_starts_one_retrain_through_the_trigger(repo_copy, prefect_server, tmp_path):
    env, _server = prefect_server
    repo = repo_copy
    timings: dict[str, float] = {}
    set_params(repo / "params.yaml", {**TINY, "drift.inbox": INBOX})
    # The retrain gate reads its thresholds from params.yaml at git HEAD: commit the TINY ones.
    run_cmd(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny", "params.yaml"],
            repo)  # fmt: skip

    # ---- deploy: monitor/daily on its cron, and the retrain trigger as an automation
    t0 = time.monotonic()
    for pool in ("cpu-pool", "gpu-pool"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env, repo)
    deployed = " ".join(prefect_cli(["deploy", "--all"], env, repo).split())
    for name in ("monitor/daily", "retrain/on-demand", "retrain/weekly"):
        assert f"Deployment '{name}' successfully created" in deployed, deployed
    daily = json.loads(prefect_cli(["deployment", "inspect", "monitor/daily", "--output", "json"], env, repo))
    assert [s["schedule"] for s in daily["schedules"]] == [
        {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    ]
    assert daily["entrypoint"] == "flows/monitor.py:monitor" and daily["work_pool_name"] == "cpu-pool"
    assert (daily.get("global_concurrency_limit") or {}).get("limit") == 1, daily
    on_demand = read_deployment("retrain/on-demand", env)  # it owns an automation: see deployment

    listed = prefect_cli(["automation", "ls"], env, repo)
    assert "retrain-on-drift" in listed, listed
    [automation] = [a for a in _api(env, "/automations/filter") if a["name"] == "retrain-on-drift"]
    inspected = prefect_cli(["automation", "inspect", "retrain-on-drift", "--output", "json"], env, repo)
    assert automation["id"] in inspected and "skinlesion.drift.detected" in inspected, inspected
    trigger, [action] = automation["trigger"], automation["actions"]
    assert automation["enabled"]
    owned = httpx.get(f"{env['PREFECT_API_URL']}/automations/related-to/prefect.deployment.{on_demand['id']}")
    assert [a["id"] for a in owned.json()] == [automation["id"]]  # the deployment's own trigger
    assert trigger["type"] == "event" and trigger["expect"] == [EVENT] and trigger["posture"] == "Reactive"
    assert trigger["match"] == {"prefect.resource.id": "skinlesion.batch.*", "skinlesion.retrain": "true"}
    assert (trigger["threshold"], trigger["within"]) == (1, 0)
    assert action["type"] == "run-deployment" and action["deployment_id"] == on_demand["id"]
    assert action["parameters"] == {"extra_sources": "{{ event.payload.extra_sources }}"}
    timings["deploy"] = time.monotonic() - t0

    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    worker = Background(
        "worker", [PREFECT, "worker", "start", "--pool", "cpu-pool"], cwd=elsewhere, env=env, logs=tmp_path
    )
    try:
        # ---- a bundle to check against
        t0 = time.monotonic()
        first = run_deployment(env, repo, worker)
        timings["first retrain (whole pipeline)"] = time.monotonic() - t0
        assert first["state_type"] == "COMPLETED", f"{first['state']}\n{worker.tail(120)}"
        assert (repo / "models" / "production" / "bundle.json").is_file()
        base_rows = _rows(repo / "data" / "raw" / "metadata.csv")
        known = set(_retrain_runs(env))
        assert known == {first["id"]}

        # ---- a clean batch: checked, published, no retrain. Unlabelled (its metadata removed):
        # the default profile draws ids the base set may share, and it is only monitored.
        clean = _draw_batch(repo, CLEAN, seed=1101, n=100)
        (clean / "metadata.csv").unlink()
        t0 = time.monotonic()
        m1 = run_deployment(env, repo, worker, deployment="monitor/daily", timeout=600)
        timings["monitor, clean batch"] = time.monotonic() - t0
        assert m1["state_type"] == "COMPLETED", f"{m1['state']}\n{worker.tail(120)}"
        art = _artifact(f"drift-{slug(CLEAN)}", m1["id"], env)
        assert art["data"].startswith(f"# Drift check `{CLEAN}`: no drift"), art["data"]
        t0 = time.monotonic()
        assert _new_retrain_runs(env, known, wait=QUIET_SECONDS) == {}
        timings["watch: no retrain after the clean batch"] = time.monotonic() - t0

        # ---- a drifted, labelled batch: one retrain through the trigger, with the batch's data
        drifted = _draw_batch(repo, DRIFTED, seed=1202, n=200, profile="clinic_b").resolve()
        batch_rows = _rows(drifted / "metadata.csv")
        t0 = time.monotonic()
        m2 = run_deployment(env, repo, worker, deployment="monitor/daily", timeout=600)
        timings["monitor, drifted batch"] = time.monotonic() - t0
        assert m2["state_type"] == "COMPLETED", f"{m2['state']}\n{worker.tail(120)}"
        art = _artifact(f"drift-{slug(DRIFTED)}", m2["id"], env)
        assert art["data"].startswith(f"# Drift check `{DRIFTED}`: DRIFT DETECTED"), art["data"]
        events = _drift_events(env, at_least=1)
        assert [e["resource"]["prefect.resource.id"] for e in events] == [f"skinlesion.batch.{DRIFTED}"]
        assert events[0]["resource"]["skinlesion.labelled"] == "true"
        assert events[0]["payload"]["path"] == str(drifted)

        t0 = time.monotonic()
        new = _new_retrain_runs(env, known, wait=120)
        timings["trigger -> retrain run created"] = time.monotonic() - t0
        assert len(new) == 1, f"expected one retrain run from the trigger, got {list(new)}\n{worker.tail(80)}"
        [run_id] = new
        triggered = inspect_run(run_id, env, repo)
        assert triggered["created_by"]["type"] == "AUTOMATION", triggered["created_by"]
        assert triggered["created_by"]["display_value"] == "retrain-on-drift"
        assert triggered["deployment_id"] == on_demand["id"]
        assert json.loads(triggered["parameters"]["extra_sources"]) == [str(drifted)]

        t0 = time.monotonic()
        done = wait_run(run_id, env, repo, worker, timeout=900)
        timings["triggered retrain"] = time.monotonic() - t0
        assert done["state_type"] == "COMPLETED", f"{done['state']}\n{worker.tail(120)}"
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["download"]["extra_sources"] == [str(drifted)]
        raw = _rows(repo / "data" / "raw" / "metadata.csv")
        assert len(raw) == len(base_rows) + len(batch_rows)
        assert {r["image_id"] for r in batch_rows} <= {r["image_id"] for r in raw}
        rows = json.loads(_artifact("retrain-metrics-diff", run_id, env)["data"])
        n_images = next(r for r in rows if r["file"] == "metrics/split.json" and r["metric"] == "n_images")
        assert n_images["candidate"] > n_images["production"], n_images  # production -> with the batch
        summary = _artifact("retrain-summary", run_id, env)["data"]
        assert "download.extra_sources" in summary

        ledger = json.loads((repo / "data" / "monitor" / "ledger.json").read_text())
        assert ledger["batches"][DRIFTED]["handed_over"] and not ledger["batches"][CLEAN]["labelled"]

        # ---- nothing new: nothing checked, no retrain
        known = set(_retrain_runs(env))
        t0 = time.monotonic()
        m3 = run_deployment(env, repo, worker, deployment="monitor/daily", timeout=300)
        timings["monitor, nothing new"] = time.monotonic() - t0
        assert m3["state_type"] == "COMPLETED", f"{m3['state']}\n{worker.tail(120)}"
        summary = _artifact("monitor-summary", m3["id"], env)["data"]
        assert "| checked | 0 |" in summary and "| already seen, skipped | 2 |" in summary, summary
        assert _new_retrain_runs(env, known, wait=20) == {}
        # a second event would have been persisted within the quiet watch above (and the flush
        # interval): still exactly one
        assert len(_drift_events(env, at_least=2, wait=10)) == 1
    finally:
        t0 = time.monotonic()
        worker.stop()
        timings["stop worker"] = time.monotonic() - t0
        print("e2e timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
