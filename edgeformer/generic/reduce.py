"""Reductions: ReduceMean/Sum/Max/Min/Prod/SumSquare/L2, ArgMax/ArgMin, CumSum, TopK.

Axes are an attribute until the opset where they became an input (13 for ReduceSum, 18 for the others); with no
axes every axis is reduced, unless ``noop_with_empty_axes`` (then the op is the identity). Reductions over an
empty axis give the identity element: 0 for sums, 1 for products, -inf / +inf (the integer extremes) for Max /
Min, NaN for Mean. Integer means are truncated back to the input dtype (as onnx.reference does).
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import InputError
from edgeformer.generic.base import ANY, INDEX, NUMERIC, as_int_list, norm_axes, norm_axis, scalar
from edgeformer.generic.registry import register


def _extreme(dtype, low: bool):
    if dtype.kind == "f":
        return dtype.type(-np.inf if low else np.inf)
    if dtype.kind == "b":
        return not low
    info = np.iinfo(dtype)
    return dtype.type(info.min if low else info.max)


def _max(x, axes, keepdims):
    return np.max(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, True))


def _min(x, axes, keepdims):
    return np.min(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, False))


def _mean(x, axes, keepdims):
    count = 1
    for a in axes:
        count *= x.shape[a]
    total = np.sum(x, axis=axes, keepdims=keepdims, dtype=np.float64 if x.dtype.kind != "f" else x.dtype)
    if count == 0:
        return np.full(total.shape, np.nan, dtype=np.float32) if x.dtype.kind == "f" else total
    if x.dtype.kind != "f":
        return np.trunc(total / count)
    return total / x.dtype.type(count)


_REDUCERS = {  # name: (function(x, axes tuple, keepdims), allowed dtypes, opset where axes became an input)
    "ReduceMean": (_mean, NUMERIC, 18),
    "ReduceSum": (lambda x, a, k: np.sum(x, axis=a, keepdims=k, dtype=x.dtype), NUMERIC, 13),
    "ReduceProd": (lambda x, a, k: np.prod(x, axis=a, keepdims=k, dtype=x.dtype), NUMERIC, 18),
    "ReduceMax": (_max, ANY, 18),
    "ReduceMin": (_min, ANY, 18),
    "ReduceSumSquare": (lambda x, a, k: np.sum(x * x, axis=a, keepdims=k, dtype=x.dtype), NUMERIC, 18),
    "ReduceL2": (lambda x, a, k: np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=a, keepdims=k)), NUMERIC, 18),
}


def _reducer(name, fn, allowed, input_from):
    def check(spec):
        dtype = spec.dtype(0, allowed)
        if dtype == "bool" and spec.opset < 20:
            raise spec.error("bool input needs opset 20")
        axes = None
        if spec.opset < input_from:
            axes = spec.ints("axes", None)
            if len(spec.dtypes) > 1:
                raise spec.error(f"the axes input needs opset {input_from}")
            if axes is not None:
                axes = spec.axes(axes, spec.rank(0))
            noop = False
        else:
            if "axes" in spec.attributes:
                raise spec.error(f"at opset {spec.opset} axes is an input, not an attribute")
            spec.dtype(1, {"int64"}, optional=True)
            noop = spec.flag("noop_with_empty_axes", 0)
        return {"axes": axes, "keepdims": spec.flag("keepdims", 1), "noop": noop}, [dtype]

    def run(inputs, params):
        x = inputs[0]
        axes = params["axes"]
        if len(inputs) > 1 and inputs[1] is not None:
            axes = as_int_list(inputs[1], f"{name} axes")
        if not axes:  # absent or empty: every axis, or none with noop_with_empty_axes (the element-wise part
            axes = () if params["noop"] else range(x.ndim)  # still applies: ReduceSumSquare gives x^2, ReduceL2 |x|)
        axes = tuple(norm_axes(axes, x.ndim, f"{name} axes"))
        return [np.asarray(fn(x, axes, params["keepdims"])).astype(x.dtype, copy=False)]

    attributes = ("keepdims",) + (("axes",) if input_from > 11 else ()) + ("noop_with_empty_axes",)
    register(name, check, run, inputs=(1, 2), attributes=attributes)


for _name, (_fn, _allowed, _from) in _REDUCERS.items():
    _reducer(_name, _fn, _allowed, _from)


# -- ArgMax, ArgMin --------------------------------------------------------------------------------------------------
def _arg(name, largest):
    def check(spec):
        spec.dtype(0, NUMERIC)
        return {"axis": spec.axis(spec.int("axis", 0), spec.rank(0)), "keepdims": spec.flag("keepdims", 1),
                "last": spec.flag("select_last_index", 0)}, ["int64"]

    def run(inputs, params):
        x = inputs[0]
        axis = norm_axis(params["axis"], x.ndim, f"{name} axis")
        if x.shape[axis] == 0:
            raise InputError(f"{name} over an empty axis")
        fn = np.argmax if largest else np.argmin
        if params["last"]:  # the last of equal extremes: search the reversed axis
            flipped = np.flip(x, axis)
            out = x.shape[axis] - 1 - fn(flipped, axis=axis)
        else:
            out = fn(x, axis=axis)
        out = out.astype(np.int64)
        return [np.expand_dims(out, axis) if params["keepdims"] else out]

    register(name, check, run, attributes=("axis", "keepdims", "select_last_index"))


_arg("ArgMax", True)
_arg("ArgMin", False)


# -- CumSum ------------------------------------------------------------------------------------------------------------
def _check_cumsum(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.dtype(1, INDEX)
    return {"exclusive": spec.flag("exclusive", 0), "reverse": spec.flag("reverse", 0)}, [dtype]


def _run_cumsum(inputs, params):
    x = inputs[0]
    axis = norm_axis(int(scalar(inputs[1], "CumSum axis")), x.ndim, "CumSum axis")
    if params["reverse"]:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if params["exclusive"]:  # shift by one: y_i = sum_{j < i} x_j
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis)), np.delete(out, -1, axis=axis)], axis=axis) \
            if x.shape[axis] else out
    if params["reverse"]:
        out = np.flip(out, axis)
    return [np.ascontiguousarray(out)]


register("CumSum", _check_cumsum, _run_cumsum, inputs=(2, 2), attributes=("exclusive", "reverse"))


# -- TopK ----------------------------------------------------------------------------------------------------------------
def _check_topk(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.dtype(1, {"int64"})
    return {"axis": spec.axis(spec.int("axis", -1), spec.rank(0)), "largest": spec.flag("largest", 1),
            "sorted": spec.flag("sorted", 1)}, [dtype, "int64"]


def _run_topk(inputs, params):
    """The k largest (smallest) values along the axis, sorted; equal values in index order (ONNX tie-break)."""
    x = inputs[0]
    axis = norm_axis(params["axis"], x.ndim, "TopK axis")
    k = int(scalar(inputs[1], "TopK K"))
    if not 0 <= k <= x.shape[axis]:
        raise InputError(f"TopK K={k} is outside [0, {x.shape[axis]}]")
    key = x
    if params["largest"]:  # a stable ascending sort of a decreasing key keeps equal values in index order
        key = -x if x.dtype.kind == "f" else np.invert(x)  # ~v = -v - 1: decreasing, no integer overflow
    order = np.argsort(key, axis=axis, kind="stable")
    index = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, index, axis=axis), index.astype(np.int64)]


register("TopK", _check_topk, _run_topk, inputs=(2, 2), outputs=(1, 2), attributes=("axis", "largest", "sorted"))
