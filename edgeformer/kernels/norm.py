"""Row normalisations: layer_norm (with an optional fused residual add) and l2_normalize.

Statistics are accumulated in float64 over float32 data, two passes (mean, then the sum of squared
deviations), so rows with a large mean relative to their spread keep their precision, and squares
of large float32 values cannot overflow. fastmath={"reassoc", "contract"} lets LLVM vectorise those
reductions (a strict left-to-right float sum cannot be); it leaves out nnan/ninf, so NaN and inf
still propagate as IEEE says.

Aliasing: `out` may be `x` (in place). A loop reading `x` and writing `out` gets an LLVM runtime
overlap check that falls back to scalar code when they are the same buffer, so the in-place case
passes one row view as both source and destination.
"""
import numpy as np

from edgeformer.kernels._jit import helper, kernel

_REDUCE = {"reassoc", "contract"}


@helper
def _layer_norm_row(src, res, has_res, gamma, beta, eps, dst):
    """dst = (y - mean(y)) / sqrt(var(y) + eps) * gamma + beta with y = src (+ res); 1-D rows."""
    n = src.shape[0]
    s = 0.0
    if has_res:
        for j in range(n):
            s += np.float32(src[j] + res[j])
    else:
        for j in range(n):
            s += src[j]
    mean = s / n
    v = 0.0
    if has_res:
        for j in range(n):
            d = np.float32(src[j] + res[j]) - mean
            v += d * d
    else:
        for j in range(n):
            d = src[j] - mean
            v += d * d
    rstd = 1.0 / np.sqrt(v / n + eps)  # biased variance, as torch
    if has_res:
        for j in range(n):
            dst[j] = np.float32((np.float32(src[j] + res[j]) - mean) * rstd) * gamma[j] + beta[j]
    else:
        for j in range(n):
            dst[j] = np.float32((src[j] - mean) * rstd) * gamma[j] + beta[j]


@kernel(fastmath=_REDUCE)
def layer_norm(x, residual, gamma, beta, eps, out, r0, r1):
    """out[r] = (y - mean) / sqrt(var + eps) * gamma + beta, y = x[r] + residual[r], for r0 <= r < r1.

    x (T, d) f32; residual (T, d) or (0, 0) = none; gamma, beta (d,) f32 read-only; eps float;
    out (T, d) f32, may be x (in place); residual must not be out.
    """
    has_res = residual.shape[0] != 0
    inplace = x.ctypes.data == out.ctypes.data
    for r in range(r0, r1):
        o = out[r]  # (d,)
        res = residual[r] if has_res else o  # (d,); not read when has_res is False
        if inplace:
            _layer_norm_row(o, res, has_res, gamma, beta, eps, o)
        else:
            _layer_norm_row(x[r], res, has_res, gamma, beta, eps, o)


@helper
def _l2_row(src, eps, dst):
    n = src.shape[0]
    ss = 0.0
    for j in range(n):
        v = np.float64(src[j])
        ss += v * v
    norm = np.sqrt(ss)
    inv = 1.0 / (eps if norm < eps else norm)
    for j in range(n):
        dst[j] = np.float32(src[j] * inv)


@kernel(fastmath=_REDUCE)
def l2_normalize(x, eps, out, r0, r1):
    """out[r] = x[r] / max(||x[r]||_2, eps) for r0 <= r < r1 (torch.nn.functional.normalize).

    x (T, d) f32; eps float; out (T, d) f32, may be x (in place).
    """
    inplace = x.ctypes.data == out.ctypes.data
    for r in range(r0, r1):
        o = out[r]  # (d,)
        if inplace:
            _l2_row(o, eps, o)
        else:
            _l2_row(x[r], eps, o)
