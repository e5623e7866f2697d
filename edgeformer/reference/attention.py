"""NumPy reference for softmax attention (float64 internally), padded and packed layouts.

Conventions:
- ``key_mask`` (B, S) bool, True = a real key. Masked keys get probability exactly 0.
- ``causal``: key j > query i is masked (positions counted from the start of the padded row,
  i.e. from the start of each sequence for right-padded batches).
- A query row whose keys are all masked (for example a padding query, or every key padded)
  returns **zeros**, not NaN. PyTorch's scaled_dot_product_attention returns NaN there; compare
  on valid tokens only.
- ``scale`` defaults to 1/sqrt(head_dim).
- Clipped softmax (Quantizable Transformers, seed_algorithms §3.2): ``gamma`` (<= 0) and ``zeta`` (>= 1)
  turn the probabilities into clip((zeta - gamma) p + gamma, 0, 1) without renormalising; the
  defaults gamma = 0, zeta = 1 skip the clip, so plain softmax is reproduced bit for bit. Masked
  keys have p = 0 and stay 0.
- Gated attention (§3.3): ``attention_gate_ref`` gives sigmoid(G(x)) per token and head from the
  attention layer's input x, per head (head h reads x[:, h*dh:(h+1)*dh]) or all heads (all of x).
"""
import numpy as np


def attention_ref(q, k, v, key_mask=None, scale=None, causal=False, gamma=0.0, zeta=1.0):
    """softmax(scale * q k^T + mask) v (clipped with gamma, zeta when given); returns float64 (B, H, Sq, dv).

    q (B, H, Sq, dh), k (B, H, Sk, dh), v (B, H, Sk, dv), key_mask (B, Sk) bool (True = real key).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, H, Sq, dh = q.shape
    Sk = k.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(dh) if dh > 0 else 1.0
    scores = np.einsum("bhid,bhjd->bhij", q, k) * scale  # (B, H, Sq, Sk)
    allowed = np.ones((B, 1, Sq, Sk), dtype=bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, dtype=bool)[:, None, None, :]
    if causal:
        allowed &= np.tri(Sq, Sk, dtype=bool)[None, None]  # key j <= query i
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True) if Sk > 0 else np.zeros((B, H, Sq, 1))
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # fully masked rows
    p = np.where(allowed, np.exp(scores - row_max), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1.0)  # fully masked rows stay all-zero
    if gamma != 0.0 or zeta != 1.0:
        p = clipped_probs_ref(p, gamma, zeta)
    return np.einsum("bhij,bhjd->bhid", p, v)


def clipped_probs_ref(p, gamma, zeta):
    """clip((zeta - gamma) p + gamma, 0, 1) in float64: p < -gamma / (zeta - gamma) -> exactly 0."""
    return np.clip((zeta - gamma) * np.asarray(p, dtype=np.float64) + gamma, 0.0, 1.0)


def attention_gate_ref(x, gate_weight, gate_bias, num_heads, head_dim, gate_scale=1.0):
    """Gates (T, H) = gate_scale * sigmoid(G(x)) in float64 for layer input x (T, d_model).

    gate_weight (H, dh): per-head Linear(dh -> 1) on head h's slice x[:, h*dh:(h+1)*dh];
    gate_weight (H, d_model): the all-heads Linear(d_model -> H) on all of x. gate_bias (H,)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(gate_weight, dtype=np.float64)
    T = x.shape[0]
    if w.shape == (num_heads, head_dim) and x.shape[1] == num_heads * head_dim:
        z = np.einsum("thc,hc->th", x.reshape(T, num_heads, head_dim), w)  # (T, H)
    else:
        z = x @ w.T  # (T, H)
    z = z + np.asarray(gate_bias, dtype=np.float64)
    return gate_scale / (1.0 + np.exp(-z))


def unpack_qkv(qkv, cu_seqlens, num_heads, head_dim):
    """Packed (T, 3*H*dh) -> padded q, k, v (B, H, S, dh) and key_mask (B, S)."""
    qkv = np.asarray(qkv)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    B = len(cu) - 1
    lengths = np.diff(cu)
    S = int(lengths.max()) if B > 0 else 0
    D = num_heads * head_dim
    q, k, v = (np.zeros((B, num_heads, S, head_dim), dtype=qkv.dtype) for _ in range(3))
    mask = np.zeros((B, S), dtype=bool)
    for b in range(B):
        L = int(lengths[b])
        rows = qkv[cu[b] : cu[b + 1]]  # (L, 3D)
        for dst, block in zip((q, k, v), range(3)):
            dst[b, :, :L] = rows[:, block * D : (block + 1) * D].reshape(L, num_heads, head_dim).transpose(1, 0, 2)
        mask[b, :L] = True
    return q, k, v, mask


def packed_attention_ref(qkv, cu_seqlens, num_heads, head_dim, scale, causal, gamma=0.0, zeta=1.0):
    """Reference for kernels.attention.attention_softmax (and, with gamma / zeta,
    kernels.attention_clipped.attention_clipped_softmax); returns float64 (T, H*dh)."""
    q, k, v, mask = unpack_qkv(qkv, cu_seqlens, num_heads, head_dim)
    o = attention_ref(q, k, v, key_mask=mask, scale=scale, causal=causal, gamma=gamma, zeta=zeta)  # (B, H, S, dh)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    out = np.zeros((int(cu[-1]) if len(cu) else 0, num_heads * head_dim))
    for b in range(len(cu) - 1):
        L = int(cu[b + 1] - cu[b])
        out[cu[b] : cu[b + 1]] = o[b, :, :L].transpose(1, 0, 2).reshape(L, num_heads * head_dim)
    return out



def packed_gated_attention_ref(qkv, x, cu_seqlens, num_heads, head_dim, scale, causal, gate_weight, gate_bias,
                               gamma=0.0, zeta=1.0, gate_scale=1.0):
    """Gated attention on packed tokens: (clipped) softmax attention, each head's output of each token
    times its gate (attention_gate_ref of the layer input x (T, d_model)); float64 (T, H*dh)."""
    o = packed_attention_ref(qkv, cu_seqlens, num_heads, head_dim, scale, causal, gamma, zeta)  # (T, H*dh)
    g = attention_gate_ref(x, gate_weight, gate_bias, num_heads, head_dim, gate_scale)  # (T, H)
    T = o.shape[0]
    return (o.reshape(T, num_heads, head_dim) * g[:, :, None]).reshape(T, num_heads * head_dim)


def bf16_round(x):
    """x rounded to bfloat16 (nearest even), returned as float64; x is first rounded to float32."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def exp_bf16_ref(x):
    """The exp of kernels/gemm_bf16.softmax_row_bf16 in NumPy float32 (x <= 0): clamped at -86, one-step
    reduction, Taylor degree 4, times 2^n; then rounded to bf16. Returned as float64."""
    x = np.maximum(np.asarray(x, dtype=np.float32), np.float32(-86.0))
    n = np.rint(x * np.float32(1.4426950408889634)).astype(np.float32)
    r = (x - n * np.float32(0.6931471805599453)).astype(np.float32)
    p = ((((r / np.float32(24) + np.float32(1 / 6)) * r + np.float32(0.5)) * r + 1) * r + 1).astype(np.float32)
    return bf16_round((p * np.exp2(n)).astype(np.float32))


def attention_bf16_ref(q, k, v, key_mask=None, scale=None):
    """attention_ref (non-causal) with the arithmetic of kernels/attention_bf16.py: scores in float64,
    unnormalised probabilities exp_bf16_ref(s - max) (bf16), v rounded to bf16, exact products, divided by
    the sum of the rounded probabilities."""
    v = bf16_round(v)
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    B, H, Sq, dh = q.shape
    if scale is None:
        scale = 1.0 / np.sqrt(dh) if dh > 0 else 1.0
    scores = np.einsum("bhid,bhjd->bhij", q, k) * np.float32(scale)  # (B, H, Sq, Sk)
    allowed = np.ones(scores.shape, dtype=bool)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, dtype=bool)[:, None, None, :]
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(allowed, exp_bf16_ref(np.where(allowed, scores - row_max, 0.0)), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", e / np.where(denom > 0, denom, 1.0), v)
