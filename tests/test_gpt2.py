"""GPT-2 from a Hugging Face checkpoint directory (random weights, offline) against transformers GPT2Model."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.hf import convert_hf_directory  # noqa: E402
from edgeformer.errors import EdgeformerError  # noqa: E402
from tests.helpers_gpt2 import build_gpt2, gpt2_hidden, padded_feeds  # noqa: E402

SHAPES = [(1, 1), (2, 17), (4, 100), (3, 5), (1, 64)]  # (batch, length)
CONFIGS = {
    "d40h5l2": dict(n_embd=40, n_head=5, n_layer=2),
    "d64h4l3": dict(n_embd=64, n_head=4, n_layer=3),
    "d40h5l2-inner72-layerscale-relu": dict(n_embd=40, n_head=5, n_layer=2, n_inner=72,
                                            scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "d64h4l2-lmhead": dict(n_embd=64, n_head=4, n_layer=2, lm_head=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"gpt2-{request.param}")
    net = build_gpt2(seed=3, **CONFIGS[request.param])
    net.save_pretrained(directory)
    path = convert_hf_directory(directory, directory / "model.edgeformer")
    model = edgeformer.load(path, threads=1)
    yield net, model
    model.close()


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_matches_transformers_on_valid_tokens(converted, layout):
    net, model = converted
    for batch, length in SHAPES:
        feeds = padded_feeds(batch, length, seed=batch * 1000 + length, layout=layout)
        want = gpt2_hidden(net, feeds["input_ids"], feeds["attention_mask"])
        got = model.run(feeds)["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        assert got.shape == want.shape
        err = float(np.abs(got[valid] - want[valid]).max())
        assert err <= 1e-4, f"{layout} batch {batch} length {length}: max abs error {err}"
        assert np.all(got[~valid] == 0)


def test_graph_and_metadata(converted):
    net, model = converted
    layers = net.config.n_layer
    ops = [n.op for n in model._graph.nodes]
    assert ops.count("attention") == layers and ops.count("linear") == 4 * layers
    assert ops.count("layer_norm") == 2 * layers + 1
    assert all(n.attrs.get("causal") for n in model._graph.nodes if n.op == "attention")
    assert model.max_length == net.config.n_positions
    assert [s.name for s in model.inputs] == ["input_ids", "attention_mask"]


def test_too_long_sequence_is_an_input_error(converted):
    _, model = converted
    with pytest.raises(EdgeformerError, match="longer"):
        model.run({"input_ids": np.zeros((1, 129), dtype=np.int64)})


def test_rejects_cross_attention_and_unknown_activation(tmp_path):
    net = build_gpt2(n_embd=16, n_head=2, n_layer=1, vocab=30, positions=16)
    net.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"add_cross_attention": True}, "cross attention"),
                            ({"activation_function": "swish"}, "activation_function")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(EdgeformerError, match=message):
            convert_hf_directory(tmp_path, tmp_path / "out.edgeformer")


def test_long_padded_batch_crosses_attention_tiles(tmp_path):
    """Lengths up to 300: causal attention over more than one 256-key tile, right padded."""
    net = build_gpt2(n_embd=40, n_head=5, n_layer=2, positions=320, seed=4)
    net.save_pretrained(tmp_path)
    model = edgeformer.load(convert_hf_directory(tmp_path, tmp_path / "model.edgeformer"), threads=2)
    try:
        feeds = padded_feeds(3, 300, seed=8)
        feeds["attention_mask"][1, 270:] = 0
        feeds["attention_mask"][2] = 0
        feeds["attention_mask"][2, :257] = 1
        want = gpt2_hidden(net, feeds["input_ids"], feeds["attention_mask"])
        got = model.run(feeds)["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        assert float(np.abs(got[valid] - want[valid]).max()) <= 1e-4
    finally:
        model.close()
