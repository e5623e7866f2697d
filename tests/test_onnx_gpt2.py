"""ONNX import of GPT-2 exports (TorchScript exporter; Conv1D as Reshape/Gemm/Reshape, Split of c_attn, causal mask
found by evaluating the mask subgraph) against ONNX Runtime, and against the Hugging Face loader's graph."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.hf import convert_hf_directory  # noqa: E402
from converters.onnx_import import convert_onnx  # noqa: E402
from converters.onnx_import.interpret import Interpreter  # noqa: E402
from converters.onnx_import.values import Unsupported  # noqa: E402
from tests.helpers_gpt2 import build_gpt2, export_gpt2, padded_feeds  # noqa: E402
from tests.helpers_onnx import contrib_graph  # noqa: E402

SIZES = {"d40h5l2": dict(n_embd=40, n_head=5, n_layer=2), "d64h4l3": dict(n_embd=64, n_head=4, n_layer=3)}
CASES = [("d40h5l2", 14, "eager"), ("d40h5l2", 17, "sdpa"), ("d64h4l3", 17, "eager"), ("d64h4l3", 14, "sdpa")]
SHAPES = [(1, 1), (2, 17), (4, 100), (3, 5)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_onnx")
    cache = {}

    def get(size, opset, attn):
        key = (size, opset, attn)
        if key not in cache:
            net = build_gpt2(seed=5, attn=attn, **SIZES[size])
            path = export_gpt2(net, root / f"gpt2_{size}_{opset}_{attn}.onnx", opset=opset)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = convert_onnx(path, path.with_suffix(".edgeformer"))
            cache[key] = (net, path, edgeformer.load(converted, threads=1))
        return cache[key]

    yield get
    for _, _, model in cache.values():
        model.close()


@pytest.mark.parametrize("size,opset,attn", CASES, ids=[f"{s}-op{o}-{a}" for s, o, a in CASES])
def test_gpt2_export_converts_to_coarse_causal_ops_and_matches_ort(exports, size, opset, attn):
    net, path, model = exports(size, opset, attn)
    layers = net.config.n_layer
    ops = [n.op for n in model._graph.nodes]
    assert set(ops) == {"embedding", "linear", "layer_norm", "attention"}
    assert ops.count("linear") == 4 * layers and ops.count("layer_norm") == 2 * layers + 1
    assert all(n.attrs.get("causal") is True for n in model._graph.nodes if n.op == "attention")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for layout in ("right", "left"):  # HF GPT-2 numbers positions 0..S-1 whatever the mask: left padding is exact
        for batch, length in SHAPES:
            feeds = padded_feeds(batch, length, seed=batch * 31 + length, layout=layout)
            want = session.run(None, feeds)[0]
            got = model.run(feeds)["last_hidden_state"]
            valid = feeds["attention_mask"].astype(bool)
            err = float(np.abs(got[valid] - want[valid]).max())
            assert err <= 1e-4, f"{layout} batch {batch} length {length}: max abs error {err}"
            assert np.all(got[~valid] == 0)


def test_onnx_graph_equals_the_checkpoint_graph(exports, tmp_path):
    net, _, from_onnx = exports("d40h5l2", 14, "eager")
    net.save_pretrained(tmp_path)
    from_hf = edgeformer.load(convert_hf_directory(tmp_path, tmp_path / "hf.edgeformer"), threads=1)
    try:
        assert [n.op for n in from_onnx._graph.nodes] == [n.op for n in from_hf._graph.nodes]
        feeds = padded_feeds(3, 23, seed=9)
        a, b = (m.run(feeds)["last_hidden_state"] for m in (from_onnx, from_hf))
        assert float(np.abs(a - b).max()) <= 1e-5
    finally:
        from_hf.close()


@pytest.fixture(scope="module")
def interpreter():
    model = contrib_graph("layer_norm", True)
    return Interpreter(model, {}, {"input_ids": "input_ids", "attention_mask": "attention_mask"})


def _bias(env, *, padding, causal, window=None):
    s = env.seq
    mask = env.inputs["attention_mask"].astype(bool)
    keep = np.ones((env.batch, 1, s, s), dtype=bool)
    if padding:
        keep &= mask[:, None, None, :]
    q, k = np.arange(s)[:, None], np.arange(s)[None, :]
    if causal:
        keep &= k <= q
    if window is not None:
        keep &= q - k < window
    return np.where(keep, 0.0, np.finfo(np.float32).min)


@pytest.mark.parametrize("padding,causal", [(True, False), (True, True), (False, False)])
def test_mask_classification(interpreter, padding, causal):
    got = interpreter.verify_mask(lambda env: _bias(env, padding=padding, causal=causal),
                                  lambda m: (np.abs(m) <= 1e-6, m <= -1e4))
    # a causal mask alone drops every padded key of a right-padded batch: it counts as a padding mask too
    assert got == (padding or causal, causal)


def test_sliding_window_mask_is_rejected(interpreter):
    with pytest.raises(Unsupported, match="between valid tokens"):
        interpreter.verify_mask(lambda env: _bias(env, padding=True, causal=True, window=2),
                                lambda m: (np.abs(m) <= 1e-6, m <= -1e4))
