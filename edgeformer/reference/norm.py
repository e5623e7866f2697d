"""NumPy references of the row normalisations (float64 inside, float64 result)."""
import numpy as np


def layer_norm_ref(x, gamma, beta, eps=1e-5, residual=None):
    """(y - mean) / sqrt(var + eps) * gamma + beta over the last axis, y = x + residual, biased var."""
    y = np.asarray(x, np.float64)
    if residual is not None:
        y = y + np.asarray(residual, np.float64)
    mean = y.mean(axis=-1, keepdims=True)
    var = ((y - mean) ** 2).mean(axis=-1, keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)


def l2_normalize_ref(x, eps=1e-12):
    """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize, p=2)."""
    x = np.asarray(x, np.float64)
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / np.maximum(norm, eps)
