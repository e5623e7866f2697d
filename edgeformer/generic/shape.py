"""Shape generic ops: Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Concat, Split, Slice, Expand, Tile, Pad,
Shape, Size, ConstantOfShape, Range, Trilu.

Views where NumPy gives them (Reshape, Transpose, Squeeze, Slice, Expand's broadcast view): no op writes into
its inputs. Every output whose size comes from data is checked against the element limit first.
"""
from __future__ import annotations

import math

import numpy as np

from edgeformer.errors import InputError
from edgeformer.generic.base import ANY, INDEX, NUMERIC, as_int_list, check_elements, norm_axes, norm_axis, scalar
from edgeformer.generic.registry import register


def _axes_input_or_attr(spec, index, attr_until):
    """Axes given as an attribute (opset < attr_until) or as input ``index`` (from then on)."""
    if spec.opset < attr_until:
        return spec.ints("axes", None), False
    if "axes" in spec.attributes:
        raise spec.error(f"at opset {spec.opset} axes is an input, not an attribute")
    spec.dtype(index, {"int64"}, optional=True)
    return None, spec.present(index)


# -- Reshape ----------------------------------------------------------------------------------------------------------
def _check_reshape(spec):
    dtype = spec.dtype(0, ANY)
    spec.dtype(1, {"int64"})
    return {"allowzero": spec.flag("allowzero", 0) if spec.opset >= 14 else False}, [dtype]


def reshape_target(in_shape, target, allowzero=False) -> tuple:
    """ONNX Reshape: 0 copies the input dim (unless allowzero), one -1 is inferred."""
    out, infer = [], None
    for i, dim in enumerate(target):
        if dim == -1:
            if infer is not None:
                raise InputError(f"Reshape target {target} has more than one -1")
            infer = i
            out.append(1)
        elif dim == 0 and not allowzero:
            if i >= len(in_shape):
                raise InputError(f"Reshape target {target}: 0 at position {i} but the input has rank {len(in_shape)}")
            out.append(in_shape[i])
        elif dim < 0:
            raise InputError(f"Reshape target {target} has a negative dim {dim}")
        else:
            out.append(dim)
    total = math.prod(in_shape)
    if infer is not None:
        rest = math.prod(out)
        if rest == 0 or total % rest:
            raise InputError(f"cannot reshape {list(in_shape)} into {target}")
        out[infer] = total // rest
    if math.prod(out) != total:
        raise InputError(f"cannot reshape {list(in_shape)} ({total} elements) into {target}")
    return tuple(out)


def _run_reshape(inputs, params):
    x = inputs[0]
    return [x.reshape(reshape_target(x.shape, as_int_list(inputs[1], "Reshape shape"), params["allowzero"]))]


register("Reshape", _check_reshape, _run_reshape, inputs=(2, 2), attributes=("allowzero",))


# -- Transpose, Squeeze, Unsqueeze, Flatten ---------------------------------------------------------------------------
def _check_transpose(spec):
    dtype = spec.dtype(0, ANY)
    perm = spec.ints("perm", None, 0, 63)
    rank = spec.rank(0)
    if perm is not None and (sorted(perm) != list(range(len(perm))) or (rank is not None and len(perm) != rank)):
        raise spec.error(f"perm {perm} is not a permutation of the input's {rank if rank is not None else ''} axes")
    return {"perm": perm}, [dtype]


def _run_transpose(inputs, params):
    x, perm = inputs[0], params["perm"]
    if perm is not None and len(perm) != x.ndim:
        raise InputError(f"perm {perm} does not match the input's rank {x.ndim}")
    return [np.transpose(x, perm)]


register("Transpose", _check_transpose, _run_transpose, attributes=("perm",))


def _check_squeeze(spec):
    dtype = spec.dtype(0, ANY)
    axes, _ = _axes_input_or_attr(spec, 1, 13)
    if axes is not None:
        axes = spec.axes(axes, spec.rank(0))
    return {"axes": axes}, [dtype]


def _run_squeeze(inputs, params):
    x = inputs[0]
    axes = params["axes"]
    if len(inputs) > 1 and inputs[1] is not None:
        axes = as_int_list(inputs[1], "Squeeze axes")
    if axes is None:  # every dim of size 1
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = norm_axes(axes, x.ndim, "Squeeze axes")
    bad = [a for a in axes if x.shape[a] != 1]
    if bad:
        raise InputError(f"Squeeze axes {bad} of shape {list(x.shape)} are not 1")
    return [x.reshape([d for i, d in enumerate(x.shape) if i not in axes])]


register("Squeeze", _check_squeeze, _run_squeeze, inputs=(1, 2), attributes=("axes",))


def _check_unsqueeze(spec):
    dtype = spec.dtype(0, ANY)
    axes, has_input = _axes_input_or_attr(spec, 1, 13)
    if axes is None and not has_input:
        raise spec.error("needs axes")
    if axes is not None:
        rank = spec.rank(0)
        axes = spec.axes(axes, None if rank is None else rank + len(axes))
    return {"axes": axes}, [dtype]


def _run_unsqueeze(inputs, params):
    x = inputs[0]
    axes = params["axes"] if params["axes"] is not None else as_int_list(inputs[1], "Unsqueeze axes")
    rank = x.ndim + len(axes)
    axes = set(norm_axes(axes, rank, "Unsqueeze axes"))
    dims = iter(x.shape)
    return [x.reshape([1 if i in axes else next(dims) for i in range(rank)])]


register("Unsqueeze", _check_unsqueeze, _run_unsqueeze, inputs=(1, 2), attributes=("axes",))


def _check_flatten(spec):
    dtype = spec.dtype(0, ANY)
    return {"axis": spec.axis(spec.int("axis", 1), spec.rank(0), inclusive=True)}, [dtype]


def _run_flatten(inputs, params):
    x = inputs[0]
    axis = norm_axis(params["axis"], x.ndim, "Flatten axis", inclusive=True)
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


register("Flatten", _check_flatten, _run_flatten, attributes=("axis",))


# -- Concat, Split ----------------------------------------------------------------------------------------------------
def _check_concat(spec):
    for i in range(len(spec.dtypes)):
        spec.dtype(i, ANY)
    dtype = spec.same(*range(len(spec.dtypes)))
    return {"axis": spec.axis(spec.int("axis"), spec.rank(0))}, [dtype]


def _run_concat(inputs, params):
    first = inputs[0]
    axis = norm_axis(params["axis"], first.ndim, "Concat axis")
    for x in inputs[1:]:
        if x.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape)) if i != axis):
            raise InputError(f"Concat inputs {[list(v.shape) for v in inputs]} differ outside axis {axis}")
    # one value may be listed many times: the output is bounded like any other
    check_elements(first.shape[:axis] + (sum(x.shape[axis] for x in inputs),) + first.shape[axis + 1:],
                   "Concat output")
    return [np.concatenate(inputs, axis=axis)]


register("Concat", _check_concat, _run_concat, inputs=(1, 1024), attributes=("axis",))


def _check_split(spec):
    dtype = spec.dtype(0, ANY)
    split = None
    if spec.opset < 13:
        split = spec.ints("split", None, 0)
    else:
        if "split" in spec.attributes:
            raise spec.error(f"at opset {spec.opset} split is an input, not an attribute")
        spec.dtype(1, {"int64"}, optional=True)
    num = None
    if spec.opset >= 18:
        num = spec.int("num_outputs", None, 1)
        if num is not None and num != spec.n_outputs:
            raise spec.error(f"num_outputs {num} but the node has {spec.n_outputs} outputs")
        if num is not None and spec.present(1):
            raise spec.error("give either the split input or num_outputs, not both")
    if split is not None and len(split) != spec.n_outputs:
        raise spec.error(f"split {split} has {len(split)} parts but the node has {spec.n_outputs} outputs")
    axis = spec.axis(spec.int("axis", 0), spec.rank(0))
    return {"axis": axis, "split": split, "n": spec.n_outputs, "uneven": num is not None}, [dtype] * spec.n_outputs


def _run_split(inputs, params):
    x = inputs[0]
    axis = norm_axis(params["axis"], x.ndim, "Split axis")
    dim, n = x.shape[axis], params["n"]
    split = params["split"]
    if len(inputs) > 1 and inputs[1] is not None:
        split = as_int_list(inputs[1], "Split split")
    if split is None:
        if params["uneven"]:  # opset 18 num_outputs: chunks of ceil(dim / n), the last one smaller
            chunk = -(-dim // n)
            split = [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
        elif dim % n:
            raise InputError(f"Split: axis {axis} of size {dim} does not split evenly into {n} outputs")
        else:
            split = [dim // n] * n
    if len(split) != n or any(s < 0 for s in split) or sum(split) != dim:
        raise InputError(f"Split sizes {split} do not partition axis {axis} of size {dim} into {n} outputs")
    bounds = np.cumsum([0] + split)
    index = [slice(None)] * x.ndim
    outs = []
    for i in range(n):
        index[axis] = slice(int(bounds[i]), int(bounds[i + 1]))
        outs.append(x[tuple(index)])
    return outs


register("Split", _check_split, _run_split, inputs=(1, 2), outputs=(1, 1024),
         attributes=("axis", "split", "num_outputs"))


# -- Slice --------------------------------------------------------------------------------------------------------------
def _check_slice(spec):
    dtype = spec.dtype(0, ANY)
    for i in range(1, 5):
        spec.dtype(i, INDEX, optional=i >= 3)
    return {}, [dtype]


def slice_index(shape, starts, ends, axes, steps) -> tuple:
    """ONNX Slice -> a tuple of Python slices. Starts/ends are clamped to [0, dim] (step > 0) or
    [0, dim-1] / [-1, dim-1] (step < 0), after adding dim to negative values."""
    rank = len(shape)
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise InputError(f"Slice starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
    axes = norm_axes(axes, rank, "Slice axes")
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = shape[axis]
        if step == 0:
            raise InputError("Slice step 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(start, None if end < 0 else end, step)
    return tuple(index)


def _run_slice(inputs, params):
    x = inputs[0]
    get = lambda i, what: as_int_list(inputs[i], what) if len(inputs) > i and inputs[i] is not None else None  # noqa
    return [x[slice_index(x.shape, get(1, "starts"), get(2, "ends"), get(3, "axes"), get(4, "steps"))]]


register("Slice", _check_slice, _run_slice, inputs=(3, 5))


# -- Expand, Tile, Pad --------------------------------------------------------------------------------------------------
def _check_expand(spec):
    dtype = spec.dtype(0, ANY)
    spec.dtype(1, {"int64"})
    return {}, [dtype]


def _run_expand(inputs, params):
    x, shape = inputs[0], as_int_list(inputs[1], "Expand shape")
    if any(d < 0 for d in shape):
        raise InputError(f"Expand shape {shape} has a negative dim")
    try:
        out = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise InputError(f"Expand: input {list(x.shape)} does not broadcast to {shape}") from None
    check_elements(out, "Expand output")
    return [np.broadcast_to(x, out)]  # a read-only view; consumers never write


register("Expand", _check_expand, _run_expand, inputs=(2, 2))


def _check_tile(spec):
    dtype = spec.dtype(0, ANY)
    spec.dtype(1, {"int64"})
    return {}, [dtype]


def _run_tile(inputs, params):
    x, reps = inputs[0], as_int_list(inputs[1], "Tile repeats")
    if len(reps) != x.ndim or any(r < 0 for r in reps):
        raise InputError(f"Tile repeats {reps} must be {x.ndim} non-negative values")
    check_elements([d * r for d, r in zip(x.shape, reps)], "Tile output")
    return [np.tile(x, reps)]


register("Tile", _check_tile, _run_tile, inputs=(2, 2))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _check_pad(spec):
    dtype = spec.dtype(0, ANY)
    mode = spec.string("mode", "constant", {"constant", "reflect", "edge"} | ({"wrap"} if spec.opset >= 19 else set()))
    spec.dtype(1, {"int64"})
    if spec.present(2) and spec.dtype(2, ANY) != dtype:
        raise spec.error("constant_value must have the input's dtype")
    if spec.opset >= 18:
        spec.dtype(3, INDEX, optional=True)
    elif len(spec.dtypes) > 3:
        raise spec.error("the axes input needs opset 18")
    return {"mode": mode}, [dtype]


def _run_pad(inputs, params):
    x, pads = inputs[0], as_int_list(inputs[1], "Pad pads")
    value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    axes = as_int_list(inputs[3], "Pad axes") if len(inputs) > 3 and inputs[3] is not None else list(range(x.ndim))
    axes = norm_axes(axes, x.ndim, "Pad axes")
    if len(pads) != 2 * len(axes):
        raise InputError(f"Pad pads {pads} must have 2 x {len(axes)} values")
    before, after = [0] * x.ndim, [0] * x.ndim
    for i, axis in enumerate(axes):  # pads = [x1_begin, x2_begin, ..., x1_end, x2_end, ...]
        before[axis], after[axis] = pads[i], pads[i + len(axes)]
    out_shape = [d + b + a for d, b, a in zip(x.shape, before, after)]
    if any(d < 0 for d in out_shape):
        raise InputError(f"Pad pads {pads} crop more than the input shape {list(x.shape)}")
    check_elements(out_shape, "Pad output")
    # negative pads crop first, then positive pads are added
    crop = tuple(slice(max(-b, 0), d - max(-a, 0)) for d, b, a in zip(x.shape, before, after))
    x = x[crop]
    widths = [(max(b, 0), max(a, 0)) for b, a in zip(before, after)]
    mode = params["mode"]
    if mode == "constant":
        fill = x.dtype.type(0) if value is None else x.dtype.type(scalar(value, "Pad constant_value"))
        return [np.pad(x, widths, mode="constant", constant_values=fill)]
    if any((w[0] or w[1]) and d == 0 for w, d in zip(widths, x.shape)):
        raise InputError(f"Pad mode {mode!r} cannot pad an empty axis")
    if mode == "reflect" and any(max(w) > d - 1 for w, d in zip(widths, x.shape) if w[0] or w[1]):
        raise InputError(f"Pad mode 'reflect' needs pads smaller than the axis size (shape {list(x.shape)})")
    return [np.pad(x, widths, mode=_PAD_MODES[mode])]


register("Pad", _check_pad, _run_pad, inputs=(2, 4), attributes=("mode",))


# -- Shape, Size, ConstantOfShape, Range, Trilu -------------------------------------------------------------------------
def _check_shape(spec):
    spec.dtype(0, ANY)
    start, end = (spec.int("start", 0), spec.int("end", None)) if spec.opset >= 15 else (0, None)
    return {"start": start, "end": end}, ["int64"]


def _run_shape(inputs, params):
    shape = inputs[0].shape
    rank = len(shape)
    start, end = params["start"], rank if params["end"] is None else params["end"]
    start = min(max(start + rank if start < 0 else start, 0), rank)  # clamped, as the spec says
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return [np.array(shape[start:end], dtype=np.int64)]


register("Shape", _check_shape, _run_shape, attributes=("start", "end"))


def _check_size(spec):
    spec.dtype(0, ANY)
    return {}, ["int64"]


register("Size", _check_size, lambda inputs, params: [np.array(inputs[0].size, dtype=np.int64)])


def _check_constant_of_shape(spec):
    spec.dtype(0, {"int64"})
    value = spec.tensor("value", None)
    if value is None:
        value = np.zeros(1, dtype=np.float32)
    if value.size != 1:
        raise spec.error("attribute 'value' must hold one element")
    return {"value": value.reshape(())}, [value.dtype.name]


def _run_constant_of_shape(inputs, params):
    shape = as_int_list(inputs[0], "ConstantOfShape shape")
    check_elements(shape, "ConstantOfShape output")
    return [np.full(shape, params["value"], dtype=params["value"].dtype)]


register("ConstantOfShape", _check_constant_of_shape, _run_constant_of_shape, attributes=("value",))


def _check_range(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.int("stash_type", 1)  # opset 27: the float16 / bfloat16 accumulation type; no effect on our dtypes
    spec.dtype(1, NUMERIC)
    spec.dtype(2, NUMERIC)
    return {}, [spec.same(0, 1, 2)]


def _run_range(inputs, params):
    start, limit, delta = (scalar(v, name) for v, name in zip(inputs, ("start", "limit", "delta")))
    dtype = inputs[0].dtype
    if delta == 0:
        raise InputError("Range delta is 0")
    if dtype.kind == "f":
        if not all(math.isfinite(float(v)) for v in (start, limit, delta)):
            raise InputError("Range start, limit and delta must be finite")
        count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
    else:
        start, limit, delta = int(start), int(limit), int(delta)
        count = max(-(-(limit - start) // delta), 0)  # ceil division on Python ints: no overflow
    check_elements([count], "Range output")
    if dtype.kind == "f":  # output[i] = start + i * delta (the spec's formula), in float32
        return [(start + np.arange(count, dtype=np.float32) * delta).astype(dtype)]
    return [(start + np.arange(count, dtype=np.int64) * delta).astype(dtype)]


register("Range", _check_range, _run_range, inputs=(3, 3), attributes=("stash_type",))


def _check_trilu(spec):
    dtype = spec.dtype(0, ANY)
    spec.dtype(1, {"int64"}, optional=True)
    rank = spec.rank(0)
    if rank is not None and rank < 2:
        raise spec.error(f"needs rank >= 2, got {rank}")
    return {"upper": spec.flag("upper", 1)}, [dtype]


def _run_trilu(inputs, params):
    x = inputs[0]
    if x.ndim < 2:
        raise InputError(f"Trilu needs rank >= 2, got shape {list(x.shape)}")
    k = int(scalar(inputs[1], "Trilu k")) if len(inputs) > 1 and inputs[1] is not None else 0
    k = max(min(k, x.shape[-1] + 1), -x.shape[-2] - 1)  # beyond the matrix: all kept or all zero
    return [np.triu(x, k) if params["upper"] else np.tril(x, k)]


register("Trilu", _check_trilu, _run_trilu, inputs=(1, 2), attributes=("upper",), since=14)

