"""After loading kernels, the session gives llvmlite's machine-code pages back (edgeformer/llvm_pages.py).

Checked in fresh processes (the release happens when a process first loads kernels): with the release,
llvmlite's executable mapping is (almost) not resident after a run and results are bit-identical to
a process that keeps the pages; LLVM still works afterwards (a new function compiles and runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeformer.llvm_pages import parse_text_ranges

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")


def _skip_unless_code_is_executable_mapping():
    """On a native kernel /proc/self/smaps shows libllvmlite's code as an r-xp mapping. Under qemu-user
    (the aarch64 CI stage) /proc/self/smaps is the host's view of the emulator, where the guest code it
    translates is mapped r--p: text_ranges() finds nothing there and release() is a no-op."""
    import numba
    from llvmlite.binding import ffi

    numba.njit(lambda v: v + 1)(1)  # LLVM has run in this process
    name = os.path.basename(ffi.get_library_name())
    perms = [fields[1] for fields in (line.split() for line in open("/proc/self/smaps"))
             if len(fields) >= 6 and not fields[0].endswith(":") and os.path.basename(fields[5]) == name]
    if "r-xp" not in perms:
        pytest.skip(f"{name} has no r-xp mapping in /proc/self/smaps ({sorted(set(perms))}): emulated, "
                    "e.g. qemu-user")


SCRIPT = r"""
import json, os, sys
import numpy as np
import edgeformer
from edgeformer import llvm_pages
from tests.helpers import write_tiny_bert


def llvm_text_kib():
    name = os.path.basename(__import__("llvmlite.binding", fromlist=["ffi"]).ffi.get_library_name())
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):
            current = len(fields) >= 6 and fields[1] == "r-xp" and os.path.basename(fields[5]) == name
        elif current and fields[0] == "Rss:":
            total += int(fields[1])
    return total


path = write_tiny_bert(sys.argv[1])
model = edgeformer.load(path, threads=1)
ids = np.arange(14).reshape(2, 7) % 100
mask = np.ones_like(ids)
mask[1, 5:] = 0
out = model.run({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
after_run = llvm_text_kib()

import numba  # LLVM must still work after its pages were released: compile something new


@numba.njit
def fresh(x):
    return x * 3 + 1


assert fresh(4) == 13
again = model.run({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
assert np.array_equal(out, again)
print(json.dumps({"after_run_kib": after_run, "ranges": len(llvm_pages.text_ranges()),
                  "enabled": llvm_pages.ENABLED, "out": out.astype(float).tolist()}))
"""


def _run(tmp_path, keep: bool) -> dict:
    env = dict(os.environ)
    env.pop("EDGEFORMER_KEEP_LLVM_PAGES", None)
    if keep:
        env["EDGEFORMER_KEEP_LLVM_PAGES"] = "1"
    name = "keep" if keep else "release"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / f"{name}.edgeformer")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@LINUX
def test_release_unmaps_llvm_code_and_changes_no_result(tmp_path):
    _skip_unless_code_is_executable_mapping()
    released, kept = _run(tmp_path, keep=False), _run(tmp_path, keep=True)
    assert released["enabled"] and not kept["enabled"]
    assert released["ranges"] >= 1, "llvmlite's executable mapping was not found in /proc/self/smaps"
    # Loading kernels touches MiBs of LLVM's code; after the release at most a few pages are back
    # (the code that ran between the last release and the measurement).
    assert kept["after_run_kib"] > 4096, kept
    assert released["after_run_kib"] < kept["after_run_kib"] / 4, (released, kept)
    assert released["out"] == kept["out"]


@LINUX
def test_text_ranges_are_executable_mappings_of_llvmlite():
    from llvmlite.binding import ffi

    from edgeformer import llvm_pages

    _skip_unless_code_is_executable_mapping()
    ranges = llvm_pages.text_ranges()
    assert ranges, "llvmlite is imported by numba, so its code must be mapped"
    maps = [line.split() for line in open("/proc/self/maps")]
    name = os.path.basename(ffi.get_library_name())
    for start, end in ranges:
        match = [f for f in maps if tuple(int(x, 16) for x in f[0].split("-")) == (start, end)]
        assert match and match[0][1] == "r-xp" and os.path.basename(match[0][5]) == name, (start, end, match)


SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fe:00 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                 400 kB
Anonymous:             0 kB
7f0000100000-7f0000500000 r-xp 00100000 fe:00 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                4000 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r-xp 00500000 fe:00 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                  64 kB
Anonymous:             8 kB
7f0000600000-7f0000700000 r-xp 00600000 fe:00 42 /venv/llvmlite/binding/libllvmlite.so
Rss:                  64 kB
7f0000700000-7f0000800000 rw-p 00700000 fe:00 42 /venv/llvmlite/binding/libllvmlite.so
Anonymous:             0 kB
7f1000000000-7f1000100000 r-xp 00000000 fe:00 43 /usr/lib/libother.so
Anonymous:             0 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
"""


def test_only_clean_executable_mappings_of_the_library_are_released():
    """Never a mapping with copy-on-write pages (or without an Anonymous line), a writable or read-only data
    mapping, or another file: dropping those would lose data, not just cached file pages."""
    assert parse_text_ranges(SMAPS.splitlines(), "libllvmlite.so") == [(0x7f0000100000, 0x7f0000500000)]
    assert parse_text_ranges(SMAPS.splitlines(), "libnothing.so") == []
    assert parse_text_ranges(["garbage-line r-xp"], "libllvmlite.so") == []
