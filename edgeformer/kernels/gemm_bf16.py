"""AVX512-BF16 pieces of attention's bf16 kernel: a `vdpbf16ps` micro-kernel for P V, one softmax row, and
the float32 score tile with its K^T transposition (`micro_scores`, `transpose16`; plain AVX-512F, kept here
because only that kernel calls them).

    c[c_off + i*ldc + n] = rs[rs_off + i] * sum_p  a2[i, p] . b2[p, n]        i < MR, n < NV*16, p < k2

a and b hold **pairs** of bf16 values packed in uint32 words (low half = the even element, as
little-endian memory holds two consecutive bf16): a2[i, p] = a[a_off + i*lda + p] is (A[i, 2p], A[i, 2p+1])
and b2[p, n] = b[b_off + p*ldb + n] is (B[2p, n], B[2p+1, n]); "." multiplies the two pairs and adds the
products, which is exactly what one lane of `vdpbf16ps` does (products exact, float32 accumulation with
round-to-nearest-even, bf16 inputs and float32 results denormal-flushed). rs is a per-row float32 scale
(1 / row sum for attention's output), applied once in registers before the store. `softmax_row_bf16`
turns one row of scores into those bf16 pairs (below).

Why bf16: `vdpbf16ps` does 32 multiply-adds per zmm instruction against 16 for an fp32 FMA, and the
probabilities and V tolerate bf16's 8-bit mantissa (relative rounding 2^-9) in int8 models whose
activations are already 8-bit; the scores do not (kernels/attention_bf16.py states the accuracy measured).

bfloat has no llvmlite type: `_BFloat` prints as LLVM's `bfloat`, so the intrinsic's operands are
<32 x bfloat> bitcasts of <16 x i32> pair vectors. Compiling the intrinsic for a CPU without AVX512-BF16
would abort the process (as VNNI does, numba.md §1): `bf16_available()` requires the host feature and no
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override, and the intrinsic's typing re-checks it and raises a
TypingError instead of emitting it. No bounds are checked: the caller guarantees every addressed
element exists.
"""
import numpy as np
from llvmlite import ir
from llvmlite.ir import types as _irt
from numba.core import types
from numba.core.errors import TypingError
from numba.cpython.unsafe.numbers import viewer
from numba.extending import intrinsic

from edgeformer.kernels._jit import helper
from edgeformer.kernels.gemm_s8 import _cpu_overridden, _open_k_loop, host_features

NV_LANES = 16  # float32 lanes of one zmm: columns per vector of b


class _BFloat(_irt._BaseFloatType):
    """LLVM's `bfloat` (llvmlite has no such type); only used for bitcasts into the intrinsic."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def format_constant(self, value):
        raise TypeError("bfloat constants are not needed")


_BFloat._create_instance()


def bf16_available(features=None) -> bool:
    """May the bf16 micro-kernel be compiled here? Host AVX512-BF16 (+F/BW/VL) and no CPU override."""
    if _cpu_overridden():
        return False
    f = host_features() if features is None else features
    return all(bool(f.get(name, False)) for name in ("avx512f", "avx512bw", "avx512vl", "avx512bf16"))


_RNE_BIAS = np.uint32(0x7FFF)
_ONE_U = np.uint32(1)


@helper
def bf16_bits(x):
    """float32 x -> its bf16 (round to nearest even) as the low 16 bits of a uint32. x finite or inf."""
    u = viewer(x, np.uint32)
    return np.uint32((u + _RNE_BIAS + ((u >> 16) & _ONE_U)) >> 16)


@helper
def bf16_pair(lo, hi):
    """One uint32 word holding bf16(lo) (low half) and bf16(hi) (high half)."""
    return np.uint32(bf16_bits(lo) | (bf16_bits(hi) << 16))


@intrinsic
def micro_bf16(typingctx, mr, nv, a, a_off, lda, b, b_off, ldb, k2, c, c_off, ldc, rs, rs_off):
    """The module docstring's product for one MR x (NV*16) tile; mr and nv must be integer literals.
    a, b uint32 arrays (bf16 pairs), c and rs float32 arrays; offsets and strides in elements."""
    if not isinstance(mr, types.IntegerLiteral) or not isinstance(nv, types.IntegerLiteral):
        return None
    for arr, dt in ((a, types.uint32), (b, types.uint32), (c, types.float32), (rs, types.float32)):
        if not (isinstance(arr, types.Array) and arr.dtype == dt):
            return None
    if not bf16_available():
        raise TypingError("bf16 micro-kernel requested on a CPU without AVX512-BF16 (or with NUMBA_CPU_NAME/"
                          "NUMBA_CPU_FEATURES set): refusing to compile it")
    m_rows, n_vec = mr.literal_value, nv.literal_value
    ip = types.intp
    sig = types.void(mr, nv, a, ip, ip, b, ip, ip, ip, c, ip, ip, rs, ip)

    def codegen(context, builder, signature, args):
        _, _, a_arr, a_o, lda_v, b_arr, b_o, ldb_v, k2_v, c_arr, c_o, ldc_v, rs_arr, rs_o = args
        sa = signature.args

        def data(idx, val):
            return context.make_array(sa[idx])(context, builder, val).data

        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16i, v16f, v32b = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(_BFloat(), 32)

        def c64(v):
            return ir.Constant(i64, v)

        name = "llvm.x86.avx512bf16.dpbf16ps.512"
        dp = builder.module.globals.get(name)
        if dp is None:
            dp = ir.Function(builder.module, ir.FunctionType(v16f, [v16f, v32b, v32b]), name)
        a_base = builder.gep(data(2, a_arr), [a_o])
        b_base = builder.gep(data(5, b_arr), [b_o])
        a_rows = [builder.gep(a_base, [builder.mul(lda_v, c64(i))]) for i in range(m_rows)]
        zero = ir.Constant(v16f, [0.0] * NV_LANES)
        p, accs, close = _open_k_loop(builder, k2_v, zero, m_rows * n_vec, "bf16")
        b_step = builder.gep(b_base, [builder.mul(p, ldb_v)])
        bv = [builder.bitcast(builder.load(builder.bitcast(builder.gep(b_step, [c64(j * NV_LANES)]),
                                                           v16i.as_pointer()), align=4), v32b)
              for j in range(n_vec)]
        splat = ir.Constant(v16i, [0] * NV_LANES)
        new = []
        for i in range(m_rows):
            word = builder.load(builder.gep(a_rows[i], [p]), align=4)
            av = builder.insert_element(ir.Constant(v16i, ir.Undefined), word, ir.Constant(i32, 0))
            av = builder.bitcast(builder.shuffle_vector(av, ir.Constant(v16i, ir.Undefined), splat), v32b)
            for j in range(n_vec):
                new.append(builder.call(dp, [accs[i * n_vec + j], av, bv[j]]))
        close(new)
        c_base = builder.gep(data(9, c_arr), [c_o])
        rs_base = builder.gep(data(12, rs_arr), [rs_o])
        for i in range(m_rows):
            s1 = builder.insert_element(ir.Constant(v16f, ir.Undefined), builder.load(builder.gep(rs_base, [c64(i)])),
                                        ir.Constant(i32, 0))
            sv = builder.shuffle_vector(s1, ir.Constant(v16f, ir.Undefined), splat)
            row = builder.gep(c_base, [builder.mul(ldc_v, c64(i))])
            for j in range(n_vec):
                ptr = builder.bitcast(builder.gep(row, [c64(j * NV_LANES)]), v16f.as_pointer())
                builder.store(builder.fmul(accs[i * n_vec + j], sv), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---- float32 scores Q K^T for the same kernel ---------------------------------------------------------------
@intrinsic
def micro_scores(typingctx, mr, nv, a, a_off, lda, b, b_off, pstride, k, c, c_off, ldc, alpha):
    """c[c_off + i*ldc + j*16 + n] = alpha * sum_{d < k} a[a_off + i*lda + d] * b[b_off + j*pstride + d*16 + n]
    for i < MR, j < NV, n < 16 (MR, NV integer literals): one MR x (NV*16) tile of attention's scores with the
    query rows read in place (a: the packed qkv, lda its row stride) and the keys packed as panels of 16
    (b: K^T, panel j at b_off + j*pstride, (k, 16) row-major). float32 FMAs in order d = 0, 1, ..., k-1 per
    element, one multiplication by alpha at the end. MR*NV accumulators of 16 floats: 16 for the 8 x 2 tile,
    which fit AVX-512's 32 registers (kernels/attention_bf16.py calls it only where AVX512-BF16 is present)."""
    if not isinstance(mr, types.IntegerLiteral) or not isinstance(nv, types.IntegerLiteral):
        return None
    for arr in (a, b, c):
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
    m_rows, n_vec = mr.literal_value, nv.literal_value
    ip = types.intp
    sig = types.void(mr, nv, a, ip, ip, b, ip, ip, ip, c, ip, ip, types.float32)

    def codegen(context, builder, signature, args):
        _, _, a_arr, a_o, lda_v, b_arr, b_o, pstride_v, k_v, c_arr, c_o, ldc_v, alpha_v = args
        sa = signature.args

        def data(idx, val):
            return context.make_array(sa[idx])(context, builder, val).data

        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        v16f = ir.VectorType(f32, NV_LANES)

        def c64(v):
            return ir.Constant(i64, v)

        name = "llvm.fma.v16f32"
        fma = builder.module.globals.get(name)
        if fma is None:
            fma = ir.Function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]), name)
        a_base = builder.gep(data(2, a_arr), [a_o])
        b_base = builder.gep(data(5, b_arr), [b_o])
        a_rows = [builder.gep(a_base, [builder.mul(lda_v, c64(i))]) for i in range(m_rows)]
        b_panels = [builder.gep(b_base, [builder.mul(pstride_v, c64(j))]) for j in range(n_vec)]
        zero = ir.Constant(v16f, [0.0] * NV_LANES)
        splat = ir.Constant(ir.VectorType(i32, NV_LANES), [0] * NV_LANES)
        d, accs, close = _open_k_loop(builder, k_v, zero, m_rows * n_vec, "qk")
        d16 = builder.mul(d, c64(NV_LANES))
        bv = [builder.load(builder.bitcast(builder.gep(panel, [d16]), v16f.as_pointer()), align=4)
              for panel in b_panels]
        new = []
        for i in range(m_rows):
            x = builder.insert_element(ir.Constant(v16f, ir.Undefined), builder.load(builder.gep(a_rows[i], [d])),
                                       ir.Constant(i32, 0))
            av = builder.shuffle_vector(x, ir.Constant(v16f, ir.Undefined), splat)
            for j in range(n_vec):
                new.append(builder.call(fma, [av, bv[j], accs[i * n_vec + j]]))
        close(new)
        c_base = builder.gep(data(9, c_arr), [c_o])
        scale = builder.shuffle_vector(builder.insert_element(ir.Constant(v16f, ir.Undefined), alpha_v,
                                                              ir.Constant(i32, 0)),
                                       ir.Constant(v16f, ir.Undefined), splat)
        for i in range(m_rows):
            row = builder.gep(c_base, [builder.mul(ldc_v, c64(i))])
            for j in range(n_vec):
                ptr = builder.bitcast(builder.gep(row, [c64(j * NV_LANES)]), v16f.as_pointer())
                builder.store(builder.fmul(accs[i * n_vec + j], scale), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def transpose16(typingctx, src, src_off, ld, dst, dst_off):
    """dst[dst_off + c*16 + r] = src[src_off + r*ld + c] for r, c < 16: a 16 x 16 float32 block transposed in
    registers (attention's K^T panels). Four stages, stage k swapping bit k of the row and column index of
    every element: rows r0 and r1 = r0 | 2^k become two-source shuffles of each other (one `vpermt2ps` each on
    AVX-512), 64 shuffles for the block instead of 256 scattered scalar stores."""
    for arr in (src, dst):
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
    ip = types.intp
    sig = types.void(src, ip, ip, dst, ip)

    def codegen(context, builder, signature, args):
        s_arr, s_o, ld_v, d_arr, d_o = args
        sa = signature.args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16f = ir.VectorType(ir.FloatType(), NV_LANES)
        s_base = builder.gep(context.make_array(sa[0])(context, builder, s_arr).data, [s_o])
        d_base = builder.gep(context.make_array(sa[3])(context, builder, d_arr).data, [d_o])
        rows = [builder.load(builder.bitcast(builder.gep(s_base, [builder.mul(ld_v, ir.Constant(i64, r))]),
                                             v16f.as_pointer()), align=4) for r in range(NV_LANES)]
        for bit in range(4):
            m = 1 << bit
            low = [c if c & m == 0 else NV_LANES + c - m for c in range(NV_LANES)]
            high = [c + m if c & m == 0 else NV_LANES + c for c in range(NV_LANES)]
            for r0 in range(NV_LANES):
                if r0 & m:
                    continue
                a, b = rows[r0], rows[r0 | m]
                rows[r0] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, NV_LANES), low))
                rows[r0 | m] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, NV_LANES), high))
        for c in range(NV_LANES):
            ptr = builder.gep(d_base, [ir.Constant(i64, c * NV_LANES)])
            builder.store(rows[c], builder.bitcast(ptr, v16f.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---- one softmax row, rounded to bf16 pairs (attention's E for the P V product) ----------------------------
ROW_VECTORS = 8  # a row of at most 8 * 16 = 128 scores lives in registers
ROW_MAX = ROW_VECTORS * NV_LANES
# exp(x), x <= 0, for values rounded to bf16 next (relative rounding 2^-9): x = n ln2 + r in one step (float32
# ln2 is off by 2e-8, so |n| <= 124 moves r by <= 3e-6), Taylor degree 4 on |r| <= ln2/2 (<= r^5/120 = 4.2e-5),
# 2^n added to the exponent field. x is clamped at EXP_LO = -86 so that 2^n stays a normal float (n >= -124):
# scores more than 86 below the row max get ~5e-38 instead of 0, nothing next to the max's exact 1.
EXP_LO = -86.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAGIC = 12582912.0  # 1.5 * 2**23: t = x*log2e + _MAGIC holds round(x*log2e) in its low mantissa bits
_MAGIC_BITS = 0x4B400000
TAYLOR = (1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0)  # Horner, highest degree first


@intrinsic
def softmax_row_bf16(typingctx, s, s_off, n, e2, e2_off):
    """For the n (1..128) scores s[s_off : s_off + n]: E = bf16(exp(s - max)) written as pairs to
    e2[e2_off : e2_off + 64] (word j = (E[2j], E[2j+1]), low half first; lanes >= n are exact zeros, all 64
    words are written); returns sum(E) in float32 (of the rounded values). Reads s[s_off : s_off + 128]: the
    caller's rows must be that long (lanes >= n are ignored, whatever they hold). s float32, e2 uint32.
    exp as EXP_LO's comment above; the rounding is vcvtne2ps2bf16's (nearest even)."""
    if not (isinstance(s, types.Array) and s.dtype == types.float32 and isinstance(e2, types.Array)
            and e2.dtype == types.uint32):
        return None
    if not bf16_available():
        raise TypingError("bf16 softmax row requested on a CPU without AVX512-BF16 (or with NUMBA_CPU_NAME/"
                          "NUMBA_CPU_FEATURES set): refusing to compile it")
    ip = types.intp
    sig = types.float32(s, ip, ip, e2, ip)

    def codegen(context, builder, signature, args):
        s_arr, s_o, n_v, e_arr, e_o = args
        sa = signature.args
        f32, i32, i1 = ir.FloatType(), ir.IntType(32), ir.IntType(1)
        vf, vi = ir.VectorType(f32, NV_LANES), ir.VectorType(i32, NV_LANES)
        v32b = ir.VectorType(_BFloat(), 2 * NV_LANES)

        def fsplat(value):
            return ir.Constant(vf, [float(value)] * NV_LANES)

        def isplat(value):
            return ir.Constant(vi, [int(value)] * NV_LANES)

        def intrinsic_fn(name, ret, params):
            fn = builder.module.globals.get(name)
            return fn if fn is not None else ir.Function(builder.module, ir.FunctionType(ret, params), name)

        s_base = builder.gep(context.make_array(sa[0])(context, builder, s_arr).data, [s_o])
        e_base = builder.gep(context.make_array(sa[3])(context, builder, e_arr).data, [e_o])
        n32 = builder.trunc(n_v, i32)
        n_splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vi, ir.Undefined), n32,
                                                                ir.Constant(i32, 0)),
                                         ir.Constant(vi, ir.Undefined), isplat(0))
        neg_inf = fsplat(float("-inf"))
        valid, rows = [], []
        for v in range(ROW_VECTORS):
            lanes = ir.Constant(vi, [v * NV_LANES + q for q in range(NV_LANES)])
            ok = builder.icmp_signed("<", lanes, n_splat)  # <16 x i1>
            x = builder.load(builder.bitcast(builder.gep(s_base, [ir.Constant(ir.IntType(64), v * NV_LANES)]),
                                             vf.as_pointer()), align=4)
            valid.append(ok)
            rows.append(builder.select(ok, x, neg_inf))
        mx = rows[0]
        for x in rows[1:]:
            mx = builder.select(builder.fcmp_ordered(">", x, mx), x, mx)
        reduce_max = intrinsic_fn("llvm.vector.reduce.fmax.v16f32", f32, [vf])
        m1 = builder.call(reduce_max, [mx], fastmath=("nnan",))
        m_splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), m1,
                                                                ir.Constant(i32, 0)),
                                         ir.Constant(vf, ir.Undefined), isplat(0))
        flags = ("contract",)
        es = []
        for v in range(ROW_VECTORS):
            x = builder.fsub(rows[v], m_splat)
            x = builder.select(builder.fcmp_ordered("<", x, fsplat(EXP_LO)), fsplat(EXP_LO), x)  # -inf too
            t = builder.fadd(builder.fmul(x, fsplat(_LOG2E), flags=flags), fsplat(_MAGIC), flags=flags)
            nf = builder.fsub(t, fsplat(_MAGIC))
            r = builder.fsub(x, builder.fmul(nf, fsplat(_LN2), flags=flags), flags=flags)
            p = fsplat(TAYLOR[0])
            for coef in TAYLOR[1:]:
                p = builder.fadd(builder.fmul(p, r, flags=flags), fsplat(coef), flags=flags)
            ni = builder.sub(builder.bitcast(t, vi), isplat(_MAGIC_BITS))
            e = builder.bitcast(builder.add(builder.bitcast(p, vi), builder.shl(ni, isplat(23))), vf)
            es.append(builder.select(valid[v], e, fsplat(0.0)))
        cvt = intrinsic_fn("llvm.x86.avx512bf16.cvtne2ps2bf16.512", v32b, [vf, vf])
        total = fsplat(0.0)
        high = isplat(-65536)  # 0xFFFF0000
        for j in range(ROW_VECTORS // 2):
            # words 0..7 <- pairs of es[2j], words 8..15 <- pairs of es[2j+1]: the row's order
            lo_half = builder.call(cvt, [es[2 * j + 1], es[2 * j]])
            words = builder.bitcast(lo_half, vi)  # (16,) pair words, element order
            ptr = builder.bitcast(builder.gep(e_base, [ir.Constant(ir.IntType(64), j * NV_LANES)]), vi.as_pointer())
            builder.store(words, ptr, align=4)
            even = builder.bitcast(builder.shl(words, isplat(16)), vf)
            odd = builder.bitcast(builder.and_(words, high), vf)
            total = builder.fadd(total, builder.fadd(even, odd, flags=("reassoc", "nsz")), flags=("reassoc", "nsz"))
        reduce_add = intrinsic_fn("llvm.vector.reduce.fadd.v16f32", f32, [f32, vf])
        return builder.call(reduce_add, [ir.Constant(f32, 0.0), total], fastmath=("reassoc", "nsz"))

    return sig, codegen
