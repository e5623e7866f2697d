"""Table projections (MemoryFormer memory layer, and product-quantisation tables): encode, then gather.

A table projection replaces ``y = x W^T + b`` by

    y[r] = act( sum_k w[r, k] * s[row] * T[row, :] + b ) + residual[r],   row = k*R + code[r, k]

``T`` (K*R, N) holds K tables of R rows each (table k = rows [k*R, (k+1)*R)); ``s`` is an optional
per-row scale (int8 tables), 1 otherwise. Two encoders produce (code, w) per token and table:

* sign (MemoryFormer, seed_algorithms.md §2.2): the input is cut into K chunks z_k of tau values
  (d_in = K*tau); bit_j = [z_kj >= 0] (``zero_bit`` = 1, the PyTorch path) or [z_kj > 0] (``zero_bit``
  = 0, the official C++ extension); code = sum_j bit_j * 2^(tau-1-j): the chunk's FIRST element is the
  MOST significant bit. R = 2^tau. The weight is
      official ("code_l1_times_prob", WEIGHT_L1_PROB):  w = ||z_k||_1 * prod_j sigmoid(2 |z_kj| / t)
      paper    ("paper_prob", WEIGHT_PROB):             w =             prod_j sigmoid(2 |z_kj| / t)
  where prod_j sigmoid(2|z_j|/t) = exp(<sign z, z>/t) / sum_{s in {-1,1}^tau} exp(<s, z>/t) is the
  softmax probability of the chunk's own sign pattern (closed form of the 2^tau-term normaliser:
  sum_s exp(<s,z>/t) = prod_j 2 cosh(z_j/t)). It is computed as 1 / prod_j (1 + exp(-2|z_j|/t)):
  exp of a non-positive argument never overflows. |0| = 0, so a zero element adds a factor 1/2 and
  nothing to the L1 norm. NaN inputs give bit 0 and a NaN weight (NaN output); codes stay in range.
* pq (product quantisation, MADDNESS/Bolt-style, converters/lut_fit.py): chunk z_k of S values is
  encoded by its nearest centroid among R (squared Euclidean distance, first index on ties, NaN -> 0);
  w = 1. Tables hold T_k[c] = W[:, k-chunk] @ centroid_kc (or a least-squares refit).

Table storage: float32, float16 kept as uint16 bits and widened in the kernel (``f16_bits_to_f32``:
LLVM ``bitcast`` + ``fpext``, which becomes vcvtph2ps; Numba has no float16 arithmetic, numba.md §3), or
int8 with the per-row scale s (K*R,). ``as_f32`` picks the widening by the table's dtype at compile time.

Loop order of ``lut_gather`` (bandwidth-bound: each token reads K random rows): column tiles of
max(COL_TILE, OUT_TILE_FLOATS / tokens) outputs > token tiles of TOKEN_TILE rows > tables > tokens. The
output tile (16 x 512 floats, 32 KiB; one token: up to 8192 columns) stays in L1 while the K tables are accumulated into it; the slice of table k that the tile's
tokens gather from (R x 1 KiB) is in L2 for all tokens of the tile, and the slices of one column tile
(K*R KiB) are reused from L3 by the following token tiles. A gathered row is a random place in a table of
tens of MiB, so each one is a DRAM (and TLB) miss; the rows of table k + PREFETCH_TABLES are prefetched
(llvm.prefetch, every 64-byte line of the tile's slice) while table k is accumulated, so that several
misses are in flight instead of one at a time. Accumulation is in float32, in the order
bias, table 0, 1, ..., K-1 (the NumPy reference sums in float64).
"""
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from edgeformer.kernels._jit import kernel
from edgeformer.kernels.gemm_f32 import _prefetch
from edgeformer.kernels.mathfn import ACT_NONE, act_inplace, exp_f32

WEIGHT_L1_PROB = 0  # official code: ||z||_1 * prod sigmoid(2|z|/t)
WEIGHT_PROB = 1  # paper: prod sigmoid(2|z|/t)
WEIGHT_MODES = {"code_l1_times_prob": WEIGHT_L1_PROB, "paper_prob": WEIGHT_PROB}

TOKEN_TILE = 16  # tokens whose output rows stay in L1 while the K tables are accumulated
COL_TILE = 256  # output columns per tile (1 KiB of a float32 table row), at least
OUT_TILE_FLOATS = 8192  # output floats of one tile kept in L1 (32 KiB): fewer tokens -> wider tiles
PREFETCH_TABLES = 8  # software prefetch of the rows gathered this many tables ahead (see lut_gather; 4-16 within noise)

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """float32 value of IEEE half-precision bits held in a uint16 (exact: every half is a float32)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.uint16), codegen


def as_f32(v):
    """A table element as float32 (typed by its dtype inside njit code; see the overload below)."""
    raise NotImplementedError("as_f32 is only callable from Numba-compiled code")


@overload(as_f32, inline="always")
def _as_f32_overload(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: f16_bits_to_f32(v)
    if v == types.int8:
        return lambda v: np.float32(v)
    return None


@kernel
def lut_hash_sign(x, num_tables, tau, zero_bit, mode, inv_t, codes, weights, r0, r1):
    """MemoryFormer hashing of rows r0 <= r < r1.

    x (T, K*tau) f32; zero_bit 1: z >= 0 -> bit 1, 0: z > 0 -> bit 1; mode WEIGHT_L1_PROB or WEIGHT_PROB;
    inv_t = 1 / temperature (float32). Writes codes (T, K) int32 in [0, 2^tau) (first element = MSB) and
    weights (T, K) f32.
    """
    two_inv_t = np.float32(_TWO * np.float32(inv_t))
    xt = np.empty((tau, num_tables), dtype=np.float32)  # (tau, K): element j of every chunk, contiguous
    factor = np.empty(num_tables, dtype=np.float32)  # (K,) 1 / sigmoid(2|z_j|/t) of element j per chunk
    code = np.empty(num_tables, dtype=np.int32)  # (K,) running code, l1 norm and denominator per chunk
    l1 = np.empty(num_tables, dtype=np.float32)
    den = np.empty(num_tables, dtype=np.float32)
    for r in range(r0, r1):
        xr = x[r]  # (K*tau,)
        # Chunk-major -> element-major copy, then every loop runs over the K chunks with contiguous
        # arrays and vectorises (encoding 1536 inputs: 12.5 -> ~1.5 us). Each chunk still takes its
        # elements j = 0, 1, ... in order, so codes and weights are the same float32 operations as
        # one chunk at a time.
        for k in range(num_tables):
            src = xr[k * tau:]  # (tau,) chunk k
            for j in range(tau):
                xt[j, k] = src[j]
        for k in range(num_tables):
            code[k] = 0
            l1[k] = _ZERO
            den[k] = _ONE
        for j in range(tau):
            xj = xt[j]  # (K,)
            for k in range(num_tables):
                factor[k] = _ONE + exp_f32(-(abs(xj[k]) * two_inv_t))
            for k in range(num_tables):
                v = xj[k]
                bit = 1 if (v > _ZERO or (zero_bit == 1 and v == _ZERO)) else 0
                code[k] = (code[k] << 1) | bit
                l1[k] += abs(v)
                den[k] *= factor[k]
        for k in range(num_tables):
            codes[r, k] = code[k]
            w = _ONE / den[k]
            if mode == WEIGHT_L1_PROB:
                w = l1[k] * w
            weights[r, k] = w


@kernel
def lut_encode_pq(x, centroids, codes, weights, r0, r1):
    """Nearest-centroid (product quantisation) codes of rows r0 <= r < r1.

    x (T, K*S) f32; centroids (K, R, S) f32. codes[r, k] = argmin_c ||x[r, k*S:(k+1)*S] - centroids[k, c]||^2
    (first minimum; a NaN chunk gets code 0), weights[r, k] = 1.
    """
    nt, nc, sub = centroids.shape
    for r in range(r0, r1):
        xr = x[r]  # (K*S,)
        for k in range(nt):
            base = k * sub
            best = np.inf
            code = 0
            for c in range(nc):
                cen = centroids[k, c]  # (S,)
                d = _ZERO
                for j in range(sub):
                    e = xr[base + j] - cen[j]
                    d += e * e
                if d < best:
                    best = d
                    code = c
            codes[r, k] = code
            weights[r, k] = _ONE


@kernel
def lut_gather(codes, weights, tables, rows_per_table, scale, bias, residual, act, out, r0, r1, c0, c1):
    """out[r, c0:c1] = act(sum_k weights[r,k] * scale[row] * tables[row, c0:c1] + bias[c0:c1]) + residual[r, c0:c1]
    with row = k*rows_per_table + codes[r, k], for r0 <= r < r1.

    codes (T, K) int32 in [0, rows_per_table) (not checked); weights (T, K) f32; tables (K*R, N) float32,
    uint16 (float16 bits) or int8; scale (K*R,) f32 or (0,) = 1; bias (N,) or (0,); residual (T, N) or
    (0, 0); act an ACT_* code; out (T, N) f32, not aliasing the inputs.
    """
    num_tables = codes.shape[1]
    has_scale = scale.shape[0] != 0
    has_bias = bias.shape[0] != 0
    has_res = residual.shape[0] != 0
    # Few tokens: widen the column tile (up to OUT_TILE_FLOATS floats of output in L1), so that each
    # gathered row is read in one piece — every extra piece is another walk over the row's pages (TLB
    # misses dominate a one-token call on a table of tens of MiB).
    tokens = min(TOKEN_TILE, r1 - r0)
    width = COL_TILE
    if tokens > 0 and OUT_TILE_FLOATS // tokens > width:
        width = OUT_TILE_FLOATS // tokens
    n_cols = tables.shape[1]
    line = 64 // tables.itemsize  # table elements per 64-byte cache line
    flat = tables.reshape(-1)  # (K*R*N,)
    for cc0 in range(c0, c1, width):
        cc1 = min(cc0 + width, c1)
        for t0 in range(r0, r1, TOKEN_TILE):
            t1 = min(t0 + TOKEN_TILE, r1)
            # every inner loop runs over views from column 0, so its index is provably >= 0: no
            # negative-index wraparound selects, and LLVM vectorises (2.3x at one token)
            for r in range(t0, t1):
                o = out[r, cc0:cc1]  # (w,)
                if has_bias:
                    b = bias[cc0:cc1]  # (w,)
                    for c in range(o.shape[0]):
                        o[c] = b[c]
                else:
                    for c in range(o.shape[0]):
                        o[c] = _ZERO
            for k in range(num_tables):
                base = k * rows_per_table
                if k + PREFETCH_TABLES < num_tables:  # the rows this tile gathers PREFETCH_TABLES tables ahead
                    nxt = base + PREFETCH_TABLES * rows_per_table
                    for r in range(t0, t1):
                        ahead = (nxt + codes[r, k + PREFETCH_TABLES]) * n_cols + cc0
                        for q in range(0, cc1 - cc0, line):
                            _prefetch(flat, ahead + q, 0)
                for r in range(t0, t1):
                    row = base + codes[r, k]
                    w = weights[r, k]
                    if has_scale:
                        w = w * scale[row]
                    src = tables[row, cc0:cc1]  # (w,)
                    o = out[r, cc0:cc1]  # (w,)
                    for c in range(o.shape[0]):
                        o[c] += w * as_f32(src[c])
            if act != ACT_NONE or has_res:
                for r in range(t0, t1):
                    o = out[r, cc0:cc1]  # (w,)
                    if act != ACT_NONE:
                        act_inplace(o, act)
                    if has_res:
                        res = residual[r, cc0:cc1]  # (w,)
                        for c in range(o.shape[0]):
                            o[c] += res[c]


@kernel
def lut_sign_linear(x, num_tables, tau, zero_bit, mode, inv_t, codes, weights, tables, scale, bias, residual, act, out,
                    r0, r1, c0, c1, encode):
    """lut_hash_sign (if ``encode``) then lut_gather over rows r0:r1 and columns c0:c1, in one call: at one
    token the Python-to-Numba dispatch of a second kernel costs as much as the hash itself."""
    if encode:
        lut_hash_sign(x, num_tables, tau, zero_bit, mode, inv_t, codes, weights, r0, r1)
    lut_gather(codes, weights, tables, 1 << tau, scale, bias, residual, act, out, r0, r1, c0, c1)


@kernel
def lut_pq_linear(x, centroids, codes, weights, tables, scale, bias, residual, act, out, r0, r1, c0, c1, encode):
    """lut_encode_pq (if ``encode``) then lut_gather, in one call (see lut_sign_linear)."""
    if encode:
        lut_encode_pq(x, centroids, codes, weights, r0, r1)
    lut_gather(codes, weights, tables, centroids.shape[1], scale, bias, residual, act, out, r0, r1, c0, c1)
