"""The runtime reaches BLAS without importing all of scipy.linalg, and scipy.linalg still imports normally."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import sys
import numpy as np
import edgeformer
from tests.helpers import write_tiny_bert
path = write_tiny_bert(sys.argv[1])
model = edgeformer.load(path, threads=1)
out = model.run({"input_ids": np.arange(12).reshape(2, 6) % 100})["sentence_embedding"]
assert np.isfinite(out).all() and out.shape == (2, 40)
assert "scipy.linalg.cython_blas" in sys.modules, "the attention's np.dot did not go through cython_blas"
assert "scipy.linalg" not in sys.modules, "the runtime imported the whole of scipy.linalg"
import scipy.linalg  # still works, and complete
from scipy.linalg import cython_blas
assert scipy.linalg.solve(np.eye(2), np.ones(2)).tolist() == [1.0, 1.0]
assert "sgemm" in cython_blas.__pyx_capi__
print("ok")
"""


def test_runtime_imports_only_cython_blas(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.edgeformer")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
