"""The project's process pool: ordered results from a bounded window, safe beside TensorFlow.

Used by the stages that decode many images (prepare, drift, the bundle reference). No
TensorFlow here: worker processes import the modules whose functions they run.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def mp_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """fork when safe (cheapest start); else a forkserver with ``preload`` modules imported."""
    methods = multiprocessing.get_all_start_methods()
    # Forking a process that already runs TensorFlow's thread pools (a test session, a notebook,
    # a stage that loaded a model) can deadlock the child. A forkserver is a fresh interpreter,
    # started once per process, that imports the worker's module once and forks clean workers.
    if "fork" in methods and "tensorflow" not in sys.modules:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
        return ctx
    return multiprocessing.get_context("spawn")


def in_order(
    fn: Callable[..., Any],
    tasks: Iterator[tuple[Any, tuple[Any, ...]]],
    workers: int,
    window: int,
) -> Iterator[tuple[Any, Any]]:
    """``(tag, fn(*args))`` for each ``(tag, args)`` in order, over a process pool, with at
    most ``window`` tasks in flight (so finished results never pile up in memory)."""
    if workers <= 1:
        for tag, args in tasks:
            yield tag, fn(*args)
        return
    pending: deque[tuple[Any, Future[Any]]] = deque()
    with ProcessPoolExecutor(workers, mp_context=mp_context([fn.__module__])) as pool:
        try:
            for tag, args in tasks:
                pending.append((tag, pool.submit(fn, *args)))
                if len(pending) >= window:
                    tag0, fut = pending.popleft()
                    yield tag0, fut.result()
            while pending:
                tag0, fut = pending.popleft()
                yield tag0, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
