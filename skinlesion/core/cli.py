"""Command-line plumbing of every entry point: logging set-up and the one-line error exit."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable

from skinlesion.core.errors import ParamsError, StageError


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
