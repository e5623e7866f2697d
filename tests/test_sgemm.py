"""kernels/sgemm.py: BLAS sgemm on strided, offset views from inside a Numba kernel, against NumPy float64."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.kernels._jit import kernel
from edgeformer.kernels.sgemm import TRANS_N, TRANS_T, sgemm

F32 = np.float32


@kernel
def _call(transa, transb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):
    return sgemm(transa, transb, m, n, k, np.float32(alpha), a, a_off, lda, b, b_off, ldb, c, c_off, ldc)


def colmajor(buf, off, rows, cols, ld):
    """The column-major (rows x cols) matrix with leading dimension ld starting at buf.flat[off]."""
    return np.lib.stride_tricks.as_strided(buf.reshape(-1)[off:], (rows, cols), (4, 4 * ld))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 40), ta=st.booleans(), tb=st.booleans(),
       pad=st.integers(0, 9), off=st.integers(0, 11), alpha=st.sampled_from([1.0, 0.5, -0.176, 3.0]),
       seed=st.integers(0, 2 ** 31))
def test_sgemm_matches_numpy_on_strided_views(m, n, k, ta, tb, pad, off, alpha, seed):
    rng = np.random.default_rng(seed)
    ar, ac = (k, m) if ta else (m, k)  # stored shape of A (column-major), op(A) is m x k
    br, bc = (n, k) if tb else (k, n)
    lda, ldb, ldc = ar + pad, br + pad, m + pad
    a = rng.standard_normal(off + lda * ac + 3).astype(F32)
    b = rng.standard_normal(off + ldb * bc + 3).astype(F32)
    c = np.full(off + ldc * n + 3, 7.0, F32)
    status = _call(TRANS_T if ta else TRANS_N, TRANS_T if tb else TRANS_N, m, n, k, alpha, a, off, lda, b, off, ldb,
                   c, off, ldc)
    assert status == 0
    A = colmajor(a, off, ar, ac, lda).astype(np.float64)
    B = colmajor(b, off, br, bc, ldb).astype(np.float64)
    want = alpha * (A.T if ta else A) @ (B.T if tb else B)
    got = colmajor(c, off, m, n, ldc)
    bound = 4 * k * np.finfo(F32).eps * abs(alpha) * ((np.abs(A.T if ta else A) @ np.abs(B.T if tb else B)) + 1e-30)
    assert np.all(np.abs(got - want) <= bound)
    # nothing outside C's m x n elements is written (beta = 0 overwrites exactly them)
    mask = np.ones(c.shape, bool)
    for j in range(n):
        mask[off + j * ldc: off + j * ldc + m] = False
    assert np.all(c[mask] == 7.0)


def test_row_major_head_slices_of_packed_qkv():
    """The call pattern of kernels/attention.py: S = scale Q K^T on column slices of a (T, 3D) matrix."""
    rng = np.random.default_rng(0)
    L, H, dh = 37, 3, 8
    D = H * dh
    qkv = rng.standard_normal((L, 3 * D)).astype(F32)
    s = np.empty(L * L, F32)
    for h in range(H):
        _call(TRANS_T, TRANS_N, L, L, dh, 0.25, qkv, D + h * dh, 3 * D, qkv, h * dh, 3 * D, s, 0, L)
        q, k = qkv[:, h * dh:(h + 1) * dh].astype(np.float64), qkv[:, D + h * dh:D + (h + 1) * dh].astype(np.float64)
        np.testing.assert_allclose(s.reshape(L, L), 0.25 * q @ k.T, rtol=1e-5, atol=1e-5)
