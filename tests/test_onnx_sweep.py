"""Issue 3 acceptance sweep: random-weight Hugging Face models of every text family in three sizes (opsets 14 / 17 / 20), exported with
torch.onnx (TorchScript exporter), converted once, and compared with ONNX Runtime on padded batches of sizes 1 to 4
whose rows cover lengths 1 to 300 (1, 2, 17, 63, 64, 65, 128, 255, 256, 257, 299, 300): max abs error <= 1e-4 on
the valid tokens of every output. Right padding for all; left padding too for GPT-2 (positions are the index in
the padded row, as HF GPT-2 computes them)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import edgeformer  # noqa: E402
from converters.onnx_import import convert_onnx  # noqa: E402
from tests.helpers_gpt2 import build_gpt2, export_gpt2  # noqa: E402
from tests.helpers_onnx import build_model, export, takes_token_types  # noqa: E402

COARSE = {"embedding", "linear", "layer_norm", "attention"}
FAMILIES = ("bert", "roberta", "distilbert", "electra", "albert", "gpt2")
# size -> (hidden, heads, FFN width, opset, attention implementation traced by the exporter)
SIZES = {"d40h5f72": (40, 5, 72, 14, "eager"), "d64h4f200": (64, 4, 200, 17, "sdpa"),
         "d48h2f130": (48, 2, 130, 20, "eager")}
POSITIONS = 320
VOCAB = 200
# (batch, row lengths): together batch sizes 1-4 and the lengths around 1, 64, 128, 256 and 300
RUNS = [[1], [2, 17], [63, 64, 65], [300, 299, 257, 256], [255, 128, 2, 1]]
CASES = [(f, s, "right") for f in FAMILIES for s in SIZES] + [("gpt2", s, "left") for s in list(SIZES)[:2]]


def _randomize_biases(net, seed):
    """HF initialises linear biases to 0: make them matter (LayerNorms are randomised by the builders)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return net


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, size) -> (onnx path, loaded model), exported and converted once per module."""
    root = tmp_path_factory.mktemp("onnx_sweep")
    cache = {}

    def get(family, size):
        key = (family, size)
        if key not in cache:
            hidden, heads, ffn, opset, attn = SIZES[size]
            seed = FAMILIES.index(family) * 10 + list(SIZES).index(size)
            path = root / f"{family}_{size}.onnx"
            if family == "gpt2":
                net = build_gpt2(n_embd=hidden, n_head=heads, n_layer=2, n_inner=ffn, vocab=VOCAB,
                                 positions=POSITIONS, seed=seed, attn=attn)
                export_gpt2(net, path, opset=opset)
            else:
                net = build_model(family, hidden=hidden, heads=heads, ffn=ffn, vocab=VOCAB, positions=POSITIONS,
                                  seed=seed, attn=attn)
                export(_randomize_biases(net, seed), path, opset=opset, token_types=takes_token_types(family))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = convert_onnx(path, path.with_suffix(".edgeformer"))
            cache[key] = (path, edgeformer.load(out, threads=1))
        return cache[key]

    yield get
    for _, model in cache.values():
        model.close()


def sweep_feeds(lengths, *, token_types, layout, seed):
    """One padded batch: row b has lengths[b] valid tokens, padded to max(lengths) on the right or left."""
    rng = np.random.default_rng(seed)
    batch, seq = len(lengths), max(lengths)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for b, n in enumerate(lengths):
        if layout == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq - n:] = 1
    ids = rng.integers(3, VOCAB, size=(batch, seq), dtype=np.int64) * mask  # pad id 0; RoBERTa's pad (1) unused
    feeds = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        feeds["token_type_ids"] = (rng.random((batch, seq)) < 0.4).astype(np.int64) * mask
    return feeds


@pytest.mark.parametrize("family,size,layout", CASES, ids=[f"{f}-{s}-{p}" for f, s, p in CASES])
def test_sweep_lengths_1_to_300_match_ort(converted, family, size, layout):
    path, model = converted(family, size)
    nodes = model.graph.nodes
    assert {n.op for n in nodes} <= COARSE
    assert all(n.attrs.get("causal", False) is (family == "gpt2") for n in nodes if n.op == "attention")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    worst = 0.0
    for i, lengths in enumerate(RUNS):
        feeds = sweep_feeds(lengths, token_types="token_type_ids" in names, layout=layout, seed=100 * i + 7)
        want = session.run(None, feeds)[0]
        got = model.run(feeds)["last_hidden_state"]
        valid = feeds["attention_mask"].astype(bool)
        assert got.shape == want.shape
        err = float(np.abs(got[valid] - want[valid]).max())
        assert err <= 1e-4, f"rows {lengths} ({layout} padded): max abs error {err}"
        assert np.all(got[~valid] == 0)
        worst = max(worst, err)
    print(f"\n{family} {size} {layout}: max abs error {worst:.3g} over rows {RUNS}")
