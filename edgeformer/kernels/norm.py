"""Row normalisations: layer_norm (with an optional fused residual add) and l2_normalize.

layer_norm: the statistics are accumulated in float64 over float32 data in one pass (sum and sum of
squares; the variance's relative error is ~n eps64 (mean^2 / var + 1), under 1e-7 while |mean| / std <=
1e4, and squares of large float32 values cannot overflow); the output pass runs in float32 with the mean
split into two floats, so a large mean does not cost the deviations their precision. Its sums vectorise
through kernels/reduce.add_reassoc (reassociation on those adds only: a kernel-wide flag could regroup
(y - hi) - lo); l2_normalize uses fastmath={"reassoc", "contract"} for the same purpose. Neither sets
nnan/ninf, so NaN and inf still propagate as IEEE says.

Aliasing: `out` may be `x` (in place). A loop reading `x` and writing `out` gets an LLVM runtime
overlap check that falls back to scalar code when they are the same buffer, so the in-place case
passes one row view as both source and destination.
"""
import numpy as np

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.reduce import add_reassoc

_REDUCE = {"reassoc", "contract"}


@helper
def _layer_norm_row(src, res, has_res, gamma, beta, eps, dst):
    """dst = (y - mean(y)) / sqrt(var(y) + eps) * gamma + beta with y = src (+ res); 1-D rows."""
    n = src.shape[0]
    s = 0.0
    q = 0.0
    if has_res:
        for j in range(n):
            y = np.float64(np.float32(src[j] + res[j]))
            s = add_reassoc(s, y)
            q = add_reassoc(q, y * y)
    else:
        for j in range(n):
            y = np.float64(src[j])
            s = add_reassoc(s, y)
            q = add_reassoc(q, y * y)
    mean = s / n
    var = q / n - mean * mean  # biased variance, as torch; float64 error ~ n eps64 (mean^2 / var + 1)
    var = 0.0 if var < 0.0 else var  # rounding can take a constant row's variance just below 0
    rstd = np.float32(1.0 / np.sqrt(var + eps))
    # y - mean in float32 without losing the mean's low bits: mean = hi + lo, (y - hi) is exact when y is
    # near the mean (Sterbenz), and lo carries what float32 cannot hold of a large mean
    hi = np.float32(mean)
    lo = np.float32(mean - np.float64(hi))
    if has_res:
        for j in range(n):
            y = src[j] + res[j]
            dst[j] = (((y - hi) - lo) * rstd) * gamma[j] + beta[j]
    else:
        for j in range(n):
            dst[j] = (((src[j] - hi) - lo) * rstd) * gamma[j] + beta[j]


# only contraction: reassociation could fold (y - hi) - lo into y - (hi + lo); the sums use add_reassoc
@kernel(fastmath={"contract"})
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
