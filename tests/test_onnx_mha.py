"""ORT contrib MultiHeadAttention: the optimizer's MHA fusion of a tiny BERT, and hand-built graphs (padding mask as
(B, L) or key lengths, unidirectional) compared with ONNX Runtime's own kernel."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import UnsupportedOnnxError, convert_onnx  # noqa: E402
from tests.helpers_onnx import build_model, export, random_feeds  # noqa: E402


def ort_run(path, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def compare(path, model, shapes, *, token_types=False, vocab=120):
    for batch, length in shapes:
        feeds = random_feeds(batch, length, vocab=vocab, token_types=token_types, seed=batch * 13 + length)
        want = ort_run(path, feeds)
        got = model.run({k: v for k, v in feeds.items() if k in {s.name for s in model.inputs}})["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        err = float(np.abs(got[valid] - want[valid]).max())
        assert err <= 1e-4, f"batch {batch} length {length}: max abs error {err}"


def test_ort_optimizer_multi_head_attention_fusion(tmp_path):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    plain = export(build_model("bert"), tmp_path / "bert.onnx", opset=14)
    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(plain), model_type="bert", num_heads=5, hidden_size=40, opt_level=0,
                             optimization_options=options)
    path = tmp_path / "mha.onnx"
    opt.save_model_to_file(str(path))
    assert ("com.microsoft", "MultiHeadAttention") in {(n.domain, n.op_type) for n in onnx.load(path).graph.node}
    model = edgeformer.load(convert_onnx(path, tmp_path / "mha.edgeformer"), threads=1)
    try:
        assert {n.op for n in model._graph.nodes} == {"embedding", "linear", "layer_norm", "attention"}
        compare(path, model, [(1, 1), (2, 17), (4, 60), (3, 5)], token_types=True)
        feeds = random_feeds(2, 11, seed=5)  # the fused graph agrees with its decomposition
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(ort_run(path, feeds)[valid], ort_run(plain, feeds)[valid], atol=1e-5)
    finally:
        model.close()


def mha_graph(*, mask="2d", unidirectional=0, bias=True, d=24, heads=3, vocab=50, seed=0, packed=False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = {"word": rng.standard_normal((vocab, d)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["e"])]
    for name in "qkv":
        inits[f"w{name}"] = (rng.standard_normal((d, d)) * 0.4).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["e", f"w{name}"], [name]))
    inputs = ["q", "k", "v"] if not packed else ["q", "", ""]
    if bias:
        inits["bias"] = (rng.standard_normal(3 * d) * 0.3).astype(np.float32)
    inputs.append("bias" if bias else "")
    if mask == "2d":
        nodes.append(helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.INT32))
        inputs.append("m")
    elif mask == "lengths":
        nodes.append(helper.make_node("ReduceSum", ["attention_mask"], ["len64"], keepdims=0, axes=[1]))
        nodes.append(helper.make_node("Cast", ["len64"], ["m"], to=TensorProto.INT32))
        inputs.append("m")
    attrs = {"num_heads": heads}
    if unidirectional:
        attrs["unidirectional"] = 1
    nodes.append(helper.make_node("MultiHeadAttention", inputs, ["y"], domain="com.microsoft", name="mha", **attrs))
    graph = helper.make_graph(
        nodes, "mha",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 12), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize("mask,unidirectional,bias", [("2d", 0, True), ("lengths", 0, False), ("2d", 1, True),
                                                      ("lengths", 1, True)])
def test_hand_built_multi_head_attention_matches_ort(tmp_path, mask, unidirectional, bias):
    path = tmp_path / "mha.onnx"
    onnx.save(mha_graph(mask=mask, unidirectional=unidirectional, bias=bias), path)
    model = edgeformer.load(convert_onnx(path, tmp_path / "mha.edgeformer"), threads=1)
    try:
        attention = [n for n in model._graph.nodes if n.op == "attention"]
        assert len(attention) == 1 and bool(attention[0].attrs.get("causal")) == bool(unidirectional)
        compare(path, model, [(1, 1), (2, 9), (3, 20)], vocab=50)
    finally:
        model.close()


def test_packed_qkv_is_reported(tmp_path):
    path = tmp_path / "mha.onnx"
    onnx.save(mha_graph(packed=True), path)
    with pytest.raises(UnsupportedOnnxError, match="packed QKV"):
        convert_onnx(path, tmp_path / "mha.edgeformer")
