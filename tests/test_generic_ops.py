"""Generic ops (edgeformer/generic/): every op against the ONNX backend node test cases that the onnx package
generates, Hypothesis against onnx.reference (broadcasting, axes, negative indices, clamping), hostile attributes
and shapes, and the graph ops "onnx" / "unpack" / "pack" (edgeformer/ops/generic.py).

The runtime part (hostile inputs, graph ops) needs only NumPy; the oracle tests skip without onnx.
"""
from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import edgeformer
from edgeformer.errors import GraphError, InputError
from edgeformer.format import write_model
from edgeformer.generic import DTYPES, LIMIT_ENV, OPS, max_elements, prepare
from tests.optional import optional_import

onnx = optional_import("onnx")
requires_onnx = pytest.mark.skipif(onnx is None, reason="onnx is not installed (the oracle of these tests)")


# -- the ONNX backend node test cases ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def node_cases() -> dict:
    """op type -> the single-node test cases of onnx.backend.test.case.node whose op we implement."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    by_op: dict = {}
    for case in cases:
        if case.kind == "node" and len(case.model.graph.node) == 1 and case.model.graph.node[0].op_type in OPS:
            by_op.setdefault(case.model.graph.node[0].op_type, []).append(case)
    return by_op


FLOAT_LIKE = ("float64", "float16")  # the converter turns these into float32
# cases we reject on purpose besides dtypes: random training-mode Dropout, Dropout before opset 12 ('ratio' attribute)
EXPECTED_REJECTIONS = {"test_training_dropout", "test_training_dropout_default", "test_training_dropout_mask",
                       "test_training_dropout_default_mask", "test_dropout_random_old"}
# ops whose every node case uses a dtype the runtime lacks (float64, float16, float8...): they run as float32 only
ONLY_AS_FLOAT32 = {"Cast", "CastLike", "Einsum"}


def _array(value):
    """Test data are arrays or TensorProtos (exotic dtypes)."""
    if onnx is not None and isinstance(value, onnx.TensorProto):
        from onnx import numpy_helper

        return numpy_helper.to_array(value)
    return value


def _case_arrays(case, inputs):
    node = case.model.graph.node[0]
    by_name = dict(zip([i.name for i in case.model.graph.input], map(_array, inputs)))
    return node, [by_name.get(name) if name else None for name in node.input]


def _prepare_case(node, arrays, opset, notes=None):
    from converters.onnx_import.generic import onnx_attributes

    attributes = onnx_attributes(node, notes if notes is not None else [])
    dtypes = [None if a is None else np.asarray(a).dtype.name for a in arrays]
    return prepare(node.op_type, attributes, opset=opset, dtypes=dtypes,
                   n_outputs=len([o for o in node.output]), name=node.name or node.op_type)


def run_case(case) -> str:
    """'ran', 'ran as float32' (float64/float16 data converted as the converter does) or 'rejected' (with a clear
    GraphError / InputError); an AssertionError when our result differs from the expected one."""
    from converters.onnx_import.generic import Rejected

    opset = max(i.version for i in case.model.opset_import if i.domain in ("", "ai.onnx"))
    outcome = "ran"
    for inputs, expected in case.data_sets:
        node, arrays = _case_arrays(case, inputs)
        notes = []  # a Cast to float64 / float16 becomes a Cast to float32, as the converter does
        try:
            op = _prepare_case(node, arrays, opset, notes)
            outcome = "ran as float32" if notes else outcome
        except (GraphError, Rejected) as exc:
            message = str(exc)
            if case.name in EXPECTED_REJECTIONS:
                return "rejected"
            # only dtypes may be rejected: float64 / float16 ones run again converted to float32
            assert "dtype" in message or "element type" in message, f"{case.name}: unexpected rejection: {message}"
            if not all(a is None or np.asarray(a).dtype.name in tuple(DTYPES) + FLOAT_LIKE for a in arrays):
                return "rejected"
            arrays = [a if a is None or np.asarray(a).dtype.name in DTYPES else np.asarray(a, np.float32)
                      for a in arrays]
            try:
                op = _prepare_case(node, arrays, opset, notes=[])
            except (GraphError, Rejected) as again:
                assert "dtype" in str(again) or "element type" in str(again), f"{case.name}: {again}"
                return "rejected"
            outcome = "ran as float32"
        try:
            got = op([None if a is None else np.asarray(a) for a in arrays][:len(op.in_dtypes)])
        except InputError as exc:
            assert case.name in EXPECTED_REJECTIONS, f"{case.name}: {exc}"
            return "rejected"
        for ours, want in zip(got, expected):
            want = np.asarray(_array(want))
            assert ours.shape == want.shape, f"{case.name}: shape {ours.shape} != {want.shape}"
            if outcome == "ran":
                assert ours.dtype == want.dtype, f"{case.name}: dtype {ours.dtype} != {want.dtype}"
                rtol, atol = 1e-5, 1e-6
            else:  # the reference computed in float64 / rounded to float16
                rtol, atol = (2e-3, 2e-3) if "float16" in case.name.lower() or want.dtype == np.float16 else (1e-5, 1e-6)
                want = want.astype(ours.dtype) if want.dtype.kind == "f" else want
            np.testing.assert_allclose(ours.astype(np.float64) if ours.dtype != bool else ours,
                                       want.astype(np.float64) if want.dtype != bool else want,
                                       rtol=rtol, atol=atol, err_msg=case.name)
    return outcome


@requires_onnx
@pytest.mark.parametrize("op_type", sorted(OPS))
def test_onnx_backend_node_cases(op_type):
    cases = node_cases().get(op_type, [])
    counts = {"ran": 0, "ran as float32": 0, "rejected": 0}
    for case in cases:
        counts[run_case(case)] += 1
    print(f"{op_type}: {len(cases)} node cases: {counts}")
    assert cases, f"onnx has no node test case for {op_type}"
    if op_type in ONLY_AS_FLOAT32:
        assert counts["ran as float32"] > 0
    else:
        assert counts["ran"] > 0, counts


@requires_onnx
def test_onnx_backend_node_cases_total():
    total = {"ran": 0, "ran as float32": 0, "rejected": 0}
    for cases in node_cases().values():
        for case in cases:
            total[run_case(case)] += 1
    print(f"ONNX backend node cases over {len(node_cases())} op types: {total}")
    assert total["ran"] >= 430 and total["ran as float32"] >= 40


# -- Hypothesis against onnx.reference ---------------------------------------------------------------------------------
def make_onnx_node(op_type, inputs, attrs=None, n_outputs=1):
    from onnx import helper

    names = [f"x{i}" if a is not None else "" for i, a in enumerate(inputs)]
    while names and not names[-1]:
        names.pop()
    return helper.make_node(op_type, names, [f"y{i}" for i in range(n_outputs)], **(attrs or {}))


def reference(op_type, inputs, attrs=None, opset=17, n_outputs=1):
    """One node run by onnx.reference; inputs in ONNX positions (None = omitted)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    node = make_onnx_node(op_type, inputs, attrs, n_outputs)
    names, outs = list(node.input), list(node.output)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs) if n],
        [helper.make_tensor_value_info(o, 0, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return node, ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, inputs) if n})


def ours(node, inputs, opset=17):
    """The same node through edgeformer.generic (attributes translated as the converter does)."""
    op = _prepare_case(node, list(inputs)[:len(node.input)], opset)
    return op(list(inputs)[:len(op.in_dtypes)])


def check_against_reference(op_type, inputs, attrs=None, opset=17, n_outputs=1, rtol=1e-5, atol=1e-6):
    node, want = reference(op_type, inputs, attrs, opset, n_outputs)
    got = ours(node, inputs, opset)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (op_type, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    return got


FINITE = dict(allow_nan=False, allow_infinity=False, width=32)
floats = lambda lo=-4.0, hi=4.0: st.floats(lo, hi, **FINITE)  # noqa: E731


def arrays(shape, dtype=np.float32, elements=None):
    if elements is None:
        elements = floats() if np.dtype(dtype).kind == "f" else st.integers(-50, 50)
    return hnp.arrays(dtype, shape, elements=elements)


@requires_onnx
@settings(max_examples=30)
@given(op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
                           "GreaterOrEqual", "Max", "Min", "Mod"]),
       dtype=st.sampled_from([np.float32, np.int64, np.int32]),
       shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4), data=st.data())
def test_binary_broadcasting(op, dtype, shapes, data):
    a = data.draw(arrays(shapes.input_shapes[0], dtype))
    b = data.draw(arrays(shapes.input_shapes[1], dtype))
    attrs = {}
    if op in ("Div", "Mod"):
        b = np.where(b == 0, 3, b).astype(dtype)
        attrs = {"fmod": 1} if op == "Mod" and dtype == np.float32 else {"fmod": data.draw(st.integers(0, 1))} \
            if op == "Mod" else {}
    if op == "Pow":
        a = np.abs(a) + (np.float32(0.5) if dtype == np.float32 else 1)
        b = (b % 4 if dtype != np.float32 else b).astype(dtype)
    check_against_reference(op, [a.astype(dtype), b], attrs)


@requires_onnx
@settings(max_examples=25)
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=4, max_side=3), data=st.data())
def test_where_and_variadic(shapes, data):
    cond = data.draw(hnp.arrays(np.bool_, shapes.input_shapes[0]))
    x, y = (data.draw(arrays(s)) for s in shapes.input_shapes[1:])
    check_against_reference("Where", [cond, x, y])
    full = data.draw(arrays(shapes.result_shape))  # onnx.reference accumulates in place into the first input
    for op in ("Sum", "Mean", "Max", "Min"):
        check_against_reference(op, [full, cond.astype(np.float32), x, y])


@requires_onnx
@settings(max_examples=30)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_reshape_zero_and_minus_one(shape, data):
    x = data.draw(arrays(shape))
    target = list(data.draw(st.permutations(list(shape))))
    if data.draw(st.booleans()):  # merge two dims
        target = [int(np.prod(target[:2]))] + target[2:] if len(target) > 1 else target
    for i in range(len(target)):  # copy dims in place with 0 where they match the input
        if i < len(shape) and target[i] == shape[i] and data.draw(st.booleans()):
            target[i] = 0
    if target and data.draw(st.booleans()):
        target[data.draw(st.integers(0, len(target) - 1))] = -1
    allowzero = 0 if 0 in shape else data.draw(st.integers(0, 1))
    if allowzero and 0 in target:
        return
    try:
        np.empty(shape).reshape([shape[i] if t == 0 else t for i, t in enumerate(target)])
    except ValueError:
        return
    check_against_reference("Reshape", [x, np.array(target, dtype=np.int64)], {"allowzero": allowzero}, opset=14)


@requires_onnx
@settings(max_examples=25)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=5, max_side=3), data=st.data())
def test_transpose_squeeze_unsqueeze_flatten(shape, data):
    x = data.draw(arrays(shape))
    check_against_reference("Transpose", [x], {"perm": data.draw(st.permutations(range(len(shape))))})
    ones = [i for i, d in enumerate(shape) if d == 1]
    axes = data.draw(st.lists(st.sampled_from(ones), unique=True)) if ones else []
    axes = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    check_against_reference("Squeeze", [x] + ([np.array(axes, np.int64)] if axes else []), opset=13)
    # opset 11 (axes attribute): onnx.reference squeezes the axes one after the other (wrong for several), so
    # NumPy is the oracle
    node = make_onnx_node("Squeeze", [x], {"axes": axes} if axes else {})
    want = np.squeeze(x, axis=tuple(axes) if axes else None)
    np.testing.assert_array_equal(ours(node, [x], opset=11)[0], want)
    rank = len(shape) + data.draw(st.integers(1, 2))
    new = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=rank - len(shape), max_size=rank - len(shape),
                             unique_by=lambda a: a % rank))
    check_against_reference("Unsqueeze", [x, np.array(new, np.int64)], opset=13)
    node = make_onnx_node("Unsqueeze", [x], {"axes": new})
    np.testing.assert_array_equal(ours(node, [x], opset=11)[0], np.expand_dims(x, tuple(new)))
    check_against_reference("Flatten", [x], {"axis": data.draw(st.integers(-len(shape), len(shape)))})


@requires_onnx
@settings(max_examples=40)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), data=st.data())
def test_slice_clamping_and_negative_steps(shape, data):
    x = data.draw(arrays(shape))
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True))
    big = st.sampled_from([2 ** 63 - 1, -2 ** 63, 2 ** 31 - 1, -2 ** 31])
    starts = [data.draw(st.integers(-2 * shape[a] - 1, 2 * shape[a] + 1) | big) for a in axes]
    ends = [data.draw(st.integers(-2 * shape[a] - 1, 2 * shape[a] + 1) | big) for a in axes]
    steps = [data.draw(st.sampled_from([1, 2, 3, -1, -2, -3])) for _ in axes]
    # a start before -dim with a negative step is clamped to 0 by the ONNX spec (and ONNX Runtime) but to "before
    # the first element" by onnx.reference's Python slices; -dim means index 0 for both (test_slice_int_min below)
    starts = [max(s, -shape[a]) if step < 0 else s for s, a, step in zip(starts, axes, steps)]
    signed = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    check_against_reference("Slice", [x, i64(starts), i64(ends), i64(signed), i64(steps)])
    if all(s == 1 for s in steps) and axes == list(range(len(axes))):
        check_against_reference("Slice", [x, i64(starts), i64(ends)])


def test_slice_int_min_with_negative_step_clamps_to_the_first_element():
    """ONNX: starts are clamped to [0, dim-1] and ends to [-1, dim-1] for negative steps, so INT_MIN..INT_MIN
    backwards keeps element 0 (a Python slice would be empty)."""
    x = np.arange(4, dtype=np.float32)
    i64 = lambda v: np.array([v], dtype=np.int64)  # noqa: E731
    assert run_op("Slice", [x, i64(-2 ** 63), i64(-2 ** 63), i64(0), i64(-1)])[0].tolist() == [0.0]
    assert run_op("Slice", [x, i64(2 ** 63 - 1), i64(-2 ** 63), i64(0), i64(-2)])[0].tolist() == [3.0, 1.0]
    assert run_op("Slice", [x, i64(-2 ** 63), i64(2 ** 63 - 1), i64(0), i64(1)])[0].tolist() == [0, 1, 2, 3]


@requires_onnx
@settings(max_examples=40)
@given(op=st.sampled_from(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
                           "ReduceL2"]), opset=st.sampled_from([13, 18]),
       shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), data=st.data())
def test_reductions_axes_keepdims(op, opset, shape, data):
    x = data.draw(arrays(shape, elements=floats(-2, 2)))
    axes = data.draw(st.lists(st.integers(-len(shape), len(shape) - 1), max_size=len(shape),
                              unique_by=lambda a: a % len(shape)))
    keepdims = data.draw(st.integers(0, 1))
    as_input = opset >= 18 or op == "ReduceSum"
    if as_input:
        noop = data.draw(st.integers(0, 1))
        inputs = [x] + ([np.array(axes, np.int64)] if axes or data.draw(st.booleans()) else [])
        check_against_reference(op, inputs, {"keepdims": keepdims, "noop_with_empty_axes": noop}, opset=opset,
                                rtol=1e-5, atol=1e-5)
    else:
        check_against_reference(op, [x], {"keepdims": keepdims, **({"axes": axes} if axes else {})}, opset=opset,
                                rtol=1e-5, atol=1e-5)


@requires_onnx
@settings(max_examples=25)
@given(op=st.sampled_from(["Softmax", "LogSoftmax"]), opset=st.sampled_from([11, 13]),
       shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_softmax_axis(op, opset, shape, data):
    x = data.draw(arrays(shape, elements=floats(-30, 30)))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    if opset >= 13:
        check_against_reference(op, [x], {"axis": axis}, opset=opset, atol=1e-6)
        return
    # before opset 13 the input is coerced to 2-D at axis and normalised over the second dim (onnx.reference
    # implements only the opset-13 meaning, ONNX Runtime the legacy one): a float64 NumPy oracle
    got = ours(make_onnx_node(op, [x], {"axis": axis}), [x], opset=opset)[0]
    a = axis % len(shape)
    flat = x.astype(np.float64).reshape(int(np.prod(shape[:a])), -1)
    logp = flat - flat.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    want = (logp if op == "LogSoftmax" else np.exp(logp)).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@requires_onnx
@settings(max_examples=30)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
       index_shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3), data=st.data())
def test_gather_negative_indices(shape, index_shape, data):
    x = data.draw(arrays(shape))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    idx = data.draw(hnp.arrays(data.draw(st.sampled_from([np.int64, np.int32])), index_shape,
                               elements=st.integers(-n, n - 1)))
    check_against_reference("Gather", [x, idx], {"axis": axis})
    bad = idx.copy().reshape(-1)
    if bad.size:
        bad[0] = data.draw(st.sampled_from([n, -n - 1, 2 ** 31 - 1]))
        with pytest.raises(InputError, match="out of range"):
            ours(make_onnx_node("Gather", [x, idx], {"axis": axis}), [x, bad.reshape(idx.shape)])


@requires_onnx
@settings(max_examples=25)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data())
def test_concat_split_expand_tile(shape, data):
    x = data.draw(arrays(shape))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    y = data.draw(arrays(shape[:axis % len(shape)] + (data.draw(st.integers(0, 3)),) + shape[axis % len(shape) + 1:]))
    check_against_reference("Concat", [x, y, x], {"axis": axis})
    dim = shape[axis]
    parts = data.draw(st.lists(st.integers(0, dim), min_size=1, max_size=3).filter(lambda p: sum(p) <= dim))
    parts[-1] += dim - sum(parts)
    check_against_reference("Split", [x, np.array(parts, np.int64)], {"axis": axis}, opset=13, n_outputs=len(parts))
    n = data.draw(st.integers(1, 4))
    check_against_reference("Split", [x], {"axis": axis, "num_outputs": n}, opset=18, n_outputs=n)
    target = tuple(data.draw(st.sampled_from([d, 1])) for d in shape)
    target = (data.draw(st.integers(1, 3)),) * data.draw(st.integers(0, 1)) + target
    check_against_reference("Expand", [x, np.array(target, np.int64)])
    check_against_reference("Tile", [x, np.array([data.draw(st.integers(0, 2)) for _ in shape], np.int64)])


@requires_onnx
@settings(max_examples=30)
@given(batch=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3),
       m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), vec=st.sampled_from(["", "a", "b", "ab"]),
       data=st.data())
def test_matmul_batch_broadcasting_and_vectors(batch, m, k, n, vec, data):
    a_shape = (k,) if "a" in vec else batch.input_shapes[0] + (m, k)
    b_shape = (k,) if "b" in vec else batch.input_shapes[1] + (k, n)
    dtype = data.draw(st.sampled_from([np.float32, np.int64]))
    check_against_reference("MatMul", [data.draw(arrays(a_shape, dtype)), data.draw(arrays(b_shape, dtype))],
                            rtol=1e-5, atol=1e-5)


@requires_onnx
@settings(max_examples=25)
@given(m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), ta=st.integers(0, 1), tb=st.integers(0, 1),
       c=st.sampled_from(["none", "scalar", "row", "col", "full"]), data=st.data())
def test_gemm_flags(m, k, n, ta, tb, c, data):
    a = data.draw(arrays((k, m) if ta else (m, k)))
    b = data.draw(arrays((n, k) if tb else (k, n)))
    shapes = {"scalar": (), "row": (n,), "col": (m, 1), "full": (m, n)}
    inputs = [a, b] + ([data.draw(arrays(shapes[c]))] if c != "none" else [])
    attrs = {"transA": ta, "transB": tb, "alpha": data.draw(floats(-2, 2)), "beta": data.draw(floats(-2, 2))}
    check_against_reference("Gemm", inputs, attrs, rtol=1e-5, atol=1e-5)


@requires_onnx
@settings(max_examples=30)
@given(src=st.sampled_from([np.float32, np.int64, np.int32, np.bool_]), to=st.sampled_from([1, 6, 7, 9]),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), data=st.data())
def test_cast_between_runtime_dtypes(src, to, shape, data):
    elements = {np.float32: floats(-1000, 1000), np.int64: st.integers(-2 ** 31, 2 ** 31 - 1),
                np.int32: st.integers(-2 ** 31, 2 ** 31 - 1), np.bool_: st.booleans()}[src]
    x = data.draw(hnp.arrays(src, shape, elements=elements))
    check_against_reference("Cast", [x], {"to": to})
    check_against_reference("CastLike", [x, np.zeros(1, dtype={1: np.float32, 6: np.int32, 7: np.int64,
                                                                 9: np.bool_}[to])])


@requires_onnx
@settings(max_examples=30)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), dtype=st.sampled_from([np.float32, np.int64]),
       data=st.data())
def test_cumsum_topk_argmax_with_ties(shape, dtype, data):
    x = data.draw(arrays(shape, dtype, elements=st.integers(-3, 3)))  # small integers: many ties
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_against_reference("CumSum", [x, np.array(axis, np.int64)],
                            {"exclusive": data.draw(st.integers(0, 1)), "reverse": data.draw(st.integers(0, 1))})
    k = data.draw(st.integers(0, shape[axis]))
    check_against_reference("TopK", [x, np.array([k], np.int64)], {"axis": axis, "largest": data.draw(
        st.integers(0, 1))}, n_outputs=2)
    for op in ("ArgMax", "ArgMin"):
        check_against_reference(op, [x], {"axis": axis, "keepdims": data.draw(st.integers(0, 1)),
                                          "select_last_index": data.draw(st.integers(0, 1))})


@requires_onnx
@settings(max_examples=25)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=4),
       mode=st.sampled_from(["constant", "reflect", "edge", "wrap"]), data=st.data())
def test_pad_modes_and_cropping(shape, mode, data):
    x = data.draw(arrays(shape))
    low = -1 if mode == "constant" else 0
    high = 1 if mode == "reflect" else 3
    pads = [data.draw(st.integers(low, high)) for _ in range(2 * len(shape))]
    value = [np.array(data.draw(floats()), np.float32)] if mode == "constant" else []
    # onnx.reference has no negative pads (cropping, which ONNX Runtime implements): pad with the positive part,
    # then crop the negative part from the reference's result
    node, (want,) = reference("Pad", [x, np.array([max(p, 0) for p in pads], np.int64)] + value, {"mode": mode},
                              opset=19)
    n = len(shape)
    want = want[tuple(slice(max(-pads[i], 0), want.shape[i] - max(-pads[i + n], 0)) for i in range(n))]
    got = ours(node, [x, np.array(pads, np.int64)] + value, opset=19)[0]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@requires_onnx
@settings(max_examples=20)
@given(n=st.integers(1, 2), group=st.sampled_from([1, 2]), cpg=st.integers(1, 2), mpg=st.integers(1, 2),
       size=st.tuples(st.integers(3, 7), st.integers(3, 7)), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       pad=st.sampled_from(["none", "explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]), bias=st.booleans(),
       data=st.data())
def test_conv_2d(n, group, cpg, mpg, size, kernel, stride, dilation, pad, bias, data):
    assume(all((k - 1) * d + 1 <= s for k, d, s in zip(kernel, dilation, size)))
    x = data.draw(arrays((n, group * cpg) + size))
    w = data.draw(arrays((group * mpg, cpg) + kernel))
    attrs = {"group": group, "strides": list(stride), "dilations": list(dilation), "kernel_shape": list(kernel)}
    if pad == "explicit":
        attrs["pads"] = [data.draw(st.integers(0, 2)) for _ in range(4)]
    elif pad != "none":
        attrs["auto_pad"] = pad
    if pad.startswith("SAME"):
        attrs.pop("dilations")  # onnx.reference's SAME padding ignores dilations
    inputs = [x, w] + ([data.draw(arrays((group * mpg,)))] if bias else [])
    check_against_reference("Conv", inputs, attrs, rtol=1e-4, atol=1e-4)


@requires_onnx
@pytest.mark.parametrize("equation, shapes", [
    ("ij,jk->ik", [(2, 3), (3, 4)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]), ("ii->i", [(3, 3)]),
    ("ij->", [(2, 3)]), ("...ij,...jk", [(2, 1, 2, 3), (3, 3, 4)]), ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    ("i,j->ij", [(3,), (4,)]), ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]), ("ba", [(2, 3)])])
def test_einsum_equations(equation, shapes):
    rng = np.random.default_rng(0)
    check_against_reference("Einsum", [rng.standard_normal(s).astype(np.float32) for s in shapes],
                            {"equation": equation}, rtol=1e-5, atol=1e-5)


@requires_onnx
@settings(max_examples=25)
@given(start=st.integers(-20, 20), limit=st.integers(-20, 20), delta=st.integers(-5, 5).filter(bool),
       dtype=st.sampled_from([np.int64, np.int32, np.float32]), k=st.integers(-4, 4),
       shape=hnp.array_shapes(min_dims=2, max_dims=3, max_side=4), data=st.data())
def test_range_constant_of_shape_trilu(start, limit, delta, dtype, k, shape, data):
    check_against_reference("Range", [np.array(start, dtype), np.array(limit, dtype), np.array(delta, dtype)])
    from onnx import helper

    value = helper.make_tensor("value", 7, [1], [start])
    check_against_reference("ConstantOfShape", [np.array(shape, np.int64)], {"value": value})
    x = data.draw(arrays(shape))
    check_against_reference("Trilu", [x, np.array(k, np.int64)], {"upper": data.draw(st.integers(0, 1))})


@requires_onnx
@settings(max_examples=20)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), data=st.data())
def test_unary_layer_norm_clip(shape, data):
    x = data.draw(arrays(shape, elements=floats(-3, 3)))
    for op in ("Abs", "Neg", "Exp", "Tanh", "Erf", "Sigmoid", "Relu", "Floor", "Ceil", "Sign", "Sin", "Cos",
               "Softplus", "IsNaN"):
        check_against_reference(op, [x], rtol=2e-6, atol=2e-6)
    check_against_reference("Gelu", [x], {"approximate": data.draw(st.sampled_from(["none", "tanh"]))}, opset=20,
                            rtol=1e-5, atol=1e-6)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    scale = data.draw(arrays(shape[axis % len(shape):]))
    check_against_reference("LayerNormalization", [x, scale, scale * 0.5], {"axis": axis, "epsilon": 1e-3},
                            n_outputs=3, rtol=1e-4, atol=1e-5)
    lo, hi = sorted((data.draw(floats()), data.draw(floats())))
    check_against_reference("Clip", [x, np.array(lo, np.float32), np.array(hi, np.float32)], opset=13)
    check_against_reference("Clip", [x, None, np.array(hi, np.float32)], opset=13)


# -- hostile attributes and shapes: clear errors, no huge allocations -------------------------------------------------
def run_op(op_type, inputs, attributes=None, opset=17, n_outputs=1):
    op = prepare(op_type, attributes or {}, opset=opset,
                 dtypes=[None if a is None else a.dtype.name for a in inputs], n_outputs=n_outputs)
    return op(inputs)


I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
X = np.ones((2, 3), dtype=np.float32)


@pytest.mark.parametrize("op_type, inputs, attributes, message", [
    ("Expand", [np.ones((1, 3), np.float32), I64(2 ** 20, 2 ** 20, 3)], {}, "limit"),
    ("Expand", [X, I64(4, 3)], {}, "does not broadcast"),
    ("ConstantOfShape", [I64(2 ** 40)], {}, "limit"),
    ("ConstantOfShape", [I64(4, -1)], {}, "negative"),
    ("Range", [np.array(0, np.int64), np.array(2 ** 60, np.int64), np.array(1, np.int64)], {}, "limit"),
    ("Range", [np.array(0.0, np.float32), np.array(np.inf, np.float32), np.array(1.0, np.float32)], {}, "finite"),
    ("Range", [np.array(0, np.int64), np.array(5, np.int64), np.array(0, np.int64)], {}, "delta is 0"),
    ("Tile", [X, I64(2 ** 20, 2 ** 20)], {}, "limit"),
    ("Pad", [X, I64(0, 2 ** 40, 0, 0)], {}, "limit"),
    ("Add", [np.ones((2 ** 15, 1), np.float32), np.ones((1, 2 ** 15), np.float32)], {}, "limit"),
    ("MatMul", [np.ones((2 ** 15, 1), np.float32), np.ones((1, 2 ** 15), np.float32)], {}, "limit"),
    ("Reshape", [X, I64(4, -1)], {}, "cannot reshape"),
    ("Reshape", [X, I64(-1, -1)], {}, "more than one"),
    ("Reshape", [X, I64(2 ** 62, 2 ** 62)], {}, "cannot reshape"),
    ("Gather", [X, I64(0, 2)], {}, "out of range"),
    ("Gather", [X, I64(-3)], {}, "out of range"),
    ("Squeeze", [X, I64(0)], {}, "not 1"),
    ("Unsqueeze", [X, I64(7)], {}, "out of range"),
    ("Transpose", [X], {"perm": [0, 1, 2]}, "rank"),
    ("Slice", [X, I64(0), I64(1), I64(0), I64(0)], {}, "step 0"),
    ("Concat", [X, np.ones((3, 3), np.float32)], {"axis": 1}, "differ"),
    ("Concat", [np.ones((2 ** 20, 1), np.float32)] * 300, {"axis": 1}, "limit"),
    ("Div", [I64(1, 2), I64(0, 1)], {}, "division by zero"),
    ("MatMul", [X, X], {}, "do not match"),
    ("TopK", [X, I64(4)], {}, "outside"),
    ("Split", [X, I64(1, 1)], {"axis": 1}, "partition"),
    ("Einsum", [X, X], {"equation": "ij,jk->ik"}, "label"),
    ("Einsum", [np.ones(2 ** 15, np.float32)] * 3, {"equation": "i,j,k->ij"}, "limit"),
    ("Conv", [np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 3, 3), np.float32)], {}, "larger"),
    ("Conv", [np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 1, 1), np.float32)],
     {"pads": [2 ** 20, 2 ** 20, 0, 0], "strides": [2 ** 30, 1]}, "padded input.*limit"),
    ("ConstantOfShape", [I64(2, 2)], {"value": {"dtype": "float32", "shape": [1], "data": [1.0]}}, None),
])
def test_hostile_data_is_an_input_error(op_type, inputs, attributes, message):
    if message is None:  # a control: this one works
        assert run_op(op_type, inputs, attributes, opset=13)[0].shape == (2, 2)
        return
    with pytest.raises(InputError, match=message):
        run_op(op_type, inputs, attributes, opset=13 if op_type in ("Squeeze", "Unsqueeze", "Split") else 17)


def test_element_limit_env_var(monkeypatch):
    assert max_elements() == 2 ** 28
    monkeypatch.setenv(LIMIT_ENV, "100")
    assert run_op("Expand", [X, I64(10, 2, 3)])[0].shape == (10, 2, 3)
    with pytest.raises(InputError, match=f"limit of 100.*{LIMIT_ENV}"):
        run_op("Expand", [X, I64(20, 2, 3)])
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(InputError, match="not an integer"):
        run_op("Expand", [X, I64(2, 3)])


@pytest.mark.parametrize("op_type, attributes, dtypes, ranks, opset, message", [
    ("Transpose", {"perm": [0, 0]}, ["float32"], [2], 17, "permutation"),
    ("Transpose", {"perm": [1, 0, 2]}, ["float32"], [2], 17, "permutation"),
    ("Softmax", {"axis": 5}, ["float32"], [2], 17, "out of range"),
    ("Concat", {"axis": -4}, ["float32", "float32"], [3, 3], 17, "out of range"),
    ("ReduceMean", {"axes": [0, 0]}, ["float32"], [None], 13, "repeat"),
    ("ReduceMean", {"axes": [1]}, ["float32"], [2], 18, "is an input"),
    ("Squeeze", {"axes": [9]}, ["float32"], [2], 11, "out of range"),
    ("Flatten", {"axis": 4}, ["float32"], [3], 17, "out of range"),
    ("Cast", {"to": 8}, ["float32"], [None], 17, "element type 8"),
    ("Cast", {"to": "float"}, ["float32"], [None], 17, "integer"),
    ("Softmax", {"axis": 1.5}, ["float32"], [None], 17, "integer"),
    ("Softmax", {"axis": True}, ["float32"], [None], 17, "integer"),
    ("Softmax", {"axiz": 1}, ["float32"], [None], 17, "unknown attributes"),
    ("LayerNormalization", {"epsilon": "nan"}, ["float32", "float32"], [None, None], 17, "finite"),
    ("LayerNormalization", {"epsilon": -1.0}, ["float32", "float32"], [None, None], 17, ">= 0"),
    ("Gelu", {"approximate": "fast"}, ["float32"], [None], 20, "one of"),
    ("Gelu", {}, ["float32"], [None], 17, "opset 17 is outside"),
    ("Softmax", {}, ["float32"], [None], 29, "opset 29"),
    ("Softmax", {}, ["float64"], [None], 17, "dtype"),
    ("Softmax", {}, ["int64"], [None], 17, "dtype"),
    ("Add", {}, ["float32", "int64"], [None, None], 17, "share one dtype"),
    ("Add", {}, ["float32"], [None], 17, "takes 2 to 2 inputs"),
    ("Conv", {"pads": [-1, 0, 0, 0]}, ["float32", "float32"], [4, 4], 17, "outside"),
    ("Conv", {"strides": [0, 1]}, ["float32", "float32"], [4, 4], 17, "outside"),
    ("Conv", {"strides": [1, 1, 1]}, ["float32", "float32"], [4, 4], 17, "must have 2 values"),
    ("Conv", {"auto_pad": "SAME", "pads": [0, 0, 0, 0]}, ["float32", "float32"], [4, 4], 17, "one of"),
    ("Einsum", {"equation": "ij,jk->ik;import os"}, ["float32", "float32"], [2, 2], 17, "malformed"),
    ("Einsum", {"equation": "ij->ik->"}, ["float32"], [2], 17, "malformed"),
    ("Split", {"num_outputs": 3}, ["float32"], [2], 18, "num_outputs 3"),
    ("ConstantOfShape", {"value": {"dtype": "float64", "shape": [1], "data": [1.0]}}, ["int64"], [1], 17, "dtype"),
    ("ConstantOfShape", {"value": {"dtype": "float32", "shape": [2], "data": [1.0]}}, ["int64"], [1], 17,
     "2 values"),
    ("ConstantOfShape", {"value": {"dtype": "int32", "shape": [1], "data": [2 ** 40]}}, ["int64"], [1], 17, "int32"),
    ("Pad", {"mode": "wrap"}, ["float32", "int64"], [2, 1], 18, "one of"),
    ("Loop", {}, ["float32"], [None], 17, "no generic op"),
])
def test_bad_attributes_are_graph_errors(op_type, attributes, dtypes, ranks, opset, message):
    with pytest.raises(GraphError, match=message):
        prepare(op_type, attributes, opset=opset, dtypes=dtypes, ranks=ranks)


def test_other_domains_and_output_counts_are_graph_errors():
    with pytest.raises(GraphError, match="domain"):
        prepare("Gelu", {}, opset=17, dtypes=["float32"], domain="com.microsoft")
    with pytest.raises(GraphError, match="outputs"):
        prepare("Relu", {}, opset=17, dtypes=["float32"], n_outputs=2)
    with pytest.raises(GraphError, match="outputs"):
        prepare("Split", {"num_outputs": 2}, opset=18, dtypes=["float32"], n_outputs=2.0)


def test_run_time_dtype_mismatch_is_an_input_error():
    op = prepare("Relu", {}, opset=17, dtypes=["float32"])
    with pytest.raises(InputError, match="float32"):
        op([np.ones(3, dtype=np.float64)])
    with pytest.raises(InputError, match="expected 1 inputs"):
        op([])


# -- the "onnx", "unpack" and "pack" graph ops --------------------------------------------------------------------------
def onnx_node(name, op_type, inputs, outputs, args, attributes=None, weights=None, opset=17, **extra):
    attrs = {"op_type": op_type, "domain": "", "opset": opset, "attributes": attributes or {}, "args": args, **extra}
    return {"op": "onnx", "name": name, "inputs": inputs, "outputs": outputs, "weights": weights or {}, "attrs": attrs}


def write_graph(path, nodes, outputs, tensors=None, inputs=None):
    inputs = inputs if inputs is not None else [
        {"name": "x", "dtype": "float32", "shape": ["batch", 3], "kind": "dense"}]
    graph = {"name": "g", "inputs": inputs, "outputs": [{"name": o} for o in outputs], "nodes": nodes}
    write_model(path, tensors or {}, graph)
    return path


def softmax_scaled(path, **overrides):
    """y = softmax(x * w) with w a model-file tensor, then z = Reshape(y, [-1]) with an inline shape."""
    nodes = [onnx_node("mul", "Mul", ["x"], ["xw"], [{"input": 0, "dtype": "float32"}, {"weight": "const1"}],
                       weights={"const1": "w"}, output_shapes=[["batch", 3]]),
             onnx_node("softmax", "Softmax", ["xw"], ["y"], [{"input": 0, "dtype": "float32"}], {"axis": -1}),
             onnx_node("flat", "Reshape", ["y"], ["z"], [{"input": 0, "dtype": "float32"},
                                                         {"const": {"dtype": "int64", "shape": [1], "data": [-1]}}])]
    for index, changes in overrides.items():
        nodes[int(index[1:])]["attrs"].update(changes)
    return write_graph(path, nodes, ["y", "z"], {"w": np.array([1.0, 2.0, -1.0], np.float32)})


def test_onnx_nodes_run_in_a_model(tmp_path):
    model = edgeformer.load(softmax_scaled(tmp_path / "m.edgeformer"), threads=1)
    x = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]], np.float32)
    out = model.run({"x": x})
    xw = x * np.array([1.0, 2.0, -1.0], np.float32)
    want = np.exp(xw - xw.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(out["y"], want, rtol=1e-6)
    np.testing.assert_allclose(out["z"], want.reshape(-1), rtol=1e-6)
    specs = {s.name: s for s in model.outputs}
    assert specs["y"].dtype == "float32" and specs["z"].shape is None
    with pytest.raises(InputError, match="x must have size 3"):
        model.run({"x": np.ones((2, 4), np.float32)})


@pytest.mark.parametrize("change, message", [
    ({"n0": {"args": [{"input": 1, "dtype": "float32"}, {"weight": "const1"}]}}, "index"),
    ({"n0": {"args": [{"input": 0, "dtype": "int64"}, {"weight": "const1"}]}}, "is float32, the node declares int64"),
    ({"n0": {"args": [{"input": 0, "dtype": "float32"}, {"weight": "other"}]}}, "not among"),
    ({"n0": {"args": [{"input": 0, "dtype": "float32"}]}}, "weights \\['const1'\\] are not used"),
    ({"n1": {"args": []}}, "not used by any arg"),
    ({"n0": {"args": "x"}}, "must be a list"),
    ({"n1": {"args": [{"input": 0, "dtype": "float32", "extra": 1}]}}, "must be null or an object"),
    ({"n2": {"args": [{"input": 0, "dtype": "float32"}, {"const": {"dtype": "int64", "shape": [2], "data": [1]}}]}},
     "2 values"),
    ({"n2": {"args": [{"input": 0, "dtype": "float32"}, {"const": {"dtype": "int64", "shape": [2 ** 40],
                                                                     "data": []}}]}}, "too many"),
    ({"n0": {"output_shapes": [[-1, 3]]}}, "declared output shape"),
    ({"n0": {"output_shapes": [[2, 3], [2, 3]]}}, "must list 1"),
    ({"n1": {"attributes": {"axis": 7}}}, "out of range"),
    ({"n1": {"op_type": "NoSuchOp"}}, "no generic op"),
    ({"n1": {"opset": "17"}}, "opset"),
    ({"n1": {"domain": "com.microsoft"}}, "domain"),
    ({"n1": {"colour": "red"}}, "unknown attrs"),
])
def test_malformed_onnx_nodes_are_graph_errors(tmp_path, change, message):
    path = softmax_scaled(tmp_path / "bad.edgeformer", **change)
    with pytest.raises(GraphError, match=message):
        edgeformer.load(path, threads=1)


def test_declared_shape_is_checked_at_run_time(tmp_path):
    path = softmax_scaled(tmp_path / "m.edgeformer", n1={"output_shapes": [["batch", 4]]})
    model = edgeformer.load(path, threads=1)
    with pytest.raises(InputError, match="declares"):
        model.run({"x": np.ones((2, 3), np.float32)})


def test_run_time_errors_name_the_node(tmp_path):
    nodes = [onnx_node("reshape_it", "Reshape", ["x", "s"], ["y"], [{"input": 0, "dtype": "float32"},
                                                                     {"input": 1, "dtype": "int64"}])]
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 3], "kind": "dense"},
              {"name": "s", "dtype": "int64", "shape": [2], "kind": "dense"}]
    model = edgeformer.load(write_graph(tmp_path / "r.edgeformer", nodes, ["y"], inputs=inputs), threads=1)
    assert model.run({"x": np.ones((2, 3)), "s": I64(3, 2)})["y"].shape == (3, 2)
    with pytest.raises(InputError, match="'reshape_it' \\(Reshape\\).*cannot reshape"):
        model.run({"x": np.ones((2, 3)), "s": I64(4, 2)})


def test_unpack_and_pack_bridge_coarse_and_generic_ops(tmp_path):
    """embedding -> unpack -> generic Tanh -> pack -> pool(mean), and the dense Tanh output itself."""
    rng = np.random.default_rng(0)
    word = rng.standard_normal((20, 4)).astype(np.float32)
    pos = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [{"op": "embedding", "name": "emb", "inputs": ["input_ids"], "outputs": ["e"],
              "weights": {"word": "word", "position": "pos"}, "attrs": {}},
             {"op": "unpack", "name": "unpack", "inputs": ["e"], "outputs": ["dense"], "weights": {}, "attrs": {}},
             onnx_node("tanh", "Tanh", ["dense"], ["t"], [{"input": 0, "dtype": "float32"}],
                       output_shapes=[["batch", "seq", 4]]),
             {"op": "pack", "name": "pack", "inputs": ["t"], "outputs": ["packed"], "weights": {}, "attrs": {}},
             {"op": "pool", "name": "pool", "inputs": ["packed"], "outputs": ["pooled"], "weights": {},
              "attrs": {"mode": "mean"}}]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"], "optional": True}]
    path = write_graph(tmp_path / "mix.edgeformer", nodes, ["t", "pooled"], {"word": word, "pos": pos}, inputs)
    model = edgeformer.load(path, threads=1)
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.int64)
    out = model.run({"input_ids": ids, "attention_mask": mask})
    e = word[ids] + pos[np.arange(3)]
    want_t = np.tanh(e) * mask[..., None]  # padded positions are zeros before Tanh, and tanh(0) = 0
    np.testing.assert_allclose(out["t"], want_t, rtol=1e-6, atol=1e-7)
    want_pool = np.stack([np.tanh(e[0]).mean(0), np.tanh(e[1, :2]).mean(0)])
    np.testing.assert_allclose(out["pooled"], want_pool, rtol=1e-5, atol=1e-6)


def test_pack_checks_its_input(tmp_path):
    nodes = [onnx_node("id", "Identity", ["x"], ["y"], [{"input": 0, "dtype": "float32"}]),
             {"op": "pack", "name": "pack", "inputs": ["y"], "outputs": ["p"], "weights": {}, "attrs": {}}]
    with pytest.raises(GraphError, match="pack to tokens needs"):
        edgeformer.load(write_graph(tmp_path / "p.edgeformer", nodes, ["p"]), threads=1)
    nodes[1]["attrs"] = {"to": "rows"}
    with pytest.raises(GraphError, match="attribute 'to'"):
        edgeformer.load(write_graph(tmp_path / "q.edgeformer", nodes, ["p"]), threads=1)


def test_graph_json_round_trip_of_non_finite_constants(tmp_path):
    nodes = [onnx_node("fill", "Where", ["x"], ["y"],
                       [{"const": {"dtype": "bool", "shape": [3], "data": [True, False, True]}},
                        {"input": 0, "dtype": "float32"},
                        {"const": {"dtype": "float32", "shape": [], "data": ["-inf"]}}])]
    model = edgeformer.load(write_graph(tmp_path / "w.edgeformer", nodes, ["y"]), threads=1)
    y = model.run({"x": np.ones((1, 3), np.float32)})["y"]
    assert y.tolist() == [[1.0, -np.inf, 1.0]]
    assert json.dumps(model.graph.to_json(), allow_nan=False)
