"""Element-wise activation over rows (for graphs where it is not fused into a linear's epilogue).

The fp32 linear itself lives in gemm_f32.py (packed weights, fused epilogue).
Aliasing: a loop that reads one array and writes another gets a runtime overlap check from LLVM and
falls back to scalar code when they are the same buffer, so in-place work loops over `out` alone.
"""
from edgeformer.kernels._jit import helper, kernel
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_GELU_TANH, ACT_RELU, act_inplace, gelu_erf, gelu_tanh, relu


@helper
def _act_copy(src, dst, act):
    """dst[:] = act(src) for distinct 1-D rows."""
    n = src.shape[0]
    if act == ACT_RELU:
        for j in range(n):
            dst[j] = relu(src[j])
    elif act == ACT_GELU_ERF:
        for j in range(n):
            dst[j] = gelu_erf(src[j])
    elif act == ACT_GELU_TANH:
        for j in range(n):
            dst[j] = gelu_tanh(src[j])
    else:
        for j in range(n):
            dst[j] = src[j]


@kernel
def activation(x, act, out, r0, r1):
    """out[r0:r1] = act(x[r0:r1]) with an ACT_* code; x, out (T, n) f32; out may be x (in place)."""
    inplace = x.ctypes.data == out.ctypes.data
    for r in range(r0, r1):
        if inplace:
            act_inplace(out[r], act)  # (n,)
        else:
            _act_copy(x[r], out[r], act)  # (n,) -> (n,)
