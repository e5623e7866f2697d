"""activation: element-wise gelu (erf form), gelu_tanh or relu, for graphs where it is not fused."""
from __future__ import annotations

import numpy as np

from edgeformer.graph import ValueType
from edgeformer.ops.base import attr, inputs_count
from edgeformer.ops.linear import ACTIVATIONS


class Activation:
    op = "activation"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        attr(node, "function", str, None, set(ACTIVATIONS) - {"none"})
        return [ValueType(in_types[0].kind, in_types[0].width)]

    @staticmethod
    def bind(node, weights):
        act = ACTIVATIONS[node.attrs["function"]]

        def run(inputs, batch, workers):
            from edgeformer.kernels.linear import activation

            x = inputs[0]
            out = np.empty_like(x)
            workers.split(activation, x.shape[0], x, act, out, min_per_thread=16)
            return [out]

        return run
