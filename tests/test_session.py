"""Bad input gets a clear exception of edgeformer's own type, never a crash or garbage."""
from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

import edgeformer
from edgeformer import GraphError, InputError, ModelFileError
from edgeformer.format import read_model, write_model
from tests.helpers import write_tiny_bert

VOCAB, POSITIONS = 120, 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "model.edgeformer", vocab=VOCAB, positions=POSITIONS,
                           pooling="mean", normalize=True)


@pytest.fixture(scope="module")
def model(tiny_path):
    return edgeformer.load(tiny_path, threads=2)


def ids(batch=2, seq=5):
    return np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) % VOCAB


@pytest.mark.parametrize("feeds, message", [
    ({"input_ids": np.array([[1, 2, VOCAB]])}, "outside"),
    ({"input_ids": np.array([[1, -1, 3]])}, "outside"),
    ({"input_ids": np.array([[1.0, 2.0]])}, "integer"),
    ({"input_ids": np.array([[np.nan, 2.0]])}, "NaN"),
    ({"input_ids": np.array([1, 2, 3])}, "2 dims"),
    ({"input_ids": np.ones((1, 2, 3), dtype=np.int64)}, "2 dims"),
    ({"input_ids": np.array(["a", "b"])}, "integer"),
    ({"input_ids": ids(), "attention_mask": np.ones((2, 4), dtype=np.int64)}, "shape"),
    ({"input_ids": ids(), "attention_mask": np.full((2, 5), 2)}, "0 and 1"),
    ({"input_ids": ids(), "token_type_ids": np.full((2, 5), 2)}, "outside"),
    ({"input_ids": ids(1, POSITIONS + 1)}, "longer than"),
    ({"input_ids": np.zeros((0, 5), dtype=np.int64)}, "empty"),
    ({"input_ids": np.zeros((2, 0), dtype=np.int64)}, "empty"),
    ({"input_ids": ids(), "pixel_values": ids()}, "unknown inputs"),
    ({"attention_mask": np.ones((2, 5))}, "missing"),
])
def test_bad_feeds(model, feeds, message):
    with pytest.raises(InputError, match=message):
        model.run(feeds)


def test_bad_feeds_container_and_outputs(model):
    with pytest.raises(InputError):
        model.run([ids()])
    with pytest.raises(InputError, match="unknown outputs"):
        model.run({"input_ids": ids()}, outputs=["logits"])


def test_positions_are_checked_with_padding_too(model):
    long_ids = ids(1, POSITIONS + 3)
    mask = np.zeros_like(long_ids)
    mask[0, -1] = 1  # the one valid token sits at position POSITIONS + 2
    with pytest.raises(InputError, match="longer than"):
        model.run({"input_ids": long_ids, "attention_mask": mask})


def test_bool_mask_and_int32_ids_are_accepted(model):
    a = model.run({"input_ids": ids().astype(np.int32), "attention_mask": np.ones((2, 5), dtype=bool)})
    b = model.run({"input_ids": ids()})
    np.testing.assert_array_equal(a["last_hidden_state"], b["last_hidden_state"])
    assert a["sentence_embedding"].shape == (2, 40)
    np.testing.assert_allclose(np.linalg.norm(a["sentence_embedding"], axis=1), 1.0, rtol=1e-5)


def test_specs(model):
    assert [s.name for s in model.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {s.name: s.shape for s in model.outputs} == {
        "last_hidden_state": ("batch", "seq", 40), "sentence_embedding": ("batch", 40)}
    assert model.threads == 2


def test_concurrent_runs_from_python_threads(model):
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, VOCAB, size=(int(rng.integers(1, 4)), int(rng.integers(1, 60))))}
             for _ in range(12)]
    expected = [model.run(f)["last_hidden_state"] for f in feeds]
    results, errors = [None] * len(feeds), []

    def worker(offset):
        try:
            for _ in range(3):
                for i in range(offset, len(feeds), 4):
                    results[i] = model.run(feeds[i])["last_hidden_state"]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


# -- hostile and inconsistent model files ---------------------------------------------------------

def test_truncated_files(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.edgeformer"
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            edgeformer.load(broken)


def _rewrite_header(path, out, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    out.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return out


def test_header_claims_huge_shape_or_bad_offsets(tiny_path, tmp_path):
    name = "embeddings.word_embeddings.weight"

    def huge(h):
        h[name]["shape"] = [2**40, 2**40]

    def beyond(h):
        h[name]["data_offsets"] = [0, 2**50]

    for edit in (huge, beyond):
        with pytest.raises(ModelFileError):
            edgeformer.load(_rewrite_header(tiny_path, tmp_path / "bad.edgeformer", edit))


def _rewrite_graph(tiny_path, out, edit):
    mf = read_model(tiny_path)
    graph = json.loads(json.dumps(mf.graph))
    tensors = {k: np.array(v) for k, v in mf.tensors.items()}
    edit(graph, tensors)
    write_model(out, tensors, graph, tokenizer_json=mf.tokenizer_json, metadata=mf.metadata)
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda g, t: g["nodes"][3].update(op="conv3d"), "unknown op"),
    (lambda g, t: g["nodes"][2]["weights"].update(weight="nope"), "missing tensor"),
    (lambda g, t: t.update({"encoder.layer.0.attention.qkv.weight_packed": np.zeros((3, 3, 16), np.float32)}),
     "weight_packed has shape"),
    (lambda g, t: g["nodes"][2]["attrs"].update(out_features=200), "weight_packed has shape"),
    (lambda g, t: g["nodes"][3]["attrs"].update(num_heads=7), "qkv width"),
    (lambda g, t: g["nodes"][3]["attrs"].update(kind="magic"), "unknown attention kind"),
    (lambda g, t: g["nodes"][2]["attrs"].update(activation="swish"), "activation"),
    (lambda g, t: g["nodes"][2]["attrs"].update(format="int3"), "unknown weight format"),
    (lambda g, t: g["nodes"][2].update(inputs=["later"]), "not defined"),
    (lambda g, t: g["nodes"].reverse(), "not defined"),
    (lambda g, t: g["outputs"].append({"name": "ghost"}), "not produced"),
    (lambda g, t: g.update(nodes="x"), "must be a list"),
    (lambda g, t: t.update({"embeddings.word_embeddings.weight": np.zeros((4, 40), np.int32)}), "float32"),
])
def test_inconsistent_graphs(tiny_path, tmp_path, edit, message):
    bad = _rewrite_graph(tiny_path, tmp_path / "bad.edgeformer", edit)
    with pytest.raises(GraphError, match=message):
        edgeformer.load(bad)


def test_plain_weights_are_packed_at_load(tiny_path, tmp_path, model):
    from edgeformer.kernels.gemm_f32 import unpack_weight

    def unpack_all(graph, tensors):
        for node in graph["nodes"]:
            if node["op"] == "linear":
                packed = node["weights"].pop("weight_packed")
                tensors[packed.replace("_packed", "")] = unpack_weight(tensors.pop(packed), node["attrs"].pop("out_features"))
                node["weights"]["weight"] = packed.replace("_packed", "")

    plain = edgeformer.load(_rewrite_graph(tiny_path, tmp_path / "plain.edgeformer", unpack_all), threads=2)
    feeds = {"input_ids": ids(3, 9)}
    np.testing.assert_array_equal(plain.run(feeds)["last_hidden_state"], model.run(feeds)["last_hidden_state"])


def test_observe_sees_every_node_with_packed_inputs(model):
    seen = []
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    model.run({"input_ids": ids(), "attention_mask": mask}, observe=lambda node, inputs: seen.append(
        (node.name, [a.shape[0] for a in inputs])))
    assert [name for name, _ in seen] == [node.name for node in model.graph.nodes]
    assert seen[0][1] == [7, 7]  # ids and token types of the 7 valid tokens only: padding is never computed
