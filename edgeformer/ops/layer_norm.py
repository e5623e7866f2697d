"""layer_norm: y = (z - mean(z)) / sqrt(var(z) + eps) * gamma + beta, z = x (+ residual)."""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import SEQUENCES, TOKENS, ValueType
from edgeformer.ops.base import NO_MATRIX, attr, inputs_count, same_width, weight


class LayerNorm:
    op = "layer_norm"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1, 2)
        gamma, beta = weight(node, weights, "gamma", 1), weight(node, weights, "beta", 1)
        if in_types[0].kind not in (TOKENS, SEQUENCES):
            raise GraphError(f"node {node.name!r}: layer_norm input must be a token or sequence value")
        for t in in_types:
            same_width(node, "input", t.width, gamma.shape[0])
        same_width(node, "beta", beta.shape[0], gamma.shape[0])
        if not attr(node, "eps", float, 1e-5) > 0:
            raise GraphError(f"node {node.name!r}: eps must be > 0")
        return [ValueType(in_types[0].kind, gamma.shape[0])]

    @staticmethod
    def bind(node, weights):
        gamma, beta = weights["gamma"], weights["beta"]
        eps = float(node.attrs.get("eps", 1e-5))

        def run(inputs, batch, workers):
            from edgeformer.kernels.norm import layer_norm

            x = inputs[0]
            residual = inputs[1] if len(inputs) == 2 else NO_MATRIX
            out = np.empty_like(x)  # (T, d)
            workers.split(layer_norm, x.shape[0], x, residual, gamma, beta, eps, out, min_per_thread=16)
            return [out]

        run.params = (gamma, beta, eps)  # edgeformer/fusion.py reads them
        return run
