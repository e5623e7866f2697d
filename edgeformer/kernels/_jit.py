"""The one decorator every kernel uses: njit with cache, nogil and the numpy error model.

error_model="numpy" drops the ZeroDivisionError check that blocks vectorisation (numba.md §7).
cache follows edgeformer._cache: off when no writable directory exists (read-only installs).
"""
import numba

from edgeformer._cache import CACHE_ENABLED

# Every dispatcher made by kernel(): their specialisation count tells the session when Numba has
# loaded or compiled something new (edgeformer/llvm_pages.py gives LLVM's code pages back then).
KERNELS: list = []
_OVERLOADS: list = []  # each dispatcher's overloads dict (the same object for its lifetime)


def loaded_specialisations() -> int:
    """How many (kernel, signature) pairs are compiled or loaded in this process. Called after every run:
    map/len/sum stay in C (a generator over ~100 dispatchers cost ~36 us per run once the model's kernels
    had pushed the interpreter out of the caches)."""
    return sum(map(len, _OVERLOADS))


def kernel(fn=None, *, fastmath=False, inline="never"):
    """@kernel or @kernel(fastmath=...): a serial, GIL-free, cached Numba function."""

    def wrap(f):
        dispatcher = numba.njit(cache=CACHE_ENABLED, nogil=True, error_model="numpy", fastmath=fastmath,
                                inline=inline)(f)
        KERNELS.append(dispatcher)
        _OVERLOADS.append(dispatcher.overloads)
        return dispatcher

    return wrap(fn) if fn is not None else wrap


def helper(fn):
    """An always-inlined scalar helper (exp, erf, ...) called from kernels."""
    return numba.njit(cache=CACHE_ENABLED, nogil=True, error_model="numpy", inline="always")(fn)
