"""edgeformer/fusion.py: an int8 linear feeding only another int8 linear hands it quantised rows.

The fused pair must give exactly the outputs of the unfused pair (Model.run with an observer runs the plain
steps), dynamic and static consumers, 1 and 2 threads (row split, and the panel split of few rows); the pass
must leave alone every pair that does not qualify."""
from __future__ import annotations

import numpy as np
import pytest

import edgeformer
from converters.quantize import int8_linear
from edgeformer.format import write_model
from edgeformer.graph import GraphBuilder
from edgeformer.ops.linear_int8 import QuantizedRows

F32 = np.float32
D, FFN, VOCAB = 48, 136, 50


def _model(path, *, consumer_static=False, producer_static=False, extra_reader=False, producer_residual=False,
           consumer_fp32=False, output_up=False, act="gelu", seed=0):
    rng = np.random.default_rng(seed)
    tensors = {"word": (rng.standard_normal((VOCAB, D)) * 0.5).astype(F32),
               "pos": (rng.standard_normal((64, D)) * 0.1).astype(F32)}
    b = GraphBuilder("fusion")
    ids = b.input("input_ids")
    b.input("attention_mask", optional=True)
    h = b.add("embedding", "emb", [ids], {"word": "word", "position": "pos"})

    def linear(name, n, k, static):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(F32)
        bias = (rng.standard_normal(n) * 0.1).astype(F32)
        smooth = rng.uniform(0.5, 2, k).astype(F32)
        kw = {"input_scale": 0.03, "input_zero_point": 120} if static else {}
        return int8_linear(tensors, name, w, bias, smooth=smooth, **kw)

    up_w, up_a = linear("up", FFN, D, producer_static)
    up_inputs = [h]
    if producer_residual:  # a residual of the up-projection's width, from an fp32 linear
        tensors["res.weight"] = (rng.standard_normal((FFN, D)) * 0.1).astype(F32)
        up_inputs.append(b.add("linear", "res", [h], {"weight": "res.weight"}))
    up = b.add("linear", "up", up_inputs, up_w, {**up_a, "activation": act})
    if consumer_fp32:
        w = (rng.standard_normal((D, FFN)) / np.sqrt(FFN)).astype(F32)
        tensors["down.weight"] = w
        down = b.add("linear", "down", [up, h], {"weight": "down.weight"})
    else:
        down_w, down_a = linear("down", D, FFN, consumer_static)
        down = b.add("linear", "down", [up, h], down_w, down_a)
    b.output(down)
    if extra_reader:
        b.output(b.add("activation", "extra", [up], attrs={"function": "relu"}))
    if output_up:
        b.output(up)
    graph = b.build()
    write_model(path, tensors, graph.to_json())
    return path


def _feeds(batch, seq, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, max(1, seq // 3):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _fused_pairs(model):
    return sum(fused is not plain for (_, fused), (_, plain) in zip(model._steps, model._plain_steps)) // 2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("consumer_static, producer_static", [(False, False), (True, False), (False, True),
                                                             (True, True)])
@pytest.mark.parametrize("act", ["gelu", "relu", "none"])
def test_fused_pair_equals_unfused(tmp_path, threads, consumer_static, producer_static, act):
    path = _model(tmp_path / "m.edgeformer", consumer_static=consumer_static, producer_static=producer_static,
                  act=act)
    model = edgeformer.load(path, threads=threads)
    assert _fused_pairs(model) == 1
    for batch, seq in [(1, 1), (1, 9), (3, 40), (2, 64), (6, 64)]:  # few rows: panel split with 2 threads
        feeds = _feeds(batch, seq, seed=batch * seq)
        fused = model.run(feeds)
        seen = {}
        plain = model.run(feeds, observe=lambda node, inputs: seen.setdefault(node.name, inputs))
        assert isinstance(seen["down"][0], np.ndarray) and seen["down"][0].dtype == F32  # observers see floats
        for name in fused:
            np.testing.assert_array_equal(fused[name], plain[name])


def test_producer_hands_quantized_rows(tmp_path):
    model = edgeformer.load(_model(tmp_path / "m.edgeformer"), threads=1)
    node, step = next((n, s) for n, s in model._steps if n.name == "up")
    x = np.random.default_rng(0).standard_normal((7, D)).astype(F32)
    q = step([x], None, model._workers)[0]
    assert isinstance(q, QuantizedRows) and q.aq.shape == (7, 4 * -(-FFN // 4)) and q.aq.dtype == np.uint8


@pytest.mark.parametrize("variant", ["extra_reader", "producer_residual", "consumer_fp32", "output_up"])
def test_pairs_that_do_not_qualify_stay_unfused(tmp_path, variant):
    model = edgeformer.load(_model(tmp_path / "m.edgeformer", **{variant: True}), threads=1)
    assert _fused_pairs(model) == 0
    out = model.run(_feeds(2, 10))
    assert all(np.all(np.isfinite(v)) for v in out.values())


# ---- whole encoder layers (kernels/encoder_layer.py) ----------------------------------------------------------

def _int8_bert(path, *, act="gelu", activation_quant="asymmetric", smooth=True, precision="bf16", keep_fp32=(),
               hidden=40, heads=5, ffn=72, layers=2, positions=160, seed=0, static=False):
    """A tiny random BERT with int8 encoder linears (dynamic, or static with made-up calibrated ranges),
    through the real converter pieces."""
    from converters.bert import load_bert
    from converters.checkpoint import Checkpoint
    from converters.hf import add_sentence_head, set_attention_precision
    from converters.quantize import LinearPolicy
    from tests.helpers import tiny_bert_arrays

    arrays = tiny_bert_arrays(hidden=hidden, heads=heads, layers=layers, ffn=ffn, positions=positions, seed=seed)
    config = {"model_type": "bert", "vocab_size": 120, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "intermediate_size": ffn, "max_position_embeddings": positions,
              "type_vocab_size": 2, "hidden_act": act, "layer_norm_eps": 1e-12}
    rng = np.random.default_rng(seed + 1)
    amax = {}
    for i in range(layers):
        for part in ("attention.qkv", "attention.output.dense", "intermediate.dense", "output.dense"):
            k = ffn if part == "output.dense" else hidden
            amax[f"encoder.layer.{i}.{part}"] = rng.uniform(0.1, 8.0, k)
    qparams = {name: {"scale": float(rng.uniform(0.02, 0.08)), "smooth": None,
                      "zero_point": int(rng.integers(100, 156)) if activation_quant == "asymmetric" else None}
               for name in amax}
    policy = LinearPolicy("static-int8" if static else "dynamic-int8", keep_fp32=keep_fp32,
                          activation_quant=activation_quant, act_amax=amax if smooth else None,
                          smooth_alpha=0.5 if smooth else 0.0, act_qparams=qparams if static else None)
    builder = GraphBuilder("int8-bert")
    tensors = load_bert(config, Checkpoint(arrays), builder, quantize=policy)
    set_attention_precision(builder.nodes, precision)
    add_sentence_head(builder, "mean", True)
    write_model(path, tensors, builder.build().to_json())
    return path


def _fused_layers(model):
    names = [n.name for n, s in model._steps if n.op == "encoder_layer"]
    assert model.fused_layers == names
    return names


def _bert_feeds(batch, seq, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 120, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[-1, max(1, seq // 3):] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (rng.random((batch, seq)) < 0.3) * 1}


@pytest.mark.parametrize("act, activation_quant, smooth, precision, static", [
    ("gelu", "asymmetric", True, "bf16", False), ("relu", "symmetric", True, "bf16", False),
    ("gelu", "asymmetric", False, "fp32", False), ("gelu_new", "symmetric", True, "fp32", False),
    ("gelu", "asymmetric", False, "bf16", True), ("relu", "symmetric", False, "fp32", True)])
def test_encoder_layers_fused_and_exact(tmp_path, act, activation_quant, smooth, precision, static):
    """Every layer (dynamic or static int8) is one fused step, and its outputs equal the per-node steps'
    (observe= runs those) and two
    threads' (which run the steps): lengths 1..150, padded batches, head_dim 8 (bf16 tiles copied out) and 16
    (stored in place). Bit-identical up to 128 tokens; beyond (the float32 flash path, whose row sums are
    reassociable adds) LLVM may vectorise a sum differently once the kernel is linked into the fused layer
    (seen only when the fused kernel comes from Numba's cache), so there the bound is a few ulp."""
    for hidden, heads in [(40, 5), (64, 4)]:
        path = _int8_bert(tmp_path / f"m{hidden}.edgeformer", act=act, activation_quant=activation_quant,
                          smooth=smooth, precision=precision, hidden=hidden, heads=heads, static=static)
        one, two = edgeformer.load(path, threads=1), edgeformer.load(path, threads=2)
        assert _fused_layers(one) == ["encoder.layer.0", "encoder.layer.1"]
        for batch, seq in [(1, 1), (1, 17), (3, 40), (2, 150)]:
            feeds = _bert_feeds(batch, seq, seed=batch * seq + hidden)
            fused = one.run(feeds)
            plain = one.run(feeds, observe=lambda node, inputs: None)
            threads2 = two.run(feeds)
            for name in fused:
                if seq <= 128:
                    np.testing.assert_array_equal(fused[name], plain[name])
                    np.testing.assert_array_equal(fused[name], threads2[name])
                else:
                    np.testing.assert_allclose(fused[name], plain[name], rtol=1e-5, atol=1e-5)
                    np.testing.assert_allclose(fused[name], threads2[name], rtol=1e-5, atol=1e-5)
                assert np.all(np.isfinite(fused[name]))
        empty = _bert_feeds(2, 9, seed=hidden)  # a fully padded sequence: no tokens of its own in the layers
        empty["attention_mask"][0] = 0
        fused, plain = one.run(empty), one.run(empty, observe=lambda node, inputs: None)
        for name in fused:
            np.testing.assert_array_equal(fused[name], plain[name])


def test_encoder_layer_matches_fp32_reference(tmp_path):
    """The fused int8 model stays close to the float32 conversion of the same weights (an independent path:
    fp32 kernels, no quantisation), so the fused kernel cannot be exact-but-wrong on both sides."""
    from converters.bert import load_bert
    from converters.checkpoint import Checkpoint
    from converters.hf import add_sentence_head
    from tests.helpers import tiny_bert_arrays

    int8 = edgeformer.load(_int8_bert(tmp_path / "q.edgeformer", smooth=False, precision="fp32"), threads=1)
    assert len(_fused_layers(int8)) == 2
    config = {"model_type": "bert", "vocab_size": 120, "hidden_size": 40, "num_hidden_layers": 2,
              "num_attention_heads": 5, "intermediate_size": 72, "max_position_embeddings": 160,
              "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    builder = GraphBuilder("fp32-bert")
    tensors = load_bert(config, Checkpoint(tiny_bert_arrays(hidden=40, heads=5, layers=2, ffn=72, positions=160)),
                        builder)
    add_sentence_head(builder, "mean", True)
    write_model(tmp_path / "f.edgeformer", tensors, builder.build().to_json())
    fp32 = edgeformer.load(tmp_path / "f.edgeformer", threads=1)
    feeds = _bert_feeds(2, 30, seed=3)
    a, b = int8.run(feeds)["sentence_embedding"], fp32.run(feeds)["sentence_embedding"]
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.all(cos > 0.99), cos


def test_layers_that_do_not_qualify_stay_unfused(tmp_path):
    """A layer with a float32 linear keeps its per-node steps; the other layer is still fused; the profile
    labels the fused step."""
    model = edgeformer.load(_int8_bert(tmp_path / "m.edgeformer", keep_fp32=["encoder.layer.1.output.dense"]),
                            threads=1)
    assert _fused_layers(model) == ["encoder.layer.0"]
    feeds = _bert_feeds(2, 12, seed=0)
    profile = {}
    fused = model.run(feeds, profile=profile)
    assert "encoder_layer" in profile and "linear[int8]" in profile and "linear[fp32]" in profile
    plain = model.run(feeds, observe=lambda node, inputs: None)
    for name in fused:
        np.testing.assert_array_equal(fused[name], plain[name])
