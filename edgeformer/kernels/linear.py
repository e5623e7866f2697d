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

# Rows per GEMM call. scipy's sgemm loses efficiency at small M; measured single-threaded on
# 128x384x1536, 512x384x1536, 128x1536x384 (gelu+bias and bias+residual epilogues): 128 rows was
# ~10% faster than 64 and ~20% faster than 32. 128 x 1536 x 4 B = 768 KiB still fits Zen 4's L2.
ROW_BLOCK = 128


@helper
def _act_inplace(v, act):
    """v[:] = act(v) on a 1-D row view; the branch on `act` sits outside the loops."""
    n = v.shape[0]
    if act == ACT_RELU:
        for j in range(n):
            v[j] = relu(v[j])
    elif act == ACT_GELU_ERF:
        for j in range(n):
            v[j] = gelu_erf(v[j])
    elif act == ACT_GELU_TANH:
        for j in range(n):
            v[j] = gelu_tanh(v[j])


@helper
def _act_copy(src, dst, act):
    """dst[:] = act(src) for distinct 1-D rows."""
    n = src.shape[0]
    if act == ACT_RELU:
        for j in range(n):
            dst[j] = relu(src[j])
    elif act == ACT_GELU_ERF:
        for j in range(n):
            dst[j] = gelu_erf(src[j])
    elif act == ACT_GELU_TANH:
        for j in range(n):
            dst[j] = gelu_tanh(src[j])
    else:
        for j in range(n):
            dst[j] = src[j]


@kernel
def activation(x, act, out, r0, r1):
    """out[r0:r1] = act(x[r0:r1]) with an ACT_* code; x, out (T, n) f32; out may be x (in place)."""
    inplace = x.ctypes.data == out.ctypes.data
    for r in range(r0, r1):
        if inplace:
            _act_inplace(out[r], act)  # (n,)
        else:
            _act_copy(x[r], out[r], act)  # (n,) -> (n,)


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
    bias_p = bias[c0:c1] if has_bias else bias  # (nc,) or (0,)
    # A column panel of `out` is not contiguous, so BLAS writes a scratch block that the epilogue
    # copies out; the full width goes straight into the (contiguous) rows of `out`.
    scratch = np.empty((min(ROW_BLOCK, r1 - r0) if panel else 0, nc), dtype=np.float32)  # (rows, nc)
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        if panel:
            np.dot(x[b0:b1], wt, scratch[: b1 - b0])  # (b1-b0, K) @ (K, nc) -> scratch
        else:
            np.dot(x[b0:b1], wt, out[b0:b1])  # (b1-b0, K) @ (K, N) -> out rows
        # Epilogue, one row at a time so that its stages run on a row held in L1. Loops run over
        # 0-based row views: a loop index that could be negative keeps Numba's wraparound check,
        # which stops LLVM from vectorising.
        for r in range(b0, b1):
            o = out[r, c0:c1]  # (nc,)
            if panel:
                s = scratch[r - b0]  # (nc,)
                if has_bias:
                    for j in range(nc):
                        o[j] = s[j] + bias_p[j]
                else:
                    for j in range(nc):
                        o[j] = s[j]
            elif has_bias:
                for j in range(nc):
                    o[j] += bias_p[j]
            _act_inplace(o, act)
            if has_res:
                res = residual[r, c0:c1]  # (nc,)
                for j in range(nc):
                    o[j] += res[j]
