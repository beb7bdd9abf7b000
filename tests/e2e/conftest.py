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


def free_port() -> int:
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


@contextlib.contextmanager
def _prefect_server(tmp_path: Path, database_url: str | None, timeout: float, failure: str):
    """``prefect server start`` on a free port with its own home; SQLite in that home unless
    ``database_url`` says otherwise. Yields (the env that reaches it, the server process)."""
    port = free_port()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _server_env(home, port, database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    server = Background(
        "server",
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        logs=tmp_path,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, timeout, failure)
        yield env, server
    finally:
        server.stop()


@pytest.fixture
def prefect_server(tmp_path):
    """``prefect server start`` on a free port with its own home and SQLite database."""
    with _prefect_server(tmp_path, None, 120, "prefect server did not become healthy") as served:
        yield served


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


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    return run_cmd([PREFECT, *args], cwd, env=env, timeout=timeout).stdout


def inspect_run(run_id: str, env, cwd) -> dict:
    return json.loads(prefect_cli(["flow-run", "inspect", run_id, "--output", "json"], env, cwd))


def wait_run(run_id: str, env, cwd: Path, worker: Background, timeout: float = 900) -> dict:
    """Poll a flow run until it reaches a terminal state; its ``flow-run inspect`` JSON."""
    deadline = time.monotonic() + timeout
    while True:
        info = inspect_run(run_id, env, cwd)
        if info["state_type"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {run_id} still {info['state_type']} after {timeout:g} s\n{worker.tail()}")
        time.sleep(5)


def run_deployment(
    env,
    cwd: Path,
    worker: Background,
    *extra: str,
    deployment: str = "retrain/on-demand",
    timeout: float = 900,
) -> dict:
    """``prefect deployment run DEPLOYMENT``, then wait for the run's end state."""
    out = prefect_cli(["deployment", "run", deployment, *extra], env, cwd)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    return wait_run(run_id, env, cwd, worker, timeout)


def latest_artifact(key: str, env, cwd) -> dict:
    return json.loads(
        prefect_cli(["artifact", "inspect", key, "--limit", "1", "--output", "json"], env, cwd)
    )[0]


def read_deployment(name: str, env: dict[str, str]) -> dict:
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


# --------------------------------------------------------------------------- team-grade operation
# Fixtures of the fault, PostgreSQL and load tests (tests/e2e/test_faults.py,
# test_postgres_server.py, test_load.py).


def _server_env(home: Path, port: int, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "DO_NOT_TRACK": "1",
    }


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def _install_postgresql() -> Path:
    """Debian's PostgreSQL server binaries: there already, or installed with apt-get when root."""
    import shutil

    bindir = _pg_bindir()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            subprocess.run(args, env=env, capture_output=True, timeout=900, check=False)
        bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (as root: apt-get install postgresql)")
    return bindir


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port, password auth, database
    ``prefect``): ``initdb`` into a temp folder, ``pg_ctl start``; stopped and removed at the end.
    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user
    (Debian's package creates it) or ``nobody``. Yields the SQLAlchemy URL Prefect takes."""
    import pwd
    import shutil
    import tempfile

    bindir = _install_postgresql()
    # Not under tmp_path: pytest's base folder is 0700 root, which the cluster's user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="skinlesion-pg-"))
    data, password = base / "data", "prefect-e2e"
    (base / "pw").write_text(password + "\n")
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        os.chown(base / "pw", entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    port = free_port()
    log = tmp_path / "postgres.log"

    def pg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=base
        )

    init = pg(str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--pwfile", str(base / "pw"),
              "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C")  # fmt: skip
    assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
    start = pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "server.log"), "-w",
               "start")  # fmt: skip
    try:
        assert start.returncode == 0, f"pg_ctl start failed:\n{start.stderr}\n" + (
            (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""
        )
        created = subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
            env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, f"createdb failed: {created.stderr}"
        yield {
            "url": f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{port}/prefect",
            "port": port,
            "password": password,
            "bindir": bindir,
        }
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        with contextlib.suppress(OSError):
            log.write_text((base / "server.log").read_text(errors="replace"))
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def prefect_server_postgres(tmp_path, postgres):
    """``prefect server start`` on a free port with its database in the ``postgres`` cluster."""
    failure = "prefect server (PostgreSQL) did not become healthy"
    with _prefect_server(tmp_path, postgres["url"], 180, failure) as served:
        yield served


@pytest.fixture
def toy_deployable(tmp_path) -> Path:
    """The toy pipeline (tests/integration/toy_pipeline.py: stages of milliseconds, real ``dvc``)
    with the project's flows/ and prefect.yaml beside it, committed: ``prefect deploy`` works from
    it as from the repository, and a run takes seconds (``TOY_TRAIN_SECONDS`` per train stage)."""
    import shutil

    from tests.integration.toy_pipeline import REPO as PROJECT
    from tests.integration.toy_pipeline import make_toy_repo

    repo = make_toy_repo(tmp_path / "toy")
    shutil.copytree(PROJECT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PROJECT / "prefect.yaml", repo / "prefect.yaml")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run_cmd([*git, "add", "-A"], repo)
    run_cmd([*git, "commit", "-qm", "flows"], repo)
    return repo


def copy_workspace(src: Path, dest: Path) -> Path:
    """A byte-for-byte copy of a built workspace (git, DVC cache, outputs, dvc.lock); symlinks kept."""
    import shutil

    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory) -> Path:
    """The project copied as ``repo_copy`` does, with the TINY params and ``dvc repro calibrate``
    done and committed: a workspace with a bundle in models/ensemble. Built once per session
    (a few minutes on 2 cores); tests work on their own :func:`copy_workspace` of it.
    ``SKINLESION_TINY_BUILT=DIR`` reuses a workspace an earlier session built (never written)."""
    from flows.dvcops import set_params
    from tests.conftest import copy_project_files

    reuse = os.environ.get("SKINLESION_TINY_BUILT")
    if reuse:
        return Path(reuse)

    repo = copy_project_files(tmp_path_factory.mktemp("tiny") / "repo")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run_cmd(["git", "init", "-q"], repo)
    set_params(repo / "params.yaml", TINY)
    run_cmd([*git, "add", "-A"], repo)
    run_cmd([*git, "commit", "-qm", "copy, tiny params"], repo)
    run_cmd([sys.executable, "-m", "dvc", "repro", "calibrate"], repo, timeout=2400)
    run_cmd([*git, "add", "-A"], repo)
    run_cmd([*git, "commit", "-qm", "baseline run"], repo)
    return repo
