"""Tiny random BERTs, converted from a Hugging Face directory, against transformers (PyTorch) on
random padded batches: right padding, left padding and holes in the mask. Also checks the torch-free
test builder (tests.helpers.write_tiny_bert) against transformers on the same weights."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgeformer
from converters.hf import convert_hf_directory
from tests.helpers import save_tiny_bert, tiny_bert_arrays, write_tiny_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["gelu", "gelu_new", "relu"])
def tiny(request, tmp_path_factory):
    directory = save_tiny_bert(tmp_path_factory.mktemp(f"bert-{request.param}"), act=request.param, seed=1)
    path = convert_hf_directory(directory, directory / "model.edgeformer")
    from transformers import BertModel

    net = BertModel.from_pretrained(str(directory), attn_implementation="eager").eval()

    def reference(ids, mask, types):
        with torch.no_grad():
            return net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()

    return edgeformer.load(path, threads=2), reference


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 40))
    layout = draw(st.sampled_from(["full", "right", "left", "holes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, 120, size=(batch, seq)).astype(np.int64)
    types = rng.integers(0, 2, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(batch):
        length = int(rng.integers(1, seq + 1))
        if layout == "right":
            mask[row, length:] = 0
        elif layout == "left":
            mask[row, : seq - length] = 0
        elif layout == "holes":
            mask[row] = rng.integers(0, 2, size=seq)
            mask[row, rng.integers(0, seq)] = 1
    return ids, mask, types


@settings(max_examples=15)
@given(batches())
def test_matches_transformers_on_valid_tokens(tiny, data):
    model, reference = tiny
    ids, mask, types = data
    got = model.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})["last_hidden_state"]
    want = reference(ids, mask, types)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    assert not got[~valid].any(), "padded positions must be zero"


def test_fully_padded_row_gives_zeros(tiny):
    model, reference = tiny
    ids = np.array([[5, 6, 7], [0, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [0, 0, 0]], dtype=np.int64)
    got = model.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    assert not got[1].any()
    want = reference(ids[:1], mask[:1], np.zeros_like(ids[:1]))
    np.testing.assert_allclose(got[:1], want, atol=2e-5, rtol=1e-4)


def test_thread_counts_agree(tiny, tmp_path):
    model, _ = tiny
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, 120, size=(3, 37)).astype(np.int64)}
    one = edgeformer.load(model.path, threads=1).run(feeds)["last_hidden_state"]
    two = model.run(feeds)["last_hidden_state"]
    np.testing.assert_allclose(one, two, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("act, pooling", [("gelu", "mean"), ("gelu_new", "cls"), ("relu", "mean")])
def test_torch_free_builder_matches_transformers(tmp_path, act, pooling):
    """write_tiny_bert (used by the runtime tests where torch is absent) is a real BERT: same weights in
    transformers give the same hidden states, and its head is sentence-transformers' pooling + normalize."""
    from transformers import BertConfig, BertModel

    kwargs = dict(hidden=40, heads=5, layers=2, ffn=72, vocab=120, positions=64, seed=4)
    model = edgeformer.load(write_tiny_bert(tmp_path / "m.edgeformer", act=act, pooling=pooling, **kwargs), threads=2)
    config = BertConfig(vocab_size=120, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                        intermediate_size=72, max_position_embeddings=64, type_vocab_size=2, hidden_act=act)
    net = BertModel(config, add_pooling_layer=False).eval()
    state = {k: torch.from_numpy(v) for k, v in tiny_bert_arrays(**kwargs).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 120, size=(3, 17)).astype(np.int64)
    types = rng.integers(0, 2, size=(3, 17)).astype(np.int64)
    mask = np.ones((3, 17), np.int64)
    mask[1, 9:] = 0
    mask[2, 1:] = 0
    out = model.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        want = net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(out["last_hidden_state"][valid], want[valid], atol=2e-5, rtol=1e-4)
    m = mask[:, :, None]
    pooled = want[:, 0] if pooling == "cls" else (want * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(out["sentence_embedding"], pooled, atol=2e-5, rtol=1e-4)
