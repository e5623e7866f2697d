"""Packed flash-style softmax attention kernel vs the float64 NumPy reference and torch SDPA (where installed).

Every kernel call goes through `run_kernel`, which fixes the argument types (float32 C arrays,
int64 offsets, Python int/float/bool scalars) so that exactly one specialisation is compiled.

Tolerances: the output error of float32 attention is bounded by max|V| times the perturbation of
the softmax weights, which is ~2x the absolute error of the float32 logits. That error is
~sqrt(dh) * eps32 * scale * sum_c |q_c k_c| (BLAS dot products), so `tolerance` = max|V| *
(2e-6 + (sqrt(dh) + 3) * eps32 * scale * max sum_c |q_c k_c|), per (sequence, head). For unit-scale
inputs this is ~2e-6 to 1e-5 of the output scale; for large-magnitude inputs (logits up to ~1e4)
it grows as float32 itself demands. Measured over 300 random cases the kernel's error is 1-4% of
this tolerance, and the same size as torch's float32 error against the float64 reference.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeformer.kernels.attention import KEY_BLOCK, QUERY_BLOCK, attention_softmax
from edgeformer.reference.attention import attention_ref, packed_attention_ref, unpack_qkv
from tests.optional import requires_torch, torch

EPS32 = float(np.finfo(np.float32).eps)
HEAD_DIMS = [1, 7, 32, 33, 64]


def run_kernel(qkv, cu, num_heads, head_dim, scale, causal, w0=None, w1=None, out=None):
    qkv = np.ascontiguousarray(qkv, dtype=np.float32)
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if out is None:
        out = np.zeros((qkv.shape[0], num_heads * head_dim), np.float32)
    w0 = 0 if w0 is None else w0
    w1 = (len(cu) - 1) * num_heads if w1 is None else w1
    attention_softmax(qkv, cu, int(num_heads), int(head_dim), float(scale), bool(causal), out, int(w0), int(w1))
    return out


def make_case(lengths, num_heads, head_dim, magnitude, seed):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = (rng.standard_normal((int(cu[-1]), 3 * num_heads * head_dim)) * magnitude).astype(np.float32)
    return qkv, cu


def tolerance(qkv, cu, num_heads, head_dim, scale):
    """Per-element absolute tolerance (T, H*dh), see the module docstring."""
    D = num_heads * head_dim
    tol = np.zeros((qkv.shape[0], D))
    q64 = np.abs(qkv.astype(np.float64))
    for b in range(len(cu) - 1):
        rows = slice(cu[b], cu[b + 1])
        if cu[b + 1] == cu[b]:
            continue
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            qa = q64[rows, cols]  # (L, dh)
            ka = q64[rows, D + h * head_dim : D + (h + 1) * head_dim]  # (L, dh)
            vmax = np.abs(qkv[rows, 2 * D + h * head_dim : 2 * D + (h + 1) * head_dim]).max()
            logit_err = (np.sqrt(head_dim) + 3) * EPS32 * abs(scale) * (qa @ ka.T).max()
            tol[rows, cols] = vmax * (2e-6 + logit_err) + 1e-30
    return tol


def torch_packed(qkv, cu, num_heads, head_dim, scale, causal):
    """torch SDPA on the padded batch with a boolean mask built from the lengths; valid rows only."""
    q, k, v, key_mask = unpack_qkv(qkv, cu, num_heads, head_dim)
    S = q.shape[2]
    allowed = torch.from_numpy(key_mask)[:, None, None, :].expand(-1, 1, S, S)  # (B, 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
    with torch.no_grad():
        o = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=allowed, scale=scale
        ).numpy()  # (B, H, S, dh); NaN on fully masked (padding) query rows
    out = np.zeros((qkv.shape[0], num_heads * head_dim), np.float32)
    for b in range(len(cu) - 1):
        L = int(cu[b + 1] - cu[b])
        out[cu[b] : cu[b + 1]] = o[b, :, :L].transpose(1, 0, 2).reshape(L, num_heads * head_dim)
    return out


def assert_close(got, want, tol, what):
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= tol)  # also catches NaN
    assert not bad.any(), f"{what}: {bad.sum()} elements off, max err {np.nanmax(err):.3g}, max ratio {np.nanmax(err / tol):.3g}"


lengths_st = st.one_of(st.sampled_from([0, 1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300]), st.integers(0, 300))


@st.composite
def cases(draw):
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(lengths_st, min_size=B, max_size=B))
    H = draw(st.integers(1, 6))
    dh = draw(st.sampled_from(HEAD_DIMS))
    causal = draw(st.booleans())
    magnitude = draw(st.sampled_from([1.0, 1.0, 1e-3, 3.0, 30.0, 100.0]))
    scale = draw(st.sampled_from([None, None, 1.0, 0.05]))
    scale = 1.0 / np.sqrt(dh) if scale is None else scale
    seed = draw(st.integers(0, 2**32 - 1))
    return lengths, H, dh, causal, magnitude, scale, seed


@given(cases())
def test_matches_reference_and_torch(case):
    lengths, H, dh, causal, magnitude, scale, seed = case
    qkv, cu = make_case(lengths, H, dh, magnitude, seed)
    got = run_kernel(qkv, cu, H, dh, scale, causal)
    assert np.isfinite(got).all()
    tol = tolerance(qkv, cu, H, dh, scale)
    assert_close(got, packed_attention_ref(qkv, cu, H, dh, scale, causal), tol, "vs numpy reference")
    if torch is not None and max(lengths) > 0:
        assert_close(got, torch_packed(qkv, cu, H, dh, scale, causal), 2 * tol, "vs torch sdpa")


@given(cases(), st.data())
def test_work_subrange_writes_only_its_items(case, data):
    lengths, H, dh, causal, magnitude, scale, seed = case
    qkv, cu = make_case(lengths, H, dh, magnitude, seed)
    n_items = len(lengths) * H
    w0 = data.draw(st.integers(0, n_items))
    w1 = data.draw(st.integers(w0, n_items))
    full = run_kernel(qkv, cu, H, dh, scale, causal)
    sentinel = np.float32(-7.25)
    out = np.full_like(full, sentinel)
    run_kernel(qkv, cu, H, dh, scale, causal, w0, w1, out=out)
    inside = np.zeros(full.shape, bool)
    for w in range(w0, w1):
        b, h = divmod(w, H)
        inside[cu[b] : cu[b + 1], h * dh : (h + 1) * dh] = True
    assert np.array_equal(out[inside], full[inside])  # bitwise: splitting work never changes results
    assert (out[~inside] == sentinel).all()


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_many_tiles(causal):
    L, H, dh = 2000, 2, 64
    assert L > 4 * KEY_BLOCK and L > 4 * QUERY_BLOCK
    qkv, cu = make_case([L], H, dh, 1.0, seed=7)
    scale = 1.0 / np.sqrt(dh)
    got = run_kernel(qkv, cu, H, dh, scale, causal)
    tol = tolerance(qkv, cu, H, dh, scale)
    assert_close(got, packed_attention_ref(qkv, cu, H, dh, scale, causal), tol, "vs numpy reference")
    if torch is not None:
        assert_close(got, torch_packed(qkv, cu, H, dh, scale, causal), 2 * tol, "vs torch sdpa")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_logits_are_stable(causal, sign):
    """Logits in [0, 2.4e4] (sign +1) or [-2.4e4, 0] (sign -1), 40 apart: exp would overflow or
    underflow without the running max. Each row's softmax is then one-hot (exp(-40) ~ 4e-18) on its
    largest allowed logit, exactly, so the output must equal that key's row of V."""
    L, H, dh = 600, 1, 2  # crosses key and query block boundaries
    rng = np.random.default_rng(3)
    u = rng.permutation(L).astype(np.float32)  # distinct integer key "positions"
    qkv = np.zeros((L, 3 * H * dh), np.float32)
    qkv[:, 0] = sign * 40.0  # q = (+-40, 0)
    qkv[:, 2] = u  # k = (u_j, 0): logit_ij = +-40 u_j, exact in float32
    qkv[:, 4:6] = rng.standard_normal((L, 2))
    cu = np.array([0, L], np.int64)
    got = run_kernel(qkv, cu, H, dh, 1.0, causal)
    best = np.array([np.argmax(sign * (u[: i + 1] if causal else u)) for i in range(L)])
    np.testing.assert_allclose(got, qkv[best, 4:6], rtol=1e-6, atol=0)
    ref = packed_attention_ref(qkv, cu, H, dh, 1.0, causal)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_equal_huge_logits_average_values():
    """All logits 1e4 exactly: the softmax is uniform, so the output is the mean of V."""
    L, dh = 500, 3
    qkv = np.zeros((L, 3 * dh), np.float32)
    qkv[:, 0] = 100.0
    qkv[:, dh] = 100.0  # q.k = 1e4 for every pair
    qkv[:, 2 * dh :] = np.random.default_rng(0).standard_normal((L, dh))
    cu = np.array([0, L], np.int64)
    got = run_kernel(qkv, cu, 1, dh, 1.0, False)
    np.testing.assert_allclose(got, np.broadcast_to(qkv[:, 2 * dh :].astype(np.float64).mean(0), got.shape), atol=2e-6)


def test_length_one_and_empty_sequences():
    qkv, cu = make_case([0, 1, 0, 0, 1, 0], 3, 7, 1.0, seed=1)
    got = run_kernel(qkv, cu, 3, 7, 0.5, False)
    # a single token attends only to itself: the output is its V
    np.testing.assert_array_equal(got, qkv[:, 2 * 21 :])
    np.testing.assert_array_equal(run_kernel(qkv, cu, 3, 7, 0.5, True), got)


def test_all_empty_and_empty_ranges():
    qkv = np.zeros((0, 3 * 2 * 4), np.float32)
    out = run_kernel(qkv, np.zeros(4, np.int64), 2, 4, 0.5, False)
    assert out.shape == (0, 8)
    out = run_kernel(qkv, np.zeros(1, np.int64), 2, 4, 0.5, True)  # B = 0
    assert out.shape == (0, 8)
    qkv, cu = make_case([5, 3], 2, 4, 1.0, seed=2)
    out = np.full((8, 8), np.float32(3.0))
    run_kernel(qkv, cu, 2, 4, 0.5, False, 2, 2, out=out)  # empty work range
    assert (out == 3.0).all()


# ---- the reference itself ------------------------------------------------------------------------


def test_reference_fully_masked_rows_are_zero():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    mask = np.ones((2, 5), bool)
    mask[1] = False  # every key of batch 1 masked
    mask[0, 2:] = False
    o = attention_ref(q, k, v, key_mask=mask)
    assert (o[1] == 0).all()
    o_short = attention_ref(q[:1, :, :, :], k[:1, :, :2], v[:1, :, :2])  # same as dropping masked keys
    np.testing.assert_allclose(o[:1], o_short, rtol=1e-12, atol=1e-12)


@requires_torch
def test_reference_matches_torch_padded():
    rng = np.random.default_rng(1)
    B, H, S, dh = 3, 2, 9, 5
    q, k, v = (rng.standard_normal((B, H, S, dh)) for _ in range(3))
    mask = np.arange(S)[None, :] < np.array([9, 4, 1])[:, None]  # (B, S)
    for causal in (False, True):
        o = attention_ref(q, k, v, key_mask=mask, causal=causal, scale=0.3)
        allowed = torch.from_numpy(mask)[:, None, None, :].expand(-1, 1, S, S)
        if causal:
            allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
        t = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=allowed, scale=0.3
        ).numpy()
        for b, L in enumerate([9, 4, 1]):
            np.testing.assert_allclose(o[b, :, :L], t[b, :, :L], rtol=1e-10, atol=1e-12)


@settings(max_examples=10)
@given(st.integers(0, 2**32 - 1))
def test_packed_reference_is_per_sequence_attention(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 12, size=rng.integers(1, 4))
    H, dh = 2, 3
    qkv, cu = make_case(lengths, H, dh, 1.0, seed)
    got = packed_attention_ref(qkv, cu, H, dh, 0.4, True)
    D = H * dh
    for b, L in enumerate(lengths):
        rows = qkv[cu[b] : cu[b + 1]].astype(np.float64)
        for h in range(H):
            q, k, v = (rows[:, i * D + h * dh : i * D + (h + 1) * dh] for i in range(3))
            s = 0.4 * q @ k.T + np.triu(np.full((L, L), -np.inf), 1)
            p = np.exp(s - s.max(1, keepdims=True)) if L else s
            want = (p / p.sum(1, keepdims=True)) @ v if L else np.zeros((0, dh))
            np.testing.assert_allclose(got[cu[b] : cu[b + 1], h * dh : (h + 1) * dh], want, rtol=1e-12, atol=1e-12)
