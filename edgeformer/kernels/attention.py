"""Softmax attention over packed (padding-free) variable-length sequences, flash-attention style.

Layout (ByteTransformer-style packing): ``qkv`` (T, 3*H*dh) holds the valid tokens of B sequences back
to back; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Columns are ``[Q | K | V]``, each
H*dh wide, head h at ``h*dh:(h+1)*dh`` inside its block. Padding never exists, so it is never read.

Per (sequence, head) work item the score and output products run on BLAS directly on the head's strided
slices of ``qkv`` and ``out`` (kernels/sgemm.py: pointer + offset + leading dimension, no copies; the
softmax scale is BLAS's alpha). A non-causal sequence of <= ``SHORT`` tokens is one tile: S = scale Q K^T
(L x L), softmax in place, O = P V written straight into ``out``, then each output row is scaled by
1 / (its row sum) — dh multiplies per row instead of L. Longer (or causal) sequences go in query blocks of
``QUERY_BLOCK`` rows and key blocks of ``KEY_BLOCK``: for each key block the score tile comes from BLAS,
an online softmax keeps a running row max and row sum and rescales the accumulator, and ``P @ V_blk``
(BLAS again) is added to it. Only one QUERY_BLOCK x KEY_BLOCK score tile exists at a time (64 KiB at
64 x 256); tile sizes were swept (32..128 x 128..512): all within ~10% of each other, 64 x 256 is a good
default for causal. With ``causal`` the key range of a query block stops at its last query, so blocks
entirely above the diagonal are never computed; inside the diagonal block masked entries get
probability exactly 0.

Exponentials use ``mathfn.exp_nonpos`` (exp of a non-positive float32: every argument is s - max;
polynomial, rel. err 8e-8, vectorises under error_model="numpy", numba.md §7); libm ``exp`` would be
scalar and ~10x slower. The row max and the row sum use one-instruction LLVM intrinsics (kernels/reduce.py) so
that those reductions vectorise too, without turning on fastmath beyond contraction.
"""
import numpy as np
from edgeformer.kernels._jit import kernel
from edgeformer.kernels.mathfn import exp_nonpos
from edgeformer.kernels.reduce import add_reassoc, max_nonan
from edgeformer.kernels.sgemm import TRANS_N, TRANS_T, sgemm

QUERY_BLOCK = 64
KEY_BLOCK = 256
# A non-causal sequence of at most SHORT tokens is one query block: half the BLAS calls per head, and the
# (L, L) tile is no larger than a QUERY_BLOCK x KEY_BLOCK one (9 % less attention time at L = 100-128 on
# Zen 3, scratch measurement of the kernel alone). Causal sequences keep 64-row blocks: their first block
# then needs only its own 64 keys.
SHORT = 128

_ONE = np.float32(1.0)
_NEG_INF = np.float32(-np.inf)


# contract: the online-softmax updates (l * alpha + total) and exp's polynomial become FMAs.
@kernel(fastmath={"contract"})
def attention_softmax(qkv, cu_seqlens, num_heads, head_dim, scale, causal, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] = softmax(scale * Q K^T [+ causal mask]) V for w = b*H + h in [w0, w1).

    qkv (T, 3*H*dh) float32 with unit column stride; cu_seqlens (B+1,) int64 non-decreasing; out (T, H*dh)
    float32 with unit column stride; num_heads, head_dim, w0, w1 int64; scale float64; causal bool. Writes
    only the rows/columns of the work items in [w0, w1). Inputs must be finite.
    """
    if w1 <= w0:
        return
    H = num_heads
    dh = head_dim
    D = H * dh
    ld = qkv.strides[0] // 4  # row stride of qkv (elements)
    ldo = out.strides[0] // 4
    maxlen = 0
    for b in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[b + 1] - cu_seqlens[b]
        if length > maxlen:
            maxlen = length
    if maxlen <= 0:
        return
    sc = np.float32(scale)
    qb_max = QUERY_BLOCK if causal else max(QUERY_BLOCK, min(maxlen, SHORT))  # rows of a query block
    s_buf = np.empty(max(QUERY_BLOCK * KEY_BLOCK, qb_max * qb_max), np.float32)  # one (m, n) score tile
    pv_buf = np.empty(qb_max * dh, np.float32)  # one (m, dh) P @ V tile
    acc = np.empty((qb_max, dh), np.float32)  # (m, dh) unnormalised output
    mrow = np.empty(qb_max, np.float32)  # (m,) running row max
    lrow = np.empty(qb_max, np.float32)  # (m,) running row sum of exp

    for w in range(w0, w1):
        b = w // H
        h = w - b * H
        t0 = cu_seqlens[b]
        L = cu_seqlens[b + 1] - t0
        if L <= 0:
            continue
        q_off = t0 * ld + h * dh  # element offsets of the head's Q, K, V and output slices
        k_off = q_off + D
        v_off = q_off + 2 * D
        o_off = t0 * ldo + h * dh

        if L <= SHORT and not causal:
            # one tile: P = softmax(S) in place, O = P V straight into out, then rows scaled by 1 / l
            s = s_buf[: L * L].reshape((L, L))  # (L, L) scores, then probabilities
            sgemm(TRANS_T, TRANS_N, L, L, dh, sc, qkv, k_off, ld, qkv, q_off, ld, s_buf, 0, L)
            for r in range(L):
                s_row = s[r]  # (L,)
                mx = s_row[0]
                for c in range(1, L):
                    mx = max_nonan(mx, s_row[c])
                total = np.float32(0.0)
                for c in range(L):
                    e = exp_nonpos(s_row[c] - mx)
                    s_row[c] = e
                    total = add_reassoc(total, e)
                lrow[r] = _ONE / total  # total >= 1: the row max contributes exp(0) = 1
            sgemm(TRANS_N, TRANS_N, dh, L, L, _ONE, qkv, v_off, ld, s_buf, 0, L, out, o_off, ldo)
            for r in range(L):
                o_dst = out[t0 + r, h * dh : h * dh + dh]  # (dh,)
                inv = lrow[r]
                for c in range(dh):
                    o_dst[c] *= inv
            continue

        for i0 in range(0, L, QUERY_BLOCK):
            m = min(QUERY_BLOCK, L - i0)
            for r in range(m):
                mrow[r] = _NEG_INF
                lrow[r] = 0.0
                for c in range(dh):
                    acc[r, c] = 0.0
            kend = i0 + m if causal else L  # keys at or after kend are masked for every row
            for j0 in range(0, kend, KEY_BLOCK):
                n = min(KEY_BLOCK, kend - j0)
                s = s_buf[: m * n].reshape((m, n))  # (m, n) scores, then probabilities
                # S = scale * Q[i0:i0+m] K[j0:j0+n]^T (row-major (m, n) = column-major (n, m) = K Q^T)
                sgemm(TRANS_T, TRANS_N, n, m, dh, sc, qkv, k_off + j0 * ld, ld, qkv, q_off + i0 * ld, ld,
                      s_buf, 0, n)
                for r in range(m):
                    s_row = s[r]  # (n,)
                    nv = n
                    if causal:
                        nv = min(n, i0 + r - j0 + 1)  # keys j <= query i0 + r
                    if nv <= 0:  # the whole block is in this row's future
                        for c in range(n):
                            s_row[c] = 0.0
                        continue
                    mx = s_row[0]
                    for c in range(1, nv):
                        mx = max_nonan(mx, s_row[c])
                    m_old = mrow[r]
                    m_new = mx if mx > m_old else m_old
                    mrow[r] = m_new
                    alpha = exp_nonpos(m_old - m_new)  # exp(-inf) = 0 on the first block
                    total = np.float32(0.0)
                    for c in range(nv):
                        e = exp_nonpos(s_row[c] - m_new)
                        s_row[c] = e
                        total = add_reassoc(total, e)
                    s_tail = s_row[nv:]  # (n - nv,) masked keys of the diagonal block
                    for c in range(n - nv):
                        s_tail[c] = 0.0
                    lrow[r] = lrow[r] * alpha + total
                    for c in range(dh):
                        acc[r, c] *= alpha
                pv = pv_buf[: m * dh].reshape((m, dh))  # (m, dh)
                # PV = P V[j0:j0+n] (row-major (m, dh) = column-major (dh, m) = V^T P^T)
                sgemm(TRANS_N, TRANS_N, dh, m, n, _ONE, qkv, v_off + j0 * ld, ld, s_buf, 0, n, pv_buf, 0, dh)
                for r in range(m):
                    for c in range(dh):
                        acc[r, c] += pv[r, c]

            for r in range(m):
                inv = _ONE / lrow[r]  # >= 1: the row max contributes exp(0) = 1
                o_dst = out[t0 + i0 + r, h * dh : h * dh + dh]  # (dh,)
                for c in range(dh):
                    o_dst[c] = acc[r, c] * inv
