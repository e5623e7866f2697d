"""The `edgeformer` command, run in-process on a tiny converted BERT."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeformer.cli import main
from tests.helpers import save_tiny_bert

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("cli-bert"), sentence_transformers="cls")


@pytest.fixture(scope="module")
def tiny_file(tiny_dir):
    out = tiny_dir / "tiny.edgeformer"
    assert main(["convert", str(tiny_dir), "-o", str(out)]) == 0
    return out


def test_inspect(tiny_file, capsys):
    assert main(["inspect", str(tiny_file), "--json", "--shape", "2x16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ops"]["linear[fp32]"] == 8 and report["ops"]["attention[softmax]"] == 2
    assert report["planned_peak_activation_bytes"]["2x16"] > 0
    assert main(["inspect", str(tiny_file), "-v"]) == 0
    assert "encoder.layer.1.output.LayerNorm" in capsys.readouterr().out


def test_run_npz_and_npy(tiny_file, tmp_path, capsys):
    ids = np.array([[1, 5, 7, 2]], dtype=np.int64)
    np.savez(tmp_path / "feeds.npz", input_ids=ids)
    np.save(tmp_path / "ids.npy", ids)
    assert main(["run", str(tiny_file), str(tmp_path / "feeds.npz"), "-o", str(tmp_path / "out.npz")]) == 0
    assert main(["run", str(tiny_file), f"input_ids={tmp_path / 'ids.npy'}"]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert out["last_hidden_state"].shape == (1, 4, 40) and out["sentence_embedding"].shape == (1, 40)
    assert "sentence_embedding" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tiny_file, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", input_ids=np.array([[1000]]))
    assert main(["run", str(tiny_file), str(tmp_path / "bad.npz")]) == 1
    assert "outside" in capsys.readouterr().err
    (tmp_path / "junk.edgeformer").write_bytes(b"\x00" * 100)
    assert main(["inspect", str(tmp_path / "junk.edgeformer")]) == 1


def test_precompile_bench_info(tiny_file, tmp_path, capsys):
    assert main(["precompile", str(tiny_file)]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_file), "--shapes", "1x8,2x4", "--repeat", "2", "--warmup", "1",
                 "--min-time", "0", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["results"]
    assert [c["shape"] for c in cells] == ["1x8", "2x4"] and all(c["median_ms"] > 0 for c in cells)
    assert main(["info"]) == 0
    assert "numba cache" in capsys.readouterr().out


def test_convert_quantized_and_onnx_and_check(tiny_dir, tmp_path, capsys):
    import edgeformer

    int8 = tmp_path / "tiny-int8.edgeformer"
    assert main(["convert", str(tiny_dir), "-o", str(int8), "--quantize", "dynamic-int8",
                 "--keep-fp32", "encoder.layer.1.*"]) == 0
    graph = edgeformer.load(int8).graph
    formats = {n.name: n.attrs.get("format") for n in graph.nodes if n.op == "linear"}
    assert formats["encoder.layer.0.attention.qkv"] == "int8" and formats["encoder.layer.1.output.dense"] == "fp32"
    assert all(n.attrs.get("precision") == "bf16" for n in graph.nodes if n.op == "attention")  # int8 default
    assert main(["inspect", str(int8)]) == 0
    assert "attention[softmax, bf16] x2" in capsys.readouterr().out
    # layer 0 runs as one fused step; --no-fuse runs every node alone, same outputs; bench --vs unfused times both
    assert edgeformer.load(int8, threads=1).fused_layers == ["encoder.layer.0"]
    assert main(["inspect", str(int8)]) == 0 and "fused:   1 encoder layers" in capsys.readouterr().out
    assert main(["precompile", str(int8), "--threads", "2"]) == 0  # also compiles the 1-thread fused layer
    np.savez(tmp_path / "feeds.npz", input_ids=np.array([[1, 5, 7, 9, 2]], dtype=np.int64))
    for flags, name in (([], "fused.npz"), (["--no-fuse"], "plain.npz")):
        assert main(["run", str(int8), str(tmp_path / "feeds.npz"), "--threads", "1", "-o", str(tmp_path / name)]
                    + flags) == 0
    with np.load(tmp_path / "fused.npz") as fused, np.load(tmp_path / "plain.npz") as plain:
        np.testing.assert_array_equal(fused["last_hidden_state"], plain["last_hidden_state"])
    report = tmp_path / "bench-unfused.json"
    assert main(["bench", str(int8), "--threads", "1", "--shapes", "1x8", "--repeat", "2", "--warmup", "1",
                 "--min-time", "0", "--vs", "unfused", "--json", str(report)]) == 0
    assert [c["engine"] for c in json.loads(report.read_text())["results"]] == ["edgeformer", "unfused"]
    fp32_attention = tmp_path / "tiny-int8-fp32-attention.edgeformer"
    assert main(["convert", str(tiny_dir), "-o", str(fp32_attention), "--quantize", "dynamic-int8",
                 "--attention-precision", "fp32"]) == 0
    attention = [n for n in edgeformer.load(fp32_attention).graph.nodes if n.op == "attention"]
    assert attention and all("precision" not in n.attrs for n in attention)

    import torch
    from transformers import BertModel

    net = BertModel.from_pretrained(str(tiny_dir), add_pooling_layer=False).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    onnx_path = tmp_path / "tiny.onnx"
    ids = torch.ones((1, 8), dtype=torch.long)
    torch.onnx.export(Wrapper(), (ids, torch.ones_like(ids)), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "last_hidden_state")})
    converted = tmp_path / "from-onnx.edgeformer"
    assert main(["convert", str(onnx_path), "-o", str(converted)]) == 0
    assert main(["check", str(onnx_path), "--model", str(converted), "--batch", "3", "--seq", "9"]) == 0
    assert "last_hidden_state" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "missing.onnx"), "-o", str(converted)]) == 1
    assert main(["convert", str(onnx_path), "-o", str(converted), "--attention-precision", "bf16"]) == 1
