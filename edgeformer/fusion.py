"""Load-time fusion of bound steps: an int8 linear that feeds only another int8 linear hands it quantised rows.

In a BERT FFN the up-projection's output (T x 4d float32, 786 KB at 128 tokens for MiniLM) is read once, by
the down-projection, which first quantises it. Fused, the up-projection quantises each row chunk of its
output while the chunk is still in L2 (gemm_s8.linear_requant, with the consumer's own quantiser: dynamic
or static, its smoothing vector) and passes `QuantizedRows` on; the float output never reaches memory and the
consumer skips its quantisation pass. The codes are exactly those of the unfused pair (tests/test_fusion.py).

Conditions (checked here, at load): producer and consumer are `linear` nodes of format int8; the producer
has no residual input; its output is read by nothing else (one use, as the consumer's first input) and is
not a graph output; the consumer does not also produce fused rows (no chains). Model.run uses the plain,
unfused steps when an `observe` callback is given, so observers always see float32 values.
"""
from __future__ import annotations

import numpy as np

from edgeformer.ops.base import NO_MATRIX


def fuse_requantize(steps, graph_outputs) -> list:
    """steps: [(node, bound step)] in graph order -> a new list with fused pairs' steps replaced."""
    from edgeformer.ops.linear import ACTIVATIONS
    from edgeformer.ops.linear_int8 import Int8Weights

    users: dict[str, list] = {}
    for index, (node, _) in enumerate(steps):
        for slot, value in enumerate(node.inputs):
            users.setdefault(value, []).append((index, slot))
    fused = list(steps)
    consumers: set[int] = set()
    for i, (node, step) in enumerate(steps):
        fmt = getattr(step, "format", None)
        if node.op != "linear" or len(node.inputs) != 1 or not isinstance(fmt, Int8Weights) or i in consumers:
            continue
        value = node.outputs[0]
        if value in graph_outputs or len(users.get(value, ())) != 1:
            continue
        j, slot = users[value][0]
        consumer_node, consumer_step = steps[j]
        consumer = getattr(consumer_step, "format", None)
        if (consumer_node.op != "linear" or slot != 0 or not isinstance(consumer, Int8Weights)
                or consumer.in_features != fmt.out_features):
            continue
        act = ACTIVATIONS[node.attrs.get("activation", "none")]
        fused[i] = (node, _producer(fmt, act, consumer))
        fused[j] = (consumer_node, _consumer(consumer, ACTIVATIONS[consumer_node.attrs.get("activation", "none")]))
        consumers.add(j)
    return fused


def _producer(fmt, act, consumer):
    def run(inputs, batch, workers):
        return [fmt.requantize_call(inputs[0], act, workers, consumer)]

    run.format = fmt
    return run


def _consumer(fmt, act):
    def run(inputs, batch, workers):
        q = inputs[0]
        residual = inputs[1] if len(inputs) == 2 else NO_MATRIX
        out = np.empty((q.rows, fmt.out_features), dtype=np.float32)  # (T, N)
        fmt.call_quantized(q, residual, act, out, workers)
        return [out]

    run.format = fmt
    return run
