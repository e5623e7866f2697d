"""Weight format "lut": table projections (MemoryFormer memory layer, or product-quantisation tables).

    y = act( sum_k w[t, k] * s[row] * tables[row] + bias ) + residual,   row = k*R + code[t, k]

(kernels/lut.py has the formulas.) Tensors of a node (roles):
    tables       (K*R, N)  float32 | uint16 (float16 bits) | int8, as attribute table_dtype says
    table_scale  (K*R,)    float32, finite and > 0; required with int8 tables, refused otherwise
    bias         (N,)      float32, optional
    centroids    (K, R, S) float32, finite; required with encoder "pq", refused with "sign"
Attributes:
    encoder       "sign" (default, MemoryFormer) | "pq" (nearest centroid, converters/lut_fit.py)
    table_dtype   "fp32" (default) | "fp16" | "int8"
    num_tables    K >= 1 (sign; with pq it must equal centroids.shape[0] if given)
    code_length   tau in [1, 16] (sign): R = 2^tau rows per table, in_features = K*tau
    weight_mode   "code_l1_times_prob" (default, official code: ||z||_1 * prod sigmoid(2|z_j|/t)) |
                  "paper_prob" (prod sigmoid(2|z_j|/t))                                      (sign only)
    temperature   t, finite and > 0 (default 1.0, the official code's value)                  (sign only)
    zero_bit      1 (default: z >= 0 -> bit 1, the PyTorch path) | 0 (z > 0, the C++ extension) (sign only)
Everything is checked at load (shapes, dtypes, finite values: a NaN or inf table entry is refused), so
the kernels, which do not bounds-check, only ever see codes in [0, R). Work is split over the worker
pool by tokens (each range encodes its own rows, then gathers them), or, with fewer tokens than
threads * TOKEN_TILE, by output columns after encoding all rows on the calling thread.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from edgeformer.errors import GraphError
from edgeformer.ops.base import NO_VECTOR, attr, weight
from edgeformer.ops.linear import register_format

TABLE_DTYPES = {"fp32": np.float32, "fp16": np.uint16, "int8": np.int8}
ENCODERS = ("sign", "pq")
MAX_CODE_LENGTH = 16  # 2^16 rows per table; codes are int32
_CHECKED: dict[int, weakref.ref] = {}  # id -> weakref of tables already scanned for non-finite values


def _scan_finite(array, what: str, fail) -> None:
    """Refuse NaN/inf in a float32 or float16-bits array, in row chunks (no temporary of the array's size)."""
    key = id(array)
    ref = _CHECKED.get(key)
    if ref is not None and ref() is array:
        return
    flat = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        block = flat[start:start + step]
        bad = (block & 0x7C00) == 0x7C00 if block.dtype == np.uint16 else ~np.isfinite(block)
        if bad.any():
            fail(f"{what} holds non-finite values (NaN or inf)")
    if len(_CHECKED) > 1024:  # forget arrays that no longer exist
        for stale in [k for k, r in _CHECKED.items() if r() is None]:
            del _CHECKED[stale]
    _CHECKED[key] = weakref.ref(array)


def check_sign_params(num_tables, code_length, temperature, weight_mode, zero_bit, fail) -> None:
    """The sign encoder's parameters (see the module docstring); ``fail(msg)`` raises."""
    from edgeformer.kernels.lut import WEIGHT_MODES

    if not isinstance(num_tables, int) or isinstance(num_tables, bool) or num_tables < 1:
        fail(f"num_tables must be an integer >= 1, got {num_tables!r}")
    if (not isinstance(code_length, int) or isinstance(code_length, bool)
            or not 1 <= code_length <= MAX_CODE_LENGTH):
        fail(f"code_length must be an integer in [1, {MAX_CODE_LENGTH}], got {code_length!r}")
    if weight_mode not in WEIGHT_MODES:
        fail(f"weight_mode must be one of {sorted(WEIGHT_MODES)}, got {weight_mode!r}")
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature)
            or temperature <= 0):
        fail(f"temperature must be finite and > 0, got {temperature!r}")
    if zero_bit not in (0, 1) or isinstance(zero_bit, bool):
        fail(f"zero_bit must be 0 (z > 0 -> 1) or 1 (z >= 0 -> 1), got {zero_bit!r}")


def check_lut(tables, table_scale, bias, centroids, *, encoder, table_dtype, num_tables, code_length, temperature,
              weight_mode, zero_bit, fail):
    """Validate a table projection; return (in_features, out_features, rows_per_table). ``fail(msg)`` raises.

    Shared by the "lut" weight format (GraphError) and edgeformer.functional.memory_layer (InputError)."""
    if encoder not in ENCODERS:
        fail(f"encoder must be one of {list(ENCODERS)}, got {encoder!r}")
    if table_dtype not in TABLE_DTYPES:
        fail(f"table_dtype must be one of {sorted(TABLE_DTYPES)}, got {table_dtype!r}")
    want = np.dtype(TABLE_DTYPES[table_dtype])
    if not isinstance(tables, np.ndarray) or tables.ndim != 2 or tables.dtype != want:
        got = f"{tables.dtype.name} {list(tables.shape)}" if isinstance(tables, np.ndarray) else type(tables).__name__
        fail(f"tables must be a 2-D {want.name} array for table_dtype {table_dtype!r}, got {got}")
    if not tables.flags.c_contiguous:
        fail("tables must be C-contiguous")
    n_out = tables.shape[1]
    if n_out < 1:
        fail("tables must have at least one output column")
    if encoder == "sign":
        if centroids is not None:
            fail("centroids are only used with encoder 'pq'")
        check_sign_params(num_tables, code_length, temperature, weight_mode, zero_bit, fail)
        rows, n_in = 1 << code_length, num_tables * code_length
        if tables.shape[0] != num_tables * rows:
            fail(f"tables have {tables.shape[0]} rows, expected num_tables * 2^code_length = "
                 f"{num_tables} * {rows} = {num_tables * rows}")
    else:
        if not isinstance(centroids, np.ndarray) or centroids.ndim != 3 or centroids.dtype != np.float32:
            fail("encoder 'pq' needs centroids, a (num_tables, rows, sub_dim) float32 array")
        k, rows, sub = centroids.shape
        if k < 1 or rows < 1 or sub < 1 or rows > (1 << MAX_CODE_LENGTH):
            fail(f"centroids shape {list(centroids.shape)}: need num_tables, sub_dim >= 1 and 1 <= rows <= "
                 f"{1 << MAX_CODE_LENGTH}")
        if num_tables is not None and num_tables != k:
            fail(f"num_tables {num_tables!r} != centroids.shape[0] = {k}")
        if tables.shape[0] != k * rows:
            fail(f"tables have {tables.shape[0]} rows, expected num_tables * rows = {k} * {rows} = {k * rows}")
        _scan_finite(centroids, "centroids", fail)
        n_in = k * sub
    if table_dtype == "int8":
        if (not isinstance(table_scale, np.ndarray) or table_scale.dtype != np.float32
                or table_scale.shape != (tables.shape[0],)):
            fail(f"int8 tables need table_scale, a ({tables.shape[0]},) float32 array")
        if not np.all(np.isfinite(table_scale)) or not np.all(table_scale > 0):
            fail("table_scale must be finite and > 0")
    elif table_scale is not None:
        fail(f"table_scale is only used with int8 tables (table_dtype is {table_dtype!r})")
    else:
        _scan_finite(tables, "tables", fail)
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype != np.float32 or bias.shape != (n_out,):
            fail(f"bias must be a ({n_out},) float32 array")
        if not np.all(np.isfinite(bias)):
            fail("bias holds non-finite values")
    return n_in, n_out, rows


def lut_project(spec, x, residual, act, out, workers) -> None:
    """Run a validated table projection ``spec`` (LutWeights or the functional API's) into ``out`` (T, N)."""
    from edgeformer.kernels.lut import TOKEN_TILE

    rows = x.shape[0]
    if rows == 0:
        return
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    codes = np.empty((rows, spec.num_tables), dtype=np.int32)  # (T, K)
    w = np.empty((rows, spec.num_tables), dtype=np.float32)  # (T, K)
    n = spec.out_features
    if workers.threads == 1:  # one fused call: the dispatch overhead matters at one token
        spec.project(x, codes, w, residual, act, out, 0, rows, 0, n, True)
    elif rows >= workers.threads * TOKEN_TILE:
        workers.split(_rows, rows, spec, x, codes, w, residual, act, out, n)
    else:  # few tokens: encode them all here, then split the output columns (64-byte aligned)
        spec.encode(x, codes, w, 0, rows)
        workers.split(_columns, n, spec, x, codes, w, residual, act, out, rows, align=16)


def _rows(spec, x, codes, w, residual, act, out, n, r0, r1):
    spec.project(x, codes, w, residual, act, out, r0, r1, 0, n, True)


def _columns(spec, x, codes, w, residual, act, out, rows, c0, c1):
    spec.project(x, codes, w, residual, act, out, 0, rows, c0, c1, False)


class LutSpec:
    """A validated table projection bound to its arrays: encode (codes, weights) then gather."""

    def __init__(self, tables, table_scale, bias, centroids, *, encoder="sign", table_dtype="fp32", num_tables=None,
                 code_length=None, temperature=1.0, weight_mode="code_l1_times_prob", zero_bit=1, fail):
        from edgeformer.kernels.lut import WEIGHT_MODES

        self.in_features, self.out_features, self.rows_per_table = check_lut(
            tables, table_scale, bias, centroids, encoder=encoder, table_dtype=table_dtype, num_tables=num_tables,
            code_length=code_length, temperature=temperature, weight_mode=weight_mode, zero_bit=zero_bit, fail=fail)
        self.encoder, self.table_dtype = encoder, table_dtype
        self.tables = tables
        self.scale = NO_VECTOR if table_scale is None else table_scale
        self.bias = NO_VECTOR if bias is None else bias
        self.centroids = centroids
        if encoder == "sign":
            self.num_tables, self.code_length = num_tables, code_length
            self.mode = WEIGHT_MODES[weight_mode]
            self.inv_t = np.float32(1.0 / temperature)
            self.zero_bit = int(zero_bit)
        else:
            self.num_tables = centroids.shape[0]

    @property
    def table_bytes(self) -> int:
        return int(self.tables.nbytes + self.scale.nbytes + (0 if self.centroids is None else self.centroids.nbytes))

    def encode(self, x, codes, w, r0, r1) -> None:
        from edgeformer.kernels.lut import lut_encode_pq, lut_hash_sign

        if self.encoder == "sign":
            lut_hash_sign(x, self.num_tables, self.code_length, self.zero_bit, self.mode, self.inv_t, codes, w, r0, r1)
        else:
            lut_encode_pq(x, self.centroids, codes, w, r0, r1)

    def project(self, x, codes, w, residual, act, out, r0, r1, c0, c1, encode) -> None:
        """(encode rows r0:r1 if ``encode``, then) gather rows r0:r1, columns c0:c1 into out."""
        from edgeformer.kernels.lut import lut_pq_linear, lut_sign_linear

        if self.encoder == "sign":
            lut_sign_linear(x, self.num_tables, self.code_length, self.zero_bit, self.mode, self.inv_t, codes, w,
                            self.tables, self.scale, self.bias, residual, act, out, r0, r1, c0, c1, encode)
        else:
            lut_pq_linear(x, self.centroids, codes, w, self.tables, self.scale, self.bias, residual, act, out, r0, r1,
                          c0, c1, encode)


@register_format("lut")
class LutWeights(LutSpec):
    def __init__(self, node, weights):
        def fail(message):
            raise GraphError(f"node {node.name!r} (linear, format lut): {message}")

        table_dtype = attr(node, "table_dtype", str, "fp32", TABLE_DTYPES)
        encoder = attr(node, "encoder", str, "sign", ENCODERS)
        tables = weight(node, weights, "tables", 2, dtype=TABLE_DTYPES[table_dtype])
        scale = weight(node, weights, "table_scale", 1, optional=True)
        bias = weight(node, weights, "bias", 1, optional=True)
        centroids = weight(node, weights, "centroids", 3, optional=True)
        if encoder == "sign":
            num_tables, code_length = attr(node, "num_tables", int), attr(node, "code_length", int)
            extra = dict(temperature=attr(node, "temperature", float, 1.0),
                         weight_mode=attr(node, "weight_mode", str, "code_l1_times_prob"),
                         zero_bit=attr(node, "zero_bit", int, 1))
        else:
            num_tables = node.attrs.get("num_tables")
            code_length, extra = None, {}
        super().__init__(tables, scale, bias, centroids, encoder=encoder, table_dtype=table_dtype,
                         num_tables=num_tables, code_length=code_length, fail=fail, **extra)

    def __call__(self, x, residual, act, out, workers):
        lut_project(self, x, residual, act, out, workers)
