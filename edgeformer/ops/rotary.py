"""rotary: rotary position embedding on the Q and K blocks of a fused qkv (T, 3*H*dh) value.

Attributes: num_heads, head_dim (as the attention op that follows), rotary_dims (even, 2..head_dim: the
first rotary_dims dims of each head are rotated, e.g. GPT-NeoX rotary_pct 0.25 -> int(0.25 * head_dim)),
base (default 10000). Layout GPT-NeoX "rotate_half" (kernels/rotary.py). The position of a token is its
index in the padded row (Batch.positions), as for learned positions (GPT-2 loader): with right padding
that is 0..L-1 in every sequence. cos/sin tables are computed in float32 per call for the positions
present (inv_freq = 1 / base^(2i/rot) and the angle p * inv_freq in float32, as GPT-NeoX does).
"""
from __future__ import annotations

import math

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import TOKENS, ValueType
from edgeformer.ops.base import attr, inputs_count


def _params(node):
    heads, head_dim = attr(node, "num_heads", int), attr(node, "head_dim", int)
    rot = attr(node, "rotary_dims", int)
    base = attr(node, "base", float, 10000.0)
    if heads < 1 or head_dim < 1:
        raise GraphError(f"node {node.name!r}: num_heads and head_dim must be >= 1")
    if rot < 2 or rot > head_dim or rot % 2:
        raise GraphError(f"node {node.name!r}: rotary_dims must be even and in [2, head_dim={head_dim}], got {rot}")
    if not (math.isfinite(base) and base > 1):
        raise GraphError(f"node {node.name!r}: base must be finite and > 1, got {base}")
    return heads, head_dim, rot, base


def rotary_tables(num_positions: int, rot: int, base: float):
    """(cos, sin), each (num_positions, rot/2) float32, angles p * base^(-2i/rot) in float32."""
    exponents = np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)  # (rot/2,)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # (P, rot/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Rotary:
    op = "rotary"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        heads, head_dim, _, _ = _params(node)
        if in_types[0].kind != TOKENS:
            raise GraphError(f"node {node.name!r}: rotary input must be a token value")
        if in_types[0].width != 3 * heads * head_dim:
            raise GraphError(f"node {node.name!r}: qkv width {in_types[0].width} != 3 * num_heads * head_dim "
                             f"= {3 * heads * head_dim}")
        return [ValueType(TOKENS, in_types[0].width)]

    @staticmethod
    def bind(node, weights):
        heads, head_dim, rot, base = _params(node)
        cache = {}

        def run(inputs, batch, workers):
            from edgeformer.kernels.rotary import rotary_qkv

            qkv = inputs[0]
            positions = batch.positions  # (T,) int64, >= 0
            need = int(positions.max()) + 1 if positions.size else 1
            tables = cache.get("t")
            if tables is None or tables[0].shape[0] < need:
                tables = rotary_tables(max(need, 64), rot, base)
                cache["t"] = tables  # grows only; a race just recomputes the same values
            out = np.empty_like(qkv)  # (T, 3*H*dh)
            workers.split(rotary_qkv, qkv.shape[0], qkv, positions, tables[0], tables[1], heads, head_dim, rot, out,
                          min_per_thread=16)
            return [out]

        return run
