"""ViT: the patch_embedding op (vs its NumPy reference and torch Conv2d + class token + positions), the tanh
activation, and the Hugging Face loader (random-weight ViTForImageClassification / ViTModel, offline) against
transformers, through the Python API and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import edgeformer
from edgeformer.batch import Batch
from edgeformer.errors import GraphError, InputError
from edgeformer.format import write_model
from edgeformer.graph import GraphBuilder, Node, validate
from edgeformer.kernels.gemm_f32 import pack_weight
from edgeformer.ops import REGISTRY
from edgeformer.ops.patch_embedding import PatchEmbedding
from edgeformer.reference.activation import tanh_ref
from edgeformer.reference.patch_embedding import patch_embedding_ref
from edgeformer.workers import Workers
from tests.optional import F, torch

F32 = np.float32
WORKERS = {1: Workers(1), 2: Workers(2)}


def readonly(a):
    a = np.array(a, dtype=F32)  # a copy: the caller's array stays writable
    a.setflags(write=False)
    return a


# ---- patch_embedding op ---------------------------------------------------------------------------
@st.composite
def patch_case(draw):
    ph, pw = draw(st.sampled_from([(1, 1), (2, 2), (3, 5), (4, 4), (5, 3), (8, 8)]))
    hp, wp = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # remainders past the last whole patch are dropped, as Conv2d does
    height, width = hp * ph + draw(st.integers(0, ph - 1)), wp * pw + draw(st.integers(0, pw - 1))
    return dict(batch=draw(st.integers(1, 4)), channels=draw(st.sampled_from([1, 2, 3])), height=height, width=width,
                ph=ph, pw=pw, d=draw(st.sampled_from([1, 5, 16, 24, 37])), cls=draw(st.booleans()),
                position=draw(st.booleans()), bias=draw(st.booleans()), packed=draw(st.booleans()),
                threads=draw(st.sampled_from([1, 2])), scale=draw(st.sampled_from([1.0, 1e-3, 50.0])),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_patch_node(c, rng):
    """A patch_embedding node with random weights; returns (node, weights, conv kernel, bias, cls, position)."""
    d, k = c["d"], c["channels"] * c["ph"] * c["pw"]
    kernel = rng.standard_normal((d, c["channels"], c["ph"], c["pw"])).astype(F32) / np.sqrt(k)
    bias = rng.standard_normal(d).astype(F32) if c["bias"] else None
    cls = rng.standard_normal(d).astype(F32) if c["cls"] else None
    tokens = (c["height"] // c["ph"]) * (c["width"] // c["pw"]) + bool(c["cls"])
    position = rng.standard_normal((tokens, d)).astype(F32) if c["position"] else None
    weights, attrs = {}, {"patch_size": [c["ph"], c["pw"]]}
    if c["packed"]:
        weights["weight_packed"] = readonly(pack_weight(kernel.reshape(d, k)))
        attrs["out_features"] = d
    else:
        weights["weight"] = readonly(kernel.reshape(d, k))
    for role, array in (("bias", bias), ("cls", cls), ("position", position)):
        if array is not None:
            weights[role] = readonly(array)
    node = Node("patch_embedding", "patch", ["pixel_values"], ["tokens"], {r: r for r in weights}, attrs)
    return node, weights, kernel, bias, cls, position, tokens


def input_type(c):
    from edgeformer.graph import DENSE, ValueType

    return ValueType(DENSE, dtype="float32", shape=("batch", c["channels"], c["height"], c["width"]))


@given(patch_case())
def test_patch_embedding_matches_reference_and_conv2d(c):
    rng = np.random.default_rng(c["seed"])
    node, weights, kernel, bias, cls, position, tokens = make_patch_node(c, rng)
    out_types = PatchEmbedding.infer(node, [input_type(c)], weights)
    assert out_types[0].kind == "tokens" and out_types[0].width == c["d"]
    x = (rng.standard_normal((c["batch"], c["channels"], c["height"], c["width"])) * c["scale"]).astype(F32)
    run = PatchEmbedding.bind(node, weights)
    got = run([x], Batch.from_mask(None, c["batch"], tokens), WORKERS[c["threads"]])[0]
    assert got.shape == (c["batch"] * tokens, c["d"]) and got.dtype == F32
    want = patch_embedding_ref(x, kernel, bias, cls, position)  # (B, P', d) float64
    # float32 rounding bound: relative to the sum of |terms| (measured worst over 300 cases: 2.4e-7)
    mag = patch_embedding_ref(np.abs(x), np.abs(kernel), None if bias is None else np.abs(bias),
                              None if cls is None else np.abs(cls), None if position is None else np.abs(position))
    tol = 1e-6 * mag + 1e-30
    assert np.all(np.abs(got.reshape(want.shape) - want) <= tol)
    if torch is not None:  # the op is exactly HF ViT's embeddings: Conv2d, flatten, transpose, cat CLS, + positions
        with torch.no_grad():
            conv = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(kernel).double(),
                            None if bias is None else torch.from_numpy(bias).double(), stride=(c["ph"], c["pw"]))
            t = conv.flatten(2).transpose(1, 2)  # (B, P, d)
            if cls is not None:
                t = torch.cat([torch.from_numpy(cls).double().expand(c["batch"], 1, -1), t], dim=1)
            if position is not None:
                t = t + torch.from_numpy(position).double()
        np.testing.assert_allclose(want, t.numpy(), rtol=1e-10, atol=1e-9)  # the reference is the oracle
        assert np.all(np.abs(got.reshape(want.shape) - t.numpy()) <= tol + 1e-9 * mag)


def base_case(**changes):
    c = dict(batch=2, channels=3, height=12, width=8, ph=4, pw=4, d=8, cls=True, position=True, bias=True,
             packed=True, threads=1, scale=1.0, seed=0)
    c.update(changes)
    return c


@pytest.mark.parametrize("change, message", [
    (dict(channels=1), "channels"),
    (dict(height=3), "smaller than the patch"),
    (dict(height=16), "position table has"),
    (dict(dtype="int64"), "dense float32"),
    (dict(shape=("batch", 3, "h", 8)), "fixed C, H, W"),
    (dict(shape=("batch", 3, 12)), "shape"),
    (dict(patch_size=[4, 0]), "patch_size"),
    (dict(patch_size=[5, 4]), "multiple of the patch area"),
    (dict(cls_width=5), "cls"),
])
def test_patch_embedding_load_errors(change, message):
    from edgeformer.graph import DENSE, ValueType

    c = base_case()
    node, weights, *_ = make_patch_node(c, np.random.default_rng(0))
    shape = ("batch", change.get("channels", 3), change.get("height", 12), 8)
    vtype = ValueType(DENSE, dtype=change.get("dtype", "float32"), shape=change.get("shape", shape))
    if "patch_size" in change:
        node.attrs["patch_size"] = change["patch_size"]
    if "cls_width" in change:
        weights["cls"] = readonly(np.zeros(change["cls_width"]))
    with pytest.raises(GraphError, match=message):
        PatchEmbedding.infer(node, [vtype], weights)


def test_patch_embedding_run_errors():
    c = base_case()
    node, weights, *_ = make_patch_node(c, np.random.default_rng(0))
    run = PatchEmbedding.bind(node, weights)
    batch = Batch.from_mask(None, 2, 7)  # 3x2 patches + CLS
    good = np.zeros((2, 3, 12, 8), F32)
    assert run([good], batch, WORKERS[1])[0].shape == (14, 8)
    for bad in (np.zeros((2, 1, 12, 8), F32), np.zeros((2, 3, 16, 8), F32), np.zeros((2, 3, 12), F32),
                np.zeros((2, 3, 12, 8), np.float64), np.zeros((2, 3, 2, 8), F32)):
        with pytest.raises(InputError):
            run([bad], batch, WORKERS[1])


def write_patch_model(path, c, rng, *, pool=True):
    """A model file: pixel_values -> patch_embedding -> last_hidden_state (+ pool cls -> tanh -> pooled)."""
    node, weights, kernel, bias, cls, position, tokens = make_patch_node(c, rng)
    b = GraphBuilder("patches")
    b.input("pixel_values", dtype="float32", shape=("batch", c["channels"], c["height"], c["width"]),
            kind="dense", tokens_per_item=tokens)
    h = b.add("patch_embedding", "patch", ["pixel_values"], node.weights, node.attrs, output="last_hidden_state")
    b.output(h)
    if pool:
        p = b.add("pool", "pool", [h], attrs={"mode": "cls"})
        b.add("activation", "tanh", [p], attrs={"function": "tanh"}, output="pooled")
        b.output("pooled")
    graph = b.build()
    tensors = {k: np.array(v) for k, v in weights.items()}
    validate(graph, tensors, REGISTRY)
    write_model(path, tensors, graph.to_json())
    return kernel, bias, cls, position, tokens


def test_patch_embedding_through_the_session(tmp_path):
    c = base_case(height=13, width=10, ph=4, pw=3, d=20)
    rng = np.random.default_rng(5)
    kernel, bias, cls, position, tokens = write_patch_model(tmp_path / "p.edgeformer", c, rng)
    model = edgeformer.load(tmp_path / "p.edgeformer", threads=2)
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [("pixel_values", "float32", ("batch", 3, 13, 10))]
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 13, 10))  # float64 feeds are cast to float32
        out = model.run({"pixel_values": x})
        want = patch_embedding_ref(x.astype(F32), kernel, bias, cls, position)
        assert out["last_hidden_state"].shape == (batch, tokens, 20)
        np.testing.assert_allclose(out["last_hidden_state"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["pooled"], tanh_ref(want[:, 0]), rtol=1e-6, atol=1e-6)
    for bad in (np.zeros((2, 3, 12, 10), F32), np.zeros((2, 1, 13, 10), F32), np.zeros((2, 3, 13), F32),
                np.zeros((2, 3, 13, 10), np.int64), np.zeros((0, 3, 13, 10), F32)):
        with pytest.raises(InputError):
            model.run({"pixel_values": bad})
    model.close()


# ---- tanh activation --------------------------------------------------------------------------------
@given(st.integers(1, 9), st.sampled_from([1, 7, 16, 33]), st.sampled_from([0.1, 1.0, 5.0, 30.0]),
       st.integers(0, 2**31 - 1))
def test_tanh_activation_matches_reference(rows, width, scale, seed):
    from edgeformer.ops.activation import Activation

    x = (np.random.default_rng(seed).standard_normal((rows, width)) * scale).astype(F32)
    x.flat[0] = -0.0
    node = Node("activation", "tanh", ["x"], ["y"], {}, {"function": "tanh"})
    run = Activation.bind(node, {})
    x_before = x.copy()
    got = run([x], None, WORKERS[2])[0]
    assert np.array_equal(x, x_before)  # the input value is not modified (tanh runs in place on a copy)
    np.testing.assert_allclose(got, tanh_ref(x), rtol=2e-7, atol=1e-7)
    assert np.signbit(got.flat[0])
    if torch is not None:
        np.testing.assert_allclose(got, torch.tanh(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)


def test_tanh_special_values():
    from edgeformer.ops.activation import Activation

    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 9.5, -20.0, 1e30]], F32)
    got = Activation.bind(Node("activation", "t", ["x"], ["y"], {}, {"function": "tanh"}), {})([x], None,
                                                                                                 WORKERS[1])[0]
    assert np.isnan(got[0, 0])
    np.testing.assert_array_equal(got[0, 1:6], np.array([1.0, -1.0, 0.0, -0.0, 1e-30], F32))  # tiny x: tanh(x) = x
    np.testing.assert_allclose(got[0, 6:], [np.tanh(9.5), -1.0, 1.0], rtol=0, atol=6e-8)
    assert np.signbit(got[0, 4])


# ---- Hugging Face loader ------------------------------------------------------------------------------
CONFIGS = {
    # hidden, heads, ffn, image (H, W), patch, channels, labels
    "d32h4-img32-p8-c3": dict(hidden_size=32, num_attention_heads=4, intermediate_size=40, image_size=32,
                              patch_size=8, num_channels=3, num_labels=5),
    "d48h3-img30x20-p5-c1": dict(hidden_size=48, num_attention_heads=3, intermediate_size=72, image_size=[30, 20],
                                 patch_size=5, num_channels=1, num_labels=3, hidden_act="gelu_new"),
}


def build_vit(kind="classifier", *, seed=0, layers=2, **config):
    """A random-weight ViT (eval mode) with random LayerNorm parameters; kind: classifier / model / model-pooler."""
    import transformers as tf

    torch.manual_seed(seed)
    config.setdefault("initializer_range", 0.2)  # weights large enough that attention is far from uniform
    cfg = tf.ViTConfig(num_hidden_layers=layers, **config)
    if kind == "classifier":
        net = tf.ViTForImageClassification(cfg)
    else:
        net = tf.ViTModel(cfg, add_pooling_layer=kind == "model-pooler")
    net.eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        for name, p in net.named_parameters():
            if "cls_token" in name or "position_embeddings" in name:
                p.normal_(0.0, 0.5)
            elif name.endswith(".bias") and "norm" not in name:
                p.normal_(0.0, 0.1)  # transformers initialises biases to zero
    return net


def pixels(batch, net, seed=0):
    c = net.config
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    return np.random.default_rng(seed).standard_normal((batch, c.num_channels, h, w)).astype(F32)


def torch_outputs(net, x):
    with torch.no_grad():
        if hasattr(net, "classifier"):
            hidden = net.vit(pixel_values=torch.from_numpy(x)).last_hidden_state
            return {"last_hidden_state": hidden.numpy(), "logits": net(pixel_values=torch.from_numpy(x)).logits.numpy()}
        out = net(pixel_values=torch.from_numpy(x))
        res = {"last_hidden_state": out.last_hidden_state.numpy()}
        if out.pooler_output is not None:
            res["pooler_output"] = out.pooler_output.numpy()
        return res


requires_hf = pytest.mark.skipif(torch is None, reason="needs torch and transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (net, checkpoint directory) for every configuration, saved once for the module."""
    pytest.importorskip("transformers")
    made = {}
    for name, config in CONFIGS.items():
        directory = tmp_path_factory.mktemp(f"vit-{name}")
        net = build_vit(seed=1, **config)
        net.save_pretrained(directory)
        made[name] = (net, directory)
    return made


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_vit(request, hf_dirs):
    from converters.hf import convert_hf_directory

    net, directory = hf_dirs[request.param]
    path = convert_hf_directory(directory, directory / "vit.edgeformer")
    model = edgeformer.load(path, threads=2)
    yield request.param, net, model, directory
    model.close()


@requires_hf
def test_hf_classifier_matches_transformers(hf_vit):
    name, net, model, _ = hf_vit
    c = CONFIGS[name]
    h, w = (c["image_size"],) * 2 if isinstance(c["image_size"], int) else c["image_size"]
    tokens = (h // c["patch_size"]) * (w // c["patch_size"]) + 1
    assert [(s.name, s.shape) for s in model.inputs] == [("pixel_values", ("batch", c["num_channels"], h, w))]
    assert [s.name for s in model.outputs] == ["last_hidden_state", "logits"]
    for batch in (1, 2, 3, 4):
        x = pixels(batch, net, seed=batch)
        want = torch_outputs(net, x)
        got = model.run({"pixel_values": x})
        assert got["last_hidden_state"].shape == (batch, tokens, c["hidden_size"])
        assert got["logits"].shape == (batch, c["num_labels"])
        for key in ("last_hidden_state", "logits"):
            err = float(np.abs(got[key] - want[key]).max())
            assert err <= 1e-4, f"{name} batch {batch} {key}: max abs error {err}"


@requires_hf
def test_hf_graph_and_metadata(hf_vit):
    name, net, model, _ = hf_vit
    layers = net.config.num_hidden_layers
    ops = [n.op for n in model.graph.nodes]
    assert ops.count("patch_embedding") == 1 and ops.count("attention") == layers
    assert ops.count("linear") == 4 * layers + 1 and ops.count("layer_norm") == 2 * layers + 1
    assert not any(n.attrs.get("causal") for n in model.graph.nodes if n.op == "attention")
    meta = model.metadata
    assert meta["model_type"] == "vit" and meta["task"] == "image_classification"
    assert json.loads(meta["labels"]) == [net.config.id2label[i] for i in range(net.config.num_labels)]
    assert json.loads(meta["id2label"]) == {str(k): v for k, v in net.config.id2label.items()}


@requires_hf
def test_hf_model_with_pooler_and_v5_names_and_bin(tmp_path):
    """ViTModel with its tanh pooler (and no Q/K/V biases); the same weights under transformers 5 module names (layers.N.attention.q_proj
    ...) and as pytorch_model.bin give the same model."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from converters.hf import convert_hf_directory

    net = build_vit("model-pooler", seed=2, hidden_size=24, num_attention_heads=2, intermediate_size=36,
                    image_size=[12, 20], patch_size=4, num_channels=2, pooler_output_size=10, qkv_bias=False)
    net.save_pretrained(tmp_path / "std")
    x = pixels(3, net, seed=9)
    want = torch_outputs(net, x)
    model = edgeformer.load(convert_hf_directory(tmp_path / "std", tmp_path / "std.edgeformer"), threads=1)
    got = model.run({"pixel_values": x})
    assert [s.name for s in model.outputs] == ["last_hidden_state", "pooler_output"]
    assert model.metadata["task"] == "image_features"
    for key in ("last_hidden_state", "pooler_output"):
        assert float(np.abs(got[key] - want[key]).max()) <= 1e-4, key
    assert got["pooler_output"].shape == (3, 10)

    renames = [("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
               ("output.dense", "mlp.fc2")]
    state = load_file(str(tmp_path / "std" / "model.safetensors"))
    v5 = {}
    for k, v in state.items():
        for old, new in renames:
            k = k.replace(old, new)
        v5[k] = v
    assert any(k.startswith("layers.0.attention.q_proj") for k in v5)
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "std" / "config.json").read_text())
    save_file(v5, str(tmp_path / "v5" / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "std" / "config.json").read_text())
    torch.save(state, str(tmp_path / "bin" / "pytorch_model.bin"))
    for variant in ("v5", "bin"):
        other = edgeformer.load(convert_hf_directory(tmp_path / variant, tmp_path / f"{variant}.edgeformer"), threads=1)
        out = other.run({"pixel_values": x})
        for key in got:
            np.testing.assert_array_equal(out[key], got[key])
        other.close()
    model.close()


@requires_hf
def test_hf_errors(tmp_path):
    pytest.importorskip("transformers")
    from converters.hf import convert_hf_directory
    from edgeformer.errors import EdgeformerError

    net = build_vit("model", hidden_size=16, num_attention_heads=2, intermediate_size=20, image_size=8,
                    patch_size=4, num_channels=1)
    net.save_pretrained(tmp_path / "m")
    with pytest.raises(EdgeformerError, match="not supported"):
        convert_hf_directory(tmp_path / "m", tmp_path / "q.edgeformer", quantize="dynamic-int8")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for change, message in ((dict(patch_size=3), "shape"), (dict(image_size=2), "smaller"),
                            (dict(hidden_act="swish"), "hidden_act"), (dict(num_attention_heads=3), "multiple")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(EdgeformerError, match=message):
            convert_hf_directory(tmp_path / "m", tmp_path / "bad.edgeformer")


@requires_hf
def test_cli_convert_and_run(hf_dirs, tmp_path):
    from edgeformer.cli import main

    net, directory = hf_dirs[list(CONFIGS)[0]]
    out = tmp_path / "vit.edgeformer"
    assert main(["convert", str(directory), "-o", str(out)]) == 0
    x = pixels(2, net, seed=4)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "feeds.npz", pixel_values=x)
    want = torch_outputs(net, x)
    for args in ([f"pixel_values={tmp_path / 'x.npy'}"], [str(tmp_path / "feeds.npz")]):
        assert main(["run", str(out), *args, "--threads", "1", "-o", str(tmp_path / "o.npz")]) == 0
        with np.load(tmp_path / "o.npz") as got:
            assert float(np.abs(got["logits"] - want["logits"]).max()) <= 1e-4
    assert main(["precompile", str(out), "--threads", "1"]) == 0
    assert main(["inspect", str(out)]) == 0
