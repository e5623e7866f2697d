"""NumPy references of sequence pooling over packed tokens (float64 result)."""
import numpy as np


def mean_pool_ref(x, cu_seqlens):
    """Row b = mean of x[cu_seqlens[b]:cu_seqlens[b+1]] (zeros for an empty sequence)."""
    x = np.asarray(x, np.float64)
    cu = np.asarray(cu_seqlens)
    out = np.zeros((len(cu) - 1, x.shape[1]))
    for b in range(len(cu) - 1):
        if cu[b + 1] > cu[b]:
            out[b] = x[cu[b]:cu[b + 1]].mean(axis=0)
    return out


def cls_pool_ref(x, cu_seqlens):
    """Row b = x[cu_seqlens[b]], the first token of sequence b (zeros for an empty sequence)."""
    x = np.asarray(x, np.float64)
    cu = np.asarray(cu_seqlens)
    out = np.zeros((len(cu) - 1, x.shape[1]))
    for b in range(len(cu) - 1):
        if cu[b + 1] > cu[b]:
            out[b] = x[cu[b]]
    return out
