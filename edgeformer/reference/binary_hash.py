"""NumPy reference (float64) of EcoFormer's kernelized hash and binary-hash attention — the tests' oracle.

Written from the formulas (docs/BINARY_HASH.md), in the plainest dense form: direct squared distances
``sum (u - p)^2``, ``np.exp``, the quadratic similarity matrix of +-1 codes. Shapes follow the official
code: one sequence and head at a time, ``x`` (N, dh).

Conventions (the runtime's): u = x / max(|x|, 1e-12); sigma = mean of D2 floored at 1e-30; code +1 iff
y > 0, else -1 (y == 0 gives -1; torch.sign would give 0); beta defaults to nbits + 1.
"""
import numpy as np

NORM_EPS = 1e-12
SIGMA_FLOOR = 1e-30


def hash_projection_ref(x, anchors, mvec, A):
    """Pre-sign projections y (N, b) of the rows of x (N, dh) for one head.

    anchors (m, dh), mvec (m,), A (b, m). Features phi = exp(-D2 / (2 sigma)) - mvec with
    D2[n, j] = |u_n - p_j|^2 and sigma = mean(D2) over the N*m entries of this sequence and head.
    """
    x = np.asarray(x, np.float64)
    p = np.asarray(anchors, np.float64)
    norm = np.sqrt((x * x).sum(-1, keepdims=True))  # (N, 1)
    u = x / np.maximum(norm, NORM_EPS)  # (N, dh)
    d2 = ((u[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # (N, m)
    sigma = max(d2.mean(), SIGMA_FLOOR) if d2.size else 1.0
    phi = np.exp(-d2 / (2.0 * sigma)) - np.asarray(mvec, np.float64)[None, :]  # (N, m)
    return phi @ np.asarray(A, np.float64).T  # (N, b)


def signs_ref(y):
    """+-1 codes (int8) from pre-sign projections: +1 iff y > 0."""
    return np.where(np.asarray(y) > 0, 1, -1).astype(np.int8)


def pack_ref(signs):
    """(..., b) +-1 -> (..., ceil(b/64)) uint64, bit r of the code at bit r % 64 of word r // 64."""
    signs = np.asarray(signs)
    b = signs.shape[-1]
    words = np.zeros(signs.shape[:-1] + (-(-b // 64),), np.uint64)
    for r in range(b):
        bit = (signs[..., r] > 0).astype(np.uint64) << np.uint64(r % 64)
        words[..., r // 64] |= bit
    return words


def attention_ref(codes_q, codes_k, v, beta, normalized=False):
    """Quadratic form, float64: o_i = (sum_j s_ij v_j + beta v_i) / (sum_j s_ij + N beta) (official) or
    o_i = sum_j (s_ij + beta) v_j / (sum_j s_ij + N beta) (normalized); s_ij = c_i . c_j of +-1 codes."""
    cq = np.asarray(codes_q, np.float64)
    ck = np.asarray(codes_k, np.float64)
    v = np.asarray(v, np.float64)
    n = v.shape[0]
    s = cq @ ck.T  # (N, N)
    den = s.sum(1) + n * beta  # (N,)
    extra = beta * v.sum(0, keepdims=True) if normalized else beta * v
    return (s @ v + extra) / den[:, None]


def head_ref(q, k, v, anchors, mvec, A, beta=None, normalized=False):
    """One sequence and head: hash q and k (the same array for EcoFormer's shared QK), then attend."""
    b = np.asarray(A).shape[0]
    beta = b + 1.0 if beta is None else float(beta)
    cq = signs_ref(hash_projection_ref(q, anchors, mvec, A))
    ck = cq if k is None else signs_ref(hash_projection_ref(k, anchors, mvec, A))
    return attention_ref(cq, ck, v, beta, normalized)


def packed_ref(x, cu_seqlens, num_heads, head_dim, anchors, mvec, A, *, layout="shared", beta=None,
               normalized=False):
    """Reference of kernels.binary_hash.binary_hash_attention over a packed batch; float64 (T, H*dh).

    x (T, 2*H*dh) [U | V] for layout "shared", (T, 3*H*dh) [Q | K | V] for "separate";
    anchors (H, m, dh), mvec (H, m), A (H, b, m).
    """
    x = np.asarray(x, np.float64)
    cu = np.asarray(cu_seqlens, np.int64)
    D = num_heads * head_dim
    v_col = D if layout == "shared" else 2 * D
    out = np.zeros((x.shape[0], D))
    for bi in range(len(cu) - 1):
        rows = slice(cu[bi], cu[bi + 1])
        if cu[bi + 1] == cu[bi]:
            continue
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q = x[rows, cols]
            k = None if layout == "shared" else x[rows, D + h * head_dim : D + (h + 1) * head_dim]
            v = x[rows, v_col + h * head_dim : v_col + (h + 1) * head_dim]
            out[rows, cols] = head_ref(q, k, v, anchors[h], mvec[h], A[h], beta, normalized)
    return out


def packed_projection_ref(x, cu_seqlens, num_heads, head_dim, col, anchors, mvec, A):
    """Pre-sign projections (T, H, b) of the head blocks at columns col + h*dh, per sequence."""
    x = np.asarray(x, np.float64)
    cu = np.asarray(cu_seqlens, np.int64)
    b = np.asarray(A).shape[1]
    y = np.zeros((x.shape[0], num_heads, b))
    for bi in range(len(cu) - 1):
        if cu[bi + 1] == cu[bi]:
            continue
        rows = slice(cu[bi], cu[bi + 1])
        for h in range(num_heads):
            xs = x[rows, col + h * head_dim : col + (h + 1) * head_dim]
            y[rows, h] = hash_projection_ref(xs, anchors[h], mvec[h], A[h])
    return y
