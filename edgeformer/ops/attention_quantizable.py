"""Attention kinds ``clipped_softmax`` and ``gated`` (Quantizable Transformers, seed_algorithms §3, docs/QUANTIZABLE.md).

``clipped_softmax``: input qkv (T, 3*H*dh) as ``softmax``; attributes
  gamma   <= 0 (required), finite; the clip's lower stretch. Models trained with gamma = -alpha / T use the
          *training* max length T: the converter stores the resulting gamma, inference never rescales it.
  zeta    >= 1 (default 1), finite.
  scale   default 1/sqrt(dh); causal default false.

``gated``: sigmoid(G(x)) * attention(x) per head and token, G a linear gate on the attention layer's input x.
  Inputs: qkv (T, 3*H*dh) and the layer input x (T, d_model) (the value the Q/K/V projection read).
  Attributes: gate "per_head" (default; head h's gate reads x[:, h*dh:(h+1)*dh], so d_model = H*dh) or
  "all_heads" (reads all of x); softmax "softmax" (default) or "clipped" (then gamma, zeta as above);
  gate_scale > 0 (default 1; the official fine-tuning mode multiplies the gate by 1/pi_init); scale, causal.
  Weights: gate_weight (H, dh) per head / (H, d_model) all heads, gate_bias (H,); float32, finite.
"""
from __future__ import annotations

import math

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.ops.attention import balanced_items, register_kind
from edgeformer.ops.base import attr

GATES = ("per_head", "all_heads")
SOFTMAXES = ("softmax", "clipped")


def clip_params(node) -> tuple[float, float]:
    """(gamma, zeta) from the node's attributes, checked: gamma finite <= 0, zeta finite >= 1."""
    name = f"node {node.name!r}"
    gamma = attr(node, "gamma", float)
    zeta = attr(node, "zeta", float, 1.0)
    if not math.isfinite(gamma) or gamma > 0:
        raise GraphError(f"{name}: clipped softmax needs a finite gamma <= 0, got {gamma!r}")
    if not math.isfinite(zeta) or zeta < 1:
        raise GraphError(f"{name}: clipped softmax needs a finite zeta >= 1, got {zeta!r}")
    return gamma, zeta


def _scale(node, head_dim) -> float:
    scale = attr(node, "scale", float, 1.0 / math.sqrt(head_dim))
    if not math.isfinite(scale):
        raise GraphError(f"node {node.name!r}: attention scale must be finite, got {scale!r}")
    return scale


def _attend(qkv, batch, out, workers, num_heads, head_dim, scale, causal, clip):
    """Run (clipped) softmax attention over all work items; returns the work chunks used."""
    chunks = balanced_items(batch.lengths, num_heads, workers.threads, head_dim)
    if clip is None:
        from edgeformer.kernels.attention import attention_softmax

        workers.run(attention_softmax, chunks, qkv, batch.cu_seqlens, num_heads, head_dim, scale, causal, out)
    else:
        from edgeformer.kernels.attention_clipped import attention_clipped_softmax

        workers.run(attention_clipped_softmax, chunks, qkv, batch.cu_seqlens, num_heads, head_dim, scale, causal,
                    clip[0], clip[1], out)
    return chunks


@register_kind("clipped_softmax")
class ClippedSoftmaxAttention:
    """clip((zeta - gamma) softmax(scale Q K^T [+ causal mask]) + gamma, 0, 1) V per head."""

    def __init__(self, node, num_heads, head_dim):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = _scale(node, head_dim)
        self.causal = bool(attr(node, "causal", bool, False))
        self.gamma, self.zeta = clip_params(node)

    def __call__(self, qkv, batch, out, workers):
        _attend(qkv, batch, out, workers, self.num_heads, self.head_dim, self.scale, self.causal,
                (self.gamma, self.zeta))


@register_kind("gated")
class GatedAttention:
    """(clipped) softmax attention with each head's output of each token scaled by sigmoid(G(x))."""

    takes_weights = True

    def __init__(self, node, num_heads, head_dim, weights):
        name = f"node {node.name!r}"
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = _scale(node, head_dim)
        self.causal = bool(attr(node, "causal", bool, False))
        self.all_heads = attr(node, "gate", str, "per_head", GATES) == "all_heads"
        softmax = attr(node, "softmax", str, "softmax", SOFTMAXES)
        if softmax == "clipped":
            self.clip = clip_params(node)
        else:
            stray = sorted({"gamma", "zeta"} & set(node.attrs))
            if stray:
                raise GraphError(f"{name}: attributes {stray} need softmax \"clipped\"")
            self.clip = None
        self.gate_scale = attr(node, "gate_scale", float, 1.0)
        if not math.isfinite(self.gate_scale) or self.gate_scale <= 0:
            raise GraphError(f"{name}: gate_scale must be finite and > 0, got {self.gate_scale!r}")
        unknown = sorted(set(weights) - {"gate_weight", "gate_bias"})
        missing = sorted({"gate_weight", "gate_bias"} - set(weights))
        if unknown or missing:
            raise GraphError(f"{name}: gated attention takes weights gate_weight and gate_bias; "
                             f"missing {missing}, unknown {unknown}")
        w, b = weights["gate_weight"], weights["gate_bias"]
        for role, array in (("gate_weight", w), ("gate_bias", b)):
            if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                raise GraphError(f"{name}: weight {role!r} must be a float32 array")
        if w.ndim != 2 or w.shape[0] != num_heads or w.shape[1] < 1:
            raise GraphError(f"{name}: gate_weight must be (num_heads={num_heads}, width), got {list(w.shape)}")
        if not self.all_heads and w.shape[1] != head_dim:
            raise GraphError(f"{name}: a per_head gate_weight must be ({num_heads}, head_dim={head_dim}), "
                             f"got {list(w.shape)}")
        if b.shape != (num_heads,):
            raise GraphError(f"{name}: gate_bias must be ({num_heads},), got {list(b.shape)}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise GraphError(f"{name}: gate weights have non-finite values")
        # fresh writable copies: one kernel specialisation whatever the weights' origin (mmap or memory)
        self.gate_weight = np.array(w, dtype=np.float32, order="C")  # (H, dh) or (H, d_model)
        self.gate_bias = np.array(b, dtype=np.float32, order="C")  # (H,)
        # the layer input the gate reads: (T, d_model); per head it is split into H chunks of dh
        self.layer_input_width = int(w.shape[1]) if self.all_heads else num_heads * head_dim

    def __call__(self, qkv, batch, out, workers, layer_input):
        from edgeformer.kernels.attention_clipped import attention_gate

        chunks = _attend(qkv, batch, out, workers, self.num_heads, self.head_dim, self.scale, self.causal, self.clip)
        workers.run(attention_gate, chunks, layer_input, self.gate_weight, self.gate_bias, self.all_heads,
                    self.gate_scale, batch.cu_seqlens, self.num_heads, self.head_dim, out)
