"""NumPy reference of rms_norm (float64)."""
import numpy as np


def rms_norm_ref(x, scale, eps=1e-8, eps_outside=True):
    """x / (sqrt(mean(x^2)) + eps) * scale (GPT-NeoX) or x / sqrt(mean(x^2) + eps) * scale."""
    x = np.asarray(x, np.float64)
    ms = (x * x).mean(-1, keepdims=True)
    denom = np.sqrt(ms) + eps if eps_outside else np.sqrt(ms + eps)
    return x / denom * np.asarray(scale, np.float64)
