"""The runtime's one source of parallelism: a fixed pool of Python threads calling GIL-free kernels.

Every kernel is serial and ``nogil`` and takes a range of rows or work items, so an op splits its
work into ``threads`` contiguous ranges; the calling thread runs the first range itself. This
cannot abort the way Numba's workqueue layer does when two Python threads enter parallel regions at
once (numba.md §5), honours the thread count exactly, and stays correct when several Python threads
call ``Model.run`` concurrently (they share the pool; the ranges are independent). BLAS inside the
kernels is pinned to one thread (edgeformer.blas) so the two pools never oversubscribe the cores.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def ranges(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split [0, total) into at most ``parts`` contiguous ranges whose inner bounds are multiples of align."""
    if total <= 0:
        return []
    parts = max(1, min(parts, -(-total // align)))
    bounds = [0]
    for i in range(1, parts):
        cut = (total * i // parts) // align * align
        if cut > bounds[-1]:
            bounds.append(cut)
    bounds.append(total)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class Workers:
    def __init__(self, threads: int):
        self.threads = int(threads)
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="edgeformer") if self.threads > 1 else None

    def run(self, fn, chunks: list[tuple[int, int]], *args) -> None:
        """Call fn(*args, start, end) for every chunk, the first on this thread."""
        if not chunks:
            return
        if self._pool is None or len(chunks) == 1:
            for start, end in chunks:
                fn(*args, start, end)
            return
        futures = [self._pool.submit(fn, *args, start, end) for start, end in chunks[1:]]
        fn(*args, *chunks[0])
        for future in futures:
            future.result()

    def split(self, fn, total: int, *args, align: int = 1, min_per_thread: int = 1) -> None:
        parts = min(self.threads, max(1, total // max(1, min_per_thread)))
        self.run(fn, ranges(total, parts, align), *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
