"""EcoFormer's kernelized binary hash and binary-hash attention on plain arrays, without a graph.

    from edgeformer.functional.binary_hash import kernelized_hash, binary_hash_attention
    codes = kernelized_hash(qk, anchors, mvec, A)                # (B, H, N, W) uint64
    out = binary_hash_attention(qk, v, anchors, mvec, A)         # (B, H, N, dh) float32

Parameter names follow the EcoFormer spec: nbits b (= A.shape[1]), anchors (H, m, dh) with m anchors per
head, mvec (H, m), A (H, b, m), beta (default b + 1), normalized (False: the official formula),
form ("auto", "linear", "quadratic"). Arrays use the official (B, H, N, dh) layout (a 3-d (H, N, dh)
array is one sequence); ``lengths`` (B,) marks the first lengths[b] tokens of each row as valid (right
padding): padded tokens are neither hashed nor attended to, and their outputs are 0.

Conventions (docs/BINARY_HASH.md): rows are L2-normalised as x / max(|x|, 1e-12); the RBF bandwidth
sigma is the mean squared token-anchor distance of each (sequence, head); code bit r is 1 (+1) iff the
pre-sign value y_r > 0 — **sign(0) is -1 here** (torch.sign gives 0); bits are packed LSB first into
uint64 words, bit r in word r // 64. Hashing runs in float64, attention in float32.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError, InputError

FORMS = ("auto", "linear", "quadratic")


def _weights(anchors, mvec, A, nbits, num_heads, head_dim):
    from edgeformer.ops.attention_binary_hash import hash_weights

    arrays = []
    for role, a in (("anchors", anchors), ("mvec", mvec), ("A", A)):
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise InputError(f"{role} must be a float array, got dtype {a.dtype}")
        arrays.append(a.astype(np.float64, copy=False))
    try:
        weights = hash_weights("binary_hash", *arrays, num_heads, head_dim)
    except GraphError as exc:
        raise InputError(str(exc)) from None
    if nbits is not None and int(nbits) != weights[4]:
        raise InputError(f"nbits={nbits} but A has {weights[4]} rows per head (A is (H, nbits, m))")
    return weights


def _as_batch(x, what):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise InputError(f"{what} must be a float array, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{what} must be (B, H, N, dh) or (H, N, dh), got shape {x.shape}")
    return x


def _lengths(lengths, B, N):
    if lengths is None:
        return np.full(B, N, dtype=np.int64)
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu" or lengths.shape != (B,):
        raise InputError(f"lengths must be an integer array of shape ({B},), got {lengths.dtype} {lengths.shape}")
    if (lengths < 0).any() or (lengths > N).any():
        raise InputError(f"lengths must be in [0, {N}]")
    return lengths.astype(np.int64)


def _pack(blocks, lengths):
    """(B, H, N, dh) blocks -> packed (T, len(blocks)*H*dh) float32 of the valid tokens, and cu_seqlens."""
    B, H, N, dh = blocks[0].shape
    cu = np.zeros(B + 1, dtype=np.int64)
    cu[1:] = np.cumsum(lengths)
    packed = np.empty((int(cu[-1]), len(blocks) * H * dh), dtype=np.float32)  # (T, k*H*dh)
    for bi in range(B):
        L = int(lengths[bi])
        for k, block in enumerate(blocks):
            rows = np.transpose(block[bi, :, :L], (1, 0, 2)).reshape(L, H * dh)  # (L, H*dh)
            packed[cu[bi] : cu[bi + 1], k * H * dh : (k + 1) * H * dh] = rows
    if not np.isfinite(packed).all():
        raise InputError("inputs must be finite")
    return packed, cu


def kernelized_hash(x, anchors, mvec, A, *, nbits=None, lengths=None, return_projection=False):
    """Binary codes of the rows of x (B, H, N, dh): uint64 (B, H, N, ceil(b/64)), zero at padded tokens.

    With return_projection=True also returns the float64 pre-sign projections y (B, H, N, b)."""
    from edgeformer.kernels.binary_hash import binary_hash_codes

    x = _as_batch(x, "x")
    B, H, N, dh = x.shape
    an, asq, mv, a_t, b = _weights(anchors, mvec, A, nbits, H, dh)
    lengths = _lengths(lengths, B, N)
    packed, cu = _pack([x], lengths)
    W = -(-b // 64)
    codes = np.zeros((packed.shape[0], H, W), dtype=np.uint64)  # (T, H, W)
    proj = np.zeros((packed.shape[0], H, b), dtype=np.float64)  # (T, H, b)
    binary_hash_codes(packed, cu, H, dh, 0, an, asq, mv, a_t, b, codes, proj, 0, B * H)
    out_codes = np.zeros((B, H, N, W), dtype=np.uint64)
    out_proj = np.zeros((B, H, N, b), dtype=np.float64)
    for bi in range(B):
        L = int(lengths[bi])
        out_codes[bi, :, :L] = np.transpose(codes[cu[bi] : cu[bi + 1]], (1, 0, 2))
        out_proj[bi, :, :L] = np.transpose(proj[cu[bi] : cu[bi + 1]], (1, 0, 2))
    return (out_codes, out_proj) if return_projection else out_codes


def binary_hash_attention(qk, v, anchors, mvec, A, *, k=None, nbits=None, beta=None, normalized=False, form="auto",
                          lengths=None):
    """EcoFormer attention: (B, H, N, dh) float32 outputs of queries/keys ``qk`` and values ``v``.

    qk is hashed once and used as queries and keys (EcoFormer's shared QK); pass ``k`` to hash separate
    keys with the same hash functions. Official formula o_i = (sum_j s_ij v_j + beta v_i) / (sum_j s_ij +
    N beta); normalized=True: o_i = sum_j (s_ij + beta) v_j / (sum_j s_ij + N beta); s_ij = code_i . code_j.
    beta (default nbits + 1) must exceed nbits so that the denominator stays >= N (beta - nbits) > 0.
    """
    from edgeformer.kernels.binary_hash import binary_hash_attention as kernel
    from edgeformer.ops.attention_binary_hash import check_beta, quad_max_len

    if form not in FORMS:
        raise InputError(f"form must be one of {FORMS}, got {form!r}")
    qk = _as_batch(qk, "qk")
    v = _as_batch(v, "v")
    blocks = [qk] if k is None else [qk, _as_batch(k, "k")]
    for other in blocks[1:] + [v]:
        if other.shape != qk.shape:
            raise InputError(f"qk, k and v must have the same shape, got {qk.shape} and {other.shape}")
    B, H, N, dh = qk.shape
    an, asq, mv, a_t, b = _weights(anchors, mvec, A, nbits, H, dh)
    try:
        beta = check_beta("binary_hash_attention", beta, b)
    except GraphError as exc:
        raise InputError(str(exc)) from None
    lengths = _lengths(lengths, B, N)
    packed, cu = _pack(blocks + [v], lengths)
    D = H * dh
    shared = k is None
    out = np.zeros((packed.shape[0], D), dtype=np.float32)  # (T, H*dh)
    kernel(packed, cu, H, dh, 0, 0 if shared else D, D if shared else 2 * D, shared, an, asq, mv, a_t, b, beta,
           bool(normalized), quad_max_len(form), out, 0, B * H)
    result = np.zeros((B, H, N, dh), dtype=np.float32)
    for bi in range(B):
        L = int(lengths[bi])
        result[bi, :, :L] = out[cu[bi] : cu[bi + 1]].reshape(L, H, dh).transpose(1, 0, 2)
    return result


def pack_codes(signs):
    """(..., b) array of +-1 (or booleans, True = +1) -> (..., ceil(b/64)) uint64, bit r in word r // 64."""
    bits = np.asarray(signs) > 0
    b = bits.shape[-1]
    words = np.zeros(bits.shape[:-1] + (-(-b // 64),), dtype=np.uint64)
    for r in range(b):
        words[..., r // 64] |= bits[..., r].astype(np.uint64) << np.uint64(r % 64)
    return words


def unpack_codes(codes, nbits):
    """(..., W) uint64 -> (..., nbits) int8 codes of +-1."""
    codes = np.asarray(codes, dtype=np.uint64)
    if codes.shape[-1] * 64 < nbits:
        raise InputError(f"{codes.shape[-1]} words cannot hold {nbits} bits")
    r = np.arange(nbits)
    bits = (codes[..., r // 64] >> (r % 64).astype(np.uint64)) & np.uint64(1)
    return np.where(bits == 1, 1, -1).astype(np.int8)


def code_inner_products(codes_a, codes_b, nbits):
    """c_i . c_j = nbits - 2 popcount(a_i xor b_j) for packed codes (Na, W), (Nb, W): int64 (Na, Nb)."""
    a = np.asarray(codes_a, dtype=np.uint64)
    bb = np.asarray(codes_b, dtype=np.uint64)
    x = a[:, None, :] ^ bb[None, :, :]  # (Na, Nb, W)
    return int(nbits) - 2 * np.bitwise_count(x).astype(np.int64).sum(-1)
