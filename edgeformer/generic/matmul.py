"""Products: MatMul (NumPy matmul semantics, batch dims broadcast), Gemm, Einsum.

np.matmul on float32 goes to the BLAS that NumPy links (one call per batch of matrices); these ops are where a
generic graph spends its time, see docs/ARCHITECTURE.md "Generic ops".
"""
from __future__ import annotations

import re

import numpy as np

from edgeformer.errors import InputError
from edgeformer.generic.base import NUMERIC, broadcast, check_elements
from edgeformer.generic.registry import register


def matmul_shape(a: tuple, b: tuple) -> tuple:
    """Output shape of np.matmul(a, b) (1-D operands promoted and the added dim removed), checked."""
    if not a or not b:
        raise InputError("MatMul operands must have rank >= 1")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise InputError(f"MatMul shapes {list(a)} and {list(b)} do not match (inner dims {a2[-1]} vs {b2[-2]})")
    batch = broadcast(a2[:-2], b2[:-2], what="MatMul batch")
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    check_elements(out, "MatMul output")
    return out


def _check_matmul(spec):
    spec.dtype(0, NUMERIC)
    spec.dtype(1, NUMERIC)
    for i in (0, 1):
        if spec.rank(i) == 0:
            raise spec.error("MatMul operands must have rank >= 1")
    return {}, [spec.same(0, 1)]


def _run_matmul(inputs, params):
    a, b = inputs
    matmul_shape(a.shape, b.shape)
    return [np.matmul(a, b)]


register("MatMul", _check_matmul, _run_matmul, inputs=(2, 2))


def _check_gemm(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.dtype(1, NUMERIC)
    if spec.present(2):
        spec.dtype(2, NUMERIC)
    spec.same(0, 1, 2)
    for i in (0, 1):
        if spec.rank(i) not in (None, 2):
            raise spec.error(f"input #{i} must be a matrix, got rank {spec.rank(i)}")
    return {"alpha": spec.float("alpha", 1.0), "beta": spec.float("beta", 1.0),
            "trans_a": spec.flag("transA", 0), "trans_b": spec.flag("transB", 0)}, [dtype]


def _run_gemm(inputs, params):
    """Y = alpha A' B' + beta C, C broadcast to (M, N)."""
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if a.ndim != 2 or b.ndim != 2:
        raise InputError(f"Gemm needs matrices, got shapes {list(a.shape)} and {list(b.shape)}")
    a = a.T if params["trans_a"] else a
    b = b.T if params["trans_b"] else b
    out_shape = matmul_shape(a.shape, b.shape)
    y = np.matmul(a, b)
    if params["alpha"] != 1.0:
        y = y * y.dtype.type(params["alpha"])
    if c is not None and params["beta"] != 0.0:
        if not _broadcasts(c.shape, out_shape) or np.broadcast_shapes(c.shape, out_shape) != tuple(out_shape):
            raise InputError(f"Gemm C of shape {list(c.shape)} does not broadcast to {list(out_shape)}")
        y = y + (c if params["beta"] == 1.0 else c * c.dtype.type(params["beta"]))
    return [y.astype(a.dtype, copy=False)]


def _broadcasts(a, b) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


register("Gemm", _check_gemm, _run_gemm, inputs=(2, 3), attributes=("alpha", "beta", "transA", "transB"))


# -- Einsum ------------------------------------------------------------------------------------------------------------
_EQUATION = re.compile(r"^[A-Za-z.,\->\s]*$")


def _parse_einsum(equation: str, n_inputs: int):
    """Operand terms and the output term (None: implicit) of an equation; '...' becomes '.'."""
    eq = equation.replace(" ", "").replace("...", ".")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != n_inputs:
        raise ValueError(f"Einsum equation {equation!r} has {len(terms)} operands, the node has {n_inputs} inputs")
    for term in terms + ([rhs] if arrow else []):
        if "-" in term or ">" in term or term.count(".") > 1 or not all(c.isalpha() or c == "." for c in term):
            raise ValueError(f"malformed Einsum equation {equation!r}")
    if arrow and len(set(rhs)) != len(rhs):
        raise ValueError(f"Einsum output {rhs!r} repeats a label")
    return terms, (rhs if arrow else None)


def einsum_shape(terms, rhs, shapes) -> tuple:
    """Output shape of an Einsum (labels must agree or be 1; '...' dims broadcast), checked."""
    dims, ellipsis = {}, []
    for term, shape in zip(terms, shapes):
        n_labels = len(term) - ("." in term)
        if ("." in term and len(shape) < n_labels) or ("." not in term and len(shape) != n_labels):
            raise InputError(f"Einsum term {term!r} does not fit an operand of shape {list(shape)}")
        split = term.index(".") if "." in term else len(term)
        n_ell = len(shape) - n_labels
        ellipsis.append(tuple(shape[split:split + n_ell]))
        labels = term[:split] + term[split + 1:]
        label_dims = list(shape[:split]) + list(shape[split + n_ell:])
        for label, dim in zip(labels, label_dims):
            if dims.get(label, dim) != dim and 1 not in (dims[label], dim):
                raise InputError(f"Einsum label {label!r} has sizes {dims[label]} and {dim}")
            dims[label] = max(dims.get(label, dim), dim)
    ell = broadcast(*ellipsis, what="Einsum '...' dims") if ellipsis else ()
    if rhs is None:  # implicit output: '...' then the labels seen once, alphabetically
        counts = {}
        for term in terms:
            for c in term.replace(".", ""):
                counts[c] = counts.get(c, 0) + 1
        rhs = "." + "".join(sorted(c for c, n in counts.items() if n == 1))
    out = []
    for c in rhs:
        if c == ".":
            out.extend(ell)
        elif c not in dims:
            raise InputError(f"Einsum output label {c!r} is not in any operand")
        else:
            out.append(dims[c])
    check_elements(out, "Einsum output")
    return tuple(out)


def _check_einsum(spec):
    for i in range(len(spec.dtypes)):
        spec.dtype(i, NUMERIC)
    dtype = spec.same(*range(len(spec.dtypes)))
    equation = spec.string("equation")
    if len(equation) > 256 or not _EQUATION.match(equation):
        raise spec.error(f"malformed Einsum equation {equation!r}")
    try:
        terms, rhs = _parse_einsum(equation, len(spec.dtypes))
    except ValueError as exc:
        raise spec.error(str(exc)) from None
    return {"equation": equation.replace(" ", ""), "terms": terms, "rhs": rhs}, [dtype]


def _run_einsum(inputs, params):
    einsum_shape(params["terms"], params["rhs"], [x.shape for x in inputs])
    path = False  # two operands: NumPy's loop allocates only the output
    if len(inputs) > 2:  # pairwise contractions: the largest intermediate is checked like an output
        path, report = np.einsum_path(params["equation"], *inputs, optimize="greedy")
        largest = next(line for line in report.splitlines() if "Largest intermediate" in line)
        check_elements([int(float(largest.split(":")[1].split()[0]))], "Einsum intermediate")
    out = np.einsum(params["equation"], *inputs, optimize=path)
    return [np.asarray(out, dtype=inputs[0].dtype)]


register("Einsum", _check_einsum, _run_einsum, inputs=(1, 16), attributes=("equation",))
