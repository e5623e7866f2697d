"""linear: y = act(x W^T + b) + residual, with a registry of weight formats.

A weight format (fp32 now; int8, lut and lowrank later) is a class registered with
``@register_format(name)``: it checks its tensors at load and computes the fused projection at run
time. The op and the session never look inside a format, so a new format is one new file.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.graph import TOKENS, SEQUENCES, ValueType
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_GELU_TANH, ACT_NONE, ACT_RELU
from edgeformer.ops.base import NO_MATRIX, NO_VECTOR, attr, inputs_count, same_width, weight

ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU_ERF, "gelu_tanh": ACT_GELU_TANH}
FORMATS: dict[str, type] = {}

ROWS_PER_THREAD = 32  # below 2*threads*this many rows, threads split the output panels instead


def register_format(name: str):
    def wrap(cls):
        FORMATS[name] = cls
        cls.format_name = name
        return cls

    return wrap


@register_format("fp32")
class Fp32Weights:
    """Dense float32 weight, pre-packed for kernels/gemm_f32.py, with an optional bias (N,).

    Stored either packed by the converter as ``weight_packed`` (ceil(N/NR), K, NR) with the attribute
    ``out_features`` = N (zero-copy from the file), or plain as ``weight`` (N, K) in PyTorch's
    out x in layout, which is packed here at load (one copy).
    """

    def __init__(self, node, weights):
        from edgeformer.kernels.gemm_f32 import NR, pack_weight

        packed = weight(node, weights, "weight_packed", 3, optional=True)
        if packed is None:
            plain = weight(node, weights, "weight", 2)  # (N, K)
            self.wp = pack_weight(plain)  # (P, K, NR)
            self.wp.setflags(write=False)
            self.out_features = plain.shape[0]
        else:
            self.out_features = attr(node, "out_features", int)
            if packed.shape[2] != NR or packed.shape[0] != -(-self.out_features // NR) or self.out_features < 1:
                raise GraphError(f"node {node.name!r}: weight_packed has shape {list(packed.shape)}, expected "
                                 f"[ceil(out_features / {NR}), in_features, {NR}] with out_features={self.out_features}")
            self.wp = packed
        self.in_features = self.wp.shape[1]
        bias = weight(node, weights, "bias", 1, optional=True)
        if bias is not None:
            same_width(node, "bias", bias.shape[0], self.out_features)
        self.bias = NO_VECTOR if bias is None else bias  # (N,) or (0,)

    def __call__(self, x, residual, act, out, workers):
        from edgeformer.kernels.gemm_f32 import NP, linear_packed_f32

        rows, panels = x.shape[0], self.wp.shape[0]
        args = (x, self.wp, self.out_features, self.bias, residual, act, out)
        if rows >= 2 * workers.threads * ROWS_PER_THREAD or workers.threads == 1 or panels < 2 * NP:
            workers.split(_rows, rows, linear_packed_f32, *args, panels)
        else:
            workers.split(_panels, panels, linear_packed_f32, *args, rows, align=NP)


def _rows(kernel, x, wp, n, bias, residual, act, out, panels, r0, r1):
    kernel(x, wp, n, bias, residual, act, out, r0, r1, 0, panels)


def _panels(kernel, x, wp, n, bias, residual, act, out, rows, p0, p1):
    kernel(x, wp, n, bias, residual, act, out, 0, rows, p0, p1)


class Linear:
    op = "linear"
    gathered_weights = ("tables",)  # lut tables are read at random rows: the session advises MADV_RANDOM

    @staticmethod
    def _format(node):
        name = attr(node, "format", str, "fp32")
        if name not in FORMATS:
            raise GraphError(f"node {node.name!r}: unknown weight format {name!r}; known: {sorted(FORMATS)}")
        return FORMATS[name]

    @classmethod
    def infer(cls, node, in_types, weights):
        inputs_count(node, in_types, 1, 2)
        attr(node, "activation", str, "none", ACTIVATIONS)
        fmt = cls._format(node)(node, weights)
        if in_types[0].kind not in (TOKENS, SEQUENCES):
            raise GraphError(f"node {node.name!r}: linear input must be a token or sequence value")
        same_width(node, "input", in_types[0].width, fmt.in_features)
        if len(in_types) == 2:
            if in_types[1].kind != in_types[0].kind:
                raise GraphError(f"node {node.name!r}: residual must be the same kind of value as the input")
            same_width(node, "residual", in_types[1].width, fmt.out_features)
        return [ValueType(in_types[0].kind, fmt.out_features)]

    @classmethod
    def bind(cls, node, weights):
        fmt = cls._format(node)(node, weights)
        act = ACTIVATIONS[node.attrs.get("activation", "none")]

        def run(inputs, batch, workers):
            x = inputs[0]
            residual = inputs[1] if len(inputs) == 2 else NO_MATRIX
            out = np.empty((x.shape[0], fmt.out_features), dtype=np.float32)  # (T, N)
            fmt(x, residual, act, out, workers)
            return [out]

        run.format = fmt
        return run
