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

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")

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


def test_release_unmaps_llvm_code_and_changes_no_result(tmp_path):
    released, kept = _run(tmp_path, keep=False), _run(tmp_path, keep=True)
    assert released["enabled"] and not kept["enabled"]
    assert released["ranges"] >= 1, "llvmlite's executable mapping was not found in /proc/self/smaps"
    # Loading kernels touches MiBs of LLVM's code; after the release at most a few pages are back
    # (the code that ran between the last release and the measurement).
    assert kept["after_run_kib"] > 4096, kept
    assert released["after_run_kib"] < kept["after_run_kib"] / 4, (released, kept)
    assert released["out"] == kept["out"]


def test_text_ranges_are_executable_mappings_of_llvmlite():
    from llvmlite.binding import ffi

    from edgeformer import llvm_pages

    ranges = llvm_pages.text_ranges()
    assert ranges, "llvmlite is imported by numba, so its code must be mapped"
    maps = [line.split() for line in open("/proc/self/maps")]
    name = os.path.basename(ffi.get_library_name())
    for start, end in ranges:
        match = [f for f in maps if tuple(int(x, 16) for x in f[0].split("-")) == (start, end)]
        assert match and match[0][1] == "r-xp" and os.path.basename(match[0][5]) == name, (start, end, match)
