"""The byte-classifier family (converters/wide.py): deep and wide models, their loader, the embedded
default model, edgeformer.classify and `edgeformer demo`.

Oracles: the PyTorch reference module (random weights, converted through the checkpoint-directory
loader), and for the shipped model a PyTorch module rebuilt from the file's own weights.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import edgeformer
from edgeformer.classify import DEFAULT_MODEL, ByteClassifier, softmax
from edgeformer.errors import EdgeformerError, InputError, ModelFileError
from edgeformer.kernels.gemm_f32 import unpack_weight
from tests.optional import requires_torch, torch

LABELS = ["a", "b", "c"]


def _ragged(rng, lengths):
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)  # (B, S)
    mask = np.zeros_like(ids)  # (B, S)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, 256, n)
        mask[row, :n] = 1
    return ids, mask


@requires_torch
@pytest.mark.parametrize("layers,heads,attention,hidden,ffn", [
    (3, 2, 14, 20, 36),  # deep, odd head width (7)
    (1, 12, 36, 24, 40),  # wide, head width 3
    (2, 4, 32, 16, 64),
])
def test_random_models_match_pytorch(tmp_path, layers, heads, attention, hidden, ffn):
    from converters.hf import convert_hf_directory
    from converters.wide import ByteClassifierConfig, module, save_directory

    torch.manual_seed(layers * 100 + heads)
    config = ByteClassifierConfig(layers, heads, attention, hidden, ffn, labels=LABELS, max_positions=300)
    model = module(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped gamma/beta would show
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    path = convert_hf_directory(save_directory(model, tmp_path / "ckpt"), tmp_path / "m.edgeformer")
    ef = edgeformer.load(path, threads=2)
    assert json.loads(ef.metadata["labels"]) == LABELS and ef.max_length == 300
    rng = np.random.default_rng(0)
    for lengths in ([1], [300], [5, 17, 1, 230]):
        ids, mask = _ragged(rng, lengths)
        with torch.no_grad():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()  # (B, C)
        got = ef.run({"input_ids": ids, "attention_mask": mask})["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_config_is_validated():
    from converters.wide import ByteClassifierConfig

    good = ByteClassifierConfig(1, 4, 16, 8, 8, labels=LABELS).to_json()
    for key, value in [("attention_size", 18), ("num_layers", 0), ("labels", ["one"]), ("hidden_size", 2.5),
                       ("heads_per_layer", True)]:
        with pytest.raises(EdgeformerError):
            ByteClassifierConfig.from_json({**good, key: value})


def test_sinusoid_table_formula():
    from converters.wide import sinusoid_table

    table = sinusoid_table(50, 7)  # odd width: the last feature is a sine
    t, i = np.meshgrid(np.arange(50), np.arange(7), indexing="ij")
    angle = t / 10000.0 ** ((i - i % 2) / 7)
    want = np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    np.testing.assert_allclose(table, want, atol=2e-6)


# -- the embedded default model ---------------------------------------------------------------------
SAMPLES = Path(edgeformer.__file__).parent / "data" / "samples"
EXPECTED = {"ring_buffer.h": "c", "backup.sh": "shell", "station.yaml": "yaml", "schedule.py": "python",
            "readings.sql": "sql", "index.html": "html"}


@pytest.fixture(scope="module")
def classifier():
    return ByteClassifier(threads=2)


def test_shipped_model_is_small_and_labelled(classifier):
    assert DEFAULT_MODEL.stat().st_size <= 5 * 1024 * 1024
    assert len(set(classifier.labels)) == len(classifier.labels) >= 10
    assert {op.op for op in classifier.model.graph.nodes} <= {"embedding", "layer_norm", "linear", "attention", "pool"}


def test_shipped_model_labels_the_samples(classifier):
    preds = classifier.classify([(SAMPLES / name).read_bytes() for name in EXPECTED])
    assert [p.label for p in preds] == list(EXPECTED.values())
    for p in preds:
        assert abs(sum(p.probabilities.values()) - 1) < 1e-6 and p.confidence == max(p.probabilities.values())


def _stdlib_files(count):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 200)
    return files[:: max(1, len(files) // count)][:count]


@requires_torch
def test_shipped_model_matches_pytorch(classifier):
    """Same logits (1e-4) and predictions as the PyTorch module rebuilt from the file's weights."""
    from converters.wide import ByteClassifierConfig, module

    meta, tensors, nodes = classifier.model.metadata, classifier.model.tensors, classifier.model.graph.nodes
    layers = sum(1 for n in nodes if n.op == "attention")
    att = next(n for n in nodes if n.op == "attention")
    heads, head_dim = att.attrs["num_heads"], att.attrs["head_dim"]
    hidden = tensors["embed.word"].shape[1]
    ffn = next(n for n in nodes if n.name == "layers.0.up").attrs["out_features"]
    config = ByteClassifierConfig(layers, heads, heads * head_dim, hidden, ffn, labels=json.loads(meta["labels"]),
                                  max_positions=int(meta["max_length"]))
    state = {"embed.weight": tensors["embed.word"], "ln.weight": tensors["ln.weight"], "ln.bias": tensors["ln.bias"]}
    for node in nodes:
        if node.op == "linear":
            state[f"{node.name}.weight"] = unpack_weight(tensors[node.weights["weight_packed"]], node.attrs["out_features"])
            state[f"{node.name}.bias"] = tensors[node.weights["bias"]]
        elif node.op == "layer_norm":
            state[f"{node.name}.weight"] = tensors[node.weights["gamma"]]
            state[f"{node.name}.bias"] = tensors[node.weights["beta"]]
    model = module(config).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    texts = [(SAMPLES / n).read_bytes() for n in sorted(EXPECTED)] + [p.read_bytes() for p in _stdlib_files(6)]
    for max_bytes in (64, 1024):
        chunks = [t[:max_bytes] for t in texts]
        ids, mask = np.zeros((len(chunks), max(map(len, chunks))), np.int64), None
        mask = np.zeros_like(ids)
        for row, c in enumerate(chunks):
            ids[row, :len(c)] = np.frombuffer(c, np.uint8)
            mask[row, :len(c)] = 1
        with torch.no_grad():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = classifier.logits(texts, max_bytes)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_classifier_rejects_bad_input(classifier, tmp_path):
    with pytest.raises(InputError):
        classifier.classify([b""])
    with pytest.raises(InputError):
        classifier.classify([])
    with pytest.raises(InputError):
        classifier.classify([b"abc"], max_bytes=0)
    with pytest.raises(InputError):
        classifier.classify([b"abc"], max_bytes=classifier.max_bytes + 1)
    assert classifier.classify(["ünïcode text"])[0].label in classifier.labels  # str is UTF-8 encoded


def test_classifier_refuses_other_models(tmp_path):
    from tests.helpers import write_tiny_bert

    with pytest.raises(ModelFileError, match="not a byte classifier"):
        ByteClassifier(write_tiny_bert(tmp_path / "bert.edgeformer"))


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32))
    assert np.isfinite(p).all() and p[0, 0] == pytest.approx(1.0)


def test_demo_command(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "edgeformer.cli", "demo", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name, label in EXPECTED.items():
        assert f"{name}: {label} (" in run.stdout
    run = subprocess.run([sys.executable, "-m", "edgeformer.cli", "demo", str(empty), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "empty" in run.stdout and "cannot read" in run.stdout
