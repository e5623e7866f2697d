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
