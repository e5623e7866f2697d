"""Clipped-softmax attention and the attention-gate epilogue (Quantizable Transformers, seed_algorithms §3).

Clipped softmax (Bondarenko et al. 2023, eq. 4), per query row over its allowed keys:
    p_j  = softmax(scale * q k^T)_j
    p'_j = clip((zeta - gamma) * p_j + gamma, 0, 1)        gamma <= 0, zeta >= 1
    o    = sum_j p'_j v_j                                   (no renormalisation: rows need not sum to 1)
p_j below -gamma / (zeta - gamma) gives exactly 0, above (1 - gamma) / (zeta - gamma) exactly 1; masked
keys (causal future) have p_j = 0 and stay 0 because gamma <= 0.

Layout as kernels/attention.py: ``qkv`` (T, 3*H*dh) packed tokens of B sequences (rows
cu_seqlens[b]:cu_seqlens[b+1]), columns [Q | K | V], head h at h*dh inside each block; work item
w = b*H + h.

Why not the online softmax: the clip needs the *final* normaliser of the row before any p'_j is known,
so each query block first needs its row max and sum over all keys. Instead of recomputing the score
tiles in a second pass, the kernel keeps the scores of one query block against all of its keys, a
(QUERY_BLOCK, L) strip (256 bytes per key, 128 KiB at L = 512; the only scratch that grows with L):
one BLAS call on the head's slices of qkv in place (kernels/sgemm.py) fills it, a row pass takes max and
sum of exp, a second row pass turns it into p', and P' V is one BLAS call that writes the output rows
directly. Exact zeros are exploited: key columns that are zero for every row of the block
are dropped (the non-zero columns of P' and rows of V are gathered) when fewer than SPARSE_FRACTION of
the keys survive, so P' V costs m * nnz * dh instead of m * L * dh; a block with no non-zero p' writes
zeros without touching V.

Gate (gated attention, eq. 5-7): out[t, head h] *= gate_scale * sigmoid(g_th), with
    per head:  g_th = x[t, h*dh:(h+1)*dh] . gate_w[h] + gate_b[h]     gate_w (H, dh)
    all heads: g_th = x[t, :] . gate_w[h] + gate_b[h]                 gate_w (H, d_model)
where x is the attention layer's input (T, d_model). sigmoid(z) = 1 / (1 + exp(-z)) with exp_f32:
z << 0 gives exp overflow to inf and a gate of exactly 0; z >> 0 gives exactly 1.
"""
import numpy as np

from edgeformer.kernels._jit import kernel
from edgeformer.kernels.attention import QUERY_BLOCK
from edgeformer.kernels.reduce import add_reassoc, max_nonan
from edgeformer.kernels.mathfn import exp_f32, exp_nonpos
from edgeformer.kernels.sgemm import TRANS_N, TRANS_T, sgemm

SPARSE_FRACTION = 0.5  # gather the non-zero key columns when fewer than this fraction survive the clip

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@kernel
def attention_clipped_softmax(qkv, cu_seqlens, num_heads, head_dim, scale, causal, gamma, zeta, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] = clipped_softmax(scale * Q K^T [+ causal mask]; gamma, zeta) V
    for work items w = b*H + h in [w0, w1).

    qkv (T, 3*H*dh) float32 with unit column stride; cu_seqlens (B+1,) int64 non-decreasing; out (T, H*dh)
    float32 with unit column stride; num_heads, head_dim, w0, w1 int64; scale, gamma (<= 0), zeta (>= 1)
    float64; causal bool. Writes only the rows/columns of the items in [w0, w1). Inputs must be finite.
    """
    if w1 <= w0:
        return
    H = num_heads
    dh = head_dim
    D = H * dh
    maxlen = 0
    for b in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[b + 1] - cu_seqlens[b]
        if length > maxlen:
            maxlen = length
    if maxlen <= 0:
        return
    sc = np.float32(scale)
    stretch = np.float32(zeta - gamma)  # zeta - gamma >= 1
    shift = np.float32(gamma)
    ld = qkv.strides[0] // 4  # row strides (elements): BLAS reads the heads' slices in place
    ldo = out.strides[0] // 4
    strip_buf = np.empty(QUERY_BLOCK * maxlen, np.float32)  # one (m, n) score / probability strip
    gather_buf = np.empty(QUERY_BLOCK * maxlen, np.float32)  # (m, nnz) non-zero columns of the strip
    vg_buf = np.empty(maxlen * dh, np.float32)  # (nnz, dh) the matching rows of V
    live = np.empty(maxlen, np.bool_)  # (n,) key column has a non-zero p' in some row of the block
    cols = np.empty(maxlen, np.int64)  # (nnz,) indices of those columns

    for w in range(w0, w1):
        b = w // H
        h = w - b * H
        t0 = cu_seqlens[b]
        L = cu_seqlens[b + 1] - t0
        if L <= 0:
            continue
        q_off = t0 * ld + h * dh  # element offsets of the head's Q, K, V slices
        k_off = q_off + D
        v_off = q_off + 2 * D
        vc = 2 * D + h * dh

        for i0 in range(0, L, QUERY_BLOCK):
            m = min(QUERY_BLOCK, L - i0)
            n = i0 + m if causal else L  # keys at or after n are masked for every row of the block
            o_off = (t0 + i0) * ldo + h * dh
            s = strip_buf[: m * n].reshape((m, n))  # (m, n) scores, then clipped probabilities
            # S = scale * Q[i0:i0+m] K[:n]^T (row-major (m, n) = column-major (n, m) = K Q^T)
            sgemm(TRANS_T, TRANS_N, n, m, dh, sc, qkv, k_off, ld, qkv, q_off + i0 * ld, ld, strip_buf, 0, n)
            for c in range(n):
                live[c] = False
            for r in range(m):
                s_row = s[r]  # (n,)
                nv = min(n, i0 + r + 1) if causal else n  # this row's allowed keys: 0..nv-1
                mx = s_row[0]
                for c in range(1, nv):
                    mx = max_nonan(mx, s_row[c])
                total = _ZERO
                for c in range(nv):
                    e = exp_nonpos(s_row[c] - mx)
                    s_row[c] = e
                    total = add_reassoc(total, e)
                inv = _ONE / total  # total >= 1: the max contributes exp(0) = 1
                for c in range(nv):
                    p = stretch * (s_row[c] * inv) + shift
                    p = _ZERO if p < _ZERO else p
                    p = _ONE if p > _ONE else p
                    s_row[c] = p
                    if p != _ZERO:
                        live[c] = True
                s_tail = s_row[nv:]  # (n - nv,) causal-masked keys
                for c in range(n - nv):
                    s_tail[c] = 0.0
            nnz = 0
            for c in range(n):
                if live[c]:
                    cols[nnz] = c
                    nnz += 1
            # O = P' V straight into out (row-major (m, dh) = column-major (dh, m) = V^T P'^T)
            if nnz == 0:
                for r in range(m):
                    o_dst = out[t0 + i0 + r, h * dh : h * dh + dh]  # (dh,)
                    for c in range(dh):
                        o_dst[c] = 0.0
            elif nnz < SPARSE_FRACTION * n:
                pg = gather_buf[: m * nnz].reshape((m, nnz))  # (m, nnz)
                vg = vg_buf[: nnz * dh].reshape((nnz, dh))  # (nnz, dh)
                for r in range(m):
                    s_row = s[r]
                    pg_row = pg[r]
                    for j in range(nnz):
                        pg_row[j] = s_row[cols[j]]
                for j in range(nnz):
                    v_row = qkv[t0 + cols[j], vc : vc + dh]  # (dh,)
                    for c in range(dh):
                        vg[j, c] = v_row[c]
                sgemm(TRANS_N, TRANS_N, dh, m, nnz, _ONE, vg_buf, 0, dh, gather_buf, 0, nnz, out, o_off, ldo)
            else:
                sgemm(TRANS_N, TRANS_N, dh, m, n, _ONE, qkv, v_off, ld, strip_buf, 0, n, out, o_off, ldo)


@kernel
def attention_gate(x, gate_w, gate_b, all_heads, gate_scale, cu_seqlens, num_heads, head_dim, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] *= gate_scale * sigmoid(g) for work items w = b*H + h in [w0, w1),
    g per token from the layer input x (see the module docstring).

    x (T, d_model) float32 C; gate_w (H, dh) (per head, needs d_model = H*dh) or (H, d_model) (all heads)
    float32; gate_b (H,) float32; all_heads bool; gate_scale float64; out (T, H*dh) float32 C.
    """
    H = num_heads
    dh = head_dim
    gs = np.float32(gate_scale)
    for w in range(w0, w1):
        b = w // H
        h = w - b * H
        wh = gate_w[h]  # (dh,) or (d_model,)
        bias = gate_b[h]
        x0 = 0 if all_heads else h * dh  # first feature of x the gate reads
        width = wh.shape[0]
        for t in range(cu_seqlens[b], cu_seqlens[b + 1]):
            x_src = x[t, x0 : x0 + width]  # (width,)
            z = _ZERO
            for c in range(width):
                z = add_reassoc(z, x_src[c] * wh[c])
            z = z + bias
            g = gs / (_ONE + exp_f32(-z))  # exp overflow (z < -89) -> inf -> gate exactly 0
            o_dst = out[t, h * dh : (h + 1) * dh]  # (dh,)
            for c in range(dh):
                o_dst[c] *= g
