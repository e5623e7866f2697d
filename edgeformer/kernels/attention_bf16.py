"""Softmax attention with a bf16 P V product (AVX512-BF16): the attention kind `softmax` with precision "bf16".

Same contract as kernels/attention.py (packed [Q | K | V] rows, cu_seqlens, work items w = b*H + h,
non-causal), different arithmetic for the output product of a sequence of L <= SHORT tokens (one tile):

    S = scale * Q K^T                          (L x L, float32 on BLAS, as in kernels/attention.py)
    E = bf16(exp(S - rowmax(S)))               (exp to ~4e-5, then rounded to bf16)
    O = (E bf16(V)) / rowsum(E)                (vdpbf16ps, float32 accumulation; the sum is of the rounded E)

bf16(x) rounds to nearest even (8-bit mantissa, relative error <= 2^-9). Dividing by the sum of the
*rounded* probabilities keeps every output row an exact convex combination of (rounded) V rows. The scores
stay float32: rounding Q and K to bf16 as well was measured (bench/minilm_int8.py, int8 MiniLM, 256 texts)
to move nearest-neighbour agreement from 0.969 to 0.957, under issue 7's 0.96, because a score's error
grows with |q| |k| and softmax exponentiates it; the P V product's error stays relative to each term.
Sequences longer than SHORT take the float32 flash path of kernels/attention.py, so no more than one
L x L tile (L <= SHORT) is ever held per head.

Layout for the micro-kernel (kernels/gemm_bf16.py): E rows as bf16 pairs along the keys (read straight
from the rounded float32 row as uint64 pairs); V as (L/2, dh16) pairs of consecutive rows, dh16 = dh
rounded up to 16 with zero columns; an odd last key pairs with an exact zero. Output rows are computed
into a (rows, dh16) tile and the first dh columns of the first L rows copied out. Inputs must be finite.
"""
import numpy as np

from numba.cpython.unsafe.numbers import viewer

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.attention import SHORT, attention_softmax
from edgeformer.kernels.gemm_bf16 import NV_LANES, bf16_bits, bf16_pair, bf16_round, micro_bf16, pair_word
from edgeformer.kernels.sgemm import TRANS_N, TRANS_T, sgemm
from edgeformer.kernels.reduce import add_reassoc, max_nonan

O_MR = 8  # output tile: 8 query rows x 32 (nv = 2) or 16 (nv = 1) head columns

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_ZERO_U = np.uint32(0)
# exp for probabilities that are rounded to bf16 next (relative rounding 2^-9 = 2e-3): x = n ln2 + r with
# one reduction step (the float32 ln2 is off by 2e-8, so |n| <= 126 moves r by <= 3e-6) and Taylor's
# degree-4 polynomial on |r| <= ln2/2 (error <= r^5/120 = 4.2e-5): together ~20x below bf16's rounding,
# with a third fewer operations than mathfn.exp_nonpos (float32-accurate, 8e-8).
_EXP_LO = np.float32(-87.33654)  # exp(_EXP_LO) >= FLT_MIN; below it the result is flushed to 0
_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: t = x*log2e + _MAGIC holds round(x*log2e) in its low bits
_MAGIC_BITS = np.int32(0x4B400000)
_C2 = np.float32(1.0 / 2.0)
_C3 = np.float32(1.0 / 6.0)
_C4 = np.float32(1.0 / 24.0)


@helper
def exp_bf16(x):
    """exp(x) for float32 x <= 0 rounded to bf16 (a float32 with zero low halves); x < _EXP_LO -> 0."""
    under = x < _EXP_LO
    x = _EXP_LO if x < _EXP_LO else x
    t = x * _LOG2E + _MAGIC
    n = t - _MAGIC
    r = x - n * _LN2
    p = (((_C4 * r + _C3) * r + _C2) * r + _ONE) * r + _ONE
    e = p * viewer(np.int32((viewer(t, np.int32) - _MAGIC_BITS + 127) << 23), np.float32)
    return _ZERO if under else bf16_round(e)


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
    dh16 = (dh + NV_LANES - 1) // NV_LANES * NV_LANES
    sc = np.float32(scale)
    maxlen = 0
    for b in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[b + 1] - cu_seqlens[b]
        if length <= SHORT and length > maxlen:
            maxlen = length
    lr = (maxlen + O_MR - 1) // O_MR * O_MR  # rows of the buffers (a multiple of O_MR)
    lc = (maxlen + 1) // 2 * 2  # row stride of the score tile: even, > maxlen when maxlen is odd
    l2 = max((maxlen + 1) // 2, 1)  # pairs along the keys
    vp = np.zeros((l2, dh16), np.uint32)  # (keys/2, dh16) V as bf16 pairs of consecutive rows
    s_flat = np.empty(lr * lc, np.float32)  # (rows * lc,) scores, then bf16-rounded probabilities
    s = s_flat.reshape((lr, lc))  # (rows, lc)
    s64 = s_flat.view(np.uint64).reshape((lr, lc // 2))  # (rows, lc/2) the same rows read as pairs
    pb = np.zeros((lr, l2), np.uint32)  # (rows, keys/2) unnormalised probabilities as bf16 pairs
    o = np.empty((lr, dh16), np.float32)  # (rows, dh16) output tile
    inv_rows = np.zeros(lr, np.float32)  # (rows,) 1 / row sum

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
        # S = scale * Q K^T in float32 on BLAS (row-major (L, L) with row stride lc = column-major K Q^T)
        sgemm(TRANS_T, TRANS_N, L, L, dh, sc, qkv, (t0 * ld) + k0, ld, qkv, (t0 * ld) + q0, ld, s_flat, 0, lc)
        # E = bf16(exp(S - rowmax)) in place (float32 with zero low halves), row sums of the rounded values
        for r in range(L):
            s_row = s[r]  # (lc,)
            mx = s_row[0]
            for c in range(1, L):
                mx = max_nonan(mx, s_row[c])
            total = np.float32(0.0)
            for c in range(L):
                e = exp_bf16(s_row[c] - mx)
                s_row[c] = e
                total = add_reassoc(total, e)
            if L % 2:
                s_row[L] = 0.0  # the odd last key's partner (lc > L then)
            inv_rows[r] = _ONE / total  # total >= 1: the row max gives exp(0) = 1, exact in bf16
            s_row64 = s64[r]  # (lc/2,) the row as pairs
            pb_row = pb[r]  # (l2,)
            for j in range(L2):
                pb_row[j] = pair_word(s_row64[j])
        for r in range(L, Lr8):
            inv_rows[r] = 0.0
            for j in range(L2):
                pb[r, j] = _ZERO_U
        # O = E V / rowsum, tiles of O_MR rows x 32 (then 16) head columns
        for r0 in range(0, Lr8, O_MR):
            c0 = 0
            while c0 + 2 * NV_LANES <= dh16:
                micro_bf16(O_MR, 2, pb, r0 * pb.shape[1], pb.shape[1], vp, c0, dh16, L2, o, r0 * dh16 + c0, dh16,
                           inv_rows, r0)
                c0 += 2 * NV_LANES
            if c0 < dh16:
                micro_bf16(O_MR, 1, pb, r0 * pb.shape[1], pb.shape[1], vp, c0, dh16, L2, o, r0 * dh16 + c0, dh16,
                           inv_rows, r0)
        for r in range(L):
            o_dst = out[t0 + r, h * dh : h * dh + dh]  # (dh,)
            o_row = o[r]  # (dh16,)
            for d in range(dh):
                o_dst[d] = o_row[d]
