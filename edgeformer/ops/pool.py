"""pool: one vector per sequence from its valid tokens — mean (sentence-transformers) or cls (first token).

An empty sequence (all padding) pools to zeros, as sentence-transformers' clamped mean does.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import SEQUENCES, TOKENS, ValueType
from edgeformer.ops.base import attr, inputs_count

MODES = ("mean", "cls")


class Pool:
    op = "pool"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        attr(node, "mode", str, "mean", MODES)
        if in_types[0].kind != TOKENS:
            raise GraphError(f"node {node.name!r}: pool input must be a token value")
        return [ValueType(SEQUENCES, in_types[0].width)]

    @staticmethod
    def bind(node, weights):
        mode = node.attrs.get("mode", "mean")

        def run(inputs, batch, workers):
            from edgeformer.kernels.pool import cls_pool, mean_pool

            x = inputs[0]
            out = np.empty((batch.batch_size, x.shape[1]), dtype=np.float32)  # (B, d)
            kernel = mean_pool if mode == "mean" else cls_pool
            workers.split(kernel, batch.batch_size, x, batch.cu_seqlens, out, min_per_thread=8)
            return [out]

        return run
