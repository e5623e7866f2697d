"""Atomic flags for the worker pool: sequentially consistent int64 loads and stores, and a GIL-free spin.

A parallel op hands its chunks to already-running worker threads. Waking a thread blocked on a
lock or condition costs ~25 µs on this VM (a ThreadPoolExecutor round trip measured 53 µs), more
than many ops take; so workers spin here, without the GIL, on a flag the dispatcher bumps, and only
block on a semaphore after a bounded spin (see edgeformer/workers.py). Plain array reads would be
hoisted out of the loop by LLVM; these intrinsics emit `load atomic` / `store atomic` (seq_cst).
"""
from numba.core import cgutils, types
from numba.extending import intrinsic

from edgeformer.kernels._jit import kernel


@intrinsic
def _load(typingctx, flags, index):
    def codegen(context, builder, sig, args):
        arrty = sig.args[0]
        ary = context.make_array(arrty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [args[1]])
        return builder.load_atomic(ptr, ordering="seq_cst", align=8)

    return types.int64(flags, index), codegen


@intrinsic
def _store(typingctx, flags, index, value):
    def codegen(context, builder, sig, args):
        arrty = sig.args[0]
        ary = context.make_array(arrty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [args[1]])
        builder.store_atomic(args[2], ptr, ordering="seq_cst", align=8)
        return context.get_dummy_value()

    return types.void(flags, index, value), codegen


@kernel
def load_flag(flags, index):
    """flags[index] with a seq_cst atomic load; flags (n,) int64."""
    return _load(flags, index)


@kernel
def store_flag(flags, index, value):
    """flags[index] = value with a seq_cst atomic store."""
    _store(flags, index, value)


@kernel
def spin_until(flags, index, value, spins):
    """Spin (GIL released) until flags[index] == value; False after ``spins`` reads without it."""
    for _ in range(spins):
        if _load(flags, index) == value:
            return True
    return False
