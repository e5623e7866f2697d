"""bf16 dot-product micro-kernel (AVX512-BF16 `vdpbf16ps`) for attention's two small products.

    c[c_off + i*ldc + n] = rs[rs_off + i] * sum_p  a2[i, p] . b2[p, n]        i < MR, n < NV*16, p < k2

a and b hold **pairs** of bf16 values packed in uint32 words (low half = the even element, as
little-endian memory holds two consecutive bf16): a2[i, p] = a[a_off + i*lda + p] is (A[i, 2p], A[i, 2p+1])
and b2[p, n] = b[b_off + p*ldb + n] is (B[2p, n], B[2p+1, n]); "." multiplies the two pairs and adds the
products, which is exactly what one lane of `vdpbf16ps` does (products exact, float32 accumulation with
round-to-nearest-even, bf16 inputs and float32 results denormal-flushed). rs is a per-row float32 scale
(the softmax scale for the scores, 1 / row sum for the output), applied once in registers before the store.

Why bf16: `vdpbf16ps` does 32 multiply-adds per zmm instruction against 16 for an fp32 FMA, and
attention's operands tolerate bf16's 8-bit mantissa (relative rounding 2^-9) in int8 models whose
activations are already 8-bit: kernels/attention_bf16.py states the accuracy measured.

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
def bf16_round(x):
    """float32 x rounded to bf16 (nearest even), as a float32 whose low 16 bits are zero."""
    return viewer(np.uint32(bf16_bits(x) << 16), np.float32)


_LOW_HALF = np.uint64(0xFFFF)
_HIGH_HALF = np.uint64(0xFFFF0000)


@helper
def pair_word(two):
    """Two float32 already rounded to bf16, read together as one uint64 (little-endian: the first in the low
    half), -> the uint32 word of their bf16 pair."""
    return np.uint32(((two >> np.uint64(16)) & _LOW_HALF) | ((two >> np.uint64(32)) & _HIGH_HALF))


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
