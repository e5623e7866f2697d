"""linear_packed_f32: packed-weight GEMM with fused bias / activation / residual, over row and panel ranges.

Oracles: edgeformer.reference.linear.linear_ref (float64 NumPy) and torch.nn.functional.linear where installed.
"""
import platform
import re

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.kernels.gemm_f32 import MR, NP, NR, linear_packed_f32, pack_weight, unpack_weight
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_NONE
from edgeformer.reference.linear import linear_ref
from tests.optional import F, torch

F32 = np.float32
NO_BIAS = np.zeros(0, F32)
NO_BIAS.setflags(write=False)
NO_RES = np.zeros((0, 0), F32)
SENTINEL = F32(-777.5)
ACT_NAMES = ["none", "relu", "gelu_erf", "gelu_tanh"]


def readonly(a):
    a = np.ascontiguousarray(a, dtype=F32)
    a.setflags(write=False)
    return a


def n_panels(n):
    return -(-n // NR)


def run(x, wp, n, bias, residual, act, r0, r1, p0, p1):
    out = np.full((x.shape[0], n), SENTINEL, F32)
    linear_packed_f32(x, wp, n, NO_BIAS if bias is None else bias, NO_RES if residual is None else residual, act,
                      out, r0, r1, p0, p1)
    return out


def tolerance(x, w, bias, residual):
    """A few ulps of sum_k |x||w| per output (grows like sqrt(K)), plus the epilogue."""
    k = max(x.shape[1], 1)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        scale = scale + np.abs(bias)
    tol = 2e-7 * (4 + np.sqrt(k)) * scale + 1e-6
    if residual is not None:
        tol = tol + 2e-7 * np.abs(residual)
    return tol


def written_mask(shape, n, r0, r1, p0, p1):
    mask = np.zeros(shape, bool)
    mask[r0:r1, p0 * NR:min(p1 * NR, n)] = True
    return mask


# ---- pack_weight ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(1, 1), (15, 3), (16, 7), (17, 384), (50, 33), (384, 1536)])
def test_pack_weight_layout_and_padding(n, k):
    w = np.random.default_rng(n * 1000 + k).standard_normal((n, k)).astype(F32)
    wp = pack_weight(w)
    assert wp.shape == (n_panels(n), k, NR) and wp.dtype == F32 and wp.flags.c_contiguous
    for c in range(n_panels(n) * NR):
        p, j = divmod(c, NR)
        if c < n:
            np.testing.assert_array_equal(wp[p, :, j], w[c])
        else:
            assert np.all(wp[p, :, j] == 0)  # padded columns are zero
    np.testing.assert_array_equal(unpack_weight(wp, n), w)


# ---- against the references ------------------------------------------------------------------------

@st.composite
def gemm_case(draw):
    around_mr = [1, MR - 1, MR, MR + 1, 2 * MR * NP + 1]
    t = draw(st.one_of(st.integers(1, 20), st.sampled_from(around_mr), st.integers(1, 300)))
    k = draw(st.one_of(st.integers(1, 40), st.sampled_from([383, 384, 385, 1536, 1599]), st.integers(1, 1600)))
    n = draw(st.one_of(st.integers(1, 70), st.sampled_from([NR - 1, NR, NR + 1, 2 * NR * NP + 3, 384]),
                       st.integers(1, 1200)))
    if t * k * n > 60_000_000:  # keep the float64 reference cheap
        t = max(1, 60_000_000 // (k * n))
    r0 = draw(st.integers(0, t))
    r1 = draw(st.integers(r0, t))
    p = n_panels(n)
    full = draw(st.booleans())
    p0 = 0 if full else draw(st.integers(0, p))
    p1 = p if full else draw(st.integers(p0, p))
    scale = draw(st.sampled_from([0.05, 1.0, 10.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = (rng.standard_normal((t, k)) * scale).astype(F32)
    w = readonly(rng.standard_normal((n, k)) / np.sqrt(k))
    bias = readonly(rng.standard_normal(n)) if draw(st.booleans()) else None
    residual = rng.standard_normal((t, n)).astype(F32) if draw(st.booleans()) else None
    return x, w, bias, residual, draw(st.integers(0, 3)), r0, r1, p0, p1


@settings(max_examples=60)
@given(gemm_case())
def test_linear_packed_matches_reference(case):
    x, w, bias, residual, act, r0, r1, p0, p1 = case
    n = w.shape[0]
    wp = readonly(pack_weight(w))
    res_before = None if residual is None else residual.copy()
    x_before = x.copy()
    out = run(x, wp, n, bias, residual, act, r0, r1, p0, p1)
    mask = written_mask(out.shape, n, r0, r1, p0, p1)
    assert np.all(out[~mask] == SENTINEL)  # rows and panels outside the ranges are untouched
    np.testing.assert_array_equal(x, x_before)
    if residual is not None:
        np.testing.assert_array_equal(residual, res_before)
    ref = linear_ref(x, w, bias, residual, ACT_NAMES[act])
    tol = tolerance(x, w, bias, residual)
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err[mask] <= tol[mask]), f"max excess {np.max((err - tol)[mask])}"


@pytest.mark.parametrize("t, k, n", [(1, 384, 1152), (16, 384, 384), (7, 1536, 384), (130, 384, 1536),
                                     (5, 1, 17), (33, 2, 1)])
@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_linear_packed_matches_torch(t, k, n, act):
    rng = np.random.default_rng(t + k + n + act)
    x = rng.standard_normal((t, k)).astype(F32)
    w = readonly(rng.standard_normal((n, k)) / np.sqrt(k))
    bias = readonly(rng.standard_normal(n))
    residual = rng.standard_normal((t, n)).astype(F32)
    out = run(x, pack_weight(w), n, bias, residual, act, 0, t, 0, n_panels(n))
    # the float64 reference always (these fixed model-sized shapes also run where torch is absent)
    err = np.abs(out.astype(np.float64) - linear_ref(x, w, bias, residual, ACT_NAMES[act]))
    tol = tolerance(x, w, bias, residual)
    assert np.all(err <= tol), f"max excess {np.max(err - tol)}"
    if torch is not None:
        y = F.linear(torch.from_numpy(x), torch.from_numpy(w.copy()), torch.from_numpy(bias.copy()))
        y = [lambda v: v, F.relu, lambda v: F.gelu(v), lambda v: F.gelu(v, approximate="tanh")][act](y)
        y = (y + torch.from_numpy(residual)).numpy()
        np.testing.assert_allclose(out, y, rtol=1e-5 * np.sqrt(k), atol=1e-5 * np.sqrt(k))


def test_split_ranges_compose_to_the_whole():
    """Disjoint (rows x panels) ranges, as thread workers would use them, give the one-call result."""
    rng = np.random.default_rng(5)
    t, k, n = 77, 129, 203
    x = rng.standard_normal((t, k)).astype(F32)
    w = readonly(rng.standard_normal((n, k)) / np.sqrt(k))
    wp = readonly(pack_weight(w))
    bias = readonly(rng.standard_normal(n))
    residual = rng.standard_normal((t, n)).astype(F32)
    whole = run(x, wp, n, bias, residual, ACT_GELU_ERF, 0, t, 0, n_panels(n))
    parts = np.full((t, n), SENTINEL, F32)
    for r0, r1 in [(0, 40), (40, t)]:
        for p0, p1 in [(0, 5), (5, 6), (6, n_panels(n))]:
            linear_packed_f32(x, wp, n, bias, residual, ACT_GELU_ERF, parts, r0, r1, p0, p1)
    np.testing.assert_array_equal(parts, whole)


def test_residual_may_be_the_output():
    """out = x @ W^T + out (in-place residual add) reads each residual element before overwriting it."""
    rng = np.random.default_rng(6)
    t, k, n = 19, 64, 100
    x = rng.standard_normal((t, k)).astype(F32)
    w = readonly(rng.standard_normal((n, k)) / 8)
    for act in (ACT_NONE, ACT_GELU_ERF):
        res = rng.standard_normal((t, n)).astype(F32)
        expect = run(x, pack_weight(w), n, None, res.copy(), act, 0, t, 0, n_panels(n))
        linear_packed_f32(x, pack_weight(w), n, NO_BIAS, res, act, res, 0, t, 0, n_panels(n))
        np.testing.assert_array_equal(res, expect)


def test_empty_ranges_write_nothing():
    x = np.ones((4, 8), F32)
    wp = pack_weight(np.ones((20, 8), F32))
    out = run(x, wp, 20, None, None, 0, 2, 2, 0, 2)
    assert np.all(out == SENTINEL)
    out = run(x, wp, 20, None, None, 0, 0, 4, 1, 1)
    assert np.all(out == SENTINEL)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="assembly check for x86-64 / aarch64")
def test_micro_kernel_uses_vector_fma():
    """The inner loop is vector FMA code (zmm/ymm on x86, fmla on aarch64), not a scalar fallback.

    Compiled uncached (a cached dispatcher cannot be inspected)."""
    opts = {k: v for k, v in linear_packed_f32.targetoptions.items() if k not in ("cache", "nopython")}
    clone = numba.njit(**opts)(linear_packed_f32.py_func)
    x = np.ones((8, 4), F32)
    clone(x, pack_weight(np.ones((40, 4), F32)), 40, NO_BIAS, NO_RES, 0, np.empty((8, 40), F32), 0, 8, 0, 3)
    asm = clone.inspect_asm(clone.signatures[0])
    assert re.search(r"\bvfmadd\d+ps\s[^\n]*%[yz]mm", asm) or re.search(r"\bfmla\s+v\d+\.4s", asm), "no vector FMA"
