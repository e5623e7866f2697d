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
