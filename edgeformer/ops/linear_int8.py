"""Weight format "int8": symmetric per-output-channel int8 weights, activations quantised per token at
run time (dynamic), int8 x int8 -> int32 GEMM with a fused float epilogue (kernels/gemm_s8.py).

Tensors of a node (written by converters.quantize.int8_linear):
    weight_s8     (P, K4, 64) int8   pre-packed by gemm_s8.pack_weight, values in [-127, 127]
    weight_scale  (N,) float32       per-output-channel scale, finite and > 0: w[n, k] ~ weight_scale[n] * q[n, k]
    bias          (N,) float32       optional
    smooth        (K,) float32       optional, finite and > 0: activations are quantised as x[:, k] * smooth[k]
                                     (SmoothQuant; the converter stored w[:, k] / smooth[k])
    input_scale   (1,) float32       optional: STATIC per-tensor activation quantisation with this calibrated
                                     scale (finite, > 0, 1 / scale finite) instead of per-token scales
    input_zero_point (1,) int32      static asymmetric only (then required): the zero point, in [0, 255]
Attributes: out_features N, in_features K (<= gemm_s8.K_MAX, the int32 accumulation bound),
activation_quant "asymmetric" (default: u8 with a zero point) or "symmetric" (s8, zero point 128 in u8).

Dynamic (no input_scale): every token row gets its own scale (and zero point) from its range at run time
(gemm_s8.quantize_rows_smooth). Static (input_scale present): every row is quantised with the stored scale
and zero point (gemm_s8.quantize_rows_static, values outside the calibrated range clip), then the same GEMM
runs on the quantised rows. Both produce u8 codes and zero points in [0, 255], so the accumulation bound
is the same.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.ops.base import NO_VECTOR, attr, same_width, weight
from edgeformer.ops.linear import ROWS_PER_THREAD, register_format

ACTIVATION_QUANT = {"symmetric": 0, "asymmetric": 1}
_NO_RAW = np.zeros((0, 0), dtype=np.int32)
_NO_RESIDUAL = np.zeros((0, 0), dtype=np.float32)


class QuantizedRows:
    """Token rows quantised for an int8 linear: aq (T, Kp) u8 codes, sa (T,) f32 scales, zp (T,) int32 zero
    points (gemm_s8's activation layout). The value passed from a requantising linear to its consumer
    (edgeformer/fusion.py)."""

    __slots__ = ("aq", "sa", "zp")

    def __init__(self, aq, sa, zp):
        self.aq, self.sa, self.zp = aq, sa, zp

    @classmethod
    def empty(cls, rows: int, kp: int) -> "QuantizedRows":
        return cls(np.empty((rows, kp), dtype=np.uint8), np.empty(rows, dtype=np.float32),
                   np.empty(rows, dtype=np.int32))

    @property
    def rows(self) -> int:
        return self.aq.shape[0]


@register_format("int8")
class Int8Weights:
    def __init__(self, node, weights):
        from edgeformer.kernels import gemm_s8 as g

        self.out_features = attr(node, "out_features", int)
        self.in_features = attr(node, "in_features", int)
        self.asym = ACTIVATION_QUANT[attr(node, "activation_quant", str, "asymmetric", ACTIVATION_QUANT)]
        n, k = self.out_features, self.in_features
        if n < 1 or k < 1:
            raise GraphError(f"node {node.name!r}: int8 linear needs out_features, in_features >= 1, got {n}, {k}")
        if k > g.K_MAX:
            raise GraphError(f"node {node.name!r}: in_features {k} exceeds the int8 accumulation bound K <= {g.K_MAX} "
                             f"(|u8 activation| * |s8 weight| * K must fit int32)")
        wp = weight(node, weights, "weight_s8", 3, dtype=np.int8)
        want = list(g.packed_shape(n, k))
        if list(wp.shape) != want:
            raise GraphError(f"node {node.name!r}: weight_s8 has shape {list(wp.shape)}, expected {want} for "
                             f"out_features={n}, in_features={k} (gemm_s8.pack_weight layout)")
        if not wp.flags.c_contiguous:
            raise GraphError(f"node {node.name!r}: weight_s8 must be C-contiguous")
        if np.any(wp == -128):
            raise GraphError(f"node {node.name!r}: weight_s8 holds -128; int8 weights must lie in [-127, 127]")
        scale = weight(node, weights, "weight_scale", 1)
        same_width(node, "weight_scale", scale.shape[0], n)
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            raise GraphError(f"node {node.name!r}: weight_scale must be finite and > 0")
        bias = weight(node, weights, "bias", 1, optional=True)
        if bias is not None:
            same_width(node, "bias", bias.shape[0], n)
        smooth = weight(node, weights, "smooth", 1, optional=True)
        if smooth is not None:
            same_width(node, "smooth", smooth.shape[0], k)
            if not np.all(np.isfinite(smooth)) or not np.all(smooth > 0):
                raise GraphError(f"node {node.name!r}: smooth must be finite and > 0")
        self.smooth = NO_VECTOR if smooth is None else smooth
        self.static = _static_params(node, weights, self.asym)  # None (dynamic) or ((1,) f32, (1,) int32)
        self.wp = wp
        self.scale = scale
        self.bias = NO_VECTOR if bias is None else bias
        self.colsum = g.column_sums(wp)  # (P*16,) int32, once per weight
        self.colsum.setflags(write=False)
        self.kp = wp.shape[1] * g.KG
        self.path = g.select_path()
        self.mr, self.np_ = g.path_blocking(self.path)
        self.kernel = g.linear_q(self.path)
        self.quantize = g.quantize_rows_smooth
        self.quantize_static = g.quantize_rows_static
        self.groups = -(-self.out_features // (16 * self.np_))  # panel groups holding columns

        self.requant_kernel = g.linear_requant(self.path)
        self.no_x = np.zeros((0, self.in_features), dtype=np.float32)  # the unread x of quant == 0 calls
        # how a producer's requantising epilogue must quantise this linear's input: (static flag, scale, zero
        # point); a dynamic linear's are stand-ins of the same types (one kernel signature)
        self.quant_params = ((1,) + self.static if self.static is not None
                             else (0, np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.int32)))

    def _split_rows(self, rows, workers) -> bool:
        """Split rows across threads (each quantises and multiplies its own rows), else output panels."""
        return rows >= 2 * workers.threads * ROWS_PER_THREAD or workers.threads == 1 or self.groups < 2

    def quantize_input(self, x, workers) -> QuantizedRows:
        """x (T, K) quantised as this linear quantises its input (dynamic per row, or static)."""
        rows = x.shape[0]
        q = QuantizedRows.empty(rows, self.kp)
        if self.static is None:
            workers.split(self.quantize, rows, x, self.asym, self.smooth, q.aq, q.sa, q.zp)
        else:
            workers.split(self.quantize_static, rows, x, self.asym, self.smooth, *self.static, q.aq, q.sa, q.zp)
        return q

    def call_quantized(self, q: QuantizedRows, residual, act, out, workers):
        """The linear on rows already quantised with this linear's quantiser (by the producing linear's
        requantize_call, or quantize_input)."""
        rows, panels = q.rows, self.wp.shape[0]
        if self._split_rows(rows, workers):
            workers.split(_rows_quantized, rows, self.kernel, self.no_x, self.asym, self.smooth, q.aq, q.sa, q.zp,
                          self.wp, self.colsum, self.scale, self.out_features, self.bias, residual, act, out, _NO_RAW,
                          panels)
        else:
            workers.split(_panels, self.groups * self.np_, self.kernel, self.no_x, self.asym, self.smooth, q.aq, q.sa,
                          q.zp, self.wp, self.colsum, self.scale, self.out_features, self.bias, residual, act, out,
                          _NO_RAW, rows, align=self.np_)

    def requantize_call(self, x, act, workers, consumer) -> QuantizedRows:
        """act(x W^T + b) quantised as `consumer` (the int8 linear that is its only reader) quantises its input;
        the float output is never stored (gemm_s8.linear_requant). With the output panels split across threads
        (few rows), the output is stored and then quantised: the same codes."""
        rows = x.shape[0]
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if not self._split_rows(rows, workers):
            out = np.empty((rows, self.out_features), dtype=np.float32)  # (T, N)
            self(x, _NO_RESIDUAL, act, out, workers)
            return consumer.quantize_input(out, workers)
        own = QuantizedRows.empty(rows, self.kp)
        q2 = QuantizedRows.empty(rows, consumer.kp)
        static2, qscale2, qzero2 = consumer.quant_params
        args = (self.requant_kernel, x, self.asym, self.smooth, own.aq, own.sa, own.zp, self.wp, self.colsum,
                self.scale, self.out_features, self.bias, act, consumer.asym, consumer.smooth, static2, qscale2,
                qzero2, q2.aq, q2.sa, q2.zp)
        if self.static is None:
            workers.split(_requant_rows, rows, *args)
        else:
            workers.split(_static_requant_rows, rows, self.quantize_static, self.static, *args)
        return q2

    def __call__(self, x, residual, act, out, workers):
        rows = x.shape[0]
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        aq = np.empty((rows, self.kp), dtype=np.uint8)
        sa = np.empty(rows, dtype=np.float32)
        zp = np.empty(rows, dtype=np.int32)
        panels = self.wp.shape[0]
        if self.static is not None:
            self._static_call(x, residual, act, out, workers, aq, sa, zp)
            return
        if self._split_rows(rows, workers):
            # each range quantises its own rows, then multiplies them: one kernel call per thread
            workers.split(_rows, rows, self.kernel, x, self.asym, self.smooth, aq, sa, zp, self.wp, self.colsum, self.scale,
                          self.out_features, self.bias, residual, act, out, _NO_RAW, panels)
        else:
            workers.split(self.quantize, rows, x, self.asym, self.smooth, aq, sa, zp)
            workers.split(_panels, self.groups * self.np_, self.kernel, x, self.asym, self.smooth, aq, sa, zp, self.wp,
                          self.colsum, self.scale, self.out_features, self.bias, residual, act, out, _NO_RAW, rows,
                          align=self.np_)

    def _static_call(self, x, residual, act, out, workers, aq, sa, zp):
        rows, panels = x.shape[0], self.wp.shape[0]
        qscale, qzero = self.static
        if self._split_rows(rows, workers):
            # each range quantises its own rows with the stored scale, then multiplies them
            workers.split(_static_rows, rows, self.quantize_static, self.kernel, x, self.asym, self.smooth, qscale,
                          qzero, aq, sa, zp, self.wp, self.colsum, self.scale, self.out_features, self.bias, residual,
                          act, out, _NO_RAW, panels)
        else:
            workers.split(self.quantize_static, rows, x, self.asym, self.smooth, qscale, qzero, aq, sa, zp)
            workers.split(_panels, self.groups * self.np_, self.kernel, x, self.asym, self.smooth, aq, sa, zp, self.wp,
                          self.colsum, self.scale, self.out_features, self.bias, residual, act, out, _NO_RAW, rows,
                          align=self.np_)


def _static_params(node, weights, asym):
    """Validated static activation parameters of a node: None (dynamic), or (scale (1,) f32, zero point (1,)
    int32), fresh writable copies (the kernel keeps one signature whatever the file's arrays are)."""
    scale = weight(node, weights, "input_scale", 1, optional=True)
    zero = weight(node, weights, "input_zero_point", 1, dtype=np.int32, optional=True)
    if scale is None:
        if zero is not None:
            raise GraphError(f"node {node.name!r}: input_zero_point without input_scale")
        return None
    same_width(node, "input_scale", scale.shape[0], 1)
    s = np.float32(scale[0])
    with np.errstate(over="ignore", divide="ignore"):
        inv = np.float32(1) / s
    if not (np.isfinite(s) and s > 0 and np.isfinite(inv)):
        raise GraphError(f"node {node.name!r}: input_scale must be finite and > 0 with a finite reciprocal, got {s!r}")
    if asym:
        if zero is None:
            raise GraphError(f"node {node.name!r}: static asymmetric activation quantization needs input_zero_point")
        same_width(node, "input_zero_point", zero.shape[0], 1)
        if not 0 <= int(zero[0]) <= 255:
            raise GraphError(f"node {node.name!r}: input_zero_point must lie in [0, 255], got {int(zero[0])}")
        z = int(zero[0])
    else:
        if zero is not None:
            raise GraphError(f"node {node.name!r}: input_zero_point is only for activation_quant 'asymmetric' "
                             f"(symmetric codes have zero point 128)")
        z = 128
    return np.array([s], dtype=np.float32), np.array([z], dtype=np.int32)


def _static_rows(quantize, kernel, x, asym, smooth, qscale, qzero, aq, sa, zp, wp, colsum, ws, n, bias, residual, act,
                 out, raw, panels, r0, r1):
    quantize(x, asym, smooth, qscale, qzero, aq, sa, zp, r0, r1)
    kernel(x, asym, smooth, 0, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, r0, r1, 0, panels)


def _rows_quantized(kernel, x, asym, smooth, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, panels, r0,
                    r1):
    kernel(x, asym, smooth, 0, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, r0, r1, 0, panels)


def _requant_rows(kernel, x, asym, smooth, aq, sa, zp, *rest):
    kernel(x, asym, smooth, 1, aq, sa, zp, *rest)


def _static_requant_rows(quantize, static, kernel, x, asym, smooth, aq, sa, zp, *rest):
    quantize(x, asym, smooth, static[0], static[1], aq, sa, zp, rest[-2], rest[-1])
    kernel(x, asym, smooth, 0, aq, sa, zp, *rest)


def _rows(kernel, x, asym, smooth, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, panels, r0, r1):
    kernel(x, asym, smooth, 1, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, r0, r1, 0, panels)


def _panels(kernel, x, asym, smooth, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, rows, p0, p1):
    kernel(x, asym, smooth, 0, aq, sa, zp, wp, colsum, ws, n, bias, residual, act, out, raw, 0, rows, p0, p1)


@register_format("int8_weights")
class Int8StoredWeights:
    """Weight-only int8 ("weights-int8"): the same tensors and attributes as "int8" (the file is as small),
    dequantised once at load (w = weight_scale[n] * q[n, k]) into the fp32 packed layout and run with the
    fp32 kernel. Accuracy: only the weight rounding; speed and RAM: those of fp32."""

    def __init__(self, node, weights):
        from edgeformer.kernels import gemm_s8 as g
        from edgeformer.ops.linear import Fp32Weights

        q = Int8Weights(node, weights)  # the same validation
        w = g.unpack_weight(q.wp, q.out_features, q.in_features).astype(np.float32) * q.scale[:, None]
        if q.smooth.shape[0]:
            w = w * q.smooth[None, :]  # the file holds w / smooth
        plain = {"weight": w}
        if q.bias.shape[0]:
            plain["bias"] = q.bias
        self._fp32 = Fp32Weights(_PlainNode(node), plain)
        self.in_features, self.out_features = q.in_features, q.out_features

    def __call__(self, x, residual, act, out, workers):
        self._fp32(x, residual, act, out, workers)


class _PlainNode:
    def __init__(self, node):
        self.name, self.op, self.attrs = node.name, node.op, {}
