"""linear_fp32: x @ w.T + bias, activation, residual, over row ranges and column panels.

Oracles: edgeformer.reference.linear.linear_ref (float64 NumPy) and torch.nn.functional.linear.
"""
import platform
import re

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.kernels.linear import ROW_BLOCK, linear_fp32
from edgeformer.kernels.mathfn import ACT_GELU_ERF
from edgeformer.reference.linear import linear_ref

F32 = np.float32
NO_BIAS = np.zeros(0, F32)
NO_BIAS.setflags(write=False)  # bias is a weight: read-only, absent or not (one specialisation)
NO_RES = np.zeros((0, 0), F32)
SENTINEL = F32(-777.5)
ACT_NAMES = ["none", "relu", "gelu_erf", "gelu_tanh"]


def readonly(a):
    a = np.ascontiguousarray(a, dtype=F32)
    a.setflags(write=False)
    return a


def run(x, w, bias, residual, act, r0, r1, c0, c1):
    out = np.full((x.shape[0], w.shape[0]), SENTINEL, F32)
    linear_fp32(x, w, NO_BIAS if bias is None else bias, NO_RES if residual is None else residual, act, out,
                r0, r1, c0, c1)
    return out


def tolerance(x, w, bias, residual):
    """An error bound for a float32 GEMM: a few ulps of sum_k |x||w| per output, plus the epilogue."""
    k = max(x.shape[1], 1)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        scale = scale + np.abs(bias)
    tol = 2e-7 * (4 + np.sqrt(k)) * scale + 1e-6
    if residual is not None:
        tol = tol + 2e-7 * np.abs(residual)
    return tol


def check_untouched(out, r0, r1, c0, c1):
    mask = np.ones(out.shape, bool)
    mask[r0:r1, c0:c1] = False
    assert np.all(out[mask] == SENTINEL)


dims = st.sampled_from([1, 2, 3, 7, 16, 33, 64, 385])


@st.composite
def linear_case(draw):
    around_blocks = [ROW_BLOCK - 1, ROW_BLOCK, ROW_BLOCK + 3, 2 * ROW_BLOCK + 5]
    t = draw(st.one_of(st.integers(1, 9), st.sampled_from(around_blocks)))
    k = draw(dims)
    n = draw(dims)
    r0 = draw(st.integers(0, t))
    r1 = draw(st.integers(r0, t))
    full_width = draw(st.booleans())
    c0 = 0 if full_width else draw(st.integers(0, n))
    c1 = n if full_width else draw(st.integers(c0, n))
    scale = draw(st.sampled_from([0.05, 1.0, 10.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = (rng.standard_normal((t, k)) * scale).astype(F32)
    w = readonly(rng.standard_normal((n, k)) / np.sqrt(k))
    bias = readonly(rng.standard_normal(n)) if draw(st.booleans()) else None
    residual = rng.standard_normal((t, n)).astype(F32) if draw(st.booleans()) else None
    return x, w, bias, residual, draw(st.integers(0, 3)), r0, r1, c0, c1


@given(linear_case())
def test_linear_against_reference_and_torch(case):
    x, w, bias, residual, act, r0, r1, c0, c1 = case
    out = run(x, w, bias, residual, act, r0, r1, c0, c1)
    check_untouched(out, r0, r1, c0, c1)
    expect = linear_ref(x, w, bias, residual, ACT_NAMES[act])
    tol = tolerance(x, w, bias, residual)
    sl = (slice(r0, r1), slice(c0, c1))
    err = np.abs(out[sl] - expect[sl])
    assert np.all(err <= tol[sl]), err.max()
    # PyTorch, float32 end to end
    tx, tw = torch.from_numpy(x), torch.from_numpy(w.copy())
    y = F.linear(tx, tw, None if bias is None else torch.from_numpy(bias.copy()))
    y = {0: y, 1: torch.relu(y), 2: F.gelu(y), 3: F.gelu(y, approximate="tanh")}[act]
    if residual is not None:
        y = y + torch.from_numpy(residual)
    err_t = np.abs(out[sl] - y.numpy()[sl])
    assert np.all(err_t <= 2 * tol[sl] + 2e-6), err_t.max()


def test_linear_single_row_and_one_column():
    rng = np.random.default_rng(5)
    for t, k, n in [(1, 1, 1), (1, 385, 1), (1, 1, 385), (3, 7, 1)]:
        x = rng.standard_normal((t, k)).astype(F32)
        w = readonly(rng.standard_normal((n, k)))
        b = readonly(rng.standard_normal(n))
        for act in range(4):
            out = run(x, w, b, None, act, 0, t, 0, n)
            np.testing.assert_allclose(out, linear_ref(x, w, b, None, ACT_NAMES[act]), rtol=1e-5, atol=1e-5)


def test_linear_blocks_and_panels_compose():
    """Splitting rows and columns across calls (as threads do) gives the same output as one call."""
    rng = np.random.default_rng(6)
    t, k, n = 2 * ROW_BLOCK + 9, 33, 97
    x = rng.standard_normal((t, k)).astype(F32)
    w = readonly(rng.standard_normal((n, k)))
    b = readonly(rng.standard_normal(n))
    res = rng.standard_normal((t, n)).astype(F32)
    whole = run(x, w, b, res, ACT_GELU_ERF, 0, t, 0, n)
    pieces = np.full_like(whole, SENTINEL)
    for r0, r1 in [(0, 50), (50, ROW_BLOCK + 1), (ROW_BLOCK + 1, t)]:
        for c0, c1 in [(0, 40), (40, 41), (41, n)]:
            linear_fp32(x, w, b, res, ACT_GELU_ERF, pieces, r0, r1, c0, c1)
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)


def test_linear_empty_ranges_and_k0():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3)).astype(F32)
    w = readonly(rng.standard_normal((5, 3)))
    for r0, r1, c0, c1 in [(2, 2, 0, 5), (0, 4, 3, 3), (4, 4, 5, 5)]:
        out = run(x, w, None, None, 0, r0, r1, c0, c1)
        assert np.all(out == SENTINEL)
    # K = 0: the product is empty, the output is bias (+ residual)
    b = readonly(np.arange(5))
    out = run(np.zeros((4, 0), F32), readonly(np.zeros((5, 0))), b, None, 0, 0, 4, 0, 5)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (4, 5)))


def test_linear_nan_and_large_values():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 16)) * 1e3).astype(F32)
    x[2, 5] = np.nan
    w = readonly(rng.standard_normal((8, 16)))
    b = readonly(rng.standard_normal(8))
    for act in range(4):
        out = run(x, w, b, None, act, 0, 6, 0, 8)
        assert np.all(np.isnan(out[2]))
        ok = np.ones(6, bool)
        ok[2] = False
        expect = linear_ref(x[ok], w, b, None, ACT_NAMES[act])
        assert np.all(np.isfinite(out[ok]))
        np.testing.assert_allclose(out[ok], expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def test_one_signature():
    x = np.ones((2, 3), F32)
    run(x, readonly(np.ones((4, 3))), None, None, 0, 0, 2, 0, 4)
    assert len(linear_fp32.signatures) == 1, linear_fp32.signatures


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 assembly check")
def test_linear_epilogue_vectorises():
    opts = {k: v for k, v in linear_fp32.targetoptions.items() if k not in ("cache", "nopython")}
    clone = numba.njit(**opts)(linear_fp32.py_func)
    x = np.ones((2, 4), F32)
    w = readonly(np.ones((8, 4)))
    clone(x, w, NO_BIAS, NO_RES, 0, np.empty((2, 8), F32), 0, 2, 0, 8)
    asm = clone.inspect_asm(clone.signatures[0])
    assert re.search(r"\bvdivps\s[^\n]*%[yz]mm", asm)  # the GELU epilogue
    assert re.search(r"\bvaddps\s[^\n]*%[yz]mm", asm)  # bias / residual
