"""sgemm on strided views from inside Numba kernels: SciPy's BLAS through Numba's own `numba_xxgemm`.

`np.dot` inside njit needs contiguous operands, so a kernel that multiplies one head's slice of a packed
[Q | K | V] matrix first copies it. `sgemm(...)` instead hands BLAS a pointer, an element offset and a
leading dimension, in BLAS's column-major terms:

    C[m x n] = alpha * op(A)[m x k] @ op(B)[k x n]          (beta = 0: C is overwritten)

where A, B, C are float32 arrays addressed from their data pointer plus an element offset, with leading
dimensions lda, ldb, ldc (elements), and op(X) = X for TRANS_N, X^T for TRANS_T. A row-major (r x c)
matrix with row stride ld is a column-major (c x r) one with leading dimension ld, so row-major products
are written with the operands swapped (see kernels/attention.py).

`numba_xxgemm` is the C helper Numba's np.dot lowering calls (numba/_lapack.c): it imports SciPy's
`cython_blas.sgemm` on first use (holding the GIL for that moment) and calls it; the symbol is resolved
when Numba loads a kernel, so cached kernels keep working across processes. No bounds are checked:
the caller guarantees every addressed element lies inside its array.
"""
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

TRANS_N = ord("n")
TRANS_T = ord("t")


@intrinsic
def sgemm(typingctx, transa, transb, m, n, k, alpha, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):
    """C = alpha * op(A) @ op(B), column-major, see the module docstring. Returns BLAS's status (0 = ok)."""
    for arr in (a, b, c):
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32):
            return None
    from numba.np.linalg import ensure_blas

    ensure_blas()
    ip = types.intp
    sig = types.int32(ip, ip, ip, ip, ip, types.float32, a, ip, ip, b, ip, ip, c, ip, ip)

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        vp = i8.as_pointer()
        intp = context.get_value_type(ip)
        fnty = ir.FunctionType(ir.IntType(32), [i8, i8, i8, intp, intp, intp, vp, vp, intp, vp, intp, vp, vp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        ta, tb, m_, n_, k_, alpha_v, a_arr, a_o, lda_v, b_arr, b_o, ldb_v, c_arr, c_o, ldc_v = args

        def pointer(index, arr, off):
            data = context.make_array(signature.args[index])(context, builder, arr).data
            return builder.bitcast(builder.gep(data, [off]), vp)

        alpha_slot = cgutils.alloca_once_value(builder, alpha_v)
        beta_slot = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        return builder.call(fn, [ir.Constant(i8, ord("s")), builder.trunc(ta, i8), builder.trunc(tb, i8),
                                 m_, n_, k_, builder.bitcast(alpha_slot, vp), pointer(6, a_arr, a_o), lda_v,
                                 pointer(9, b_arr, b_o), ldb_v, builder.bitcast(beta_slot, vp),
                                 pointer(12, c_arr, c_o), ldc_v])

    return sig, codegen
