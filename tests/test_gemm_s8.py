"""kernels/gemm_s8.py: every int8 path this CPU can run, exactly against an integer NumPy reference.

- int32 accumulators (raw mode) must equal sum_k (a - zp) * w computed in int64 NumPy, bit for bit;
- the float epilogue must equal the same float32 operations done in NumPy (bit for bit without an
  activation; a few ulps with GELU, whose kernel is a polynomial);
- row and panel sub-ranges write exactly their block; odd K and N, M = 1..300 (Hypothesis);
- the VNNI path is never selected (nor compiled) when the CPU features say no.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.kernels import gemm_s8 as g
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_NONE, ACT_RELU
# the NumPy references (exact twins of the kernels' integer and float32 operations)
from edgeformer.reference.linear_int8 import acc_ref, epilogue_ref, quantize_rows_ref, quantize_rows_static_ref

F32 = np.float32
NO_BIAS = np.zeros(0, F32)
NO_RES = np.zeros((0, 0), F32)
NO_RAW = np.zeros((0, 0), np.int32)
PATHS = g.available_paths()
PATH_IDS = [g.PATH_NAMES[p] for p in PATHS]
SENTINEL_I = np.int32(-123456789)
SENTINEL_F = F32(-777.5)


# ---- helpers -------------------------------------------------------------------------------------

def make(m, k, n, seed, extreme=False):
    rng = np.random.default_rng(seed)
    if extreme:  # the accumulation bound's worst case: |a - zp| = 255, |w| = 127
        wq = np.where(rng.random((n, k)) < 0.5, -127, 127).astype(np.int8)
    else:
        wq = rng.integers(-127, 128, (n, k)).astype(np.int8)
    wp = g.pack_weight(wq)
    return rng, wq, wp, g.column_sums(wp)


def run_raw(path, aq, sa, zp, wp, cs, n, r0, r1, p0, p1):
    ws = np.ones(n, F32)
    raw = np.full((aq.shape[0], n), SENTINEL_I, np.int32)
    out = np.zeros((0, 0), F32)
    g.linear_s8(path)(aq, sa, zp, wp, cs, ws, n, NO_BIAS, NO_RES, ACT_NONE, out, raw, r0, r1, p0, p1)
    return raw


def padded_a(q, zp, kp):
    aq = np.empty((q.shape[0], kp), np.uint8)
    aq[:, :q.shape[1]] = q
    aq[:, q.shape[1]:] = zp[:, None].astype(np.uint8)
    return aq


# ---- packing and quantisation ------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(1, 1), (15, 3), (16, 4), (17, 5), (64, 384), (65, 33), (384, 1536)])
def test_pack_layout_roundtrip_and_colsum(n, k):
    _, wq, wp, cs = make(1, k, n, n * 7 + k)
    p, k4, width = wp.shape
    assert (p, k4, width) == g.packed_shape(n, k) and p % g.PANEL_GROUP == 0 and wp.dtype == np.int8
    np.testing.assert_array_equal(g.unpack_weight(wp, n, k), wq)
    for c in (0, n - 1):
        for kk in (0, k - 1):
            assert wp[c // 16, kk // 4, (c % 16) * 4 + kk % 4] == wq[c, kk]
    full = np.zeros((p * 16,), np.int64)
    full[:n] = wq.astype(np.int64).sum(axis=1)
    np.testing.assert_array_equal(cs, full)


def test_quantize_weight_per_channel():
    w = np.random.default_rng(0).standard_normal((9, 31)).astype(F32) * np.arange(1, 10, dtype=F32)[:, None]
    w[3] = 0
    wq, s = g.quantize_weight(w)
    assert wq.dtype == np.int8 and wq.min() >= -127 and s.dtype == F32 and np.all(s > 0)
    assert np.all(np.abs(wq).max(axis=1)[[0, 1, 2, 4, 5, 6, 7, 8]] == 127)
    assert np.abs(wq.astype(F32) * s[:, None] - w).max() <= s.max() / 2 * 1.0001


@pytest.mark.parametrize("asym", [0, 1])
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2 ** 31), zero_row=st.booleans())
def test_quantize_rows_exact(asym, m, k, seed, zero_row):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1, 30], (m, 1))).astype(F32)
    if rng.random() < 0.3:
        x = np.abs(x)  # all positive rows (post-ReLU-like): asymmetric zero point 0
    if zero_row:
        x[0] = 0
    kp = 4 * -(-k // 4)
    aq = np.full((m, kp), 7, np.uint8)
    sa = np.empty(m, F32)
    zp = np.empty(m, np.int32)
    g.quantize_rows(x, asym, aq, sa, zp, 0, m)
    q, s, z = quantize_rows_ref(x, asym)
    np.testing.assert_array_equal(aq[:, :k], q)
    np.testing.assert_array_equal(sa, s)
    np.testing.assert_array_equal(zp, z)
    assert np.all(aq[:, k:] == zp[:, None])  # K padding holds the zero point
    # dequantisation error <= half a step
    deq = (aq[:, :k].astype(F32) - zp[:, None]) * sa[:, None]
    assert np.all(np.abs(deq - x) <= sa[:, None] * 0.5001 + 1e-30)


# ---- GEMM: exact int32 accumulators ---------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 200), n=st.integers(1, 150), seed=st.integers(0, 2 ** 31),
       asym=st.booleans())
def test_accumulators_exact(path, m, k, n, seed, asym):
    rng, wq, wp, cs = make(m, k, n, seed)
    q = rng.integers(0, 256, (m, k)).astype(np.uint8)
    zp = (np.full(m, 128) if not asym else rng.integers(0, 256, m)).astype(np.int32)
    aq = padded_a(q, zp, wp.shape[1] * 4)
    raw = run_raw(path, aq, np.ones(m, F32), zp, wp, cs, n, 0, m, 0, wp.shape[0])
    np.testing.assert_array_equal(raw, acc_ref(aq, zp, wq))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 300), k=st.integers(1, 100), n=st.integers(1, 200), seed=st.integers(0, 2 ** 31),
       data=st.data())
def test_row_and_panel_subranges(path, m, k, n, seed, data):
    rng, wq, wp, cs = make(m, k, n, seed)
    zp = rng.integers(0, 256, m).astype(np.int32)
    aq = padded_a(rng.integers(0, 256, (m, k)).astype(np.uint8), zp, wp.shape[1] * 4)
    npn = g.path_blocking(path)[1]
    groups = wp.shape[0] // npn
    r0 = data.draw(st.integers(0, m))
    r1 = data.draw(st.integers(r0, m))
    q0 = data.draw(st.integers(0, groups))
    q1 = data.draw(st.integers(q0, groups))
    raw = run_raw(path, aq, np.ones(m, F32), zp, wp, cs, n, r0, r1, q0 * npn, q1 * npn)
    want = np.full((m, n), SENTINEL_I, np.int32)
    c0, c1 = min(q0 * npn * 16, n), min(q1 * npn * 16, n)
    want[r0:r1, c0:c1] = acc_ref(aq, zp, wq)[r0:r1, c0:c1]
    np.testing.assert_array_equal(raw, want)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("k", [4, 1537, 8192])
def test_worst_case_accumulation(path, k):
    """|a - zp| = 255 and |w| = 127 everywhere with equal signs: the largest sums, still exact."""
    m, n = 5, 33
    _, wq, wp, cs = make(m, k, n, k, extreme=True)
    wq[:, :] = 127
    wq[1::2, :] = -127
    wp, cs = g.pack_weight(wq), g.column_sums(g.pack_weight(wq))
    zp = np.array([0, 255, 0, 255, 128], np.int32)
    q = np.where(zp[:, None] == 0, 255, 0).astype(np.uint8).repeat(k, axis=1)
    aq = padded_a(q, zp, wp.shape[1] * 4)
    raw = run_raw(path, aq, np.ones(m, F32), zp, wp, cs, n, 0, m, 0, wp.shape[0])
    want = acc_ref(aq, zp, wq)
    assert np.abs(want).max() == 255 * 127 * k
    np.testing.assert_array_equal(raw, want)


def test_accumulation_bound_is_documented_and_safe():
    assert 255 * 127 * g.K_MAX < 2 ** 31 - 1
    assert 255 * 127 * (g.K_MAX + 2000) > 2 ** 31 - 1 or g.K_MAX + 2000 > 66311


# ---- static per-tensor activation quantisation (quantize_rows_static) ----------------------------------

def _readonly(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)  # like the smoothing vector mapped from a model file: one kernel signature
    return a


NO_SMOOTH_RO = _readonly(np.zeros(0, F32))


def run_static(x, asym, scale, z, smooth=None, r0=0, r1=None, kp=None):
    m, k = x.shape
    r1 = m if r1 is None else r1
    kp = 4 * -(-k // 4) if kp is None else kp
    aq = np.full((m, kp), 7, np.uint8)
    sa = np.full(m, SENTINEL_F, F32)
    zp = np.full(m, SENTINEL_I, np.int32)
    g.quantize_rows_static(np.ascontiguousarray(x, F32), asym, NO_SMOOTH_RO if smooth is None else _readonly(smooth),
                           np.array([scale], F32), np.array([z], np.int32), aq, sa, zp, r0, r1)
    return aq, sa, zp


@pytest.mark.parametrize("asym", [0, 1])
@settings(max_examples=min(40, settings.default.max_examples), deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2 ** 31), use_smooth=st.booleans(),
       log_scale=st.floats(-12, 6), z=st.integers(0, 255), data=st.data())
def test_quantize_rows_static_exact(asym, m, k, seed, use_smooth, log_scale, z, data):
    rng = np.random.default_rng(seed)
    scale = F32(2.0 ** log_scale)
    # values from well inside the range to ~3x beyond it (they clip)
    x = (rng.standard_normal((m, k)) * scale * rng.choice([1, 40, 400], (m, 1))).astype(F32)
    smooth = rng.uniform(0.25, 4, k).astype(F32) if use_smooth else None
    r0 = data.draw(st.integers(0, m))
    r1 = data.draw(st.integers(r0, m))
    aq, sa, zp = run_static(x, asym, scale, z, smooth, r0, r1)
    q, s, zz = quantize_rows_static_ref(x, asym, scale, z, smooth)
    np.testing.assert_array_equal(aq[r0:r1, :k], q[r0:r1])
    np.testing.assert_array_equal(sa[r0:r1], s[r0:r1])
    np.testing.assert_array_equal(zp[r0:r1], zz[r0:r1])
    assert np.all(zp[r0:r1] == (z if asym else 128))
    assert np.all(aq[r0:r1, k:] == zp[r0:r1, None])  # K padding holds the zero point
    assert np.all(aq[:r0] == 7) and np.all(aq[r1:] == 7) and np.all(sa[:r0] == SENTINEL_F)  # only rows r0:r1
    # inside the representable range the dequantisation error is <= half a step; outside, the end codes
    v = x[r0:r1] * (1 if smooth is None else smooth[None, :])
    sc = float(scale)
    lo, hi = ((-127 * sc, 127 * sc) if not asym else (-z * sc, (255 - z) * sc))
    deq = (aq[r0:r1, :k].astype(np.float64) - zp[r0:r1, None]) * scale
    inside = (v >= lo) & (v <= hi)
    assert np.all(np.abs(deq - v)[inside] <= scale * 0.5001)
    assert np.all(deq[v > hi] == hi) and np.all(deq[v < lo] == lo)


@pytest.mark.parametrize("asym, z", [(0, 128), (1, 0), (1, 77), (1, 255)])
def test_quantize_rows_static_clips_out_of_range(asym, z):
    s = F32(0.5)
    top, bottom = (255, 1) if not asym else (255, 0)
    x = np.array([[np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, np.nan, 0.0, -0.0, 63.5 + z * 0, 0.25, 0.75]], F32)
    aq, sa, zp = run_static(x, asym, s, z)
    want, _, _ = quantize_rows_static_ref(x, asym, s, z)
    np.testing.assert_array_equal(aq[:, :x.shape[1]], want)
    zero = 128 if not asym else z
    assert list(aq[0, :7]) == [top, bottom, top, bottom, top, bottom, top]  # NaN -> the top code
    assert aq[0, 7] == aq[0, 8] == zero  # 0 and -0 are exact
    assert aq[0, 10] == zero and aq[0, 11] == min(zero + 2, 255)  # x/s = 0.5 and 1.5 round half to even


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@settings(max_examples=min(30, settings.default.max_examples), deadline=None)
@given(m=st.integers(1, 200), k=st.integers(1, 150), n=st.integers(1, 120), seed=st.integers(0, 2 ** 31),
       asym=st.sampled_from([0, 1]), use_smooth=st.booleans(), use_bias=st.booleans(), use_res=st.booleans())
def test_static_linear_exact_every_path(path, m, k, n, seed, asym, use_smooth, use_bias, use_res):
    """quantize_rows_static, then the path's GEMM in its already-quantised mode (quant == 0, what the op runs):
    exact int32 accumulators and the bit-exact float epilogue of the integer reference."""
    rng, wq, wp, cs = make(m, k, n, seed)
    x = (rng.standard_normal((m, k)) * 2 + rng.uniform(-1, 1)).astype(F32)
    smooth = rng.uniform(0.5, 2, k).astype(F32) if use_smooth else None
    scale = F32(rng.uniform(0.005, 0.05))  # some of x clips
    z = int(rng.integers(0, 256)) if asym else 0
    ws = (rng.random(n) * 0.02 + 1e-3).astype(F32)
    bias = rng.standard_normal(n).astype(F32) if use_bias else None
    res = rng.standard_normal((m, n)).astype(F32) if use_res else None
    kp = wp.shape[1] * 4
    aq, sa, zp = run_static(x, asym, scale, z, smooth, kp=kp)
    q, s_ref, z_ref = quantize_rows_static_ref(x, asym, scale, z, smooth)
    acc = acc_ref(q, z_ref, wq)
    raw = np.full((m, n), SENTINEL_I, np.int32)
    out = np.full((m, n), SENTINEL_F, F32)
    sm = NO_SMOOTH_RO if smooth is None else _readonly(smooth)
    kern = g.linear_q(path)
    kern(x, asym, sm, 0, aq, sa, zp, wp, cs, ws, n, NO_BIAS, NO_RES, ACT_NONE, np.zeros((0, 0), F32), raw, 0, m, 0,
         wp.shape[0])
    np.testing.assert_array_equal(raw, acc)
    kern(x, asym, sm, 0, aq, sa, zp, wp, cs, ws, n, NO_BIAS if bias is None else bias, NO_RES if res is None else res,
         ACT_NONE, out, NO_RAW, 0, m, 0, wp.shape[0])
    np.testing.assert_array_equal(out, epilogue_ref(acc, s_ref, ws, bias, res, ACT_NONE))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("asym", [0, 1])
def test_static_worst_case_accumulation(path, asym):
    """Activations far outside the calibrated range clip to the end codes: |a - zp| = 255 (asymmetric, zp = 0
    or 255) or 127 (symmetric) against |w| = 127 over K = 8192 — the largest sums static rows can produce,
    still exact (255 * 127 * K < 2**31 for K <= K_MAX)."""
    m, n, k = 4, 33, 8192
    wq = np.full((n, k), 127, np.int8)
    wq[1::2] = -127
    wp = g.pack_weight(wq)
    cs = g.column_sums(wp)
    x = np.full((m, k), 1e6, F32)
    x[1::2] = -1e6
    rows = []
    for zero in ((0, 255) if asym else (128,)):
        aq, sa, zp = run_static(x, asym, F32(0.01), zero, kp=wp.shape[1] * 4)
        raw = run_raw(path, aq, sa, zp, wp, cs, n, 0, m, 0, wp.shape[0])
        want = acc_ref(aq, zp, wq)
        np.testing.assert_array_equal(raw, want)
        rows.append(np.abs(want).max())
    assert max(rows) == (255 if asym else 127) * 127 * k


# ---- GEMM: float epilogue ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU, ACT_GELU_ERF])
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 140), k=st.integers(1, 130), n=st.integers(1, 100), seed=st.integers(0, 2 ** 31),
       use_bias=st.booleans(), use_res=st.booleans(), asym=st.sampled_from([0, 1]))
def test_float_epilogue(path, act, m, k, n, seed, use_bias, use_res, asym):
    rng, wq, wp, cs = make(m, k, n, seed)
    x = rng.standard_normal((m, k)).astype(F32)
    kp = wp.shape[1] * 4
    aq, sa, zp = np.empty((m, kp), np.uint8), np.empty(m, F32), np.empty(m, np.int32)
    g.quantize_rows(x, asym, aq, sa, zp, 0, m)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(F32)
    bias = rng.standard_normal(n).astype(F32) if use_bias else None
    res = rng.standard_normal((m, n)).astype(F32) if use_res else None
    out = np.full((m, n), SENTINEL_F, F32)
    g.linear_s8(path)(aq, sa, zp, wp, cs, ws, n, NO_BIAS if bias is None else bias, NO_RES if res is None else res,
                      act, out, NO_RAW, 0, m, 0, wp.shape[0])
    want = epilogue_ref(acc_ref(aq, zp, wq), sa, ws, bias, res, act)
    if act == ACT_GELU_ERF:
        # the kernel's erf has absolute error 1.4e-6, so GELU = x/2 (1 + erf) errs by up to ~0.7e-6 |x|
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=5e-6)
    else:
        np.testing.assert_array_equal(out, want)  # the same float32 operations in the same order


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU])
def test_float_epilogue_several_row_chunks(path, act):
    """Wide outputs make the driver split the rows into chunks (_OUT_BUDGET): every chunk gets the fused store
    (activation and residual in registers) and the edge blocks (last rows, n % 16 != 0) the scalar pass."""
    m, k, n = 75, 36, 1571
    assert g._OUT_BUDGET // (4 * n) < m  # more than one chunk
    rng, wq, wp, cs = make(m, k, n, 7)
    x = rng.standard_normal((m, k)).astype(F32)
    aq, sa, zp = np.empty((m, wp.shape[1] * 4), np.uint8), np.empty(m, F32), np.empty(m, np.int32)
    g.quantize_rows(x, 1, aq, sa, zp, 0, m)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    res = rng.standard_normal((m, n)).astype(F32)
    out = np.full((m, n), SENTINEL_F, F32)
    g.linear_s8(path)(aq, sa, zp, wp, cs, ws, n, bias, res, act, out, NO_RAW, 0, m, 0, wp.shape[0])
    np.testing.assert_array_equal(out, epilogue_ref(acc_ref(aq, zp, wq), sa, ws, bias, res, act))


# ---- requantising epilogue (linear_requant): y never stored, quantised for the next linear ----------------

def run_requant(path, aq, sa, zp, wp, cs, ws, n, bias, act, asym2, smooth2, static2, scale2, z2, r0, r1):
    m = aq.shape[0]
    kp2 = 4 * -(-n // 4)
    aq2 = np.full((m, kp2), 7, np.uint8)
    sa2 = np.full(m, SENTINEL_F, F32)
    zp2 = np.full(m, SENTINEL_I, np.int32)
    x = np.zeros((m, 1), F32)  # unused: quant = 0 (aq already holds the rows)
    g.linear_requant(path)(x, 1, NO_BIAS, 0, aq, sa, zp, wp, cs, ws, n, bias, act, asym2,
                           NO_BIAS if smooth2 is None else smooth2, int(static2), np.array([scale2], F32),
                           np.array([z2], np.int32), aq2, sa2, zp2, r0, r1)
    return aq2, sa2, zp2


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("act", [ACT_NONE, ACT_RELU])
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 90), k=st.integers(1, 70), n=st.integers(1, 1600), seed=st.integers(0, 2 ** 31),
       asym2=st.sampled_from([0, 1]), static2=st.booleans(), use_smooth2=st.booleans(), data=st.data())
def test_requant_equals_store_then_quantize(path, act, m, k, n, seed, asym2, static2, use_smooth2, data):
    """The codes, scales and zero points are exactly those of storing y (the float epilogue) and quantising
    it with the next linear's quantiser; only rows r0:r1 are written; several row chunks when n is large."""
    rng, wq, wp, cs = make(m, k, n, seed)
    x = rng.standard_normal((m, k)).astype(F32)
    aq, sa, zp = np.empty((m, wp.shape[1] * 4), np.uint8), np.empty(m, F32), np.empty(m, np.int32)
    g.quantize_rows(x, 1, aq, sa, zp, 0, m)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    smooth2 = rng.uniform(0.25, 4, n).astype(F32) if use_smooth2 else None
    scale2, z2 = F32(0.01 * 2.0 ** rng.integers(-3, 4)), int(rng.integers(0, 256)) if asym2 else 128
    r0 = data.draw(st.integers(0, m))
    r1 = data.draw(st.integers(r0, m))
    aq2, sa2, zp2 = run_requant(path, aq, sa, zp, wp, cs, ws, n, bias, act, asym2, smooth2, static2, scale2, z2, r0, r1)
    y = epilogue_ref(acc_ref(aq, zp, wq), sa, ws, bias, None, act)
    if static2:
        q, s_, z_ = quantize_rows_static_ref(y, asym2, scale2, z2, smooth2)
    else:
        q, s_, z_ = quantize_rows_ref(y, asym2, smooth2)
    np.testing.assert_array_equal(aq2[r0:r1, :n], q[r0:r1])
    np.testing.assert_array_equal(sa2[r0:r1], s_[r0:r1])
    np.testing.assert_array_equal(zp2[r0:r1], z_[r0:r1])
    assert np.all(aq2[r0:r1, n:] == zp2[r0:r1, None])  # K padding of the next linear holds the zero point
    assert np.all(aq2[:r0] == 7) and np.all(aq2[r1:] == 7) and np.all(zp2[:r0] == SENTINEL_I)


# ---- path selection ----------------------------------------------------------------------------------

def test_vnni_not_selected_without_the_feature(monkeypatch):
    no_vnni = {"avx512f": True, "avx512bw": True, "avx512vl": True, "avx512vnni": False, "avx2": True}
    # without VNNI: the sdot path on an aarch64 CPU with dotprod (emulated Pi 5), the AVX2 one on x86-64 with
    # AVX2, the portable one elsewhere
    def fallback_for(features):
        if g.dotprod_available(features):
            return g.PATH_SDOT
        return g.PATH_AVX2 if g.avx2_available(features) else g.PATH_PAIRS

    fallback = fallback_for(no_vnni)
    assert not g.vnni_available(no_vnni)
    assert g.select_path(no_vnni) == fallback
    assert g.available_paths(no_vnni) == sorted({g.PATH_PAIRS, fallback})
    assert g.select_path({}) == fallback_for({})
    assert g.PATH_AVX2 not in g.available_paths({})
    yes = dict(no_vnni, avx512vnni=True)
    monkeypatch.delenv("EDGEFORMER_INT8_PATH", raising=False)
    if not g._cpu_overridden():
        assert g.select_path(yes) == g.PATH_VNNI
    # the host-feature dict itself monkeypatched: the op layer's choice follows it, and asking for the
    # VNNI kernel raises in Python instead of compiling anything
    monkeypatch.setattr(g, "host_features", lambda: dict(no_vnni))
    assert not g.vnni_available() and g.select_path() == fallback
    with pytest.raises(RuntimeError, match="VNNI"):
        g.linear_s8(g.PATH_VNNI)


def test_vnni_not_selected_when_numba_cpu_is_overridden(monkeypatch):
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    yes = {"avx512f": True, "avx512bw": True, "avx512vl": True, "avx512vnni": True, "avx2": True}
    assert not g.vnni_available(yes) and g.select_path(yes) != g.PATH_VNNI
    assert not g.avx2_available(yes) and g.select_path(yes) not in (g.PATH_VNNI, g.PATH_AVX2)


def test_avx2_path_only_on_x86_64(monkeypatch):
    monkeypatch.setattr(g._llb, "get_process_triple", lambda: "aarch64-unknown-linux-gnu")
    assert not g.avx2_available({"avx2": True})
    monkeypatch.setattr(g._llb, "get_process_triple", lambda: "x86_64-unknown-linux-gnu")
    assert g.avx2_available({"avx2": True}) is not g._cpu_overridden()
    assert not g.avx2_available({"avx2": False})
    if not g.avx2_available():
        with pytest.raises(RuntimeError, match="AVX2"):
            g.linear_q(g.PATH_AVX2)


def test_forced_portable_path(monkeypatch):
    monkeypatch.setenv("EDGEFORMER_INT8_PATH", "pairs")
    assert g.select_path() == g.PATH_PAIRS


def test_every_runnable_path_is_tested():
    assert g.PATH_PAIRS in PATHS
    if g.vnni_available():
        assert g.PATH_VNNI in PATHS
    if g.avx2_available():
        assert g.PATH_AVX2 in PATHS


def test_quantize_weight_mse_never_worse_than_maxabs():
    w = np.random.default_rng(3).standard_normal((20, 300)).astype(F32)
    w[0, 0] = 25.0  # an outlier: clipping pays
    errs = {}
    for method in ("maxabs", "mse"):
        wq, s = g.quantize_weight(w, method)
        assert wq.min() >= -127 and np.all(s > 0)
        errs[method] = ((wq.astype(np.float64) * s[:, None] - w) ** 2).sum(axis=1)
    assert np.all(errs["mse"] <= errs["maxabs"] + 1e-12)
    with pytest.raises(ValueError):
        g.quantize_weight(w, "percentile")


# ---- aarch64 paths, cross-compiled (LLVM only compiles here, nothing runs) ---------------------------

def _target_available(triple):
    import llvmlite.binding as llb

    llb.initialize_all_targets()
    try:
        llb.Target.from_triple(triple)
        return True
    except RuntimeError:
        return False


def _aarch64_target_available():
    return _target_available("aarch64-unknown-linux-gnu")


_X86 = pytest.mark.skipif(not _target_available("x86_64-unknown-linux-gnu"), reason="no X86 target in llvmlite")


@pytest.mark.skipif(not _aarch64_target_available(), reason="llvmlite built without the AArch64 target")
@pytest.mark.parametrize("cpu, dotprod", [("cortex-a72", False), ("cortex-a76", True), ("neoverse-n1", True),
                                          ("generic", False)])
def test_arm_path_selection_and_instructions(cpu, dotprod):
    assert g.dotprod_available(features={}, cpu_name=cpu, cpu_features="", aarch64=True) is dotprod
    path = g.PATH_SDOT if dotprod else g.PATH_PAIRS
    asm = g.micro_asm(path, cpu)
    words = {ln.split()[0] for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "//"))}
    if dotprod:
        assert "sdot" in words
    else:
        assert not words & {"sdot", "udot", "usdot", "sudot"}


def _x86_words(asm):
    return {ln.split()[0] for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "#"))}


@pytest.mark.parametrize("path, triple, cpu, needed", [
    pytest.param(g.PATH_VNNI, "x86_64-unknown-linux-gnu", "znver4", {"vpdpbusd", "vcvtdq2ps", "vmulps", "vaddps"},
                 marks=_X86),
    pytest.param(g.PATH_VNNI, "x86_64-unknown-linux-gnu", "icelake-server", {"vpdpbusd", "vcvtdq2ps"}, marks=_X86),
    pytest.param(g.PATH_PAIRS, "x86_64-unknown-linux-gnu", "haswell", {"vpmaddwd", "vcvtdq2ps"}, marks=_X86),
    pytest.param(g.PATH_AVX2, "x86_64-unknown-linux-gnu", "haswell",
                 {"vpmaddwd", "vpmovsxbw", "vpbroadcastq", "vcvtdq2ps"}, marks=_X86),
    pytest.param(g.PATH_SDOT, "aarch64-unknown-linux-gnu", "cortex-a76", {"sdot", "scvtf", "fmul", "fadd"},
                 marks=pytest.mark.skipif(not _aarch64_target_available(), reason="no AArch64 target in llvmlite")),
])
def test_fused_store_compiles_for_every_path(path, triple, cpu, needed):
    """The scaled-float store (`_micro_s8_f32`) is the same IR for every path; paths this host cannot run are
    at least compiled for a CPU that has them (nothing runs). The exact results are tested on the paths the
    host runs (test_float_epilogue)."""
    asm = g.micro_asm(path, cpu, triple=triple, fused_store=True)
    words = _x86_words(asm) if triple.startswith("x86") else {
        ln.split()[0] for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".", "//"))}
    assert needed <= words, needed - words
    if path != g.PATH_VNNI:
        assert "vpdpbusd" not in words


def test_dotprod_selection_rules(monkeypatch):
    assert not g.dotprod_available(features={"dotprod": True}, cpu_name="", cpu_features="", aarch64=False)
    assert g.dotprod_available(features={"dotprod": True}, cpu_name="", cpu_features="", aarch64=True)
    assert not g.dotprod_available(features={"dotprod": False}, cpu_name="", cpu_features="", aarch64=True)
    # an explicit target CPU wins over the host's features (qemu: the host sees no cpuinfo)
    assert not g.dotprod_available(features={"dotprod": True}, cpu_name="cortex-a72", cpu_features="", aarch64=True)
    assert g.dotprod_available(features={}, cpu_name="cortex-a72", cpu_features="+neon,+dotprod", aarch64=True)
    assert not g.dotprod_available(features={}, cpu_name="cortex-a76", cpu_features="+neon,-dotprod", aarch64=True)
    if not g._is_aarch64():
        assert g.PATH_SDOT not in g.available_paths()
        with pytest.raises(RuntimeError, match="sdot"):
            g.linear_s8(g.PATH_SDOT)
