"""Sequence pooling over packed tokens: mean and first-token (CLS) pooling."""
import numpy as np

from edgeformer.kernels._jit import kernel


@kernel
def mean_pool(x, cu_seqlens, out, b0, b1):
    """out[b] = mean of x[cu_seqlens[b]:cu_seqlens[b+1]] for b0 <= b < b1; an empty sequence gives 0.

    x (T, d) f32 packed tokens; cu_seqlens (B+1,) int64, non-decreasing; out (B, d) f32.
    Sums are accumulated in float64 (one scratch row per call).
    """
    d = out.shape[1]
    acc = np.empty(d, dtype=np.float64)  # (d,)
    for b in range(b0, b1):
        s = cu_seqlens[b]
        e = cu_seqlens[b + 1]
        o = out[b]  # (d,)
        if e <= s:
            for j in range(d):
                o[j] = 0.0
            continue
        for j in range(d):
            acc[j] = 0.0
        for t in range(s, e):
            xr = x[t]  # (d,)
            for j in range(d):
                acc[j] += xr[j]
        n = np.float64(e - s)
        for j in range(d):
            o[j] = acc[j] / n


@kernel
def cls_pool(x, cu_seqlens, out, b0, b1):
    """out[b] = x[cu_seqlens[b]] (first token of sequence b) for b0 <= b < b1; empty gives 0.

    x (T, d) f32 packed tokens; cu_seqlens (B+1,) int64, non-decreasing; out (B, d) f32.
    """
    d = out.shape[1]
    for b in range(b0, b1):
        s = cu_seqlens[b]
        o = out[b]  # (d,)
        if cu_seqlens[b + 1] <= s:
            for j in range(d):
                o[j] = 0.0
        else:
            xr = x[s]  # (d,)
            for j in range(d):
                o[j] = xr[j]
