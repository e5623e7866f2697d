"""Softmax attention over packed (padding-free) variable-length sequences, flash-attention style.

Layout (ByteTransformer-style packing): ``qkv`` (T, 3*H*dh) holds the valid tokens of B sequences back
to back; sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Columns are ``[Q | K | V]``, each
H*dh wide, head h at ``h*dh:(h+1)*dh`` inside its block. Padding never exists, so it is never read.

Per (sequence, head) work item the head's Q (pre-scaled), K and V are copied into contiguous
scratch (O(L*dh), cheap next to the O(L^2*dh) products). Queries are processed in blocks of
``QUERY_BLOCK`` rows (a non-causal sequence of <= ``SHORT`` tokens is one block); keys in blocks of
``KEY_BLOCK``. For each key block the score tile
``S = Q_blk @ K_blk^T`` comes from BLAS (``np.dot`` inside njit), an online softmax keeps a running
row max and row sum and rescales the accumulator, and ``P @ V_blk`` (BLAS again) is added to it.
Only one QUERY_BLOCK x KEY_BLOCK score tile exists at a time (64 KiB at 64 x 256); tile sizes were
swept (32..128 x 128..512): all within ~10% of each other, 64 x 256 is a good default for causal. With ``causal`` the key range of a query block stops at its last query, so
blocks entirely above the diagonal are never computed; inside the diagonal block masked entries
get probability exactly 0.

Exponentials use ``mathfn.exp_f32`` (float32 polynomial, rel. err 8e-8, vectorises under
error_model="numpy", numba.md §7); libm ``exp`` would be scalar and ~10x slower. The row max and
the row sum use two one-instruction LLVM intrinsics (below) so that those reductions vectorise
too, without turning on fastmath for the whole kernel.
"""
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from edgeformer.kernels._jit import kernel
from edgeformer.kernels.mathfn import exp_f32

QUERY_BLOCK = 64
KEY_BLOCK = 256
# A non-causal sequence of at most SHORT tokens is one query block: half the BLAS calls per head, and the
# (L, L) tile is no larger than a QUERY_BLOCK x KEY_BLOCK one (9 % less attention time at L = 100-128 on
# Zen 3, scratch measurement of the kernel alone). Causal sequences keep 64-row blocks: their first block
# then needs only its own 64 keys.
SHORT = 128

_ONE = np.float32(1.0)
_NEG_INF = np.float32(-np.inf)


@intrinsic
def _max_nonan(typingctx, a, b):
    """llvm.maxnum with nnan/nsz: lets LLVM vectorise a row-max reduction (a select-based max does
    not vectorise in Numba, even with fastmath=True: 0.43 -> 0.04 ns/element). Finite inputs only."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen


@intrinsic
def _add_reassoc(typingctx, a, b):
    """a + b with reassoc/nsz on this one instruction, so a sum reduction vectorises (partial sums
    in SIMD lanes) while everything else keeps IEEE semantics."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=("reassoc", "nsz"))

    return a(a, b), codegen


@kernel
def attention_softmax(qkv, cu_seqlens, num_heads, head_dim, scale, causal, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] = softmax(scale * Q K^T [+ causal mask]) V for w = b*H + h in [w0, w1).

    qkv (T, 3*H*dh) float32 C; cu_seqlens (B+1,) int64 non-decreasing; out (T, H*dh) float32 C;
    num_heads, head_dim, w0, w1 int64; scale float64; causal bool. Writes only the rows/columns of
    the work items in [w0, w1). Inputs must be finite.
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
    qs = np.empty((maxlen, dh), np.float32)  # (L, dh) scaled Q of one (sequence, head)
    ks = np.empty((maxlen, dh), np.float32)  # (L, dh)
    vs = np.empty((maxlen, dh), np.float32)  # (L, dh)
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
        qc = h * dh
        kc = D + h * dh
        vc = 2 * D + h * dh
        for i in range(L):
            # row views: indices into them are provably >= 0, so no wraparound selects / gathers
            q_src = qkv[t0 + i, qc : qc + dh]  # (dh,)
            k_src = qkv[t0 + i, kc : kc + dh]  # (dh,)
            v_src = qkv[t0 + i, vc : vc + dh]  # (dh,)
            for c in range(dh):
                qs[i, c] = q_src[c] * sc
            for c in range(dh):
                ks[i, c] = k_src[c]
            for c in range(dh):
                vs[i, c] = v_src[c]

        qb = L if (L <= SHORT and not causal) else QUERY_BLOCK
        for i0 in range(0, L, qb):
            m = min(qb, L - i0)
            for r in range(m):
                mrow[r] = _NEG_INF
                lrow[r] = 0.0
                for c in range(dh):
                    acc[r, c] = 0.0
            kend = i0 + m if causal else L  # keys at or after kend are masked for every row
            for j0 in range(0, kend, KEY_BLOCK):
                n = min(KEY_BLOCK, kend - j0)
                s = s_buf[: m * n].reshape((m, n))  # (m, n) scores, then probabilities
                np.dot(qs[i0 : i0 + m], ks[j0 : j0 + n].T, s)
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
                        mx = _max_nonan(mx, s_row[c])
                    m_old = mrow[r]
                    m_new = mx if mx > m_old else m_old
                    mrow[r] = m_new
                    alpha = exp_f32(m_old - m_new)  # exp(-inf) = 0 on the first block
                    total = np.float32(0.0)
                    for c in range(nv):
                        e = exp_f32(s_row[c] - m_new)
                        s_row[c] = e
                        total = _add_reassoc(total, e)
                    s_tail = s_row[nv:]  # (n - nv,) masked keys of the diagonal block
                    for c in range(n - nv):
                        s_tail[c] = 0.0
                    lrow[r] = lrow[r] * alpha + total
                    for c in range(dh):
                        acc[r, c] *= alpha
                pv = pv_buf[: m * dh].reshape((m, dh))  # (m, dh)
                np.dot(s, vs[j0 : j0 + n], pv)
                for r in range(m):
                    for c in range(dh):
                        acc[r, c] += pv[r, c]

            for r in range(m):
                inv = _ONE / lrow[r]  # >= 1: the row max contributes exp(0) = 1
                o_dst = out[t0 + i0 + r, qc : qc + dh]  # (dh,)
                for c in range(dh):
                    o_dst[c] = acc[r, c] * inv
