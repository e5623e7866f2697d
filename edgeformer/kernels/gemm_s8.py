"""int8 GEMM (u8 activations x s8 weights, int32 accumulation) on weights pre-packed at convert time,
with a fused float epilogue (per-row activation scale x per-channel weight scale, bias, activation,
residual -> float32).

    acc[r, n] = sum_k (a[r, k] - zp[r]) * w[n, k]                      (exact, int32)
    out[r, n] = act((f32(acc[r, n]) * ws[n]) * sa[r] + bias[n]) + residual[r, n]

Activations are always stored as **u8 with a per-row zero point** zp (int32): symmetric s8 values
q in [-127, 127] are stored as q + 128 with zp = 128 (the "xor 0x80" of numba.md §1), asymmetric u8
as q in [0, 255] with zp in [0, 255]. The kernel computes sum_k a*w (what `vpdpbusd` computes) and
subtracts zp[r] * colsum[n] in the epilogue; colsum (int32 (Npad,)) = sum_k w[n, k] is computed once
per weight (`column_sums`, at load), never per call. The rows come from one of two quantisers with that
same layout: `quantize_rows_smooth` (dynamic: scale and zero point per row from the row's range, at run
time) or `quantize_rows_static` (static: one calibrated scale and zero point per tensor, stored in the
model file); the GEMM ("already quantised" mode, quant == 0) does not know which.

Accumulation bound: |a| <= 255 and |w| <= 127 (weights are quantised to [-127, 127]; -128 is rejected
by the op layer), so |sum_k a*w| <= 255*127*K = 32385*K, and |sum_k (a - zp)*w| <= 32385*K as well
(|a - zp| <= 255, whichever quantiser produced a and zp: both keep a, zp in [0, 255]). Both fit int32
(2**31 - 1) for K <= 66311; we accept **K <= K_MAX = 65536**, so no partial sum the hardware forms
(vpdpbusd is non-saturating; pmaddwd pairs are <= 2*32385) can wrap. The zero-point correction
acc - zp*colsum is formed in int32 registers with wrap-around, which is exact because the true value
fits. The op layer and the converter reject larger K (docs/QUANTIZATION.md).

Packed weight layout (`pack_weight`, fixed, independent of the CPU, so a file is portable):
w (N, K) int8 -> wp (P, K4, 64) int8 with K4 = ceil(K/4) and P = ceil(N/16) rounded up to a multiple
of PANEL_GROUP (4). Panel p, k-group g holds 16 columns x 4 consecutive k: byte c*4 + j is
w[p*16 + c, 4g + j]; padded columns and k are zero. This is the operand layout of `vpdpbusd`
(one dword of 4 activation bytes broadcast against 16 dwords of 4 weight bytes).

Paths (chosen in Python from the host's features; `select_path`), each an LLVM-IR micro-kernel emitted
by the same `@intrinsic` `_micro_s8(path, mr, ...)` with `path` and `mr` compile-time literals, so the
IR of a path is generated only inside the kernel specialised for it (`linear_s8_vnni` /
`linear_s8_pairs`), which is compiled on its first call and only ever called when selected:
- PATH_VNNI: `llvm.x86.avx512.vpdpbusd.512`, MR=4 rows x 4 panels (64 columns, 16 zmm accumulators).
  Compiling it for a CPU without AVX512-VNNI aborts the process (numba.md §1), so `vnni_available()`
  requires the host to report avx512vnni (+avx512bw/vl) AND NUMBA_CPU_NAME / NUMBA_CPU_FEATURES to be
  unset; the intrinsic's typing re-checks and raises a TypingError instead of ever emitting it.
- PATH_SDOT: AArch64 dotprod `sdot` (activations flipped to a - 128, correction with zp - 128), only where
  the CPU Numba compiles for has dotprod (`dotprod_available`).
- PATH_AVX2 (x86-64 with AVX2, no VNNI; same gate as VNNI: host avx2 and no CPU override): activations
  widened to int16 once per call (`widen_rows`), `llvm.x86.avx2.pmadd.wd` on 6 rows x 8 columns
  (`_emit_avx2_sums`). Not `vpmaddubsw`: its int16 pair sums saturate for u8 x s8 (docs/QUANTIZATION.md).
- PATH_PAIRS: portable IR: per (row, panel, half of 8 columns): zext(a) * sext(w) as <32 x i32>, then
  even + odd lanes (the pmaddwd pattern) accumulated in <16 x i32> pairs-of-k lanes, reduced at the
  end. x86 lowers it to vpmaddwd / vpdpwssd, aarch64 to smull/addp-style code. Compiles for any CPU.
Only the register budget (MR, NP of the pairs path) depends on the host, never correctness.

Driver (`_gemm_s8`): row chunks sized so the chunk's activations and output rows stay in L2, then panel
groups (NP panels of B, in L1 while the chunk's row blocks pass), then blocks of MR rows. A full block
(MR rows x NP*16 columns) runs `_micro_s8_f32`, which scales the int32 accumulators in registers and
stores float32 straight into the output; only edge blocks go through an int32 tile. While a group's row
blocks run, the next group's weights are prefetched into L2 (prefetcht1, spread over the row blocks): the
first row block of a group otherwise waits on memory for each of its lines (in-process A/B, int8 MiniLM
1x128: 0.992 median ratio; into L1 instead: 4 % slower, L1 thrashes; two groups ahead: 1 % slower).
Activation and residual follow in one pass over each chunk's rows. (Before, every 4 x 16 tile went through an int32
buffer and short per-tile float loops: on a Zen 3 core that epilogue took as long as 60 % of the
multiply-adds in a scratch measurement; bench/gemm_s8_paths.py measures the paths as they are now.)
"""
import os

import llvmlite.binding as _llb
import numpy as np
from llvmlite import ir
from numba.core import config as _config
from numba.core import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.gemm_f32 import _prefetch, _prefetch_l2
from edgeformer.kernels.host import cpu_overridden as _cpu_overridden
from edgeformer.kernels.host import host_features
from edgeformer.kernels.act_ir import emit_activation_switch, emit_store_tile, rational_gelu
from edgeformer.kernels.reduce import max_nonan, min_nonan
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_GELU_TANH, ACT_NONE, ACT_RELU, gelu_erf, gelu_tanh, relu

NR = 16  # columns per panel
KG = 4  # k values per group (one dword of activations)
PANEL_GROUP = 4  # P is padded to a multiple of this (the largest NP of any path)
K_MAX = 65536  # accumulation bound, see the module docstring (255 * 127 * 66311 < 2**31)

PATH_PAIRS = 1
PATH_VNNI = 2
PATH_SDOT = 3
PATH_AVX2 = 4
PATH_NAMES = {PATH_PAIRS: "pairs", PATH_VNNI: "vnni", PATH_SDOT: "sdot", PATH_AVX2: "avx2"}
A16_PATHS = (PATH_AVX2,)  # paths that read the activations widened to int16 (`widen_rows`)


# ---- path selection (Python, before anything is compiled) ----------------------------------------

def vnni_available(features=None) -> bool:
    """May the VNNI micro-kernel be compiled here? Only with host AVX512-VNNI/BW/VL and no CPU override."""
    if _cpu_overridden():
        return False
    f = host_features() if features is None else features
    return all(bool(f.get(name, False)) for name in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))


def avx2_available(features=None) -> bool:
    """May the AVX2 micro-kernel (llvm.x86.avx2.pmadd.wd) be compiled here? Only on an x86-64 host that
    reports avx2, with no CPU override (an x86 intrinsic compiled for a CPU without it aborts the process,
    as the VNNI one does, numba.md §1)."""
    if _cpu_overridden() or _llb.get_process_triple().split("-")[0] not in ("x86_64", "amd64"):
        return False
    f = host_features() if features is None else features
    return bool(f.get("avx2", False))


# CPUs (LLVM names) with the ARMv8.2 dot-product extension; any other NUMBA_CPU_NAME gets no sdot.
DOTPROD_CPUS = frozenset({
    "cortex-a55", "cortex-a65", "cortex-a65ae", "cortex-a75", "cortex-a76", "cortex-a76ae", "cortex-a77",
    "cortex-a78", "cortex-a78c", "cortex-a510", "cortex-a520", "cortex-a710", "cortex-a715", "cortex-a720",
    "cortex-x1", "cortex-x1c", "cortex-x2", "cortex-x3", "cortex-x4", "neoverse-n1", "neoverse-n2",
    "neoverse-v1", "neoverse-v2", "neoverse-512tvb", "ampere1", "ampere1a", "apple-a13", "apple-a14",
    "apple-a15", "apple-a16", "apple-m1", "apple-m2", "apple-m3"})


def _is_aarch64() -> bool:
    return _llb.get_process_triple().split("-")[0] in ("aarch64", "arm64")


def dotprod_available(features=None, cpu_name=None, cpu_features=None, aarch64=None) -> bool:
    """May the sdot micro-kernel be compiled here? Only on aarch64 when the CPU Numba compiles for has
    dotprod: NUMBA_CPU_FEATURES (must contain +dotprod), else NUMBA_CPU_NAME (DOTPROD_CPUS), else the
    host's features. A Pi 4 (cortex-a72) never gets it."""
    if not (_is_aarch64() if aarch64 is None else aarch64):
        return False
    cpu_features = (cpu_features if cpu_features is not None
                    else (_config.CPU_FEATURES or os.environ.get("NUMBA_CPU_FEATURES") or ""))
    if cpu_features:
        return "+dotprod" in cpu_features.replace(" ", "").split(",")
    cpu_name = cpu_name if cpu_name is not None else (_config.CPU_NAME or os.environ.get("NUMBA_CPU_NAME") or "")
    if cpu_name and cpu_name != "host":
        return cpu_name.lower() in DOTPROD_CPUS
    f = host_features() if features is None else features
    return bool(f.get("dotprod", False))


def select_path(features=None) -> int:
    """The fastest path this CPU can run: PATH_VNNI, PATH_SDOT, PATH_AVX2 (x86-64 with AVX2, no VNNI) or
    PATH_PAIRS. EDGEFORMER_INT8_PATH=pairs forces the portable one."""
    if os.environ.get("EDGEFORMER_INT8_PATH", "").lower() == "pairs":
        return PATH_PAIRS
    if vnni_available(features):
        return PATH_VNNI
    if dotprod_available(features):
        return PATH_SDOT
    if avx2_available(features):
        return PATH_AVX2
    return PATH_PAIRS


def available_paths(features=None) -> list:
    return ([PATH_PAIRS] + ([PATH_VNNI] if vnni_available(features) else [])
            + ([PATH_SDOT] if dotprod_available(features) else [])
            + ([PATH_AVX2] if avx2_available(features) else []))


def _pairs_budget():
    """(MR, NP) of the pairs path: accumulators MR*NP*2 vectors of <16 x i32> must fit the registers."""
    machine = _llb.get_process_triple().split("-")[0]
    if machine in ("aarch64", "arm64"):
        return 2, 1  # 2*1*2*4 = 16 q registers of accumulators
    if not _cpu_overridden():
        f = host_features()
        if f.get("avx512f", False) and f.get("avx512bw", False):
            return 4, 2  # 16 zmm accumulators
    return 2, 1  # AVX2: 8 ymm; SSE would spill a little, still correct


PAIRS_MR, PAIRS_NP = _pairs_budget()
VNNI_MR, VNNI_NP = 4, 4
SDOT_MR, SDOT_NP = 4, 1  # 16 q-register accumulators (4 rows x 4 quads of columns)
AVX2_MR, AVX2_NP = 6, 1  # per half panel: 12 ymm accumulators (6 rows x 2) + 2 weight + 1 activation vectors


def path_blocking(path: int):
    """(MR, NP) of a path: rows and panels per micro-kernel call."""
    if path == PATH_VNNI:
        return VNNI_MR, VNNI_NP
    if path == PATH_SDOT:
        return SDOT_MR, SDOT_NP
    if path == PATH_AVX2:
        return AVX2_MR, AVX2_NP
    return PAIRS_MR, PAIRS_NP


# ---- weight packing (plain NumPy, convert time) ---------------------------------------------------

def packed_shape(n: int, k: int):
    p = -(-n // NR)
    p = -(-p // PANEL_GROUP) * PANEL_GROUP
    return p, -(-k // KG), NR * KG


def pack_weight(wq):
    """wq (N, K) int8 in [-127, 127] -> (P, K4, 64) int8 (see the module docstring)."""
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 2:
        raise ValueError(f"pack_weight needs a 2-D int8 array, got {wq.dtype} {wq.shape}")
    n, k = wq.shape
    p, k4, _ = packed_shape(n, k)
    full = np.zeros((p * NR, k4 * KG), dtype=np.int8)
    full[:n, :k] = wq
    # (P, 16, K4, 4) -> (P, K4, 16, 4)
    return np.ascontiguousarray(full.reshape(p, NR, k4, KG).transpose(0, 2, 1, 3).reshape(p, k4, NR * KG))


def unpack_weight(wp, n: int, k: int):
    """Inverse of pack_weight."""
    p, k4, _ = wp.shape
    full = wp.reshape(p, k4, NR, KG).transpose(0, 2, 1, 3).reshape(p * NR, k4 * KG)
    return np.ascontiguousarray(full[:n, :k])


def column_sums(wp):
    """colsum (P*16,) int32 of a packed weight: sum over k of every (padded) column."""
    p, k4, _ = wp.shape
    return wp.reshape(p, k4, NR, KG).sum(axis=(1, 3), dtype=np.int64).reshape(p * NR).astype(np.int32)


def quantize_weight(w, method="maxabs"):
    """Symmetric per-output-channel int8: w (N, K) float -> (wq int8 (N, K) in [-127, 127], scale f32 (N,)).

    maxabs: scale = max|w[n]| / 127 (1 for an all-zero row), wq = clip(rint(w / scale), -127, 127).
    mse:    the clipping range c * max|w[n]|, c in [0.70, 1], that minimises ||w[n] - scale * wq[n]||^2.
    """
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    if method == "mse":
        best = amax.copy()
        err = np.full(w.shape[0], np.inf)
        for c in np.linspace(0.70, 1.0, 31, dtype=np.float32):
            s = np.where(amax > 0, c * amax / np.float32(127), np.float32(1)).astype(np.float32)
            q = np.clip(np.rint(w / s[:, None]), -127, 127)
            e = ((q * s[:, None] - w).astype(np.float64) ** 2).sum(axis=1)
            better = e < err
            err[better] = e[better]
            best[better] = c * amax[better]
        amax = best
    elif method != "maxabs":
        raise ValueError(f"unknown weight quantisation method {method!r}")
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    wq = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return wq, scale


# ---- micro-kernel --------------------------------------------------------------------------------

def _emit(context, builder, path, mr, npn, args, sig_args):
    """IR of one micro-kernel call: the int32 tile d[d_off + i*d_stride + c] = sum_k a*w, c < npn*16."""
    (a_arr, a_off, lda, b_arr, b_off, pstride, k4, d_arr, d_off, d_stride, zp_arr, zp_off, cs_arr, cs_off) = args

    def data(idx, val):
        return context.make_array(sig_args[idx])(context, builder, val).data

    a_ptr = data(2, a_arr)  # u8*
    b_ptr = data(5, b_arr)  # i8*
    d_ptr = data(9, d_arr)  # i32*
    zp_ptr = data(12, zp_arr)  # i32*
    cs_ptr = data(14, cs_arr)  # i32*
    emit_ptrs(builder, path, mr, npn, a_ptr, a_off, lda, b_ptr, b_off, pstride, k4, d_ptr, d_off, d_stride,
              zp_ptr, zp_off, cs_ptr, cs_off)


def _open_k_loop(builder, k4, zero, count, name):
    """Open the loop over k-groups g in [0, k4) with `count` accumulator phis starting at `zero`; the builder
    is left in the loop body. Returns (g, accs, close): close(new_accs) adds the back edge with the updated
    accumulators and leaves the builder after the loop, where accs hold the final sums."""
    i64 = ir.IntType(64)
    fn = builder.function
    head = fn.append_basic_block(f"{name}_head")
    body = fn.append_basic_block(f"{name}_body")
    done = fn.append_basic_block(f"{name}_done")
    pre = builder.block
    builder.branch(head)
    builder.position_at_end(head)
    g = builder.phi(i64, "g")
    g.add_incoming(ir.Constant(i64, 0), pre)
    accs = []
    for _ in range(count):
        ph = builder.phi(zero.type)
        ph.add_incoming(zero, pre)
        accs.append(ph)
    builder.cbranch(builder.icmp_signed("<", g, k4), body, done)
    builder.position_at_end(body)

    def close(new):
        nxt = builder.add(g, ir.Constant(i64, 1))
        end = builder.block
        builder.branch(head)
        g.add_incoming(nxt, end)
        for ph, v in zip(accs, new):
            ph.add_incoming(v, end)
        builder.position_at_end(done)

    return g, accs, close


def emit_ptrs(builder, path, mr, npn, a_ptr, a_off, lda, b_ptr, b_off, pstride, k4, d_ptr, d_off, d_stride,
              zp_ptr, zp_off, cs_ptr, cs_off, f32_out=None):
    """The micro-kernel's IR on raw pointers (u8*, i8*, i32*, i32*, i32*) and i64 offsets/strides.

    f32_out None: store the int32 tile at d. Else (ws_ptr, sa_ptr, bias_ptr[, act, res_ptr, res_stride,
    use_res]): float* already offset to the tile's first column / first row, and d_ptr is float* (the output):
    store act((f32(acc) * ws[c]) * sa[i] + bias[c]) (+ res[i*res_stride + c] when use_res != 0) there
    instead. The scaling has no fast-math flags (no contraction into an FMA: exactly the reference
    epilogue's float32 operations); act is an i64 ACT_* code (kernels/act_ir.py), res_ptr float* at the
    tile's first element."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    v16 = ir.VectorType(i32, 16)

    def c64(v):
        return ir.Constant(i64, v)

    a_base = builder.gep(a_ptr, [a_off])
    b_base = builder.gep(b_ptr, [b_off])
    a_rows = [builder.gep(a_base, [builder.mul(lda, c64(i))]) for i in range(mr)]
    b_panels = [builder.gep(b_base, [builder.mul(pstride, c64(j))]) for j in range(npn)]
    if path == PATH_AVX2:
        sums = _emit_avx2_sums(builder, mr, npn, a_rows, b_panels, k4)
        _emit_store(builder, path, mr, npn, sums, d_ptr, d_off, d_stride, zp_ptr, zp_off, cs_ptr, cs_off, f32_out)
        return
    nacc = mr * npn * {PATH_VNNI: 1, PATH_PAIRS: 2, PATH_SDOT: 4}[path]

    v4 = ir.VectorType(i32, 4)
    zero = ir.Constant(v4 if path == PATH_SDOT else v16, [0] * (4 if path == PATH_SDOT else 16))
    g, accs, close_loop = _open_k_loop(builder, k4, zero, nacc, "s8")
    aoff = builder.mul(g, c64(KG))
    boff = builder.mul(g, c64(NR * KG))
    new = []
    if path == PATH_VNNI:
        name = "llvm.x86.avx512.vpdpbusd.512"
        dp = builder.module.globals.get(name)
        if dp is None:
            dp = ir.Function(builder.module, ir.FunctionType(v16, [v16, v16, v16]), name)
        bv = [builder.load(builder.bitcast(builder.gep(b_panels[j], [boff]), v16.as_pointer()), align=1)
              for j in range(npn)]
        zmask = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
        for i in range(mr):
            dword = builder.load(builder.bitcast(builder.gep(a_rows[i], [aoff]), i32.as_pointer()), align=1)
            av = builder.insert_element(ir.Constant(v16, ir.Undefined), dword, ir.Constant(i32, 0))
            av = builder.shuffle_vector(av, ir.Constant(v16, ir.Undefined), zmask)
            for j in range(npn):
                new.append(builder.call(dp, [accs[i * npn + j], av, bv[j]]))
    elif path == PATH_SDOT:
        # AArch64 dotprod: sdot v4i32 += v16i8 . v16i8 (4 lanes of 4-byte dot products) — exactly 4 columns x
        # 4 k of the packed layout per 16 bytes. sdot is signed x signed: activations u8 are flipped to s8
        # (a ^ 0x80 = a - 128); the correction below uses zp - 128 instead of zp.
        v16i8 = ir.VectorType(i8, 16)
        name = "llvm.aarch64.neon.sdot.v4i32.v16i8"
        dp = builder.module.globals.get(name)
        if dp is None:
            dp = ir.Function(builder.module, ir.FunctionType(v4, [v4, v16i8, v16i8]), name)
        bv = [builder.load(builder.bitcast(builder.gep(b_panels[j], [builder.add(boff, c64(16 * q))]),
                                           v16i8.as_pointer()), align=1)
              for j in range(npn) for q in range(4)]
        flip = ir.Constant(v16i8, [-128] * 16)
        bmask = ir.Constant(ir.VectorType(i32, 16), [q % 4 for q in range(16)])
        for i in range(mr):
            four = builder.load(builder.bitcast(builder.gep(a_rows[i], [aoff]), ir.VectorType(i8, 4).as_pointer()),
                                align=1)
            av = builder.shuffle_vector(four, ir.Constant(ir.VectorType(i8, 4), ir.Undefined), bmask)
            av = builder.xor(av, flip)
            for j in range(npn):
                for q in range(4):
                    idx = (i * npn + j) * 4 + q
                    new.append(builder.call(dp, [accs[idx], av, bv[j * 4 + q]]))
    else:
        v32i8 = ir.VectorType(i8, 32)
        v32i32 = ir.VectorType(i32, 32)
        even = ir.Constant(ir.VectorType(i32, 16), list(range(0, 32, 2)))
        odd = ir.Constant(ir.VectorType(i32, 16), list(range(1, 32, 2)))
        # 8 columns x 4 k per half-panel: 32 bytes
        bv = []
        for j in range(npn):
            for h in range(2):
                p = builder.gep(b_panels[j], [builder.add(boff, c64(32 * h))])
                bv.append(builder.sext(builder.load(builder.bitcast(p, v32i8.as_pointer()), align=1), v32i32))
        pattern = ir.Constant(ir.VectorType(i32, 32), [q % 4 for q in range(32)])
        for i in range(mr):
            four = builder.load(builder.bitcast(builder.gep(a_rows[i], [aoff]), ir.VectorType(i8, 4).as_pointer()),
                                align=1)
            a32 = builder.shuffle_vector(four, ir.Constant(ir.VectorType(i8, 4), ir.Undefined), pattern)
            a32 = builder.zext(a32, v32i32)
            for j in range(npn):
                for h in range(2):
                    prod = builder.mul(a32, bv[j * 2 + h])
                    s = builder.add(builder.shuffle_vector(prod, prod, even), builder.shuffle_vector(prod, prod, odd))
                    idx = (i * npn + j) * 2 + h
                    new.append(builder.add(accs[idx], s))
    close_loop(new)
    sums = []  # (mr * npn) <16 x i32>: sum_k a*w of row i, panel j
    if path == PATH_PAIRS:
        # lanes (2c, 2c+1) of half h hold column 8h + c over k pairs (0,1) and (2,3): add them
        lo = ir.Constant(ir.VectorType(i32, 16), [2 * q for q in range(8)] + [16 + 2 * q for q in range(8)])
        hi = ir.Constant(ir.VectorType(i32, 16), [2 * q + 1 for q in range(8)] + [16 + 2 * q + 1 for q in range(8)])
    for i in range(mr):
        for j in range(npn):
            if path == PATH_VNNI:
                v = accs[i * npn + j]
            elif path == PATH_SDOT:
                q4 = [accs[(i * npn + j) * 4 + q] for q in range(4)]
                lo8 = builder.shuffle_vector(q4[0], q4[1], ir.Constant(ir.VectorType(i32, 8), list(range(8))))
                hi8 = builder.shuffle_vector(q4[2], q4[3], ir.Constant(ir.VectorType(i32, 8), list(range(8))))
                v = builder.shuffle_vector(lo8, hi8, ir.Constant(ir.VectorType(i32, 16), list(range(16))))
            else:
                x0, x1 = accs[(i * npn + j) * 2], accs[(i * npn + j) * 2 + 1]
                v = builder.add(builder.shuffle_vector(x0, x1, lo), builder.shuffle_vector(x0, x1, hi))
            sums.append(v)
    _emit_store(builder, path, mr, npn, sums, d_ptr, d_off, d_stride, zp_ptr, zp_off, cs_ptr, cs_off, f32_out)


def _emit_avx2_sums(builder, mr, npn, a_rows, b_panels, k4):
    """AVX2 (no VNNI) sums: activations pre-widened to int16 (a_rows are i16*, `widen_rows`), weights widened
    with vpmovsxbw, products and pair sums by vpmaddwd (llvm.x86.avx2.pmadd.wd: 16 exact int16 x int16
    products added in pairs into 8 int32 lanes; |a*w| <= 255*127, a pair <= 64770, no saturation).
    One K loop per half panel (8 columns): 2*mr accumulators + 2 weight vectors + 1 broadcast fit the 16 ymm
    registers, and every weight vector is reused by mr rows (the widening is the bottleneck otherwise). A half
    panel's k-group is 32 bytes: columns c < 4 in the first 16 (c*4 + j), c >= 4 in the second."""
    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    v8, v16 = ir.VectorType(i32, 8), ir.VectorType(i32, 16)
    v16i16, v16i8, v4i16 = ir.VectorType(i16, 16), ir.VectorType(ir.IntType(8), 16), ir.VectorType(i16, 4)
    name = "llvm.x86.avx2.pmadd.wd"
    madd = builder.module.globals.get(name)
    if madd is None:
        madd = ir.Function(builder.module, ir.FunctionType(v8, [v16i16, v16i16]), name)
    zero = ir.Constant(v8, [0] * 8)
    rep4 = ir.Constant(ir.VectorType(i32, 16), [q % 4 for q in range(16)])

    def c64(v):
        return ir.Constant(i64, v)

    halves = {}  # (j, h) -> [2*mr accumulators]
    for j in range(npn):
        for h in range(2):
            g, accs, close_loop = _open_k_loop(builder, k4, zero, 2 * mr, "avx2")
            boff = builder.add(builder.mul(g, c64(NR * KG)), c64(32 * h))
            bw = [builder.sext(builder.load(builder.bitcast(builder.gep(b_panels[j], [builder.add(boff, c64(16 * q))]),
                                                          v16i8.as_pointer()), align=1), v16i16)
                  for q in range(2)]  # columns 4q .. 4q+3 of the half, 4 k each
            aoff = builder.mul(g, c64(KG))
            new = []
            for i in range(mr):
                four = builder.load(builder.bitcast(builder.gep(a_rows[i], [aoff]), v4i16.as_pointer()), align=2)
                av = builder.shuffle_vector(four, ir.Constant(v4i16, ir.Undefined), rep4)  # (a0..a3) x 4
                for q in range(2):
                    new.append(builder.add(accs[2 * i + q], builder.call(madd, [av, bw[q]])))
            close_loop(new)
            halves[(j, h)] = accs
    # lanes (2c, 2c+1) of accumulator q hold column 4q + c over k pairs (0,1), (2,3): add them
    even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))
    cat = ir.Constant(ir.VectorType(i32, 16), list(range(16)))
    sums = []
    for i in range(mr):
        for j in range(npn):
            cols = []
            for h in range(2):
                x0, x1 = halves[(j, h)][2 * i], halves[(j, h)][2 * i + 1]
                cols.append(builder.add(builder.shuffle_vector(x0, x1, even), builder.shuffle_vector(x0, x1, odd)))
            sums.append(builder.shuffle_vector(cols[0], cols[1], cat))
    return sums


def _emit_store(builder, path, mr, npn, sums, d_ptr, d_off, d_stride, zp_ptr, zp_off, cs_ptr, cs_off, f32_out):
    """acc - zp[i] * colsum[c] for the (mr x npn) <16 x i32> sums, stored as int32 at d, or scaled to float32
    (f32_out, see emit_ptrs)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    v16 = ir.VectorType(i32, 16)

    def c64(v):
        return ir.Constant(i64, v)

    d_base = builder.gep(d_ptr, [d_off])
    # zero-point correction in registers: acc - zp[i] * colsum[c], int32 with wrap-around, which is exact
    # because the true value fits int32 (module docstring)
    cs_base = builder.gep(cs_ptr, [cs_off])
    csv = [builder.load(builder.bitcast(builder.gep(cs_base, [c64(j * NR)]), v16.as_pointer()), align=4)
           for j in range(npn)]
    zp_base = builder.gep(zp_ptr, [zp_off])
    zmask16 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
    if f32_out is not None:
        f32 = ir.FloatType()
        f16v = ir.VectorType(f32, 16)
        ws_ptr, sa_ptr, bias_ptr = f32_out[:3]
        act, res_ptr, res_stride, use_res = f32_out[3:] if len(f32_out) > 3 else (None, None, None, None)

        def fvec(ptr, j):
            return builder.load(builder.bitcast(builder.gep(ptr, [c64(j * NR)]), f16v.as_pointer()), align=4)

        wsv = [fvec(ws_ptr, j) for j in range(npn)]
        biasv = [fvec(bias_ptr, j) for j in range(npn)]
        sav = []
        for i in range(mr):
            sv1 = builder.insert_element(ir.Constant(f16v, ir.Undefined), builder.load(builder.gep(sa_ptr, [c64(i)])),
                                         ir.Constant(i32, 0))
            sav.append(builder.shuffle_vector(sv1, ir.Constant(f16v, ir.Undefined), zmask16))
    tile = []  # (mr * npn) float32 vectors of the fused store, before the activation
    for i in range(mr):
        row = builder.mul(d_stride, c64(i))
        z = builder.load(builder.gep(zp_base, [c64(i)]))
        if path == PATH_SDOT:
            z = builder.sub(z, ir.Constant(i32, 128))  # activations were flipped to a - 128
        zv = builder.insert_element(ir.Constant(v16, ir.Undefined), z, ir.Constant(i32, 0))
        zv = builder.shuffle_vector(zv, ir.Constant(v16, ir.Undefined), zmask16)
        for j in range(npn):
            v = builder.sub(sums[i * npn + j], builder.mul(zv, csv[j]))
            if f32_out is None:
                p = builder.gep(d_base, [builder.add(row, c64(j * NR))])
                builder.store(v, builder.bitcast(p, v16.as_pointer()), align=4)
                continue
            # no fast-math flags: exactly the float32 operations of the reference epilogue
            f = builder.fmul(builder.fmul(builder.sitofp(v, f16v), wsv[j]), sav[i])
            tile.append(builder.fadd(f, biasv[j]))
    if f32_out is None:
        return
    if act is not None:
        tile = emit_activation_switch(builder, act, tile, "s8_act")

    def store(with_res):
        emit_store_tile(builder, tile, mr, npn, NR, d_base, d_stride, res_ptr if with_res else None,
                        res_stride if with_res else None)

    if use_res is None:
        store(False)
        return
    fn = builder.function
    with_res, without, done = (fn.append_basic_block(f"s8_{n}") for n in ("res", "nores", "stored"))
    builder.cbranch(builder.icmp_signed("!=", use_res, c64(0)), with_res, without)
    builder.position_at_end(with_res)
    store(True)
    builder.branch(done)
    builder.position_at_end(without)
    store(False)
    builder.branch(done)
    builder.position_at_end(done)


def _check_path(pv):
    """Typing-time guard: never emit an instruction the CPU lacks (that aborts the process)."""
    if pv == PATH_VNNI and not vnni_available():
        raise TypingError("int8 VNNI micro-kernel requested on a CPU without AVX512-VNNI (or with "
                          "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES set): refusing to compile it")
    if pv == PATH_AVX2 and not avx2_available():
        raise TypingError("int8 AVX2 micro-kernel requested on a CPU without AVX2 (or with NUMBA_CPU_NAME/"
                          "NUMBA_CPU_FEATURES set): refusing to compile it")
    if pv == PATH_SDOT and not dotprod_available():
        raise TypingError("int8 sdot micro-kernel requested for a CPU without dotprod: refusing to compile it")
    if pv not in PATH_NAMES:
        raise TypingError(f"unknown int8 path {pv}")


def _typed_path(path, mr):
    """(path, mr, NP) of a micro-kernel call whose path and mr are literals, after the CPU guard."""
    pv = path.literal_value
    _check_path(pv)
    return pv, mr.literal_value, path_blocking(pv)[1]


@intrinsic
def _micro_s8(typingctx, path, mr, a, a_off, lda, b, b_off, pstride, k4, d, d_off, d_stride, zp, zp_off, cs, cs_off):
    """d[d_off + i*d_stride + c] = sum_g sum_j a[a_off + i*lda + 4g + j] * B[panel c//16, g, (c%16)*4 + j]
    - zp[zp_off + i] * cs[cs_off + c] for i < mr, c < NP*16 (NP of the path), g < k4. a u8, b int8 (packed
    panels pstride = K4*64 apart, panel 0 at b_off), d, zp, cs int32 (cs: colsum, NP*16 readable from
    cs_off). path and mr must be literals."""
    if not isinstance(path, types.IntegerLiteral) or not isinstance(mr, types.IntegerLiteral):
        return None
    pv, mv, npn = _typed_path(path, mr)
    ip = types.intp
    sig = types.void(path, mr, a, ip, ip, b, ip, ip, ip, d, ip, ip, zp, ip, cs, ip)

    def codegen(context, builder, signature, args):
        _emit(context, builder, pv, mv, npn, args[2:], signature.args)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _micro_s8_f32(typingctx, path, mr, a, a_off, lda, b, b_off, pstride, k4, out, out_off, ostride, zp, zp_off, cs,
                  col0, ws, sa, bias, act, res, res_off, res_stride, use_res):
    """_micro_s8 with the epilogue fused: out.flat[out_off + i*ostride + c] = act((f32(acc[i, c]) * ws[col0 + c])
    * sa[zp_off + i] + bias[col0 + c]) (+ res.flat[res_off + i*res_stride + c] when use_res != 0) for i < mr,
    c < NP*16 (all NP*16 columns must exist in out, ws, bias and res); acc as in _micro_s8 (zp[zp_off + i],
    cs[col0 + c]); act an ACT_* code applied in registers (kernels/act_ir.py). out and res float32 with unit
    column stride (res may be out)."""
    if not isinstance(path, types.IntegerLiteral) or not isinstance(mr, types.IntegerLiteral):
        return None
    pv, mv, npn = _typed_path(path, mr)
    ip = types.intp
    sig = types.void(path, mr, a, ip, ip, b, ip, ip, ip, out, ip, ip, zp, ip, cs, ip, ws, sa, bias, types.int64,
                     res, ip, ip, ip)

    def codegen(context, builder, signature, args):
        sa_ = signature.args

        def data(idx):
            return context.make_array(sa_[idx])(context, builder, args[idx]).data

        col0, zp_off = args[15], args[13]
        f32_out = (builder.gep(data(16), [col0]), builder.gep(data(17), [zp_off]), builder.gep(data(18), [col0]),
                   args[19], builder.gep(data(20), [args[21]]), args[22], args[23])
        emit_ptrs(builder, pv, mv, npn, data(2), args[3], args[4], data(5), args[6], args[7], args[8], data(9),
                  args[10], args[11], data(12), zp_off, data(14), col0, f32_out=f32_out)
        return context.get_dummy_value()

    return sig, codegen


# ---- activation quantisation ---------------------------------------------------------------------

_F0 = np.float32(0.0)
_F127 = np.float32(127.0)
_F255 = np.float32(255.0)


@helper
def _rint(v):
    """Round to nearest even (llvm.rint: one vrndscaleps / frintx per vector instead of the two adds of
    (v + 1.5*2**23) - 1.5*2**23; the same result wherever the caller's clamps leave a difference)."""
    return np.rint(v)


_NO_SMOOTH = np.zeros(0, dtype=np.float32)


@kernel
def quantize_rows(x, asym, aq, sa, zp, r0, r1):
    """quantize_rows_smooth without a smoothing vector."""
    quantize_rows_smooth(x, asym, _NO_SMOOTH, aq, sa, zp, r0, r1)


@kernel
def quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1):
    """Per-row (per-token) dynamic quantisation of x (T, K) f32 into aq (T, Kp) u8, Kp = 4*ceil(K/4).

    smooth (K,) f32 or (0,): when given, the row quantised is x[r, k] * smooth[k] (per-input-channel
    smoothing, SmoothQuant: the converter multiplied the weight's columns by 1 / smooth).

    symmetric (asym == 0): m = max|x|, s = m / 127, q = clip(rint(x * (127 / m)), -127, 127) + 128, zp = 128;
    asymmetric:           lo = min(min x, 0), hi = max(max x, 0), s = (hi - lo) / 255,
                          zp = clip(rint(-lo * (255 / (hi - lo))), 0, 255), q = clip(rint(x * inv) + zp, 0, 255).
    An all-zero row gets s = 0, every q = zp. Padding bytes k >= K are set to zp. No validation.
    The range is one pass of float min/max (kernels/reduce.py); a row holding a NaN gets unspecified codes
    in [0, 255] and a scale that may be NaN (never an out-of-range write).
    """
    # without smoothing, multiply by ones: x * 1 is x exactly (inf and -0 too), and one loop body serves both.
    # Two calls, not `sm = smooth if ... else ones`: one array type per call (128 x 384 in isolation: 13.4 ->
    # 10.3 us on Zen 4 with this and llvm.rint; no measurable change in the whole model).
    if smooth.shape[0] != 0:
        _quantize_rows(x, asym, smooth, aq, sa, zp, r0, r1)
    else:
        _quantize_rows(x, asym, np.ones(x.shape[1], dtype=np.float32), aq, sa, zp, r0, r1)


@helper
def _quantize_rows(x, asym, sm, aq, sa, zp, r0, r1):
    for r in range(r0, r1):
        s, z = quantize_row(x[r], sm, asym, aq[r])
        sa[r] = s
        zp[r] = z


@helper
def quantize_row(xr, sm, asym, qr):
    """One row of quantize_rows_smooth: qr (Kp,) u8 <- xr (K,) f32 times sm (K,) (ones: no smoothing);
    returns (scale s float32, zero point z int32). Contiguous 1-D rows, so every loop vectorises."""
    k = xr.shape[0]
    # range of the smoothed row, recomputed on the fly (no scratch copy); min/max start at 0, so lo <= 0 <= hi
    lo = _F0
    hi = _F0
    for j in range(k):
        v = xr[j] * sm[j]
        lo = min_nonan(lo, v)
        hi = max_nonan(hi, v)
    if asym == 0:
        m = hi if hi > -lo else -lo
        if m > _F0:
            inv = _F127 / m
            s = m / _F127
        else:
            inv = _F0
            s = _F0
        for j in range(k):
            v = _rint((xr[j] * sm[j]) * inv)
            v = _F127 if v > _F127 else v
            v = -_F127 if v < -_F127 else v
            qr[j] = np.uint8(np.int32(v) + 128)
        z = np.int32(128)
    else:
        rng = hi - lo
        if rng > _F0:
            inv = _F255 / rng
            s = rng / _F255
        else:
            inv = _F0
            s = _F0
        zf = _rint(-lo * inv)
        zf = _F255 if zf > _F255 else zf
        zf = _F0 if zf < _F0 else zf
        for j in range(k):
            v = _rint((xr[j] * sm[j]) * inv) + zf
            v = _F255 if v > _F255 else v
            v = _F0 if v < _F0 else v
            qr[j] = np.uint8(np.int32(v))
        z = np.int32(zf)
    for j in range(k, qr.shape[0]):
        qr[j] = np.uint8(z)
    return s, z


_F1 = np.float32(1.0)


@kernel
def quantize_rows_static(x, asym, smooth, qscale, qzero, aq, sa, zp, r0, r1):
    """Static per-tensor quantisation of rows r0:r1 of x (T, K) f32 into aq (T, Kp) u8 (Kp = 4*ceil(K/4)),
    with one calibrated scale s = qscale[0] (f32, finite, > 0, 1/s finite) and, asymmetric, one zero point
    z = qzero[0] in [0, 255] (qzero is ignored when symmetric):

        inv = f32(1 / s)
        symmetric (asym == 0): a = clip(rint(v * inv), -127, 127) + 128, zp = 128
        asymmetric:            a = clip(rint(v * inv) + z, 0, 255),       zp = z
    with v = x[r, k] * smooth[k] (smooth (K,) f32, SmoothQuant) or v = x[r, k] (smooth (0,)).

    The same u8 layout as quantize_rows_smooth (padding bytes k >= K hold zp; sa[r] = s, zp[r] = zp), so the
    GEMM cannot tell the modes apart and the accumulation bound is unchanged (|a - zp| <= 255). Values beyond
    the calibrated range clip to the end codes (+-inf too); the clip is written `v if v < hi else hi`, so a
    NaN becomes the top code instead of an undefined float->int conversion. No validation (the op checks
    s, z and the shapes at load)."""
    if smooth.shape[0] != 0:  # two calls, one array type each (see quantize_rows_smooth)
        _quantize_rows_static(x, asym, smooth, qscale, qzero, aq, sa, zp, r0, r1)
    else:  # x * 1 is x exactly
        _quantize_rows_static(x, asym, np.ones(x.shape[1], dtype=np.float32), qscale, qzero, aq, sa, zp, r0, r1)


@helper
def _quantize_rows_static(x, asym, sm, qscale, qzero, aq, sa, zp, r0, r1):
    s = qscale[0]
    inv = _F1 / s
    z = np.int32(128) if asym == 0 else np.int32(qzero[0])
    for r in range(r0, r1):
        quantize_row_static(x[r], sm, asym, inv, z, aq[r])
        sa[r] = s
        zp[r] = z


@helper
def quantize_row_static(xr, sm, asym, inv, z, qr):
    """One row of quantize_rows_static: qr (Kp,) u8 <- xr (K,) f32 times sm (K,), with inv = f32(1 / s) and
    zero point z (128 when symmetric)."""
    k = xr.shape[0]
    lo = _F1 if asym == 0 else _F0  # symmetric: rint + 128 in [1, 255]  <=>  rint in [-127, 127]
    zf = np.float32(z)
    for j in range(k):
        v = _rint((xr[j] * sm[j]) * inv) + zf
        v = v if v < _F255 else _F255
        v = v if v > lo else lo
        qr[j] = np.uint8(np.int32(v))
    for j in range(k, qr.shape[0]):
        qr[j] = np.uint8(z)


# ---- driver --------------------------------------------------------------------------------------

@helper
def _micro_rows(path, mrb, aq, a_off, lda, wflat, b_off, pstride, k4, tile, width, zp, b0, colsum, col0):
    if mrb == 6:
        _micro_s8(path, 6, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)
    elif mrb == 5:
        _micro_s8(path, 5, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)
    elif mrb == 4:
        _micro_s8(path, 4, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)
    elif mrb == 3:
        _micro_s8(path, 3, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)
    elif mrb == 2:
        _micro_s8(path, 2, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)
    else:
        _micro_s8(path, 1, aq, a_off, lda, wflat, b_off, pstride, k4, tile, 0, width, zp, b0, colsum, col0)


@helper
def _scale_tile(tile, width, mrb, b0, col0, ncol, sa, ws, bias, out, raw):
    """tile (exact int32 accumulators, zero point already subtracted) -> out[b0:b0+mrb, col0:col0+ncol] =
    (f32(acc) * ws) * sa[r] + bias (bias (N,) always: zeros when the node has none), or into raw (the exact
    accumulators, tests). Used for the blocks the fused-store micro-kernel cannot write: the last rows of a
    range (fewer than MR) and the right-edge panel group (fewer than NP*16 columns)."""
    w = ws[col0:col0 + ncol]
    bb = bias[col0:col0 + ncol]
    for i in range(mrb):
        r = b0 + i
        t = tile[i * width:i * width + ncol]
        if raw.shape[0] != 0:
            raw[r, col0:col0 + ncol] = t
            continue
        s = sa[r]
        o = out[r, col0:col0 + ncol]
        for j in range(ncol):
            o[j] = (np.float32(t[j]) * w[j]) * s + bb[j]


# A kernel of its own, not an inlined helper: `contract` turns the GELU / tanh polynomials into FMAs here (as
# kernels/act_ir.py does in the micro-kernel) without touching the exact int32 -> float32 scaling of the driver.
@kernel(fastmath={"contract"})
def _act_residual(out, residual, act, c0, c1, col_lo, col_hi):
    """out[c0:c1, col_lo:col_hi] = act(out) + residual: the edge blocks the fused-store micro-kernel does not
    write (the last rows of a range, the right-edge panel group)."""
    has_res = residual.shape[0] != 0
    for r in range(c0, c1):
        o = out[r, col_lo:col_hi]
        n = col_hi - col_lo
        if act == ACT_RELU:
            for j in range(n):
                o[j] = relu(o[j])
        elif act == ACT_GELU_ERF:
            for j in range(n):
                o[j] = gelu_erf(o[j])
        elif act == ACT_GELU_TANH:
            for j in range(n):
                o[j] = gelu_tanh(o[j])
        if has_res:
            rs = residual[r, col_lo:col_hi]
            for j in range(n):
                o[j] += rs[j]


# A row chunk's quantised activations and the output rows it writes stay in L2 while every weight panel streams
# past (both well inside a 512 KiB L2). Without the output bound (all 128 rows of a 128 x 1152 QKV output, 590 KB,
# plus the weights in one chunk) the QKV projection took 310 instead of 264 us in a scratch run on Zen 4.
_A_BUDGET = 256 * 1024
_OUT_BUDGET = 192 * 1024


@helper
def _gemm_s8(path, mr, npn, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """Rows r0:r1, panels p0:p1. Loop order: row chunks (A and the chunk's output rows stay in L2) > panel
    groups (NP panels of B, in L1 while every row block of the chunk passes) > row blocks of MR rows. Full
    blocks use the fused-store micro-kernel (int32 accumulators -> scaled float32, activation and residual in
    registers -> out); the others go through an int32 tile, then `_scale_tile` and `_act_residual`."""
    if r1 <= r0 or p1 <= p0:
        return
    lda = aq.shape[1]
    k4 = wp.shape[1]
    pstride = k4 * NR * KG
    wflat = wp.reshape(-1)
    aflat = aq.reshape(-1)
    width = npn * NR
    tile = np.empty(mr * width, dtype=np.int32)
    use_out = raw.shape[0] == 0
    bvec = bias if bias.shape[0] != 0 else np.zeros(n_out, dtype=np.float32)
    col_lo = p0 * NR
    col_hi = min(p1 * NR, n_out)
    if col_hi <= col_lo:
        return
    mc = min(_A_BUDGET // max(lda, 1), _OUT_BUDGET // (4 * (col_hi - col_lo)))
    mc = max(mr, mc - mc % mr)
    ostride = out.strides[0] // 4 if use_out else 0
    use_res = 1 if residual.shape[0] != 0 else 0
    rstride = residual.strides[0] // 4 if use_res else 0
    post = use_out and (act != ACT_NONE or use_res != 0)
    for c0 in range(r0, r1, mc):
        c1 = min(c0 + mc, r1)
        for g0 in range(p0, p1, npn):
            col0 = g0 * NR
            if col0 >= n_out:
                break
            ncol = min(width, n_out - col0)
            fused = use_out and ncol == width
            b_off = g0 * pstride
            nxt0 = col0 + width  # columns of the next panel group: its output lines are prefetched for writing
            nxt1 = min(min(p1, g0 + 2 * npn) * NR, n_out)  # (one line per row, the prefetcher does not follow)
            # the next panel group's weights into L2, spread over this group's row blocks: the first row block of
            # a group otherwise waits on memory for every line of it (the hardware prefetcher does not run ahead
            # of four interleaved panel streams consumed at compute speed)
            pf_off = (g0 + npn) * pstride  # bytes of wflat
            pf_lines = ((min(p1, g0 + 2 * npn) - g0 - npn) * pstride + 63) // 64 if g0 + npn < p1 else 0
            blocks = (c1 - c0 + mr - 1) // mr
            pf_per_block = (pf_lines + blocks - 1) // blocks
            pf_next = 0
            for b0 in range(c0, c1, mr):
                mrb = min(mr, c1 - b0)
                pf_end = min(pf_next + pf_per_block, pf_lines)
                for q in range(pf_next, pf_end):
                    _prefetch_l2(wflat, pf_off + q * 64)
                pf_next = pf_end
                if use_out:
                    for i in range(mrb):
                        for q in range(nxt0, nxt1, 16):
                            _prefetch(out, (b0 + i) * ostride + q, 1)
                if fused and mrb == mr:
                    _micro_s8_f32(path, mr, aflat, b0 * lda, lda, wflat, b_off, pstride, k4, out,
                                  b0 * ostride + col0, ostride, zp, b0, colsum, col0, ws, sa, bvec, act,
                                  residual, b0 * rstride + col0, rstride, use_res)
                else:
                    _micro_rows(path, mrb, aflat, b0 * lda, lda, wflat, b_off, pstride, k4, tile, width, zp, b0,
                                colsum, col0)
                    _scale_tile(tile, width, mrb, b0, col0, ncol, sa, ws, bvec, out, raw)
                    if post:
                        _act_residual(out, residual, act, b0, b0 + mrb, col0, col0 + ncol)


@kernel
def linear_s8_pairs(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """Portable path. See linear_s8."""
    _gemm_s8(1, PAIRS_MR, PAIRS_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def linear_s8_vnni(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """AVX512-VNNI path: call only when vnni_available(). See linear_s8."""
    _gemm_s8(2, VNNI_MR, VNNI_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def linear_s8_sdot(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """AArch64 dotprod path: call only when dotprod_available(). See linear_s8."""
    _gemm_s8(3, SDOT_MR, SDOT_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def widen_rows(aq, a16, r0, r1):
    """a16[r] = aq[r] as int16 for r in [r0, r1) (the AVX2 path multiplies int16 pairs)."""
    for r in range(r0, r1):
        src = aq[r]
        dst = a16[r]
        for j in range(src.shape[0]):
            dst[j] = np.int16(src[j])


@kernel
def linear_s8_avx2(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """AVX2 path: call only when avx2_available(). See linear_s8."""
    a16 = np.empty(aq.shape, dtype=np.int16)
    widen_rows(aq, a16, r0, r1)
    _gemm_s8(4, AVX2_MR, AVX2_NP, a16, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def linear_q_avx2(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1,
                  p0, p1):
    """quantize_rows then the AVX2 path: call only when avx2_available(). See linear_s8."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    linear_s8_avx2(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1)


@kernel
def linear_q_sdot(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1,
                  p0, p1):
    """quantize_rows then the sdot path: call only when dotprod_available(). See linear_s8."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8(3, SDOT_MR, SDOT_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def linear_q_pairs(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """quantize_rows(x, asym, aq, sa, zp, r0, r1) when quant != 0, then the portable path. See linear_s8."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8(1, PAIRS_MR, PAIRS_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@kernel
def linear_q_vnni(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1):
    """quantize_rows then the VNNI path: call only when vnni_available(). See linear_s8."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8(2, VNNI_MR, VNNI_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw,
             r0, r1, p0, p1)


@helper
def _gemm_s8_requant(path, mr, npn, agemm, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2, qscale2,
                     qzero2, aq2, sa2, zp2, r0, r1):
    """Rows r0:r1 of y = act(acc * scales + bias), quantised for the next int8 linear instead of stored: row
    chunks of y (sized by _OUT_BUDGET) go to a float32 scratch that stays in L2, and each finished chunk is
    quantised into aq2 / sa2 / zp2 with the next linear's quantiser (dynamic per row: quantize_row; static:
    quantize_row_static with qscale2 / qzero2; smoothing smooth2 or (0,)). The codes equal those of storing y
    and quantising it afterwards (the same float32 operations); y itself never reaches memory. agemm: the
    quantised activations as the path reads them (u8, or int16 for AVX2)."""
    if r1 <= r0:
        return
    mc = max(mr, _OUT_BUDGET // (4 * n_out))
    mc = mc - mc % mr
    chunk = np.empty((min(mc, r1 - r0), n_out), dtype=np.float32)  # (mc, N) rows of y
    no_res = np.zeros((0, 0), dtype=np.float32)
    no_raw = np.zeros((0, 0), dtype=np.int32)
    ones = np.ones(n_out if smooth2.shape[0] == 0 else 0, dtype=np.float32)  # the smoothing when smooth2 is (0,)
    s_static = qscale2[0] if static2 != 0 else _F1
    inv_static = _F1 / s_static
    z_static = (np.int32(128) if asym2 == 0 else np.int32(qzero2[0])) if static2 != 0 else np.int32(0)
    panels = wp.shape[0]
    for c0 in range(r0, r1, mc):
        c1 = min(c0 + mc, r1)
        _gemm_s8(path, mr, npn, agemm[c0:c1], sa[c0:c1], zp[c0:c1], wp, colsum, ws, n_out, bias, no_res, act, chunk,
                 no_raw, 0, c1 - c0, 0, panels)
        if smooth2.shape[0] != 0:  # two calls, one array type each (see quantize_rows_smooth)
            _requantize_chunk(chunk, c0, c1, smooth2, asym2, static2, s_static, inv_static, z_static, aq2, sa2, zp2)
        else:
            _requantize_chunk(chunk, c0, c1, ones, asym2, static2, s_static, inv_static, z_static, aq2, sa2, zp2)


@helper
def _requantize_chunk(chunk, c0, c1, sm, asym2, static2, s_static, inv_static, z_static, aq2, sa2, zp2):
    """Rows c0:c1 of y (chunk rows 0:c1-c0) quantised as _gemm_s8_requant's consumer quantises them."""
    for r in range(c0, c1):
        if static2 != 0:
            quantize_row_static(chunk[r - c0], sm, asym2, inv_static, z_static, aq2[r])
            sa2[r] = s_static
            zp2[r] = z_static
        else:
            sa2[r], zp2[r] = quantize_row(chunk[r - c0], sm, asym2, aq2[r])


@kernel
def linear_requant_pairs(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                         qscale2, qzero2, aq2, sa2, zp2, r0, r1):
    """Portable path. See linear_requant."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8_requant(1, PAIRS_MR, PAIRS_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                     qscale2, qzero2, aq2, sa2, zp2, r0, r1)


@kernel
def linear_requant_vnni(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                        qscale2, qzero2, aq2, sa2, zp2, r0, r1):
    """AVX512-VNNI path: call only when vnni_available(). See linear_requant."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8_requant(2, VNNI_MR, VNNI_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                     qscale2, qzero2, aq2, sa2, zp2, r0, r1)


@kernel
def linear_requant_sdot(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                        qscale2, qzero2, aq2, sa2, zp2, r0, r1):
    """AArch64 dotprod path: call only when dotprod_available(). See linear_requant."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    _gemm_s8_requant(3, SDOT_MR, SDOT_NP, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                     qscale2, qzero2, aq2, sa2, zp2, r0, r1)


@kernel
def linear_requant_avx2(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                        qscale2, qzero2, aq2, sa2, zp2, r0, r1):
    """AVX2 path: call only when avx2_available(). See linear_requant."""
    if quant != 0:
        quantize_rows_smooth(x, asym, smooth, aq, sa, zp, r0, r1)
    a16 = np.empty(aq.shape, dtype=np.int16)
    widen_rows(aq, a16, r0, r1)
    _gemm_s8_requant(4, AVX2_MR, AVX2_NP, a16, sa, zp, wp, colsum, ws, n_out, bias, act, asym2, smooth2, static2,
                     qscale2, qzero2, aq2, sa2, zp2, r0, r1)


def linear_requant(path):
    """The requantising kernel of a path: an int8 linear whose output feeds only another int8 linear.

        kernel(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, act,
               asym2, smooth2, static2, qscale2, qzero2, aq2, sa2, zp2, r0, r1)

    The first line is linear_q's (quant != 0: quantise x's rows r0:r1 into aq / sa / zp first; no residual);
    instead of writing y = act(x W^T + b), rows r0:r1 of y are quantised into aq2 (T, Kp2) u8, sa2 (T,) f32,
    zp2 (T,) int32 as the next linear would quantise them: asym2, smooth2 ((N,) or (0,)), static2 != 0 with
    qscale2 (1,) f32 and qzero2 (1,) int32 for static per-tensor scales (else both unused). All panels of the
    weight are computed (rows are split across threads, never panels). No validation.
    """
    kernels = {PATH_VNNI: (vnni_available, linear_requant_vnni), PATH_SDOT: (dotprod_available, linear_requant_sdot),
               PATH_AVX2: (avx2_available, linear_requant_avx2), PATH_PAIRS: (lambda: True, linear_requant_pairs)}
    if path not in kernels:
        raise ValueError(f"unknown int8 path {path!r}")
    available, k = kernels[path]
    if not available():
        raise RuntimeError(f"the {PATH_NAMES[path]} int8 path is not available on this CPU")
    return k


def linear_s8(path):
    """The kernel of a path:

        kernel(aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1)

    out[r0:r1, panels p0:p1] = act((f32(acc) * ws) * sa[r] + bias) + residual with acc = sum_k aq*w - zp*colsum.
    aq (T, Kp) u8 C-contiguous with Kp = 4*K4 (quantize_rows); sa (T,) f32; zp (T,) int32; wp (P, K4, 64)
    int8 (pack_weight); colsum (P*16,) int32 (column_sums); ws (N,) f32; bias (N,) or (0,); residual
    (T, N) or (0, 0); out (T, N) f32. raw: (0, 0) int32, or (T, N) int32 to receive the exact accumulators
    instead of the float epilogue (out is then untouched). p0, p1 must be multiples of the path's NP
    (or p1 = P). No validation.
    """
    if path == PATH_VNNI:
        if not vnni_available():
            raise RuntimeError("the VNNI int8 path is not available on this CPU")
        return linear_s8_vnni
    if path == PATH_SDOT:
        if not dotprod_available():
            raise RuntimeError("the sdot int8 path is not available on this CPU")
        return linear_s8_sdot
    if path == PATH_AVX2:
        if not avx2_available():
            raise RuntimeError("the AVX2 int8 path is not available on this CPU")
        return linear_s8_avx2
    if path == PATH_PAIRS:
        return linear_s8_pairs
    raise ValueError(f"unknown int8 path {path!r}")


def linear_q(path):
    """The fused kernel of a path (activation quantisation of rows r0:r1, then linear_s8):

        kernel(x, asym, smooth, quant, aq, sa, zp, wp, colsum, ws, n_out, bias, residual, act, out, raw, r0, r1, p0, p1)

    x (T, K) f32 C-contiguous; smooth (K,) f32 or (0,) (quantize_rows_smooth); with quant == 0 aq/sa/zp
    must already hold the quantised rows.
    """
    if path == PATH_VNNI:
        if not vnni_available():
            raise RuntimeError("the VNNI int8 path is not available on this CPU")
        return linear_q_vnni
    if path == PATH_SDOT:
        if not dotprod_available():
            raise RuntimeError("the sdot int8 path is not available on this CPU")
        return linear_q_sdot
    if path == PATH_AVX2:
        if not avx2_available():
            raise RuntimeError("the AVX2 int8 path is not available on this CPU")
        return linear_q_avx2
    if path == PATH_PAIRS:
        return linear_q_pairs
    raise ValueError(f"unknown int8 path {path!r}")


def micro_asm(path: int, cpu: str, triple: str = "aarch64-unknown-linux-gnu", features: str = "", mr: int = 4,
              fused_store: bool = False) -> str:
    """Assembly of one micro-kernel of ``path`` cross-compiled by LLVM for (triple, cpu, features); with
    ``fused_store`` the variant that scales into float32 output, with the activation switch and the residual
    (``_micro_s8_f32``).

    Only compiles (never runs) the IR, so it is safe on any host; tests use it to check which instructions a
    path emits for a given CPU (e.g. no sdot for cortex-a72, sdot for cortex-a76)."""
    _llb.initialize_all_targets()
    _llb.initialize_all_asmprinters()
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    module = ir.Module(name="s8_micro")
    module.triple = triple
    f32p = ir.FloatType().as_pointer()
    a_type = ir.IntType(16) if path in A16_PATHS else i8
    fnty = ir.FunctionType(ir.VoidType(), [a_type.as_pointer(), i8.as_pointer(), f32p if fused_store else i32.as_pointer(),
                                           i32.as_pointer(), i32.as_pointer(), i64, i64, i64, f32p, f32p, f32p,
                                           i64, f32p, i64, i64])
    fn = ir.Function(module, fnty, name="s8_micro")
    a, b, d, zp, cs, lda, pstride, k4, ws, sa, bias, act, res, res_stride, use_res = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = ir.Constant(i64, 0)
    with rational_gelu():  # the table GELU's permutes need AVX-512, which the target CPU may lack
        emit_ptrs(builder, path, mr, path_blocking(path)[1], a, zero, lda, b, zero, pstride, k4, d, zero,
                  ir.Constant(i64, 64), zp, zero, cs, zero,
                  f32_out=(ws, sa, bias, act, res, res_stride, use_res) if fused_store else None)
    builder.ret_void()
    llmod = _llb.parse_assembly(str(module))
    llmod.verify()
    tm = _llb.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
    pm = _llb.ModulePassManager() if hasattr(_llb, "ModulePassManager") else None
    if pm is not None and hasattr(_llb, "PipelineTuningOptions"):
        pb = _llb.PassBuilder(tm, _llb.PipelineTuningOptions(speed_level=3))
        pb.getModulePassManager().run(llmod, pb)
    return tm.emit_assembly(llmod)
