"""Clipped-softmax attention and the attention gate (kernels/attention_clipped.py, ops/attention_quantizable.py)
against the float64 NumPy reference and PyTorch (torch.clamp of a masked softmax; torch.sigmoid gate).

Tolerances follow tests/test_attention.py: the clip x -> clip((zeta - gamma) x + gamma, 0, 1) is
(zeta - gamma)-Lipschitz, so the softmax tolerance there, times (zeta - gamma), bounds the clipped output
error (the row sums of |p'| are <= (zeta - gamma) too). The gate adds a relative error of a few float32
ulps of the gate (a float32 dot product of width dh or d_model and exp_f32).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.errors import GraphError
from edgeformer.kernels.attention import attention_softmax
from tests.test_attention import tolerance as attention_tolerance
from edgeformer.kernels.attention_clipped import attention_clipped_softmax, attention_gate
from edgeformer.reference.attention import (attention_gate_ref, attention_ref, clipped_probs_ref,
                                            packed_attention_ref, packed_gated_attention_ref, unpack_qkv)
from tests.optional import requires_torch, torch
from tests.test_attention import assert_close, make_case, tolerance

HEAD_DIMS = [1, 8, 33]
GAMMAS = [0.0, -1e-4, -0.025, -0.1, -0.3, -2.0]
ZETAS = [1.0, 1.0, 1.003, 1.5]


def run_clipped(qkv, cu, H, dh, scale, causal, gamma, zeta, w0=None, w1=None, out=None):
    qkv = np.ascontiguousarray(qkv, dtype=np.float32)
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if out is None:
        out = np.zeros((qkv.shape[0], H * dh), np.float32)
    w0 = 0 if w0 is None else w0
    w1 = (len(cu) - 1) * H if w1 is None else w1
    attention_clipped_softmax(qkv, cu, int(H), int(dh), float(scale), bool(causal), float(gamma), float(zeta), out,
                              int(w0), int(w1))
    return out


def run_gate(x, gate_w, gate_b, cu, H, dh, out, all_heads, gate_scale=1.0, w0=None, w1=None):
    w0 = 0 if w0 is None else w0
    w1 = (len(cu) - 1) * H if w1 is None else w1
    attention_gate(np.ascontiguousarray(x, np.float32), np.array(gate_w, np.float32, order="C"),
                   np.array(gate_b, np.float32, order="C"), bool(all_heads), float(gate_scale),
                   np.ascontiguousarray(cu, np.int64), int(H), int(dh), out, int(w0), int(w1))
    return out


def torch_clipped_packed(qkv, cu, H, dh, scale, causal, gamma, zeta):
    """torch: clamp((zeta - gamma) * softmax(masked scores) + gamma, 0, 1) @ V on the padded batch; valid rows."""
    q, k, v, key_mask = unpack_qkv(qkv, cu, H, dh)
    S = q.shape[2]
    allowed = torch.from_numpy(key_mask)[:, None, None, :].expand(-1, 1, S, S)  # (B, 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
    with torch.no_grad():
        s = torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2) * scale  # (B, H, S, S)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        p = torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)
        o = (p @ torch.from_numpy(v)).numpy()  # (B, H, S, dh); NaN rows on padding queries
    out = np.zeros((qkv.shape[0], H * dh), np.float32)
    for b in range(len(cu) - 1):
        L = int(cu[b + 1] - cu[b])
        out[cu[b] : cu[b + 1]] = o[b, :, :L].transpose(1, 0, 2).reshape(L, H * dh)
    return out


lengths_st = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 130]), st.integers(0, 140))


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    lengths = draw(st.lists(lengths_st, min_size=B, max_size=B))
    H = draw(st.integers(1, 4))
    dh = draw(st.sampled_from(HEAD_DIMS))
    causal = draw(st.booleans())
    magnitude = draw(st.sampled_from([1.0, 1.0, 3.0, 10.0]))
    gamma = draw(st.sampled_from(GAMMAS))
    zeta = draw(st.sampled_from(ZETAS))
    seed = draw(st.integers(0, 2**32 - 1))
    return lengths, H, dh, causal, magnitude, gamma, zeta, seed


@given(cases())
def test_clipped_matches_reference_and_torch(case):
    lengths, H, dh, causal, magnitude, gamma, zeta, seed = case
    qkv, cu = make_case(lengths, H, dh, magnitude, seed)
    scale = 1.0 / math.sqrt(dh)
    got = run_clipped(qkv, cu, H, dh, scale, causal, gamma, zeta)
    assert np.isfinite(got).all()
    tol = tolerance(qkv, cu, H, dh, scale) * (zeta - gamma)
    assert_close(got, packed_attention_ref(qkv, cu, H, dh, scale, causal, gamma, zeta), tol, "vs numpy reference")
    if torch is not None and max(lengths) > 0:
        assert_close(got, torch_clipped_packed(qkv, cu, H, dh, scale, causal, gamma, zeta), 2 * tol, "vs torch")


@settings(max_examples=15)
@given(cases(), st.data())
def test_clipped_work_subrange_writes_only_its_items(case, data):
    lengths, H, dh, causal, magnitude, gamma, zeta, seed = case
    qkv, cu = make_case(lengths, H, dh, magnitude, seed)
    n_items = len(lengths) * H
    w0 = data.draw(st.integers(0, n_items))
    w1 = data.draw(st.integers(w0, n_items))
    full = run_clipped(qkv, cu, H, dh, 0.3, causal, gamma, zeta)
    sentinel = np.float32(-7.25)
    out = np.full_like(full, sentinel)
    run_clipped(qkv, cu, H, dh, 0.3, causal, gamma, zeta, w0, w1, out=out)
    inside = np.zeros(full.shape, bool)
    for w in range(w0, w1):
        b, h = divmod(w, H)
        inside[cu[b] : cu[b + 1], h * dh : (h + 1) * dh] = True
    assert np.array_equal(out[inside], full[inside])
    assert (out[~inside] == sentinel).all()


def probabilities_case(L, seed, spread=3.0):
    """One head with V = identity (dh = L): the output row of query i is its clipped probability row."""
    rng = np.random.default_rng(seed)
    qk = rng.standard_normal((L, 2)).astype(np.float32) * spread
    qkv = np.zeros((L, 3 * L), np.float32)
    qkv[:, 0:2] = qk  # q = (a, b, 0, ...)
    qkv[:, L : L + 2] = rng.standard_normal((L, 2)).astype(np.float32) * spread
    qkv[:, 2 * L :] = np.eye(L, dtype=np.float32)
    return qkv, np.array([0, L], np.int64)


@pytest.mark.parametrize("gamma, zeta", [(-0.025, 1.0), (-0.1, 1.0), (-0.05, 1.2)])
@pytest.mark.parametrize("causal", [False, True])
def test_clipping_thresholds_exact_zeros_and_ones(gamma, zeta, causal):
    L = 40
    qkv, cu = probabilities_case(L, seed=5)
    got = run_clipped(qkv, cu, 1, L, 1.0, causal, gamma, zeta).astype(np.float64)  # (L, L) = P'
    p = packed_attention_ref(qkv, cu, 1, L, 1.0, causal)  # (L, L) plain softmax probabilities
    low, high = -gamma / (zeta - gamma), (1 - gamma) / (zeta - gamma)
    margin = 1e-5  # p's float32 error is far below this
    assert (got[p < low - margin] == 0.0).all()
    assert (got[p > high + margin] == 1.0).all()
    inside = (p > low + margin) & (p < high - margin)
    np.testing.assert_allclose(got[inside], (zeta - gamma) * p[inside] + gamma, rtol=1e-5, atol=1e-6)
    assert ((got > 0) == (p > low)).mean() > 0.99  # borderline p's aside, the zero pattern is the threshold's
    assert (p < low - margin).sum() > L  # the case really exercises the clip
    if causal:
        assert (np.triu(got, 1) == 0).all()  # masked future keys stay exactly 0
    sums = got.sum(1)
    assert np.abs(sums - 1).max() > 1e-3  # rows no longer sum to 1


def test_one_hot_rows_clip_to_exactly_one():
    """A row with one dominant key (p ~ 1) gives exactly 1 on it when zeta > 1, and the output is that V."""
    L, dh = 70, 3
    qkv = np.zeros((L, 3 * dh), np.float32)
    qkv[:, 0] = 50.0
    qkv[:, dh] = np.arange(L, dtype=np.float32)  # key L-1 wins by exp(50) for every query
    qkv[:, 2 * dh :] = np.random.default_rng(0).standard_normal((L, dh))
    got = run_clipped(qkv, np.array([0, L]), 1, dh, 1.0, False, -0.01, 1.1)
    np.testing.assert_array_equal(got, np.broadcast_to(qkv[L - 1, 2 * dh :], (L, dh)))


def test_gamma_zero_zeta_one_is_softmax():
    qkv, cu = make_case([0, 1, 65, 130], 2, 8, 3.0, seed=11)
    for causal in (False, True):
        got = run_clipped(qkv, cu, 2, 8, 0.4, causal, 0.0, 1.0)
        soft = np.zeros_like(got)
        attention_softmax(qkv, cu, 2, 8, 0.4, causal, soft, 0, 8)
        # two float32 kernels that round differently (normalise before / after P V): each is within the
        # attention tolerance of the float64 reference, so they differ by at most twice that
        np.testing.assert_array_less(np.abs(got - soft), 2 * attention_tolerance(qkv, cu, 2, 8, 0.4))
    # the reference: bit for bit
    q, k, v, mask = unpack_qkv(qkv, cu, 2, 8)
    assert np.array_equal(attention_ref(q, k, v, mask, 0.4, True, 0.0, 1.0), attention_ref(q, k, v, mask, 0.4, True))


def test_everything_clipped_gives_zeros():
    """gamma so negative that no probability survives: p' = 0 everywhere, output exactly 0."""
    qkv, cu = make_case([5, 90], 2, 4, 1.0, seed=3)
    got = run_clipped(qkv, cu, 2, 4, 0.5, False, -1e6, 1.0)
    assert (got == 0).all()


def test_reference_clipped_probs_threshold():
    gamma, zeta = -0.025, 1.0
    thr = -gamma / (zeta - gamma)
    assert abs(thr - 0.02439) < 1e-5
    p = np.array([0.0, thr * 0.999, thr * 1.001, 0.5, 1.0])
    got = clipped_probs_ref(p, gamma, zeta)
    assert got[0] == 0 and got[1] == 0 and got[2] > 0 and abs(got[4] - 1.0) < 1e-15
    assert clipped_probs_ref(np.array([0.95]), -0.1, 1.2)[0] == 1.0  # p > (1 - gamma) / (zeta - gamma) = 0.846
    np.testing.assert_allclose(got[3], 1.025 * 0.5 - 0.025)


# ---- the gate --------------------------------------------------------------------------------------------
@st.composite
def gate_cases(draw):
    lengths = draw(st.lists(st.integers(0, 30), min_size=1, max_size=3))
    H = draw(st.integers(1, 4))
    dh = draw(st.sampled_from(HEAD_DIMS))
    all_heads = draw(st.booleans())
    d_model = H * dh + (draw(st.integers(0, 5)) if all_heads else 0)
    magnitude = draw(st.sampled_from([0.1, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return lengths, H, dh, all_heads, d_model, magnitude, seed


@settings(max_examples=25)
@given(gate_cases())
def test_gate_matches_reference_and_torch(case):
    lengths, H, dh, all_heads, d_model, magnitude, seed = case
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    T = int(cu[-1])
    x = (rng.standard_normal((T, d_model)) * magnitude).astype(np.float32)
    w = (rng.standard_normal((H, d_model if all_heads else dh)) / math.sqrt(dh)).astype(np.float32)
    b = rng.standard_normal(H).astype(np.float32)
    o = rng.standard_normal((T, H * dh)).astype(np.float32)
    got = run_gate(x, w, b, cu, H, dh, o.copy(), all_heads, gate_scale=2.0)
    g = attention_gate_ref(x, w, b, H, dh, 2.0)  # (T, H)
    want = o.reshape(T, H, dh) * g[:, :, None]
    # z error ~ width * eps32 * sum |x w|; sigmoid' <= 1/4
    z_err = (np.abs(x.astype(np.float64)) @ np.abs(w.T) if all_heads else
             np.einsum("thc,hc->th", np.abs(x.reshape(T, H, dh)), np.abs(w))) * 4e-7 * (d_model ** 0.5 + 2)
    tol = np.abs(o.reshape(T, H, dh)) * (2.0 * (z_err / 4 + 3e-7))[:, :, None] + 1e-30
    assert (np.abs(got.reshape(T, H, dh) - want) <= tol).all()
    if torch is not None and T:
        xt = torch.from_numpy(x.astype(np.float64))
        if all_heads:
            z = torch.nn.functional.linear(xt, torch.from_numpy(w.astype(np.float64)), torch.from_numpy(b.astype(np.float64)))
        else:
            z = (xt.reshape(T, H, dh) * torch.from_numpy(w.astype(np.float64))).sum(-1) + torch.from_numpy(b.astype(np.float64))
        gt = 2.0 * torch.sigmoid(z).numpy()
        assert (np.abs(got.reshape(T, H, dh) - o.reshape(T, H, dh) * gt[:, :, None]) <= 2 * tol).all()


def test_gate_zero_weights_scale_by_pi_exactly_and_reads_only_its_slice():
    rng = np.random.default_rng(0)
    H, dh, T = 3, 8, 20
    cu = np.array([0, 7, T], np.int64)
    x = rng.standard_normal((T, H * dh)).astype(np.float32)
    o = rng.standard_normal((T, H * dh)).astype(np.float32)
    # weight 0, bias logit(0.25) -> every gate is 0.25: a power of two, so the product is exact
    got = run_gate(x, np.zeros((H, dh)), np.full(H, math.log(1 / 3)), cu, H, dh, o.copy(), False)
    np.testing.assert_allclose(got, o * 0.25, rtol=2e-7, atol=0)
    # head slicing: changing features outside head 1's slice leaves head 1's output unchanged
    w = rng.standard_normal((H, dh)).astype(np.float32)
    b = rng.standard_normal(H).astype(np.float32)
    base = run_gate(x, w, b, cu, H, dh, o.copy(), False)
    x2 = x.copy()
    x2[:, :dh] += 5.0
    x2[:, 2 * dh :] -= 3.0
    moved = run_gate(x2, w, b, cu, H, dh, o.copy(), False)
    assert np.array_equal(moved[:, dh : 2 * dh], base[:, dh : 2 * dh])
    assert not np.array_equal(moved[:, :dh], base[:, :dh])
    # huge logits saturate to exactly 0 and exactly 1
    sat = run_gate(x, np.zeros((H, dh)), np.array([-200.0, 200.0, 0.0]), cu, H, dh, o.copy(), False)
    assert (sat[:, :dh] == 0).all() and np.array_equal(sat[:, dh : 2 * dh], o[:, dh : 2 * dh])


# ---- the kinds inside a model file ----------------------------------------------------------------------
VOCAB, D_IN = 50, 12


def write_model(path, *, kind="clipped_softmax", H=2, dh=8, seed=0, attrs=None, weights=None, gate_cols=None,
                extra_tensors=None, second_input=True):
    """input_ids -> embedding (V, 12) -> linear to the layer input x (T, H*dh) -> linear qkv -> attention."""
    from edgeformer.format import write_model as write
    from edgeformer.graph import GraphBuilder

    rng = np.random.default_rng(seed)
    D = H * dh
    gate_cols = dh if gate_cols is None else gate_cols
    tensors = {"word": rng.standard_normal((VOCAB, D_IN)).astype(np.float32),
               "inp.weight": (rng.standard_normal((D, D_IN)) / 2).astype(np.float32),
               "qkv.weight": (rng.standard_normal((3 * D, D)) / 2).astype(np.float32),
               "qkv.bias": rng.standard_normal(3 * D).astype(np.float32) * 0.1,
               "gate.weight": rng.standard_normal((H, gate_cols)).astype(np.float32) / 2,
               "gate.bias": rng.standard_normal(H).astype(np.float32)}
    tensors.update(extra_tensors or {})
    g = GraphBuilder("quantizable")
    ids = g.input("input_ids")
    g.input("attention_mask", optional=True)
    e = g.add("embedding", "emb", [ids], {"word": "word"})
    x = g.add("linear", "inp", [e], {"weight": "inp.weight"}, {"format": "fp32"})
    qkv = g.add("linear", "qkv", [x], {"weight": "qkv.weight", "bias": "qkv.bias"}, {"format": "fp32"})
    node_attrs = {"kind": kind, "num_heads": H, "head_dim": dh}
    node_weights = {}
    if kind == "clipped_softmax":
        node_attrs["gamma"] = -0.05
    if kind == "gated":
        node_weights = {"gate_weight": "gate.weight", "gate_bias": "gate.bias"}
    node_attrs.update(attrs or {})
    node_weights.update(weights or {})
    g.add("attention", "attn", [qkv, x] if kind == "gated" and second_input else [qkv], node_weights, node_attrs,
          output="out")
    g.output("out")
    write(path, tensors, g.build().to_json())
    return tensors


MODEL_CASES = [
    ("clipped_softmax", {}),
    ("clipped_softmax", {"causal": True, "zeta": 1.1}),
    ("gated", {}),
    ("gated", {"softmax": "clipped", "gamma": -0.05, "gate_scale": 2.0}),
    ("gated", {"gate": "all_heads", "causal": True}),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind, attrs", MODEL_CASES)
def test_kind_in_a_model_with_padding(tmp_path, kind, attrs, threads):
    import edgeformer

    H, dh = 2, 8
    path = tmp_path / "m.edgeformer"
    all_heads = attrs.get("gate") == "all_heads"
    t = write_model(path, kind=kind, attrs=attrs, gate_cols=H * dh if all_heads else dh)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    model = edgeformer.load(path, threads=threads)
    try:
        got = model.run({"input_ids": ids, "attention_mask": mask})["out"]
    finally:
        model.close()
    gamma = attrs.get("gamma", -0.05) if kind == "clipped_softmax" or attrs.get("softmax") == "clipped" else 0.0
    zeta = attrs.get("zeta", 1.0)
    causal = attrs.get("causal", False)
    for bi in range(3):
        L = int(mask[bi].sum())
        x = t["word"][ids[bi, :L]].astype(np.float64) @ t["inp.weight"].T.astype(np.float64)  # (L, D)
        qkv = x @ t["qkv.weight"].T.astype(np.float64) + t["qkv.bias"]
        cu = np.array([0, L])
        if kind == "gated":
            want = packed_gated_attention_ref(qkv, x, cu, H, dh, dh ** -0.5, causal, t["gate.weight"], t["gate.bias"],
                                              gamma, zeta, attrs.get("gate_scale", 1.0))
        else:
            want = packed_attention_ref(qkv, cu, H, dh, dh ** -0.5, causal, gamma, zeta)
        np.testing.assert_allclose(got[bi, :L], want, rtol=1e-4, atol=1e-4)
        assert (got[bi, L:] == 0).all()


@pytest.mark.parametrize("kind, attrs, weights, message", [
    ("clipped_softmax", {"gamma": 0.01}, None, "gamma <= 0"),
    ("clipped_softmax", {"gamma": True}, None, "gamma"),
    ("clipped_softmax", {"gamma": None}, None, "needs attribute 'gamma'"),
    ("clipped_softmax", {"gamma": "-0.1"}, None, "gamma"),
    ("clipped_softmax", {"zeta": 0.9}, None, "zeta >= 1"),
    ("clipped_softmax", {"zeta": "1"}, None, "zeta"),
    ("clipped_softmax", {"causal": 1}, None, "causal"),
    ("clipped_softmax", {}, {"gate_weight": "gate.weight"}, "takes no weights"),
    ("gated", {"gate": "mlp"}, None, "gate"),
    ("gated", {"softmax": "clipped"}, None, "needs attribute 'gamma'"),
    ("gated", {"softmax": "clipped", "gamma": 0.5}, None, "gamma <= 0"),
    ("gated", {"gamma": -0.1}, None, "need softmax"),
    ("gated", {"gate_scale": 0.0}, None, "gate_scale"),
    ("gated", {"gate": "all_heads"}, None, "layer input width"),
    ("gated", {}, {"gate_weight": "gate.bias"}, "gate_weight"),
    ("gated", {}, {"gate_bias": "gate.weight"}, "gate_bias"),
    ("gated", {}, {"extra": "gate.bias"}, "unknown"),
    ("gated", {}, {"gate_weight": "gate.int"}, "float32"),
    ("gated", {}, {"gate_weight": "gate.nan"}, "non-finite"),
    ("gated", {"num_heads": 4, "head_dim": 4}, None, "gate_weight"),
])
def test_kinds_reject_bad_nodes(tmp_path, kind, attrs, weights, message):
    import edgeformer

    path = tmp_path / "bad.edgeformer"
    write_model(path, kind=kind, attrs=attrs, weights=weights,  # gamma None is written as JSON null = absent
                extra_tensors={"gate.int": np.zeros((2, 8), np.int32), "gate.nan": np.full((2, 8), np.nan, np.float32)})
    with pytest.raises(GraphError, match=message):
        edgeformer.load(path, threads=1)


def test_gated_needs_the_layer_input_and_softmax_takes_one_input(tmp_path):
    import edgeformer

    write_model(tmp_path / "g.edgeformer", kind="gated", second_input=False)
    with pytest.raises(GraphError, match="takes 2 inputs"):
        edgeformer.load(tmp_path / "g.edgeformer", threads=1)
    from edgeformer.format import read_model, write_model as write

    mf = read_model(tmp_path / "g.edgeformer")
    tensors, graph = {k: np.array(v) for k, v in mf.tensors.items()}, mf.graph
    mf.close()
    node = graph["nodes"][-1]
    node["attrs"] = {"kind": "softmax", "num_heads": 2, "head_dim": 8}
    node["weights"] = {}
    node["inputs"] = [node["inputs"][0], graph["nodes"][1]["outputs"][0]]
    write(tmp_path / "s.edgeformer", tensors, graph)
    with pytest.raises(GraphError, match="takes 1 inputs"):
        edgeformer.load(tmp_path / "s.edgeformer", threads=1)


@pytest.mark.parametrize("gamma, magnitude, sparse", [(-0.3, 4.0, True), (-0.002, 0.3, False)])
def test_sparse_gather_and_dense_paths(gamma, magnitude, sparse):
    """Both P'V paths of the kernel: few surviving key columns per query block (gathered) and many (dense)."""
    from edgeformer.kernels.attention import QUERY_BLOCK
    from edgeformer.kernels.attention_clipped import SPARSE_FRACTION

    L, dh = 150, 8
    qkv, cu = make_case([L], 1, dh, magnitude, seed=21)
    got = run_clipped(qkv, cu, 1, dh, 0.5, False, gamma, 1.0)
    q, k, v, mask = unpack_qkv(qkv, cu, 1, dh)
    s = 0.5 * q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64)  # (L, L)
    p = np.exp(s - s.max(1, keepdims=True))
    p = clipped_probs_ref(p / p.sum(1, keepdims=True), gamma, 1.0)
    for i0 in range(0, L, QUERY_BLOCK):
        live = (p[i0 : i0 + QUERY_BLOCK] > 0).any(0).sum()
        assert (live < SPARSE_FRACTION * L) == sparse
    tol = tolerance(qkv, cu, 1, dh, 0.5) * (1 - gamma)
    assert_close(got, packed_attention_ref(qkv, cu, 1, dh, 0.5, False, gamma, 1.0), tol, "vs numpy reference")
