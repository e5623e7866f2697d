"""Shared pieces of the generic ops: dtypes, the element limit, load-time attribute access (``Spec``).

Every generic op is checked once at load time by its ``check(spec) -> (params, output dtypes)``, which reads
and validates the ONNX attributes (GraphError on anything malformed) and the input dtypes, and is run by
``run(inputs, params) -> list of arrays`` with plain NumPy. Run-time problems that depend on the data (a
Reshape target that does not fit, an index out of range, an output above the element limit) raise InputError;
the caller (``edgeformer.generic.Prepared``) prefixes the node name.
"""
from __future__ import annotations

import math
import os

import numpy as np

from edgeformer.errors import GraphError, InputError

# Model opsets whose semantics the generic ops implement. Differences inside this range (attributes that became
# inputs, Softmax's axis meaning at 13, Split's num_outputs at 18...) are handled per op; later opsets would need
# a review of every changed schema, so they are rejected.
MIN_OPSET, MAX_OPSET = 11, 28

DTYPES = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
          "bool": np.dtype(np.bool_)}
FLOAT = frozenset({"float32"})
INTEGER = frozenset({"int64", "int32"})
NUMERIC = FLOAT | INTEGER
ANY = NUMERIC | {"bool"}
INDEX = frozenset({"int64", "int32"})

# Outputs whose size comes from data (Expand's shape, ConstantOfShape, Range, Tile, Pad, broadcasting, MatMul,
# Gather...) are checked against this many elements before anything is allocated, so a hostile model file or
# feed cannot make the process allocate unbounded memory. 2**28 float32 elements = 1 GiB.
DEFAULT_MAX_ELEMENTS = 2 ** 28
LIMIT_ENV = "EDGEFORMER_MAX_ELEMENTS"
MAX_INLINE = 1 << 16  # elements of a tensor written inline in the graph JSON
_MISSING = object()


def max_elements() -> int:
    """The element limit: $EDGEFORMER_MAX_ELEMENTS if set (a positive integer), else 2**28."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_MAX_ELEMENTS
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{LIMIT_ENV}={raw!r} is not an integer") from None
    if value < 1:
        raise InputError(f"{LIMIT_ENV} must be positive, got {value}")
    return value


def check_elements(shape, what: str = "output") -> int:
    """Number of elements of ``shape``; InputError if a dim is negative or the count is above the limit."""
    count = 1
    for dim in shape:
        dim = int(dim)
        if dim < 0:
            raise InputError(f"{what}: negative dimension {dim} in shape {[int(d) for d in shape]}")
        count *= dim
    limit = max_elements()
    if count > limit:
        raise InputError(f"{what} would have {count} elements (shape {[int(d) for d in shape]}), above the limit "
                         f"of {limit} (environment variable {LIMIT_ENV})")
    return count


def broadcast(*shapes, what: str = "output") -> tuple:
    """NumPy (multidirectional) broadcast of the shapes, with the element limit checked."""
    try:
        shape = np.broadcast_shapes(*shapes)
    except ValueError:
        raise InputError(f"shapes {[list(s) for s in shapes]} do not broadcast") from None
    check_elements(shape, what)
    return shape


def norm_axis(axis: int, rank: int, what: str = "axis", inclusive: bool = False) -> int:
    """Map axis in [-rank, rank) to [0, rank), or, when ``inclusive`` (Flatten), [-rank, rank] to [0, rank];
    InputError otherwise."""
    if not -rank <= axis < rank + inclusive:
        raise InputError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def norm_axes(axes, rank: int, what: str = "axes") -> list[int]:
    """Normalised, duplicate-free axes; InputError otherwise."""
    out = [norm_axis(int(a), rank, what) for a in axes]
    if len(set(out)) != len(out):
        raise InputError(f"{what} {list(axes)} repeat an axis")
    return out


def as_int_list(array, what: str) -> list[int]:
    """A 1-D (or scalar) integer tensor -> list of Python ints."""
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise InputError(f"{what} must be an integer tensor, got {array.dtype}")
    if array.ndim > 1:
        raise InputError(f"{what} must be 1-D, got shape {list(array.shape)}")
    return [int(v) for v in array.reshape(-1)]


def scalar(array, what: str):
    """The single value of a scalar or 1-element tensor."""
    array = np.asarray(array)
    if array.size != 1:
        raise InputError(f"{what} must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


# -- float attributes in JSON: non-finite values travel as strings --------------------------------------------
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def decode_float(value, what: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraphError(f"{what} must be a number, got {value!r}")
    return float(value)


def encode_float(value: float):
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def decode_tensor(obj, what: str) -> np.ndarray:
    """{"dtype", "shape", "data": flat list} -> read-only array; GraphError on any inconsistency."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise GraphError(f"{what} must be an object with exactly 'dtype', 'shape' and 'data'")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise GraphError(f"{what}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 32 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
        raise GraphError(f"{what}: shape must be a list of at most 32 non-negative integers, got {shape!r}")
    count = math.prod(shape)
    if count > MAX_INLINE:
        raise GraphError(f"{what}: {count} elements is too many for an inline tensor (at most {MAX_INLINE})")
    if not isinstance(data, list) or len(data) != count:
        raise GraphError(f"{what}: 'data' must be a list of {count} values")
    if dtype == "float32":
        values = [decode_float(v, what) for v in data]
    elif dtype == "bool":
        if not all(isinstance(v, bool) for v in data):
            raise GraphError(f"{what}: bool data must be true/false")
        values = data
    else:
        info = np.iinfo(DTYPES[dtype])
        if not all(isinstance(v, int) and not isinstance(v, bool) and info.min <= v <= info.max for v in data):
            raise GraphError(f"{what}: {dtype} data must be integers in [{info.min}, {info.max}]")
        values = data
    array = np.array(values, dtype=DTYPES[dtype]).reshape(shape)
    array.setflags(write=False)
    return array


def encode_tensor(array: np.ndarray) -> dict:
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(f"cannot encode dtype {name}")
    flat = array.reshape(-1).tolist()
    if name == "float32":
        flat = [encode_float(v) for v in flat]
    return {"dtype": name, "shape": [int(d) for d in array.shape], "data": flat}


class Spec:
    """What ``check`` may know about one node at load time: attributes, opset, input dtypes, ranks (None when
    unknown), values of constant inputs, number of outputs. Input positions follow the ONNX node; an omitted
    optional input has dtype None."""

    def __init__(self, op_type: str, opset: int, attributes: dict, dtypes: list, ranks: list, consts: list,
                 n_outputs: int, name: str):
        self.op_type, self.opset, self.attributes, self.name = op_type, opset, attributes, name
        self.dtypes, self.ranks, self.consts, self.n_outputs = dtypes, ranks, consts, n_outputs

    def error(self, message: str) -> GraphError:
        return GraphError(f"node {self.name!r} ({self.op_type}): {message}")

    # -- attributes ---------------------------------------------------------------------------------------------
    def _get(self, key, default):
        value = self.attributes.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.error(f"needs attribute {key!r}")
            return default
        return value

    def int(self, key: str, default=_MISSING, low=None, high=None):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"attribute {key!r} must be an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.error(f"attribute {key!r} = {value} is outside [{low}, {high}]")
        return value

    def flag(self, key: str, default: int = 0) -> bool:
        return bool(self.int(key, default, 0, 1))

    def ints(self, key: str, default=_MISSING, low=None, high=None, length=None):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or len(value) > 64 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(f"attribute {key!r} must be a list of at most 64 integers, got {value!r}")
        if any((low is not None and v < low) or (high is not None and v > high) for v in value):
            raise self.error(f"attribute {key!r} = {value} has values outside [{low}, {high}]")
        if length is not None and len(value) != length:
            raise self.error(f"attribute {key!r} must have {length} values, got {len(value)}")
        return list(value)

    def float(self, key: str, default=_MISSING, finite: bool = True):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        result = decode_float(value, f"node {self.name!r} ({self.op_type}): attribute {key!r}")
        if finite and not math.isfinite(result):
            raise self.error(f"attribute {key!r} must be finite, got {value!r}")
        return result

    def string(self, key: str, default=_MISSING, choices=None):
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.error(f"attribute {key!r} must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(f"attribute {key!r} must be one of {sorted(choices)}, got {value!r}")
        return value

    def tensor(self, key: str, default=_MISSING):
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        return decode_tensor(value, f"node {self.name!r} ({self.op_type}): attribute {key!r}")

    # -- inputs --------------------------------------------------------------------------------------------------
    def present(self, index: int) -> bool:
        return index < len(self.dtypes) and self.dtypes[index] is not None

    def dtype(self, index: int, allowed=ANY, optional: bool = False):
        """The dtype of input ``index`` after checking it is one of ``allowed`` (None if absent and optional)."""
        if not self.present(index):
            if optional:
                return None
            raise self.error(f"input #{index} is required")
        dtype = self.dtypes[index]
        if dtype not in allowed:
            raise self.error(f"input #{index} has dtype {dtype}; this op takes {sorted(allowed)}")
        return dtype

    def same(self, *indices) -> str:
        present = [self.dtypes[i] for i in indices if self.present(i)]
        if len(set(present)) > 1:
            raise self.error(f"inputs {list(indices)} must share one dtype, got {present}")
        return present[0]

    def rank(self, index: int):
        return self.ranks[index] if index < len(self.ranks) else None

    def const(self, index: int):
        return self.consts[index] if index < len(self.consts) else None

    def axis(self, value: int, rank, inclusive: bool = False, what: str = "axis"):
        """Normalise ``value`` when the rank is known (GraphError if out of range); leave it otherwise."""
        if rank is None:
            return value
        try:
            return norm_axis(value, rank, what, inclusive)
        except InputError as exc:
            raise self.error(str(exc)) from None

    def axes(self, values, rank, what: str = "axes"):
        if len(set(values)) != len(values) and rank is None:
            raise self.error(f"{what} {values} repeat an axis")
        if rank is None:
            return values
        try:
            return norm_axes(values, rank, what)
        except InputError as exc:
            raise self.error(str(exc)) from None
