"""Atomic outputs: a killed writer leaves no half output under the final name, and its temp
folder is removed at the next start of that output's writer (and git never sees it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion.core.outputs import atomic_dir, atomic_file, write_json

REPO = Path(__file__).resolve().parents[3]

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from skinlesion.core.outputs import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)   # killed mid-write, as by the OOM killer or kill -9
"""


def test_a_killed_writer_leaves_the_old_output_and_its_temp_is_removed_next_time(tmp_path):
    out = tmp_path / "reports" / "drift"
    with atomic_dir(out) as tmp:
        (tmp / "index.html").write_text("good run")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, check=False)
    assert proc.returncode == -9
    stale = list(out.parent.glob(".drift.tmp-*"))
    assert len(stale) == 1 and (stale[0] / "half.bin").is_file()
    assert (out / "index.html").read_text() == "good run"  # the final name still has the last good one
    with atomic_dir(out) as tmp:
        (tmp / "index.html").write_text("next run")
    assert list(out.parent.glob(".drift.tmp-*")) == []
    assert (out / "index.html").read_text() == "next run"


def test_stale_temp_files_beside_a_file_output_are_removed(tmp_path):
    target = tmp_path / "metrics" / "drift.json"
    target.parent.mkdir()
    (target.parent / ".drift.json.tmp-abc123").write_text("{half")
    (target.parent / ".other.json.tmp-zzz").write_text("not ours")
    write_json(target, {"a": 1})
    assert sorted(p.name for p in target.parent.iterdir()) == [".other.json.tmp-zzz", "drift.json"]
    with atomic_file(target) as fh:
        fh.write("{}")
    assert target.read_text() == "{}"


def test_git_ignores_temp_outputs():
    temps = ("metrics/.drift.json.tmp-abc", "reports/.drift.tmp-x1/index.html", "models/.ensemble.old-12")
    for name in temps:
        proc = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO, check=False)
        assert proc.returncode == 0, f"{name} is not git-ignored"
    tracked = subprocess.run(["git", "check-ignore", "-q", "metrics/drift.json"], cwd=REPO, check=False)
    assert tracked.returncode == 1


def test_atomic_dir_swaps_in_one_exchange_and_repairs_a_kill_between_two_renames(tmp_path):
    from skinlesion.core.outputs import atomic_dir, exchange, remove_stale_temps

    target = tmp_path / "bundle"
    with atomic_dir(target) as d:
        (d / "v").write_text("1")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if exchange(a, b):  # Linux: both names exist at every instant
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with atomic_dir(target) as d:
        (d / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "bundle"]
    # the fallback's window: killed after target -> .old-PID, before temp -> target
    target.rename(tmp_path / ".bundle.old-123")
    (tmp_path / ".bundle.tmp-xyz").mkdir()
    remove_stale_temps(target)
    assert (target / "v").read_text() == "2", "the previous output must be put back, not deleted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "bundle"]


def test_a_full_disk_is_one_line_naming_the_output(tmp_path, capsys):
    import errno

    from skinlesion.core.cli import run_main
    from skinlesion.core.outputs import atomic_dir

    target = tmp_path / "model"

    def body():
        with atomic_dir(target):
            raise OSError(errno.ENOSPC, "No space left on device")  # a writer that names nothing

    assert run_main(body) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {target}: No space left on device") and "\n" not in err
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(OSError, match="Permission denied"):  # other OS errors keep their traceback
        run_main(lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))


@pytest.mark.parametrize(
    ("spec", "killed_at"),
    [("shard_open@3", 3), ("shard_open", 1), ("other_point@1", None), ("", None)],
)
def test_failpoint_kills_at_its_point_and_count_only(spec, killed_at):
    code = (
        "import sys\nfrom skinlesion.core.outputs import failpoint\n"
        "for n in range(1, 6):\n"
        "    print(n, flush=True)\n"
        "    failpoint('SKINLESION_TEST_FAILPOINT', 'shard_open', n)\n"
    )
    env = {**os.environ, "SKINLESION_TEST_FAILPOINT": spec}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    printed = done.stdout.split()
    if killed_at is None:
        assert done.returncode == 0 and printed == ["1", "2", "3", "4", "5"], done.stderr
    else:
        assert done.returncode == -signal.SIGKILL, done.stderr
        assert printed == [str(n) for n in range(1, killed_at + 1)]


def test_failpoint_pause_holds_the_process_until_it_is_killed():
    code = (
        "from skinlesion.core.outputs import failpoint\n"
        "failpoint('SKINLESION_TEST_FAILPOINT', 'p', 2)\n"
        "print('passed', flush=True)\n"
    )
    env = {**os.environ, "SKINLESION_TEST_FAILPOINT": "p@2:pause"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # paused, not passed through nor killed
    finally:
        proc.kill()
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "passed" not in out
