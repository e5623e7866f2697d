"""NumPy references for the activations and the scalar math of edgeformer/kernels/mathfn.py.

Plain float64 NumPy (and the float64 `math.erf`/`math.erfc`, NumPy has no erf); every function
returns a float64 array. They are test oracles and slow fallbacks, not fast paths.
"""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])

# the same codes as edgeformer.kernels.mathfn.ACT_* (kept separate: references import no kernels)
ACT_NAMES = {0: "none", 1: "relu", 2: "gelu_erf", 3: "gelu_tanh"}


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def exp_ref(x):
    with np.errstate(over="ignore"):
        return np.exp(_f64(x))


def erf_ref(x):
    return _erf(_f64(x))


def tanh_ref(x):
    return np.tanh(_f64(x))


def relu(x):
    """max(x, 0), NaN propagating."""
    x = _f64(x)
    return np.where(x < 0, 0.0, x)


def gelu_erf(x):
    """x * Phi(x) = x * erfc(-x / sqrt2) / 2 (erfc keeps the negative tail exact)."""
    x = _f64(x)
    with np.errstate(invalid="ignore"):
        return x * 0.5 * _erfc(-x / math.sqrt(2.0))


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Evaluated through the identity (1 + tanh(u)) / 2 = 1 / (1 + exp(-2u)): the literal formula
    cancels to 0 for x below about -6 even in float64.
    """
    x = _f64(x)
    with np.errstate(over="ignore", invalid="ignore"):
        u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
        return x / (1.0 + np.exp(-2.0 * u))


def activation_ref(x, act="none"):
    """Apply an activation given by name ("none", "relu", "gelu"/"gelu_erf", "gelu_tanh") or code."""
    name = ACT_NAMES.get(act, act) if isinstance(act, (int, np.integer)) else act
    if name == "none":
        return _f64(x).copy()
    if name == "relu":
        return relu(x)
    if name in ("gelu", "gelu_erf"):
        return gelu_erf(x)
    if name == "gelu_tanh":
        return gelu_tanh(x)
    raise ValueError(f"unknown activation {act!r}")
