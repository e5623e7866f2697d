"""attention: multi-head attention over the packed tokens of each sequence, with a registry of kinds.

Input: by default qkv (T, 3*H*dh) from a fused Q/K/V projection, columns [Q | K | V], head h at
h*dh:(h+1)*dh. Output: (T, H*dh). Each sequence attends only to its own valid tokens (padding-free
batches), so no mask is materialised. A kind (softmax, binary_hash, ...) is a class registered with
``@register_kind(name)`` holding its own kernel; the session never sees kinds.

Kind protocol: ``cls(node, num_heads, head_dim)`` validates the node's attributes at load time and is
called as ``kind(x, batch, out, workers)``. A kind with weights sets the class attribute
``takes_weights = True`` and is constructed as ``cls(node, num_heads, head_dim, weights)`` (it checks
its own weights); other kinds reject weights. A kind may declare its own input layout through an
``input_width`` attribute (default 3*H*dh, the [Q | K | V] layout); binary_hash, for example, also
accepts EcoFormer's shared-QK layout [U | V] of width 2*H*dh. A kind that also reads the attention
layer's input (the ``gated`` kind's gate) sets ``layer_input_width`` (an int, d_model): the node then
takes that value as a second input, (T, d_model), and the kind is called as
``kind(x, batch, out, workers, layer_input)``; every other kind takes exactly one input.
"""
from __future__ import annotations

import math

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import TOKENS, ValueType
from edgeformer.ops.base import attr, inputs_count

KINDS: dict[str, type] = {}


def register_kind(name: str):
    def wrap(cls):
        KINDS[name] = cls
        return cls

    return wrap


def balanced_items(lengths: np.ndarray, num_heads: int, parts: int, head_dim: int) -> list[tuple[int, int]]:
    """Split the B*H (sequence, head) items into contiguous ranges of about equal cost L*(L + dh)."""
    if parts <= 1:
        total_items = len(lengths) * num_heads
        return [(0, total_items)] if total_items else []
    return balanced_by_cost(lengths * (lengths + head_dim), num_heads, parts)


def balanced_by_cost(cost_per_sequence: np.ndarray, num_heads: int, parts: int) -> list[tuple[int, int]]:
    """Split the B*H (sequence, head) items into contiguous ranges of about equal total cost, given the
    cost of one head of each sequence (B,)."""
    total_items = len(cost_per_sequence) * num_heads
    if parts <= 1 or total_items <= 1:
        return [(0, total_items)] if total_items else []
    cost = np.repeat(np.asarray(cost_per_sequence, dtype=np.float64), num_heads)  # (B*H,)
    cum = np.cumsum(cost)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="right")
    bounds = [0] + sorted(set(int(c) for c in cuts if 0 < c < total_items)) + [total_items]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


PRECISIONS = ("fp32", "bf16")


def bf16_attention_available() -> bool:
    """Does this CPU run attention's bf16 products natively (kernels/gemm_bf16.py)?"""
    from edgeformer.kernels.gemm_bf16 import bf16_available

    return bf16_available()


@register_kind("softmax")
class SoftmaxAttention:
    """softmax(scale * Q K^T [+ causal mask]) V per head, tiled with an online softmax.

    Attribute ``precision``: "fp32" (default) or "bf16": the probabilities and V rounded to bf16 for the
    P V product, float32 accumulation, scores float32 (kernels/attention_bf16.py), on CPUs with AVX512-BF16
    and for non-causal sequences of <= 128 tokens; everywhere else the float32 kernel runs (a model file asks
    for bf16 as an allowed approximation, never as a requirement). The int8 converters set it."""

    def __init__(self, node, num_heads, head_dim):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = attr(node, "scale", float, 1.0 / math.sqrt(head_dim))
        self.causal = bool(attr(node, "causal", bool, False))
        self.precision = attr(node, "precision", str, "fp32", choices=PRECISIONS)
        if not math.isfinite(self.scale):
            raise GraphError(f"node {node.name!r}: attention scale must be finite, got {self.scale!r}")
        self.bf16 = self.precision == "bf16" and not self.causal and bf16_attention_available()

    def __call__(self, qkv, batch, out, workers):
        chunks = balanced_items(batch.lengths, self.num_heads, workers.threads, self.head_dim)
        if self.bf16:
            from edgeformer.kernels.attention_bf16 import attention_softmax_bf16

            workers.run(attention_softmax_bf16, chunks, qkv, batch.cu_seqlens, self.num_heads, self.head_dim,
                        self.scale, out)
            return
        from edgeformer.kernels.attention import attention_softmax

        workers.run(attention_softmax, chunks, qkv, batch.cu_seqlens, self.num_heads, self.head_dim,
                    self.scale, self.causal, out)


class Attention:
    op = "attention"

    @staticmethod
    def _kind(node, weights):
        kind = attr(node, "kind", str, "softmax")
        if kind not in KINDS:
            raise GraphError(f"node {node.name!r}: unknown attention kind {kind!r}; known: {sorted(KINDS)}")
        heads, head_dim = attr(node, "num_heads", int), attr(node, "head_dim", int)
        if heads < 1 or head_dim < 1:
            raise GraphError(f"node {node.name!r}: num_heads and head_dim must be >= 1")
        kind_cls = KINDS[kind]
        if getattr(kind_cls, "takes_weights", False):
            return kind_cls(node, heads, head_dim, weights)
        if weights:
            raise GraphError(f"node {node.name!r}: attention kind {kind!r} takes no weights, got {sorted(weights)}")
        return kind_cls(node, heads, head_dim)

    @classmethod
    def infer(cls, node, in_types, weights):
        kind = cls._kind(node, weights)
        layer_width = getattr(kind, "layer_input_width", None)
        inputs_count(node, in_types, 1 if layer_width is None else 2)
        if any(t.kind != TOKENS for t in in_types):
            raise GraphError(f"node {node.name!r}: attention inputs must be token values")
        if layer_width is not None and in_types[1].width != layer_width:
            raise GraphError(f"node {node.name!r}: layer input width {in_types[1].width} != {layer_width} "
                             f"(the width the {node.attrs.get('kind')!r} kind's weights read)")
        width = kind.num_heads * kind.head_dim
        want = getattr(kind, "input_width", 3 * width)
        if in_types[0].width != want:
            layout = getattr(kind, "layout_name", "qkv width")
            raise GraphError(f"node {node.name!r}: {layout} input width {in_types[0].width} != {want} "
                             f"(num_heads={kind.num_heads}, head_dim={kind.head_dim})"
                             if layout != "qkv width" else
                             f"node {node.name!r}: qkv width {in_types[0].width} != 3 * num_heads * head_dim "
                             f"= {3 * width}")
        return [ValueType(TOKENS, width)]

    @classmethod
    def bind(cls, node, weights):
        kind = cls._kind(node, weights)
        width = kind.num_heads * kind.head_dim
        takes_layer_input = getattr(kind, "layer_input_width", None) is not None

        def run(inputs, batch, workers):
            qkv = np.ascontiguousarray(inputs[0], dtype=np.float32)  # kernels hand BLAS unit-stride rows
            out = np.empty((qkv.shape[0], width), dtype=np.float32)  # (T, H*dh)
            if takes_layer_input:
                kind(qkv, batch, out, workers, inputs[1])
            else:
                kind(qkv, batch, out, workers)
            return [out]

        run.kind = kind  # edgeformer/fusion.py reads it
        return run
