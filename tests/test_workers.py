"""The worker pool: ranges, hand-off through atomic flags, errors, concurrent callers."""
from __future__ import annotations

import threading
import time

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.workers import Workers, ranges


@given(st.integers(0, 10_000), st.integers(1, 16), st.sampled_from([1, 2, 16, 64]))
def test_ranges_cover_exactly_once(total, parts, align):
    chunks = ranges(total, parts, align)
    assert len(chunks) <= parts
    covered = [i for a, b in chunks for i in range(a, b)] if total < 2000 else None
    if covered is not None:
        assert covered == list(range(total))
    assert all(a % align == 0 for a, _ in chunks)
    assert sum(b - a for a, b in chunks) == total


def test_every_chunk_runs_once_on_distinct_threads():
    workers = Workers(3)
    seen = {}

    def record(tag, start, end):
        seen[(start, end)] = threading.get_ident()

    for _ in range(200):
        seen.clear()
        workers.run(record, [(0, 1), (1, 2), (2, 3)], "x")
        assert sorted(seen) == [(0, 1), (1, 2), (2, 3)] and len(set(seen.values())) == 3
    time.sleep(0.05)  # let the workers fall asleep on their semaphores, then wake them again
    workers.run(record, [(0, 1), (1, 2), (2, 3)], "x")
    assert len(seen) == 3
    workers.close()


def test_more_chunks_than_threads_and_errors():
    workers = Workers(2)
    out = np.zeros(5)

    def fill(start, end):
        out[start:end] += 1

    workers.run(fill, [(0, 1), (1, 2), (2, 3), (3, 5)])
    assert out.tolist() == [1, 1, 1, 1, 1]

    def boom(start, end):
        if start == 1:
            raise ValueError("from a worker")

    try:
        workers.run(boom, [(0, 1), (1, 2)])
    except ValueError as exc:
        assert "worker" in str(exc)
    else:
        raise AssertionError("the worker's error was lost")
    workers.run(fill, [(0, 1), (1, 2)])  # the pool still works afterwards
    assert out[:2].tolist() == [2, 2]


def test_concurrent_callers():
    workers = Workers(2)
    counts = np.zeros(4)
    lock = threading.Lock()

    def add(start, end):
        with lock:
            counts[start:end] += 1

    callers = [threading.Thread(target=lambda: [workers.run(add, [(0, 2), (2, 4)]) for _ in range(500)])
               for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert counts.tolist() == [1500] * 4
