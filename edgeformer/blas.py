"""The BLAS that Numba's np.dot calls (SciPy's OpenBLAS): imported lightly, pinned to one thread.

edgeformer parallelises with its own workers (edgeformer.workers); a multi-threaded BLAS inside each
worker would oversubscribe the cores (numba.md §5: 9-135 ms instead of 2-9 ms). OpenBLAS reads
OPENBLAS_NUM_THREADS only when it is loaded, so for an already loaded library we call its
``*openblas_set_num_threads`` entry point directly.

Numba reaches BLAS through ``scipy.linalg.cython_blas`` (function pointers exported by a Cython
module), imported by name on the first np.dot. Importing that module the ordinary way first runs
``scipy/linalg/__init__.py``, which loads all of scipy.linalg (LAPACK wrappers, decompositions,
~60 modules): about 11 MiB of resident memory and 0.1-0.2 s that the runtime never uses. So
``import_cython_blas`` loads the one extension module under a placeholder parent package and
removes the placeholder again; a later ``import scipy.linalg`` by anyone else runs normally.
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import os
import sys
import threading
import types

_IMPORT_LOCK = threading.Lock()

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


def import_cython_blas() -> None:
    """Make ``scipy.linalg.cython_blas`` importable by name without importing all of scipy.linalg."""
    name = "scipy.linalg.cython_blas"
    with _IMPORT_LOCK:
        if name in sys.modules or "scipy.linalg" in sys.modules:
            return  # already there (or the full package is, which is cheap to complete)
        import scipy

        placeholder = types.ModuleType("scipy.linalg")
        placeholder.__path__ = [os.path.join(os.path.dirname(scipy.__file__), "linalg")]
        sys.modules["scipy.linalg"] = placeholder
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an unusual SciPy layout: Numba will import the full package itself on first use
        finally:
            if sys.modules.get("scipy.linalg") is placeholder:
                del sys.modules["scipy.linalg"]
