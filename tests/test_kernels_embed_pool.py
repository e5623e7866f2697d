"""embedding (word + position + token type) and mean / CLS pooling over packed sequences.

Oracles: edgeformer.reference.embedding / pool (float64 NumPy) and PyTorch where installed (F.embedding, masked mean).
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgeformer.kernels.embedding import embedding
from edgeformer.kernels.pool import cls_pool, mean_pool
from edgeformer.reference.embedding import embedding_ref
from edgeformer.reference.pool import cls_pool_ref, mean_pool_ref
from tests.optional import F, torch

F32 = np.float32
I64 = np.int64
SENTINEL = F32(-5.5)


def readonly(a):
    a = np.ascontiguousarray(a, dtype=F32)
    a.setflags(write=False)
    return a


def empty_table(d):
    return readonly(np.zeros((0, d)))


NO_IDS = np.zeros(0, I64)
dims = st.sampled_from([1, 2, 3, 7, 33, 64, 385])


@st.composite
def embedding_case(draw):
    t = draw(st.integers(1, 12))
    d = draw(dims)
    vocab = draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    word = readonly(rng.standard_normal((vocab, d)) * draw(st.sampled_from([1.0, 1e-3, 1e20])))
    ids = rng.integers(0, vocab, t).astype(I64)
    pos_mode = draw(st.sampled_from(["none", "positions"]))
    type_mode = draw(st.sampled_from(["none", "default0", "given"]))
    if pos_mode == "positions":
        n_pos = draw(st.integers(1, 20))
        pos_table = readonly(rng.standard_normal((n_pos, d)))
        positions = rng.integers(0, n_pos, t).astype(I64)
    else:
        pos_table, positions = empty_table(d), NO_IDS
    if type_mode == "none":
        type_table, types = empty_table(d), NO_IDS
    else:
        n_types = draw(st.integers(1, 3))
        type_table = readonly(rng.standard_normal((n_types, d)))
        types = rng.integers(0, n_types, t).astype(I64) if type_mode == "given" else NO_IDS
    r0 = draw(st.integers(0, t))
    r1 = draw(st.integers(r0, t))
    return ids, positions, types, word, pos_table, type_table, r0, r1


@given(embedding_case())
def test_embedding(case):
    ids, positions, types, word, pos_table, type_table, r0, r1 = case
    t, d = len(ids), word.shape[1]
    out = np.full((t, d), SENTINEL, F32)
    embedding(ids, positions, types, word, pos_table, type_table, out, r0, r1)
    rows = np.ones(t, bool)
    rows[r0:r1] = False
    assert np.all(out[rows] == SENTINEL)
    has_pos, has_type = pos_table.shape[0] > 0, type_table.shape[0] > 0
    expect = embedding_ref(ids, word, positions if has_pos else None, pos_table if has_pos else None,
                           types if len(types) else None, type_table if has_type else None)
    # two float32 additions: each rounds by at most half an ulp of a partial sum
    magnitude = embedding_ref(ids, np.abs(word), positions if has_pos else None,
                              np.abs(pos_table) if has_pos else None, types if len(types) else None,
                              np.abs(type_table) if has_type else None)
    assert np.all(np.abs(out[r0:r1] - expect[r0:r1]) <= 1.2e-7 * magnitude[r0:r1])
    # PyTorch: the same float32 sums in the same order, so bit-identical
    if torch is not None:
        te = F.embedding(torch.from_numpy(ids), torch.from_numpy(word.copy()))
        if has_pos:
            te = te + F.embedding(torch.from_numpy(positions), torch.from_numpy(pos_table.copy()))
        if has_type:
            tt = torch.from_numpy(types) if len(types) else torch.zeros(t, dtype=torch.int64)
            te = te + F.embedding(tt, torch.from_numpy(type_table.copy()))
        np.testing.assert_array_equal(out[r0:r1], te.numpy()[r0:r1])


def test_embedding_default_type_is_zero():
    d = 5
    word = readonly(np.arange(20).reshape(4, d))
    type_table = readonly(np.stack([np.full(d, 100.0), np.full(d, 1000.0)]))
    ids = np.array([3, 0, 2], I64)
    out = np.empty((3, d), F32)
    embedding(ids, NO_IDS, NO_IDS, word, empty_table(d), type_table, out, 0, 3)
    np.testing.assert_array_equal(out, np.asarray(word)[ids] + 100.0)


@st.composite
def packed_case(draw):
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 16, 33]), min_size=1, max_size=7))
    d = draw(dims)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(I64)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 1e-20, 1e20]))
    offset = draw(st.sampled_from([0.0, 1e3]))
    x = (offset + rng.standard_normal((int(cu[-1]), d)) * scale).astype(F32)
    b0 = draw(st.integers(0, len(lengths)))
    b1 = draw(st.integers(b0, len(lengths)))
    return x, cu, b0, b1


def padded(x, cu):
    """Packed tokens -> (B, L, d) padded batch + (B, L) mask, as a Hugging Face model returns them (torch)."""
    lengths = np.diff(cu)
    batch, longest = len(lengths), max(int(lengths.max()), 1)
    hidden = torch.zeros(batch, longest, x.shape[1])
    mask = torch.zeros(batch, longest)
    for b, n in enumerate(lengths):
        hidden[b, :n] = torch.from_numpy(x[cu[b]:cu[b + 1]])
        mask[b, :n] = 1
    return hidden, mask


@given(packed_case())
def test_mean_pool(case):
    x, cu, b0, b1 = case
    batch = len(cu) - 1
    out = np.full((batch, x.shape[1]), SENTINEL, F32)
    mean_pool(x, cu, out, b0, b1)
    rows = np.ones(batch, bool)
    rows[b0:b1] = False
    assert np.all(out[rows] == SENTINEL)
    expect = mean_pool_ref(x, cu)
    np.testing.assert_allclose(out[b0:b1], expect[b0:b1], rtol=2e-7, atol=0)
    # sentence-transformers mean pooling: sum(h * mask) / clamp(sum(mask), 1e-9)
    if torch is not None:
        hidden, mask = padded(x, cu)
        m = mask.unsqueeze(-1)
        tref = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        scale = np.abs(x).max() if x.size else 1.0
        np.testing.assert_allclose(out[b0:b1], tref.numpy()[b0:b1], rtol=1e-5, atol=1e-6 * scale)


@given(packed_case())
def test_cls_pool(case):
    x, cu, b0, b1 = case
    batch = len(cu) - 1
    out = np.full((batch, x.shape[1]), SENTINEL, F32)
    cls_pool(x, cu, out, b0, b1)
    rows = np.ones(batch, bool)
    rows[b0:b1] = False
    assert np.all(out[rows] == SENTINEL)
    np.testing.assert_array_equal(out[b0:b1], cls_pool_ref(x, cu)[b0:b1])
    if torch is not None:
        hidden, _ = padded(x, cu)
        tref = hidden[:, 0].numpy()  # padded rows of empty sequences are zeros too
        np.testing.assert_array_equal(out[b0:b1], tref[b0:b1])


def test_pool_empty_and_single_token():
    x = np.arange(12, dtype=F32).reshape(4, 3)
    cu = np.array([0, 0, 1, 1, 4], I64)
    out = np.full((4, 3), SENTINEL, F32)
    mean_pool(x, cu, out, 0, 4)
    np.testing.assert_array_equal(out, [[0, 0, 0], [0, 1, 2], [0, 0, 0], [6, 7, 8]])
    cls_pool(x, cu, out, 0, 4)
    np.testing.assert_array_equal(out, [[0, 0, 0], [0, 1, 2], [0, 0, 0], [3, 4, 5]])


def test_one_signature_each():
    for k in (embedding, mean_pool, cls_pool):
        assert len(k.signatures) <= 1, (k, k.signatures)
