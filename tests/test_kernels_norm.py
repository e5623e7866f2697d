"""layer_norm (with fused residual, in place) and l2_normalize over row ranges.

Oracles: edgeformer.reference.norm (float64 NumPy), torch.nn.functional.layer_norm / normalize where installed.
"""
import platform
import re

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.kernels.norm import l2_normalize, layer_norm
from edgeformer.reference.norm import l2_normalize_ref, layer_norm_ref
from tests.optional import F, torch

F32 = np.float32
NO_RES = np.zeros((0, 0), F32)
SENTINEL = F32(31.5)


def readonly(a):
    a = np.ascontiguousarray(a, dtype=F32)
    a.setflags(write=False)
    return a


dims = st.sampled_from([1, 2, 3, 7, 33, 64, 385])


@st.composite
def rows_case(draw):
    t = draw(st.integers(1, 9))
    d = draw(dims)
    r0 = draw(st.integers(0, t))
    r1 = draw(st.integers(r0, t))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "offset", "tiny", "huge", "constant"]))
    if kind == "normal":
        x = rng.standard_normal((t, d)) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    elif kind == "offset":  # large mean, small spread: a one-pass float32 variance fails this
        x = 1e4 + rng.standard_normal((t, d)) * 0.5
    elif kind == "tiny":
        x = rng.standard_normal((t, d)) * 1e-20
    elif kind == "huge":
        x = rng.standard_normal((t, d)) * 1e25
    else:
        x = np.full((t, d), rng.standard_normal())
    return x.astype(F32), r0, r1, kind, rng


def assert_untouched(out, original, r0, r1):
    rows = np.ones(len(out), bool)
    rows[r0:r1] = False
    np.testing.assert_array_equal(out[rows], original[rows])


@given(rows_case(), st.booleans(), st.booleans(), st.sampled_from([1e-12, 1e-5]))
def test_layer_norm(case, with_residual, inplace, eps):
    x, r0, r1, kind, rng = case
    t, d = x.shape
    gamma = readonly(1 + 0.1 * rng.standard_normal(d))
    beta = readonly(0.1 * rng.standard_normal(d))
    residual = (rng.standard_normal((t, d)) * np.abs(x).mean()).astype(F32) if with_residual else None
    res_arg = NO_RES if residual is None else residual
    if inplace:
        out = x.copy()
        layer_norm(out, res_arg, gamma, beta, eps, out, r0, r1)
        assert_untouched(out, x, r0, r1)
    else:
        out = np.full_like(x, SENTINEL)
        layer_norm(x, res_arg, gamma, beta, eps, out, r0, r1)
        assert_untouched(out, np.full_like(x, SENTINEL), r0, r1)
    # reference on the float32 sum the kernel normalises (y = x + residual rounded to float32)
    y = x if residual is None else (x + residual)
    expect = layer_norm_ref(y[r0:r1], gamma, beta, eps)
    np.testing.assert_allclose(out[r0:r1], expect, rtol=1e-5, atol=1e-5)
    # torch's float32 statistics lose ~3 digits at mean 1e4 ("offset"): compared against float64 only
    if torch is not None and kind in ("normal", "constant") and r1 > r0:
        ty = torch.from_numpy(x[r0:r1].copy())
        if residual is not None:
            ty = ty + torch.from_numpy(residual[r0:r1])
        tref = F.layer_norm(ty, (d,), torch.from_numpy(gamma.copy()), torch.from_numpy(beta.copy()), eps)
        np.testing.assert_allclose(out[r0:r1], tref.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_norm_constant_row_gives_beta():
    x = np.full((3, 33), 7.25, F32)
    gamma = readonly(np.linspace(0.5, 2, 33))
    beta = readonly(np.linspace(-1, 1, 33))
    out = np.empty_like(x)
    layer_norm(x, NO_RES, gamma, beta, 1e-12, out, 0, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(beta, x.shape))


def test_layer_norm_nan_stays_in_its_row():
    x = np.random.default_rng(1).standard_normal((3, 7)).astype(F32)
    x[1, 3] = np.nan
    gamma, beta = readonly(np.ones(7)), readonly(np.zeros(7))
    out = np.empty_like(x)
    layer_norm(x, NO_RES, gamma, beta, 1e-5, out, 0, 3)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))


@given(rows_case(), st.booleans(), st.sampled_from([1e-12, 1e-3]))
def test_l2_normalize(case, inplace, eps):
    x, r0, r1, kind, _ = case
    if inplace:
        out = x.copy()
        l2_normalize(out, eps, out, r0, r1)
        assert_untouched(out, x, r0, r1)
    else:
        out = np.full_like(x, SENTINEL)
        l2_normalize(x, eps, out, r0, r1)
        assert_untouched(out, np.full_like(x, SENTINEL), r0, r1)
    expect = l2_normalize_ref(x[r0:r1], eps)
    np.testing.assert_allclose(out[r0:r1], expect, rtol=2e-7, atol=1e-30)
    if torch is not None and kind in ("normal", "constant", "offset"):
        tref = F.normalize(torch.from_numpy(x[r0:r1].copy()), p=2.0, dim=-1, eps=eps)
        np.testing.assert_allclose(out[r0:r1], tref.numpy(), rtol=1e-5, atol=1e-7)


def test_l2_normalize_zero_and_extreme_rows():
    x = np.array([[0.0, 0.0, 0.0], [0.0, -0.0, 0.0], [3e38, 3e38, -3e38], [1e-40, 0.0, -1e-40], [np.nan, 1.0, 2.0]],
                 F32)
    out = np.empty_like(x)
    l2_normalize(x, 1e-12, out, 0, len(x))
    np.testing.assert_array_equal(out[:2], 0.0)
    np.testing.assert_allclose(out[2], np.array([1, 1, -1]) / np.sqrt(3), rtol=1e-7)  # no overflow
    np.testing.assert_allclose(out[3], x[3].astype(np.float64) / 1e-12, rtol=1e-6)  # norm < eps: x / eps
    assert np.all(np.isnan(out[4]))


def test_one_signature_each():
    x = np.ones((2, 3), F32)
    layer_norm(x, NO_RES, readonly(np.ones(3)), readonly(np.zeros(3)), 1e-5, x, 0, 2)
    l2_normalize(x, 1e-12, x, 0, 2)
    assert len(layer_norm.signatures) == 1 and len(l2_normalize.signatures) == 1


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 assembly check")
def test_norm_reductions_vectorise():
    x = np.ones((2, 64), F32)
    for k, args in [(layer_norm, (x, NO_RES, readonly(np.ones(64)), readonly(np.zeros(64)), 1e-5, x, 0, 2)),
                    (l2_normalize, (x, 1e-12, x, 0, 2))]:
        opts = {kk: v for kk, v in k.targetoptions.items() if kk not in ("cache", "nopython")}
        clone = numba.njit(**opts)(k.py_func)
        clone(*args)
        asm = clone.inspect_asm(clone.signatures[0])
        assert re.search(r"\bv(?:add|fmadd\d+)pd\s[^\n]*%[yz]mm", asm), k.__name__  # float64 sums, packed
