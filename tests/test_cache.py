"""The Numba cache directory: chosen automatically, keyed by the kernel sources, optional."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from edgeformer import _cache
from tests.helpers import write_tiny_bert

SCRIPT = """
import tempfile, sys
tempfile.tempdir = "/dev/null/tmp"          # no writable temp dir either
import numpy as np, edgeformer
from edgeformer._cache import CACHE_ENABLED
m = edgeformer.load(sys.argv[1], threads=1)
out = m.run({"input_ids": np.array([[1, 2, 3, 4]])})["last_hidden_state"]
np.save(sys.argv[2], out)
print("cache", CACHE_ENABLED)
"""


def test_runs_without_any_writable_cache_directory(tmp_path):
    model_path = write_tiny_bert(tmp_path / "tiny.edgeformer", pooling=None)
    env = dict(os.environ, HOME="/dev/null", XDG_CACHE_HOME="/dev/null/xdg", EDGEFORMER_CACHE_DIR="/dev/null/ef")
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_path), str(tmp_path / "out.npy")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cache False" in done.stdout

    import edgeformer

    want = edgeformer.load(model_path, threads=1).run({"input_ids": np.array([[1, 2, 3, 4]])})["last_hidden_state"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_cache_directory_is_keyed_by_numba_version_and_kernel_sources(tmp_path):
    import numba

    env = dict(os.environ, EDGEFORMER_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    code = "import os, edgeformer, numba; print(os.environ['NUMBA_CACHE_DIR']); print(numba.config.CACHE_DIR)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    expected = str(tmp_path / f"numba-{numba.__version__}-{_cache.kernel_source_hash()}")
    assert done.stdout.split() == [expected, expected]
    assert os.path.isdir(expected)
