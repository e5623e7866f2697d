"""Neural-network generic ops: Softmax, LogSoftmax, LayerNormalization, Conv (N-d, groups, pads, strides,
dilations, auto_pad), all float32.

Conv lowers to im2col (a strided window view of the padded input, copied once per group by tensordot) and one
BLAS product per group; the im2col buffer is checked against the element limit like any output.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgeformer.errors import InputError
from edgeformer.generic.base import FLOAT, check_elements, norm_axis
from edgeformer.generic.registry import register


# -- Softmax, LogSoftmax ------------------------------------------------------------------------------------------
def _softmax(x, axis, log):
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (stable for any scale)."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    total = np.sum(e, axis=axis, keepdims=True)
    return shifted - np.log(total) if log else e / total


def _softmax_op(name, log):
    def check(spec):
        dtype = spec.dtype(0, FLOAT)
        legacy = spec.opset < 13  # before 13: the input is coerced to 2-D at axis, softmax over the second dim
        axis = spec.int("axis", 1 if legacy else -1)
        return {"axis": spec.axis(axis, spec.rank(0)), "legacy": legacy}, [dtype]

    def run(inputs, params):
        x = inputs[0]
        if params["legacy"]:
            axis = norm_axis(params["axis"], x.ndim, f"{name} axis")
            flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
            return [_softmax(flat, 1, log).reshape(x.shape)]
        return [_softmax(x, norm_axis(params["axis"], x.ndim, f"{name} axis"), log)]

    register(name, check, run, attributes=("axis",))


_softmax_op("Softmax", False)
_softmax_op("LogSoftmax", True)


# -- LayerNormalization ----------------------------------------------------------------------------------------------
def _check_layer_norm(spec):
    dtype = spec.dtype(0, FLOAT)
    spec.dtype(1, FLOAT)
    spec.dtype(2, FLOAT, optional=True)
    eps = spec.float("epsilon", 1e-5)
    if eps < 0:
        raise spec.error(f"epsilon must be >= 0, got {eps}")
    spec.int("stash_type", 1, 1, 1)  # float32 statistics (the only stash type of float32 inputs)
    return {"axis": spec.axis(spec.int("axis", -1), spec.rank(0)), "eps": eps}, [dtype, "float32", "float32"]


def _run_layer_norm(inputs, params):
    """Normalise over the axes [axis, rank): y = (x - mean) / sqrt(var + eps) * scale + bias (two-pass variance)."""
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = norm_axis(params["axis"], x.ndim, "LayerNormalization axis")
    axes = tuple(range(axis, x.ndim))
    normalized = x.shape[axis:]
    for what, t in (("scale", scale), ("bias", bias)):
        if t is not None and not _fits(t.shape, normalized):
            raise InputError(f"LayerNormalization {what} of shape {list(t.shape)} does not broadcast to the "
                             f"normalised shape {list(normalized)}")
    mean = np.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=axes, keepdims=True)
    inv_std = np.float32(1) / np.sqrt(var + np.float32(params["eps"]))
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


def _fits(shape, target) -> bool:
    """``shape`` broadcasts to exactly ``target``."""
    try:
        return len(shape) <= len(target) and np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


register("LayerNormalization", _check_layer_norm, _run_layer_norm, inputs=(2, 3), outputs=(1, 3),
         attributes=("axis", "epsilon", "stash_type"), since=17)


# -- Conv ----------------------------------------------------------------------------------------------------------------
def _check_conv(spec):
    dtype = spec.dtype(0, FLOAT)
    spec.dtype(1, FLOAT)
    spec.dtype(2, FLOAT, optional=True)
    rank = spec.rank(0)
    if rank is not None and rank < 3:
        raise spec.error(f"Conv input must be (N, C, spatial...), got rank {rank}")
    n = None if rank is None else rank - 2
    kernel = spec.ints("kernel_shape", None, 1, length=n)
    n = n if n is not None else (len(kernel) if kernel is not None else None)
    params = {"kernel": kernel, "group": spec.int("group", 1, 1),
              "auto_pad": spec.string("auto_pad", "NOTSET", {"NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"}),
              "strides": spec.ints("strides", None, 1, length=n),
              "dilations": spec.ints("dilations", None, 1, length=n),
              "pads": spec.ints("pads", None, 0, length=None if n is None else 2 * n)}
    if params["pads"] is not None and len(params["pads"]) % 2:
        raise spec.error(f"pads {params['pads']} must have an even length")
    if params["pads"] is not None and params["auto_pad"] != "NOTSET":
        raise spec.error("pads and auto_pad cannot be used together")
    return params, [dtype]


def conv_geometry(x_shape, w_shape, params):
    """Spatial pads (begin, end), strides, dilations and output dims of an ONNX Conv; InputError if inconsistent."""
    n = len(x_shape) - 2
    if n < 1 or len(w_shape) != n + 2:
        raise InputError(f"Conv input {list(x_shape)} and weight {list(w_shape)} do not match (N, C, spatial...)")
    group = params["group"]
    kernel = list(w_shape[2:])
    if params["kernel"] is not None and list(params["kernel"]) != kernel:
        raise InputError(f"Conv kernel_shape {params['kernel']} differs from the weight's {kernel}")
    if x_shape[1] != w_shape[1] * group or w_shape[0] % group:
        raise InputError(f"Conv with group {group}: input channels {x_shape[1]} and weight {list(w_shape)} disagree")
    strides = params["strides"] or [1] * n
    dilations = params["dilations"] or [1] * n
    pads = params["pads"] or [0] * (2 * n)
    if not len(strides) == len(dilations) == n or len(pads) != 2 * n:
        raise InputError(f"Conv strides/dilations/pads do not match {n} spatial dims")
    begin, end, out = list(pads[:n]), list(pads[n:]), []
    for i in range(n):
        size, eff = x_shape[2 + i], (kernel[i] - 1) * dilations[i] + 1
        if params["auto_pad"] == "VALID":
            begin[i] = end[i] = 0
        elif params["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):  # output = ceil(size / stride)
            total = max((-(-size // strides[i]) - 1) * strides[i] + eff - size, 0)
            small = total // 2
            begin[i], end[i] = (small, total - small) if params["auto_pad"] == "SAME_UPPER" else (total - small, small)
        span = size + begin[i] + end[i] - eff
        if span < 0:
            raise InputError(f"Conv kernel {kernel} (dilated) is larger than the padded input {list(x_shape)}")
        out.append(span // strides[i] + 1)
    return begin, end, strides, dilations, out


def _run_conv(inputs, params):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    begin, end, strides, dilations, out_dims = conv_geometry(x.shape, w.shape, params)
    n, group = len(out_dims), params["group"]
    batch, m = x.shape[0], w.shape[0]
    if bias is not None and bias.shape != (m,):
        raise InputError(f"Conv bias must have shape [{m}], got {list(bias.shape)}")
    check_elements([batch, m] + out_dims, "Conv output")
    kernel = w.shape[2:]
    cg, mg = w.shape[1], m // group
    check_elements([batch, cg] + out_dims + list(kernel), "Conv im2col buffer")
    if any(begin) or any(end):
        check_elements(list(x.shape[:2]) + [d + b + e for d, b, e in zip(x.shape[2:], begin, end)], "Conv padded input")
        x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(x, eff, axis=tuple(range(2, 2 + n)))  # (N, C, L..., eff...)
    win = win[(slice(None), slice(None)) + tuple(slice(None, o * s, s) for o, s in zip(out_dims, strides))
              + tuple(slice(None, None, d) for d in dilations)]  # (N, C, out..., kernel...)
    outs = []
    k_axes = list(range(2 + n, 2 + 2 * n))
    for g in range(group):
        cols = win[:, g * cg:(g + 1) * cg]
        wg = w[g * mg:(g + 1) * mg]  # (Mg, Cg, kernel...)
        y = np.tensordot(cols, wg, axes=([1] + k_axes, [1] + list(range(2, 2 + n))))  # (N, out..., Mg)
        outs.append(np.moveaxis(y, -1, 1))
    y = outs[0] if group == 1 else np.concatenate(outs, axis=1)
    if bias is not None:
        y = y + bias.reshape((1, m) + (1,) * n)
    return [np.ascontiguousarray(y, dtype=np.float32)]


register("Conv", _check_conv, _run_conv, inputs=(2, 3),
         attributes=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
