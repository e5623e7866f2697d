"""One-instruction LLVM float operations that let reductions vectorise without fast-math on a whole kernel.

Numba lowers `mx = max(mx, v)` to a compare + select and `s += v` to a strictly ordered add, and LLVM
vectorises neither into SIMD lanes (that would reorder the operations). These intrinsics put the needed
flag on the one reduction instruction only, so everything else in a kernel keeps IEEE semantics:

- max_nonan / min_nonan: llvm.maxnum / llvm.minnum with nnan, nsz: a row max 0.43 -> 0.04 ns/element
  (measured here). With a NaN operand the result is one of the operands (unspecified which): callers
  either guarantee finite inputs or document what a NaN row gives.
- add_reassoc: a + b with reassoc, nsz: partial sums in SIMD lanes, summed at the end (a different but
  equally accurate rounding order).
"""
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


def _same_float(a, b):
    return isinstance(a, types.Float) and a == b


def _minmax(name):
    def typer(typingctx, a, b):
        if not _same_float(a, b):
            return None

        def codegen(context, builder, sig, args):
            t = args[0].type
            fn = builder.module.declare_intrinsic(name, [t], ir.FunctionType(t, [t, t]))
            return builder.call(fn, args, fastmath=("nnan", "nsz"))

        return a(a, b), codegen

    return typer


max_nonan = intrinsic(_minmax("llvm.maxnum"))
min_nonan = intrinsic(_minmax("llvm.minnum"))


@intrinsic
def add_reassoc(typingctx, a, b):
    """a + b with reassoc/nsz on this one instruction (see the module docstring)."""
    if not _same_float(a, b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1], flags=("reassoc", "nsz"))

    return a(a, b), codegen
