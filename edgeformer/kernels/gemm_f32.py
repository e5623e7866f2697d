"""fp32 GEMM on weights pre-packed at convert time, with the bias / activation / residual epilogue fused.

    out[r, n] = act(sum_k x[r, k] * w[n, k] + bias[n]) + residual[r, n]

Weight layout (`pack_weight`, done once by the converter): w (N, K) "out x in" becomes
wp (ceil(N/NR), K, NR): panel p holds columns p*NR .. p*NR+NR-1, one contiguous NR-float row per k,
columns past N zero-padded. The whole packed matrix is one sequential stream, read exactly once per
call (per block of up to MC rows), so no per-call weight re-packing as in BLAS.

Micro-kernel (`_micro`): an `@numba.extending.intrinsic` emitting portable LLVM IR (numba.md §1):
MR rows x NP panels (NP*NR columns) of <NR x float> accumulators held in registers across the whole K
loop; each k loads NP contiguous panel rows, broadcasts MR values of x and issues MR*NP `llvm.fmuladd`
vector FMAs (fmuladd, not llvm.fma: without FMA hardware, e.g. generic x86-64, llvm.fma becomes an exact
libm fmaf call per lane, 1.5 GFLOP/s; fmuladd falls back to mul + add, 28 GFLOP/s with SSE).
LLVM lowers <16 x float> to one zmm (AVX-512), two ymm (AVX2) or four q registers (NEON); no
target-specific intrinsic is used, so this compiles for any CPU. Only the register budget depends
on the target, so MR/NP are chosen from the host features (performance only, never correctness).
The x rows of a block are first packed k-major ((K, MR) per row block) so the kernel reads one
sequential stream of x instead of MR strided ones. Epilogue, in registers: + bias, the activation
(kernels/act_ir.py: mathfn's formulas as vector IR, chosen by a run-time switch), + residual, then the tile
is stored straight into `out`. (Against the previous activation loop over each tile's rows in `out`: equal
speed in an interleaved scratch A/B on Zen 4; kept because one path replaces three.) Only the last panel group
when N is not a multiple of NR*NP stores the tile to a small scratch, finished with the mathfn helpers in L1
and copied out (columns < N only).

Loop order (see `linear_packed_f32`): row chunks of MC rows (x chunk packed, kept in L2) > panel groups
of NP panels (weight slivers stream from memory once per chunk) > row blocks of MR rows (the sliver stays
in L1/L2 and is reused by every row block). The output lines of the next panel group are prefetched for
writing: a cold output otherwise cost ~8% at M=128 (128 row streams defeat the hardware prefetcher).
Software prefetch of the next weight sliver was measured and did not pay (-10% at M=16, +1% at M=128).
"""
import llvmlite.binding as _llb
import numpy as np
from llvmlite import ir
from numba.core import config as _config
from numba.core import types
from numba.extending import intrinsic

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.act_ir import emit_activation_switch, emit_store_tile
from edgeformer.kernels.mathfn import ACT_NONE, act_inplace

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
    """Intrinsic micro(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride,
    res, res_off, res_stride, use_res, act):

        d[d_off + i*d_stride + c] = act(sum_kk A[kk, i] * B[kk, c] (+ bias[bias_off + c])) (+ res[...])

    for i < mr rows and c < npn*NR columns (a full tile: every column is stored).
    a: packed x; a[a_off + kk*mr + i] is x[row i, kk].
    b: packed weights; panel j row kk at b[b_off + j*pstride + kk*NR].
    bias / res are read only when use_bias / use_res != 0 (then res[res_off + i*res_stride + c]).
    act: an ACT_* code, applied in registers (kernels/act_ir.py); unknown codes act as ACT_NONE.
    d: destination (the output or a scratch tile), any float32 array addressed from its data pointer.
    """

    @intrinsic
    def micro(typingctx, a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride,
              res, res_off, res_stride, use_res, act):
        ip = types.intp
        sig = types.void(a, ip, b, ip, ip, ip, bias, ip, ip, d, ip, ip, res, ip, ip, ip, types.int64)

        def codegen(context, builder, signature, args):
            def data(idx):
                return context.make_array(signature.args[idx])(context, builder, args[idx]).data

            a_ptr, b_ptr, bias_ptr, d_ptr, res_ptr = data(0), data(2), data(6), data(9), data(12)
            f32 = ir.FloatType()
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)
            vec = ir.VectorType(f32, NR)
            vptr = vec.as_pointer()
            zero_mask = ir.Constant(ir.VectorType(i32, NR), [0] * NR)
            fma_name = f"llvm.fmuladd.v{NR}f32"
            fma = builder.module.globals.get(fma_name)
            if fma is None:
                fma = ir.Function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), fma_name)
            (a_off, b_off, pstride, k_v, bias_off, use_bias, d_off, d_stride, res_off, res_stride,
             use_res, act) = (args[i] for i in (1, 3, 4, 5, 7, 8, 10, 11, 13, 14, 15, 16))
            a_base = builder.gep(a_ptr, [a_off])
            b_base = builder.gep(b_ptr, [b_off])
            b_panels = [builder.gep(b_base, [builder.mul(pstride, ir.Constant(i64, j))]) for j in range(npn)]

            def c64(v):
                return ir.Constant(i64, v)

            def vload(ptr, off):
                return builder.load(builder.bitcast(builder.gep(ptr, [off]), vptr), align=4)

            fn = builder.function
            blk = {name: fn.append_basic_block("gemm_" + name)
                   for name in ("head", "body", "done", "bias", "epi", "res", "nores", "exit")}
            pre = builder.block
            zero = ir.Constant(vec, [0.0] * NR)
            builder.branch(blk["head"])

            # K loop: accumulators live in phi nodes (registers) for the whole loop
            builder.position_at_end(blk["head"])
            kk = builder.phi(i64, "kk")
            kk.add_incoming(c64(0), pre)
            accs = []
            for _ in range(mr * npn):
                ph = builder.phi(vec)
                ph.add_incoming(zero, pre)
                accs.append(ph)
            builder.cbranch(builder.icmp_signed("<", kk, k_v), blk["body"], blk["done"])

            builder.position_at_end(blk["body"])
            boff = builder.mul(kk, c64(NR))
            bv = [vload(b_panels[j], boff) for j in range(npn)]
            arow = builder.gep(a_base, [builder.mul(kk, c64(mr))])
            new = []
            for i in range(mr):
                sc = builder.load(builder.gep(arow, [c64(i)]), align=4)
                sv = builder.insert_element(ir.Constant(vec, ir.Undefined), sc, ir.Constant(i32, 0))
                sv = builder.shuffle_vector(sv, ir.Constant(vec, ir.Undefined), zero_mask)
                for j in range(npn):
                    new.append(builder.call(fma, [sv, bv[j], accs[i * npn + j]]))
            nxt = builder.add(kk, c64(1))
            end = builder.block
            builder.branch(blk["head"])
            kk.add_incoming(nxt, end)
            for ph, v in zip(accs, new):
                ph.add_incoming(v, end)

            # epilogue: + bias (-0.0 is the exact identity of IEEE addition when there is none)
            builder.position_at_end(blk["done"])
            builder.cbranch(builder.icmp_signed("!=", use_bias, c64(0)), blk["bias"], blk["epi"])
            builder.position_at_end(blk["bias"])
            bias_base = builder.gep(bias_ptr, [bias_off])
            bias_loaded = [vload(bias_base, c64(j * NR)) for j in range(npn)]
            builder.branch(blk["epi"])
            builder.position_at_end(blk["epi"])
            neg0 = ir.Constant(vec, [-0.0] * NR)
            bias_v = []
            for j in range(npn):
                ph = builder.phi(vec)
                ph.add_incoming(bias_loaded[j], blk["bias"])
                ph.add_incoming(neg0, blk["done"])
                bias_v.append(ph)
            tile = [builder.fadd(accs[i * npn + j], bias_v[j]) for i in range(mr) for j in range(npn)]
            tile = emit_activation_switch(builder, act, tile, "gemm_act")
            builder.cbranch(builder.icmp_signed("!=", use_res, c64(0)), blk["res"], blk["nores"])

            def store_rows(with_res):
                r_base = builder.gep(res_ptr, [res_off]) if with_res else None
                emit_store_tile(builder, tile, mr, npn, NR, builder.gep(d_ptr, [d_off]), d_stride, r_base,
                                res_stride if with_res else None)
                builder.branch(blk["exit"])

            builder.position_at_end(blk["res"])
            store_rows(True)
            builder.position_at_end(blk["nores"])
            store_rows(False)
            builder.position_at_end(blk["exit"])
            return context.get_dummy_value()

        return sig, codegen

    return micro


def _emit_prefetch(context, builder, signature, args, rw, locality):
    """llvm.prefetch of the cache line holding a.flat[off] (args[0], args[1]); rw 0 read / 1 write."""
    arr = context.make_array(signature.args[0])(context, builder, args[0])
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = builder.module.globals.get("llvm.prefetch.p0")
    if fn is None:
        fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
    ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), i8p)
    builder.call(fn, [ptr, ir.Constant(i32, rw), ir.Constant(i32, locality), ir.Constant(i32, 1)])  # data cache
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, a, off, write):
    """Hint: bring the cache line holding a.flat[off] towards L1 (llvm.prefetch, locality 3: keep in all
    levels; a no-op where unsupported). write must be a literal (0 read, 1 write)."""
    if not isinstance(write, types.IntegerLiteral):
        return None
    rw = write.literal_value
    return types.void(a, types.intp, write), lambda c, b, sig, args: _emit_prefetch(c, b, sig, args, rw, 3)


@intrinsic
def _prefetch_l2(typingctx, a, off):
    """Hint: bring the cache line holding a.flat[off] into L2 (read, locality 2: prefetcht1 on x86, which on
    AMD Zen fills L2 and not L1; a no-op where unsupported)."""
    return types.void(a, types.intp), lambda c, b, sig, args: _emit_prefetch(c, b, sig, args, 0, 2)


_micro_1_1, _micro_2_1, _micro_3_1, _micro_4_1, _micro_5_1, _micro_6_1 = (_make_micro(m, 1) for m in range(1, 7))
_micro_1_2, _micro_2_2, _micro_3_2, _micro_4_2, _micro_5_2, _micro_6_2 = (_make_micro(m, 2) for m in range(1, 7))


@helper
def _micro(mr, npn, a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res, res_off,
           res_stride, use_res, act):
    """Run the (mr, npn) variant: mr in 1..6 rows, npn in 1..2 panels (mr <= MR, npn <= NP)."""
    if npn == 1 and mr == 1:
        _micro_1_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 1 and mr == 2:
        _micro_2_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 1 and mr == 3:
        _micro_3_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 1 and mr == 4:
        _micro_4_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 1 and mr == 5:
        _micro_5_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 1 and mr == 6:
        _micro_6_1(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 1:
        _micro_1_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 2:
        _micro_2_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 3:
        _micro_3_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 4:
        _micro_4_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 5:
        _micro_5_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)
    elif npn == 2 and mr == 6:
        _micro_6_2(a, a_off, b, b_off, pstride, k, bias, bias_off, use_bias, d, d_off, d_stride, res,
                   res_off, res_stride, use_res, act)


# ---- driver -------------------------------------------------------------------------------------

# contract: the activations' polynomials (GELU's rational erf) become FMAs (GELU loop 2.70 -> 1.97 cycles
# per element on Zen 3, scratch measurement); the micro-kernel's own FMAs are explicit (llvm.fmuladd).
@kernel(fastmath={"contract"})
def linear_packed_f32(x, wp, n_out, bias, residual, act, out, r0, r1, p0, p1):
    """out[r0:r1, cols of panels p0:p1] = act(x[r0:r1] @ W^T + bias) + residual (columns >= n_out untouched).

    x (T, K) f32 C-contiguous; wp (P, K, NR) f32 from pack_weight (read-only); n_out = N; bias (N,) or
    (0,); residual (T, N) or (0, 0); act an ACT_* code; out (T, N) f32 with unit column stride, not
    aliasing x. Rows and panels outside the ranges are not touched, so callers can split rows and/or
    panels across threads. No validation.
    """
    if r1 <= r0 or p1 <= p0:
        return
    k = x.shape[1]
    pstride = k * NR
    use_bias = 1 if bias.shape[0] != 0 else 0
    has_res = residual.shape[0] != 0
    ostride = out.strides[0] // 4
    rstride = residual.strides[0] // 4 if has_res else 0
    mc = _X_BUDGET // (4 * max(k, 1))
    mc = max(MR, mc - mc % MR)  # rows per chunk: the packed x chunk stays in L2
    mc = min(mc, r1 - r0 + MR - 1)
    mc = mc - mc % MR
    ap = np.empty(mc * k, dtype=np.float32)  # x chunk, (K, mrb) per row block
    width_max = NP * NR
    tile = np.empty(MR * width_max, dtype=np.float32)  # scratch tile for activations and the N edge
    wflat = wp.reshape(-1)
    for c0 in range(r0, r1, mc):
        c1 = min(c0 + mc, r1)
        for b0 in range(c0, c1, MR):  # pack x[c0:c1]
            mrb = min(MR, c1 - b0)
            base = (b0 - c0) * k
            for i in range(mrb):
                xr = x[b0 + i]
                for kk in range(k):
                    ap[base + kk * mrb + i] = xr[kk]
        for g0 in range(p0, p1, NP):
            npn = min(NP, p1 - g0)
            width = npn * NR
            col0 = g0 * NR
            ncol = min(width, n_out - col0)
            full = ncol == width
            # the output lines of the next panel group: prefetched for writing while this group runs
            # (128 rows x 128 B of a cold output are too many streams for the hardware prefetcher)
            nxt0 = col0 + width
            nxt1 = min(min(p1, g0 + npn + NP) * NR, n_out)
            for b0 in range(c0, c1, MR):
                mrb = min(MR, c1 - b0)
                for i in range(mrb):
                    for q in range(nxt0, nxt1, 16):
                        _prefetch(out, (b0 + i) * ostride + q, 1)
                a_off = (b0 - c0) * k
                b_off = g0 * pstride
                if full:  # bias, activation and residual in registers, stored straight to out
                    if has_res:
                        _micro(mrb, npn, ap, a_off, wflat, b_off, pstride, k, bias, col0, use_bias,
                               out, b0 * ostride + col0, ostride, residual, b0 * rstride + col0, rstride, 1, act)
                    else:
                        _micro(mrb, npn, ap, a_off, wflat, b_off, pstride, k, bias, col0, use_bias,
                               out, b0 * ostride + col0, ostride, out, 0, 0, 0, act)
                    continue
                # the N edge: acc to the tile (the bias (N,) cannot be read as full vectors here), then
                # + bias, act, + residual, store the ncol existing columns
                _micro(mrb, npn, ap, a_off, wflat, b_off, pstride, k, bias, 0, 0,
                       tile, 0, width, tile, 0, 0, 0, ACT_NONE)
                if use_bias:
                    bb = bias[col0:col0 + ncol]
                    for i in range(mrb):
                        t = tile[i * width:i * width + ncol]
                        for j in range(ncol):
                            t[j] += bb[j]
                act_inplace(tile[: mrb * width], act)
                for i in range(mrb):
                    t = tile[i * width:i * width + ncol]
                    o = out[b0 + i, col0:col0 + ncol]
                    if has_res:
                        rr = residual[b0 + i, col0:col0 + ncol]
                        for j in range(ncol):
                            o[j] = t[j] + rr[j]
                    else:
                        for j in range(ncol):
                            o[j] = t[j]
