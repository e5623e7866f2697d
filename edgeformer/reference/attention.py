"""NumPy reference for softmax attention (float64 internally), padded and packed layouts.

Conventions:
- ``key_mask`` (B, S) bool, True = a real key. Masked keys get probability exactly 0.
- ``causal``: key j > query i is masked (positions counted from the start of the padded row,
  i.e. from the start of each sequence for right-padded batches).
- A query row whose keys are all masked (for example a padding query, or every key padded)
  returns **zeros**, not NaN. PyTorch's scaled_dot_product_attention returns NaN there; compare
  on valid tokens only.
- ``scale`` defaults to 1/sqrt(head_dim).
"""
import numpy as np


def attention_ref(q, k, v, key_mask=None, scale=None, causal=False):
    """softmax(scale * q k^T + mask) v; returns float64 (B, H, Sq, dv).

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
    return np.einsum("bhij,bhjd->bhid", p, v)


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


def packed_attention_ref(qkv, cu_seqlens, num_heads, head_dim, scale, causal):
    """Reference for kernels.attention.attention_softmax; returns float64 (T, H*dh)."""
    q, k, v, mask = unpack_qkv(qkv, cu_seqlens, num_heads, head_dim)
    o = attention_ref(q, k, v, key_mask=mask, scale=scale, causal=causal)  # (B, H, S, dh)
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    out = np.zeros((int(cu[-1]) if len(cu) else 0, num_heads * head_dim))
    for b in range(len(cu) - 1):
        L = int(cu[b + 1] - cu[b])
        out[cu[b] : cu[b + 1]] = o[b, :, :L].transpose(1, 0, 2).reshape(L, num_heads * head_dim)
    return out
