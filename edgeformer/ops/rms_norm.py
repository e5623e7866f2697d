"""rms_norm: y = x / (rms(x) + eps) * scale (GPT-NeoX, attr eps_outside=True, the default) or
y = x / sqrt(mean(x^2) + eps) * scale (T5/LLaMA, eps_outside=False); rms(x) = sqrt(mean(x^2)).

Weight ``scale`` (d,) float32. ``eps`` > 0 (NeoX's default is 1e-8). Kernel: kernels/rms_norm.py.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import SEQUENCES, TOKENS, ValueType
from edgeformer.ops.base import attr, inputs_count, same_width, weight


class RmsNorm:
    op = "rms_norm"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        scale = weight(node, weights, "scale", 1)
        if in_types[0].kind not in (TOKENS, SEQUENCES):
            raise GraphError(f"node {node.name!r}: rms_norm input must be a token or sequence value")
        same_width(node, "input", in_types[0].width, scale.shape[0])
        eps = attr(node, "eps", float, 1e-8)
        if not (np.isfinite(eps) and eps > 0):
            raise GraphError(f"node {node.name!r}: eps must be finite and > 0")
        attr(node, "eps_outside", bool, True)
        return [ValueType(in_types[0].kind, scale.shape[0])]

    @staticmethod
    def bind(node, weights):
        scale = weights["scale"]
        eps = float(node.attrs.get("eps", 1e-8))
        outside = bool(node.attrs.get("eps_outside", True))

        def run(inputs, batch, workers):
            from edgeformer.kernels.rms_norm import rms_norm

            x = inputs[0]
            out = np.empty_like(x)  # (T, d)
            workers.split(rms_norm, x.shape[0], x, scale, eps, outside, out, min_per_thread=16)
            return [out]

        return run
