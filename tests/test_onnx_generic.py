"""The ONNX importer's generic-op fallback end to end: ONNX graphs the coarse ops cannot express (a BERT export that
keeps the pooler's Tanh output, a T5 encoder with its relative-position bias, hand-built graphs over the generic op
list, a ViT-like Conv stem, the onnx package's function-expanded node tests) converted, loaded with
edgeformer.load and compared with ONNX Runtime; exports that fuse keep coarse ops only; malformed and hostile graphs
give clear errors."""
from __future__ import annotations

import collections
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import OnnxFormatError, UnsupportedOnnxError, convert_onnx  # noqa: E402
from converters.onnx_import.generic import build_generic_graph  # noqa: E402
from edgeformer.errors import InputError  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tests.helpers_onnx import build_model, export, random_feeds  # noqa: E402

TOL = 1e-4


def ort_outputs(path_or_model, feeds):
    data = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    outs = session.run(None, {k: v for k, v in feeds.items() if k in names})
    return dict(zip([o.name for o in session.get_outputs()], outs))


def assert_matches_ort(model_path, onnx_path, feeds, tol=TOL, valid_only=()):
    """Every output within tol of ONNX Runtime; outputs in ``valid_only`` (coarse token outputs, zeros at padding)
    on valid tokens only."""
    model = edgeformer.load(model_path, threads=1)
    got = model.run({k: v for k, v in feeds.items() if k in {s.name for s in model.inputs}})
    want = ort_outputs(onnx_path, feeds)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        a, b = got[name].astype(np.float64), want[name]
        if name in valid_only:
            a, b = a[feeds["attention_mask"].astype(bool)], b[feeds["attention_mask"].astype(bool)]
        err = float(np.abs(a - b).max(initial=0.0))
        assert err <= tol, f"{name}: max abs err {err}"
    model.close()


def generic_ops(path) -> collections.Counter:
    model = edgeformer.load(path, threads=1)
    return collections.Counter(n.attrs["op_type"] if n.op == "onnx" else n.op for n in model.graph.nodes)


# -- BERT with the pooler output (Tanh): the coarse path cannot express it ----------------------------------------
def export_bert_with_pooler(path, opset):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(hidden_size=40, num_attention_heads=5, num_hidden_layers=2, intermediate_size=72,
                           vocab_size=120, max_position_embeddings=80, type_vocab_size=2)
    config._attn_implementation = "eager"
    net = tf.BertModel(config, add_pooling_layer=True).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.net(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, mask, torch.zeros_like(ids)), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]},
                                        "pooler_output": {0: "batch"}})
    return path


@pytest.fixture(scope="module", params=[14, 17])
def bert_pooler(request, tmp_path_factory):
    return export_bert_with_pooler(tmp_path_factory.mktemp("pool") / f"bert{request.param}.onnx", request.param)


def test_bert_pooler_output_runs_as_a_hybrid(bert_pooler, tmp_path):
    """Coarse ops for the encoder, then unpack and three generic ops (Gather of token 0, Gemm, Tanh)."""
    out = tmp_path / "bert.edgeformer"
    with pytest.warns(UserWarning, match=r"outputs \['pooler_output'\] run as 3 generic ops"):
        convert_onnx(bert_pooler, out)
    ops = generic_ops(out)
    assert ops["Gather"] == ops["Gemm"] == ops["Tanh"] == ops["unpack"] == 1 and ops["linear"] == 8
    assert sum(ops.values()) == 8 + 2 + 5 + 1 + 1 + 3  # linear, attention, layer_norm, embedding, unpack, generic
    # (should the coarse path learn BERT's pooler, this test needs another head the coarse ops lack)
    model = edgeformer.load(out, threads=1)
    assert [s.name for s in model.outputs] == ["last_hidden_state", "pooler_output"]
    assert model.outputs[1].shape == ("batch", 40)
    for batch, length, seed in [(1, 1, 0), (2, 7, 1), (3, 33, 2), (4, 64, 3)]:
        assert_matches_ort(out, bert_pooler, random_feeds(batch, length, seed=seed), valid_only=["last_hidden_state"])


def test_token_head_runs_as_a_hybrid(plain_bert, tmp_path):
    """A per-token head the coarse ops lack (Sigmoid): hybrid, compared on valid tokens like every token output."""
    model = onnx.load(plain_bert)
    w = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "head_w"))
    model.graph.node.extend([helper.make_node("MatMul", ["last_hidden_state", "head_w"], ["head"], name="head"),
                             helper.make_node("Sigmoid", ["head"], ["token_probs"], name="probs")])
    model.graph.output.append(helper.make_tensor_value_info("token_probs", TensorProto.FLOAT, ["batch", "seq", 3]))
    path = tmp_path / "head.onnx"
    onnx.save(model, path)
    out = tmp_path / "head.edgeformer"
    with pytest.warns(UserWarning, match="token_probs"):
        convert_onnx(path, out)
    ops = generic_ops(out)
    assert ops["MatMul"] == ops["Sigmoid"] == ops["unpack"] == 1 and ops["linear"] > 0
    for batch, length, seed in [(1, 5, 0), (4, 23, 1)]:
        assert_matches_ort(out, path, random_feeds(batch, length, seed=seed),
                           valid_only=["last_hidden_state", "token_probs"])


def test_padding_sensitive_outputs_run_fully_generic(bert_pooler, tmp_path):
    """An unmasked mean over the sequence reads padded positions: the hybrid (zeros there) would differ from the
    ONNX graph, the padding probe notices, and the whole graph runs as generic ops."""
    model = onnx.load(bert_pooler)
    model.graph.node.append(helper.make_node("ReduceMean", ["last_hidden_state"], ["mean_all"], axes=[1],
                                             keepdims=0, name="unmasked_mean"))
    model.graph.output.append(helper.make_tensor_value_info("mean_all", TensorProto.FLOAT, ["batch", 40]))
    path = tmp_path / "mean.onnx"
    onnx.save(model, path)
    out = tmp_path / "mean.edgeformer"
    with pytest.warns(UserWarning, match="does not cover this graph"):
        convert_onnx(path, out)
    assert "linear" not in generic_ops(out)
    assert_matches_ort(out, path, random_feeds(3, 12, seed=4))


def test_generic_flag_cli_and_inspect(bert_pooler, tmp_path):
    from edgeformer.cli import main

    out = tmp_path / "forced.edgeformer"
    with redirect_stdout(io.StringIO()):
        assert main(["convert", str(bert_pooler), "-o", str(out), "--generic"]) == 0
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["inspect", str(out)]) == 0
    assert "onnx[Tanh] x1" in text.getvalue() and "generic:" in text.getvalue()
    assert_matches_ort(out, bert_pooler, random_feeds(2, 9, seed=5))
    errors = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(errors):
        assert main(["convert", str(tmp_path), "-o", str(tmp_path / "x.edgeformer"), "--generic"]) == 1
    assert "ONNX sources only" in errors.getvalue()


def test_check_command_runs_generic_models(bert_pooler, tmp_path):
    from converters.onnx_import import check_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_onnx(bert_pooler, batch=3, seq=11, verbose=False)
    assert set(report) == {"last_hidden_state", "pooler_output"}
    assert max(r["max_abs"] for r in report.values()) <= TOL


def test_check_names_the_first_diverging_generic_node(bert_pooler, tmp_path):
    """Every float value of a generic graph is traced to the ONNX tensor of the same name, so `edgeformer check`
    names the first node that goes wrong (here: a corrupted weight of layer 1's FFN up-projection)."""
    import json

    from converters.onnx_import import check_onnx
    from edgeformer.format import write_model

    graph, tensors, info = build_generic_graph(onnx.load(bert_pooler))
    node = next(nd for nd in graph.nodes if nd.name == "/net/encoder/layer.1/intermediate/dense/MatMul")
    weight = next(iter(node.weights.values()))
    tensors[weight] = tensors[weight] * np.float32(3.0)
    path = tmp_path / "corrupt.edgeformer"
    write_model(path, tensors, graph.to_json(), metadata={"onnx.trace": json.dumps(info["trace"]),
                                                          "onnx.outputs": json.dumps(info["outputs"])})
    report = check_onnx(bert_pooler, path, batch=2, seq=6, verbose=False)
    assert report["last_hidden_state"]["max_abs"] > 1e-2
    assert report["first_divergence"]["node"] == node.name and report["first_divergence"]["onnx_op"] == "MatMul"


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory):
    return export(build_model("bert"), tmp_path_factory.mktemp("plain") / "bert.onnx", opset=17)


def test_exports_that_fuse_keep_coarse_ops_only(plain_bert, tmp_path):
    out = tmp_path / "coarse.edgeformer"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        convert_onnx(plain_bert, out)
    ops = generic_ops(out)
    assert "onnx" not in edgeformer.load(out, threads=1).graph.nodes[0].op and ops["linear"] > 0
    assert not any(n.op in ("onnx", "unpack", "pack") for n in edgeformer.load(out, threads=1).graph.nodes)
    forced = tmp_path / "generic.edgeformer"
    convert_onnx(plain_bert, forced, generic=True)
    assert all(n.op == "onnx" for n in edgeformer.load(forced, threads=1).graph.nodes)
    feeds = random_feeds(3, 20, seed=7)
    assert_matches_ort(forced, plain_bert, feeds)
    coarse, generic = (edgeformer.load(p, threads=1).run(feeds)["last_hidden_state"] for p in (out, forced))
    valid = feeds["attention_mask"].astype(bool)
    assert np.abs(coarse[valid] - generic[valid]).max() <= TOL


# -- T5 encoder: relative-position buckets (Log, Div, Min, Where, Abs...) and RMS norm ---------------------------
def test_t5_encoder_relative_position_bias(tmp_path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0)
    net = tf.T5EncoderModel(config).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    path = tmp_path / "t5.onnx"
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), (ids, mask), str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
    out = tmp_path / "t5.edgeformer"
    with pytest.warns(UserWarning, match="generic ops"):
        convert_onnx(path, out)
    assert {"Log", "Min", "Where", "Pow", "ReduceMean"} <= set(generic_ops(out))
    for batch, length, seed in [(1, 1, 0), (2, 9, 1), (4, 45, 2)]:
        feeds = random_feeds(batch, length, vocab=100, token_types=False, seed=seed)
        assert_matches_ort(out, path, feeds)


# -- hand-built graphs ------------------------------------------------------------------------------------------------
def make_model(nodes, inputs, outputs, inits, opset=20, domains=()):
    """outputs: value infos, or names typed by onnx shape inference; domains: extra (domain, version) imports."""
    names = [o for o in outputs if isinstance(o, str)]
    infos = [o for o in outputs if not isinstance(o, str)] + [helper.make_empty_tensor_value_info(o) for o in names]
    graph = helper.make_graph(nodes, "g", inputs, infos,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, v) for d, v in domains])
    model.ir_version = 9
    if names:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        del model.graph.output[:]
        model.graph.output.extend(o if not isinstance(o, str) else  # untyped where inference fails (bad attributes)
                                  inferred.get(o, helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                                  for o in outputs)
    return model


def op_zoo_model():
    """Every generic op family on a dynamic (batch, 6) input, with shape subgraphs that fold and ones that do not."""
    rng = np.random.default_rng(0)
    inits = {"zero": np.float32(0), "half": np.float32(0.5), "lo": np.float32(-0.5), "three": np.float32(3),
             "k2": np.array([2], np.int64), "ax1": np.array([1], np.int64), "split": np.array([2, 4], np.int64),
             "reps": np.array([1, 2], np.int64), "pads": np.array([0, 1, 0, 2], np.int64),
             "gamma": rng.uniform(0.5, 1.5, 6).astype(np.float32), "beta": rng.standard_normal(6).astype(np.float32),
             "w": rng.standard_normal((6, 5)).astype(np.float32), "cols": np.array([0, -1, 3], np.int64),
             "one_i": np.array(1, np.int64), "zero_i": np.array(0, np.int64), "i1": np.array([1], np.int64),
             "i2": np.array([2], np.int64)}
    n = helper.make_node
    nodes = [
        n("Greater", ["x", "zero"], ["pos"]), n("Relu", ["x"], ["relu"]), n("Sigmoid", ["x"], ["sig"]),
        n("Where", ["pos", "relu", "sig"], ["where"]),
        n("CumSum", ["where", "one_i"], ["cums"], exclusive=1, reverse=1),
        n("TopK", ["cums", "k2"], ["topv", "topi"], axis=1),
        n("ArgMax", ["x"], ["argmax"], axis=1, keepdims=1, select_last_index=1),
        n("Unsqueeze", ["x", "ax1"], ["xu1"]), n("Unsqueeze", ["x", "i2"], ["xu2"]),
        n("Mul", ["xu1", "xu2"], ["outer"]), n("Trilu", ["outer", "one_i"], ["tri"], upper=0),
        n("Flatten", ["tri"], ["flat"], axis=1),
        n("Split", ["x", "split"], ["s1", "s2"], axis=1), n("Tile", ["s1", "reps"], ["tile"]),
        n("Pad", ["s2", "pads", "half"], ["pad"], mode="constant"),
        n("Einsum", ["s1", "s2"], ["ein"], equation="bi,bj->bij"),
        n("Clip", ["x", "lo", "half"], ["clip"]), n("Min", ["x", "clip", "sig"], ["mn"]),
        n("Max", ["x", "clip"], ["mx"]), n("ReduceSum", ["x", "ax1"], ["rsum"], keepdims=0),
        n("ReduceMax", ["x", "ax1"], ["rmax"], keepdims=1), n("ReduceMean", ["x", "ax1"], ["rmean"]),
        n("Sub", ["x", "rmax"], ["shifted"]), n("Sign", ["shifted"], ["sign"]),
        n("Mul", ["x", "three"], ["x3"]), n("Floor", ["x3"], ["fl"]), n("Ceil", ["x3"], ["ce"]),
        n("Div", ["fl", "fl"], ["ratio"]), n("IsNaN", ["ratio"], ["nan"]), n("Not", ["nan"], ["notnan"]),
        n("And", ["notnan", "pos"], ["both"]), n("Or", ["nan", "pos"], ["either"]),
        n("Cast", ["both"], ["both_f"], to=1), n("Cast", ["either"], ["either_f"], to=1),
        n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "one_i"], ["width"]),
        n("Range", ["zero_i", "width", "one_i"], ["rng"]), n("Cast", ["rng"], ["rng_f"], to=1),
        n("ConstantOfShape", ["shape"], ["twos"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])),
        n("Mul", ["twos", "rng_f"], ["ramp"]), n("Shape", ["x"], ["shape_b"], end=1),
        n("Concat", ["shape_b", "i1", "k2"], ["eshape"], axis=0), n("Expand", ["half", "eshape"], ["expanded"]),
        n("GatherElements", ["x", "idx"], ["ge"], axis=1), n("Gather", ["x", "cols"], ["gcols"], axis=1),
        n("Softmax", ["x"], ["sm"], axis=-1), n("LogSoftmax", ["x"], ["lsm"], axis=0),
        n("LayerNormalization", ["x", "gamma", "beta"], ["ln"], epsilon=1e-5),
        n("Gelu", ["ln"], ["gelu"], approximate="tanh"), n("MatMul", ["gelu", "w"], ["mm"]),
        n("Abs", ["x"], ["abs"]), n("Add", ["abs", "half"], ["abs1"]), n("Sqrt", ["abs1"], ["sqrt"]),
        n("Log", ["abs1"], ["log"]), n("Reciprocal", ["abs1"], ["rec"]), n("Exp", ["x"], ["exp"]),
        n("Erf", ["x"], ["erf"]), n("Tanh", ["x"], ["tanh"]), n("Pow", ["abs1", "three"], ["pow"]),
        n("Neg", ["x"], ["neg"]), n("Equal", ["argmax", "topi"], ["eq"]), n("Less", ["x", "half"], ["less"]),
        n("Transpose", ["outer"], ["outer_t"], perm=[0, 2, 1]), n("Slice", ["outer_t", "i1", "k2", "ax1"], ["sl"]),
        n("Squeeze", ["sl", "ax1"], ["sq"]), n("Reshape", ["outer", "rshape"], ["rs"]),
    ]
    inits["rshape"] = np.array([0, -1], np.int64)
    outputs = ["where", "cums", "topv", "topi", "argmax", "flat", "tile", "pad", "ein", "mn", "mx", "rsum", "rmean",
               "sign", "ce", "both_f", "either_f", "ramp", "expanded", "ge", "gcols", "sm", "lsm", "mm", "sqrt", "log",
               "rec", "exp", "erf", "tanh", "pow", "neg", "eq", "less", "sq", "rs"]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    idx_info = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 3])
    return make_model(nodes, [x_info, idx_info], outputs, inits)


def test_op_zoo_graph_matches_onnx_runtime(tmp_path):
    model = op_zoo_model()
    path = tmp_path / "zoo.onnx"
    onnx.save(model, path)
    out = tmp_path / "zoo.edgeformer"
    with pytest.warns(UserWarning, match="generic ops"):
        convert_onnx(path, out)
    assert len(generic_ops(out)) >= 45
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 6)).astype(np.float32)
        x[0, 2] = 0.0  # 0 / 0 -> NaN for IsNaN
        feeds = {"x": x, "idx": rng.integers(-6, 6, size=(batch, 3))}
        assert_matches_ort(out, path, feeds, tol=1e-5)


def vit_stem_model(patch=4, size=12, channels=3, dim=8):
    """Conv patch embedding, flatten, class token, positions, layer norm, GELU MLP: a ViT-like block."""
    rng = np.random.default_rng(2)
    tokens = (size // patch) ** 2 + 1
    inits = {"w": rng.standard_normal((dim, channels, patch, patch)).astype(np.float32) * 0.2,
             "b": rng.standard_normal(dim).astype(np.float32), "cls": rng.standard_normal((1, 1, dim)).astype(np.float32),
             "pos": rng.standard_normal((1, tokens, dim)).astype(np.float32), "flat": np.array([0, dim, -1], np.int64),
             "gamma": np.ones(dim, np.float32), "beta": np.zeros(dim, np.float32),
             "fc": rng.standard_normal((dim, dim)).astype(np.float32), "one": np.array([1], np.int64),
             "zero": np.array([0], np.int64)}
    n = helper.make_node
    nodes = [n("Conv", ["pixel_values", "w", "b"], ["conv"], kernel_shape=[patch, patch], strides=[patch, patch]),
             n("Reshape", ["conv", "flat"], ["patches"]), n("Transpose", ["patches"], ["seq"], perm=[0, 2, 1]),
             n("Shape", ["pixel_values"], ["pshape"]), n("Slice", ["pshape", "zero", "one"], ["bdim"]),
             n("Concat", ["bdim", "one", "one"], ["cls_shape"], axis=0),
             n("Expand", ["cls", "cls_shape"], ["cls_b"]), n("Concat", ["cls_b", "seq"], ["tokens"], axis=1),
             n("Add", ["tokens", "pos"], ["x"]), n("LayerNormalization", ["x", "gamma", "beta"], ["ln"]),
             n("MatMul", ["ln", "fc"], ["h"]), n("Gelu", ["h"], ["y"])]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", channels, size, size])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", tokens, dim])],
                      inits)


def test_vit_like_conv_stem(tmp_path):
    path = tmp_path / "vit.onnx"
    onnx.save(vit_stem_model(), path)
    out = tmp_path / "vit.edgeformer"
    convert_onnx(path, out, generic=True)
    assert generic_ops(out)["Conv"] == 1
    model = edgeformer.load(out, threads=1)
    assert model.inputs[0].shape == ("batch", 3, 12, 12)
    pixels = np.random.default_rng(3).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert_matches_ort(out, path, {"pixel_values": pixels})
    with pytest.raises(InputError, match="size 12"):
        model.run({"pixel_values": pixels[:, :, :8]})


def test_float64_graph_is_converted_to_float32_with_a_warning(tmp_path):
    n = helper.make_node
    nodes = [n("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE), n("Mul", ["x64", "scale"], ["y64"]),
             n("Cast", ["y64"], ["y"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
                       {"scale": np.array([1.5, -2.0, 0.25])})
    path = tmp_path / "f64.onnx"
    onnx.save(model, path)
    out = tmp_path / "f64.edgeformer"
    with pytest.warns(UserWarning, match="float64 -> float32"):
        convert_onnx(path, out, generic=True)
    assert_matches_ort(out, path, {"x": np.array([[1.0, 2.0, 3.0]], np.float32)})


# -- the onnx package's function-expanded node tests: multi-node graphs through the whole pipeline ---------------------
def expanded_cases():
    from edgeformer.generic import DTYPES, OPS
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    for case in cases:
        nodes = case.model.graph.node
        if case.kind != "node" or len(nodes) < 2 or not all(nd.op_type in OPS or nd.op_type == "Constant" for nd in nodes):
            continue
        arrays = [numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else np.asarray(a)
                  for a in case.data_sets[0][0]]
        if any(a.dtype.name not in DTYPES for a in arrays):
            continue  # float16 / bfloat16 / int8... graph inputs: not runtime dtypes (tested in test_generic_ops.py)
        yield case, arrays


def test_onnx_function_expanded_cases_end_to_end(tmp_path):
    from edgeformer.format import write_model

    counts = collections.Counter()
    for case, arrays in expanded_cases():
        path = tmp_path / "case.edgeformer"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, tensors, info = build_generic_graph(case.model)
        write_model(path, tensors, graph.to_json())
        model = edgeformer.load(path, threads=1)
        feeds = {i.name: a for i, a in zip(case.model.graph.input, arrays)}
        got = model.run(feeds)
        for info_out, want in zip(case.model.graph.output, case.data_sets[0][1]):
            want = numpy_helper.to_array(want) if isinstance(want, onnx.TensorProto) else np.asarray(want)
            ours = got[info_out.name]
            tol = 2e-3 if want.dtype == np.float16 else 1e-4
            assert ours.shape == want.shape, case.name
            np.testing.assert_allclose(ours.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol,
                                       equal_nan=True, err_msg=case.name)
        counts["ran"] += 1
    print(f"function-expanded ONNX node tests through convert + load + run: {dict(counts)}")
    assert counts["ran"] >= 290


# -- malformed and hostile graphs ------------------------------------------------------------------------------------
def test_unsupported_ops_are_listed_together(tmp_path):
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["r"], name="relu"), n("NonZero", ["r"], ["nz"], name="nz1"),
             n("Cast", ["nz"], ["nzf"], to=1, name="cast"), n("Hardmax", ["r"], ["h1"], name="hm1"),
             n("Hardmax", ["h1"], ["h2"], name="hm2"), n("Mystery", ["x"], ["m"], name="myst", domain="example.ops"),
             n("FastGelu", ["x"], ["fg"], name="fastgelu", domain="com.microsoft"),
             n("Add", ["h2", "m"], ["a"], name="add"), n("Add", ["a", "fg"], ["y"], name="add2")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                       ["y", "nzf"], {}, opset=17, domains=[("example.ops", 1), ("com.microsoft", 1)])
    with pytest.raises(UnsupportedOnnxError) as info:
        build_generic_graph(model)
    problems = info.value.problems
    assert set(problems) == {("", "NonZero", 17), ("", "Hardmax", 17), ("example.ops", "Mystery", 1),
                             ("com.microsoft", "FastGelu", 1)}
    assert [name for name, _ in problems[("", "Hardmax", 17)]] == ["hm1", "hm2"]
    assert "x2: 'hm1', 'hm2'" in str(info.value) and "unknown domain 'example.ops'" in str(info.value)


@pytest.mark.parametrize("node, message", [
    (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 0]), "permutation"),
    (helper.make_node("Softmax", ["x"], ["y"], axis=4), "out of range"),
    (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING), "element type 8"),
    (helper.make_node("Gelu", ["x"], ["y"], approximate="fast"), "one of"),
    (helper.make_node("Shape", ["x"], ["y"], start=1, colour=2), "unknown attributes"),
    (helper.make_node("If", ["c"], ["y"], then_branch=helper.make_graph([], "t", [], []),
                      else_branch=helper.make_graph([], "e", [], [])), "no generic op"),
])
def test_bad_attributes_are_reported(node, message):
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                                helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       ["y"], {})
    with pytest.raises(UnsupportedOnnxError, match=message):
        build_generic_graph(model)


def test_hostile_shapes(tmp_path):
    n = helper.make_node
    # folded at conversion time: a constant shape of 2^40 elements is refused, never allocated
    model = make_model([n("ConstantOfShape", ["huge"], ["big"]), n("Add", ["x", "big"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                       ["y"],
                       {"huge": np.array([2 ** 20, 2 ** 20], np.int64)})
    with pytest.raises(UnsupportedOnnxError, match="limit"):
        build_generic_graph(model)
    # data-dependent at run time: the target shape is a graph input
    model = make_model([n("Expand", ["x", "shape"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1]),
                        helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
                       ["y"], {})
    path = tmp_path / "expand.onnx"
    onnx.save(model, path)
    out = tmp_path / "expand.edgeformer"
    with pytest.warns(UserWarning, match="runs as 1 generic ops"):
        convert_onnx(path, out)
    runner = edgeformer.load(out, threads=1)
    x = np.ones((2, 1), np.float32)
    assert runner.run({"x": x, "shape": np.array([3, 2, 5])})["y"].shape == (3, 2, 5)
    with pytest.raises(InputError, match="Expand.*limit"):
        runner.run({"x": x, "shape": np.array([2 ** 20, 2, 2 ** 20])})


def test_folding_keeps_constants_small_and_shapes_folded(tmp_path):
    """A ConstantOfShape of 2^21 elements stays a node (the file stays small); Shape -> Gather of a fixed dim folds
    to a constant, the dynamic batch dim does not; dims onnx inference leaves unnamed get the inputs' names."""
    n = helper.make_node
    nodes = [n("ConstantOfShape", ["big_shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             n("ReduceSum", ["big"], ["total"], keepdims=0),
             n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "one"], ["width"]),
             n("Gather", ["shape", "zero"], ["batch"]), n("Cast", ["width"], ["width_f"], to=1),
             n("Cast", ["batch"], ["batch_f"], to=1), n("Mul", ["x", "width_f"], ["xw"]),
             n("Add", ["xw", "total"], ["xt"]), n("Add", ["xt", "batch_f"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])], ["y"],
                       {"big_shape": np.array([1024, 2048], np.int64), "one": np.array(1, np.int64),
                        "zero": np.array(0, np.int64)}, opset=17)
    graph, tensors, _ = build_generic_graph(model)
    ops = collections.Counter(node.attrs["op_type"] for node in graph.nodes)
    assert ops["ConstantOfShape"] == 1 and ops["Shape"] == 1 and ops["Gather"] == 1  # width folded, batch not
    assert sum(t.size for t in tensors.values()) < 100
    assert graph.inputs[0]["shape"] == ["batch", 4]
    from edgeformer.format import write_model

    write_model(tmp_path / "f.edgeformer", tensors, graph.to_json())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    y = edgeformer.load(tmp_path / "f.edgeformer", threads=1).run({"x": x})["y"]
    np.testing.assert_allclose(y, x * 4 + 0.5 * 2 ** 21 + 2)


def test_wrong_declared_shapes_are_corrected_by_the_probes(tmp_path):
    """A value_info that contradicts the graph (onnx shape inference keeps it) would make the runtime's shape check
    fail every run; the converter's probe runs catch it and declare a name instead of the wrong int."""
    n = helper.make_node
    model = make_model([n("Relu", ["x"], ["r"]), n("Neg", ["r"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], ["y"], {}, opset=17)
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 99]))
    graph, tensors, _ = build_generic_graph(model)
    relu = next(node for node in graph.nodes if node.attrs["op_type"] == "Relu")
    assert relu.attrs["output_shapes"] == [["batch", "?r_1"]]
    from edgeformer.format import write_model

    write_model(tmp_path / "s.edgeformer", tensors, graph.to_json())
    x = np.arange(-4, 4, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(edgeformer.load(tmp_path / "s.edgeformer", threads=1).run({"x": x})["y"],
                                  -np.maximum(x, 0))


def test_unknown_outputs_and_inputs_as_outputs(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                       ["y", helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], {})
    with pytest.raises(OnnxFormatError, match="unknown outputs"):
        build_generic_graph(model, outputs=["z"])
    with pytest.raises(UnsupportedOnnxError, match="graph input used directly"):
        build_generic_graph(model)
    graph, tensors, info = build_generic_graph(model, outputs=["y"])
    assert [o["name"] for o in graph.outputs] == ["y"]
