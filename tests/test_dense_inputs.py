"""Dense graph inputs (pixel values, inputs of generic graphs): declared, validated, fed and passed on as fed."""
from __future__ import annotations

import numpy as np
import pytest

import edgeformer
from edgeformer import GraphError, InputError
from edgeformer.format import write_model
from edgeformer.graph import DENSE, Graph, validate
from edgeformer.ops import REGISTRY


def _write(path, inputs, outputs):
    graph = {"name": "dense", "inputs": inputs, "outputs": [{"name": o} for o in outputs], "nodes": []}
    write_model(path, {"unused": np.zeros(1, np.float32)}, graph)
    return path


PIXELS = {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, "h", "h"], "tokens_per_item": 5}
FLAGS = {"name": "flags", "dtype": "bool", "shape": ["batch", "h"], "optional": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("dense") / "m.edgeformer", [PIXELS, FLAGS], ["pixel_values", "flags"])
    return edgeformer.load(path, threads=1)


def test_specs_and_pass_through(model):
    assert [(s.name, s.dtype, s.shape, s.optional) for s in model.inputs] == [
        ("pixel_values", "float32", ("batch", 3, "h", "h"), False), ("flags", "bool", ("batch", "h"), True)]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 4, 4))  # float64 in, float32 out
    pixels[0, 0, 0, 0] = np.nan  # NaN is a valid float feed
    flags = np.array([[True, False, True, True]] * 2)
    out = model.run({"pixel_values": pixels, "flags": flags})
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(out["pixel_values"], pixels.astype(np.float32))
    np.testing.assert_array_equal(out["flags"], flags)
    assert model.run({"pixel_values": pixels[:1]}, outputs=["pixel_values"])["pixel_values"].shape == (1, 3, 4, 4)


@pytest.mark.parametrize("feeds, message", [
    ({"pixel_values": np.zeros((2, 3, 4, 4), np.int64)}, "float32"),
    ({"pixel_values": np.zeros((2, 4, 4, 4), np.float32)}, "axis 1"),
    ({"pixel_values": np.zeros((2, 3, 4), np.float32)}, "4 dims"),
    ({"pixel_values": np.zeros((2, 3, 4, 4), np.float32), "flags": np.zeros((2, 4), np.int64)}, "bool"),
    ({"pixel_values": np.zeros((2, 3, 4, 4), np.float32), "flags": np.zeros((1, 4), bool)}, "batch"),
    ({"pixel_values": np.zeros((2, 3, 4, 4), np.float32), "flags": np.zeros((2, 5), bool)}, "'h'"),
    ({"pixel_values": np.zeros((2, 3, 4, 5), np.float32)}, "'h'"),
    ({"pixel_values": np.zeros((0, 3, 4, 4), np.float32)}, "empty batch"),
    ({"flags": np.zeros((2, 4), bool)}, "missing"),
])
def test_bad_dense_feeds(model, feeds, message):
    with pytest.raises(InputError, match=message):
        model.run(feeds)


@pytest.mark.parametrize("spec, message", [
    ({"name": "x", "dtype": "float16", "shape": ["batch"]}, "dtype"),
    ({"name": "x", "dtype": "float32", "shape": "batch"}, "shape"),
    ({"name": "x", "dtype": "float32", "shape": ["batch", -1]}, "dim"),
    ({"name": "x", "dtype": "float32", "shape": ["batch", True]}, "dim"),
    ({"name": "x", "dtype": "float32", "shape": ["batch"] * 9}, "8 dims"),
    ({"name": "x", "dtype": "float32", "shape": ["batch"], "kind": "weird"}, "kind"),
    ({"name": "x", "dtype": "float32", "shape": ["batch"], "kind": "ids"}, "packed ids"),
    ({"name": "x", "dtype": "float32", "shape": [3, "batch"], "tokens_per_item": 2}, "first dim"),
    ({"name": "x", "dtype": "float32", "shape": ["batch"], "tokens_per_item": 0}, "tokens_per_item"),
])
def test_bad_input_declarations(spec, message):
    graph = Graph.from_json({"inputs": [spec], "outputs": [{"name": "x"}], "nodes": []})
    with pytest.raises(GraphError, match=message):
        validate(graph, {}, REGISTRY)


def test_mask_needs_ids_and_names_are_unique():
    mask = {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}
    x = {"name": "x", "dtype": "float32", "shape": ["batch"]}
    with pytest.raises(GraphError, match="needs a packed 'input_ids'"):
        validate(Graph.from_json({"inputs": [mask, x], "outputs": [{"name": "x"}], "nodes": []}), {}, REGISTRY)
    with pytest.raises(GraphError, match="unique"):
        validate(Graph.from_json({"inputs": [x, x], "outputs": [{"name": "x"}], "nodes": []}), {}, REGISTRY)
    dense_mask = dict(mask, kind="dense")  # a generic graph takes its mask as a plain array
    types = validate(Graph.from_json({"inputs": [dense_mask], "outputs": [{"name": "attention_mask"}],
                                      "nodes": []}), {}, REGISTRY)
    assert types["attention_mask"].kind == DENSE and types["attention_mask"].dtype == "int64"


def test_dense_ids_are_not_packed(tmp_path):
    spec = {"name": "input_ids", "kind": "dense", "dtype": "int64", "shape": ["batch", "seq"]}
    mask = {"name": "attention_mask", "kind": "dense", "dtype": "int64", "shape": ["batch", "seq"]}
    model = edgeformer.load(_write(tmp_path / "g.edgeformer", [spec, mask], ["input_ids"]), threads=1)
    ids = np.array([[5, 6, 0], [7, 0, 0]], np.int32)
    out = model.run({"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    np.testing.assert_array_equal(out["input_ids"], ids)  # padded layout kept, widened to int64
    assert out["input_ids"].dtype == np.int64


def test_scalar_dense_input_stays_scalar(tmp_path):
    spec = {"name": "t", "dtype": "float32", "shape": []}
    model = edgeformer.load(_write(tmp_path / "s.edgeformer", [spec], ["t"]), threads=1)
    out = model.run({"t": np.float64(2.5)})["t"]
    assert out.shape == () and out.dtype == np.float32 and float(out) == 2.5
    with pytest.raises(InputError, match="0 dims"):
        model.run({"t": np.zeros(1)})
