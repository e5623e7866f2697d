"""ONNX import of ViT image classifiers: random-weight transformers ViTForImageClassification / ViTModel (offline),
exported with torch.onnx.export (TorchScript exporter at opsets 14 and 17; the dynamo exporter when onnxscript is
installed), converted, and compared with ONNX Runtime and PyTorch (max abs error <= 1e-4, batch sizes 1 to 4)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgeformer  # noqa: E402
from converters.onnx_import import convert_onnx  # noqa: E402
from converters.onnx_import.errors import OnnxFormatError, UnsupportedOnnxError  # noqa: E402
from tests.optional import optional_import  # noqa: E402
from tests.test_vit import CONFIGS, build_vit, pixels, torch_outputs  # noqa: E402

HAS_ONNXSCRIPT = optional_import("onnxscript") is not None
COARSE_OPS = {"patch_embedding", "layer_norm", "linear", "attention", "pool", "activation"}


def export_vit(net, path, *, opset=17, dynamo=False, dynamic_image=False):
    """torch.onnx.export of a ViT through a keyword-argument wrapper, with a dynamic batch axis (and dynamic channel,
    height and width axes with dynamic_image, as Optimum declares them)."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixel_values):
            out = self.net(pixel_values=pixel_values)
            return out.logits if hasattr(out, "logits") else (out.last_hidden_state, out.pooler_output)

    names = ["logits"] if hasattr(net, "classifier") else ["last_hidden_state", "pooler_output"]
    x = torch.from_numpy(pixels(2, net))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(Wrapper(), (x,), str(path), dynamo=True, opset_version=opset,
                              input_names=["pixel_values"], output_names=names,
                              dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}})
        else:
            torch.onnx.export(Wrapper(), (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["pixel_values"], output_names=names,
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "pixel_values": (
                                  {0: "batch", 1: "channels", 2: "height", 3: "width"} if dynamic_image else {0: "batch"})})
    return path


def _cases():
    cases = [(name, opset, False) for name in CONFIGS for opset in (14, 17)]
    if HAS_ONNXSCRIPT:
        cases += [(name, 18, True) for name in CONFIGS]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def nets():
    return {name: build_vit(seed=4, **config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-opset{o}{'-dynamo' if d else ''}" for n, o, d in CASES])
def exported(request, nets, tmp_path_factory):
    name, opset, dynamo = request.param
    directory = tmp_path_factory.mktemp("onnx-vit")
    onnx_path = export_vit(nets[name], directory / "vit.onnx", opset=opset, dynamo=dynamo)
    model_path = convert_onnx(onnx_path, directory / "vit.edgeformer")
    model = edgeformer.load(model_path, threads=2)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    yield name, nets[name], onnx_path, model, session
    model.close()


def test_matches_onnxruntime_and_torch(exported):
    name, net, _, model, session = exported
    assert [s.name for s in model.outputs] == ["logits"]
    assert json.loads(model.metadata["onnx.outputs"]) == {"logits": "logits"}
    for batch in (1, 2, 3, 4):
        x = pixels(batch, net, seed=10 + batch)
        want = session.run(["logits"], {"pixel_values": x})[0]
        got = model.run({"pixel_values": x})["logits"]
        assert got.shape == want.shape == (batch, CONFIGS[name]["num_labels"])
        err = float(np.abs(got - want).max())
        assert err <= 1e-4, f"{name} batch {batch}: max abs error {err} against ONNX Runtime"
        err = float(np.abs(got - torch_outputs(net, x)["logits"]).max())
        assert err <= 1e-4, f"{name} batch {batch}: max abs error {err} against PyTorch"


def test_graph_is_coarse_ops_like_the_checkpoint_conversion(exported, tmp_path):
    """The ONNX graph becomes the same coarse graph as the checkpoint directory: one patch embedding, one fused
    Q|K|V per layer, residuals fused, no generic op; same numbers."""
    from converters.hf import convert_hf_directory

    name, net, _, model, _ = exported
    layers = net.config.num_hidden_layers
    ops = [n.op for n in model.graph.nodes]
    assert set(ops) <= COARSE_OPS
    assert ops.count("patch_embedding") == 1 and ops.count("attention") == layers
    assert ops.count("linear") == 4 * layers + 1 and ops.count("layer_norm") == 2 * layers + 1
    spec = model.graph.inputs[0]
    c = net.config
    h, w = (c.image_size,) * 2 if isinstance(c.image_size, int) else c.image_size
    assert spec["shape"] == ["batch", c.num_channels, h, w]
    assert spec["tokens_per_item"] == (h // c.patch_size) * (w // c.patch_size) + 1
    net.save_pretrained(tmp_path)
    ref = edgeformer.load(convert_hf_directory(tmp_path, tmp_path / "hf.edgeformer"), threads=1)
    x = pixels(3, net, seed=2)
    np.testing.assert_allclose(model.run({"pixel_values": x})["logits"], ref.run({"pixel_values": x})["logits"],
                               rtol=0, atol=1e-5)
    ref.close()


@pytest.fixture(scope="module")
def pooler_export(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx-vit-pooler")
    net = build_vit("model-pooler", seed=6, hidden_size=24, num_attention_heads=2, intermediate_size=40,
                    image_size=[12, 18], patch_size=[4, 6], num_channels=2, hidden_act="gelu_new")
    return net, export_vit(net, directory / "vit.onnx", opset=17)


def test_vit_model_with_pooler(pooler_export, tmp_path):
    """ViTModel: last_hidden_state (tokens) and pooler_output (tanh(dense(CLS))), non-square patches."""
    net, onnx_path = pooler_export
    model = edgeformer.load(convert_onnx(onnx_path, tmp_path / "m.edgeformer"), threads=1)
    assert [s.name for s in model.outputs] == ["last_hidden_state", "pooler_output"]
    assert "activation" in [n.op for n in model.graph.nodes]  # tanh is not fused into the pooler's linear
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = pixels(batch, net, seed=batch)
        want = dict(zip(["last_hidden_state", "pooler_output"], session.run(None, {"pixel_values": x})))
        got = model.run({"pixel_values": x})
        assert got["last_hidden_state"].shape == (batch, 3 * 3 + 1, 24)
        for key in want:
            assert float(np.abs(got[key] - want[key]).max()) <= 1e-4, key
    model.close()


def test_cli_convert(pooler_export, tmp_path):
    from edgeformer.cli import main

    net, onnx_path = pooler_export
    out = tmp_path / "vit.edgeformer"
    assert main(["convert", str(onnx_path), "-o", str(out)]) == 0
    x = pixels(2, net, seed=1)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out), f"pixel_values={tmp_path / 'x.npy'}", "-o", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as got:
        assert float(np.abs(got["pooler_output"] - torch_outputs(net, x)["pooler_output"]).max()) <= 1e-4


def test_ort_optimized_export(pooler_export, tmp_path):
    """ONNX Runtime's transformer optimizer (model_type vit): SkipLayerNormalization, FastGelu, LayerNormalization."""
    from onnxruntime.transformers.optimizer import optimize_model

    net, onnx_path = pooler_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(onnx_path), model_type="vit", num_heads=2, hidden_size=24, opt_level=0)
    opt_path = tmp_path / "opt.onnx"
    opt.save_model_to_file(str(opt_path))
    ops = {n.op_type for n in onnx.load(str(opt_path)).graph.node}
    assert {"SkipLayerNormalization", "FastGelu", "LayerNormalization"} <= ops  # the tanh GELU of gelu_new
    model = edgeformer.load(convert_onnx(opt_path, tmp_path / "opt.edgeformer"), threads=1)
    assert {n.op for n in model.graph.nodes} <= COARSE_OPS
    session = ort.InferenceSession(str(opt_path), providers=["CPUExecutionProvider"])
    x = pixels(3, net, seed=5)
    want = dict(zip(["last_hidden_state", "pooler_output"], session.run(None, {"pixel_values": x})))
    got = model.run({"pixel_values": x})
    for key in want:
        assert float(np.abs(got[key] - want[key]).max()) <= 1e-4, key
    model.close()


def test_symbolic_image_dims(nets, tmp_path):
    """A pixel input declared (batch, channels, height, width): C from the patch kernel, H and W from the position
    table's square grid; the converted model takes that image size."""
    name = list(CONFIGS)[0]  # 32x32 images, 8x8 patches: a 4x4 grid
    net = nets[name]
    onnx_path = export_vit(net, tmp_path / "dyn.onnx", opset=17, dynamic_image=True)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims)
    with pytest.warns(UserWarning, match=r"takes images of \[3, 32, 32\]"):
        model = edgeformer.load(convert_onnx(onnx_path, tmp_path / "dyn.edgeformer"), threads=1)
    assert model.inputs[0].shape == ("batch", 3, 32, 32)
    assert {n.op for n in model.graph.nodes} <= COARSE_OPS
    x = pixels(2, net, seed=3)
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    assert float(np.abs(model.run({"pixel_values": x})["logits"] - want).max()) <= 1e-4
    model.close()


def test_check_onnx_on_pixels(pooler_export):
    """`edgeformer check` feeds random pixels to both engines."""
    from converters.onnx_import import check_onnx

    _, onnx_path = pooler_export
    report = check_onnx(onnx_path, batch=3, verbose=False)
    assert set(report) == {"last_hidden_state", "pooler_output"}
    assert all(r["max_abs"] <= 1e-4 for r in report.values())


# ---- hand-built graphs: what is not a ViT patch embedding is refused clearly by the coarse translation -----------
def _graph(conv_attrs=None, *, pixel_shape=("batch", 1, 8, 8), gather_index=0, extra_input=False, kernel=4):
    """pixels -> Conv -> Reshape (B, d, P) -> Transpose -> LayerNorm -> Gather(token) -> MatMul: a tiny ViT-like head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d = 6
    inits = {"w": rng.standard_normal((d, 1, kernel, kernel)).astype(np.float32),
             "b": rng.standard_normal(d).astype(np.float32),
             "shape": np.array([0, d, -1], np.int64), "g": np.ones(d, np.float32), "beta": np.zeros(d, np.float32),
             "idx": np.array(gather_index, np.int64), "head": rng.standard_normal((d, 3)).astype(np.float32)}
    attrs = dict(kernel_shape=[kernel, kernel], strides=[kernel, kernel], pads=[0, 0, 0, 0])
    attrs.update(conv_attrs or {})
    nodes = [helper.make_node("Conv", ["pixel_values", "w", "b"], ["c"], **attrs),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("LayerNormalization", ["t", "g", "beta"], ["ln"], axis=-1, epsilon=1e-5),
             helper.make_node("Gather", ["ln", "idx"], ["first"], axis=1),
             helper.make_node("MatMul", ["first", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, list(pixel_shape))]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    graph = helper.make_graph(nodes, "tiny_vit", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_hand_built_patch_graph_matches_onnxruntime(tmp_path):
    """The same importer on a graph that no exporter wrote: Reshape with 0 / -1, no class token, no positions."""
    onnx.save(_graph(), tmp_path / "g.onnx")
    model = edgeformer.load(convert_onnx(tmp_path / "g.onnx", tmp_path / "g.edgeformer"), threads=1)
    assert [n.op for n in model.graph.nodes] == ["patch_embedding", "layer_norm", "pool", "linear"]
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x})[0]
    np.testing.assert_allclose(model.run({"pixel_values": x})["logits"], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(conv_attrs=dict(strides=[2, 2])), UnsupportedOnnxError, "stride = kernel"),
    (dict(conv_attrs=dict(pads=[1, 1, 1, 1])), UnsupportedOnnxError, "no padding"),
    (dict(gather_index=1), UnsupportedOnnxError, "first token"),
    (dict(pixel_shape=("batch", 1, "h", 8)), OnnxFormatError, "cannot be inferred"),  # no position table
    (dict(extra_input=True), OnnxFormatError, "only input"),
])
def test_unsupported_vision_graphs(kwargs, error, message):
    """The coarse-op translation (build_graph) refuses these with a clear error; convert_onnx may then fall back to
    generic ops (converters/onnx_import/generic.py), which is not what is tested here."""
    from converters.onnx_import.convert import build_graph

    with pytest.raises(error, match=message):
        build_graph(_graph(**kwargs))
