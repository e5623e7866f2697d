"""Scalar float32 transcendental helpers that vectorise (numba.md §7), and the activation codes.

libm calls (np.exp, math.erf, np.tanh) inside njit are scalar calls that block vectorisation; these
helpers are plain float32 arithmetic, so a loop that calls them compiles to ymm/zmm code.

Rules followed throughout:
- every constant is a module-level np.float32: a Python float literal would promote float32
  arithmetic to float64 (Numba types float32 (op) float64 / int64 as float64);
- clamps are written `c if x > c else x`, which keeps NaN (a comparison with NaN is False), so NaN
  propagates through every helper;
- no fastmath: the rounding trick in exp_f32 and the Cody-Waite reduction need exact IEEE order.

Measured accuracy (float32 inputs, against float64 math; tests/test_kernels_math.py checks these):
    exp_f32    max relative error 8e-8 (<= 1 ulp) on normal results; overflows to inf above ~88.72;
               results below FLT_MIN (x < -87.33654) are flushed to 0 (no denormal arithmetic)
    erf_f32    max absolute error 1.4e-7 (polynomial for |x| < 1, 1 - erfc(|x|) beyond)
    tanh_f32   max absolute error 8e-8, relative 1.4e-7 (odd polynomial below 0.625, exp beyond)
    gelu_erf   table form (AVX-512 hosts, GELU_ERF_TABLE): max absolute error 2.8e-7 * max(1, |result|);
               rational form elsewhere: 1.4e-6 * max(1, |result|); both flush the far negative tail to 0
    gelu_tanh  max absolute error 5e-7 on |x| < 8 (~1 ulp of the result), relative-accurate tail
               down to |result| ~1e-37 (flushed to -0 below, x < ~-10)
Special values: NaN -> NaN everywhere; exp(+-inf) = inf, 0; erf/tanh(+-inf) = +-1; gelu(+inf) = inf,
gelu(-inf) = NaN (as torch's tanh GELU; x * Phi(x) is -inf * 0); -0.0 keeps its sign.
"""
import numpy as np
from numba.cpython.unsafe.numbers import viewer

from edgeformer.kernels._jit import helper

ACT_NONE = 0
ACT_RELU = 1
ACT_GELU_ERF = 2
ACT_GELU_TANH = 3
ACT_TANH = 4  # the ViT / BERT pooler's activation (activation op only; not a linear epilogue format)
ACT_CODES = {"none": ACT_NONE, "relu": ACT_RELU, "gelu": ACT_GELU_ERF, "gelu_erf": ACT_GELU_ERF,
             "gelu_tanh": ACT_GELU_TANH, "tanh": ACT_TANH}

_f = np.float32

_ZERO = _f(0.0)
_HALF = _f(0.5)
_ONE = _f(1.0)
_TWO = _f(2.0)

# ---- exp ------------------------------------------------------------------------------------------
# Results below FLT_MIN (x < -87.33654) are flushed to +0, and the input is clamped to
# [-87.33654, 89] first so that every intermediate stays a normal number: with gradual underflow,
# denormal intermediates made exp 2.4x and GELU 2.8x slower on inputs ~ N(0, 20^2) (measured here,
# Zen 4), the typical FFN pre-activation tail (and the -inf of masked softmax scores).
_EXP_HI = _f(89.0)  # exp(89) overflows to inf
_EXP_LO = _f(-87.33654)  # exp(-87.33654) = 1.1754997e-38 >= FLT_MIN, the next float below is < FLT_MIN
_LOG2E = _f(1.4426950408889634)
_ROUND_MAGIC = _f(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
_ROUND_MAGIC_BITS = 0x4B400000  # the bit pattern of _ROUND_MAGIC
_LN2_HI = _f(0.693359375)  # Cody-Waite: ln2 = HI + LO, HI has 9 significant bits so n*HI is exact
_LN2_LO = _f(-2.12194440e-4)
# Cephes expf minimax polynomial for exp(r) - 1 - r on |r| <= ln2/2
_EP0 = _f(1.9875691500e-4)
_EP1 = _f(1.3981999507e-3)
_EP2 = _f(8.3334519073e-3)
_EP3 = _f(4.1665795894e-2)
_EP4 = _f(1.6666665459e-1)
_EP5 = _f(5.0000001201e-1)


@helper
def _exp_reduced(x):
    """For x already clamped to [_EXP_LO, _EXP_HI]: (p, i) with exp(x) = p * 2**i, i = round(x * log2e)
    (Cody-Waite reduction, Cephes polynomial on |r| <= ln2/2)."""
    t = x * _LOG2E + _ROUND_MAGIC  # round(x*log2e) sits in the mantissa of t
    n = t - _ROUND_MAGIC
    i = np.int32(viewer(t, np.int32) - _ROUND_MAGIC_BITS)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    z = r * r
    p = (((((_EP0 * r + _EP1) * r + _EP2) * r + _EP3) * r + _EP4) * r + _EP5) * z + r + _ONE
    return p, i


@helper
def exp_f32(x):
    """exp(x) for float32 x; NaN -> NaN, +inf -> inf, -inf -> 0, results < FLT_MIN -> 0."""
    under = x < _EXP_LO
    x = _EXP_HI if x > _EXP_HI else x
    x = _EXP_LO if x < _EXP_LO else x
    p, i = _exp_reduced(x)
    # 2**n as 2**n1 * 2**n2: n reaches 128 for finite results just below FLT_MAX (exp(88.7)),
    # where a single exponent field would already encode inf.
    n1 = np.int32(i >> 1)
    n2 = np.int32(i - n1)
    s1 = viewer(np.int32((n1 + 127) << 23), np.float32)
    s2 = viewer(np.int32((n2 + 127) << 23), np.float32)
    e = (p * s1) * s2
    return _ZERO if under else e


@helper
def exp_nonpos(x):
    """exp(min(x, 0)) for float32 x: softmax's exp(s - max). NaN -> NaN, -inf -> 0, results < FLT_MIN -> 0.

    exp_f32 without the overflow side: n = round(x * log2e) lies in [-126, 0], so 2**n is one exponent
    field (one multiply instead of two) and there is no upper clamp to test. Same polynomial, same error."""
    under = x < _EXP_LO
    x = _ZERO if x > _ZERO else x
    x = _EXP_LO if x < _EXP_LO else x
    p, i = _exp_reduced(x)
    e = p * viewer(np.int32((i + 127) << 23), np.float32)
    return _ZERO if under else e


# ---- erf ------------------------------------------------------------------------------------------
# |x| < 1: erf(x) = x * P(x^2), P of degree 6 fitted (weighted least squares on Chebyshev nodes,
# float64, then rounded to float32) to erf(x)/x on [0, 1]: fit error 1.2e-9, so the float32 rounding
# (~1.4e-7) dominates. |x| >= 1: 1 - erfc(|x|) with the erfc below (error there <= 8e-8).
_ERF_SPLIT = _f(1.0)
_ERF_BIG = _f(10.0)  # erfc(10) underflows to 0 in float32
_EC0 = _f(1.1283791065216064)
_EC1 = _f(-0.3761262595653534)
_EC2 = _f(0.11283600330352783)
_EC3 = _f(-0.02685445174574852)
_EC4 = _f(0.005189547315239906)
_EC5 = _f(-0.0008020935347303748)
_EC6 = _f(7.889409607741982e-05)


@helper
def _erf_small(x):
    """erf(x) for float32 |x| <= 1 (x * P(x^2)); exact sign, -0.0 kept, tiny x -> x * 2/sqrt(pi)."""
    x2 = x * x
    p = _EC6 * x2 + _EC5
    p = p * x2 + _EC4
    p = p * x2 + _EC3
    p = p * x2 + _EC2
    p = p * x2 + _EC1
    p = p * x2 + _EC0
    return x * p


# ---- normal CDF tail, for GELU ---------------------------------------------------------------------
# Phi(-a) = erfc(a / sqrt2) / 2 for a >= 0, with the Numerical Recipes erfc (Chebyshev fit,
# fractional error < 1.2e-7 for every argument). Being relative-accurate in the tail, x * Phi(x)
# has no cancellation for negative x (0.5 * x * (1 + erf) loses everything there).
_INV_SQRT2 = _f(0.7071067811865476)
_ERFC_ARG_LO = _f(-80.0)
_NR0 = _f(-1.26551223)
_NR1 = _f(1.00002368)
_NR2 = _f(0.37409196)
_NR3 = _f(0.09678418)
_NR4 = _f(-0.18628806)
_NR5 = _f(0.27886807)
_NR6 = _f(-1.13520398)
_NR7 = _f(1.48851587)
_NR8 = _f(-0.82215223)
_NR9 = _f(0.17087277)


@helper
def _erfc_pos(z):
    """erfc(z) for float32 z >= 0 (NaN -> NaN), relative error ~1e-7 (float32 rounding bound)."""
    t = _ONE / (_ONE + _HALF * z)
    s = _NR9 * t + _NR8
    s = s * t + _NR7
    s = s * t + _NR6
    s = s * t + _NR5
    s = s * t + _NR4
    s = s * t + _NR3
    s = s * t + _NR2
    s = s * t + _NR1
    s = s * t + _NR0
    arg = s - z * z
    tiny = arg < _ERFC_ARG_LO  # erfc(z) < ~1e-36: flush to 0 without any denormal arithmetic
    arg = _ERFC_ARG_LO if tiny else arg
    e = t * exp_f32(arg)
    return _ZERO if tiny else e


@helper
def _phi_neg(a):
    """Phi(-a) = P(N(0,1) < -a) = erfc(a / sqrt2) / 2 for float32 a >= 0 (NaN -> NaN)."""
    return _HALF * _erfc_pos(a * _INV_SQRT2)


@helper
def erf_f32(x):
    """erf(x) for float32 x; NaN -> NaN, +-inf -> +-1, -0.0 -> -0.0, tiny x -> 2x/sqrt(pi)."""
    a = -x if x < _ZERO else x
    c = _ONE if x > _ONE else x
    c = -_ONE if c < -_ONE else c
    small = _erf_small(c)
    a = _ERF_BIG if a > _ERF_BIG else a
    big = _ONE - _erfc_pos(a)
    big = -big if x < _ZERO else big
    return small if a < _ERF_SPLIT else big


# ---- tanh -----------------------------------------------------------------------------------------
_TANH_SMALL = _f(0.625)
_TANH_BIG = _f(10.0)  # tanh(x) rounds to 1 from x ~ 9.01
# Cephes tanhf odd polynomial on |x| < 0.625
_TP0 = _f(-5.70498872745e-3)
_TP1 = _f(2.06390887954e-2)
_TP2 = _f(-5.37397155531e-2)
_TP3 = _f(1.33314422036e-1)
_TP4 = _f(-3.33332819422e-1)


@helper
def tanh_f32(x):
    """tanh(x) for float32 x; NaN -> NaN, +-inf -> +-1, tiny and -0.0 x -> x."""
    a = -x if x < _ZERO else x
    z = x * x
    small = ((((_TP0 * z + _TP1) * z + _TP2) * z + _TP3) * z + _TP4) * z * x + x
    a = _TANH_BIG if a > _TANH_BIG else a
    big = _ONE - _TWO / (exp_f32(_TWO * a) + _ONE)
    big = -big if x < _ZERO else big
    small = x if x == _ZERO else small  # keeps the sign of -0.0
    return small if a < _TANH_SMALL else big


# ---- activations ----------------------------------------------------------------------------------
_SQRT_2_OVER_PI = _f(0.7978845608028654)
_GELU_TANH_C = _f(0.044715)


@helper
def relu(x):
    """max(x, 0); NaN -> NaN, -0.0 -> -0.0 (as torch.relu)."""
    return _ZERO if x < _ZERO else x


# Rational approximation of erf on [-4, 4] (Eigen / XLA's float32 erf): erf(z) = z P(z^2) / Q(z^2),
# |z| > 4 rounds to +-1 in float32. No exp and one division: 0.37 ns per element against 1.23 ns for
# the erfc-tail form above, measured here. gelu = x/2 (1 + erf(x/sqrt2)) then has an absolute error
# <= 1.4e-6 (PyTorch's own vectorised GELU: 1.2e-6); relative accuracy in the far negative tail,
# where the result is tiny, is given up for speed.
_GA1 = _f(-1.60960333262415e-02)
_GA3 = _f(-2.95459980854025e-03)
_GA5 = _f(-7.34990630326855e-04)
_GA7 = _f(-5.69250639462346e-05)
_GA9 = _f(-2.10102402082508e-06)
_GA11 = _f(2.77068142495902e-08)
_GA13 = _f(-2.72614225801306e-10)
_GB0 = _f(-1.42647390514189e-02)
_GB2 = _f(-7.37332916720468e-03)
_GB4 = _f(-1.68282697438203e-03)
_GB6 = _f(-2.13374055278905e-04)
_GB8 = _f(-1.45660718464996e-05)
_FOUR = _f(4.0)


@helper
def gelu_erf_rational(x):
    """x/2 (1 + erf(x/sqrt2)) (torch gelu approximate='none'), |error| <= 1.4e-6 * max(1, |x|).

    +inf -> inf, -inf -> NaN, NaN -> NaN (the clamps are written so that NaN passes through).
    """
    z = x * _INV_SQRT2
    z = -_FOUR if z < -_FOUR else z
    z = _FOUR if z > _FOUR else z
    z2 = z * z
    p = z2 * _GA13 + _GA11
    p = z2 * p + _GA9
    p = z2 * p + _GA7
    p = z2 * p + _GA5
    p = z2 * p + _GA3
    p = z2 * p + _GA1
    q = z2 * _GB8 + _GB6
    q = z2 * q + _GB4
    q = z2 * q + _GB2
    q = z2 * q + _GB0
    return _HALF * x * (_ONE + z * p / q)


# GELU by table: x Phi(x) = x/2 + |x| g(|x|), g(a) = erf(a / sqrt2) / 2 a cubic in each of 32 intervals of
# width 3/16 on [0, 6): u = a * 16/3, i = trunc(u), t = u - i in [0, 1), g = ((c3[i] t + c2[i]) t + c1[i]) t
# + c0[i]. The cubics were fitted by least squares on 400 Chebyshev nodes per interval in float64
# (scipy.special.erf) and rounded to float32; the first passes through g(0) = 0 and then gets c0 = -1e-30, so
# that |x| * g is -0.0 at x = +-0 and x/2 + |x| g keeps the sign of a zero; the last interval is the
# constant 1/2 (erf(a/sqrt2)/2 rounds to 1/2 from a = 5.55), so x >= 5.8125 gives x and x <= -5.8125 exactly
# 0. |error| <= 2.8e-7 * max(1, |gelu|) against float64 (tests/test_kernels_math.py). Vectorised, each of
# the four lookups is one two-source permute (AVX-512 vpermt2ps: 32 entries in two registers), which with
# the fewer multiply-adds and no division made GELU in the int8 up-projection's epilogue ~30 % cheaper than
# the rational (kernels/act_ir.py; 72 -> 53 us per 128 x 1536 output on Zen 4, scratch measurement).
_GT3 = np.array([
    -0.0004321965971030295, -0.0003873842942994088, -0.0003060325398109853, -0.00020107656018808484,
    -8.857792272465304e-05, 1.602951124368701e-05, 0.000100798970379401, 0.00015895346587058157,
    0.00018916245608124882, 0.00019460811745375395, 0.0001813242706703022, 0.00015637361502740532,
    0.00012632820289582014, 9.631019202060997e-05, 6.963077612454072e-05, 4.790390084963292e-05,
    3.143857975373976e-05, 1.9719367628567852e-05, 1.1838394129881635e-05, 6.810242211940931e-06,
    3.7575600799755193e-06, 1.990003738683299e-06, 1.0122352023245185e-06, 4.947888783135568e-07,
    2.3252302128184965e-07, 1.0509647552225942e-07, 4.570170730744394e-08, 1.9126071393316124e-08,
    7.705123650225687e-09, 2.9887690100594e-09, 1.116481462837271e-09, 0.0], dtype=np.float32)
_GT2 = np.array([
    -4.734771664516302e-06, -0.0013106991536915302, -0.0024801348336040974, -0.003401927649974823,
    -0.004005019087344408, -0.004267304204404354, -0.004213530104607344, -0.0039045156445354223,
    -0.0034213154576718807, -0.002848648466169834, -0.0022612547036260366, -0.0017153650987893343,
    -0.0012457257835194468, -0.0008672148687765002, -0.0005793222808279097, -0.00037167291156947613,
    -0.00022915938461665064, -0.00013585857232101262, -7.748281495878473e-05, -4.252628059475683e-05,
    -2.246893745905254e-05, -1.1431418897700496e-05, -5.601612429018132e-06, -2.644299001985928e-06,
    -1.2027369393763365e-06, -5.271837153486558e-07, -2.227127851028854e-07, -9.069306372566643e-08,
    -3.560384342904399e-08, -1.3475869309331756e-08, -4.918047746826915e-09, 0.0], dtype=np.float32)
_GT1 = np.array([
    0.07480256259441376, 0.07350215315818787, 0.06972869485616684, 0.0638633519411087, 0.05647023767232895,
    0.04820747300982475, 0.03973150998353958, 0.03161410987377167, 0.024285733699798584,
    0.0180113073438406, 0.012896215543150902, 0.008914598263800144, 0.005949262995272875,
    0.0038330627139657736, 0.00238423771224916, 0.0014317710883915424, 0.0008300755871459842,
    0.0004646022862289101, 0.00025105237727984786, 0.0001309683284489438, 6.596095045097172e-05,
    3.2071991881821305e-05, 1.5055083167681005e-05, 6.82273275742773e-06, 2.9850482405890943e-06,
    1.2608456927409861e-06, 5.141502015248989e-07, 2.024116128040987e-07, 7.693041226275454e-08,
    2.8227855608520258e-08, 9.999419958717226e-09, 0.0], dtype=np.float32)
_GT0 = np.array([
    -1.0000000031710769e-30, 0.07436556369066238, 0.14616958796977997, 0.21311208605766296,
    0.27337244153022766, 0.32574909925460815, 0.36970534920692444, 0.40532416105270386,
    0.43319275975227356, 0.4542463719844818, 0.46960368752479553, 0.48041996359825134, 0.487775593996048,
    0.49260544776916504, 0.49566760659217834, 0.497542142868042, 0.49865013360977173, 0.49928247928619385,
    0.4996309280395508, 0.49981632828712463, 0.4999115765094757, 0.4999588429927826, 0.49998146295547485,
    0.49999192357063293, 0.4999966025352478, 0.49999862909317017, 0.499999463558197, 0.4999997913837433,
    0.49999991059303284, 0.4999999701976776, 0.5, 0.5], dtype=np.float32)
_GELU_SCALE = _f(32.0 / 6.0)
_GELU_UMAX = np.nextafter(_f(32.0), _f(0.0))  # u below 32: the index stays in the table
_ABS = np.uint32(0x7FFFFFFF)


@helper
def gelu_erf_table(x):
    """x/2 (1 + erf(x/sqrt2)) by the table above, |error| <= 2.8e-7 * max(1, |result|).
    +inf -> inf, -inf -> NaN, NaN -> NaN (NaN takes the last interval: in bounds), -0.0 -> -0.0."""
    a = viewer(np.uint32(viewer(x, np.uint32) & _ABS), np.float32)
    u = a * _GELU_SCALE
    u = u if u < _GELU_UMAX else _GELU_UMAX
    i = np.int32(u)
    t = u - np.float32(i)
    g = ((_GT3[i] * t + _GT2[i]) * t + _GT1[i]) * t + _GT0[i]
    return a * g + _HALF * x


def _table_gelu_host() -> bool:
    """Does this process use the table GELU? Where LLVM targets AVX-512 (the permutes); elsewhere the
    rational, so that the scalar helpers and the vector epilogues of kernels/act_ir.py always agree."""
    from edgeformer.kernels.host import cpu_overridden, host_features

    return not cpu_overridden() and bool(host_features().get("avx512f", False))


GELU_ERF_TABLE = _table_gelu_host()
gelu_erf = gelu_erf_table if GELU_ERF_TABLE else gelu_erf_rational


@helper
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (torch gelu approximate='tanh').

    Evaluated as x / (1 + exp(-2u)), the same function without cancellation for negative x.
    +inf -> inf, -inf -> NaN, NaN -> NaN.
    """
    u = _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)
    return x / (_ONE + exp_f32(-_TWO * u))


@helper
def apply_act(v, act):
    """Apply activation code `act` (ACT_*) to the float32 scalar v; unknown codes act as none."""
    if act == ACT_RELU:
        return relu(v)
    if act == ACT_GELU_ERF:
        return gelu_erf(v)
    if act == ACT_GELU_TANH:
        return gelu_tanh(v)
    if act == ACT_TANH:
        return tanh_f32(v)
    return v


@helper
def act_inplace(v, act):
    """v[:] = act(v) over a 1-D array view; the branch on `act` sits outside the loops so each vectorises."""
    n = v.shape[0]
    if act == ACT_RELU:
        for j in range(n):
            v[j] = relu(v[j])
    elif act == ACT_GELU_ERF:
        for j in range(n):
            v[j] = gelu_erf(v[j])
    elif act == ACT_GELU_TANH:
        for j in range(n):
            v[j] = gelu_tanh(v[j])
    elif act == ACT_TANH:
        for j in range(n):
            v[j] = tanh_f32(v[j])
