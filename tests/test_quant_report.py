"""Per-linear quantisation error report (converters/quant_report.py) and `edgeformer convert --report`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeformer.cli import main
from tests.helpers import save_tiny_bert

pytest.importorskip("torch")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.hf import convert_hf_directory  # noqa: E402
from converters.quant_report import format_report, layer_report, random_feeds, save_report  # noqa: E402

LINEARS = {f"encoder.layer.{i}.{name}" for i in range(2)
           for name in ("attention.qkv", "attention.output.dense", "intermediate.dense", "output.dense")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-bert")
    directory = save_tiny_bert(root / "hf")
    fp32 = convert_hf_directory(directory, root / "fp32.edgeformer")
    int8 = convert_hf_directory(directory, root / "int8.edgeformer", quantize="dynamic-int8",
                                keep_fp32=("encoder.layer.1.output.*",))
    return directory, fp32, int8


def feeds(fp32):
    model = edgeformer.load(fp32, threads=1)
    return random_feeds(model, n_batches=3, batch_size=4, seq_len=12)


def test_int8_report(models, tmp_path):
    _, fp32, int8 = models
    rows = layer_report(fp32, int8, feeds_list=feeds(fp32))
    graph_order = [n.name for n in edgeformer.load(int8).graph.nodes if n.op == "linear"]
    assert [r["name"] for r in rows] == graph_order
    assert {r["name"] for r in rows} == LINEARS and len(rows) == len(LINEARS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["encoder.layer.1.output.dense"]["format"] == "fp32"
    assert by_name["encoder.layer.0.attention.qkv"]["format"] == "int8"
    for r in rows:
        assert 0.9 < r["min_token_cos"] <= r["cosine"] <= 1.0, r
        assert math.isfinite(r["snr_db"]) and r["snr_db"] > 10, r
        assert 0 < r["max_abs_err"] < 1, r
        assert r["tokens"] == rows[0]["tokens"] > 0
    # an int8 layer is measurably worse than fp32 in the first layer (its input is exact there)
    assert by_name["encoder.layer.0.attention.qkv"]["cosine"] < 1 - 1e-7
    table = format_report(rows)
    assert "encoder.layer.0.intermediate.dense" in table and "worst:" in table
    saved = json.loads(save_report(rows, tmp_path / "r.json").read_text())["layers"]
    assert [r["name"] for r in saved] == [r["name"] for r in rows]


def test_same_model_is_exact(models, tmp_path):
    _, fp32, _ = models
    rows = layer_report(fp32, fp32, feeds_list=feeds(fp32))
    assert len(rows) == len(LINEARS)
    for r in rows:
        assert r["cosine"] == pytest.approx(1, abs=1e-12) and r["min_token_cos"] == pytest.approx(1, abs=1e-12)
        assert r["snr_db"] == math.inf and r["max_abs_err"] == 0
    saved = json.loads(save_report(rows, tmp_path / "r.json").read_text())["layers"]
    assert all(r["snr_db"] is None for r in saved)  # inf is written as null (strict JSON)


def test_unconsumed_linear_output_is_read_from_graph_outputs(models):
    """A linear whose output is a graph output and consumed by no node: read at the valid positions."""
    from converters.bert import packed_linear
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder

    directory, _, _ = models
    tensors = {"emb": np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)}
    paths = []
    for scale in (1.0, 1.01):  # the second model's output is 1% larger: cosine 1, SNR 40 dB
        builder = GraphBuilder("head")
        builder.input("input_ids")
        builder.input("attention_mask", optional=True)
        v = builder.add("embedding", "embeddings", ["input_ids"], weights={"word": "emb"})
        weights, attrs = packed_linear(tensors, "head", np.eye(8, dtype=np.float32) * scale, None)
        builder.add("linear", "head", [v], weights=weights, attrs=attrs, output="logits")
        builder.output("logits")
        paths.append(directory.parent / f"head{scale}.edgeformer")
        write_model(paths[-1], tensors, builder.build().to_json())
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    rows = layer_report(*paths, feeds_list=[{"input_ids": np.array([[1, 2, 3, 0], [4, 5, 0, 0]]),
                                             "attention_mask": mask}])
    assert [r["name"] for r in rows] == ["head"] and rows[0]["tokens"] == 5
    assert rows[0]["snr_db"] == pytest.approx(40, abs=1e-3) and rows[0]["cosine"] == pytest.approx(1)


def test_cli_report(models, tmp_path, capsys):
    directory, _, _ = models
    out, report = tmp_path / "m8.edgeformer", tmp_path / "m8.json"
    assert main(["convert", str(directory), "-o", str(out), "--quantize", "dynamic-int8", "--report",
                 str(report)]) == 0
    printed = capsys.readouterr().out
    assert "random token ids" in printed and "encoder.layer.1.output.dense" in printed
    layers = json.loads(report.read_text())["layers"]
    assert {r["name"] for r in layers} == LINEARS
    assert all(r["format"] == "int8" and 0.9 < r["cosine"] <= 1 and r["snr_db"] > 10 for r in layers)
    # default path next to the output; --report without --quantize is refused
    assert main(["convert", str(directory), "-o", str(out), "--quantize", "weights-int8", "--report"]) == 0
    assert json.loads((tmp_path / "m8.edgeformer.report.json").read_text())["layers"][0]["format"] == "int8_weights"
    assert main(["convert", str(directory), "-o", str(out), "--report"]) == 1
    assert "need --quantize" in capsys.readouterr().err
