"""Tiny random-weight Hugging Face encoders exported to ONNX offline, for the ONNX importer's tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FAMILIES = ("bert", "roberta", "distilbert", "electra", "albert")


def build_model(family: str, *, hidden=40, heads=5, layers=2, ffn=72, vocab=120, positions=80, seed=0,
                attn="eager", act=None):
    """A random-weight encoder (eval mode) of one family, with random LayerNorm parameters too."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=positions)
    if family == "distilbert":
        config = tf.DistilBertConfig(dim=hidden, n_heads=heads, n_layers=layers, hidden_dim=ffn,
                                     activation=act or "gelu", **common)
        cls = tf.DistilBertModel
    elif family == "albert":
        config = tf.AlbertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                                 intermediate_size=ffn, embedding_size=24, hidden_act=act or "gelu_new",
                                 type_vocab_size=2, **common)
        cls = tf.AlbertModel
    elif family == "electra":
        config = tf.ElectraConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                                  intermediate_size=ffn, embedding_size=32, hidden_act=act or "gelu",
                                  type_vocab_size=2, **common)
        cls = tf.ElectraModel
    elif family == "roberta":
        config = tf.RobertaConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                                  intermediate_size=ffn, hidden_act=act or "gelu", type_vocab_size=1,
                                  pad_token_id=1, vocab_size=vocab, max_position_embeddings=positions + 2)
        cls = tf.RobertaModel
    elif family == "bert":
        config = tf.BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                               intermediate_size=ffn, hidden_act=act or "gelu", type_vocab_size=2, **common)
        cls = tf.BertModel
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    kwargs = {} if family in ("distilbert", "electra") else {"add_pooling_layer": False}
    net = cls(config, **kwargs).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return net


def takes_token_types(family: str) -> bool:
    return family in ("bert", "electra", "albert")


def export(net, path: Path, *, opset: int = 17, token_types: bool = True) -> Path:
    """torch.onnx.export (TorchScript exporter) with dynamic batch and sequence axes."""
    import warnings

    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            return self.net(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded example, so that no mask branch is traced away
    args = (ids, mask, torch.zeros_like(ids)) if token_types else (ids, mask)
    names = ["input_ids", "attention_mask", "token_type_ids"][:len(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
    return path


def random_feeds(batch: int, length: int, *, vocab=120, token_types=True, seed=0, low=3):
    """Right-padded random feeds: row 0 full length, the others shorter (at least one token)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab, size=(batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for b in range(batch):
        n = length if b == 0 else int(rng.integers(1, length + 1))
        mask[b, :n] = 1
    ids[mask == 0] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        feeds["token_type_ids"] = (rng.random((batch, length)) < 0.4).astype(np.int64) * mask
    return feeds


def contrib_graph(kind: str, decomposed: bool, *, d=12, f=20, vocab=50, seed=0):
    """A tiny ONNX graph: word embedding, then one ORT contrib op (or its standard-op decomposition).

    kind: "bias_gelu", "gelu", "fast_gelu", "skip_ln", "layer_norm".
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = {}, []

    def const(name, array):
        inits[name] = np.asarray(array, dtype=np.float32)
        return name

    def node(op, ins, out, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{out}", domain=domain, **attrs))
        return out

    word = const("word", rng.standard_normal((vocab, d)))
    e = node("Gather", [word, "input_ids"], "e")
    eps = 1e-6

    def layer_norm_decomposed(x, gamma, beta):
        mean = node("ReduceMean", [x], "ln_mean", axes=[-1])
        c = node("Sub", [x, mean], "ln_c")
        sq = node("Pow", [c, const("two", 2.0)], "ln_sq")
        var = node("ReduceMean", [sq], "ln_var", axes=[-1])
        std = node("Sqrt", [node("Add", [var, const("eps", eps)], "ln_ve")], "ln_std")
        return node("Add", [node("Mul", [node("Div", [c, std], "ln_n"), gamma], "ln_g"), beta], "y")

    if kind in ("bias_gelu", "gelu", "fast_gelu"):
        m = node("MatMul", [e, const("w1", rng.standard_normal((d, f)) * 0.5)], "m")
        b = const("b1", rng.standard_normal(f) * 0.3)
        if not decomposed:
            if kind == "bias_gelu":
                node("BiasGelu", [m, b], "y", domain="com.microsoft")
            elif kind == "gelu":
                node("Gelu", [node("Add", [m, b], "mb")], "y", domain="com.microsoft")
            else:
                node("FastGelu", [m, b], "y", domain="com.microsoft")
        else:
            x = node("Add", [b, m], "mb")
            if kind == "fast_gelu":
                cube = node("Pow", [x, const("three", 3.0)], "cube")
                inner = node("Add", [x, node("Mul", [cube, const("k", 0.044715)], "kc")], "inner")
                t = node("Tanh", [node("Mul", [inner, const("s2p", np.sqrt(2 / np.pi))], "scaled")], "t")
                half = node("Mul", [x, const("half", 0.5)], "half_x")
                node("Mul", [half, node("Add", [t, const("one", 1.0)], "t1")], "y")
            else:
                er = node("Erf", [node("Div", [x, const("sqrt2", np.sqrt(2.0))], "xs")], "er")
                prod = node("Mul", [x, node("Add", [er, const("one", 1.0)], "er1")], "prod")
                node("Mul", [prod, const("half", 0.5)], "y")
        width = f
    elif kind == "skip_ln":
        m = node("MatMul", [e, const("w1", rng.standard_normal((d, d)) * 0.5)], "m")
        bias = const("bias", rng.standard_normal(d) * 0.3)
        gamma, beta = const("gamma", rng.uniform(0.5, 1.5, d)), const("beta", rng.standard_normal(d) * 0.1)
        if not decomposed:
            node("SkipLayerNormalization", [m, e, gamma, beta, bias], "y", domain="com.microsoft", epsilon=eps)
        else:
            s = node("Add", [node("Add", [m, bias], "mb"), e], "s")
            layer_norm_decomposed(s, gamma, beta)
        width = d
    elif kind == "layer_norm":
        gamma, beta = const("gamma", rng.uniform(0.5, 1.5, d)), const("beta", rng.standard_normal(d) * 0.1)
        if not decomposed:
            node("LayerNormalization", [e, gamma, beta], "y", axis=-1, epsilon=eps)
        else:
            layer_norm_decomposed(e, gamma, beta)
        width = d
    else:
        raise ValueError(kind)
    graph = helper.make_graph(
        nodes, f"{kind}_{'dec' if decomposed else 'contrib'}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17)] + ([] if decomposed else [helper.make_opsetid("com.microsoft", 1)])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)
