"""normalize: y = x / max(||x||_2, eps) per row (torch.nn.functional.normalize)."""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import ValueType
from edgeformer.ops.base import attr, inputs_count


class Normalize:
    op = "normalize"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        if attr(node, "p", int, 2) != 2:
            raise GraphError(f"node {node.name!r}: only the L2 norm (p=2) is supported")
        if not attr(node, "eps", float, 1e-12) > 0:
            raise GraphError(f"node {node.name!r}: eps must be > 0")
        return [ValueType(in_types[0].kind, in_types[0].width)]

    @staticmethod
    def bind(node, weights):
        eps = float(node.attrs.get("eps", 1e-12))

        def run(inputs, batch, workers):
            from edgeformer.kernels.norm import l2_normalize

            x = inputs[0]
            out = np.empty_like(x)
            workers.split(l2_normalize, x.shape[0], x, eps, out, min_per_thread=64)
            return [out]

        return run
