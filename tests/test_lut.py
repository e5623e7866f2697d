"""Table projections (kernels/lut.py, ops/linear_lut.py, functional/memory_layer.py) and the MemoryFormer
graph ops (rms_norm, add, rotary) against the float64 NumPy references; torch-free."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.errors import GraphError, InputError
from edgeformer.functional.memory_layer import compact_tables, memory_layer, memory_layer_codes, pq_projection
from edgeformer.graph import Node
from edgeformer.kernels.mathfn import ACT_NONE, ACT_RELU
from edgeformer.ops.linear import FORMATS
from edgeformer.reference.lut import (dequantize_tables, memory_layer_ref, pq_codes_ref, pq_projection_ref,
                                      sign_codes_ref, sign_pattern_prob_bruteforce, sign_weights_ref)
from edgeformer.workers import Workers

F32 = np.float32
MODES = ("code_l1_times_prob", "paper_prob")


def _inputs(rng, t, width, zeros=0.1):
    """Normal values with a fraction of exact zeros (and a -0.0) to exercise the zero convention."""
    x = rng.standard_normal((t, width)).astype(F32)
    x[rng.random((t, width)) < zeros] = 0.0
    if x.size:
        x.flat[0] = -0.0
    return x


def _tables(rng, rows, n, table_dtype):
    t = (rng.standard_normal((rows, n)) * 0.5).astype(F32)
    stored, scale = compact_tables(t, table_dtype)
    return stored, scale


def _tolerance(ref_w, tables64, codes, rows):
    """atol for a float32 accumulation of K weighted rows: 1e-5 of the sum of |terms| per token."""
    mags = np.zeros(codes.shape[0])
    for k in range(codes.shape[1]):
        mags += np.abs(ref_w[:, k]) * np.abs(tables64[k * rows + codes[:, k]]).max(axis=1)
    return 1e-5 * (mags.max(initial=0.0) + 1.0)


# ---- codes: bit order and zero handling ---------------------------------------------------------------

@pytest.mark.parametrize("tau", [1, 3, 8])
def test_bit_order_first_element_is_msb(tau):
    x = -np.ones((3, tau), F32)
    x[0, 0] = 1.0  # only the first element positive -> 2^(tau-1)
    x[1, tau - 1] = 1.0  # only the last -> 1
    x[2, :] = 2.0  # all positive -> 2^tau - 1
    codes, _ = memory_layer_codes(x, num_tables=1, code_length=tau)
    assert codes[:, 0].tolist() == [2 ** (tau - 1), 1, 2 ** tau - 1]


def test_zero_convention_and_zero_weights():
    tau = 4
    x = np.zeros((1, 2 * tau), F32)
    x[0, tau:] = [0.0, -0.0, 1.0, -1.0]
    ge, w_l1 = memory_layer_codes(x, num_tables=2, code_length=tau, zero_bit=1)  # z >= 0 -> 1 (PyTorch path)
    gt, w_p = memory_layer_codes(x, num_tables=2, code_length=tau, zero_bit=0, weight_mode="paper_prob")
    assert ge[0].tolist() == [0b1111, 0b1110]  # -0.0 >= 0 holds too
    assert gt[0].tolist() == [0b0000, 0b0010]
    sig2 = 1.0 / (1.0 + np.exp(-2.0))
    # all-zero chunk: ||z||_1 = 0 -> official weight 0; each zero contributes sigmoid(0) = 1/2 to p
    np.testing.assert_allclose(w_l1[0], [0.0, 2.0 * 0.25 * sig2 ** 2], rtol=1e-6)
    np.testing.assert_allclose(w_p[0], [0.5 ** 4, 0.25 * sig2 ** 2], rtol=1e-6)


def test_nan_input_gives_in_range_code_and_nan_weight():
    x = np.full((1, 8), np.nan, F32)
    codes, w = memory_layer_codes(x, num_tables=1, code_length=8)
    assert codes[0, 0] == 0 and np.isnan(w[0, 0])


# ---- the closed-form normaliser ------------------------------------------------------------------------

@given(tau=st.integers(1, 8), t=st.sampled_from([0.25, 1.0, 3.0]), seed=st.integers(0, 2 ** 16))
def test_closed_form_normaliser_matches_bruteforce(tau, t, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((1, tau)) * rng.choice([0.1, 1.0, 4.0])).astype(F32)
    brute = sign_pattern_prob_bruteforce(z[0].astype(np.float64), t)
    np.testing.assert_allclose(sign_weights_ref(z, 1, tau, "paper_prob", t)[0, 0], brute, rtol=1e-12)
    _, w = memory_layer_codes(z, num_tables=1, code_length=tau, weight_mode="paper_prob", temperature=t)
    np.testing.assert_allclose(w[0, 0], brute, rtol=2e-6)
    _, w1 = memory_layer_codes(z, num_tables=1, code_length=tau, temperature=t)
    np.testing.assert_allclose(w1[0, 0], np.abs(z.astype(np.float64)).sum() * brute, rtol=2e-6)


# ---- whole layer against the reference -----------------------------------------------------------------

@given(t=st.integers(1, 40), k=st.integers(1, 5), tau=st.integers(1, 8), n=st.integers(1, 300),
       table_dtype=st.sampled_from(["fp32", "fp16", "int8"]), mode=st.sampled_from(MODES),
       zero_bit=st.sampled_from([0, 1]), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       with_bias=st.booleans(), with_res=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_memory_layer_matches_reference(t, k, tau, n, table_dtype, mode, zero_bit, temperature, with_bias, with_res,
                                        seed):
    rng = np.random.default_rng(seed)
    x = _inputs(rng, t, k * tau)
    tables, scale = _tables(rng, k << tau, n, table_dtype)
    bias = rng.standard_normal(n).astype(F32) if with_bias else None
    res = rng.standard_normal((t, n)).astype(F32) if with_res else None
    kw = dict(num_tables=k, code_length=tau, temperature=temperature, weight_mode=mode, zero_bit=zero_bit)
    codes, w = memory_layer_codes(x, **kw)
    want_codes = sign_codes_ref(x, k, tau, zero_bit)
    np.testing.assert_array_equal(codes, want_codes)  # exact code selection
    ref_w = sign_weights_ref(x, k, tau, mode, temperature)
    np.testing.assert_allclose(w, ref_w, rtol=2e-6, atol=1e-30)
    y = memory_layer(x, tables, bias, table_scale=scale, residual=res, **kw)
    ref = memory_layer_ref(x, tables, bias, table_dtype=table_dtype, table_scale=scale, residual=res, **kw)
    tab64 = dequantize_tables(tables, table_dtype, scale)
    assert y.dtype == F32 and y.shape == (t, n)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=_tolerance(ref_w, tab64, want_codes, 1 << tau))


def test_leading_dims_and_threads_do_not_change_results():
    rng = np.random.default_rng(3)
    k, tau, n = 6, 8, 200
    tables, _ = _tables(rng, k << tau, n, "fp32")
    for t in (3, 70):  # 2 threads split columns (few tokens) and rows (many tokens)
        x = _inputs(rng, t, k * tau)
        one = memory_layer(x, tables, num_tables=k, code_length=tau)
        two = memory_layer(x, tables, num_tables=k, code_length=tau, threads=2)
        np.testing.assert_array_equal(one, two)
        nd = memory_layer(x.reshape(1, t, k * tau), tables, num_tables=k, code_length=tau)
        np.testing.assert_array_equal(nd[0], one)


def test_compact_tables_sizes_and_values():
    rng = np.random.default_rng(0)
    rows, n = 48 * 256, 384
    t = rng.standard_normal((rows, n)).astype(F32)
    q, scale = compact_tables(t, "int8")
    h, none = compact_tables(t, "fp16")
    assert none is None and h.dtype == np.uint16
    assert q.nbytes * 4 == t.nbytes  # int8 tables: exactly 1/4 of the fp32 tables
    assert (q.nbytes + scale.nbytes) / t.nbytes == pytest.approx(0.25 + 1.0 / n)  # + one f32 scale per row
    np.testing.assert_allclose(h.view(np.float16).astype(F32), t, rtol=1e-3, atol=1e-7)
    assert np.abs(q.astype(F32) * scale[:, None] - t).max() <= scale.max() / 2 + 1e-7
    z, s0 = compact_tables(np.zeros((2, 3), F32), "int8")
    assert (z == 0).all() and (s0 == 1).all()


# ---- product quantisation encoder ----------------------------------------------------------------------

@given(t=st.integers(1, 30), k=st.integers(1, 4), rows=st.integers(1, 20), sub=st.integers(1, 6),
       n=st.integers(1, 70), table_dtype=st.sampled_from(["fp32", "int8"]), seed=st.integers(0, 2 ** 16))
def test_pq_projection_matches_reference(t, k, rows, sub, n, table_dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k * sub)).astype(F32)
    cen = rng.standard_normal((k, rows, sub)).astype(F32)
    tables, scale = _tables(rng, k * rows, n, table_dtype)
    bias = rng.standard_normal(n).astype(F32)
    y = pq_projection(x, cen, tables, bias, table_scale=scale)
    ref = pq_projection_ref(x, cen, tables, bias, table_dtype=table_dtype, table_scale=scale)
    # distances in float32 vs float64 may pick another centroid only at near-ties: compare where not near
    d = ((x.astype(np.float64).reshape(t, k, 1, sub) - cen[None].astype(np.float64)) ** 2).sum(-1)  # (T, K, R)
    srt = np.sort(d, axis=-1)
    clear = np.ones(t, bool) if rows == 1 else ((srt[:, :, 1] - srt[:, :, 0]) > 1e-4 * (1 + srt[:, :, 0])).all(1)
    np.testing.assert_allclose(y[clear], ref[clear], rtol=1e-5, atol=1e-5 * k)
    assert pq_codes_ref(x, cen).max() < rows


# ---- the "lut" weight format: load-time validation -----------------------------------------------------

def _node(attrs, weights):
    node = Node("linear", "m", ["x"], ["y"], {r: r for r in weights}, {"format": "lut", **attrs})
    return node, dict(weights)


def _ro(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def test_lut_format_runs_with_activation_and_residual():
    rng = np.random.default_rng(1)
    k, tau, n, t = 3, 4, 40, 5
    tables = _ro((rng.standard_normal((k << tau, n))).astype(F32))
    bias = _ro(rng.standard_normal(n).astype(F32))
    node, w = _node({"num_tables": k, "code_length": tau}, {"tables": tables, "bias": bias})
    fmt = FORMATS["lut"](node, w)
    assert (fmt.in_features, fmt.out_features) == (k * tau, n)
    x = _inputs(rng, t, k * tau)
    res = rng.standard_normal((t, n)).astype(F32)
    out = np.empty((t, n), F32)
    fmt(x, res, ACT_RELU, out, Workers(1))
    ref = np.maximum(memory_layer_ref(x, tables, bias, num_tables=k, code_length=tau), 0) + res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    fmt(x, np.zeros((0, 0), F32), ACT_NONE, out, Workers(1))
    np.testing.assert_allclose(out, memory_layer_ref(x, tables, bias, num_tables=k, code_length=tau), rtol=1e-5,
                               atol=1e-5)


BAD = [
    ({"num_tables": 2, "code_length": 4}, {"tables": np.zeros((31, 4), F32)}, "rows"),
    ({"num_tables": 2, "code_length": 4}, {"tables": np.zeros((32, 4), np.float64)}, "float32"),
    ({"num_tables": 2, "code_length": 4, "table_dtype": "fp16"}, {"tables": np.zeros((32, 4), F32)}, "uint16"),
    ({"num_tables": 2, "code_length": 17}, {"tables": np.zeros((32, 4), F32)}, "code_length"),
    ({"num_tables": 0, "code_length": 4}, {"tables": np.zeros((0, 4), F32)}, "num_tables"),
    ({"num_tables": 2, "code_length": 4, "temperature": 0.0}, {"tables": np.zeros((32, 4), F32)}, "temperature"),
    ({"num_tables": 2, "code_length": 4, "zero_bit": 2}, {"tables": np.zeros((32, 4), F32)}, "zero_bit"),
    ({"num_tables": 2, "code_length": 4, "weight_mode": "x"}, {"tables": np.zeros((32, 4), F32)}, "weight_mode"),
    ({"num_tables": 2, "code_length": 4, "encoder": "hash"}, {"tables": np.zeros((32, 4), F32)}, "encoder"),
    ({"num_tables": 2, "code_length": 4, "table_dtype": "int8"}, {"tables": np.zeros((32, 4), np.int8)}, "table_scale"),
    ({"num_tables": 2, "code_length": 4, "table_dtype": "int8"},
     {"tables": np.zeros((32, 4), np.int8), "table_scale": np.zeros(32, F32)}, "> 0"),
    ({"num_tables": 2, "code_length": 4},
     {"tables": np.zeros((32, 4), F32), "table_scale": np.ones(32, F32)}, "only used with int8"),
    ({"num_tables": 2, "code_length": 4}, {"tables": np.zeros((32, 4), F32), "bias": np.zeros(5, F32)}, "bias"),
    ({"num_tables": 2, "code_length": 4},
     {"tables": np.zeros((32, 4), F32), "centroids": np.zeros((2, 16, 4), F32)}, "centroids"),
    ({"encoder": "pq"}, {"tables": np.zeros((32, 4), F32)}, "centroids"),
    ({"encoder": "pq"}, {"tables": np.zeros((30, 4), F32), "centroids": np.zeros((2, 16, 4), F32)}, "rows"),
    ({"encoder": "pq", "num_tables": 3}, {"tables": np.zeros((32, 4), F32), "centroids": np.zeros((2, 16, 4), F32)},
     "num_tables"),
]


@pytest.mark.parametrize("attrs,weights,match", BAD)
def test_lut_format_rejects_bad_weights(attrs, weights, match):
    node, w = _node(attrs, {r: _ro(a) for r, a in weights.items()})
    with pytest.raises(GraphError, match=match):
        FORMATS["lut"](node, w)


@pytest.mark.parametrize("dtype,bad", [("fp32", np.float32(np.nan)), ("fp32", np.float32(np.inf)),
                                       ("fp16", np.float16(np.inf).view(np.uint16)),
                                       ("fp16", np.float16(np.nan).view(np.uint16))])
def test_lut_format_rejects_non_finite_tables(dtype, bad):
    tables = np.zeros((32, 4), F32 if dtype == "fp32" else np.uint16)
    tables[17, 2] = bad
    node, w = _node({"num_tables": 2, "code_length": 4, "table_dtype": dtype}, {"tables": _ro(tables)})
    with pytest.raises(GraphError, match="non-finite"):
        FORMATS["lut"](node, w)


def test_functional_api_rejects_bad_input():
    tables = np.zeros((32, 4), F32)
    with pytest.raises(InputError, match="shape"):
        memory_layer(np.zeros((2, 7), F32), tables, num_tables=2, code_length=4)
    with pytest.raises(InputError, match="float"):
        memory_layer(np.zeros((2, 8), np.int64), tables, num_tables=2, code_length=4)
    with pytest.raises(InputError, match="tables must be"):
        memory_layer(np.zeros((2, 8), F32), tables.astype(np.int32), num_tables=2, code_length=4)
    with pytest.raises(InputError, match="residual"):
        memory_layer(np.zeros((2, 8), F32), tables, num_tables=2, code_length=4, residual=np.zeros((2, 5)))
    with pytest.raises(InputError, match="threads"):
        memory_layer(np.zeros((2, 8), F32), tables, num_tables=2, code_length=4, threads=0)
    with pytest.raises(InputError, match="code_length"):
        memory_layer_codes(np.zeros((2, 8), F32), num_tables=2, code_length=0)
    assert memory_layer(np.zeros((0, 8), F32), tables, num_tables=2, code_length=4).shape == (0, 4)


# ---- MemoryFormer graph ops and the whole model, torch-free ---------------------------------------------

@given(t=st.integers(1, 20), d=st.integers(1, 70), outside=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_rms_norm_kernel_matches_reference(t, d, outside, seed):
    from edgeformer.kernels.rms_norm import rms_norm
    from edgeformer.reference.rms_norm import rms_norm_ref

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, d)) * rng.choice([1e-3, 1.0, 1e3])).astype(F32)
    scale = _ro(rng.uniform(0.5, 1.5, d).astype(F32))
    out = np.empty_like(x)
    rms_norm(x, scale, 1e-8, outside, out, 0, t)
    np.testing.assert_allclose(out, rms_norm_ref(x, scale, 1e-8, outside), rtol=2e-6, atol=1e-6)


@given(t=st.integers(1, 12), heads=st.integers(1, 3), half=st.integers(1, 4), extra=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_rotary_kernel_matches_reference(t, heads, half, extra, seed):
    from edgeformer.kernels.rotary import rotary_qkv
    from edgeformer.ops.rotary import rotary_tables
    from edgeformer.reference.rotary import rotary_ref

    rng = np.random.default_rng(seed)
    rot, dh = 2 * half, 2 * half + extra
    qkv = rng.standard_normal((t, 3 * heads * dh)).astype(F32)
    pos = rng.integers(0, 300, t).astype(np.int64)
    cos, sin = rotary_tables(300, rot, 10000.0)
    out = np.empty_like(qkv)
    rotary_qkv(qkv, pos, cos, sin, heads, dh, rot, out, 0, t)
    # float32 angles p * inv_freq (as GPT-NeoX) differ from float64 ones by ~p * 6e-8 rad
    np.testing.assert_allclose(out, rotary_ref(qkv, pos, heads, dh, rot), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[:, 2 * heads * dh:], qkv[:, 2 * heads * dh:])  # V untouched


def random_memoryformer_arrays(cfg, seed=0):
    """Random weights under converters.memoryformer's state-dict names (numpy only)."""
    rng = np.random.default_rng(seed)
    d, k, tau, wide, v = cfg.hidden_size, cfg.num_tables, cfg.code_length, cfg.ffn_width, cfg.vocab_size
    tau2 = tau + cfg.extra_bits

    def n(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(F32)

    a = {"word_embeddings.weight": n(v, d), "norm.scale": rng.uniform(0.5, 1.5, d).astype(F32),
         "final_linear.weight": n(v, d, std=d ** -0.5)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        a[f"{p}.input_layernorm.scale"] = rng.uniform(0.5, 1.5, d).astype(F32)
        a[f"{p}.post_attention_layernorm.scale"] = rng.uniform(0.5, 1.5, d).astype(F32)
        for name in ("query", "key", "value"):
            a[f"{p}.attention.{name}_proj.tables"] = n(k << tau, d, std=k ** -0.5)
            a[f"{p}.attention.{name}_proj.bias"] = n(d, std=0.1)
        a[f"{p}.mlp.0.tables"], a[f"{p}.mlp.0.bias"] = n(k << tau, wide, std=k ** -0.5), n(wide, std=0.1)
        a[f"{p}.mlp.1.weight"], a[f"{p}.mlp.1.bias"] = rng.uniform(0.5, 1.5, wide).astype(F32), n(wide, std=0.1)
        a[f"{p}.mlp.2.tables"], a[f"{p}.mlp.2.bias"] = n(k << tau2, d, std=k ** -0.5), n(d, std=0.1)
    return a


def memoryformer_numpy(cfg, a, ids):
    """float64 forward of one sequence (S,) from the references: logits (S, V) and the first-layer codes."""
    from edgeformer.reference.attention import attention_ref
    from edgeformer.reference.rms_norm import rms_norm_ref
    from edgeformer.reference.rotary import rotary_ref

    d, k, tau, h, dh = cfg.hidden_size, cfg.num_tables, cfg.code_length, cfg.num_heads, cfg.head_dim
    kw = dict(temperature=cfg.temperature, weight_mode=cfg.weight_mode, zero_bit=cfg.zero_bit)
    x = a["word_embeddings.weight"][ids].astype(np.float64)
    s = len(ids)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        hn = rms_norm_ref(x, a[f"{p}.input_layernorm.scale"], cfg.rms_norm_epsilon)
        qkv = np.concatenate([memory_layer_ref(hn, a[f"{p}.attention.{m}_proj.tables"],
                                               a[f"{p}.attention.{m}_proj.bias"], num_tables=k, code_length=tau, **kw)
                              for m in ("query", "key", "value")], axis=1)
        qkv = rotary_ref(qkv, np.arange(s), h, dh, cfg.rotary_dims, cfg.rotary_base)
        q, kk, v = (qkv[:, j * d:(j + 1) * d].reshape(s, h, dh).transpose(1, 0, 2)[None] for j in range(3))
        att = attention_ref(q, kk, v, causal=True, scale=dh ** -0.5)[0].transpose(1, 0, 2).reshape(s, d)
        x1 = att + x
        g = rms_norm_ref(x1, a[f"{p}.post_attention_layernorm.scale"], cfg.rms_norm_epsilon)
        u = memory_layer_ref(g, a[f"{p}.mlp.0.tables"], a[f"{p}.mlp.0.bias"], num_tables=k, code_length=tau, **kw)
        mu, var = u.mean(-1, keepdims=True), u.var(-1, keepdims=True)
        u = (u - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * a[f"{p}.mlp.1.weight"] + a[f"{p}.mlp.1.bias"]
        x = memory_layer_ref(u, a[f"{p}.mlp.2.tables"], a[f"{p}.mlp.2.bias"], num_tables=k,
                             code_length=tau + cfg.extra_bits, **kw) + x1
    hid = rms_norm_ref(x, a["norm.scale"], cfg.rms_norm_epsilon)
    return hid @ a["final_linear.weight"].astype(np.float64).T


def test_memoryformer_model_file_matches_numpy_forward(tmp_path):
    import edgeformer
    from converters.memoryformer import MemoryFormerConfig, convert_memoryformer

    cfg = MemoryFormerConfig(vocab_size=40, hidden_size=24, num_layers=2, num_heads=2, num_tables=4, code_length=6,
                             rotary_pct=0.5, weight_mode="code_l1_times_prob")
    arrays = random_memoryformer_arrays(cfg)
    path = convert_memoryformer(arrays, cfg.to_dict(), tmp_path / "mf.edgeformer")
    rng = np.random.default_rng(5)
    ids = rng.integers(0, cfg.vocab_size, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, 7:] = 0  # right padding: positions 0..6 in the second sequence
    model = edgeformer.load(path, threads=2)
    try:
        out = model.run({"input_ids": ids, "attention_mask": mask})["logits"]
    finally:
        model.close()
    for b in range(2):
        n = int(mask[b].sum())
        ref = memoryformer_numpy(cfg, arrays, ids[b, :n])
        # a sign decision within float rounding of zero would flip a code: none occurs with this seed
        np.testing.assert_allclose(out[b, :n], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert (out[b, n:] == 0).all()


def test_memoryformer_loader_rejects_bad_config_and_names(tmp_path):
    from converters.memoryformer import MemoryFormerConfig, canonical_state_dict, convert_memoryformer
    from edgeformer.errors import EdgeformerError

    cfg = MemoryFormerConfig(vocab_size=10, hidden_size=12, num_layers=1, num_heads=2, num_tables=2, code_length=6)
    arrays = random_memoryformer_arrays(cfg)
    with pytest.raises(EdgeformerError, match="num_tables"):
        convert_memoryformer(arrays, {**cfg.to_dict(), "num_tables": 3}, tmp_path / "x")
    with pytest.raises(EdgeformerError, match="shape"):
        bad = dict(arrays, **{"layers.0.mlp.2.tables": np.zeros((5, 12), F32)})
        convert_memoryformer(bad, cfg.to_dict(), tmp_path / "x")
    with pytest.raises(EdgeformerError, match="not used"):
        convert_memoryformer(dict(arrays, extra=np.zeros(1, F32)), cfg.to_dict(), tmp_path / "x")
    with pytest.raises(EdgeformerError, match="unrecognised"):
        canonical_state_dict({"foo.bar": np.zeros(1)}, 1)


# ---- dense -> table conversion (converters/lut_fit.py) and the CLI ------------------------------------

def test_pq_fit_is_exact_on_clustered_inputs_and_refit_helps_otherwise():
    from converters.lut_fit import fit_pq_tables

    rng = np.random.default_rng(0)
    k, s, r, n, m = 12, 3, 8, 20, 600
    w = rng.standard_normal((n, k)).astype(F32)
    protos = rng.standard_normal((k // s, r, s))
    pick = rng.integers(0, r, (m, k // s))
    x = np.concatenate([protos[i][pick[:, i]] for i in range(k // s)], axis=1).astype(F32)  # R points per subspace
    fit = fit_pq_tables(w, x, sub_dim=s, rows=r, refit=False)
    y = pq_projection(x, fit["centroids"], fit["tables"])
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)  # every input is a centroid: exact
    # correlated subspaces (low-rank inputs): per-subspace centroid tables ignore the correlation, the ridge
    # refit on the joint codes captures part of it (MADDNESS), and is kept because it wins on held-out rows
    low_rank = (rng.standard_normal((3000, 3)) @ rng.standard_normal((3, k))).astype(F32)
    plain = fit_pq_tables(w, low_rank, sub_dim=s, rows=r, refit=False)
    refit = fit_pq_tables(w, low_rank, sub_dim=s, rows=r, refit=True)
    assert not plain["refit"] and refit["refit"]
    assert refit["heldout_snr_db"] > plain["heldout_snr_db"] + 0.5
    with pytest.raises(Exception, match="multiple"):
        fit_pq_tables(w, x, sub_dim=5, rows=r)


def _tiny_bert_dir(path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import json

    from tests.helpers import tiny_bert_arrays

    path.mkdir()
    safetensors_numpy.save_file(tiny_bert_arrays(hidden=40, heads=5, layers=2, ffn=72), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 120, "hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 5,
        "intermediate_size": 72, "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12}))
    return path


def test_cli_convert_lut_writes_tables_and_fidelity_report(tmp_path, capsys):
    import json

    import edgeformer
    from edgeformer.cli import main

    src = _tiny_bert_dir(tmp_path / "bert")
    out = tmp_path / "lut.edgeformer"
    assert main(["convert", str(src), "-o", str(out), "--lut", "--lut-layers", "encoder.layer.1.*",
                 "--lut-subdim", "4", "--lut-codebooks", "16", "--lut-tables", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in text and "worst:" in text
    report = json.loads((tmp_path / "lut.edgeformer.report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    dense = rows["encoder.layer.0.attention.qkv"]
    assert dense["format"] == "fp32" and dense["cosine"] == 1
    lut = rows["encoder.layer.1.intermediate.dense"]
    assert lut["format"] == "lut" and 0 < lut["cosine"] < 1
    assert lut["table_bytes"] == 2 * (40 // 4) * 16 * 72  # fp16, C = d_in / S tables of R rows
    model = edgeformer.load(out)
    try:
        nodes = {n.name: n for n in model.graph.nodes}
        assert nodes["encoder.layer.1.attention.qkv"].attrs["encoder"] == "pq"
        y = model.run({"input_ids": np.array([[1, 5, 7, 9]])})["last_hidden_state"]
        assert np.isfinite(y).all()
    finally:
        model.close()


def test_cli_converts_a_memoryformer_checkpoint_directory(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import json

    import edgeformer
    from converters.memoryformer import MemoryFormerConfig
    from edgeformer.cli import main

    cfg = MemoryFormerConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2, num_tables=2, code_length=8,
                             rotary_pct=0.5)
    arrays = random_memoryformer_arrays(cfg, seed=4)
    src = tmp_path / "mf"
    src.mkdir()
    safetensors_numpy.save_file(arrays, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({**cfg.to_dict(), "table_dtype": "fp32"}))
    out = tmp_path / "mf.edgeformer"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    model = edgeformer.load(out)
    try:
        got = model.run({"input_ids": ids})["logits"][0]
    finally:
        model.close()
    ref = memoryformer_numpy(cfg, arrays, ids[0])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
