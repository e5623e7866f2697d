"""Binary-hash (EcoFormer) attention: Numba kernels vs the float64 NumPy reference, properties, the
functional API, and the ``binary_hash`` attention kind inside a model file.

Every kernel call uses the same argument types (float32 C activations, float64 weights from
ops.attention_binary_hash.hash_weights, Python ints/floats/bools), so each kernel compiles once.

Tolerances:
- codes: the kernel hashes in float64, so its codes must equal the reference's wherever the reference's
  pre-sign value has |y| >= 1e-6 (the acceptance rule); items with a smaller |y| are not compared.
- outputs (float32 attention): |got - ref| <= 1e-5 * scale, scale = (sum_j |s_ij| |v_j| + beta |v_i|) / den_i
  per element (the magnitude of the terms summed, i.e. 1e-5 relative to the size of the weighted sum;
  for the normalised form sum_j |v_j| replaces |v_i|: the kernel adds beta sum_j v_j to sum_j s_ij v_j).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.errors import GraphError, InputError
from edgeformer.functional.binary_hash import (binary_hash_attention, code_inner_products, kernelized_hash,
                                               pack_codes, unpack_codes)
from edgeformer.kernels.binary_hash import QUADRATIC_MAX_LEN, binary_hash_attention as attn_kernel, binary_hash_codes
from edgeformer.ops.attention_binary_hash import BIG, hash_weights
from edgeformer.reference import binary_hash as R

Y_EPS = 1e-6


def make_weights(rng, H, m, dh, b, unit=True):
    anchors = rng.standard_normal((H, m, dh))
    if unit:  # anchors are copies of normalised tokens in EcoFormer
        anchors /= np.linalg.norm(anchors, axis=-1, keepdims=True)
    mvec = rng.uniform(0.0, 0.6, (H, m))
    A = rng.standard_normal((H, b, m))
    return anchors, mvec, A


def run_attention(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized, quad_len, w0=None, w1=None, out=None):
    an, asq, mv, a_t, b = hash_weights("test", anchors, mvec, A, H, dh)
    D = H * dh
    shared = layout == "shared"
    if out is None:
        out = np.zeros((x.shape[0], D), np.float32)
    B = len(cu) - 1
    attn_kernel(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(cu, np.int64), H, dh, 0,
                0 if shared else D, D if shared else 2 * D, shared, an, asq, mv, a_t, b, float(beta),
                bool(normalized), int(quad_len), out, 0 if w0 is None else w0, B * H if w1 is None else w1)
    return out


def run_codes(x, cu, H, dh, col, anchors, mvec, A):
    an, asq, mv, a_t, b = hash_weights("test", anchors, mvec, A, H, dh)
    codes = np.zeros((x.shape[0], H, -(-b // 64)), np.uint64)
    proj = np.zeros((x.shape[0], H, b))
    binary_hash_codes(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(cu, np.int64), H, dh, col, an, asq,
                      mv, a_t, b, codes, proj, 0, (len(cu) - 1) * H)
    return codes, proj


def scale_ref(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized):
    """Per-element magnitude of the summed terms (see the module docstring), float64 (T, H*dh)."""
    D = H * dh
    v_col = D if layout == "shared" else 2 * D
    x = x.astype(np.float64)
    scale = np.zeros((x.shape[0], D))
    for bi in range(len(cu) - 1):
        rows = slice(cu[bi], cu[bi + 1])
        if cu[bi + 1] == cu[bi]:
            continue
        L = cu[bi + 1] - cu[bi]
        for h in range(H):
            hs = slice(h * dh, (h + 1) * dh)
            cq = R.signs_ref(R.hash_projection_ref(x[rows, hs], anchors[h], mvec[h], A[h])).astype(np.float64)
            ck = cq if layout == "shared" else R.signs_ref(
                R.hash_projection_ref(x[rows, D + h * dh : D + (h + 1) * dh], anchors[h], mvec[h], A[h])).astype(float)
            v = np.abs(x[rows, v_col + h * dh : v_col + (h + 1) * dh])
            s = cq @ ck.T
            den = s.sum(1) + L * beta
            if normalized:
                scale[rows, hs] = (np.abs(s) @ v + beta * v.sum(0)) / den[:, None]
            else:
                scale[rows, hs] = (np.abs(s) @ v + beta * v) / den[:, None]
    return scale


def near_zero_items(x, cu, H, dh, anchors, mvec, A, layout):
    """(sequence, head) items where some reference pre-sign value has |y| < Y_EPS (codes may differ there)."""
    D = H * dh
    cols = [0] if layout == "shared" else [0, D]
    bad = set()
    for col in cols:
        y = R.packed_projection_ref(x, cu, H, dh, col, anchors, mvec, A)  # (T, H, b)
        for bi in range(len(cu) - 1):
            for h in range(H):
                if (np.abs(y[cu[bi] : cu[bi + 1], h]) < Y_EPS).any():
                    bad.add((bi, h))
    return bad


def assert_matches_reference(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized, quad_len):
    got = run_attention(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized, quad_len)
    assert np.isfinite(got).all()
    ref = R.packed_ref(x, cu, H, dh, anchors, mvec, A, layout=layout, beta=beta, normalized=normalized)
    tol = 1e-5 * scale_ref(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized) + 1e-30
    skip = near_zero_items(x, cu, H, dh, anchors, mvec, A, layout)
    for bi in range(len(cu) - 1):
        for h in range(H):
            if (bi, h) in skip:
                continue
            rows, cols = slice(cu[bi], cu[bi + 1]), slice(h * dh, (h + 1) * dh)
            err = np.abs(got[rows, cols] - ref[rows, cols])
            assert (err <= tol[rows, cols]).all(), (
                f"item ({bi}, {h}): max err {err.max():.3g}, max ratio {(err / tol[rows, cols]).max():.3g}")
    return got, ref


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.one_of(st.sampled_from([0, 1, 2, 16, 17, 64, 65, 257]), st.integers(0, 300)),
                            min_size=B, max_size=B))
    H = draw(st.integers(1, 3))
    dh = draw(st.sampled_from([1, 7, 32, 64]))
    m = draw(st.sampled_from([1, 5, 25]))
    b = draw(st.sampled_from([1, 16, 16, 63, 64, 65, 100]))
    layout = draw(st.sampled_from(["shared", "separate"]))
    normalized = draw(st.booleans())
    quad_len = draw(st.sampled_from([0, QUADRATIC_MAX_LEN, BIG]))
    beta = draw(st.sampled_from([None, None, 0.5, 3.0]))  # offsets above b
    magnitude = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return lengths, H, dh, m, b, layout, normalized, quad_len, beta, magnitude, seed


def build(lengths, H, dh, m, b, layout, magnitude, seed, unit=True):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    width = (2 if layout == "shared" else 3) * H * dh
    x = (rng.standard_normal((int(cu[-1]), width)) * magnitude).astype(np.float32)
    return x, cu, make_weights(rng, H, m, dh, b, unit)


@given(cases())
def test_kernel_matches_reference(case):
    lengths, H, dh, m, b, layout, normalized, quad_len, beta, magnitude, seed = case
    x, cu, (anchors, mvec, A) = build(lengths, H, dh, m, b, layout, magnitude, seed, unit=seed % 3 != 0)
    beta = b + 1.0 if beta is None else b + beta
    assert_matches_reference(x, cu, H, dh, anchors, mvec, A, layout, beta, normalized, quad_len)


@given(cases())
def test_codes_match_reference(case):
    lengths, H, dh, m, b, layout, _, _, _, magnitude, seed = case
    x, cu, (anchors, mvec, A) = build(lengths, H, dh, m, b, layout, magnitude, seed)
    col = 0 if layout == "shared" else H * dh
    codes, proj = run_codes(x, cu, H, dh, col, anchors, mvec, A)
    y = R.packed_projection_ref(x, cu, H, dh, col, anchors, mvec, A)  # (T, H, b)
    assert np.allclose(proj, y, rtol=1e-9, atol=1e-9)
    got = unpack_codes(codes, b)  # (T, H, b)
    want = R.signs_ref(y)
    clear = np.abs(y) >= Y_EPS
    assert (got[clear] == want[clear]).all()
    assert (pack_codes(want) == R.pack_ref(want)).all()


@settings(max_examples=20)
@given(st.integers(1, 200), st.sampled_from([1, 16, 64, 65, 130]), st.integers(0, 2**32 - 1))
def test_code_inner_product_is_b_minus_twice_popcount(n, b, seed):
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((n, b)) < rng.random(), 1, -1).astype(np.int8)
    packed = pack_codes(signs)
    assert packed.shape == (n, -(-b // 64))
    assert (unpack_codes(packed, b) == signs).all()
    want = signs.astype(np.int64) @ signs.astype(np.int64).T
    assert (code_inner_products(packed, packed, b) == want).all()
    assert (np.diag(want) == b).all()


def opposite_codes_case(L, dh, b, beta):
    """Separate layout where every query code is +1...+1 and every key code -1...-1 (s_ij = -b, the
    smallest possible): anchors p and -p; queries along p (D2 = [0, 4], sigma = 2, phi = [1, e^-1]), keys
    along -p (phi = [e^-1, 1]), mvec = 0 and every row of A = (1, -1): y_q = 1 - e^-1 > 0 > y_k."""
    rng = np.random.default_rng(L)
    p = rng.standard_normal(dh)
    p /= np.linalg.norm(p)
    v = rng.standard_normal((L, dh))
    x = np.concatenate([np.tile(p * 2.0, (L, 1)), np.tile(-p * 3.0, (L, 1)), v], axis=1).astype(np.float32)
    cu = np.array([0, L], np.int64)
    A = np.tile(np.array([1.0, -1.0]), (1, b, 1))  # (1, b, 2)
    return x, cu, np.stack([p, -p])[None], np.zeros((1, 2)), A


@pytest.mark.parametrize("quad_len", [0, BIG])
@pytest.mark.parametrize("normalized", [False, True])
def test_denominator_positive_at_the_extreme(quad_len, normalized):
    L, dh, b = 40, 8, 16
    for beta in (b + 1.0, b + 1e-3):
        x, cu, anchors, mvec, A = opposite_codes_case(L, dh, b, beta)
        codes_q, _ = run_codes(x, cu, 1, dh, 0, anchors, mvec, A)
        codes_k, _ = run_codes(x, cu, 1, dh, dh, anchors, mvec, A)
        assert (code_inner_products(codes_q[:, 0], codes_k[:, 0], b) == -b).all()
        got = run_attention(x, cu, 1, dh, anchors, mvec, A, "separate", beta, normalized, quad_len)
        v = x[:, 2 * dh :].astype(np.float64)
        den = L * (beta - b)  # sum_j s_ij + L beta with s_ij = -b
        want = np.broadcast_to((-b * v.sum(0) + (beta * v.sum(0) if normalized else beta * v)) / den, v.shape)
        assert np.isfinite(got).all()
        va = np.abs(v)
        scale = (b * va.sum(0) + (beta * va.sum(0) if normalized else beta * va)) / den  # as scale_ref
        assert (np.abs(got - want) <= 1e-5 * scale).all()


@settings(max_examples=15)
@given(st.integers(2, 150), st.sampled_from([16, 64]), st.booleans(), st.integers(0, 2**32 - 1))
def test_permutations(L, b, normalized, seed):
    """Shared QK: permuting a sequence permutes its outputs. Separate: permuting only the keys/values
    leaves the normalised form unchanged and moves the official one by beta (v'_i - v_i) / den_i."""
    H, dh, m = 2, 16, 9
    rng = np.random.default_rng(seed)
    anchors, mvec, A = make_weights(rng, H, m, dh, b)
    perm = rng.permutation(L)
    cu = np.array([0, L], np.int64)
    beta = b + 1.0
    x = rng.standard_normal((L, 2 * H * dh)).astype(np.float32)
    out = run_attention(x, cu, H, dh, anchors, mvec, A, "shared", beta, normalized, 0)
    out_p = run_attention(x[perm], cu, H, dh, anchors, mvec, A, "shared", beta, normalized, 0)
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-5 * np.abs(out).max())

    D = H * dh
    x = rng.standard_normal((L, 3 * D)).astype(np.float32)
    xp = x.copy()
    xp[:, D:] = x[perm, D:]  # keys and values move together, queries stay
    out = run_attention(x, cu, H, dh, anchors, mvec, A, "separate", beta, normalized, 0)
    out_p = run_attention(xp, cu, H, dh, anchors, mvec, A, "separate", beta, normalized, 0)
    if normalized:
        np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
    else:
        v, vp = x[:, 2 * D :].astype(np.float64), xp[:, 2 * D :].astype(np.float64)
        for h in range(H):
            cs = slice(h * dh, (h + 1) * dh)
            cq = R.signs_ref(R.hash_projection_ref(x[:, cs], anchors[h], mvec[h], A[h])).astype(float)
            ck = R.signs_ref(R.hash_projection_ref(x[:, D + h * dh : D + (h + 1) * dh], anchors[h], mvec[h], A[h]))
            den = (cq @ ck.T.astype(float)).sum(1) + L * beta  # (L,) unchanged by the key permutation
            shift = beta * (vp[:, cs] - v[:, cs]) / den[:, None]
            np.testing.assert_allclose(out_p[:, cs] - out[:, cs], shift, rtol=1e-4,
                                       atol=2e-5 * max(1.0, np.abs(out).max()))


def test_work_subrange_writes_only_its_items():
    x, cu, (anchors, mvec, A) = build([30, 5, 0, 70], 2, 8, 5, 16, "shared", 1.0, 1)
    full = run_attention(x, cu, 2, 8, anchors, mvec, A, "shared", 17.0, False, QUADRATIC_MAX_LEN)
    out = np.full_like(full, 7.0)
    run_attention(x, cu, 2, 8, anchors, mvec, A, "shared", 17.0, False, QUADRATIC_MAX_LEN, w0=1, w1=3, out=out)
    # items 1 (seq 0, head 1) and 2 (seq 1, head 0)
    np.testing.assert_array_equal(out[0:30, 8:16], full[0:30, 8:16])
    np.testing.assert_array_equal(out[30:35, 0:8], full[30:35, 0:8])
    assert (out[0:30, 0:8] == 7.0).all() and (out[30:35, 8:16] == 7.0).all() and (out[35:] == 7.0).all()


def test_zero_rows_and_degenerate_sigma():
    """An all-zero token hashes as u = 0 (no NaN); a sequence whose tokens all equal the only anchor has
    sigma = 0 (every D2 = 0) and phi = 1, the limit of exp(-0 / (2 sigma))."""
    rng = np.random.default_rng(3)
    anchors, mvec, A = make_weights(rng, 1, 1, 4, 16)
    anchors[0, 0] = [0.0, 1.0, 0.0, 0.0]  # exactly unit, so u == p exactly below
    x = rng.standard_normal((6, 8)).astype(np.float32)
    x[2, :4] = 0.0
    x[3:, :4] = [0.0, 5.0, 0.0, 0.0]
    cu = np.array([0, 3, 6], np.int64)
    assert_matches_reference(x, cu, 1, 4, anchors, mvec, A, "shared", 17.0, False, 0)
    _, proj = run_codes(x, cu, 1, 4, 0, anchors, mvec, A)
    np.testing.assert_allclose(proj[3:, 0], np.tile((1.0 - mvec[0]) @ A[0].T, (3, 1)), rtol=1e-12)


# ---- functional API -----------------------------------------------------------------------------------
def test_functional_matches_reference_with_padding():
    rng = np.random.default_rng(5)
    B, H, N, dh, m, b = 3, 2, 20, 16, 25, 16
    anchors, mvec, A = make_weights(rng, H, m, dh, b)
    qk = rng.standard_normal((B, H, N, dh)).astype(np.float32)
    v = rng.standard_normal((B, H, N, dh)).astype(np.float32)
    lengths = np.array([20, 7, 0])
    for form in ("auto", "linear", "quadratic"):
        out = binary_hash_attention(qk, v, anchors, mvec, A, nbits=16, lengths=lengths, form=form)
        assert out.shape == (B, H, N, dh) and out.dtype == np.float32
        for bi in range(B):
            L = lengths[bi]
            for h in range(H):
                want = R.head_ref(qk[bi, h, :L], None, v[bi, h, :L], anchors[h], mvec[h], A[h])
                np.testing.assert_allclose(out[bi, h, :L], want, rtol=1e-4, atol=1e-5)
            assert (out[bi, :, L:] == 0).all()
    codes, y = kernelized_hash(qk, anchors, mvec, A, lengths=lengths, return_projection=True)
    assert codes.shape == (B, H, N, 1) and y.shape == (B, H, N, b)
    want = R.hash_projection_ref(qk[0, 1], anchors[1], mvec[1], A[1])
    np.testing.assert_allclose(y[0, 1], want, rtol=1e-9, atol=1e-12)
    assert (codes[1, :, 7:] == 0).all()
    # separate keys, normalised form, beta
    k = rng.standard_normal((B, H, N, dh)).astype(np.float32)
    out = binary_hash_attention(qk[0], v[0], anchors, mvec, A, k=k[0], beta=20.5, normalized=True)
    want = R.head_ref(qk[0, 0], k[0, 0], v[0, 0], anchors[0], mvec[0], A[0], beta=20.5, normalized=True)
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(qk=np.zeros((1, 2, 4, 8), np.int32)), "float"),
    (dict(qk=np.zeros((2, 4, 8), np.float32) + np.nan), "finite"),
    (dict(v=np.zeros((2, 5, 8), np.float32)), "same shape"),
    (dict(nbits=8), "nbits"),
    (dict(beta=16.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(form="cubic"), "form"),
    (dict(lengths=np.array([5])), "lengths"),
    (dict(mvec=np.zeros((2, 3))), "mvec"),
    (dict(A=np.zeros((2, 16, 5)) + np.inf), "non-finite"),
    (dict(anchors=np.zeros((3, 5, 8))), "anchors"),
])
def test_functional_rejects_bad_input(change, message):
    rng = np.random.default_rng(0)
    args = dict(qk=rng.standard_normal((2, 4, 8)).astype(np.float32), v=np.zeros((2, 4, 8), np.float32),
                anchors=rng.standard_normal((2, 5, 8)), mvec=np.zeros((2, 5)), A=rng.standard_normal((2, 16, 5)))
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("nbits", "beta", "form", "lengths") if k in args}
    with pytest.raises(InputError, match=message):
        binary_hash_attention(args["qk"], args["v"], args["anchors"], args["mvec"], args["A"], **kwargs)


# ---- the attention kind in a model file ----------------------------------------------------------------
def write_hash_model(path, *, layout="shared", H=2, dh=8, m=6, b=16, vocab=50, seed=0, attrs=None, weights=None):
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder

    rng = np.random.default_rng(seed)
    D = H * dh
    width = (2 if layout == "shared" else 3) * D
    anchors, mvec, A = make_weights(rng, H, m, dh, b)
    tensors = {"word": rng.standard_normal((vocab, 12)).astype(np.float32),
               "proj.weight": (rng.standard_normal((width, 12)) / 3).astype(np.float32),
               "proj.bias": rng.standard_normal(width).astype(np.float32) * 0.1,
               "attn.anchors": anchors.astype(np.float32), "attn.mvec": mvec.astype(np.float32),
               "attn.A": A.astype(np.float32)}
    g = GraphBuilder("hash")
    ids = g.input("input_ids")
    g.input("attention_mask", optional=True)
    h = g.add("embedding", "emb", [ids], {"word": "word"})
    h = g.add("linear", "proj", [h], {"weight": "proj.weight", "bias": "proj.bias"}, {"format": "fp32"})
    node_weights = {"anchors": "attn.anchors", "mvec": "attn.mvec", "A": "attn.A"}
    node_weights.update(weights or {})
    node_attrs = {"kind": "binary_hash", "num_heads": H, "head_dim": dh, "qk_layout": layout}
    node_attrs.update(attrs or {})
    g.add("attention", "attn", [h], node_weights, node_attrs, output="out")
    g.output("out")
    write_model(path, tensors, g.build().to_json())
    return tensors


@pytest.mark.parametrize("layout", ["shared", "separate"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kind_in_a_model(tmp_path, layout, threads):
    import edgeformer

    path = tmp_path / "m.edgeformer"
    t = write_hash_model(path, layout=layout, attrs={"normalized": layout == "separate"})
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    model = edgeformer.load(path, threads=threads)
    try:
        got = model.run({"input_ids": ids, "attention_mask": mask})["out"]
    finally:
        model.close()
    H, dh = 2, 8
    for bi in range(3):
        L = int(mask[bi].sum())
        x = t["word"][ids[bi, :L]].astype(np.float64) @ t["proj.weight"].T.astype(np.float64) + t["proj.bias"]
        cu = np.array([0, L])
        want = R.packed_ref(x, cu, H, dh, t["attn.anchors"], t["attn.mvec"], t["attn.A"], layout=layout,
                            normalized=layout == "separate")
        np.testing.assert_allclose(got[bi, :L], want, rtol=1e-4, atol=1e-4)
        assert (got[bi, L:] == 0).all()


@pytest.mark.parametrize("attrs, weights, message", [
    ({"qk_layout": "diagonal"}, None, "qk_layout"),
    ({"form": "cubic"}, None, "form"),
    ({"beta": 16.0}, None, "beta"),
    ({"beta": 3}, None, "beta"),
    ({"normalized": 1}, None, "normalized"),
    ({"num_heads": 4}, None, "anchors"),
    ({"qk_layout": "separate"}, None, "input width"),
    ({}, {"mvec": "attn.A"}, "mvec"),
    ({}, {"anchors": "attn.mvec"}, "anchors"),
    ({}, {"extra": "attn.A"}, "unknown"),
])
def test_kind_rejects_bad_nodes(tmp_path, attrs, weights, message):
    import edgeformer

    path = tmp_path / "bad.edgeformer"
    write_hash_model(path, attrs=attrs, weights=weights)
    with pytest.raises(GraphError, match=message):
        edgeformer.load(path, threads=1)


def test_kind_rejects_non_finite_weights_and_missing_weights(tmp_path):
    import edgeformer
    from edgeformer.format import read_model, write_model

    path = tmp_path / "m.edgeformer"
    write_hash_model(path)
    mf = read_model(path)
    tensors = {k: np.array(v) for k, v in mf.tensors.items()}
    graph = mf.graph
    mf.close()
    tensors["attn.A"][0, 0, 0] = np.nan
    write_model(tmp_path / "nan.edgeformer", tensors, graph)
    with pytest.raises(GraphError, match="non-finite"):
        edgeformer.load(tmp_path / "nan.edgeformer", threads=1)
    del graph["nodes"][-1]["weights"]["A"]
    write_model(tmp_path / "missing.edgeformer", tensors, graph)
    with pytest.raises(GraphError, match="needs weights"):
        edgeformer.load(tmp_path / "missing.edgeformer", threads=1)


def test_softmax_kind_rejects_weights(tmp_path):
    import edgeformer

    path = tmp_path / "s.edgeformer"
    write_hash_model(path, layout="separate", attrs={"kind": "softmax"})
    with pytest.raises(GraphError, match="takes no weights"):
        edgeformer.load(path, threads=1)
