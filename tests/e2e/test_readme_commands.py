"""The README's command blocks, pasted in order as a new user would (issue 22).

Every ```bash / ```sh block of README.md is one of three kinds, said by the HTML comment on the
line before its fence (visible in the README's source, invisible on the rendered page):

* ``<!-- not run by tests: why -->``: not run here (``make demo``, ``make test``, ``make real``,
  a job of minutes, a server that runs until stopped);
* ``<!-- prefect quick start (server|setup|worker|run) ... -->``: the Prefect quick start, pasted
  by :func:`test_the_prefect_quick_start_deploys_all_four_on_a_fresh_server` against a server
  of the test's own (a free port in place of 4200, its own PREFECT_HOME);
* no comment: run by :func:`test_the_readme_blocks_run_in_order_on_a_fresh_copy`, in order, in
  one bash session (so ``source .venv/bin/activate`` and variables carry over, as in a terminal),
  with ``set -e``: the first command that fails fails the test with its block's text.

The fresh copy is the project's files as git sees them, with the committed demo record
(``dvc.lock``, ``metrics/``) and its outputs checked out from this checkout's DVC cache: the state
``make demo`` leaves. Without those outputs in the cache (a fresh CI clone) it is the session's
tiny pipeline (``tiny_built``) plus the demo's batch of new images. ``../shared`` beside the copy
is the real HAM10000 copy when present; the README's image block falls back to a synthetic image
without it, and the test checks which one it used. The shell starts without the venv on PATH,
so a command that needs it before the README activates it fails here as it would for a user.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_HAM, copy_project_files, run_cmd

MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
NOT_RUN = "not run by tests:"
PREFECT = re.compile(r"^prefect quick start \((server|setup|worker|run)\)")
# Commands a block must not hold unless it is marked: long jobs, servers that run until stopped.
UNSAFE = re.compile(
    r"\bmake\s+(demo|test|real|setup|noise|compare|bench|leakage-audit|test-slow|test-fast)\b"
    r"|\bdvc\s+(repro|exp\s+run|push|pull)\b"
    r"|\bprefect\s+(server|worker)\s+start\b"
    r"|\bpython\s+-m\s+(serve\.web|flows\.retrain|flows\.monitor)\b(?!.*--help)"
    r"|\bevidently\s+ui\b"
)
DEPLOYMENTS = {"retrain/weekly", "retrain/on-demand", "retrain/on-demand-gpu", "monitor/daily"}
AUTOMATIONS = {"crash-zombie-flow-runs", "retrain-on-drift"}
README_IMAGE = "images_200x150/ISIC_0024306.jpg"


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    marker: str | None  # the HTML comment before the fence, without <!-- -->
    text: str

    @property
    def prefect_role(self) -> str | None:
        match = PREFECT.match(self.marker or "")
        return match.group(1) if match else None

    def describe(self) -> str:
        return f"README.md line {self.line}:\n```bash\n{self.text}\n```"


def readme_blocks(text: str) -> list[Block]:
    """The ```bash / ```sh blocks of ``text``, each with the HTML comment on the line before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh"):
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.match(before)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append(Block(i + 1, match.group(1) if match else None, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def _blocks() -> list[Block]:
    return readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the rule, seconds


def test_every_readme_block_is_classified_and_unmarked_blocks_are_safe():
    blocks = _blocks()
    assert blocks, "no ```bash block in README.md"
    for block in blocks:
        if block.marker is not None:
            assert block.marker.startswith(NOT_RUN) or block.prefect_role, (
                f"unknown marker <!-- {block.marker} --> before {block.describe()}\n"
                f"use <!-- {NOT_RUN} why --> or <!-- prefect quick start (server|setup|worker|run) -->"
            )
            continue
        for line in block.text.splitlines():
            code = line.split("#", 1)[0]
            assert not UNSAFE.search(code), (
                f"{line.strip()!r} is a long job or a server, yet its block is run by the README test: "
                f"put <!-- {NOT_RUN} why --> on the line before the fence of {block.describe()}"
            )


def test_the_prefect_quick_start_is_four_blocks_in_order():
    roles = [b.prefect_role for b in _blocks() if b.prefect_role]
    assert roles == ["server", "setup", "worker", "run"], roles


def test_the_block_parser_reads_markers_and_fences():
    text = "x\n<!-- not run by tests: slow -->\n\n```bash\nmake demo\n```\n```sh\nls\n```\n```csv\na\n```\n"
    assert readme_blocks(text) == [Block(4, "not run by tests: slow", "make demo"), Block(7, None, "ls")]


# --------------------------------------------------------------------------- a fresh copy


def _user_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a new terminal: no venv on PATH (the README activates it)."""
    venv = str(REPO / ".venv")
    env = dict(base if base is not None else os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        p
        for p in env.get("PATH", "").split(os.pathsep)
        if p and not p.startswith(venv) and p != str(Path(sys.executable).parent)
    )
    env.setdefault("PREFECT_HOME", str(home / "prefect-home"))
    env["PREFECT_PROFILES_PATH"] = env.get(
        "PREFECT_PROFILES_PATH", str(home / "prefect-home" / "profiles.toml")
    )
    env["COLUMNS"] = "200"  # rich tables (prefect deployment ls) keep whole names
    return env


def _git_commit(repo: Path) -> None:
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    if not (repo / ".git").exists():
        run_cmd(["git", "init", "-q"], repo)
    run_cmd([*git, "add", "-A"], repo)
    run_cmd([*git, "commit", "-qm", "fresh copy", "--allow-empty"], repo)


def _fresh_copy(root: Path) -> Path:
    """The project's files as git sees them, committed, with the venv linked in: a fresh clone."""
    repo = copy_project_files(root / "skinlesion")
    _git_commit(repo)
    (repo / ".venv").symlink_to(REPO / ".venv")
    return repo


def _with_demo_outputs(root: Path, request) -> Path:
    """A fresh copy in the state ``make demo`` leaves: the committed demo record and its outputs
    from this checkout's DVC cache, else the session's tiny pipeline and the demo's new images."""
    repo = copy_project_files(root / "skinlesion")
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]
    tracked = subprocess.run(
        [*listed, "dvc.lock", "metrics", "reports"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    _git_commit(repo)
    cache = REPO / ".dvc" / "cache"
    if cache.is_dir() and (repo / "dvc.lock").is_file():
        run_cmd([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(cache)], repo)
        run_cmd([sys.executable, "-m", "dvc", "checkout"], repo, check=False, timeout=600)
    if not (repo / "models" / "ensemble" / "bundle.json").is_file():
        from tests.e2e.conftest import copy_workspace

        shutil.rmtree(repo)
        repo = copy_workspace(request.getfixturevalue("tiny_built"), root / "skinlesion")
        run_cmd([sys.executable, "-m", "dvc", "repro", "demo_batch"], repo, timeout=600)
    (repo / ".venv").symlink_to(REPO / ".venv")
    return repo


def _shared_beside(root: Path) -> bool:
    """``root/shared/data/ham10000`` -> the real data when present (the README's ../shared)."""
    if not (SHARED_HAM / README_IMAGE).is_file():
        return False
    (root / "shared" / "data").mkdir(parents=True)
    (root / "shared" / "data" / "ham10000").symlink_to(SHARED_HAM)
    return True


def _run_session(blocks: list[Block], repo: Path, env: dict[str, str], tmp_path: Path, timeout: float = 600):
    """Paste ``blocks`` into one bash session with ``set -e`` (not pipefail: a terminal has none);
    on failure, fail with the block."""
    __tracebackhide__ = True
    progress = tmp_path / "block-started"
    script = ["set -e"]
    for index, block in enumerate(blocks):
        script += [f"echo {index} > {progress}", block.text]
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        failed = blocks[int(progress.read_text())] if progress.exists() else blocks[0]
        pytest.fail(
            f"exit {proc.returncode} in {failed.describe()}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.mark.e2e
@pytest.mark.slow  # ~30 s; minutes when it has to build the tiny pipeline (shared with other e2e tests)
def test_the_readme_blocks_run_in_order_on_a_fresh_copy(tmp_path, request):
    blocks = [b for b in _blocks() if b.marker is None]
    assert any("source .venv/bin/activate" in b.text for b in blocks), "the README never activates the venv"
    assert any("serve.predict" in b.text for b in blocks), "the README's try-the-model block is not run"
    real_image = _shared_beside(tmp_path)
    repo = _with_demo_outputs(tmp_path, request)
    proc = _run_session(blocks, repo, _user_env(tmp_path), tmp_path)
    # the image block used the real image when there is one, else a synthetic one of the demo
    predicted = [line for line in proc.stdout.splitlines() if ".jpg" in line and not line.startswith("#")]
    assert predicted, proc.stdout[-3000:]
    expected = "ISIC_0024306.jpg" if real_image else "demo-clinic-b"
    assert expected in predicted[-1], proc.stdout[-3000:]


# --------------------------------------------------------------------------- the Prefect quick start


def _api(env: dict[str, str], method: str, path: str, **kwargs):
    import httpx

    response = httpx.request(method, env["PREFECT_API_URL"] + path, timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


@pytest.mark.e2e
@pytest.mark.slow
def test_the_prefect_quick_start_deploys_all_four_on_a_fresh_server(prefect_server, tmp_path):
    from tests.e2e.conftest import Background

    server_env, _server = prefect_server
    api = server_env["PREFECT_API_URL"]  # http://127.0.0.1:<free port>/api
    port = re.search(r":(\d+)/api$", api).group(1)
    blocks = {b.prefect_role: b for b in _blocks() if b.prefect_role}
    repo = _fresh_copy(tmp_path)
    # A user's terminal: the server's own home and profiles, but no PREFECT_API_URL (the README sets it).
    env = _user_env(tmp_path, {k: v for k, v in server_env.items() if k != "PREFECT_API_URL"})
    env.pop("PREFECT_CLI_PROMPT", None)

    def paste(block: Block, *, drop: str | None = None, before: str = "") -> subprocess.CompletedProcess:
        lines = before.splitlines() + block.text.replace("127.0.0.1:4200", f"127.0.0.1:{port}").splitlines()
        if drop is not None:
            kept = [line for line in lines if line.split("#", 1)[0].strip() != drop]
            assert len(kept) == len(lines) - 1, f"expected one line {drop!r} in {block.describe()}"
            lines = kept
        return _run_session([Block(block.line, block.marker, "\n".join(lines))], repo, env, tmp_path)

    # terminal 1: the README's server block; the server itself is this test's (same command,
    # temp home, free port)
    paste(blocks["server"], drop="prefect server start")
    # terminal 2: pools, deployments, automation; the README says it is safe to paste again
    first = paste(blocks["setup"])
    assert "Deploying" in first.stdout, first.stdout[-3000:]
    listed = paste(blocks["setup"]).stdout
    for name in DEPLOYMENTS:
        assert name in listed, f"prefect deployment ls lacks {name}:\n{listed[-3000:]}"
    checked = {**env, "PREFECT_API_URL": api}
    deployments = {f"{d['flow_name']}/{d['name']}" for d in _deployments(checked)}
    assert deployments == DEPLOYMENTS
    automations = [a["name"] for a in _api(checked, "POST", "/automations/filter", json={})]
    assert sorted(automations) == sorted(AUTOMATIONS), automations  # once each, pasted twice

    # terminal 3: the worker, with heartbeats; it must find the server through the profile
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=" in blocks["worker"].text
    worker = Background("worker", ["bash", "-c", blocks["worker"].text], cwd=repo, env=env, logs=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while "started!" not in worker.log.read_text(errors="replace"):
            assert worker.proc.poll() is None, f"the worker exited {worker.proc.returncode}\n{worker.tail()}"
            assert time.monotonic() < deadline, f"the worker did not start in 120 s\n{worker.tail()}"
            time.sleep(1)
        while not _api(checked, "POST", "/work_pools/cpu-pool/workers/filter", json={}):
            assert time.monotonic() < deadline, f"no worker registered in cpu-pool\n{worker.tail()}"
            time.sleep(1)
    finally:
        worker.stop()
    assert "Traceback" not in worker.log.read_text(errors="replace"), worker.tail()

    # the run block, back in the second terminal (its venv active): a retrain run is created; no
    # worker polls any more, so it stays scheduled
    assert "source .venv/bin/activate" in blocks["setup"].text
    ran = paste(blocks["run"], before="source .venv/bin/activate").stdout
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", ran)
    assert run_id, ran[-3000:]
    run = _api(checked, "GET", f"/flow_runs/{run_id.group(1)}")
    deployment = _api(checked, "GET", f"/deployments/{run['deployment_id']}")
    assert (deployment["name"], run["state_type"]) == ("on-demand", "SCHEDULED"), run["state"]


def _deployments(env: dict[str, str]) -> list[dict]:
    flows = {f["id"]: f["name"] for f in _api(env, "POST", "/flows/filter", json={})}
    return [
        {**d, "flow_name": flows[d["flow_id"]]} for d in _api(env, "POST", "/deployments/filter", json={})
    ]
