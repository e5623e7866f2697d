"""Give LLVM's machine-code pages back to the OS once Numba has loaded the kernels.

Loading a cached kernel runs LLVM: Numba initialises its runtime by compiling a small module, then
parses and links the cached object code. That maps ~50 MiB of libllvmlite's machine code into the
process (file-backed pages; Linux maps page-cache folios whole, so scattered calls touch a lot), and
none of it runs again while the model runs. ``release_if_new_kernels()``, called by ``Model.run``
after each step of a model's first run and after every later run, unmaps those pages with
``madvise(MADV_DONTNEED)`` whenever Numba has loaded or compiled a kernel since the last call.

Why this is safe: only the library's executable mapping (``r-xp``) is released, and only if it holds
no anonymous (copy-on-write) pages, so every page dropped is a clean, unmodified page of the file.
The next use of LLVM (another kernel load or compile) faults the same bytes back in from the page
cache. Only RSS changes (docs/PERFORMANCE.md "Peak RSS"), never results.

Linux only (elsewhere a no-op; under qemu-user too: its /proc/self/smaps is the host's view of the
emulator, where the guest code it translates is mapped r--p).
``EDGEFORMER_KEEP_LLVM_PAGES=1`` (read when edgeformer is imported) turns it off.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

from edgeformer.kernels._jit import loaded_specialisations

ENABLED = sys.platform.startswith("linux") and os.environ.get("EDGEFORMER_KEEP_LLVM_PAGES", "") in ("", "0")

_lock = threading.Lock()
_state = {"ranges": None, "seen": -1, "madvise": None}


def _library_name() -> str:
    from llvmlite.binding import ffi

    return os.path.basename(ffi.get_library_name())


def text_ranges() -> list[tuple[int, int]]:
    """(start, end) of llvmlite's executable mappings that hold no copy-on-write pages."""
    try:
        with open("/proc/self/smaps") as smaps:
            return parse_text_ranges(smaps, _library_name())
    except OSError:
        return []


def parse_text_ranges(smaps_lines, name: str) -> list[tuple[int, int]]:
    """The r-xp mappings of the file ``name`` in /proc/<pid>/smaps text whose Anonymous size is 0.

    A mapping without an Anonymous line counts as having anonymous pages (never released).
    """
    ranges, anonymous, current = [], {}, None
    try:
        for line in smaps_lines:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                current = None
                if len(fields) >= 6 and fields[1] == "r-xp" and os.path.basename(fields[5]) == name:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = (start, end)
                    ranges.append(current)
            elif current is not None and fields[0] == "Anonymous:":
                anonymous[current] = int(fields[1])
    except (ValueError, IndexError):
        return []
    return [r for r in ranges if anonymous.get(r, 1) == 0]


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def release() -> int:
    """Unmap llvmlite's machine code now; returns the bytes of address range advised (0 if off)."""
    if not ENABLED or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    if _state["ranges"] is None:  # the library stays mapped for the life of the process
        _state["ranges"] = text_ranges()
        _state["madvise"] = _madvise() if _state["ranges"] else None
    advised = 0
    for start, end in _state["ranges"]:
        if _state["madvise"](start, end - start, mmap.MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def release_if_new_kernels() -> None:
    """release() if a kernel was loaded or compiled since the last call (cheap when nothing was)."""
    if not ENABLED:
        return
    count = loaded_specialisations()
    if count == _state["seen"]:
        return
    with _lock:
        if count != _state["seen"]:
            _state["seen"] = count
            release()
