"""Shared checks for op classes: every op validates its attributes and weights once, at load time."""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError

# Zero-size stand-ins for absent optional arrays, so that each kernel has one specialisation: Numba
# types read-only and writable arrays differently, so a stand-in for a weight (bias, tables) is
# read-only like the weights from the mmap, and a stand-in for an activation (residual, token types)
# is writable like the activations. Zero-size arrays cannot be written anyway.
NO_VECTOR = np.zeros(0, dtype=np.float32)
NO_VECTOR.setflags(write=False)
NO_MATRIX = np.zeros((0, 0), dtype=np.float32)
NO_IDS = np.zeros(0, dtype=np.int64)
NO_TABLE_CACHE: dict[int, np.ndarray] = {}


def no_table(width: int) -> np.ndarray:
    """A read-only (0, width) float32 table."""
    if width not in NO_TABLE_CACHE:
        table = np.zeros((0, width), dtype=np.float32)
        table.setflags(write=False)
        NO_TABLE_CACHE[width] = table
    return NO_TABLE_CACHE[width]


def weight(node, weights: dict, role: str, ndim: int, dtype=np.float32, optional: bool = False):
    """Return the weight of ``role`` after checking its rank and dtype (None if optional and absent)."""
    if role not in weights:
        if optional:
            return None
        raise GraphError(f"node {node.name!r} ({node.op}) needs weight {role!r}")
    array = weights[role]
    if array.ndim != ndim or array.dtype != np.dtype(dtype):
        raise GraphError(f"node {node.name!r}: weight {role!r} must be {np.dtype(dtype).name} with {ndim} dims, "
                         f"got {array.dtype.name} {list(array.shape)}")
    return array


def attr(node, name: str, kind, default=None, choices=None):
    value = node.attrs.get(name, default)
    if value is None:
        raise GraphError(f"node {node.name!r} ({node.op}) needs attribute {name!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise GraphError(f"node {node.name!r}: attribute {name!r} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise GraphError(f"node {node.name!r}: attribute {name!r} must be {kind.__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise GraphError(f"node {node.name!r}: attribute {name!r} must be one of {sorted(choices)}, got {value!r}")
    return value


def inputs_count(node, in_types, low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= len(in_types) <= high:
        span = str(low) if low == high else f"{low} to {high}"
        raise GraphError(f"node {node.name!r} ({node.op}) takes {span} inputs, got {len(in_types)}")


def same_width(node, what: str, got: int, want: int) -> None:
    if got != want:
        raise GraphError(f"node {node.name!r} ({node.op}): {what} has width {got}, expected {want}")
