"""activation: element-wise gelu (erf form), gelu_tanh, relu or tanh, for graphs where it is not fused.

tanh (the ViT / BERT pooler's activation) is not a linear epilogue (ops/linear.py ACTIVATIONS): it runs here, in
place on a copy of the input (kernels/linear.py's in-place path applies mathfn.act_inplace, which knows every code)."""
from __future__ import annotations

import numpy as np

from edgeformer.graph import ValueType
from edgeformer.ops.base import attr, inputs_count
from edgeformer.kernels.mathfn import ACT_TANH
from edgeformer.ops.linear import ACTIVATIONS

FUNCTIONS = {**{k: v for k, v in ACTIVATIONS.items() if k != "none"}, "tanh": ACT_TANH}


class Activation:
    op = "activation"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        attr(node, "function", str, None, set(FUNCTIONS))
        return [ValueType(in_types[0].kind, in_types[0].width)]

    @staticmethod
    def bind(node, weights):
        act = FUNCTIONS[node.attrs["function"]]
        inplace = act == ACT_TANH

        def run(inputs, batch, workers):
            from edgeformer.kernels.linear import activation

            x = inputs[0]
            out = x.copy() if inplace else np.empty_like(x)
            workers.split(activation, x.shape[0], out if inplace else x, act, out, min_per_thread=16)
            return [out]

        return run
