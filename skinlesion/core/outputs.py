"""Outputs that are whole or absent: atomic folder and file writes, JSON, and the failpoint hook
the fault-injection tests use to kill a process between two writes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# Test hook (failpoint): "swapped-<target name>" kills the process right after atomic_dir swapped
# the new folder in, before it removed the previous one (e.g. swapped-production for a promotion).
ATOMIC_FAILPOINT_ENV = "SKINLESION_ATOMIC_FAILPOINT"


def failpoint(env: str, point: str, count: int) -> None:
    """Test hook for fault injection: stop this process at ``point`` once ``count`` reaches N when
    the environment variable ``env`` reads ``<point>`` or ``<point>@<N>`` (N defaults to 1).

    Plain, the process SIGKILLs itself (a crash inside a window between two writes); with
    ``:pause`` (``<point>@<N>:pause``) it sleeps until something kills it, so a test can kill the
    whole ``dvc repro`` process group at a known instant instead of racing a fast stage. An unset
    variable costs one environment lookup per call.
    """
    spec = os.environ.get(env, "")
    if not spec:
        return
    spec, _, action = spec.partition(":")
    name, _, at = spec.partition("@")
    if name != point or count < int(at or 1):
        return
    if action == "pause":
        log.warning("%s=%s:pause: paused at %s, count %d, until killed", env, spec, point, count)
        while True:
            time.sleep(3600)
    log.warning("%s=%s: killing this process at %s, count %d", env, spec, point, count)
    os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temp outputs (``.<name>.tmp-*``, ``.<name>.old-*``) a killed run left beside
    ``target``. Only this target's own names: DVC's lock keeps two runs of a stage apart.

    One exception: a run killed between the two renames of the fallback swap in
    :func:`atomic_dir` leaves no ``target`` but its previous version as ``.<name>.old-*``; that
    copy is put back (the last good output), never deleted."""
    if not (target.exists() or target.is_symlink()):
        olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], target)
            log.warning("%s was missing after a killed run: restored its previous version from %s",
                        target, olds[-1].name)  # fmt: skip
    gone = []
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for p in target.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
                missing_ok=True
            )
            gone.append(p)
    if gone:
        log.warning(
            "removed %d temp output(s) a killed run left behind: %s", len(gone), ", ".join(map(str, gone))
        )
    return gone


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or filesystem cannot (the caller falls back to two
    renames, which :func:`remove_stale_temps` repairs after a kill between them)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it (glibc < 2.28)
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``target``; on success it replaces ``target`` atomically.

    On any exception the temp dir is removed and ``target`` is left exactly as it was, so a
    failed or killed stage never leaves half an output (the previous good one stays). The swap
    is one exchange rename where Linux offers it: at every instant ``target`` is the old or the
    new folder, never missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the output is an ordinary folder
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
        elif exchange(tmp, target):  # tmp now holds the previous output
            failpoint(ATOMIC_FAILPOINT_ENV, f"swapped-{target.name}", 1)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)  # a kill right before this: remove_stale_temps puts old back
            failpoint(ATOMIC_FAILPOINT_ENV, f"swapped-{target.name}", 1)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:  # e.g. a full disk inside a library's writer: name the output
            raise OSError(e.errno, e.strerror, str(target)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", **open_kw: Any) -> Iterator[Any]:
    """Open a temp file beside ``target`` for writing; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, mode, **open_kw) as fh:
            yield fh
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it 0600; the output is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write flat, sorted, human-diffable JSON atomically (``dvc metrics diff`` reads it)."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, allow_nan=False)
        fh.write("\n")
