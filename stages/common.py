"""Helpers every stage shares: the HAM10000 schema, atomic outputs, logging, CLI plumbing.

Look here before writing a helper of your own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The exact HAM10000 metadata columns, in the original order.
HAM_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
# The seven HAM10000 diagnoses; "malignant" is mel + bcc + akiec.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT: tuple[str, ...] = ("akiec", "bcc", "mel")
DX_TYPES: tuple[str, ...] = ("histo", "follow_up", "consensus", "confocal")
SEXES: tuple[str, ...] = ("male", "female", "unknown")
LOCALIZATIONS: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity",
)  # fmt: skip

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


class StageError(RuntimeError):
    """An expected failure with a message meant for the user (no traceback is shown)."""


def n_workers(requested: int = 0) -> int:
    """Worker processes to use: ``requested``, or every core this process may run on when 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (pytest and Prefect swap it between calls)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger for a stage's command line; called only from ``main()``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
        force=True,
    )


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a stage's ``main`` body: expected failures print one line and exit 1, no traceback."""
    from stages.params import ParamsError

    try:
        return int(fn() or 0)
    except (StageError, ParamsError) as e:
        # One line, no traceback: these are the user's to fix, and the message names what.
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # anything else is a bug worth its traceback
        # The machine's to fix (disk full, quota, read-only): name the file. Every output is
        # written beside its target and swapped in at the end, so the previous one is intact.
        where = e.filename or "an output"
        print(f"error: {where}: {e.strerror} (nothing was replaced: the previous output is intact; "
              "free space and rerun)", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
