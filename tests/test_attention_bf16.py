"""Attention with a bf16 P V product (kernels/attention_bf16.py, kernels/gemm_bf16.py): the micro-kernels (P V,
scores, the K^T block transposition) exactly against integer products and NumPy, the attention kernel against its NumPy twin and against exact float64 attention, the
`precision` attribute through a model, and the converter's default.

Tolerances. Against the twin (edgeformer/reference/attention.attention_bf16_ref: the same bf16 roundings and the
same exp polynomial, scores in float64): the kernel's float32 scores can move a probability across a bf16 rounding
boundary, which changes that weight by one bf16 ulp (2^-8 relative); the output moves by at most 2^-7 max|V|.
Against exact attention: V rounded to bf16 (<= 2^-9 relative) and each weight within 2^-8 relative (rounding of
exp, then of its normalisation), plus the float32 score error of kernels/attention.py: 2^-6 max|V| bounds it.
A wrong pair layout, a missed row or column or a wrong normalisation gives errors of order max|V|.
"""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.kernels.attention import SHORT
from edgeformer.kernels.gemm_bf16 import bf16_available, micro_bf16, micro_scores, transpose16
from edgeformer.reference.attention import attention_bf16_ref, attention_ref, bf16_round, unpack_qkv

needs_bf16 = pytest.mark.skipif(not bf16_available(), reason="CPU without AVX512-BF16")


def run_bf16(qkv, cu, num_heads, head_dim, scale):
    from edgeformer.kernels.attention_bf16 import attention_softmax_bf16

    qkv = np.ascontiguousarray(qkv, dtype=np.float32)
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    out = np.full((qkv.shape[0], num_heads * head_dim), np.nan, np.float32)
    attention_softmax_bf16(qkv, cu, int(num_heads), int(head_dim), float(scale), out, 0, (len(cu) - 1) * num_heads)
    return out


@numba.njit(cache=False)
def tile(a, b, c, rs, k2, nv_two):
    """One 8 x 32 (nv_two) or 8 x 16 micro-kernel call (compiled on first use, only where bf16 exists)."""
    if nv_two:
        micro_bf16(8, 2, a, 0, a.shape[1], b, 0, b.shape[1], k2, c, 0, c.shape[1], rs, 0)
    else:
        micro_bf16(8, 1, a, 0, a.shape[1], b, 0, b.shape[1], k2, c, 0, c.shape[1], rs, 0)


@numba.njit(cache=False)
def score_tile(a, a_off, lda, kt, pstride, k, c, alpha, nv_two):
    """One 8 x 32 (nv_two) or 8 x 16 score tile into c (row stride 128)."""
    if nv_two:
        micro_scores(8, 2, a, a_off, lda, kt, 0, pstride, k, c, 0, c.shape[1], alpha)
    else:
        micro_scores(8, 1, a, a_off, lda, kt, 0, pstride, k, c, 0, c.shape[1], alpha)


@numba.njit(cache=False)
def transpose_block(src, src_off, ld, dst, dst_off):
    transpose16(src, src_off, ld, dst, dst_off)


def padded(out, cu, num_heads, head_dim):
    """Packed (T, H*dh) -> (B, H, S, dh) like unpack_qkv's q."""
    lengths = np.diff(cu)
    S = int(lengths.max())
    res = np.zeros((len(lengths), num_heads, S, head_dim))
    for b, L in enumerate(lengths):
        res[b, :, :L] = out[cu[b]:cu[b + 1]].reshape(L, num_heads, head_dim).transpose(1, 0, 2)
    return res


def test_bf16_round_is_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5, 0.0, 3.0e38, 1e-30], np.float32)
    got = bf16_round(x)
    assert got[0] == 1.0 and got[1] == 1.0 and got[2] == 1.0 + 2 ** -6 and got[3] == 1.0  # ties go to even
    assert got[4] == -2.5 and got[5] == 0.0
    np.testing.assert_allclose(got, x.astype(np.float64), rtol=2 ** -8)


@needs_bf16
@settings(max_examples=20, deadline=None)
@given(mr=st.sampled_from([8]), nv=st.sampled_from([1, 2]), k2=st.integers(0, 70), seed=st.integers(0, 2 ** 31 - 1))
def test_micro_kernel_exact_on_integers(mr, nv, k2, seed):
    """Small integers are exact in bf16 and their sums exact in float32: the tile must equal the integer product."""
    rng = np.random.default_rng(seed)
    A = rng.integers(-16, 17, (mr, 2 * max(k2, 1))).astype(np.float32)  # (MR, 2*k2)
    B = rng.integers(-16, 17, (2 * max(k2, 1), 16 * nv)).astype(np.float32)  # (2*k2, NV*16)
    rs = rng.integers(1, 4, mr).astype(np.float32)
    a = (A.view(np.uint32) >> 16).astype(np.uint16).view(np.uint32)  # (MR, k2) pairs along k
    b16 = (B.view(np.uint32) >> 16).astype(np.uint16)  # (2*k2, N)
    b = (b16[0::2].astype(np.uint32) | (b16[1::2].astype(np.uint32) << 16))  # (k2, N) pairs of consecutive rows
    c = np.full((mr, 16 * nv), np.nan, np.float32)
    tile(a, np.ascontiguousarray(b), c, rs, k2, nv == 2)
    want = (A[:, : 2 * k2].astype(np.int64) @ B[: 2 * k2].astype(np.int64)) * rs[:, None].astype(np.int64)
    np.testing.assert_array_equal(c, want.astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(ld=st.integers(16, 40), src_off=st.integers(0, 9), dst_off=st.integers(0, 9), seed=st.integers(0, 2 ** 31 - 1))
def test_transpose16_exact(ld, src_off, dst_off, seed):
    """The 16 x 16 block at src_off (row stride ld) lands transposed at dst_off; nothing else is written."""
    rng = np.random.default_rng(seed)
    src = rng.standard_normal(src_off + 15 * ld + 16 + 3).astype(np.float32)
    dst = np.full(dst_off + 256 + 5, np.nan, np.float32)
    transpose_block(src, src_off, ld, dst, dst_off)
    block = np.stack([src[src_off + r * ld: src_off + r * ld + 16] for r in range(16)])  # (16 rows, 16 cols)
    np.testing.assert_array_equal(dst[dst_off: dst_off + 256].reshape(16, 16), block.T)
    assert np.all(np.isnan(dst[:dst_off])) and np.all(np.isnan(dst[dst_off + 256:]))


@settings(max_examples=25, deadline=None)
@given(nv=st.sampled_from([1, 2]), k=st.integers(0, 70), lda=st.integers(70, 90), a_off=st.integers(0, 5),
       alpha=st.sampled_from([1.0, 0.5, -2.0]), seed=st.integers(0, 2 ** 31 - 1))
def test_score_tile_exact_on_integers(nv, k, lda, a_off, alpha, seed):
    """Small integers: every product and partial sum is exact in float32, so the tile must equal
    alpha * A B^T with A's 8 rows read in place (offset, row stride) and B^T as panels (k, 16)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-16, 17, a_off + 8 * lda).astype(np.float32)
    A = np.stack([a[a_off + i * lda: a_off + i * lda + k] for i in range(8)])  # (8, k)
    pstride = max(k, 1) * 16 + 3
    kt = rng.integers(-16, 17, 2 * pstride).astype(np.float32)
    B = np.concatenate([kt[j * pstride: j * pstride + k * 16].reshape(k, 16) for j in range(nv)], axis=1)  # (k, 16nv)
    c = np.full((8, 128), np.nan, np.float32)
    score_tile(a, a_off, lda, kt, pstride, k, c, np.float32(alpha), nv == 2)
    want = alpha * (A.astype(np.int64) @ B.astype(np.int64))
    np.testing.assert_array_equal(c[:, : 16 * nv], want.astype(np.float32))
    assert np.all(np.isnan(c[:, 16 * nv:]))


@needs_bf16
@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, SHORT + 12), min_size=1, max_size=4), num_heads=st.integers(1, 3),
       head_dim=st.sampled_from([1, 2, 7, 16, 32, 33, 64]), magnitude=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_against_twin_and_exact(lengths, num_heads, head_dim, magnitude, seed):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if cu[-1] == 0:
        return
    qkv = (rng.standard_normal((int(cu[-1]), 3 * num_heads * head_dim)) * magnitude).astype(np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    got = run_bf16(qkv, cu, num_heads, head_dim, scale)
    assert np.isfinite(got).all()
    q, k, v, mask = unpack_qkv(qkv, cu, num_heads, head_dim)
    twin = attention_bf16_ref(q, k, v, mask, scale)
    exact = attention_ref(q, k, v, mask, scale)
    g = padded(got, cu, num_heads, head_dim)
    for b, L in enumerate(np.diff(cu)):
        if L == 0:
            continue
        vmax = float(np.abs(v[b, :, :L]).max()) + 1e-30
        if L <= SHORT:
            np.testing.assert_allclose(g[b, :, :L], twin[b, :, :L], rtol=0, atol=2 ** -7 * vmax)
            np.testing.assert_allclose(g[b, :, :L], exact[b, :, :L], rtol=0, atol=2 ** -6 * vmax)
        else:  # the float32 path of kernels/attention.py
            np.testing.assert_allclose(g[b, :, :L], exact[b, :, :L], rtol=0, atol=1e-4 * vmax)


@needs_bf16
def test_one_hot_rows_and_extremes():
    """A dominant key gives exactly its (bf16-rounded) V row; huge scores do not overflow; distant keys vanish."""
    L, H, dh = 37, 1, 16
    qkv = np.zeros((L, 3 * dh), np.float32)
    qkv[:, :dh] = 1.0  # every query equal
    qkv[5, dh : 2 * dh] = 1e4  # key 5 dominates by 1e4 * 16 / 4
    qkv[:, 2 * dh :] = np.random.default_rng(0).standard_normal((L, dh)).astype(np.float32)
    out = run_bf16(qkv, np.array([0, L]), H, dh, 0.25)
    np.testing.assert_array_equal(out, np.broadcast_to(bf16_round(qkv[5, 2 * dh :]).astype(np.float32), (L, dh)))


def write_attention_model(path, precision, H=2, dh=16, D_in=8, V=30):
    """input_ids -> embedding (V, D_in) -> linear qkv -> softmax attention with the given precision."""
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder

    rng = np.random.default_rng(3)
    tensors = {"word": rng.standard_normal((V, D_in)).astype(np.float32),
               "qkv.weight": rng.standard_normal((3 * H * dh, D_in)).astype(np.float32)}
    g = GraphBuilder("bf16")
    ids = g.input("input_ids")
    g.input("attention_mask", optional=True)
    e = g.add("embedding", "emb", [ids], {"word": "word"})
    qkv = g.add("linear", "qkv", [e], {"weight": "qkv.weight"}, {"format": "fp32"})
    g.add("attention", "attn", [qkv], {}, {"kind": "softmax", "num_heads": H, "head_dim": dh, "precision": precision},
          output="out")
    g.output("out")
    write_model(path, tensors, g.build().to_json())
    return tensors


def test_bf16_request_without_the_cpu_feature_runs_float32(tmp_path, monkeypatch):
    """On a CPU without AVX512-BF16 a bf16 model is the float32 model, bit for bit (simulated here)."""
    import edgeformer
    import edgeformer.ops.attention as attention_op

    write_attention_model(tmp_path / "bf16.edgeformer", "bf16")
    write_attention_model(tmp_path / "fp32.edgeformer", "fp32")
    ids = np.random.default_rng(5).integers(0, 30, (2, 40))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    monkeypatch.setattr(attention_op, "bf16_attention_available", lambda: False)
    a, b = edgeformer.load(tmp_path / "bf16.edgeformer"), edgeformer.load(tmp_path / "fp32.edgeformer")
    try:
        np.testing.assert_array_equal(a.run(feeds)["out"], b.run(feeds)["out"])
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_precision_attribute_in_a_model(tmp_path, precision, threads):
    """A model whose attention asks for bf16 matches exact attention within the bf16 bound (and fp32's own bound
    with precision fp32, or on CPUs without AVX512-BF16, where bf16 falls back to the float32 kernel)."""
    import edgeformer

    H, dh, D_in, V = 2, 16, 8, 30
    path = tmp_path / "m.edgeformer"
    tensors = write_attention_model(path, precision, H, dh, D_in, V)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, (3, 150))
    mask = np.ones_like(ids)
    mask[1, 60:] = 0  # lengths 150 (float32 path), 60, 7 (bf16 path)
    mask[2, 7:] = 0
    model = edgeformer.load(path, threads=threads)
    try:
        got = model.run({"input_ids": ids, "attention_mask": mask})["out"]  # (B, S, H*dh)
    finally:
        model.close()
    x = tensors["word"][ids].astype(np.float64) @ tensors["qkv.weight"].T.astype(np.float64)  # (B, S, 3*H*dh)
    q, k, v = (x[..., i * H * dh:(i + 1) * H * dh].reshape(3, 150, H, dh).transpose(0, 2, 1, 3) for i in range(3))
    want = attention_ref(q, k, v, mask.astype(bool)).transpose(0, 2, 1, 3).reshape(3, 150, H * dh)
    vmax = np.abs(v).max()
    for b, L in enumerate(mask.sum(1)):
        bound = 2 ** -6 * vmax if precision == "bf16" and L <= SHORT else 1e-4 * vmax
        np.testing.assert_allclose(got[b, :L], want[b, :L], rtol=0, atol=bound)
    if precision == "bf16" and bf16_available():  # the bf16 path really ran: V's rounding shows
        assert np.abs(got[2, :7] - want[2, :7]).max() > 1e-6 * vmax


def test_precision_attribute_is_validated(tmp_path):
    import edgeformer
    from edgeformer.errors import EdgeformerError
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder

    g = GraphBuilder("bad")
    ids = g.input("input_ids")
    e = g.add("embedding", "emb", [ids], {"word": "word"})
    g.add("attention", "attn", [e], {}, {"kind": "softmax", "num_heads": 1, "head_dim": 2, "precision": "fp8"},
          output="out")
    g.output("out")
    path = tmp_path / "bad.edgeformer"
    write_model(path, {"word": np.zeros((4, 6), np.float32)}, g.build().to_json())
    with pytest.raises(EdgeformerError, match="precision"):
        edgeformer.load(path)


def test_converter_sets_precision_on_softmax_nodes_only():
    from converters.hf import DEFAULT_ATTENTION_PRECISION, set_attention_precision
    from edgeformer.errors import EdgeformerError
    from edgeformer.graph import GraphBuilder

    g = GraphBuilder("x")
    g.add("attention", "a", ["v"], {}, {"kind": "softmax", "num_heads": 1, "head_dim": 2})
    g.add("attention", "b", ["v"], {}, {"kind": "softmax", "num_heads": 1, "head_dim": 2, "causal": True})
    g.add("attention", "c", ["v"], {}, {"kind": "clipped_softmax", "num_heads": 1, "head_dim": 2})
    set_attention_precision(g.nodes, "bf16")
    assert [n.attrs.get("precision") for n in g.nodes] == ["bf16", None, None]
    set_attention_precision(g.nodes, "fp32")
    assert all("precision" not in n.attrs for n in g.nodes)
    with pytest.raises(EdgeformerError):
        set_attention_precision(g.nodes, "int4")
    assert DEFAULT_ATTENTION_PRECISION == {"dynamic-int8": "bf16", "static-int8": "bf16"}
