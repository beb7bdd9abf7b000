"""Fault injection on the real pipeline (``dvc repro`` of the project's stages on the TINY
params) and on a real Prefect server: what a kill, a second ``dvc repro``, a full disk, a killed
worker or an interrupted promotion leave behind.

While a ``dvc repro`` runs, a watcher thread reads the outputs' folders every few milliseconds,
each listing taken through one open directory (names, sizes, mtimes), the way a reader (the
next stage, ``serve``, ``dvc push``) would see them: no half-written output may ever show under
its final name. Each test works on its own copy of one built workspace (``tiny_built``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.dvcops import set_params
from flows.promote import FAILPOINT_ENV as PROMOTE_FAILPOINT
from skinlesion.core.outputs import ATOMIC_FAILPOINT_ENV as ATOMIC_FAILPOINT
from tests.conftest import run_cmd
from tests.e2e.conftest import PREFECT, Background, copy_workspace, prefect_cli, run_deployment, wait_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.heavy]

PROJECT = Path(__file__).resolve().parents[2]

DVC = [sys.executable, "-m", "dvc"]
TARGET = "calibrate"  # the bundle and everything upstream (drift is the monitor's)
# prepare reruns (more, smaller shards) and so does everything after it; three epochs of small
# batches give each train stage epochs long enough to be killed in the middle of one.
CHAIN = {"prepare.shard_size": 64, "train.common.epochs": 3, "train.common.batch_size": 8}
WATCHED = ("data/prepared", "models/custom_cnn", "models/mobilenetv2", "models/ensemble")
PERSISTENT = ("models/custom_cnn", "models/mobilenetv2")  # persist: true in dvc.yaml
UP_TO_DATE = "Data and pipelines are up to date."


# --------------------------------------------------------------------------- observing outputs


def _listing(fd: int, prefix: str = "") -> list[tuple[str, int, int]]:
    out = []
    for name in os.listdir(fd):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:  # removed while listed: a folder changing in place
            out.append((prefix + name, -1, -1))
            continue
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                out += _listing(sub, f"{prefix}{name}/")
            finally:
                os.close(sub)
        else:
            out.append((prefix + name, st.st_size, st.st_mtime_ns))
    return out


def signature(path: Path) -> tuple | None:
    """What a reader sees at ``path`` now: None when absent, else every file's name, size and
    mtime, read through one open directory (a rename mid-listing cannot mix two folders)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        return tuple(sorted(_listing(fd)))
    finally:
        os.close(fd)


class Watcher(threading.Thread):
    """Polls ``paths`` under ``root``; ``seen[path]`` lists each distinct state in order."""

    def __init__(self, root: Path, paths: tuple[str, ...] = WATCHED, interval: float = 0.02):
        super().__init__(daemon=True)
        self.root, self.paths, self.interval = root, paths, interval
        self.seen: dict[str, list[tuple | None]] = {p: [signature(root / p)] for p in paths}
        self._halt = threading.Event()  # not _stop: Thread.join calls its own _stop()

    def run(self) -> None:
        while not self._halt.is_set():
            for p in self.paths:
                sig = signature(self.root / p)
                if sig != self.seen[p][-1]:
                    self.seen[p].append(sig)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _repro(work: Path, logs: Path, name: str, **env: str) -> Background:
    return Background(name, [*DVC, "repro", TARGET], cwd=work, env={**_env(), **env}, logs=logs)


def _stage_procs(bg: Background, module: str) -> list:
    import psutil

    found = []
    try:
        children = psutil.Process(bg.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if f"stages.{module}" in cmd:
            found.append(child)
    return found


def _wait_for(bg: Background, cond: Callable[[], bool], what: str, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if bg.proc.poll() is not None:
            pytest.fail(f"`dvc repro` ended (exit {bg.proc.returncode}) before {what}\n{bg.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:g} s\n{bg.tail()}")
        time.sleep(0.01)


def _sigkill(bg: Background) -> None:
    """SIGKILL ``dvc repro`` and everything it started (one process group), as a power cut would."""
    os.killpg(bg.proc.pid, signal.SIGKILL)
    bg.proc.wait(timeout=60)
    bg.stop()  # closes the log; stragglers of the group get SIGKILL too


def _being_written(bg: Background, module: str, folder: Path, name: str) -> Callable[[], bool]:
    """``stages.<module>`` runs and writes ``folder/name``: its temp output
    (``skinlesion.core.outputs.atomic_dir``) holds a file, or (a writer that is not atomic) the final
    folder does, which DVC deleted before the stage started."""

    def holds_a_file(p: Path) -> bool:
        return p.is_dir() and any(q.is_file() for q in p.rglob("*"))

    def cond() -> bool:
        temps = [t for t in folder.glob(f".{name}.tmp-*") if holds_a_file(t)]
        return bool(temps or holds_a_file(folder / name)) and bool(_stage_procs(bg, module))

    return cond


def _leftovers(work: Path) -> list[str]:
    return sorted(
        str(p.relative_to(work))
        for top in ("data", "models")
        for p in (work / top).rglob(".*")
        if re.search(r"\.(tmp|old)-", p.name)
    )


def _load_bundle(folder: Path) -> None:
    from skinlesion.model.bundle import Bundle

    Bundle.load(folder)


def _status(work: Path) -> str:
    return run_cmd([*DVC, "status", "--with-deps", TARGET], work).stdout.strip()


def _lock_out(work: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def _only_whole_states(watcher: Watcher, final: dict[str, tuple | None]) -> None:
    """Every state seen under a final name was the one before the runs, the one after, or absent
    (DVC deletes a stage's non-persistent outputs before running it); persistent ones never absent."""
    for path, states in watcher.seen.items():
        allowed = {states[0], final[path], None}
        odd = [s for s in states if s not in allowed]
        assert not odd, f"{path}: a half-written state was visible: {odd[0]}\nall states: {states}"
        if path in PERSISTENT:
            assert None not in states, f"{path} (persist: true) disappeared: {states}"


# --------------------------------------------------------------------------- kills during stages


def test_sigkill_in_prepare_in_train_mid_epoch_and_in_calibrate_then_repro_completes(tiny_built, tmp_path):
    work = copy_workspace(tiny_built, tmp_path / "repo")
    _load_bundle(work / "models" / "ensemble")
    prepared_before = _lock_out(work, "prepare", "data/prepared")
    set_params(work / "params.yaml", CHAIN)
    watcher = Watcher(work)
    watcher.start()
    timings: dict[str, float] = {}
    try:
        # 1. prepare: killed while it writes its shards (into its temp folder). On the TINY set
        # prepare writes them all in well under a second, faster than the watcher can catch, so
        # the stage's failpoint holds it after opening its second shard until the kill.
        t0 = time.monotonic()
        bg = _repro(work, tmp_path, "repro-1", SKINLESION_PREPARE_FAILPOINT="shard_open@2:pause")
        _wait_for(bg, _being_written(bg, "prepare", work / "data", "prepared"), "prepare writing its shards")
        _sigkill(bg)
        assert (
            not (work / "data" / "prepared").exists()
            or signature(work / "data" / "prepared") == (watcher.seen["data/prepared"][0])
        )
        _load_bundle(work / "models" / "ensemble")
        timings["kill in prepare"] = time.monotonic() - t0

        # 2. train: killed in the middle of an epoch (between two of its resume commits)
        t0 = time.monotonic()
        bg = _repro(work, tmp_path, "repro-2")
        _wait_for(bg, lambda: bool(_stage_procs(bg, "train")), "a train stage")
        cmd = _stage_procs(bg, "train")[0].cmdline()
        backbone, backup = cmd[cmd.index("--backbone") + 1], work / cmd[cmd.index("--backup") + 1]

        def epochs_done() -> int:
            try:
                return len(json.loads((backup / "state.json").read_text())["history"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return 0

        _wait_for(bg, lambda: epochs_done() >= 1, f"train@{backbone}'s first epoch")
        t1 = time.monotonic()
        _wait_for(bg, lambda: epochs_done() >= 2, f"train@{backbone}'s second epoch")
        epoch = time.monotonic() - t1
        time.sleep(epoch / 3)  # a third of the way into the third epoch
        assert epochs_done() == 2, "the third epoch ended before the kill: epochs too short here"
        _sigkill(bg)
        assert epochs_done() == 2
        _load_bundle(work / "models" / "ensemble")
        timings[f"kill in train@{backbone} (epoch {epoch:.1f} s)"] = time.monotonic() - t0

        # 3. calibrate: killed while it writes the new bundle (into its temp folder)
        t0 = time.monotonic()
        bg = _repro(work, tmp_path, "repro-3")
        _wait_for(
            bg, _being_written(bg, "calibrate", work / "models", "ensemble"), "calibrate writing the bundle"
        )
        _sigkill(bg)
        # models/ensemble is persist: true, so the previous bundle is still there, whole
        _load_bundle(work / "models" / "ensemble")
        timings["kill in calibrate"] = time.monotonic() - t0

        # 4. the next `dvc repro` finishes the job
        t0 = time.monotonic()
        bg = _repro(work, tmp_path, "repro-4")
        rc = bg.proc.wait(timeout=2400)
        bg.stop()
        assert rc == 0, bg.tail(120)
        later = (tmp_path / "repro-3.log").read_text() + bg.log.read_text()
        timings["repro after the kills"] = time.monotonic() - t0
    finally:
        watcher.stop()
        print("fault timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    final = {p: signature(work / p) for p in WATCHED}
    _only_whole_states(watcher, final)
    assert _status(work) == UP_TO_DATE
    _load_bundle(work / "models" / "ensemble")
    assert _lock_out(work, "prepare", "data/prepared") != prepared_before  # the chain really reran
    # the killed train stage resumed from its committed epochs instead of starting over
    assert f"resuming {backbone} after epoch 2 of 3" in later, later[-3000:]
    assert not _leftovers(work), _leftovers(work)


def test_previous_bundle_stays_in_place_while_calibrate_reruns(tiny_built, tmp_path):
    work = copy_workspace(tiny_built, tmp_path / "repo")
    set_params(work / "params.yaml", {"calibrate.target_recall": 0.9})
    watcher = Watcher(work, ("models/ensemble",))
    watcher.start()
    try:
        run_cmd([*DVC, "repro", TARGET], work, timeout=2400)
    finally:
        watcher.stop()
    assert None not in watcher.seen["models/ensemble"], "models/ensemble was absent while calibrate ran"


# --------------------------------------------------------------------------- two repros at once


def test_two_repros_at_once_in_one_workspace(tiny_built, tmp_path):
    work = copy_workspace(tiny_built, tmp_path / "repo")
    set_params(work / "params.yaml", {"evaluate.bootstrap_samples": 21})  # evaluate@* .. calibrate
    watcher = Watcher(work)
    watcher.start()
    try:
        runs = [_repro(work, tmp_path, f"repro-{i}") for i in (1, 2)]
        codes = [bg.proc.wait(timeout=2400) for bg in runs]
        for bg in runs:
            bg.stop()
    finally:
        watcher.stop()
    logs = [bg.log.read_text() for bg in runs]
    assert 0 in codes, "\n".join(bg.tail(60) for bg in runs)
    for code, log in zip(codes, logs, strict=True):
        if code != 0:  # DVC's repository lock or an output's lock, said as such
            assert re.search(r"Unable to acquire lock|is busy, it is being blocked by", log), log[-3000:]
    final = {p: signature(work / p) for p in WATCHED}
    _only_whole_states(watcher, final)
    assert _status(work) == UP_TO_DATE
    # "committed": dvc.lock changed and not yet in git (any repro); a damaged output would be
    # "uncommitted" (differs from dvc.lock) or "not_in_cache"
    data = json.loads(run_cmd([*DVC, "data", "status", "--json"], work).stdout or "{}")
    assert set(data) <= {"committed", "untracked", "git", "unchanged"}, data
    _load_bundle(work / "models" / "ensemble")
    again = run_cmd([*DVC, "repro", TARGET], work)
    assert "Running stage" not in again.stdout, again.stdout


# --------------------------------------------------------------------------- a full disk


def test_disk_full_while_writing_a_model_keeps_the_previous_one(tiny_built, tmp_path):
    import shutil

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    previous = tiny_built / "models" / "custom_cnn"
    used = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the previous model and half another: the new one cannot be written beside it
    size = (int(used * 1.5) // 4096 + 1) * 4096
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "custom_cnn"
        shutil.copytree(previous, out)
        before = signature(out)
        proc = run_cmd(
            [sys.executable, "-m", "stages.train", "--params", str(tiny_built / "params.yaml"),
             "--backbone", "custom_cnn", "--prepared", str(tiny_built / "data" / "prepared"),
             "--out", str(out), "--metrics", str(tmp_path / "train.json"), "--live", str(tmp_path / "live"),
             "--backup", str(tmp_path / "custom_cnn.ckpt")],
            PROJECT, check=False, timeout=1800,
        )  # fmt: skip
        assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
        last = proc.stderr.strip().splitlines()[-1]
        # one line naming the output being written, no traceback
        assert last.startswith(f"error: {out}") and "No space left on device" in last, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert signature(out) == before, "the previous model was touched"
        assert os.listdir(disk) == ["custom_cnn"], f"temp output left on the full disk: {os.listdir(disk)}"
        import keras

        import skinlesion.model.networks  # noqa: F401  (registers the model's custom layers)

        keras.models.load_model(out / "model.keras", compile=False)
        assert not (tmp_path / "train.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- an interrupted promotion

# The promotion (flows.retrain.promote_candidate: flows.promote.promote_bundle's copy into a temp
# folder, the record, the swap; `dvc add`; git commit and tag) runs in a child process that its
# failpoints (flows.promote.FAILPOINT_ENV, skinlesion.core.outputs.ATOMIC_FAILPOINT_ENV) SIGKILL at one step.
PROMOTE_CHILD = r"""
import json, os, sys

from flows.retrain import promote_candidate

record, tag = json.loads(sys.argv[1]), sys.argv[2]
print(json.dumps(promote_candidate.fn(os.getcwd(), record, tag)))
"""
# where each kill happens: the environment that stops the promotion there
KILL_AT = {
    "copy": {PROMOTE_FAILPOINT: "copy@3"},  # in the middle of copying the bundle into the temp folder
    "record": {PROMOTE_FAILPOINT: "record"},  # the bundle copied, its record not yet written
    "swap": {ATOMIC_FAILPOINT: "swapped-production"},  # swapped in, the previous one not removed
    "track": {PROMOTE_FAILPOINT: "track"},  # production in place, `dvc add models/production` not run
    "tag": {PROMOTE_FAILPOINT: "tag"},  # committed, not tagged
}

PERTURB_CHILD = r"""
import json, sys
from pathlib import Path

import keras

import skinlesion.model.networks  # noqa: F401  (registers the bundle's custom layers)
from skinlesion.model.bundle_json import file_md5

bundle = Path(sys.argv[1])
meta = json.loads((bundle / "bundle.json").read_text())
for m in meta["members"]:
    path = bundle / m["path"]
    model = keras.models.load_model(path, compile=False)
    model.set_weights([w * 1.01 for w in model.get_weights()])
    model.save(path)
    m["md5"] = file_md5(path)
meta["created"] = "2099-01-01T00:00:00Z"
(bundle / "bundle.json").write_text(json.dumps(meta, indent=2))
"""


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _promote(work: Path, record: dict, tag: str, kill_at: str = "") -> subprocess.CompletedProcess:
    return run_cmd(
        [sys.executable, "-c", PROMOTE_CHILD, json.dumps(record), tag], work, check=False,
        env={**KILL_AT.get(kill_at, {}), "PYTHONPATH": str(PROJECT)}, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def promoted(tiny_built, tmp_path_factory) -> Path:
    """A workspace with production = the baseline bundle, and a new candidate in models/ensemble
    whose every member file differs (the weights scaled: a stand-in for a retrain)."""
    work = copy_workspace(tiny_built, tmp_path_factory.mktemp("promote") / "repo")
    first = _promote(work, {"candidate": "old"}, "model-old")
    assert first.returncode == 0, first.stderr[-3000:]
    perturb = [sys.executable, "-c", PERTURB_CHILD, str(work / "models" / "ensemble")]
    run_cmd(perturb, work, env={"PYTHONPATH": str(PROJECT)})
    return work


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        ("copy", "old"),
        ("record", "old"),
        ("swap", "old or new"),
        ("track", "new"),
        ("tag", "new"),
    ],
)
def test_promotion_killed_at_each_step_leaves_the_old_or_the_new_bundle(promoted, tmp_path, point, expected):
    work = copy_workspace(promoted, tmp_path / "repo")
    prod = work / "models" / "production"
    old, candidate = _hashes(prod), _hashes(work / "models" / "ensemble")
    record = {"candidate": "new", "killed_at": point}
    killed = _promote(work, record, "model-new", kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {point!r}: {killed.stderr[-2000:]}"

    now = _hashes(prod) if prod.is_dir() else {}
    is_old = now == old
    is_new = {k: v for k, v in now.items() if k != "production.json"} == candidate and json.loads(
        (prod / "production.json").read_text()
    ) == record
    assert is_old or is_new, f"killed at {point!r}: production is neither bundle: {sorted(now)}"
    assert expected in (("old" if is_old else "new"), "old or new")
    _load_bundle(prod)

    # the promotion done again completes it: production, its .dvc file and the tag agree
    again = _promote(work, record, "model-new")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: v for k, v in _hashes(prod).items() if k != "production.json"} == candidate
    assert run_cmd([*DVC, "status", "models/production.dvc"], work).stdout.strip() == UP_TO_DATE
    assert "model-new" in run_cmd(["git", "tag"], work).stdout.split()
    assert not [p.name for p in (work / "models").glob(".production.*")]


# --------------------------------------------------------------------------- a worker killed mid-run

# Prefect 3.8.8 marks nothing Crashed by itself when the process running a flow dies with its
# worker: the run stays Running. Its documented cure: flow-run heartbeats (workers started with
# PREFECT_FLOWS_HEARTBEAT_FREQUENCY) and the automation committed in flows/automations/ (docs/operations.md).
ZOMBIE_AUTOMATION = PROJECT / "flows" / "automations" / "crash-zombies.json"


def _kill_tree(pid: int) -> list[str]:
    """SIGKILL ``pid`` and every process below it at once, as a machine or container dying would.

    Killing the worker's process group is not enough: Prefect's process worker starts each flow
    run in a session of its own (so a signal meant for the worker cannot reach the run), and a
    run whose process survives keeps running and sending heartbeats. Returns what was killed.
    """
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()  # first stop them all: none can notice the others dying and react
    names = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(" ".join(p.cmdline()[:4]))
            p.kill()
    psutil.wait_procs(procs, timeout=30)
    return names


def test_worker_killed_mid_run_crashes_the_run_and_the_next_run_completes(
    toy_deployable, prefect_server, tmp_path
):
    env, _server = prefect_server
    repo = toy_deployable
    timings: dict[str, float] = {}
    for pool in ("cpu-pool", "gpu-pool"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env, repo)
    prefect_cli(["deploy", "--all"], env, repo)
    prefect_cli(["automation", "create", "--from-file", str(ZOMBIE_AUTOMATION)], env, repo)
    worker_env = {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_WORKER_QUERY_SECONDS": "2"}

    def start_worker(name: str) -> Background:
        return Background(name, [PREFECT, "worker", "start", "--pool", "cpu-pool"], cwd=tmp_path,
                          env=worker_env, logs=tmp_path)  # fmt: skip

    worker = start_worker("worker-1")
    try:
        first = run_deployment(env, repo, worker)
        assert first["state_name"] == "Completed", f"{first['state']}\n{worker.tail()}"
        prod = repo / "models" / "production"
        before = _hashes(prod)

        trained = worker.log.read_text(errors="replace").count("training ")  # the first run's
        # A run that retrains (a train.common change) and whose toy train stage takes 10 min.
        out = prefect_cli(
            ["deployment", "run", "retrain/on-demand", "--params",
             json.dumps({"params_overrides": {"train.common.batch_size": 8}}),
             "--job-variable", 'env={"TOY_TRAIN_SECONDS": "600"}'],
            env, repo,
        )  # fmt: skip
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        deadline = time.monotonic() + 600
        while worker.log.read_text(errors="replace").count("training ") <= trained:
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(1)
        t0 = time.monotonic()
        killed = _kill_tree(worker.proc.pid)  # the worker, its flow run, dvc and the stage
        worker.stop()
        assert len(killed) >= 3, f"only {killed} were running under the worker"
        crashed = wait_run(run_id, env, repo, worker, timeout=600)
        timings["killed -> Crashed"] = time.monotonic() - t0
        assert crashed["state_type"] == "CRASHED", crashed["state"]
        assert _hashes(prod) == before, "the crashed run changed production"

        worker = start_worker("worker-2")
        t0 = time.monotonic()
        third = run_deployment(env, repo, worker)
        timings["next run"] = time.monotonic() - t0
        assert third["state_type"] == "COMPLETED", f"{third['state']}\n{worker.tail(120)}"
        candidate = repo / "models" / "ensemble" / "bundle.json"
        assert (prod / "bundle.json").read_bytes() == candidate.read_bytes()
        assert run_cmd([*DVC, "status"], repo).stdout.strip() == UP_TO_DATE
    finally:
        worker.stop()
        print("worker-kill timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
