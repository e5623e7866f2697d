"""MemoryFormer memory layer (and product-quantisation table projections) on plain arrays.

    y = memory_layer(x, tables, bias, num_tables=K, code_length=tau)          # official weights, t = 1

x (..., K*tau) is cut into K chunks of tau values; chunk k is hashed by sign into a tau-bit code (first
element = most significant bit; an exact zero counts as positive with ``zero_bit=1``, the PyTorch path,
or negative with ``zero_bit=0``, the official C++ extension) that selects row k*2^tau + code of
``tables`` (K*2^tau, N). The rows are summed with the weights
    weight_mode="code_l1_times_prob" (official code):  w_k = ||z_k||_1 * prod_j sigmoid(2 |z_kj| / t)
    weight_mode="paper_prob"         (paper):          w_k =             prod_j sigmoid(2 |z_kj| / t)
with temperature t (``temperature``, default 1 as in the official code), then ``bias`` (N,) is added.
Tables may be float32, float16 (or their uint16 bits) or int8 with ``table_scale`` (K*2^tau,) per row;
``compact_tables`` makes the latter two from float tables. Everything is validated (InputError) before a
kernel runs. See docs/LUT.md.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import InputError
from edgeformer.ops.base import NO_MATRIX

__all__ = ["memory_layer", "memory_layer_codes", "pq_projection", "compact_tables"]


def _fail(message):
    raise InputError(message)


def _readonly(a):
    """A read-only view (weights are read-only in a loaded model: one compiled kernel specialisation)."""
    if a is None:
        return None
    view = a.view()
    view.setflags(write=False)
    return view


def _tables_and_dtype(tables, table_scale):
    tables = np.asarray(tables)
    if tables.dtype == np.float16:
        tables = tables.view(np.uint16)
    names = {np.dtype(np.float32): "fp32", np.dtype(np.uint16): "fp16", np.dtype(np.int8): "int8"}
    if tables.dtype not in names:
        _fail(f"tables must be float32, float16 (or its uint16 bits) or int8, got {tables.dtype}")
    scale = None if table_scale is None else np.asarray(table_scale)
    if scale is not None and scale.dtype != np.float32:
        scale = scale.astype(np.float32) if scale.dtype.kind == "f" else scale
    return _readonly(np.ascontiguousarray(tables)), _readonly(scale), names[tables.dtype]


def _as_input(x, in_features):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        _fail(f"x must be a float array, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != in_features:
        _fail(f"x must have shape (..., {in_features}), got {x.shape}")
    return np.ascontiguousarray(x.reshape(-1, in_features), dtype=np.float32), x.shape[:-1]


def _vector(b, what):
    if b is None:
        return None
    b = np.asarray(b)
    if b.dtype.kind != "f":
        _fail(f"{what} must be a float array, got {b.dtype}")
    return _readonly(np.ascontiguousarray(b, dtype=np.float32))


def _run(spec, x, lead, residual, threads):
    from edgeformer.workers import Workers

    res = NO_MATRIX
    if residual is not None:
        res = np.asarray(residual)
        if res.dtype.kind != "f" or res.shape != lead + (spec.out_features,):
            _fail(f"residual must be a float array of shape {lead + (spec.out_features,)}, got {res.dtype} {res.shape}")
        res = np.ascontiguousarray(res.reshape(-1, spec.out_features), dtype=np.float32)
    from edgeformer.kernels.mathfn import ACT_NONE

    out = np.empty((x.shape[0], spec.out_features), dtype=np.float32)  # (T, N)
    workers = Workers(threads)
    try:
        from edgeformer.ops.linear_lut import lut_project

        lut_project(spec, x, res, ACT_NONE, out, workers)
    finally:
        workers.close()
    return out.reshape(lead + (spec.out_features,))


def _check_threads(threads):
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        _fail(f"threads must be a positive integer, got {threads!r}")


def memory_layer(x, tables, bias=None, *, num_tables: int, code_length: int, temperature: float = 1.0,
                 weight_mode: str = "code_l1_times_prob", zero_bit: int = 1, table_scale=None, residual=None,
                 threads: int = 1) -> np.ndarray:
    """MemoryFormer memory layer: (..., num_tables*code_length) -> (..., N) float32 (+ residual if given)."""
    from edgeformer.ops.linear_lut import LutSpec

    _check_threads(threads)
    tables, scale, dtype = _tables_and_dtype(tables, table_scale)
    spec = LutSpec(tables, scale, _vector(bias, "bias"), None, encoder="sign", table_dtype=dtype,
                   num_tables=num_tables, code_length=code_length, temperature=temperature, weight_mode=weight_mode,
                   zero_bit=zero_bit, fail=_fail)
    x2, lead = _as_input(x, spec.in_features)
    return _run(spec, x2, lead, residual, threads)


def memory_layer_codes(x, *, num_tables: int, code_length: int, temperature: float = 1.0,
                       weight_mode: str = "code_l1_times_prob", zero_bit: int = 1):
    """The hashing step alone: (codes (..., K) int32 in [0, 2^tau), weights (..., K) float32)."""
    from edgeformer.kernels.lut import WEIGHT_MODES, lut_hash_sign
    from edgeformer.ops.linear_lut import check_sign_params

    check_sign_params(num_tables, code_length, temperature, weight_mode, zero_bit, _fail)
    x2, lead = _as_input(x, num_tables * code_length)
    codes = np.empty((x2.shape[0], num_tables), np.int32)  # (T, K)
    w = np.empty((x2.shape[0], num_tables), np.float32)  # (T, K)
    lut_hash_sign(x2, num_tables, code_length, int(zero_bit), WEIGHT_MODES[weight_mode], np.float32(1.0 / temperature),
                  codes, w, 0, x2.shape[0])
    return codes.reshape(lead + (num_tables,)), w.reshape(lead + (num_tables,))


def pq_projection(x, centroids, tables, bias=None, *, table_scale=None, residual=None, threads: int = 1) -> np.ndarray:
    """Product-quantisation table projection: chunk k of x (S values) -> nearest of centroids[k] (R, S),
    y = sum_k tables[k*R + code_k] + bias. (..., K*S) -> (..., N) float32."""
    from edgeformer.ops.linear_lut import LutSpec

    _check_threads(threads)
    tables, scale, dtype = _tables_and_dtype(tables, table_scale)
    c = np.asarray(centroids)
    if c.dtype.kind != "f":
        _fail(f"centroids must be a float array, got {c.dtype}")
    c = _readonly(np.ascontiguousarray(c, dtype=np.float32))
    spec = LutSpec(tables, scale, _vector(bias, "bias"), c, encoder="pq", table_dtype=dtype, fail=_fail)
    x2, lead = _as_input(x, spec.in_features)
    return _run(spec, x2, lead, residual, threads)


def compact_tables(tables, table_dtype: str):
    """Float tables (rows, N) -> (stored array, table_scale or None) for table_dtype "fp32", "fp16" (uint16
    bits, round to nearest even) or "int8" (symmetric per row: scale = max|row| / 127, 1 for a zero row)."""
    t = np.asarray(tables, dtype=np.float32)
    if t.ndim != 2 or not np.all(np.isfinite(t)):
        _fail("tables must be a finite 2-D array")
    if table_dtype == "fp32":
        return np.ascontiguousarray(t), None
    if table_dtype == "fp16":
        if np.abs(t).max(initial=0.0) > 65504.0:
            _fail("tables exceed the float16 range (65504)")
        return np.ascontiguousarray(t.astype(np.float16).view(np.uint16)), None
    if table_dtype == "int8":
        amax = np.abs(t).max(axis=1)
        scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8)
        return q, scale
    _fail(f"table_dtype must be 'fp32', 'fp16' or 'int8', got {table_dtype!r}")
