"""Softmax attention with a bf16 P V product (AVX512-BF16): the attention kind `softmax` with precision "bf16".

Same contract as kernels/attention.py (packed [Q | K | V] rows, cu_seqlens, work items w = b*H + h,
non-causal), different arithmetic for the output product of a sequence of L <= SHORT tokens (one tile):

    S = scale * Q K^T                          (L x L, float32 FMAs, k = 0..dh-1 in order per score)
    E = bf16(exp(S - rowmax(S)))               (exp to ~4e-5, then rounded to bf16; S - max < -86 -> ~5e-38)
    O = (E bf16(V)) / rowsum(E)                (vdpbf16ps, float32 accumulation; the sum is of the rounded E)

bf16(x) rounds to nearest even (8-bit mantissa, relative error <= 2^-9). Dividing by the sum of the
*rounded* probabilities keeps every output row an exact convex combination of (rounded) V rows. The scores
stay float32: rounding Q and K to bf16 as well was measured (bench/minilm_int8.py, int8 MiniLM, 256 texts)
to move nearest-neighbour agreement from 0.969 to 0.957, under issue 7's 0.96, because a score's error
grows with |q| |k| and softmax exponentiates it; the P V product's error stays relative to each term.
Sequences longer than SHORT take the float32 flash path of kernels/attention.py, so no more than one
L x L tile (L <= SHORT) is ever held per head.

The scores come from `micro_scores` (kernels/gemm_bf16.py): K^T packed as panels of 16 keys (`transpose16`,
16 x 16 blocks transposed in registers), 8 query rows read in place, 8 x 32 tiles of 16 zmm accumulators;
against the same product on BLAS (OpenBLAS sgemm per head, which packs both operands every call) the whole
kernel is ~11 % faster at 128 tokens, 12 heads of 32 on Zen 4 (scratch A/B of the two kernel versions), with
the same results there (both sum d = 0..dh-1 in order with FMAs).

Each score row (128 floats, the first L valid) goes through `softmax_row_bf16` (kernels/gemm_bf16.py): the
row in eight zmm registers, max, exp (to ~4e-5: the values are rounded to bf16 next), vcvtne2ps2bf16 into
pairs of consecutive keys, the sum of the rounded values; lanes >= L are exact zeros. V is packed as
(L/2, dh16) pairs of consecutive rows, dh16 = dh rounded up to 16 with zero columns (an odd last key pairs
with a zero row). The P V micro-kernel stores whole 8-row tiles straight into `out` when dh is a multiple
of 16, else into a small tile copied out. Inputs must be finite.
"""
import numpy as np

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.attention import SHORT, attention_softmax
from edgeformer.kernels.gemm_bf16 import (NV_LANES, ROW_MAX, bf16_bits, bf16_pair, micro_bf16, micro_scores,
                                           softmax_row_bf16, transpose16)

if SHORT > ROW_MAX:
    raise ImportError("attention_bf16 keeps a score row of at most ROW_MAX floats in registers")

O_MR = 8  # output tile: 8 query rows x 32 (nv = 2) or 16 (nv = 1) head columns

_ONE = np.float32(1.0)
_ZERO_U = np.uint32(0)


@helper
def _score_rows(a, a_off, lda, kt, panels, dh, pstride, s, r0, sc):
    """s[r0:r0+8, :16*panels] = sc * (8 query rows of a at a_off, row stride lda) K^T (kt: panels of 16 keys
    every pstride floats, (dh, 16) each)."""
    for p in range(0, panels - 1, 2):
        micro_scores(O_MR, 2, a, a_off, lda, kt, p * pstride, pstride, dh, s, r0 * ROW_MAX + p * NV_LANES, ROW_MAX, sc)
    if panels % 2 == 1:
        p = panels - 1
        micro_scores(O_MR, 1, a, a_off, lda, kt, p * pstride, pstride, dh, s, r0 * ROW_MAX + p * NV_LANES, ROW_MAX, sc)


@kernel(fastmath={"contract"})
def attention_softmax_bf16(qkv, cu_seqlens, num_heads, head_dim, scale, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] = softmax(scale * Q K^T) V for w = b*H + h in [w0, w1), non-causal,
    with bf16 products for sequences of <= SHORT tokens (module docstring). Arguments as attention_softmax."""
    if w1 <= w0:
        return
    H = num_heads
    dh = head_dim
    D = H * dh
    ld = qkv.strides[0] // 4  # row stride of qkv (elements)
    ldo = out.strides[0] // 4  # row stride of out (elements)
    dh16 = (dh + NV_LANES - 1) // NV_LANES * NV_LANES
    sc = np.float32(scale)
    maxlen = 0
    for b in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[b + 1] - cu_seqlens[b]
        if length <= SHORT and length > maxlen:
            maxlen = length
    lr = (maxlen + O_MR - 1) // O_MR * O_MR  # rows of the buffers (a multiple of O_MR)
    l2 = max((maxlen + 1) // 2, 1)  # pairs along the keys
    vp = np.zeros((l2, dh16), np.uint32)  # (keys/2, dh16) V as bf16 pairs of consecutive rows
    s = np.zeros((lr, ROW_MAX), np.float32)  # (rows, 128) scores; softmax_row_bf16 reads whole 128-wide rows
    pb = np.zeros((lr, ROW_MAX // 2), np.uint32)  # (rows, 64) unnormalised probabilities as bf16 pairs
    o = np.empty((O_MR, dh16), np.float32)  # (8, dh16) output tile of a partial row block or dh % 16 != 0
    pstride = dh16 * NV_LANES
    kt = np.empty(ROW_MAX // NV_LANES * pstride, np.float32)  # (128/16, dh16, 16) K^T as panels of 16 keys
    kpad = np.zeros((NV_LANES, NV_LANES), np.float32)  # (16, 16) a partial block of K, zero-padded
    qpad = np.zeros((O_MR, dh), np.float32)  # (8, dh) the query rows of a partial row block, zero-padded
    inv_rows = np.zeros(lr, np.float32)  # (rows,) 1 / row sum
    direct = dh16 == dh and out.strides[1] == 4  # full output tiles go straight into out

    for w in range(w0, w1):
        b = w // H
        h = w - b * H
        t0 = cu_seqlens[b]
        L = cu_seqlens[b + 1] - t0
        if L <= 0:
            continue
        if L > SHORT:
            attention_softmax(qkv, cu_seqlens, num_heads, head_dim, scale, False, out, w, w + 1)
            continue
        q0, k0, v0 = h * dh, D + h * dh, 2 * D + h * dh  # column of the head's Q, K, V
        Lr8 = (L + O_MR - 1) // O_MR * O_MR
        L2 = (L + 1) // 2
        # V as bf16 pairs of consecutive rows (columns >= dh stay zero; an odd last row pairs with zero)
        for j in range(L2):
            v_even = qkv[t0 + 2 * j, v0 : v0 + dh]  # (dh,)
            vp_row = vp[j]  # (dh16,)
            if 2 * j + 1 < L:
                v_odd = qkv[t0 + 2 * j + 1, v0 : v0 + dh]  # (dh,)
                for d in range(dh):
                    vp_row[d] = bf16_pair(v_even[d], v_odd[d])
            else:
                for d in range(dh):
                    vp_row[d] = bf16_bits(v_even[d])
        # S = scale * Q K^T in float32: K^T packed as panels of 16 keys, query rows read in place
        panels = (L + NV_LANES - 1) // NV_LANES  # score columns >= L hold garbage: softmax_row_bf16 ignores them
        for p in range(panels):
            keys = min(NV_LANES, L - p * NV_LANES)
            for d0 in range(0, dh, NV_LANES):
                dst = p * pstride + d0 * NV_LANES
                if keys == NV_LANES and d0 + NV_LANES <= dh:
                    transpose16(qkv, (t0 + p * NV_LANES) * ld + k0 + d0, ld, kt, dst)
                else:  # the last keys or head columns: copied, zero-padded (never read past the block)
                    cols = min(NV_LANES, dh - d0)
                    for i in range(NV_LANES):
                        for c in range(NV_LANES):
                            kpad[i, c] = qkv[t0 + p * NV_LANES + i, k0 + d0 + c] if i < keys and c < cols else 0.0
                    transpose16(kpad, 0, NV_LANES, kt, dst)
        for r0 in range(0, L, O_MR):
            if r0 + O_MR <= L:
                _score_rows(qkv, (t0 + r0) * ld + q0, ld, kt, panels, dh, pstride, s, r0, sc)
            else:  # the last rows: copied, zero-padded to O_MR (rows past the array's end are never read)
                for i in range(O_MR):
                    for d in range(dh):
                        qpad[i, d] = qkv[t0 + r0 + i, q0 + d] if r0 + i < L else 0.0
                _score_rows(qpad, 0, dh, kt, panels, dh, pstride, s, r0, sc)
        # E = bf16(exp(S - rowmax)) as pairs, 1 / (row sum of the rounded values); rows >= L: zero weights
        for r in range(L):
            inv_rows[r] = _ONE / softmax_row_bf16(s, r * ROW_MAX, L, pb, r * (ROW_MAX // 2))  # sum >= 1
        for r in range(L, Lr8):
            inv_rows[r] = 0.0
            for j in range(L2):
                pb[r, j] = _ZERO_U
        # O = E V / rowsum, tiles of O_MR rows x 32 (then 16) head columns, straight into out when whole
        for r0 in range(0, Lr8, O_MR):
            into_out = direct and r0 + O_MR <= L
            c0 = 0
            while c0 < dh16:
                if into_out:
                    dst, dst_off, ldd = out, (t0 + r0) * ldo + h * dh + c0, ldo
                else:
                    dst, dst_off, ldd = o, c0, dh16
                if c0 + 2 * NV_LANES <= dh16:
                    micro_bf16(O_MR, 2, pb, r0 * (ROW_MAX // 2), ROW_MAX // 2, vp, c0, dh16, L2, dst, dst_off, ldd,
                               inv_rows, r0)
                    c0 += 2 * NV_LANES
                else:
                    micro_bf16(O_MR, 1, pb, r0 * (ROW_MAX // 2), ROW_MAX // 2, vp, c0, dh16, L2, dst, dst_off, ldd,
                               inv_rows, r0)
                    c0 += NV_LANES
            if not into_out:
                for r in range(r0, min(r0 + O_MR, L)):
                    o_dst = out[t0 + r, h * dh : h * dh + dh]  # (dh,)
                    o_row = o[r - r0]  # (dh16,)
                    for d in range(dh):
                        o_dst[d] = o_row[d]
