"""`edgeformer check`: names the first intermediate tensor where edgeformer and ONNX Runtime part ways."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import check_onnx, convert_onnx  # noqa: E402
from edgeformer.format import read_model, write_model  # noqa: E402
from tests.helpers_gpt2 import build_gpt2, export_gpt2  # noqa: E402
from tests.helpers_onnx import build_model, export  # noqa: E402

CASES = [("bert", 14), ("gpt2", 17)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-op{o}" for f, o in CASES])
def converted(request, tmp_path_factory):
    family, opset = request.param
    root = tmp_path_factory.mktemp(f"check_{family}")
    if family == "gpt2":
        path = export_gpt2(build_gpt2(), root / f"{family}.onnx", opset=opset)
    else:
        path = export(build_model(family), root / f"{family}.onnx", opset=opset, token_types=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_path = convert_onnx(path, root / f"{family}.edgeformer")
    return path, model_path


def test_trace_covers_every_layer_and_agrees_on_a_correct_conversion(converted):
    onnx_path, model_path = converted
    model = edgeformer.load(model_path, threads=1)
    trace = json.loads(model.metadata["onnx.trace"])
    traced_ops = {n.op for n in model.graph.nodes if any(v in trace for v in n.outputs)}
    assert {"linear", "attention", "layer_norm"} <= traced_ops or {"linear", "attention"} <= traced_ops
    assert sum(n.op == "attention" for n in model.graph.nodes if any(v in trace for v in n.outputs)) >= 2
    report = check_onnx(onnx_path, model_path, batch=3, seq=11, verbose=False, trace=True)
    assert "first_divergence" not in report  # every traced tensor matches: no false alarms
    model.close()


def _corrupt(model_path, out_path, pick):
    """Copy the model file with one node's weight scaled by 1.5; return that node."""
    src = read_model(model_path)
    graph = src.graph
    trace = json.loads(src.metadata["onnx.trace"])
    nodes = [n for n in graph["nodes"] if pick(n) and any(v in trace for v in n["outputs"])]
    victim = nodes[len(nodes) // 2]  # a node in the middle of the graph
    role = "weight_packed" if "weight_packed" in victim["weights"] else sorted(victim["weights"])[0]
    tensors = {k: np.array(v) for k, v in src.tensors.items() if not k.startswith("__pad")}
    tensors[victim["weights"][role]] = tensors[victim["weights"][role]] * np.float32(1.5)
    write_model(out_path, tensors, graph, metadata=src.metadata, tokenizer_json=src.tokenizer_json)
    return victim


@pytest.mark.parametrize("op", ["linear", "layer_norm"])
def test_names_the_first_diverging_tensor(converted, tmp_path, capsys, op):
    onnx_path, model_path = converted
    victim = _corrupt(model_path, tmp_path / "bad.edgeformer", lambda n: n["op"] == op)
    report = check_onnx(onnx_path, tmp_path / "bad.edgeformer", batch=2, seq=9)
    first = report["first_divergence"]
    assert first["node"] == victim["name"] and first["op"] == op
    assert first["value"] == victim["outputs"][0]
    assert first["max_abs"] > 1e-3
    out = capsys.readouterr().out
    assert "first diverging tensor" in out and victim["name"] in out and first["onnx_tensor"] in out


def test_cli_check_exits_1_and_names_the_tensor(converted, tmp_path, capsys):
    from edgeformer.cli import main

    onnx_path, model_path = converted
    assert main(["check", str(onnx_path), "--model", str(model_path), "--trace", "--seq", "7"]) == 0
    victim = _corrupt(model_path, tmp_path / "bad.edgeformer", lambda n: n["op"] == "linear")
    assert main(["check", str(onnx_path), "--model", str(tmp_path / "bad.edgeformer")]) == 1
    assert f"(node {victim['name']!r}" in capsys.readouterr().out


def test_check_feeds_position_ids_to_optimum_gpt2():
    """Optimum's GPT-2 exports take position_ids; check feeds the positions the conversion assumes."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "optimum" / "gpt2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_onnx(path, None, batch=3, seq=12, verbose=False, trace=True)
    assert "first_divergence" not in report
    assert all(r["max_abs"] <= 1e-4 for r in report.values())
