"""attention kind ``binary_hash`` (EcoFormer): kernelized binary hashing + linear-time attention.

Node attributes (besides kind, num_heads H, head_dim dh):
  qk_layout  "shared" (default): input [U | V], width 2*H*dh — EcoFormer's shared QK projection, the
             same codes serve as queries and keys; "separate": input [Q | K | V], width 3*H*dh — queries
             and keys hashed separately with the same hash functions (a softmax model converted by
             converters/hash_fit.py).
  normalized false (default): the official formula (beta times the token's own value in the numerator);
             true: the normalised one (weights (s_ij + beta) / sum, summing to 1).
  beta       default nbits + 1 (the official value); must be > nbits so the denominator stays > 0.
  form       "auto" (default: the quadratic popcount form for sequences of at most
             kernels.binary_hash.QUADRATIC_MAX_LEN tokens, the linear form above), "linear", "quadratic".
Weights: anchors (H, m, dh), mvec (H, m), A (H, b, m), float32 or float64, finite.
The formulas and conventions are in kernels/binary_hash.py and docs/BINARY_HASH.md.
"""
from __future__ import annotations

import math

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.ops.attention import balanced_by_cost, register_kind
from edgeformer.ops.base import attr

LAYOUTS = ("shared", "separate")
FORMS = ("auto", "linear", "quadratic")
BIG = 1 << 62  # quad_max_len meaning "always quadratic"


def hash_weights(name: str, anchors, mvec, A, num_heads: int | None = None, head_dim: int | None = None):
    """Check EcoFormer hash weights and return them as float64 C arrays for the kernels:
    (anchors (H, m, dh), anchor_sq (H, m), mvec (H, m), a_t (H, m, b), nbits). Raises GraphError."""
    arrays = {"anchors": anchors, "mvec": mvec, "A": A}
    for role, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype not in (np.float32, np.float64):
            raise GraphError(f"{name}: weight {role!r} must be a float32 or float64 array")
    if anchors.ndim != 3 or mvec.ndim != 2 or A.ndim != 3:
        raise GraphError(f"{name}: anchors must be (H, m, dh), mvec (H, m) and A (H, b, m); got "
                         f"{list(anchors.shape)}, {list(mvec.shape)}, {list(A.shape)}")
    H, m, dh = anchors.shape
    b = A.shape[1]
    if num_heads is not None and (H != num_heads or dh != head_dim):
        raise GraphError(f"{name}: anchors have shape {list(anchors.shape)}, expected [num_heads={num_heads}, m, "
                         f"head_dim={head_dim}]")
    if m < 1 or b < 1 or dh < 1 or H < 1:
        raise GraphError(f"{name}: anchors and A need at least one head, anchor, bit and feature")
    if mvec.shape != (H, m) or A.shape != (H, b, m):
        raise GraphError(f"{name}: with anchors {list(anchors.shape)}, mvec must be {[H, m]} and A [{H}, b, {m}]; "
                         f"got {list(mvec.shape)} and {list(A.shape)}")
    for role, array in arrays.items():
        if not np.isfinite(array).all():
            raise GraphError(f"{name}: weight {role!r} has non-finite values")
    # always fresh writable copies, so that every caller hands the kernel the same array types
    an = np.array(anchors, dtype=np.float64, order="C")  # (H, m, dh)
    anchor_sq = np.ascontiguousarray((an * an).sum(-1))  # (H, m)
    mv = np.array(mvec, dtype=np.float64, order="C")  # (H, m)
    a_t = np.array(np.transpose(A, (0, 2, 1)), dtype=np.float64, order="C")  # (H, m, b)
    return an, anchor_sq, mv, a_t, int(b)


def check_beta(name: str, beta, nbits: int) -> float:
    if beta is None:
        return float(nbits + 1)
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise GraphError(f"{name}: beta must be a number, got {beta!r}")
    beta = float(beta)
    if not math.isfinite(beta) or beta <= nbits:
        raise GraphError(f"{name}: beta must be finite and > nbits = {nbits} (the denominator is >= L * (beta - "
                         f"nbits)), got {beta}")
    return beta


def quad_max_len(form: str) -> int:
    from edgeformer.kernels.binary_hash import QUADRATIC_MAX_LEN

    return {"auto": QUADRATIC_MAX_LEN, "linear": 0, "quadratic": BIG}[form]


def item_cost(lengths: np.ndarray, head_dim: int, m: int, nbits: int, hashes: int, quad_len: int) -> np.ndarray:
    """Approximate cost of one head of each sequence: hashing (L m (dh + b) per hashed block) plus the
    linear form (2 L b dh) or, for short sequences, the quadratic form (L^2 dh)."""
    L = np.asarray(lengths, dtype=np.float64)
    attn = np.where(L <= quad_len, L * L * head_dim, 2.0 * L * nbits * head_dim)
    return hashes * L * m * (head_dim + nbits) + attn


@register_kind("binary_hash")
class BinaryHashAttention:
    takes_weights = True
    layout_name = "binary_hash"

    def __init__(self, node, num_heads, head_dim, weights):
        name = f"node {node.name!r}"
        self.num_heads, self.head_dim = num_heads, head_dim
        self.layout = attr(node, "qk_layout", str, "shared", LAYOUTS)
        self.normalized = bool(attr(node, "normalized", bool, False))
        self.form = attr(node, "form", str, "auto", FORMS)
        unknown = sorted(set(weights) - {"anchors", "mvec", "A"})
        if unknown:
            raise GraphError(f"{name}: binary_hash attention takes weights anchors, mvec, A; unknown {unknown}")
        missing = [r for r in ("anchors", "mvec", "A") if r not in weights]
        if missing:
            raise GraphError(f"{name}: binary_hash attention needs weights {missing}")
        (self.anchors, self.anchor_sq, self.mvec, self.a_t,
         self.nbits) = hash_weights(name, weights["anchors"], weights["mvec"], weights["A"], num_heads, head_dim)
        self.beta = check_beta(name, node.attrs.get("beta"), self.nbits)
        D = num_heads * head_dim
        self.shared = self.layout == "shared"
        self.input_width = (2 if self.shared else 3) * D
        self.q_col, self.k_col = 0, (0 if self.shared else D)
        self.v_col = D if self.shared else 2 * D
        self.quad_len = quad_max_len(self.form)

    def __call__(self, x, batch, out, workers):
        from edgeformer.kernels.binary_hash import binary_hash_attention

        cost = item_cost(batch.lengths, self.head_dim, self.anchors.shape[1], self.nbits, 1 if self.shared else 2,
                         self.quad_len)
        chunks = balanced_by_cost(cost, self.num_heads, workers.threads)
        workers.run(binary_hash_attention, chunks, x, batch.cu_seqlens, self.num_heads, self.head_dim, self.q_col,
                    self.k_col, self.v_col, self.shared, self.anchors, self.anchor_sq, self.mvec, self.a_t,
                    self.nbits, self.beta, self.normalized, self.quad_len, out)
