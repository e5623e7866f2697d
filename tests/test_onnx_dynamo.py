"""ONNX import of torch.onnx.export(dynamo=True) exports (needs onnxscript): BERT family and GPT-2, against ORT.

The dynamo exporter differs from the TorchScript one: deduplicated initializers, SDPA decomposed into 3-D batched
matmuls over (batch*heads) with Reshape/Transpose/Reshape of the keys, attention output merged straight into a
(B*S, width) matrix for GPT-2's Conv1D, masks built from GatherND / Max / Expand chains."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import convert_onnx  # noqa: E402
from tests.helpers_gpt2 import build_gpt2, export_gpt2  # noqa: E402
from tests.helpers_onnx import build_model, random_feeds, takes_token_types  # noqa: E402

CASES = [("bert", 18, "sdpa"), ("roberta", 18, "eager"), ("distilbert", 20, "sdpa"), ("gpt2", 18, "eager"),
         ("gpt2", 18, "sdpa")]


def export_dynamo(net, path, *, opset, token_types):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.net(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    args = (ids, mask, torch.zeros_like(ids))[:len(names)]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), args, str(path), dynamo=True, opset_version=opset, input_names=names,
                          output_names=["last_hidden_state"], dynamic_shapes={n: {0: batch, 1: seq} for n in names})
    return path


@pytest.mark.parametrize("family,opset,attn", CASES, ids=[f"{f}-op{o}-{a}" for f, o, a in CASES])
def test_dynamo_export_converts_to_coarse_ops_and_matches_ort(tmp_path, family, opset, attn):
    path = tmp_path / "model.onnx"
    if family == "gpt2":
        net = build_gpt2(seed=2, attn=attn)
        export_gpt2(net, path, opset=opset, dynamo=True)
        layers, shapes = net.config.n_layer, [(1, 1), (2, 17), (4, 100), (3, 5)]
    else:
        net = build_model(family, attn=attn)
        export_dynamo(net, path, opset=opset, token_types=takes_token_types(family))
        layers, shapes = net.config.num_hidden_layers if family != "distilbert" else net.config.n_layers, \
            [(1, 1), (2, 17), (4, 60), (3, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = edgeformer.load(convert_onnx(path, tmp_path / "model.edgeformer"), threads=1)
    try:
        attention = [n for n in model._graph.nodes if n.op == "attention"]
        assert {n.op for n in model._graph.nodes} == {"embedding", "linear", "layer_norm", "attention"}
        assert len(attention) == layers
        assert all(bool(n.attrs.get("causal")) == (family == "gpt2") for n in attention)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        for batch, length in shapes:
            feeds = random_feeds(batch, length, token_types="token_type_ids" in names, seed=batch * 10 + length)
            feeds = {k: v for k, v in feeds.items() if k in names}
            want = session.run(None, feeds)[0]
            got = model.run(feeds)["last_hidden_state"]
            valid = feeds["attention_mask"].astype(bool)
            err = float(np.abs(got[valid] - want[valid]).max())
            assert err <= 1e-4, f"batch {batch} length {length}: max abs error {err}"
    finally:
        model.close()
