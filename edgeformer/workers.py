"""The runtime's one source of parallelism: a fixed pool of Python threads calling GIL-free kernels.

Every kernel is serial and ``nogil`` and takes a range of rows or work items, so an op splits its
work into ``threads`` contiguous ranges; the calling thread runs the first range itself. This
cannot abort the way Numba's workqueue layer does when two Python threads enter parallel regions at
once (numba.md §5), honours the thread count exactly, and stays correct when several Python threads
call ``Model.run`` concurrently: one caller at a time uses the pool, any other runs its ranges on its
own thread meanwhile. BLAS inside kernels is pinned to one thread (edgeformer.blas), so nothing
oversubscribes the cores.

Hand-off: a worker spins, without the GIL, on an atomic flag (kernels/sync.py) that the dispatcher
bumps, and blocks on a semaphore only after ``SPINS`` reads (a few hundred µs) without work — as
OpenMP runtimes do. Blocking hand-offs cost ~50 µs per op here (ThreadPoolExecutor), more than many
ops take at small shapes. The semaphore protocol is Dekker-style on seq_cst atomics: the sleeper
announces itself before re-checking the flag, the poster bumps the flag before looking for sleepers,
so a wake-up is never lost (a spurious one is tolerated by the loops).
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

SPINS = 200_000  # atomic reads before sleeping: ~0.1-0.3 ms, longer than the gap between two ops
STRIDE = 8  # int64 slots per flag, one cache line each
POST, DONE, WORKER_ASLEEP, CALLER_ASLEEP = range(4)


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


class _Pool:
    """State shared by the worker threads (kept apart from Workers so that Workers can be collected)."""

    def __init__(self, size: int):
        from edgeformer.kernels.sync import load_flag, spin_until, store_flag

        self.load, self.store, self.spin = load_flag, store_flag, spin_until
        self.flags = np.zeros(4 * STRIDE * size, dtype=np.int64)  # (worker, flag) slots
        self.tasks: list = [None] * size
        self.errors: list = [None] * size
        self.posted = [0] * size
        self.wake = [threading.Semaphore(0) for _ in range(size)]
        self.done = [threading.Semaphore(0) for _ in range(size)]
        self.threads = [threading.Thread(target=self.loop, args=(w,), name=f"edgeformer-{w + 1}", daemon=True)
                        for w in range(size)]
        for t in self.threads:
            t.start()

    def slot(self, worker: int, flag: int) -> int:
        return (4 * worker + flag) * STRIDE

    def wait(self, worker: int, flag: int, value: int, asleep: int, sem) -> None:
        """Return once flags[worker, flag] == value: spin first, then sleep on ``sem``."""
        index = self.slot(worker, flag)
        if self.spin(self.flags, index, value, SPINS):
            return
        mark = self.slot(worker, asleep)
        while True:
            self.store(self.flags, mark, 1)
            if self.load(self.flags, index) == value:
                break
            sem.acquire()
            if self.load(self.flags, index) == value:
                break
        self.store(self.flags, mark, 0)

    def post(self, worker: int, task) -> int:
        self.tasks[worker] = task
        self.errors[worker] = None
        self.posted[worker] += 1
        self.store(self.flags, self.slot(worker, POST), self.posted[worker])
        if self.load(self.flags, self.slot(worker, WORKER_ASLEEP)):
            self.wake[worker].release()
        return self.posted[worker]

    def join(self, worker: int, seq: int) -> None:
        self.wait(worker, DONE, seq, CALLER_ASLEEP, self.done[worker])

    def loop(self, worker: int) -> None:
        seq = 0
        while True:
            seq += 1
            self.wait(worker, POST, seq, WORKER_ASLEEP, self.wake[worker])
            task = self.tasks[worker]
            if task is None:
                return
            fn, args, start, end = task
            try:
                fn(*args, start, end)
            except BaseException as exc:  # handed to the caller, re-raised there
                self.errors[worker] = exc
            self.tasks[worker] = None
            self.store(self.flags, self.slot(worker, DONE), seq)
            if self.load(self.flags, self.slot(worker, CALLER_ASLEEP)):
                self.done[worker].release()

    def shutdown(self) -> None:
        for worker in range(len(self.threads)):
            self.post(worker, None)


class Workers:
    def __init__(self, threads: int):
        self.threads = int(threads)
        self._lock = threading.Lock()
        self._pool = _Pool(self.threads - 1) if self.threads > 1 else None
        if self._pool is not None:
            self._finalizer = weakref.finalize(self, self._pool.shutdown)

    def run(self, fn, chunks: list[tuple[int, int]], *args) -> None:
        """Call fn(*args, start, end) for every chunk, the first on this thread, the others on workers."""
        if not chunks:
            return
        if self._pool is None or len(chunks) == 1 or not self._lock.acquire(blocking=False):
            for start, end in chunks:  # serial, or another Python thread holds the pool right now
                fn(*args, start, end)
            return
        pool = self._pool
        try:
            extra = chunks[1:self.threads]
            posted = [(w, pool.post(w, (fn, args, start, end))) for w, (start, end) in enumerate(extra)]
            try:
                fn(*args, *chunks[0])
                for start, end in chunks[self.threads:]:
                    fn(*args, start, end)
            finally:
                for w, seq in posted:
                    pool.join(w, seq)
            for w, _ in posted:
                if pool.errors[w] is not None:
                    error, pool.errors[w] = pool.errors[w], None
                    raise error
        finally:
            self._lock.release()

    def split(self, fn, total: int, *args, align: int = 1, min_per_thread: int = 1) -> None:
        if self._pool is None:  # one thread: one range, no list to build (this runs ~50 times per model run)
            if total > 0:
                fn(*args, 0, total)
            return
        parts = min(self.threads, max(1, total // max(1, min_per_thread)))
        self.run(fn, ranges(total, parts, align), *args)

    def close(self) -> None:
        if self._pool is not None:
            self._finalizer()
