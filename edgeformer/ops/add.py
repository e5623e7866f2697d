"""add: y = a + b for two values of the same kind and width (a residual connection that cannot be fused
into a linear, e.g. after an attention without output projection as in MemoryFormer). NumPy's add:
one vectorised pass that releases the GIL, nothing to gain from a kernel."""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import SEQUENCES, TOKENS, ValueType
from edgeformer.ops.base import inputs_count, same_width


class Add:
    op = "add"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 2)
        a, b = in_types
        if a.kind not in (TOKENS, SEQUENCES) or b.kind != a.kind:
            raise GraphError(f"node {node.name!r}: add needs two token values or two sequence values")
        same_width(node, "second input", b.width, a.width)
        return [ValueType(a.kind, a.width)]

    @staticmethod
    def bind(node, weights):
        def run(inputs, batch, workers):
            return [np.add(inputs[0], inputs[1])]

        return run
