"""The operator's path for real: a Prefect server on 127.0.0.1 (its own PREFECT_HOME and SQLite
database), work pools, ``prefect deploy --all`` from prefect.yaml, a process worker, and
``prefect deployment run 'retrain/on-demand'`` over the whole DVC pipeline on a tiny synthetic
set, in a fresh copy of the repository. Then a second run whose candidate cannot pass the gate
must leave production byte for byte as it was. Server and worker are stopped at the end, also
when the test fails."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.dvcops import set_params
from tests.conftest import run_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# A pipeline that runs in a few minutes on 2 CPUs: few small images, tiny inputs, one epoch, two
# cheap backbones trained from scratch (no ImageNet download offline), few bootstrap replicates.
TINY = {
    "download.synthetic.n_images": 420,
    "download.synthetic.width": 64,
    "download.synthetic.height": 48,
    "validate.min_side": 16,
    "prepare.image_size": 32,
    "train.backbones": ["custom_cnn", "mobilenetv2"],
    "ensemble.members": ["custom_cnn", "mobilenetv2"],
    "train.weights": "none",
    "train.common.epochs": 1,
    "train.common.batch_size": 64,
    "evaluate.bootstrap_samples": 20,
    "calibrate.bootstrap_samples": 20,
    # A 1-epoch model is near random: whether it clears a 95% test recall is a coin flip that
    # changes with any default. This test is about the server/deploy/worker/promotion plumbing
    # (the gate's decisions are unit-tested), so the first candidate's recall bar is 0.
    "promote.min_test_recall": 0.0,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """A long-running command in its own process group, with its output in a log file."""

    def __init__(self, name: str, args: list[str], *, cwd: Path, env: dict[str, str], logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"--- {self.name} log (last {n} lines)\n" + "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGTERM the whole group (the worker's flow-run process included), SIGKILL if it lingers."""
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers left in the group
        self._fh.close()


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free port with its own home and SQLite database."""
    port = _free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "DO_NOT_TRACK": "1",
    }
    server = Background(
        "server",
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        logs=tmp_path,
    )
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prefect server did not become healthy\n" + server.tail())
            time.sleep(0.5)
        yield env, server
    finally:
        server.stop()


def _prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    return run_cmd([PREFECT, *args], cwd, env=env, timeout=timeout).stdout


def _inspect(run_id: str, env, cwd) -> dict:
    return json.loads(_prefect(["flow-run", "inspect", run_id, "--output", "json"], env, cwd))


def _run_deployment(env, cwd: Path, worker: Background, *extra: str, timeout: float = 900) -> dict:
    out = _prefect(["deployment", "run", "retrain/on-demand", *extra], env, cwd)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    deadline = time.monotonic() + timeout
    while True:
        info = _inspect(run_id, env, cwd)
        if info["state_type"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run_id} still {info['state_type']} after {timeout:g} s\n{worker.tail()}")
        time.sleep(5)


def _latest_artifact(key: str, env, cwd) -> dict:
    return json.loads(_prefect(["artifact", "inspect", key, "--limit", "1", "--output", "json"], env, cwd))[0]


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

    t0 = time.monotonic()
    for pool in ("cpu-pool", "gpu-pool"):
        _prefect(["work-pool", "create", pool, "--type", "process"], env, repo)
    deployed = _prefect(["deploy", "--all"], env, repo)
    for name in ("retrain/weekly", "retrain/on-demand", "retrain/on-demand-gpu"):
        assert f"Deployment '{name}' successfully created" in deployed.replace("\n", " ").replace("  ", " ")
    weekly = json.loads(_prefect(["deployment", "inspect", "retrain/weekly", "--output", "json"], env, repo))
    assert [s["schedule"] for s in weekly["schedules"]] == [
        {"cron": "0 3 * * 1", "timezone": "UTC", "day_or": True}
    ]
    # the pull step: runs start in this checkout, wherever the worker is
    assert weekly["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}
    ]
    on_demand = json.loads(
        _prefect(["deployment", "inspect", "retrain/on-demand", "--output", "json"], env, repo)
    )
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
        first = _run_deployment(env, repo, worker)
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

        summary = _latest_artifact("retrain-summary", env, repo)
        md = summary["data"]
        assert summary["flow_run_id"] == first["id"]
        assert "**Outcome:** promoted: no production model yet; test_malignant_recall" in md
        assert re.search(r"\| \*\*ensemble\*\* \| \d\.\d{3}", md), md  # real, rounded numbers
        assert re.search(r"\| custom_cnn \| \d\.\d{3}", md), md
        assert f"`{record['data_version']}`" in md
        assert "| `train@mobilenetv2` | ran |" in md
        listed = _prefect(["artifact", "ls"], env, repo)
        assert "retrain-summary" in listed and "retrain-metri" in listed

        # Second run: a rebuilt candidate (new recall target: calibrate reruns) facing a gate it
        # cannot pass (an AUC gain of 1.0 required). Not promoted; production untouched.
        before = _snapshot(prod)
        lock_before = (repo / "dvc.lock").read_text()
        sabotage = {"params_overrides": {"calibrate.target_recall": 0.97, "promote.max_auc_drop": -1.0}}
        t0 = time.monotonic()
        second = _run_deployment(env, repo, worker, "--params", json.dumps(sabotage))
        timings["second run (calibrate only)"] = time.monotonic() - t0
        assert second["state_type"] == "COMPLETED", f"{second['state']}\n{worker.tail(120)}"
        assert second["state_name"] == "Not promoted"
        assert "gain required 1.000): too low" in second["state"]["message"]
        assert (repo / "dvc.lock").read_text() != lock_before
        assert _snapshot(prod) == before
        assert run_cmd(["git", "tag"], repo).stdout.split() == tags
        md2 = _latest_artifact("retrain-summary", env, repo)["data"]
        assert "**Outcome:** not promoted:" in md2 and "| macro_auc | FAIL |" in md2
        diff = _latest_artifact("retrain-metrics-diff", env, repo)
        rows = json.loads(diff["data"])
        recall = next(r for r in rows if r["metric"] == "target_recall")
        assert (recall["production"], recall["candidate"]) == (0.95, 0.97)
    finally:
        t0 = time.monotonic()
        worker.stop()
        timings["stop worker"] = time.monotonic() - t0
        print("e2e timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
