"""The project's process pool (skinlesion.core.parallel): ordered results, bounded look-ahead, one pool
shared by several passes."""

from __future__ import annotations

import os

from skinlesion.core.parallel import in_order, in_order_on, process_pool


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_one_pool_serves_several_passes_in_order_and_matches_in_process():
    tasks = lambda: ((i, (i,)) for i in range(40))  # noqa: E731
    with process_pool(1) as none:
        assert none is None
        alone = [(tag, r[0]) for tag, r in in_order_on(none, _square_and_pid, tasks())]
    assert alone == [(i, i * i) for i in range(40)]
    with process_pool(2, [__name__]) as pool:
        first = list(in_order_on(pool, _square_and_pid, tasks(), window=3))
        second = list(in_order_on(pool, _square_and_pid, tasks(), window=3))
    assert [(tag, r[0]) for tag, r in first] == alone == [(tag, r[0]) for tag, r in second]
    workers = {r[1] for _, r in first + second}
    assert os.getpid() not in workers and len(workers) <= 2  # the same two processes both times
    assert [(t, r[0]) for t, r in in_order(_square_and_pid, tasks(), 2, window=4)] == alone


def test_tasks_are_drawn_no_further_than_the_window_ahead():
    drawn = []

    def tasks():
        for i in range(30):
            drawn.append(i)
            yield i, (i,)

    with process_pool(2, [__name__]) as pool:
        for tag, _ in in_order_on(pool, _square_and_pid, tasks(), window=5):
            assert len(drawn) <= tag + 5, (tag, len(drawn))
