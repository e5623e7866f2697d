"""Scalar math helpers (exp, erf, tanh, GELU, ReLU) and the `activation` kernel.

Oracles: float64 NumPy / math.erf(c) in edgeformer.reference.activation, and PyTorch where installed.
"""
import math
import platform
import re

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.kernels import mathfn
from edgeformer.kernels._jit import kernel
from edgeformer.kernels.linear import activation
from edgeformer.kernels.mathfn import (ACT_GELU_ERF, ACT_GELU_TANH, ACT_NONE, ACT_RELU, apply_act, erf_f32, exp_f32,
                                       exp_nonpos, gelu_erf, gelu_tanh, relu, tanh_f32)
from edgeformer.reference import activation as ref
from tests.optional import F, requires_torch, torch

FLT_MIN = float(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)
F32 = np.float32
SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, 0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45,
                    FLT_MIN, -FLT_MIN, 1e-20, -1e-20, 1.0, -1.0, 88.72, 88.73, -87.3, -87.4, -103.9, -200.0],
                   dtype=F32)

FN_EXP, FN_ERF, FN_TANH, FN_RELU, FN_GELU_ERF, FN_GELU_TANH, FN_EXP_NONPOS = range(7)
ORACLE = {FN_EXP: ref.exp_ref, FN_ERF: ref.erf_ref, FN_TANH: ref.tanh_ref, FN_RELU: ref.relu,
          FN_GELU_ERF: ref.gelu_erf, FN_GELU_TANH: ref.gelu_tanh}


@kernel
def _map(fn, x, out):
    """out = f(x) elementwise for the helper selected by `fn` (one compiled test kernel)."""
    n = x.shape[0]
    if fn == FN_EXP:
        for i in range(n):
            out[i] = exp_f32(x[i])
    elif fn == FN_ERF:
        for i in range(n):
            out[i] = erf_f32(x[i])
    elif fn == FN_TANH:
        for i in range(n):
            out[i] = tanh_f32(x[i])
    elif fn == FN_RELU:
        for i in range(n):
            out[i] = relu(x[i])
    elif fn == FN_GELU_ERF:
        for i in range(n):
            out[i] = gelu_erf(x[i])
    elif fn == FN_EXP_NONPOS:
        for i in range(n):
            out[i] = exp_nonpos(x[i])
    else:
        for i in range(n):
            out[i] = gelu_tanh(x[i])


@kernel
def _apply(x, act, out):
    for i in range(x.shape[0]):
        out[i] = apply_act(x[i], act)


def run(fn, x):
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    _map(fn, x, out)
    return out


def errors(y, r):
    """(absolute error, relative error) of float32 results y against float64 r, ignoring inf == inf."""
    y = y.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ae = np.where(y == r, 0.0, np.abs(y - r))
        re_ = np.where(ae == 0, 0.0, ae / np.abs(r))
    return ae, re_


def random_finite_floats(n, seed):
    bits = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(F32)
    return x[np.isfinite(x)]


DENSE = {
    FN_EXP: np.linspace(-90.0, 89.0, 400_001, dtype=F32),
    FN_ERF: np.linspace(-6.0, 6.0, 400_001, dtype=F32),
    FN_TANH: np.linspace(-12.0, 12.0, 400_001, dtype=F32),
    FN_GELU_ERF: np.linspace(-12.0, 12.0, 400_001, dtype=F32),
    FN_GELU_TANH: np.linspace(-12.0, 12.0, 400_001, dtype=F32),
}


# ---- accuracy against float64 -----------------------------------------------------------------------

def test_exp_accuracy():
    for x in (DENSE[FN_EXP], random_finite_floats(300_000, 1), np.linspace(-1e-3, 1e-3, 20_001, dtype=F32)):
        y, r = run(FN_EXP, x), ref.exp_ref(x)
        ae, re_ = errors(y, r)
        normal = (r >= FLT_MIN) & (r <= FLT_MAX)
        assert re_[normal].max() <= 1.5e-7, re_[normal].max()
        assert np.all(y[r > FLT_MAX] == np.inf)
        # results below FLT_MIN are flushed to zero (documented): absolute error below FLT_MIN
        assert np.all(y[r < FLT_MIN] <= FLT_MIN) and np.all(y >= 0)



def test_exp_nonpos_is_exp_on_nonpositive_inputs():
    """exp_nonpos (softmax's exp(s - max)) scales by 2**n in one multiply instead of two: for x <= 0 both
    products are exact powers-of-two scalings of the same polynomial, so it equals exp_f32 bit for bit."""
    x = np.concatenate([DENSE[FN_EXP][DENSE[FN_EXP] <= 0], -np.abs(random_finite_floats(300_000, 12)),
                        np.array([0.0, -0.0, -1e-45, -FLT_MIN, -87.33654, -87.33655, -87.3, -87.4, -200.0], F32)])
    y = run(FN_EXP_NONPOS, x)
    np.testing.assert_array_equal(y, run(FN_EXP, x))
    r = ref.exp_ref(x)
    _, re_ = errors(y, r)
    assert re_[r >= FLT_MIN].max() <= 1.5e-7
    assert np.all(y[r < FLT_MIN] <= FLT_MIN) and np.all(y >= 0) and np.all(y <= 1)


def test_exp_nonpos_special_values():
    x = np.array([np.nan, -np.inf, np.inf, 1e30, 3.5, 0.0, -0.0, -1e30, -3e38], F32)
    y = run(FN_EXP_NONPOS, x)
    assert np.isnan(y[0]) and y[1] == 0.0  # NaN propagates, exp(-inf) = 0
    np.testing.assert_array_equal(y[2:7], 1.0)  # positive inputs are clamped to 0 (documented)
    np.testing.assert_array_equal(y[7:], 0.0)


def test_erf_accuracy():
    for x in (DENSE[FN_ERF], random_finite_floats(300_000, 2)):
        y, r = run(FN_ERF, x), ref.erf_ref(x)
        ae, re_ = errors(y, r)
        assert ae.max() <= 2e-7, ae.max()
        normal = np.abs(x) >= FLT_MIN  # tiny x: erf(x) = 2x/sqrt(pi) must stay relatively accurate
        assert re_[normal & (np.abs(x) < 1)].max() <= 3e-7
        assert np.all(np.abs(y) <= 1)


def test_tanh_accuracy():
    for x in (DENSE[FN_TANH], random_finite_floats(300_000, 3), np.linspace(-1e-3, 1e-3, 20_001, dtype=F32)):
        y, r = run(FN_TANH, x), ref.tanh_ref(x)
        ae, re_ = errors(y, r)
        assert ae.max() <= 1.5e-7, ae.max()
        normal = np.abs(x) >= FLT_MIN
        assert re_[normal].max() <= 2.5e-7, re_[normal].max()
        assert np.all(np.abs(y) <= 1)


def test_gelu_erf_accuracy():
    for x in (DENSE[FN_GELU_ERF], random_finite_floats(300_000, 4 + FN_GELU_ERF)):
        y, r = run(FN_GELU_ERF, x), ORACLE[FN_GELU_ERF](x)
        ae, _ = errors(y, r)
        # the rational erf trades tail accuracy for speed: absolute error as PyTorch's own GELU
        assert np.all(ae <= 1.5e-6 * np.maximum(1.0, np.abs(r))), ae.max()
        assert np.all(np.abs(y[x < -6]) <= 1e-5 * np.abs(x[x < -6]))  # the negative tail goes to 0


@kernel(fastmath={"contract"})
def _gelu_forms(x, table, rational):
    for i in range(x.shape[0]):
        table[i] = mathfn.gelu_erf_table(x[i])
        rational[i] = mathfn.gelu_erf_rational(x[i])


def test_gelu_erf_both_forms():
    """Both GELU forms on any host (gelu_erf is the table where the host targets AVX-512, kernels/act_ir.py
    emits the same form): the table within 2.8e-7 * max(1, |gelu|), the rational within 1.5e-6; special
    values alike (signed zeros kept, the tails exact: x past 5.8125 and 0 below -5.8125 for the table)."""
    assert mathfn.gelu_erf is (mathfn.gelu_erf_table if mathfn.GELU_ERF_TABLE else mathfn.gelu_erf_rational)
    x = np.concatenate([DENSE[FN_GELU_ERF], random_finite_floats(300_000, 41), SPECIAL,
                        np.arange(33, dtype=F32) * F32(3 / 16), -np.arange(33, dtype=F32) * F32(3 / 16)])
    table, rational = np.empty_like(x), np.empty_like(x)
    _gelu_forms(x, table, rational)
    finite = np.isfinite(x)
    r = ORACLE[FN_GELU_ERF](x[finite])
    for y, bound in ((table, 2.8e-7), (rational, 1.5e-6)):
        ae = np.abs(y[finite].astype(np.float64) - r)
        rel = ae / np.maximum(1.0, np.abs(r))
        assert np.all(rel <= bound), (bound, rel.max(), x[finite][np.argmax(rel)])
        assert np.all(np.isnan(y[np.isnan(x)])) and np.isnan(y[x == -np.inf]).all() and (y[x == np.inf] == np.inf).all()
        zero = x == 0
        assert np.all(y[zero] == 0) and np.all(np.signbit(y[zero]) == np.signbit(x[zero]))
    big = finite & (np.abs(x) >= 5.8125)
    np.testing.assert_array_equal(table[big], np.where(x[big] > 0, x[big], 0).astype(F32))


@pytest.mark.parametrize("fn", [FN_GELU_TANH])
def test_gelu_accuracy(fn):
    for x in (DENSE[fn], random_finite_floats(300_000, 4 + fn)):
        y, r = run(fn, x), ORACLE[fn](x)
        ae, re_ = errors(y, r)
        # within ~1 ulp of the result in the body, and relatively accurate in the negative tail
        assert np.all(ae <= 2e-7 + 1.5e-7 * np.abs(r)), (ae - 1.5e-7 * np.abs(r)).max()
        tail = (np.abs(r) >= 1e-30) & (x < 0)
        assert re_[tail].max() <= 1e-4, re_[tail].max()
        assert np.all(np.abs(y[np.abs(r) < 1e-30]) <= 1e-30)  # far tail: flushed towards 0, never garbage


def test_relu_exact():
    x = np.concatenate([random_finite_floats(100_000, 9), SPECIAL])
    y = run(FN_RELU, x)
    np.testing.assert_array_equal(y, ref.relu(x).astype(F32))
    assert np.all(np.signbit(y[x == 0]) == np.signbit(x[x == 0]))  # -0.0 stays -0.0 (torch.relu does too)


# ---- special values ---------------------------------------------------------------------------------

def test_special_values():
    x = SPECIAL
    nan = np.isnan(x)
    for fn in (FN_EXP, FN_ERF, FN_TANH, FN_RELU, FN_GELU_ERF, FN_GELU_TANH):
        y = run(fn, x)
        assert np.all(np.isnan(y[nan])), fn  # NaN propagates
        assert np.all(np.isnan(y) == nan | ((fn in (FN_GELU_ERF, FN_GELU_TANH)) & (x == -np.inf))), fn
    e = run(FN_EXP, x)
    assert e[x == np.inf][0] == np.inf and e[x == -np.inf][0] == 0.0 and e[x == 1e30][0] == np.inf
    assert e[x == -1e30][0] == 0.0 and np.all(e[x == 0] == 1.0) and np.all(e[np.abs(x) <= 1e-20] == 1.0)
    for fn in (FN_ERF, FN_TANH):
        y = run(fn, x)
        assert y[x == np.inf][0] == 1.0 and y[x == -np.inf][0] == -1.0
        assert y[x == 1e30][0] == 1.0 and y[x == -1e30][0] == -1.0
    for fn in (FN_ERF, FN_TANH, FN_GELU_ERF, FN_GELU_TANH):
        y = run(fn, x)
        zero = x == 0
        assert np.all(y[zero] == 0) and np.all(np.signbit(y[zero]) == np.signbit(x[zero])), fn  # -0.0 kept
        tiny = (np.abs(x) < 1e-30) & (x != 0)
        rounds_to_zero = np.abs(ORACLE[fn](x[tiny])) < 0.75e-45  # e.g. gelu(1e-45) = 0.7e-45 -> 0
        assert np.all((np.sign(y[tiny]) == np.sign(x[tiny])) | rounds_to_zero), fn
    t = run(FN_TANH, x)
    tiny = np.abs(x) < 1e-20
    np.testing.assert_array_equal(t[tiny], x[tiny])  # tanh(x) = x for tiny and denormal x
    for fn in (FN_GELU_ERF, FN_GELU_TANH):
        y = run(fn, x)
        assert y[x == np.inf][0] == np.inf and y[x == 1e30][0] == F32(1e30) and y[x == 3e38][0] == F32(3e38)
        assert y[x == -1e30][0] == 0.0 and y[x == -3e38][0] == 0.0 and y[x == -200][0] == 0.0


# ---- against PyTorch --------------------------------------------------------------------------------

@requires_torch
def test_against_torch():
    x = np.concatenate([np.linspace(-20, 20, 200_001, dtype=F32), random_finite_floats(50_000, 11), SPECIAL])
    finite = np.isfinite(x)
    t = torch.from_numpy(x)
    cases = [(FN_EXP, torch.exp(t), "rel"), (FN_ERF, torch.erf(t), "abs"), (FN_TANH, torch.tanh(t), "abs"),
             (FN_RELU, torch.relu(t), "abs"), (FN_GELU_ERF, F.gelu(t, approximate="none"), "abs"),
             (FN_GELU_TANH, F.gelu(t, approximate="tanh"), "abs")]
    for fn, expected, kind in cases:
        y, e = run(fn, x)[finite], expected.numpy()[finite]
        both_inf = np.isinf(y) & (y == e)
        with np.errstate(invalid="ignore"):
            diff = np.where(both_inf, 0.0, np.abs(y.astype(np.float64) - e))
        if kind == "rel":
            ok = (diff <= 1e-6 * np.abs(e)) | (np.abs(e) < FLT_MIN)
        else:
            ok = diff <= 2e-6 * np.maximum(1.0, np.abs(e))  # torch's vectorised GELU is off by up to 1.2e-6
        assert ok.all(), (fn, x[finite][~ok][:5], y[~ok][:5], e[~ok][:5])


# ---- apply_act and the activation kernel ------------------------------------------------------------

def test_apply_act_codes():
    assert (ACT_NONE, ACT_RELU, ACT_GELU_ERF, ACT_GELU_TANH) == (0, 1, 2, 3)
    assert mathfn.ACT_CODES["gelu"] == ACT_GELU_ERF
    x = np.linspace(-6, 6, 10_001, dtype=F32)
    for act in range(4):
        out = np.empty_like(x)
        _apply(x, act, out)
        r = ref.activation_ref(x, act)
        tol = 1.5e-6 if act == ACT_GELU_ERF else 2e-7  # the rational-erf GELU: absolute error as PyTorch's
        np.testing.assert_allclose(out, r, rtol=tol, atol=tol)


sizes = st.sampled_from([1, 2, 3, 7, 16, 33, 64, 385])


@st.composite
def activation_case(draw):
    rows = draw(st.integers(1, 9))
    n = draw(sizes)
    r0 = draw(st.integers(0, rows))
    r1 = draw(st.integers(r0, rows))
    scale = draw(st.sampled_from([1.0, 4.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = (np.random.default_rng(seed).standard_normal((rows, n)) * scale).astype(F32)
    if draw(st.booleans()):  # sprinkle extreme values
        flat = x.reshape(-1)
        picks = draw(st.lists(st.integers(0, flat.size - 1), max_size=4))
        specials = draw(st.lists(st.sampled_from([0.0, -0.0, 1e30, -1e30, 1e-40, np.nan]), min_size=4, max_size=4))
        flat[picks] = specials[: len(picks)]
    return x, r0, r1, draw(st.integers(0, 3)), draw(st.booleans())


@given(activation_case())
def test_activation_kernel(case):
    x, r0, r1, act, inplace = case
    sentinel = F32(123.25)
    if inplace:
        out = x.copy()
        activation(out, act, out, r0, r1)
    else:
        out = np.full_like(x, sentinel)
        activation(x, act, out, r0, r1)
    expect = ref.activation_ref(x[r0:r1], act)
    got = out[r0:r1].astype(np.float64)
    both_inf = np.isinf(got) & (got == expect)
    diff = np.where(both_inf, 0.0, np.abs(got - expect))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expect))
    finite = ~np.isnan(expect)
    tol = 1.5e-6 if act == ACT_GELU_ERF else 2e-7  # the rational-erf GELU: absolute error as PyTorch's
    assert np.all(diff[finite] <= tol + tol * np.abs(expect[finite]))
    # untouched rows
    untouched = np.ones(len(x), bool)
    untouched[r0:r1] = False
    if inplace:
        np.testing.assert_array_equal(out[untouched], x[untouched])
    else:
        assert np.all(out[untouched] == sentinel)
    # torch agrees on the finite part
    if torch is not None:
        tx = torch.from_numpy(x[r0:r1].copy())
        tref = {0: tx, 1: torch.relu(tx), 2: F.gelu(tx), 3: F.gelu(tx, approximate="tanh")}[act].numpy()
        fin = np.isfinite(x[r0:r1]) & np.isfinite(tref)
        np.testing.assert_allclose(out[r0:r1][fin], tref[fin], rtol=1e-6, atol=1e-6)


# ---- vectorisation ----------------------------------------------------------------------------------

def _fresh_asm(dispatcher, *args):
    """Compile an uncached copy (cached code cannot be inspected) and return its assembly."""
    if isinstance(dispatcher, numba.core.registry.CPUDispatcher):
        opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
        clone = numba.njit(**opts)(dispatcher.py_func)
    else:  # a plain function: the options every kernel uses
        clone = numba.njit(nogil=True, error_model="numpy")(dispatcher)
    clone(*args)
    return clone.inspect_asm(clone.signatures[0])


PACKED = re.compile(r"\bv(?:mul|fmadd\d*|fnmadd\d*|div|add)ps\s[^\n]*%[yz]mm")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 assembly check")
@pytest.mark.parametrize("fn", ["exp_f32", "exp_nonpos", "erf_f32", "tanh_f32", "gelu_erf", "gelu_tanh"])
def test_helpers_vectorise(fn):
    f = getattr(mathfn, fn)

    def loop(x, out):
        for i in range(x.shape[0]):
            out[i] = f(x[i])

    x = np.ones(64, F32)
    asm = _fresh_asm(loop, x, np.empty_like(x))
    assert PACKED.search(asm), f"{fn}: no packed ymm/zmm float arithmetic in the loop"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 assembly check")
def test_activation_kernel_vectorises():
    x = np.ones((2, 64), F32)
    asm = _fresh_asm(activation, x, ACT_GELU_ERF, np.empty_like(x), 0, 2)
    assert re.search(r"\bvdivps\s[^\n]*%[yz]mm", asm)  # GELU's division runs on full vectors
    assert re.search(r"\bvmaxps\s[^\n]*%[yz]mm|\bvcmp\w*ps\s[^\n]*%[yz]mm", asm)  # ReLU


def test_math_constants_are_float32():
    """A float64 constant would silently promote the helpers to float64 (and halve their width)."""
    for name in dir(mathfn):
        if name.startswith("_") and name[1:2].isupper():
            v = getattr(mathfn, name)
            if isinstance(v, (float, np.floating)):
                assert isinstance(v, np.float32), name
    assert math.isclose(float(mathfn._LOG2E), 1 / math.log(2), rel_tol=1e-7)
