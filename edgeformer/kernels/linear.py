"""fp32 linear layer (BLAS GEMM + fused bias / activation / residual epilogue) and element-wise activation.

The GEMM is `np.dot` inside njit, which calls scipy's OpenBLAS sgemm (numba.md §1). Rows are processed
in blocks of ROW_BLOCK; each block's epilogue runs right after its GEMM, while the block is still in
cache, so the output is written by BLAS and then finished in one more pass over hot rows.

Aliasing: a loop that reads one array and writes another gets a runtime overlap check from LLVM and
falls back to scalar code when they are the same buffer, so in-place work loops over `out` alone.
`x` must not alias `out` in linear_fp32 (BLAS writes `out` while reading `x`).
"""
import numpy as np

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_GELU_TANH, ACT_RELU, gelu_erf, gelu_tanh, relu

ROW_BLOCK = 64  # rows per GEMM call: 64 x 1536 x 4 B = 384 KiB stays in L2 for the epilogue


@helper
def _act_rows_inplace(a, r0, r1, c0, c1, act):
    """a[r0:r1, c0:c1] = act(a[r0:r1, c0:c1]); the branch on `act` sits outside the loops."""
    if act == ACT_RELU:
        for r in range(r0, r1):
            for c in range(c0, c1):
                a[r, c] = relu(a[r, c])
    elif act == ACT_GELU_ERF:
        for r in range(r0, r1):
            for c in range(c0, c1):
                a[r, c] = gelu_erf(a[r, c])
    elif act == ACT_GELU_TANH:
        for r in range(r0, r1):
            for c in range(c0, c1):
                a[r, c] = gelu_tanh(a[r, c])


@helper
def _act_rows(x, out, r0, r1, act):
    """out[r0:r1] = act(x[r0:r1]) for distinct arrays x and out."""
    n = x.shape[1]
    if act == ACT_RELU:
        for r in range(r0, r1):
            for c in range(n):
                out[r, c] = relu(x[r, c])
    elif act == ACT_GELU_ERF:
        for r in range(r0, r1):
            for c in range(n):
                out[r, c] = gelu_erf(x[r, c])
    elif act == ACT_GELU_TANH:
        for r in range(r0, r1):
            for c in range(n):
                out[r, c] = gelu_tanh(x[r, c])
    else:
        for r in range(r0, r1):
            for c in range(n):
                out[r, c] = x[r, c]


@kernel
def activation(x, act, out, r0, r1):
    """out[r0:r1] = act(x[r0:r1]) with an ACT_* code; out may be x (in place)."""
    x = x  # (T, n) f32
    out = out  # (T, n) f32, may be x
    if x.ctypes.data == out.ctypes.data:
        _act_rows_inplace(out, r0, r1, 0, out.shape[1], act)
    else:
        _act_rows(x, out, r0, r1, act)


@kernel
def linear_fp32(x, w, bias, residual, act, out, r0, r1, c0, c1):
    """out[r0:r1, c0:c1] = act(x[r0:r1] @ w[c0:c1].T + bias[c0:c1]) + residual[r0:r1, c0:c1].

    x (T, K) f32; w (N, K) f32 read-only; bias (N,) or (0,); residual (T, N) or (0, 0); act an ACT_*
    code; out (T, N) f32, not aliasing x. Rows and columns outside the range are not touched.
    """
    if r1 <= r0 or c1 <= c0:
        return
    nc = c1 - c0
    panel = c0 != 0 or c1 != w.shape[0]
    wt = w[c0:c1].T  # (K, nc) read-only, F-contiguous: BLAS reads it transposed, no copy
    has_bias = bias.shape[0] != 0
    has_res = residual.shape[0] != 0
    # A column panel of `out` is not contiguous, so BLAS writes a scratch block that the epilogue
    # copies out; the full width goes straight into the (contiguous) rows of `out`.
    scratch = np.empty((min(ROW_BLOCK, r1 - r0) if panel else 0, nc), dtype=np.float32)  # (rows, nc)
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        if panel:
            np.dot(x[b0:b1], wt, scratch[: b1 - b0])
            for r in range(b0, b1):
                i = r - b0
                if has_bias:
                    for j in range(nc):
                        out[r, c0 + j] = scratch[i, j] + bias[c0 + j]
                else:
                    for j in range(nc):
                        out[r, c0 + j] = scratch[i, j]
        else:
            np.dot(x[b0:b1], wt, out[b0:b1])
            if has_bias:
                for r in range(b0, b1):
                    for c in range(nc):
                        out[r, c] += bias[c]
        _act_rows_inplace(out, b0, b1, c0, c1, act)
        if has_res:
            for r in range(b0, b1):
                for c in range(c0, c1):
                    out[r, c] += residual[r, c]
