"""Tiny random BERTs, converted from a Hugging Face directory, against transformers (PyTorch) on
random padded batches: right padding, left padding and holes in the mask."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edgeformer
from converters.hf import convert_hf_directory
from tests.helpers import save_tiny_bert


@pytest.fixture(scope="module", params=["gelu", "gelu_new", "relu"])
def tiny(request, tmp_path_factory):
    directory = save_tiny_bert(tmp_path_factory.mktemp(f"bert-{request.param}"), act=request.param, seed=1)
    path = convert_hf_directory(directory, directory / "model.edgeformer")
    import torch
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
