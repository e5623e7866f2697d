"""Indexing: Gather, GatherElements. Indices may be negative (counted from the end); anything outside
[-n, n) is an InputError, never a wrap-around or a crash."""
from __future__ import annotations

import numpy as np

from edgeformer.errors import InputError
from edgeformer.generic.base import ANY, INDEX, check_elements, norm_axis
from edgeformer.generic.registry import register


def checked_indices(indices: np.ndarray, size: int, what: str) -> np.ndarray:
    """Indices in [-size, size) mapped to [0, size) as int64."""
    idx = indices.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        bad = idx[(idx < -size) | (idx >= size)].reshape(-1)[0]
        raise InputError(f"{what} index {int(bad)} is out of range for an axis of size {size}")
    return np.where(idx < 0, idx + size, idx)


def _check_gather(spec):
    dtype = spec.dtype(0, ANY)
    spec.dtype(1, INDEX)
    return {"axis": spec.axis(spec.int("axis", 0), spec.rank(0))}, [dtype]


def _run_gather(inputs, params):
    data, indices = inputs
    axis = norm_axis(params["axis"], data.ndim, "Gather axis")
    check_elements(data.shape[:axis] + indices.shape + data.shape[axis + 1:], "Gather output")
    return [np.take(data, checked_indices(indices, data.shape[axis], "Gather"), axis=axis)]


register("Gather", _check_gather, _run_gather, inputs=(2, 2), attributes=("axis",))


def _run_gather_elements(inputs, params):
    """out[i][j][k] = data[index[i][j][k]][j][k] (axis 0); index has data's rank and no larger dims elsewhere."""
    data, indices = inputs
    axis = norm_axis(params["axis"], data.ndim, "GatherElements axis")
    if indices.ndim != data.ndim or any(i > d for a, (i, d) in enumerate(zip(indices.shape, data.shape))
                                        if a != axis):
        raise InputError(f"GatherElements indices {list(indices.shape)} do not fit data {list(data.shape)}")
    idx = checked_indices(indices, data.shape[axis], "GatherElements")
    grid = list(np.ix_(*[np.arange(n) for n in idx.shape]))
    grid[axis] = idx
    return [data[tuple(grid)]]


register("GatherElements", _check_gather, _run_gather_elements, inputs=(2, 2), attributes=("axis",))
