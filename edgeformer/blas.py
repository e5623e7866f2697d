"""Pin the BLAS that Numba's np.dot calls (SciPy's OpenBLAS) to one thread.

edgeformer parallelises with its own workers (edgeformer.workers); a multi-threaded BLAS inside each
worker would oversubscribe the cores (numba.md §5: 9-135 ms instead of 2-9 ms). OpenBLAS reads
OPENBLAS_NUM_THREADS only when it is loaded, so for an already loaded library we call its
``*openblas_set_num_threads`` entry point directly.
"""
from __future__ import annotations

import ctypes
import glob
import os

_SYMBOLS = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads", "openblas_set_num_threads64_")


def _scipy_blas_libraries() -> list[str]:
    import scipy

    root = os.path.dirname(os.path.dirname(scipy.__file__))
    found = []
    for pattern in ("scipy.libs/*openblas*.so*", "scipy/.dylibs/*openblas*.dylib", "scipy.libs/*openblas*.dll"):
        found.extend(glob.glob(os.path.join(root, pattern)))
    return found


def pin_blas_to_one_thread() -> list[str]:
    """Return the libraries that were pinned (empty if none was found: BLAS may then use its default)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    pinned = []
    for path in _scipy_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _SYMBOLS:
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(1)
                pinned.append(path)
                break
    return pinned
