"""kernels/act_ir.py: the IR activations of the GEMM epilogues against mathfn's Numba helpers and float64.

The IR repeats mathfn's operations in order with the same constants and contraction, so on the same CPU
the results agree to an ulp or two (FMA formation may differ between the two compilations); the float64
references bound the error as in tests/test_kernels_math.py."""
import numpy as np
import pytest
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from edgeformer.kernels import act_ir
from edgeformer.kernels._jit import kernel
from edgeformer.kernels.mathfn import (ACT_GELU_ERF, ACT_GELU_TANH, ACT_NONE, ACT_RELU, gelu_erf, gelu_tanh,
                                       relu)
from edgeformer.reference import activation as ref

F32 = np.float32
W = 16  # lanes per vector in these tests


def _make_act(width):
    @intrinsic
    def act_n(typingctx, x, off, out, act):
        """out[off:off+width] = act(x[off:off+width]) on one <width x float> vector."""
        sig = types.void(x, types.intp, out, types.int64)

        def codegen(context, builder, signature, args):
            vty = ir.VectorType(ir.FloatType(), width)

            def ptr(i, arr):
                data = context.make_array(signature.args[i])(context, builder, arr).data
                return builder.bitcast(builder.gep(data, [args[1]]), vty.as_pointer())

            (res,) = act_ir.emit_activation_switch(builder, args[3], [builder.load(ptr(0, args[0]), align=4)])
            builder.store(res, ptr(2, args[2]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return act_n


_act16 = _make_act(W)


@kernel(fastmath={"contract"})
def _ir_map(x, out, act):
    for off in range(0, x.shape[0], W):
        _act16(x, off, out, act)


@kernel(fastmath={"contract"})
def _helper_map(x, out, act):
    for i in range(x.shape[0]):
        v = x[i]
        if act == ACT_RELU:
            out[i] = relu(v)
        elif act == ACT_GELU_ERF:
            out[i] = gelu_erf(v)
        elif act == ACT_GELU_TANH:
            out[i] = gelu_tanh(v)
        else:
            out[i] = v


def inputs(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(F32)
    x = np.concatenate([np.linspace(-12, 12, 400_000, dtype=F32), bits[np.isfinite(bits)],
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 88.7, -90.0, 4.0,
                                  -4.0, 5.657, -5.657], F32)])
    return np.concatenate([x, np.zeros(-len(x) % W, F32)])


@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU, ACT_GELU_ERF, ACT_GELU_TANH, 17])
def test_ir_activation_matches_helpers(act):
    x = inputs(act)
    got, want = np.empty_like(x), np.empty_like(x)
    _ir_map(x, got, act)
    _helper_map(x, want, act)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    if act in (ACT_NONE, ACT_RELU, 17):  # selects only: bit for bit, -0.0 and NaN included
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        return
    finite = ~nan
    ulp = np.spacing(np.abs(want[finite]).astype(F32)).astype(np.float64)
    g, w = got[finite].astype(np.float64), want[finite].astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(g == w, 0.0, np.abs(g - w))  # inf == inf
    assert np.all((diff <= 2 * ulp) | (diff <= 1e-30)), diff.max()
    # against float64: the bounds of tests/test_kernels_math.py
    body = finite & (np.abs(x) < 12)
    r = (ref.gelu_erf if act == ACT_GELU_ERF else ref.gelu_tanh)(x[body])
    err = np.abs(got[body].astype(np.float64) - r)
    assert np.all(err <= 1.5e-6 * np.maximum(1.0, np.abs(r))), err.max()


_act8, _act32 = _make_act(8), _make_act(32)


@kernel(fastmath={"contract"})
def _ir_map_8_32(x, out8, out32, act):
    for off in range(0, x.shape[0], 32):
        _act8(x, off, out8, act)
        _act8(x, off + 8, out8, act)
        _act8(x, off + 16, out8, act)
        _act8(x, off + 24, out8, act)
        _act32(x, off, out32, act)


@pytest.mark.parametrize("act", [ACT_GELU_ERF, ACT_GELU_TANH])
def test_ir_activation_any_vector_width(act):
    """8- and 32-lane vectors (the AVX2 and wide epilogues; the table GELU pads or splits them into 16-lane
    permutes) give the 16-lane results."""
    x = inputs(act + 100)
    x = np.concatenate([x, np.zeros(-len(x) % 32, F32)])
    want, got8, got32 = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    _ir_map(x, want, act)
    _ir_map_8_32(x, got8, got32, act)
    np.testing.assert_array_equal(got8.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(got32.view(np.uint32), want.view(np.uint32))


def test_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0] + [0.0] * 11, F32)
    for act in (ACT_GELU_ERF, ACT_GELU_TANH):
        y = np.empty_like(x)
        _ir_map(x, y, act)
        assert y[0] == np.inf and np.isnan(y[1]) and np.isnan(y[2])
        assert y[3] == 0 and y[4] == 0 and np.signbit(y[4])
    y = np.empty_like(x)
    _ir_map(x, y, ACT_RELU)
    assert y[0] == np.inf and y[1] == 0 and np.isnan(y[2]) and np.signbit(y[4])
