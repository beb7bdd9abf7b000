"""The team set-up for real: the Prefect server on PostgreSQL instead of SQLite, two workers on one
pool, and the retrain deployment's ``concurrency_limit: 1`` keeping two runs submitted together
from ever overlapping (they share one checkout, dvc.lock and models/production).

A throwaway PostgreSQL cluster on 127.0.0.1 (the ``postgres`` fixture: Debian's server, installed
with apt-get when missing and root) holds the server's database; the deployment comes from the
project's prefect.yaml (``prefect deploy --all``) in a copy of the toy pipeline
(tests/integration/toy_pipeline.py: real ``dvc``, stages of seconds), so the test is about the
server, the workers and the limit, in a few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import PREFECT, Background, prefect_cli, read_deployment, wait_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

TRAIN_SECONDS = 8  # per toy train stage; two per run: a run lasts well over the workers' poll


def _t(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _states(api: str, run_id: str) -> list[str]:
    got = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=30)
    got.raise_for_status()
    return [s["name"] for s in sorted(got.json(), key=lambda s: s["timestamp"])]


def test_two_runs_on_two_workers_serialize_through_the_deployment_limit_on_postgresql(
    toy_deployable, prefect_server_postgres, postgres, tmp_path
):
    env, server = prefect_server_postgres
    repo = toy_deployable
    api = env["PREFECT_API_URL"]
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    for pool in ("cpu-pool", "gpu-pool"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env, repo)
    prefect_cli(["deploy", "--all"], env, repo)
    deployment = read_deployment("retrain/on-demand", env)
    limit = deployment.get("global_concurrency_limit") or {}
    assert limit.get("limit") == 1, deployment
    timings["deploy"] = time.monotonic() - t0

    worker_env = {**env, "TOY_TRAIN_SECONDS": str(TRAIN_SECONDS), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    workers = [
        Background(
            f"worker-{i}",
            [PREFECT, "worker", "start", "--pool", "cpu-pool", "--name", f"worker-{i}"],
            cwd=tmp_path,
            env=worker_env,
            logs=tmp_path,
        )
        for i in (1, 2)
    ]
    try:
        # Two runs at once, each retraining both toy members (a train.common change).
        run_ids = []
        for batch_size in (8, 24):
            made = httpx.post(
                f"{api}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": {"params_overrides": {"train.common.batch_size": batch_size}}},
                timeout=30,
            )
            made.raise_for_status()
            run_ids.append(made.json()["id"])
        t0 = time.monotonic()
        ends = [wait_run(r, env, repo, workers[0], timeout=900) for r in run_ids]
        timings["two runs"] = time.monotonic() - t0
        tails = "\n".join(w.tail(80) for w in workers)
        for info in ends:
            assert info["state_type"] == "COMPLETED", f"{info['state']}\n{tails}"
            assert info["state_name"] == "Completed", info["state"]["message"]

        runs = [httpx.get(f"{api}/flow_runs/{r}", timeout=30).json() for r in run_ids]
        (a, b) = sorted(runs, key=lambda r: _t(r["start_time"]))
        assert _t(a["end_time"]) <= _t(b["start_time"]), (
            f"runs overlapped: {a['name']} {a['start_time']}..{a['end_time']}, "
            f"{b['name']} {b['start_time']}..{b['end_time']}"
        )
        # ... because the limit held the second back (not because a worker happened to be late)
        waited = _states(api, b["id"])
        assert "AwaitingConcurrencySlot" in waited, waited
        # both workers were up and polling the pool
        listed = httpx.post(f"{api}/work_pools/cpu-pool/workers/filter", json={}, timeout=30).json()
        assert {w["name"] for w in listed} >= {"worker-1", "worker-2"}, listed

        # The runs live in PostgreSQL, not in a SQLite file.
        ids = ", ".join(f"'{r}'" for r in run_ids)
        sql = f"select count(*) from flow_run where id in ({ids}) and state_type = 'COMPLETED'"
        rows = subprocess.run(
            [str(postgres["bindir"] / "psql"), "-h", "127.0.0.1", "-p", str(postgres["port"]), "-U",
             "prefect", "-d", "prefect", "-tAc", sql],
            env={"PGPASSWORD": postgres["password"], "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert int(rows.strip()) == 2
        assert not list(Path(env["PREFECT_HOME"]).glob("*.db")), "a SQLite database was created"
        record = json.loads((repo / "models" / "production" / "production.json").read_text())
        assert record["git_tag"].startswith("model-")
    finally:
        for w in workers:
            w.stop()
        print("postgres e2e timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def test_sqlite_stays_the_default():
    """Nothing in the project points Prefect at another database: a fresh profile gets SQLite."""
    code = (
        "from prefect.settings import get_current_settings as s\n"
        "print(s().server.database.connection_url.get_secret_value())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PREFECT_HOME": "/nonexistent-prefect-home"},
        capture_output=True, text=True, timeout=120, check=True, cwd=Path(__file__).parents[2],
    ).stdout.strip()  # fmt: skip
    assert out.startswith("sqlite+aiosqlite:///"), out
