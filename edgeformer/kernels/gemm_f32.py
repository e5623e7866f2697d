"""fp32 GEMM on weights pre-packed at convert time, with the bias / activation / residual epilogue fused.

    out[r, n] = act(sum_k x[r, k] * w[n, k] + bias[n]) + residual[r, n]

Weight layout (`pack_weight`, done once by the converter): w (N, K) "out x in" becomes
wp (ceil(N/NR), K, NR): panel p holds columns p*NR .. p*NR+NR-1, one contiguous NR-float row per k,
columns past N zero-padded. The whole packed matrix is one sequential stream, read exactly once per
call (per block of up to MC rows), so no per-call weight re-packing as in BLAS.

Micro-kernel (`_micro`): an `@numba.extending.intrinsic` emitting portable LLVM IR (numba.md §1):
MR rows x NP panels (NP*NR columns) of <NR x float> accumulators held in registers across the whole K
loop; each k loads NP contiguous panel rows, broadcasts MR values of x and issues MR*NP `llvm.fma`
vector FMAs. LLVM lowers <16 x float> to one zmm (AVX-512), two ymm (AVX2) or four q registers (NEON);
no target-specific intrinsic is used, so this compiles for any CPU. Only the register budget depends
on the target, so MR/NP are chosen from the host features (performance only, never correctness).
The x rows of a block are first packed k-major ((K, MR) per row block) so the kernel reads one
sequential stream of x instead of MR strided ones. The accumulators are stored to a small scratch
tile, and the epilogue (bias, activation with the mathfn helpers, residual) runs on that tile while it
sits in L1, writing only the columns < N.

Loop order (see `linear_packed_f32`): row chunks of MC rows (x chunk packed, kept in L2) > panel groups
of NP panels (weight slivers stream from memory once per chunk) > row blocks of MR rows (the sliver stays
in L1/L2 and is reused by every row block).
"""
import llvmlite.binding as _llb
import numpy as np
from llvmlite import ir
from numba.core import config as _config
from numba.core import types
from numba.extending import intrinsic

from edgeformer.kernels._jit import kernel
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_GELU_TANH, ACT_RELU, gelu_erf, gelu_tanh, relu

NR = 16  # panel width (floats): the packed-weight format; fixed, independent of the CPU


def _register_budget():
    """(MR, NP) for the host: the accumulators MR*NP*NR floats must fit the vector register file."""
    cpu = _config.CPU_NAME or _llb.get_host_cpu_name()
    feats = _config.CPU_FEATURES or ""
    if not _config.CPU_NAME and not _config.CPU_FEATURES:
        host = _llb.get_host_cpu_features()
        avx512 = bool(host.get("avx512f", False))
        avx2 = bool(host.get("avx2", False)) and bool(host.get("fma", False))
    else:
        avx512 = "+avx512f" in feats
        avx2 = "+avx2" in feats and "+fma" in feats
    machine = _llb.get_process_triple().split("-")[0]
    if machine in ("aarch64", "arm64"):
        return 6, 1  # 32 x 128-bit registers: 24 accumulators + 4 panel + 1 broadcast
    if cpu != "generic" and avx512:
        return 6, 2  # 32 zmm: 12 accumulators (6 x 32 columns) + 2 panel + broadcasts
    if cpu != "generic" and avx2:
        return 6, 1  # 16 ymm: 12 accumulators (6 x 16 columns) + 2 panel + 1 broadcast
    return 3, 1  # SSE: 16 xmm, 12 accumulators


MR, NP = _register_budget()
# Rows of x packed and kept in L2 while every panel streams past: MC * K * 4 bytes <= _X_BUDGET.
_X_BUDGET = 384 * 1024


def pack_weight(w):
    """w (N, K) f32 "out x in" -> packed (ceil(N/NR), K, NR) f32, columns >= N zero (plain NumPy)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    p = -(-n // NR)
    wp = np.zeros((p * NR, k), dtype=np.float32)
    wp[:n] = w
    return np.ascontiguousarray(wp.reshape(p, NR, k).transpose(0, 2, 1))  # (P, K, NR)


def unpack_weight(wp, n_out):
    """Inverse of pack_weight: (P, K, NR) -> (n_out, K)."""
    p, k, nr = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1).reshape(p * nr, k)[:n_out])


# ---- micro-kernel -------------------------------------------------------------------------------

def _make_micro(mr, npn):
    """Intrinsic micro(a, a_off, b, b_off, pstride, k, c): c[mr, npn*NR] = A (k, mr) @ B panels.

    a: packed x, float32 array; element a[a_off + kk*mr + i] is x[row i, kk].
    b: packed weights; panel j row kk at b[b_off + j*pstride + kk*NR].
    c: float32 scratch, rows of npn*NR floats starting at c[0]; overwritten.
    """

    @intrinsic
    def micro(typingctx, a, a_off, b, b_off, pstride, k, c):
        sig = types.void(a, types.intp, b, types.intp, types.intp, types.intp, c)

        def codegen(context, builder, signature, args):
            a_arr = context.make_array(signature.args[0])(context, builder, args[0])
            b_arr = context.make_array(signature.args[2])(context, builder, args[2])
            c_arr = context.make_array(signature.args[6])(context, builder, args[6])
            f32 = ir.FloatType()
            i64 = ir.IntType(64)
            vec = ir.VectorType(f32, NR)
            vptr = vec.as_pointer()
            i32 = ir.IntType(32)
            zero_mask = ir.Constant(ir.VectorType(i32, NR), [0] * NR)
            fma = builder.module.declare_intrinsic("llvm.fma", [vec])
            a_base = builder.gep(a_arr.data, [args[1]])
            b_base = builder.gep(b_arr.data, [args[3]])
            pstride_v, k_v = args[4], args[5]
            b_panels = [builder.gep(b_base, [builder.mul(pstride_v, ir.Constant(i64, j))]) for j in range(npn)]

            pre = builder.block
            fn = builder.function
            head = fn.append_basic_block("gemm_k_head")
            body = fn.append_basic_block("gemm_k_body")
            done = fn.append_basic_block("gemm_k_done")
            zero = ir.Constant(vec, [0.0] * NR)
            builder.branch(head)

            builder.position_at_end(head)
            kk = builder.phi(i64, "kk")
            kk.add_incoming(ir.Constant(i64, 0), pre)
            accs = []
            for i in range(mr * npn):
                ph = builder.phi(vec)
                ph.add_incoming(zero, pre)
                accs.append(ph)
            builder.cbranch(builder.icmp_signed("<", kk, k_v), body, done)

            builder.position_at_end(body)
            boff = builder.mul(kk, ir.Constant(i64, NR))
            bv = []
            for j in range(npn):
                p = builder.bitcast(builder.gep(b_panels[j], [boff]), vptr)
                bv.append(builder.load(p, align=4))
            aoff = builder.mul(kk, ir.Constant(i64, mr))
            arow = builder.gep(a_base, [aoff])
            new = []
            for i in range(mr):
                s = builder.load(builder.gep(arow, [ir.Constant(i64, i)]), align=4)
                sv = builder.insert_element(ir.Constant(vec, ir.Undefined), s, ir.Constant(i32, 0))
                sv = builder.shuffle_vector(sv, ir.Constant(vec, ir.Undefined), zero_mask)
                for j in range(npn):
                    new.append(builder.call(fma, [sv, bv[j], accs[i * npn + j]]))
            nxt = builder.add(kk, ir.Constant(i64, 1))
            end = builder.block
            builder.branch(head)
            kk.add_incoming(nxt, end)
            for ph, v in zip(accs, new):
                ph.add_incoming(v, end)

            builder.position_at_end(done)
            for i in range(mr):
                for j in range(npn):
                    p = builder.gep(c_arr.data, [ir.Constant(i64, (i * npn + j) * NR)])
                    builder.store(accs[i * npn + j], builder.bitcast(p, vptr), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


_MICROS = {(m, q): _make_micro(m, q) for m in range(1, MR + 1) for q in range(1, NP + 1)}
# Numba resolves globals by name: one module-level name per variant.
for (_m, _q), _f in _MICROS.items():
    globals()[f"_micro_{_m}_{_q}"] = _f
del _m, _q, _f


def _dispatch_source():
    """Source of `_micro(mr, npn, ...)`: an if-chain over the compiled variants (mr, npn literal)."""
    lines = ["def _micro(mr, npn, a, a_off, b, b_off, pstride, k, c):"]
    first = True
    for (m, q) in _MICROS:
        kw = "if" if first else "elif"
        first = False
        lines.append(f"    {kw} mr == {m} and npn == {q}:")
        lines.append(f"        _micro_{m}_{q}(a, a_off, b, b_off, pstride, k, c)")
    return "\n".join(lines) + "\n"


def _build_dispatch():
    from edgeformer.kernels._jit import helper

    ns = dict(globals())
    exec(compile(_dispatch_source(), __file__ + ":_micro", "exec"), ns)
    return helper(ns["_micro"])


_micro = _build_dispatch()


# ---- driver -------------------------------------------------------------------------------------

@kernel
def linear_packed_f32(x, wp, n_out, bias, residual, act, out, r0, r1, p0, p1):
    """out[r0:r1, cols of panels p0:p1] = act(x[r0:r1] @ W^T + bias) + residual (columns >= n_out untouched).

    x (T, K) f32 C-contiguous; wp (P, K, NR) f32 from pack_weight; bias (N,) or (0,); residual (T, N)
    or (0, 0); act an ACT_* code; out (T, N) f32, not aliasing x. Rows and panels outside the ranges
    are not touched, so callers can split rows and/or panels across threads.
    """
    if r1 <= r0 or p1 <= p0:
        return
    k = x.shape[1]
    nr = wp.shape[2]
    pstride = k * nr
    has_bias = bias.shape[0] != 0
    has_res = residual.shape[0] != 0
    mc = _X_BUDGET // (4 * max(k, 1))
    mc = max(MR, mc - mc % MR)
    mc = min(mc, r1 - r0 + MR - 1)
    mc = mc - mc % MR
    ap = np.empty(mc * k, dtype=np.float32)  # x chunk, k-major per row block of MR rows
    tile = np.empty(MR * NP * nr, dtype=np.float32)  # accumulators of one micro-kernel call
    wflat = wp.reshape(-1)
    for c0 in range(r0, r1, mc):
        c1 = min(c0 + mc, r1)
        # pack x[c0:c1] as blocks (K, mrb), mrb = rows in the block
        for b0 in range(c0, c1, MR):
            mrb = min(MR, c1 - b0)
            base = (b0 - c0) * k
            for i in range(mrb):
                xr = x[b0 + i]
                for kk in range(k):
                    ap[base + kk * mrb + i] = xr[kk]
        for g0 in range(p0, p1, NP):
            npn = min(NP, p1 - g0)
            col0 = g0 * nr
            ncol = min(npn * nr, n_out - col0)
            width = npn * nr
            for b0 in range(c0, c1, MR):
                mrb = min(MR, c1 - b0)
                _micro(mrb, npn, ap, (b0 - c0) * k, wflat, g0 * pstride, pstride, k, tile)
                for i in range(mrb):
                    t = tile[i * width:i * width + ncol]
                    o = out[b0 + i, col0:col0 + ncol]
                    if has_bias:
                        bb = bias[col0:col0 + ncol]
                        for j in range(ncol):
                            t[j] += bb[j]
                    if act == ACT_RELU:
                        for j in range(ncol):
                            t[j] = relu(t[j])
                    elif act == ACT_GELU_ERF:
                        for j in range(ncol):
                            t[j] = gelu_erf(t[j])
                    elif act == ACT_GELU_TANH:
                        for j in range(ncol):
                            t[j] = gelu_tanh(t[j])
                    if has_res:
                        rr = residual[b0 + i, col0:col0 + ncol]
                        for j in range(ncol):
                            o[j] = t[j] + rr[j]
                    else:
                        for j in range(ncol):
                            o[j] = t[j]
