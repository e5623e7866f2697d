"""ONNX import of Hugging Face Optimum exports (checked-in fixtures of tests/data/optimum, made by its
make_exports.py in a separate venv: optimum-onnx needs transformers < 4.58) against ONNX Runtime.

Each fixture is converted once, then edgeformer and ONNX Runtime run the same right-padded feeds (batch 1-4,
lengths up to 300); every output must agree within 1e-4 on the valid tokens, and the converted graph must be
made of coarse ops only. Optimum's GPT-2 exports take position_ids: ORT gets optimum's own cumsum(mask) - 1
positions on right-padded rows (= arange(S) on the valid tokens, what the conversion assumes) and arange(S) on
left-padded rows (HF GPT-2's default)."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgeformer  # noqa: E402
from converters.onnx_import import convert_onnx  # noqa: E402
from tests.helpers_onnx import random_feeds  # noqa: E402

DATA = Path(__file__).parent / "data" / "optimum"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]
TEXT = [n for n, f in FIXTURES.items() if f["family"] != "vit"]
COARSE = {"embedding", "linear", "layer_norm", "attention"}
VISION_COARSE = {"patch_embedding", "linear", "layer_norm", "attention", "pool"}
SHAPES = [(1, 1), (2, 17), (3, 300), (4, 130)]  # (batch, length); row 0 full length, the others shorter
VOCAB = 300


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (onnx path, loaded edgeformer model, conversion warnings), converted lazily once per module."""
    root = tmp_path_factory.mktemp("optimum")
    cache = {}

    def get(name):
        if name not in cache:
            path = DATA / FIXTURES[name]["file"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = convert_onnx(path, root / f"{name}.edgeformer")
            cache[name] = (path, edgeformer.load(out, threads=1), [str(w.message) for w in caught])
        return cache[name]

    yield get
    for _, model, _ in cache.values():
        model.close()


def ort_session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimum_position_ids(mask: np.ndarray) -> np.ndarray:
    """What optimum's ORTModelForCausalLM feeds: cumsum(mask) - 1, padded slots set to 1."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def text_feeds(names, batch, length, *, seed, layout="right"):
    feeds = random_feeds(batch, length, vocab=VOCAB, token_types="token_type_ids" in names, seed=seed)
    if layout == "left":  # the same rows moved to the end of the padded row
        for key in list(feeds):
            for b in range(batch):
                n = int(feeds["attention_mask"][b].sum())
                feeds[key][b] = np.roll(feeds[key][b], length - n)
    if "position_ids" in names:
        mask = feeds["attention_mask"]
        feeds["position_ids"] = (optimum_position_ids(mask) if layout == "right"  # = arange(S) on valid tokens
                                 else np.broadcast_to(np.arange(length), mask.shape).astype(np.int64))
    return feeds


def compare(path, model, feeds_list) -> float:
    """Max abs error over all outputs and feeds, on valid tokens; coarse ops leave padded tokens at zero."""
    session = ort_session(path)
    coarse = {n.op for n in model.graph.nodes} <= COARSE | VISION_COARSE
    out_map = json.loads(model.metadata["onnx.outputs"])  # edgeformer output -> ONNX output
    ours = {s.name for s in model.inputs}
    worst = 0.0
    for feeds in feeds_list:
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        got = model.run({k: v for k, v in feeds.items() if k in ours})
        assert set(out_map.values()) == set(want)
        valid = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
        for name, onnx_name in out_map.items():
            g, w = got[name], want[onnx_name]
            assert g.shape == w.shape, (name, g.shape, w.shape)
            if valid is not None and g.ndim >= 2 and g.shape[:2] == valid.shape:  # token outputs
                assert not coarse or np.all(g[~valid] == 0)
                g, w = g[valid], w[valid]
            err = float(np.abs(g - w).max())
            shape = {k: v.shape for k, v in feeds.items()}
            assert err <= 1e-4, f"{onnx_name}: max abs error {err} on feeds {shape}"
            worst = max(worst, err)
    return worst


def test_fixtures_match_the_manifest():
    total = 0
    for name, entry in FIXTURES.items():
        path = DATA / entry["file"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name}: stale manifest, rerun make_exports.py"
        assert len(data) < 1 << 20
        total += len(data)
        model = onnx.load_from_string(data)
        inits = {t.name for t in model.graph.initializer}
        assert [i.name for i in model.graph.input if i.name not in inits] == entry["inputs"]
        assert [o.name for o in model.graph.output] == entry["outputs"]
        assert entry["config"]["max_positions"] >= 320
    assert total < 5 << 20
    assert {e["family"] for e in FIXTURES.values()} == {"bert", "roberta", "distilbert", "electra", "albert",
                                                         "gpt2", "vit"}
    assert any(e["opset"] == 14 for e in FIXTURES.values()) and any(e["optimize"] for e in FIXTURES.values())


@pytest.mark.parametrize("name", TEXT)
def test_optimum_text_export_converts_to_coarse_ops_and_matches_ort(converted, name):
    entry = FIXTURES[name]
    path, model, messages = converted(name)
    causal = entry["family"] == "gpt2"
    names = entry["inputs"]
    feeds = [text_feeds(names, b, n, seed=17 * b + n) for b, n in SHAPES]
    if causal:  # HF GPT-2 positions are the index in the padded row: left padding is exact with arange positions
        feeds += [text_feeds(names, b, n, seed=5 * b + n, layout="left") for b, n in [(3, 64), (2, 300)]]
    compare(path, model, feeds)
    nodes = model.graph.nodes
    ops = [n.op for n in nodes]
    assert set(ops) <= COARSE, (ops, messages)
    assert ops.count("embedding") == 1 and ops.count("attention") == 2 and ops.count("layer_norm") == 5
    extra = {"albert": 1, "electra": 1}.get(entry["family"], 0) + (entry["task"] == "text-generation")
    assert ops.count("linear") == 2 * 4 + extra  # Q|K|V fused, activation and residuals fused into linears
    assert all(n.attrs.get("causal", False) is causal for n in nodes if n.op == "attention")
    assert ("token_type_ids" in {s.name for s in model.inputs}) == ("token_type_ids" in entry["inputs"])


def test_optimized_export_uses_ort_contrib_ops():
    """The O2 export really is the fused graph (so the conversion above covers the contrib-op translations)."""
    (name,) = [n for n, e in FIXTURES.items() if e["optimize"]]
    kinds = {(n.domain, n.op_type) for n in onnx.load(DATA / FIXTURES[name]["file"]).graph.node}
    assert {("com.microsoft", op) for op in ("Attention", "SkipLayerNormalization", "BiasGelu")} <= kinds


def test_gpt2_optimum_positions_equal_arange_on_right_padded_rows():
    """The assumption of the conversion (position_ids = arange(S)) holds for optimum's feeds on valid tokens."""
    feeds = text_feeds(["input_ids", "attention_mask", "position_ids"], 4, 33, seed=2)
    valid = feeds["attention_mask"].astype(bool)
    assert np.array_equal(feeds["position_ids"][valid], np.broadcast_to(np.arange(33), valid.shape)[valid])


def test_optimum_vit_export_converts_and_matches_ort(converted):
    path, model, _ = converted("vit")
    ops = [n.op for n in model.graph.nodes]
    assert set(ops) <= VISION_COARSE, ops
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.standard_normal((b, 3, 32, 32)).astype(np.float32)} for b in (1, 4)]
    compare(path, model, feeds)
