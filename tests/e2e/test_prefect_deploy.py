"""The operator's path for real: a Prefect server on 127.0.0.1 (its own PREFECT_HOME and SQLite
database), work pools, ``prefect deploy --all`` from prefect.yaml, a process worker, and
``prefect deployment run 'retrain/on-demand'`` over the whole DVC pipeline on a tiny synthetic
set, in a fresh copy of the repository. Then a second run whose candidate cannot pass the gate
must leave production byte for byte as it was. Server and worker are stopped at the end, also
when the test fails."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from flows.dvcops import set_params
from tests.conftest import run_cmd
from tests.e2e.conftest import (
    PREFECT,
    TINY,
    Background,
    latest_artifact,
    prefect_cli,
    read_deployment,
    run_deployment,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_deploy_run_promote_then_reject_through_a_real_server(repo_copy, prefect_server, tmp_path):
    env, _server = prefect_server
    repo = repo_copy
    timings: dict[str, float] = {}
    set_params(repo / "params.yaml", TINY)
    # The operator's configuration, committed: the gate reads its thresholds from git HEAD.
    run_cmd(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny", "params.yaml"], repo
    )

    t0 = time.monotonic()
    for pool in ("cpu-pool", "gpu-pool"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env, repo)
    deployed = prefect_cli(["deploy", "--all"], env, repo)
    for name in ("retrain/weekly", "retrain/on-demand", "retrain/on-demand-gpu"):
        assert f"Deployment '{name}' successfully created" in deployed.replace("\n", " ").replace("  ", " ")
    weekly = json.loads(
        prefect_cli(["deployment", "inspect", "retrain/weekly", "--output", "json"], env, repo)
    )
    assert [s["schedule"] for s in weekly["schedules"]] == [
        {"cron": "0 3 * * 1", "timezone": "UTC", "day_or": True}
    ]
    # the pull step: runs start in this checkout, wherever the worker is
    assert weekly["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}
    ]
    on_demand = read_deployment("retrain/on-demand", env)  # it owns an automation: see deployment
    assert on_demand["schedules"] == [] and on_demand["work_pool_name"] == "cpu-pool"
    timings["deploy"] = time.monotonic() - t0

    # The worker runs somewhere else: the deployment's pull step must take the run to the repo.
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    worker = Background(
        "worker", [PREFECT, "worker", "start", "--pool", "cpu-pool"], cwd=elsewhere, env=env, logs=tmp_path
    )
    try:
        t0 = time.monotonic()
        first = run_deployment(env, repo, worker)
        timings["first run (whole pipeline)"] = time.monotonic() - t0
        assert first["state_type"] == "COMPLETED", f"{first['state']}\n{worker.tail(120)}"
        assert first["state_name"] == "Completed", first["state"]["message"]

        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        assert {"download", "validate", "train@custom_cnn", "evaluate@mobilenetv2", "calibrate"} <= set(
            lock["stages"]
        )
        prod = repo / "models" / "production"
        record = json.loads((prod / "production.json").read_text())
        assert record["data_version"] == lock["stages"]["download"]["outs"][0]["md5"]
        outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
        assert record["data_versions"] == {p: outs[p] for p in ("data/raw", "data/split", "data/validated")}
        assert record["dvc_lock"]["models/ensemble"] == next(
            o["md5"] for o in lock["stages"]["calibrate"]["outs"] if o["path"] == "models/ensemble"
        )
        assert (prod / "bundle.json").read_bytes() == (
            repo / "models" / "ensemble" / "bundle.json"
        ).read_bytes()
        tags = run_cmd(["git", "tag"], repo).stdout.split()
        assert tags == [record["git_tag"]]
        calibration = json.loads((repo / "metrics" / "calibration.json").read_text())
        assert record["metrics"]["metrics/calibration.json"]["threshold"] == calibration["threshold"]

        summary = latest_artifact("retrain-summary", env, repo)
        md = summary["data"]
        assert summary["flow_run_id"] == first["id"]
        assert "**Outcome:** promoted: no production model yet; test_malignant_recall" in md
        assert re.search(r"\| \*\*ensemble\*\* \| \d\.\d{3}", md), md  # real, rounded numbers
        assert re.search(r"\| custom_cnn \| \d\.\d{3}", md), md
        assert f"`{record['data_version']}`" in md
        assert "| `train@mobilenetv2` | ran |" in md
        listed = prefect_cli(["artifact", "ls"], env, repo)
        assert "retrain-summary" in listed and "retrain-metri" in listed

        # Second run: a rebuilt candidate (new recall target: calibrate reruns) facing a gate the
        # operator raised for this run (gate_overrides: an AUC gain of 1.0 required), which it
        # cannot pass. Not promoted; production untouched.
        before = _snapshot(prod)
        lock_before = (repo / "dvc.lock").read_text()
        sabotage = {
            "params_overrides": {"calibrate.target_recall": 0.97},
            "gate_overrides": {"promote.max_auc_drop": -1.0},
        }
        t0 = time.monotonic()
        second = run_deployment(env, repo, worker, "--params", json.dumps(sabotage))
        timings["second run (calibrate only)"] = time.monotonic() - t0
        assert second["state_type"] == "COMPLETED", f"{second['state']}\n{worker.tail(120)}"
        assert second["state_name"] == "Not promoted"
        # decided on the paired CI: production scored on the candidate's test images (the same
        # data version: none left out)
        assert "gain required 1.000: CI lower bound" in second["state"]["message"]
        assert "on the same " in second["state"]["message"]
        assert (repo / "dvc.lock").read_text() != lock_before
        assert _snapshot(prod) == before
        assert run_cmd(["git", "tag"], repo).stdout.split() == tags
        md2 = latest_artifact("retrain-summary", env, repo)["data"]
        assert "**Outcome:** not promoted:" in md2 and "| macro_auc | FAIL |" in md2
        assert "**GATE OVERRIDDEN by the operator (gate_overrides), this run only:** " in md2
        assert "## Data version: same as production" in md2
        assert "## Paired comparison with production" in md2 and "test images less **0** (0 lesions)" in md2
        diff = latest_artifact("retrain-metrics-diff", env, repo)
        rows = json.loads(diff["data"])
        recall = next(r for r in rows if r["metric"] == "target_recall")
        assert (recall["production"], recall["candidate"]) == (0.95, 0.97)
    finally:
        t0 = time.monotonic()
        worker.stop()
        timings["stop worker"] = time.monotonic() - t0
        print("e2e timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
