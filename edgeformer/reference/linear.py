"""NumPy reference of the fp32 linear layer (float64 inside, float64 result)."""
import numpy as np

from edgeformer.reference.activation import activation_ref


def linear_ref(x, w, bias=None, residual=None, act="none"):
    """act(x @ w.T + bias) + residual; x (T, K), w (N, K) (PyTorch layout), bias (N,), residual (T, N)."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    y = activation_ref(y, act)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    return y
