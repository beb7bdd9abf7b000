"""What the e2e tests share: a real Prefect server on 127.0.0.1 (its own PREFECT_HOME and SQLite
database), long-running commands in their own process group, the ``prefect`` CLI, and the TINY
pipeline parameters."""

from __future__ import annotations

import contextlib
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

from tests.conftest import run_cmd

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
    # changes with any default. These tests are about the server/deploy/worker/promotion plumbing
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
        wait_healthy(
            f"http://127.0.0.1:{port}/api/health", server, 120, "prefect server did not become healthy"
        )
        yield env, server
    finally:
        server.stop()


def wait_healthy(url: str, proc: Background, timeout: float, failure: str) -> None:
    """Poll ``url`` until it answers 200; fail with ``failure`` and the log if ``proc`` dies or
    ``timeout`` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{failure}\n" + proc.tail())
        time.sleep(0.5)


def _prefect(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    return run_cmd([PREFECT, *args], cwd, env=env, timeout=timeout).stdout


def _inspect(run_id: str, env, cwd) -> dict:
    return json.loads(_prefect(["flow-run", "inspect", run_id, "--output", "json"], env, cwd))


def _wait_run(run_id: str, env, cwd: Path, worker: Background, timeout: float = 900) -> dict:
    """Poll a flow run until it reaches a terminal state; its ``flow-run inspect`` JSON."""
    deadline = time.monotonic() + timeout
    while True:
        info = _inspect(run_id, env, cwd)
        if info["state_type"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run_id} still {info['state_type']} after {timeout:g} s\n{worker.tail()}")
        time.sleep(5)


def _run_deployment(
    env,
    cwd: Path,
    worker: Background,
    *extra: str,
    deployment: str = "retrain/on-demand",
    timeout: float = 900,
) -> dict:
    """``prefect deployment run DEPLOYMENT``, then wait for the run's end state."""
    out = _prefect(["deployment", "run", deployment, *extra], env, cwd)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    return _wait_run(run_id, env, cwd, worker, timeout)


def _latest_artifact(key: str, env, cwd) -> dict:
    return json.loads(_prefect(["artifact", "inspect", key, "--limit", "1", "--output", "json"], env, cwd))[0]


def _deployment(name: str, env: dict[str, str]) -> dict:
    """A deployment as the API returns it. (``prefect deployment inspect NAME --output json``
    crashes in Prefect 3.8.8 once the deployment owns an automation, such as a trigger:
    ``TypeError: Type is not JSON serializable: set``.)"""
    import httpx

    flow_name, deployment_name = name.split("/", 1)
    response = httpx.get(
        f"{env['PREFECT_API_URL']}/deployments/name/{flow_name}/{deployment_name}", timeout=30
    )
    response.raise_for_status()
    return response.json()
