"""Binary-hash (EcoFormer) attention over packed variable-length sequences.

Per (sequence, head) work item, exactly as the official forward (ziplab/EcoFormer, pvt/performer.py and
pvt/hashing/ksh.py), see docs/BINARY_HASH.md:

1. hash: ``u = x / max(|x|_2, NORM_EPS)``; ``D2[n, j] = |u_n - p_j|^2`` to the m anchors p of the head;
   bandwidth ``sigma = mean over (n, j) of D2`` of *this* sequence and head (recomputed every call);
   ``phi = exp(-D2 / (2 sigma)) - mvec``; ``y = phi A_h^T`` (L, b); code bit r = ``y_r > 0``.
   The hash runs in float64 (one GEMM for ``u P^T``, ``D2 = |u|^2 + |p|^2 - 2 u.p`` clamped at 0, a float64
   polynomial exp), so that the codes agree with a float64 reference wherever ``|y| > ~1e-12``.
2. attention with similarity ``s_ij = c_i . c_j = b - 2 popcount(code_i xor code_j)`` and ``beta``:
   official ``o_i = (sum_j s_ij v_j + beta v_i) / (sum_j s_ij + L beta)`` (beta times the token's *own*
   value), normalised ``o_i = sum_j (s_ij + beta) v_j / (sum_j s_ij + L beta)``. With beta > b the
   denominator is >= L (beta - b) > 0; the op layer enforces beta > b, so it never reaches zero.
   - linear form, O(L b dh): codes as +-1 float32, ``M = C_k^T V`` (b, dh) and ``C_q M`` by BLAS
     (numba.md §2: on an FMA CPU two small fp32 GEMMs beat any additions-only loop);
   - quadratic form, O(L^2 dh): popcount similarities in 64 x 256 tiles, ``S V`` by BLAS.
   ``quad_max_len`` picks the form per item: quadratic when L <= quad_max_len.

Sign convention: a bit is 1 (code +1) iff ``y > 0``; ``y == 0`` (and -0.0, NaN) gives bit 0 (code -1),
as KSH's own binarisation ``where(y > 0, 1, -1)``. torch.sign, used by the official forward, would give 0
there; an exact zero needs degenerate weights (a zero row of A), so the two agree in practice.
Bits are packed LSB first: bit r of a token's code is bit ``r % 64`` of word ``r // 64`` (uint64 words).

Layout: ``x`` (T, width) float32 holds the valid tokens of B sequences back to back (sequence b owns rows
``cu_seqlens[b]:cu_seqlens[b+1]``). Head h of the hashed queries is at columns ``q_col + h*dh``, of the
hashed keys at ``k_col + h*dh`` (the same columns for EcoFormer's shared QK) and of the values at
``v_col + h*dh``. Kernels never validate: the op layer checks everything first.
"""
import numpy as np
from numba.core import types
from numba.cpython.unsafe.numbers import viewer
from numba.extending import intrinsic

from edgeformer.kernels._jit import helper, kernel

WORD_BITS = 64
NORM_EPS = 1e-12  # u = x / max(|x|, NORM_EPS): an all-zero row stays zero (the official code gives NaN)
SIGMA_FLOOR = 1e-30  # sigma = 0 only when every D2 is 0, then phi = exp(-0 / floor) = 1 (the limit)
QUERY_BLOCK = 64  # quadratic form tiles
KEY_BLOCK = 256

# Quadratic form only for L <= this (work item length). Measured once with a one-off sweep (now
# `bench/binary_hash_attention.py --threshold`), 1 thread, Zen 4, b = 16, m = 25, per (sequence, head), hash
# included (quadratic vs linear): dh 32: L 8 2.27 vs 2.30 us, L 16 5.6 vs 4.1 us, L 32 9.4 vs 7.7 us;
# dh 64: L 8 3.0 vs 4.1 us, L 16 7.8 vs 7.3 us, L 48 28 vs 18 us. The linear form's two tiny GEMMs win
# from L ~ 12 on; hashing dominates both at these lengths.
QUADRATIC_MAX_LEN = 8

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm split of ln 2: n * HI is exact for |n| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_EXP_LO = -708.0  # exp(-708) = 3.3e-308 is still normal; below, the result is flushed to 0
_INV = (1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
        1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600)
_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12 = _INV[2:]


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an integer (llvm.ctpop: popcnt, vpopcntq inside vectorised loops)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@helper
def exp_nonpos_f64(x):
    """exp(x) in float64 for finite x <= 0 (relative error ~2e-16); x < -708 gives 0.

    Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of degree 12 (truncation
    |r|^13/13! < 2e-16), scaled by 2**n built in the exponent field. Plain arithmetic, so it vectorises.
    """
    under = x < _EXP_LO
    x = _EXP_LO if under else x
    n = np.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _C12 * r + _C11
    p = p * r + _C10
    p = p * r + _C9
    p = p * r + _C8
    p = p * r + _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = (p * r + 1.0) * r + 1.0
    scale = viewer(np.int64((np.int64(n) + 1023) << 52), np.float64)
    return 0.0 if under else p * scale


@kernel
def hash_rows(x, anchors, anchor_sq, mvec, a_t, nbits, xn, xsq, d2, y, codes, signs):
    """Kernelized hash of the L rows of one (sequence, head).

    x (L, dh) float32 (any row stride); anchors (m, dh) f64 C; anchor_sq (m,) = |p_j|^2; mvec (m,);
    a_t (m, b) f64 C = A_h^T; scratch xn (L, dh), xsq (L,), d2 (L, m), y (L, b) f64 C.
    Writes y (pre-sign projections), codes (L, W) uint64 and signs (L, b) float32 (+1 / -1). L >= 1.
    """
    L = x.shape[0]
    dh = x.shape[1]
    m = anchors.shape[0]
    W = codes.shape[1]
    for i in range(L):
        xr = x[i]  # (dh,)
        s = 0.0
        for c in range(dh):
            v = np.float64(xr[c])
            s += v * v
        nrm = np.sqrt(s)
        inv = 1.0 / (nrm if nrm > NORM_EPS else NORM_EPS)
        ur = xn[i]  # (dh,)
        s = 0.0
        for c in range(dh):
            u = np.float64(xr[c]) * inv
            ur[c] = u
            s += u * u
        xsq[i] = s
    np.dot(xn, anchors.T, d2)  # (L, m) u . p
    total = 0.0
    for i in range(L):
        dr = d2[i]  # (m,)
        for j in range(m):
            d = xsq[i] + anchor_sq[j] - 2.0 * dr[j]
            d = d if d > 0.0 else 0.0
            dr[j] = d
            total += d
    sigma = total / (L * m)
    sigma = sigma if sigma > SIGMA_FLOOR else SIGMA_FLOOR
    k = -0.5 / sigma
    for i in range(L):
        dr = d2[i]  # (m,)
        for j in range(m):
            dr[j] = exp_nonpos_f64(dr[j] * k) - mvec[j]
    np.dot(d2, a_t, y)  # (L, b)
    for i in range(L):
        yr = y[i]  # (b,)
        sr = signs[i]  # (b,)
        for w in range(W):
            word = np.uint64(0)
            r1 = min(nbits, (w + 1) * WORD_BITS)
            for r in range(w * WORD_BITS, r1):
                if yr[r] > 0.0:
                    word |= np.uint64(1) << np.uint64(r - w * WORD_BITS)
                    sr[r] = 1.0
                else:
                    sr[r] = -1.0
            codes[i, w] = word


@kernel
def _linear_form(cq, ck, v, L, beta, normalized, ksum, mat, num, out_rows):
    """O(L b dh): out_i = (c_i M + beta v_i [or beta sum_j v_j]) / (c_i . ksum + L beta), M = C_k^T V.

    cq, ck (L, b) f32 +-1; v (L, dh) f32 C; scratch ksum (b,), mat (b, dh), num (L, dh) f32; out_rows (L, dh)
    row views of the output. ksum and c_i . ksum are sums of +-1: exact integers in float32 (L b < 2**24);
    the denominator c_i . ksum + L beta is formed in float64.
    """
    b = cq.shape[1]
    dh = v.shape[1]
    for r in range(b):
        ksum[r] = 0.0
    for j in range(L):
        kr = ck[j]  # (b,)
        for r in range(b):
            ksum[r] += kr[r]
    np.dot(ck.T, v, mat)  # (b, dh)
    np.dot(cq, mat, num)  # (L, dh)
    bf = np.float32(beta)
    vsum = np.zeros(dh, np.float32)  # (dh,) sum_j v_j, for the normalised form
    if normalized:
        for j in range(L):
            vr = v[j]  # (dh,)
            for c in range(dh):
                vsum[c] += vr[c]
    den0 = L * beta  # float64: with beta just above b the denominator cancels, float32 would lose it
    for i in range(L):
        qr = cq[i]  # (b,)
        s = np.float32(0.0)
        for r in range(b):
            s += qr[r] * ksum[r]
        inv = np.float32(1.0 / (np.float64(s) + den0))
        nr = num[i]  # (dh,)
        orow = out_rows[i]  # (dh,)
        if normalized:
            for c in range(dh):
                orow[c] = (nr[c] + bf * vsum[c]) * inv
        else:
            vr = v[i]  # (dh,)
            for c in range(dh):
                orow[c] = (nr[c] + bf * vr[c]) * inv


@kernel
def _quadratic_form(codes_q, codes_k, v, L, nbits, beta, normalized, s_buf, pv_buf, acc, rowsum, out_rows):
    """O(L^2 dh): s_ij = b - 2 popcount(q_i xor k_j) in QUERY_BLOCK x KEY_BLOCK tiles, S V by BLAS.

    codes_q, codes_k (L, W) uint64; v (L, dh) f32 C; scratch s_buf (QB*KB,), pv_buf (QB*dh,), acc (QB, dh),
    rowsum (QB,) f32; out_rows (L, dh) row views of the output. Row sums are exact integers in float32.
    """
    W = codes_q.shape[1]
    dh = v.shape[1]
    bf = np.float32(beta)
    nb = np.int64(nbits)
    vsum = np.zeros(dh, np.float32)  # (dh,) sum_j v_j, for the normalised form
    if normalized:
        for j in range(L):
            vr = v[j]  # (dh,)
            for c in range(dh):
                vsum[c] += vr[c]
    den0 = L * beta  # float64, as in _linear_form
    for i0 in range(0, L, QUERY_BLOCK):
        m = min(QUERY_BLOCK, L - i0)
        for r in range(m):
            rowsum[r] = 0.0
            for c in range(dh):
                acc[r, c] = 0.0
        for j0 in range(0, L, KEY_BLOCK):
            n = min(KEY_BLOCK, L - j0)
            s = s_buf[: m * n].reshape((m, n))  # (m, n) similarities
            for r in range(m):
                qw = codes_q[i0 + r]  # (W,)
                srow = s[r]  # (n,)
                tot = np.float32(0.0)
                for c in range(n):
                    kw = codes_k[j0 + c]  # (W,)
                    pc = np.int64(0)
                    for w in range(W):
                        pc += np.int64(popcount(qw[w] ^ kw[w]))
                    val = np.float32(nb - 2 * pc)
                    srow[c] = val
                    tot += val
                rowsum[r] += tot
            pv = pv_buf[: m * dh].reshape((m, dh))  # (m, dh)
            np.dot(s, v[j0 : j0 + n], pv)
            for r in range(m):
                for c in range(dh):
                    acc[r, c] += pv[r, c]
        for r in range(m):
            inv = np.float32(1.0 / (np.float64(rowsum[r]) + den0))
            orow = out_rows[i0 + r]  # (dh,)
            if normalized:
                for c in range(dh):
                    orow[c] = (acc[r, c] + bf * vsum[c]) * inv
            else:
                vr = v[i0 + r]  # (dh,)
                for c in range(dh):
                    orow[c] = (acc[r, c] + bf * vr[c]) * inv


@kernel
def binary_hash_attention(x, cu_seqlens, num_heads, head_dim, q_col, k_col, v_col, shared, anchors, anchor_sq,
                          mvec, a_t, nbits, beta, normalized, quad_max_len, out, w0, w1):
    """out[tokens of b, h*dh:(h+1)*dh] = binary-hash attention of (sequence b, head h), w = b*H + h in [w0, w1).

    x (T, width) float32 C; cu_seqlens (B+1,) int64 non-decreasing; anchors (H, m, dh), anchor_sq (H, m),
    mvec (H, m), a_t (H, m, b) float64 C; out (T, H*dh) float32 C; shared: keys are the hashed queries
    (k_col ignored); normalized: normalised formula instead of the official one; an item of length
    L <= quad_max_len uses the quadratic popcount form, longer ones the linear form.
    """
    if w1 <= w0:
        return
    H = num_heads
    dh = head_dim
    m = anchors.shape[1]
    b = nbits
    W = (b + WORD_BITS - 1) // WORD_BITS
    maxlen = 0
    for bb in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[bb + 1] - cu_seqlens[bb]
        if length > maxlen:
            maxlen = length
    if maxlen <= 0:
        return
    xn = np.empty((maxlen, dh), np.float64)  # (L, dh) normalised rows
    xsq = np.empty(maxlen, np.float64)  # (L,)
    d2 = np.empty((maxlen, m), np.float64)  # (L, m) distances, then centred features
    y = np.empty((maxlen, b), np.float64)  # (L, b) pre-sign projections
    codes_q = np.empty((maxlen, W), np.uint64)  # (L, W)
    codes_k = np.empty((maxlen, W), np.uint64)  # (L, W)
    signs_q = np.empty((maxlen, b), np.float32)  # (L, b) +-1
    signs_k = np.empty((maxlen, b), np.float32)  # (L, b) +-1
    vs = np.empty((maxlen, dh), np.float32)  # (L, dh) values, contiguous
    num = np.empty((maxlen, dh), np.float32)  # (L, dh) linear-form numerators
    ksum = np.empty(b, np.float32)  # (b,)
    mat = np.empty((b, dh), np.float32)  # (b, dh)
    s_buf = np.empty(QUERY_BLOCK * KEY_BLOCK, np.float32)  # one quadratic tile
    pv_buf = np.empty(QUERY_BLOCK * dh, np.float32)
    acc = np.empty((QUERY_BLOCK, dh), np.float32)
    rowsum = np.empty(QUERY_BLOCK, np.float32)

    for w in range(w0, w1):
        bb = w // H
        h = w - bb * H
        t0 = cu_seqlens[bb]
        L = cu_seqlens[bb + 1] - t0
        if L <= 0:
            continue
        t1 = t0 + L
        qc = q_col + h * dh
        hash_rows(x[t0:t1, qc : qc + dh], anchors[h], anchor_sq[h], mvec[h], a_t[h], b, xn[:L], xsq[:L],
                  d2[:L], y[:L], codes_q[:L], signs_q[:L])
        if shared:
            ck = signs_q
            kcodes = codes_q
        else:
            kc = k_col + h * dh
            hash_rows(x[t0:t1, kc : kc + dh], anchors[h], anchor_sq[h], mvec[h], a_t[h], b, xn[:L], xsq[:L],
                      d2[:L], y[:L], codes_k[:L], signs_k[:L])
            ck = signs_k
            kcodes = codes_k
        vc = v_col + h * dh
        for i in range(L):
            src = x[t0 + i, vc : vc + dh]  # (dh,)
            dst = vs[i]  # (dh,)
            for c in range(dh):
                dst[c] = src[c]
        out_rows = out[t0:t1, h * dh : (h + 1) * dh]  # (L, dh) strided view
        if L <= quad_max_len:
            _quadratic_form(codes_q[:L], kcodes[:L], vs[:L], L, b, beta, normalized, s_buf, pv_buf, acc, rowsum,
                            out_rows)
        else:
            _linear_form(signs_q[:L], ck[:L], vs[:L], L, beta, normalized, ksum, mat, num[:L], out_rows)


@kernel
def binary_hash_codes(x, cu_seqlens, num_heads, head_dim, col, anchors, anchor_sq, mvec, a_t, nbits, codes, proj,
                      w0, w1):
    """Codes of the rows of every (sequence, head) item w = b*H + h in [w0, w1) (the hash step alone).

    x (T, width) float32 C, head h at columns col + h*dh; codes (T, H, W) uint64 C out; proj (T, H, b)
    float64 C out (pre-sign projections y). Weights as binary_hash_attention.
    """
    if w1 <= w0:
        return
    H = num_heads
    dh = head_dim
    m = anchors.shape[1]
    b = nbits
    W = codes.shape[2]
    maxlen = 0
    for bb in range(w0 // H, (w1 - 1) // H + 1):
        length = cu_seqlens[bb + 1] - cu_seqlens[bb]
        if length > maxlen:
            maxlen = length
    if maxlen <= 0:
        return
    xn = np.empty((maxlen, dh), np.float64)
    xsq = np.empty(maxlen, np.float64)
    d2 = np.empty((maxlen, m), np.float64)
    y = np.empty((maxlen, b), np.float64)
    cbuf = np.empty((maxlen, W), np.uint64)
    signs = np.empty((maxlen, b), np.float32)
    for w in range(w0, w1):
        bb = w // H
        h = w - bb * H
        t0 = cu_seqlens[bb]
        L = cu_seqlens[bb + 1] - t0
        if L <= 0:
            continue
        c0 = col + h * dh
        hash_rows(x[t0 : t0 + L, c0 : c0 + dh], anchors[h], anchor_sq[h], mvec[h], a_t[h], b, xn[:L], xsq[:L],
                  d2[:L], y[:L], cbuf[:L], signs[:L])
        for i in range(L):
            for ww in range(W):
                codes[t0 + i, h, ww] = cbuf[i, ww]
            for r in range(b):
                proj[t0 + i, h, r] = y[i, r]
