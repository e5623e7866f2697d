"""Convert-time int8 quantisation of linear layers (the "int8" / "int8_weights" weight formats).

``LinearPolicy(mode, keep_fp32=..., activation_quant=...)`` is handed to a loader (converters/bert.py)
in place of ``packed_linear``: ``policy.linear(tensors, name, w, b)`` stores the layer either as fp32
(default, or when ``name`` matches one of the ``keep_fp32`` fnmatch patterns) or as int8.

Modes:
    "dynamic-int8"  format "int8": int8 per-output-channel weights, activations quantised per token at run
                    time, int8 GEMM (kernels/gemm_s8.py).
    "weights-int8"  format "int8_weights": the same int8 tensors (same file size), dequantised to fp32 once at
                    load and run by the fp32 kernel (accuracy of weight-only quantisation, fp32 speed/RAM).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np

from edgeformer.errors import EdgeformerError
from edgeformer.kernels import gemm_s8

MODES = {"dynamic-int8": "int8", "weights-int8": "int8_weights"}
ACTIVATION_QUANT = ("asymmetric", "symmetric")


def int8_linear(tensors, name, w, b=None, *, fmt="int8", activation_quant="asymmetric", weight_method="maxabs"):
    """Quantise a dense (N, K) float weight per output channel, pack it for gemm_s8; return (weights, attrs)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k > gemm_s8.K_MAX:
        raise EdgeformerError(f"{name}: in_features {k} exceeds the int8 accumulation bound {gemm_s8.K_MAX}; "
                              f"keep this layer in fp32 (keep_fp32)")
    if not np.all(np.isfinite(w)):
        raise EdgeformerError(f"{name}: weight has non-finite values")
    wq, scale = gemm_s8.quantize_weight(w, weight_method)
    tensors[f"{name}.weight_s8"] = gemm_s8.pack_weight(wq)
    tensors[f"{name}.weight_scale"] = scale
    weights = {"weight_s8": f"{name}.weight_s8", "weight_scale": f"{name}.weight_scale"}
    if b is not None:
        tensors[f"{name}.bias"] = np.asarray(b, dtype=np.float32)
        weights["bias"] = f"{name}.bias"
    attrs = {"format": fmt, "out_features": int(n), "in_features": int(k)}
    if fmt == "int8":
        attrs["activation_quant"] = activation_quant
    return weights, attrs


class LinearPolicy:
    """Which format each linear layer is stored in."""

    def __init__(self, mode: str, keep_fp32=(), activation_quant: str = "asymmetric", weight_method: str = "maxabs"):
        if mode not in MODES:
            raise EdgeformerError(f"unknown quantize mode {mode!r}; known: {sorted(MODES)}")
        if activation_quant not in ACTIVATION_QUANT:
            raise EdgeformerError(f"activation_quant must be one of {ACTIVATION_QUANT}, got {activation_quant!r}")
        if isinstance(keep_fp32, str):
            keep_fp32 = [keep_fp32]
        self.mode, self.keep_fp32, self.activation_quant = mode, list(keep_fp32 or ()), activation_quant
        if weight_method not in ("maxabs", "mse"):
            raise EdgeformerError(f"weight_method must be 'maxabs' or 'mse', got {weight_method!r}")
        self.weight_method = weight_method
        self.kept: list[str] = []
        self.quantized: list[str] = []

    def keeps(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.keep_fp32)

    def linear(self, tensors, name, w, b=None):
        from converters.bert import packed_linear

        if self.keeps(name):
            self.kept.append(name)
            return packed_linear(tensors, name, w, b)
        self.quantized.append(name)
        return int8_linear(tensors, name, w, b, fmt=MODES[self.mode], activation_quant=self.activation_quant,
                           weight_method=self.weight_method)
