"""A whole post-LN transformer encoder layer with int8 linears in one Numba call (edgeformer/fusion.py).

    qkv = x Wqkv^T + bqkv                          (T, 3D)   int8 linear, rows quantised per token
    a   = attention(qkv)                           (T, D)    softmax attention, per (sequence, head)
    h   = layer_norm(a Wo^T + bo + x)              (T, D)    int8 linear with the residual in its epilogue
    u   = quantise(act(h Wup^T + bup))             (T, F)    int8 linear handing quantised rows on
    y   = layer_norm(u Wdown^T + bdown + h)        (T, D)    int8 linear on those rows, residual

This is the BERT family's layer (BERT, RoBERTa, MiniLM, DistilBERT, ELECTRA, ...) as the converters write it.
Each line is the same kernel, with the same arguments and row ranges, that the per-node steps call with one
thread, so the result equals the unfused steps' (tests/test_fusion.py): bit for bit up to 128 tokens; beyond,
the float32 attention's reassociable row sums may be vectorised differently once LLVM links that kernel into
the layer (a few ulp). What goes away is the Python between the kernels: per layer seven dispatches,
allocations and dictionary lookups, and the caches and branch predictors the interpreter disturbs between
them. Int8 MiniLM on Zen 4, one thread, `bench/fusion_ab.py` (fused and per-node steps of one file, calls
interleaved per round; bench/results/fusion_ab.md): fused / unfused 1x16 0.893, 1x128 0.976, 8x128 0.882.

One kernel per int8 path (each calls only its own path's kernels, so nothing is compiled for an instruction
set the CPU lacks) and, on AVX512-BF16 CPUs, one with the bf16 attention kernel. A linear's parameters
travel as a tuple (asym, smooth, packed weight, column sums, weight scale, bias, static flag, static scale,
static zero point): see ops/linear_int8.py. Dynamic and static (calibrated per-tensor) activations alike.
"""
from edgeformer.kernels import gemm_s8 as g
from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.attention import attention_softmax
from edgeformer.kernels.attention_bf16 import attention_softmax_bf16
from edgeformer.kernels.norm import layer_norm

import numpy as np


@helper
def _attention_f32(qkv, cu_seqlens, heads, head_dim, scale, causal, out, zero):
    attention_softmax(qkv, cu_seqlens, heads, head_dim, scale, causal, out, zero, (cu_seqlens.shape[0] - 1) * heads)


@helper
def _attention_bf16(qkv, cu_seqlens, heads, head_dim, scale, causal, out, zero):
    attention_softmax_bf16(qkv, cu_seqlens, heads, head_dim, scale, out, zero, (cu_seqlens.shape[0] - 1) * heads)


@helper
def _quantize_static(x, w, aq, sa, zp, zero):
    """x's rows into aq / sa / zp with w's static scale and zero point (w[6] != 0): then quant = 0 follows."""
    g.quantize_rows_static(x, w[0], w[1], w[7], w[8], aq, sa, zp, zero, aq.shape[0])


@helper
def _linear(linear_q, x, quantize, w, aq, sa, zp, residual, act, out, zero):
    """out = act(x W^T + b) + residual over all rows and panels; with quantize != 0 x's rows are quantised
    first (dynamic: inside linear_q; static: quantize_rows_static), else aq / sa / zp hold them."""
    asym, smooth, wp, colsum, scale, bias, static = w[0], w[1], w[2], w[3], w[4], w[5], w[6]
    quant = zero
    if quantize != 0:
        if static != 0:
            _quantize_static(x, w, aq, sa, zp, zero)
        else:
            quant = zero + 1
    no_raw = np.zeros((0, 0), dtype=np.int32)
    linear_q(x, asym, smooth, quant, aq, sa, zp, wp, colsum, scale, scale.shape[0], bias, residual, act, out,
             no_raw, zero, aq.shape[0], zero, wp.shape[0])


@helper
def _rows_for(w, rows):
    """Empty quantised rows for the input of linear w: codes (T, Kp) u8, scales (T,) f32, zero points (T,)."""
    kp = w[2].shape[1] * g.KG
    return (np.empty((rows, kp), dtype=np.uint8), np.empty(rows, dtype=np.float32),
            np.empty(rows, dtype=np.int32))


@helper
def _layer(linear_q, linear_requant, attend, x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1,
           w_up, act, w_down, ln2):
    rows, width = x.shape
    zero = rows - rows  # integer arguments stay run-time values: a literal would compile another specialisation
    one = zero + 1
    no_res = np.zeros((0, 0), dtype=np.float32)
    aq, sa, zp = _rows_for(w_qkv, rows)
    qkv = np.empty((rows, w_qkv[4].shape[0]), dtype=np.float32)  # (T, 3D)
    _linear(linear_q, x, one, w_qkv, aq, sa, zp, no_res, zero, qkv, zero)
    att = np.empty((rows, heads * head_dim), dtype=np.float32)  # (T, D)
    attend(qkv, cu_seqlens, heads, head_dim, scale, causal, att, zero)
    aq, sa, zp = _rows_for(w_out, rows)
    o = np.empty((rows, width), dtype=np.float32)  # (T, D)
    _linear(linear_q, att, one, w_out, aq, sa, zp, x, zero, o, zero)
    h = np.empty((rows, width), dtype=np.float32)  # (T, D)
    layer_norm(o, no_res, ln1[0], ln1[1], ln1[2], h, zero, rows)
    aq, sa, zp = _rows_for(w_up, rows)
    aq2, sa2, zp2 = _rows_for(w_down, rows)  # the up-projection's output, quantised as w_down reads it
    quant = one
    if w_up[6] != 0:
        _quantize_static(h, w_up, aq, sa, zp, zero)
        quant = zero
    linear_requant(h, w_up[0], w_up[1], quant, aq, sa, zp, w_up[2], w_up[3], w_up[4], w_up[4].shape[0], w_up[5], act,
                   w_down[0], w_down[1], w_down[6], w_down[7], w_down[8], aq2, sa2, zp2, zero, rows)
    o2 = np.empty((rows, width), dtype=np.float32)  # (T, D)
    _linear(linear_q, np.empty((0, width), dtype=np.float32), zero, w_down, aq2, sa2, zp2, h, zero, o2, zero)
    y = np.empty((rows, width), dtype=np.float32)  # (T, D)
    layer_norm(o2, no_res, ln2[0], ln2[1], ln2[2], y, zero, rows)
    return y


@kernel
def encoder_layer_vnni_bf16(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1, w_up, act, w_down,
                            ln2):
    """The module's layer on the VNNI path with bf16 attention (AVX512-BF16 CPUs, non-causal only)."""
    return _layer(g.linear_q_vnni, g.linear_requant_vnni, _attention_bf16, x, cu_seqlens, heads, head_dim, scale,
                  causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2)


@kernel
def encoder_layer_vnni(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2):
    return _layer(g.linear_q_vnni, g.linear_requant_vnni, _attention_f32, x, cu_seqlens, heads, head_dim, scale,
                  causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2)


@kernel
def encoder_layer_avx2(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2):
    return _layer(g.linear_q_avx2, g.linear_requant_avx2, _attention_f32, x, cu_seqlens, heads, head_dim, scale,
                  causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2)


@kernel
def encoder_layer_sdot(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2):
    return _layer(g.linear_q_sdot, g.linear_requant_sdot, _attention_f32, x, cu_seqlens, heads, head_dim, scale,
                  causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2)


@kernel
def encoder_layer_pairs(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2):
    return _layer(g.linear_q_pairs, g.linear_requant_pairs, _attention_f32, x, cu_seqlens, heads, head_dim, scale,
                  causal, w_qkv, w_out, ln1, w_up, act, w_down, ln2)


def encoder_layer(path: int, bf16_attention: bool):
    """The fused layer kernel of an int8 path (gemm_s8.PATH_*), with bf16 attention (VNNI only) or float32:

        y = kernel(x, cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, (gamma1, beta1, eps1),
                   w_up, act, w_down, (gamma2, beta2, eps2))

    x (T, D) f32 C-contiguous; cu_seqlens (B+1,) int64; w_* = (asym, smooth, wp, colsum, weight_scale, bias,
    static, qscale, qzero) as ops/linear_int8.Int8Weights holds them (bias and smooth (0,) when absent; the
    last three its quant_params: static != 0 quantises the input with the calibrated (1,) scale and zero
    point, else per token); act the up-projection's activation code. No validation: the fusion pass checks
    the graph."""
    if bf16_attention:
        if path != g.PATH_VNNI:
            raise ValueError("bf16 attention is fused with the VNNI path only")
        return encoder_layer_vnni_bf16
    kernels = {g.PATH_VNNI: encoder_layer_vnni, g.PATH_AVX2: encoder_layer_avx2, g.PATH_SDOT: encoder_layer_sdot,
               g.PATH_PAIRS: encoder_layer_pairs}
    if path not in kernels:
        raise ValueError(f"unknown int8 path {path!r}")
    return kernels[path]
