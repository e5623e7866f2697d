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


# ---- whole encoder layers ---------------------------------------------------------------------------------

# the node sequence of a post-LN encoder layer as the converters write it (kernels/encoder_layer.py)
LAYER_OPS = ("linear", "attention", "linear", "layer_norm", "linear", "linear", "layer_norm")


class FusedNode:
    """The graph-facing side of a fused step: the values it reads and writes outside the fused nodes."""

    def __init__(self, name, op, inputs, outputs, nodes):
        self.name, self.op, self.inputs, self.outputs, self.nodes = name, op, inputs, outputs, nodes
        self.attrs = {}


def fuse_encoder_layers(plain_steps, steps, graph_outputs) -> list:
    """Replace each post-LN encoder layer of int8 linears (module LAYER_OPS, checked by
    `_layer_kernel_args`) with one step calling kernels/encoder_layer.py's kernel for the whole layer.

    plain_steps: the unfused [(node, step)]; steps: the same list after fuse_requantize (the fused layer
    runs those seven steps itself when called with more than one thread). The fused step takes the
    layer's first position with a FusedNode (input: the layer input; output: the last layer norm's); the six
    positions after it keep their nodes with step None (Model.run skips them but still frees their inputs at
    their last use), so the graph's last-use indices stay valid."""
    users: dict[str, list] = {}
    for index, (node, _) in enumerate(plain_steps):
        for value in node.inputs:
            users.setdefault(value, []).append(index)
    fused = list(steps)
    i = 0
    while i + len(LAYER_OPS) <= len(plain_steps):
        window = plain_steps[i:i + len(LAYER_OPS)]
        found = _layer_kernel_args(window, i, users, graph_outputs)
        if found is None:
            i += 1
            continue
        kernel, args = found
        nodes = [node for node, _ in window]
        name = _common_name([n.name for n in nodes])
        outer = FusedNode(name, "encoder_layer", [nodes[0].inputs[0]], [nodes[-1].outputs[0]], nodes)
        fused[i] = (outer, _layer_step(kernel, args, nodes, [s for _, s in steps[i:i + len(LAYER_OPS)]]))
        for j in range(i + 1, i + len(LAYER_OPS)):
            fused[j] = (plain_steps[j][0], None)
        i += len(LAYER_OPS)
    return fused


def _layer_kernel_args(window, start, users, graph_outputs):
    """(kernel, fixed arguments) if the seven (node, step) pairs form a fusable encoder layer, else None.

    Conditions: the ops of LAYER_OPS; the four linears int8 (dynamic or static activation quantisation) on one
    int8 path, only the up-projection with an activation; attention of kind softmax; the output projection's
    residual is the layer input and the down-projection's the first layer norm's output; every value between
    the layer's input and output read only inside the layer (the first norm's by the two FFN linears, the
    others once) and none a graph output."""
    from edgeformer.kernels.encoder_layer import encoder_layer
    from edgeformer.ops.attention import SoftmaxAttention
    from edgeformer.ops.linear import ACTIVATIONS
    from edgeformer.ops.linear_int8 import Int8Weights

    nodes = [node for node, _ in window]
    if tuple(n.op for n in nodes) != LAYER_OPS:
        return None
    qkv, att, out, ln1, up, down, ln2 = nodes
    x = qkv.inputs[0] if len(qkv.inputs) == 1 else None
    wiring = [(att.inputs, [qkv.outputs[0]]), (out.inputs, [att.outputs[0], x]), (ln1.inputs, [out.outputs[0]]),
              (up.inputs, [ln1.outputs[0]]), (down.inputs, [up.outputs[0], ln1.outputs[0]]),
              (ln2.inputs, [down.outputs[0]])]
    if x is None or any(list(have) != want for have, want in wiring):
        return None
    inner = {n.outputs[0]: 1 for n in (qkv, att, out, up, down)}
    inner[ln1.outputs[0]] = 2
    for value, count in inner.items():
        readers = users.get(value, [])
        if value in graph_outputs or len(readers) != count or not all(start < r < start + 7 for r in readers):
            return None
    formats = [getattr(window[k][1], "format", None) for k in (0, 2, 4, 5)]
    if not all(isinstance(f, Int8Weights) for f in formats):
        return None
    if len({f.path for f in formats}) != 1:
        return None
    acts = [ACTIVATIONS[n.attrs.get("activation", "none")] for n in (qkv, out, up, down)]
    if acts[0] != 0 or acts[1] != 0 or acts[3] != 0:
        return None
    kind = getattr(window[1][1], "kind", None)
    if type(kind) is not SoftmaxAttention:
        return None
    path = formats[0].path
    try:
        kernel = encoder_layer(path, kind.bf16)
    except ValueError:
        return None
    w_qkv, w_out, w_up, w_down = (_linear_args(f) for f in formats)
    ln_1, ln_2 = window[3][1].params, window[6][1].params
    return kernel, (kind.num_heads, kind.head_dim, float(kind.scale), bool(kind.causal), w_qkv, w_out, ln_1, w_up,
                    acts[2], w_down, ln_2)


def _linear_args(fmt):
    return (fmt.asym, fmt.smooth, fmt.wp, fmt.colsum, fmt.scale, fmt.bias) + tuple(fmt.quant_params)


def _common_name(names):
    """The dotted prefix all names share ("encoder.layer.3"), else the first name."""
    parts = [n.split(".") for n in names]
    prefix = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix) or names[0]


def _layer_step(kernel, args, nodes, steps):
    heads, head_dim, scale, causal, w_qkv, w_out, ln_1, w_up, act, w_down, ln_2 = args

    def run(inputs, batch, workers):
        if workers.threads != 1:  # the steps split rows and heads across threads themselves
            env = {nodes[0].inputs[0]: inputs[0]}
            for node, step in zip(nodes, steps):
                for value, result in zip(node.outputs, step([env[v] for v in node.inputs], batch, workers)):
                    env[value] = result
            return [env[nodes[-1].outputs[0]]]
        x = np.ascontiguousarray(inputs[0], dtype=np.float32)
        return [kernel(x, batch.cu_seqlens, heads, head_dim, scale, causal, w_qkv, w_out, ln_1, w_up, act, w_down,
                       ln_2)]

    return run
