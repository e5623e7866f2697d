"""NumPy references of the int8 linear (kernels/gemm_s8.py, ops/linear_int8.py).

Activation quantisation twins repeat the kernels' float32 operations in the same order (np.rint rounds
half to even like the kernels' magic-number rounding), so they are exact oracles, bit for bit; the
accumulators are exact integers (int64 here); the epilogue repeats the kernel's float32 operations.

Activation storage (both modes, as the kernels): u8 codes a with a per-row zero point zp, the value
being (a - zp) * scale; symmetric rows have zp = 128 and a - 128 in [-127, 127].
"""
import numpy as np

from edgeformer.reference.activation import activation_ref

F32 = np.float32


def _smoothed(x, smooth):
    x = np.asarray(x, F32)
    if smooth is None or np.asarray(smooth).shape[0] == 0:
        return x
    return (x * np.asarray(smooth, F32)[None, :]).astype(F32)  # (T, K), rounded to float32 like the kernel


def quantize_rows_ref(x, asym, smooth=None):
    """Dynamic per-row quantisation (kernels quantize_rows / quantize_rows_smooth) of x (T, K) float32.
    Returns (q (T, K) u8, scale (T,) f32, zp (T,) int32)."""
    x = _smoothed(x, smooth)
    t, k = x.shape
    if not asym:
        m = np.abs(x).max(axis=1) if k else np.zeros(t, F32)
        inv = np.where(m > 0, F32(127) / np.where(m > 0, m, F32(1)), F32(0)).astype(F32)
        s = np.where(m > 0, m / F32(127), F32(0)).astype(F32)
        q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int32) + 128
        zp = np.full(t, 128, np.int32)
    else:
        lo = np.minimum(x.min(axis=1), F32(0))
        hi = np.maximum(x.max(axis=1), F32(0))
        rng = (hi - lo).astype(F32)
        inv = np.where(rng > 0, F32(255) / np.where(rng > 0, rng, F32(1)), F32(0)).astype(F32)
        s = np.where(rng > 0, rng / F32(255), F32(0)).astype(F32)
        zf = np.clip(np.rint(-lo * inv), 0, 255).astype(F32)
        q = np.clip(np.rint(x * inv[:, None]) + zf[:, None], 0, 255).astype(np.int32)
        zp = zf.astype(np.int32)
    return q.astype(np.uint8), s.astype(F32), zp


def quantize_rows_static_ref(x, asym, scale, zero_point=None, smooth=None):
    """Static per-tensor quantisation (kernel quantize_rows_static) of x (T, K) float32 with one scale
    (float32 > 0) and, asymmetric, one zero point in [0, 255]:

        inv = float32(1 / scale)                                  (float32 division)
        symmetric:  a = clip(rint(x * inv), -127, 127) + 128,     zp = 128
        asymmetric: a = clip(rint(x * inv) + zero_point, 0, 255), zp = zero_point

    Out-of-range values (and +-inf) clip to the end codes; NaN maps to the top code (255) — the kernel's
    NaN-safe clip `v if v < hi else hi`. Returns (q (T, K) u8, scale (T,) f32, zp (T,) int32)."""
    x = _smoothed(x, smooth)
    t = x.shape[0]
    scale = F32(np.asarray(scale, F32).reshape(-1)[0])
    inv = F32(F32(1) / scale)
    z = 128 if not asym else int(np.asarray(zero_point).reshape(-1)[0])
    lo, hi = (1, 255) if not asym else (0, 255)  # symmetric: rint + 128 in [1, 255] <=> rint in [-127, 127]
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.rint(x * inv) + F32(z)
        v = np.where(v < hi, v, F32(hi))  # NaN -> hi
        v = np.where(v > lo, v, F32(lo))
    return v.astype(np.uint8), np.full(t, scale, F32), np.full(t, z, np.int32)


def acc_ref(aq, zp, wq):
    """Exact accumulators sum_k (a[r, k] - zp[r]) * w[n, k] (int64, then int32: they fit by the bound
    255 * 127 * K < 2**31 for K <= gemm_s8.K_MAX). aq (T, >= K) u8 (padding columns ignored), wq (N, K)."""
    k = wq.shape[1]
    acc = (np.asarray(aq)[:, :k].astype(np.int64) - np.asarray(zp)[:, None].astype(np.int64)) \
        @ np.asarray(wq).astype(np.int64).T
    if np.abs(acc).max(initial=0) >= 2 ** 31:
        raise OverflowError("int8 accumulators exceed int32: K beyond the documented bound")
    return acc.astype(np.int32)


def epilogue_ref(acc, sa, ws, bias=None, residual=None, act=0):
    """The kernel's float epilogue: act((f32(acc) * ws[n]) * sa[r] + bias[n]) + residual, float32; act is
    a kernels.mathfn.ACT_* code (the activation itself is evaluated in float64, then rounded)."""
    y = (acc.astype(F32) * np.asarray(ws, F32)[None, :]) * np.asarray(sa, F32)[:, None]
    if bias is not None:
        y = y + np.asarray(bias, F32)[None, :]
    if act:
        y = activation_ref(y.astype(np.float64), int(act)).astype(F32)
    if residual is not None:
        y = y + np.asarray(residual, F32)
    return y


def linear_int8_ref(x, wq, ws, bias=None, residual=None, act=0, asym=1, smooth=None, scale=None,
                    zero_point=None):
    """The whole int8 linear: quantise x (dynamic per row, or static per tensor when scale is given),
    exact accumulators, float epilogue. wq (N, K) int8 in [-127, 127], ws (N,) f32."""
    if scale is None:
        q, sa, zp = quantize_rows_ref(x, asym, smooth)
    else:
        q, sa, zp = quantize_rows_static_ref(x, asym, scale, zero_point, smooth)
    return epilogue_ref(acc_ref(q, zp, wq), sa, ws, bias, residual, act)
