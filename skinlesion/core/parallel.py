"""The project's process pool: ordered results from a bounded window, safe beside TensorFlow.

Every stage that spreads work over processes uses it (split, validate, prepare, drift, the
bundle reference, the web app's decoding). No TensorFlow here: worker processes import the
modules whose functions they run.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any


def n_workers(requested: int = 0) -> int:
    """Worker processes to use: ``requested``, or every core this process may run on when 0."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


@contextlib.contextmanager
def process_pool(workers: int, preload: Sequence[str] = ()) -> Iterator[Executor | None]:
    """A pool of ``workers`` processes started as :func:`mp_context` says (``preload``: the
    modules whose functions they run), for several :func:`in_order_on` passes; None for one
    worker, so the work runs in this process without a pool to start."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=mp_context(preload)) as pool:
        yield pool


def in_order_on(
    pool: Executor | None,
    fn: Callable[..., Any],
    tasks: Iterable[tuple[Any, tuple[Any, ...]]],
    window: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """``(tag, fn(*args))`` for each ``(tag, args)`` in order, on ``pool`` (None: in this
    process), with at most ``window`` tasks in flight (default: 4 per core this process may
    use), so that neither the tasks' inputs nor finished results pile up in memory."""
    if pool is None:
        for tag, args in tasks:
            yield tag, fn(*args)
        return
    window = window or 4 * n_workers()
    pending: deque[tuple[Any, Future[Any]]] = deque()
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


def in_order(
    fn: Callable[..., Any],
    tasks: Iterable[tuple[Any, tuple[Any, ...]]],
    workers: int,
    window: int,
) -> Iterator[tuple[Any, Any]]:
    """:func:`in_order_on` over a pool of ``workers`` processes of its own."""
    with process_pool(workers, [fn.__module__]) as pool:
        yield from in_order_on(pool, fn, tasks, window)
