"""BERT-family encoders (BertModel and its task heads' encoder) into coarse ops.

Per layer: one fused Q|K|V linear, attention, output linear with the residual fused in, layer_norm,
FFN up-projection with the activation fused in, down-projection with the residual, layer_norm.
"""
from __future__ import annotations

import math

import numpy as np

from converters import quantizable
from converters.registry import register_loader
from edgeformer.errors import EdgeformerError
from edgeformer.kernels.gemm_f32 import pack_weight

HIDDEN_ACT = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_fast": "gelu_tanh", "relu": "relu"}


def _ln(ckpt, name, width, tensors):
    # old TF-converted checkpoints name LayerNorm parameters gamma/beta
    gamma = f"{name}.weight" if ckpt.has(f"{name}.weight") else f"{name}.gamma"
    beta = f"{name}.bias" if ckpt.has(f"{name}.bias") else f"{name}.beta"
    tensors[f"{name}.weight"] = ckpt.get(gamma, (width,))
    tensors[f"{name}.bias"] = ckpt.get(beta, (width,))
    return {"gamma": f"{name}.weight", "beta": f"{name}.bias"}


def packed_linear(tensors, name, w, b=None):
    """Store a dense (N, K) weight pre-packed for the fp32 GEMM kernel; return (weights, attrs) of the node."""
    tensors[f"{name}.weight_packed"] = pack_weight(w)
    weights = {"weight_packed": f"{name}.weight_packed"}
    if b is not None:
        tensors[f"{name}.bias"] = b
        weights["bias"] = f"{name}.bias"
    return weights, {"format": "fp32", "out_features": int(w.shape[0])}


def _linear(ckpt, name, shape, tensors, store=packed_linear):
    bias = ckpt.get(f"{name}.bias", (shape[0],)) if ckpt.has(f"{name}.bias") else None
    return store(tensors, name, ckpt.get(f"{name}.weight", shape), bias)


@register_loader("bert")
def load_bert(config: dict, ckpt, builder, *, quantize=None) -> dict[str, np.ndarray]:
    """quantize: None (fp32) or a converters.quantize.LinearPolicy deciding each encoder linear's format."""
    store = packed_linear if quantize is None else quantize.linear
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    ffn, layers = int(config["intermediate_size"]), int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    if d % heads:
        raise EdgeformerError(f"hidden_size {d} is not divisible by num_attention_heads {heads}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise EdgeformerError(f"position_embedding_type {config['position_embedding_type']!r} is not supported")
    act = config.get("hidden_act", "gelu")
    if act not in HIDDEN_ACT:
        raise EdgeformerError(f"hidden_act {act!r} is not supported; supported: {sorted(HIDDEN_ACT)}")
    ckpt.strip_prefix("bert.", "embeddings.word_embeddings.weight")
    head_dim = d // heads
    tensors: dict[str, np.ndarray] = {}
    quantizable_options = quantizable.has_options(config)

    ids = builder.input("input_ids")
    builder.input("attention_mask", optional=True)
    emb_inputs = [ids]
    emb_weights = {"word": "embeddings.word_embeddings.weight"}
    word = ckpt.get("embeddings.word_embeddings.weight")
    if word.shape[1] != d:
        raise EdgeformerError("word embedding width differs from hidden_size")
    if quantize is not None and getattr(quantize, "embedding_int8", False):
        # int8 rows with a per-row scale (ops/embedding.py): a quarter of the largest tensor
        tensors["embeddings.word_embeddings.weight"], tensors["embeddings.word_embeddings.scale"] = \
            quantize.embedding_table(word)
        emb_weights["word_scale"] = "embeddings.word_embeddings.scale"
    else:
        tensors["embeddings.word_embeddings.weight"] = word
    if ckpt.has("embeddings.position_embeddings.weight"):
        tensors["embeddings.position_embeddings.weight"] = ckpt.get("embeddings.position_embeddings.weight")
        emb_weights["position"] = "embeddings.position_embeddings.weight"
    if ckpt.has("embeddings.token_type_embeddings.weight"):
        tensors["embeddings.token_type_embeddings.weight"] = ckpt.get("embeddings.token_type_embeddings.weight")
        emb_weights["token_type"] = "embeddings.token_type_embeddings.weight"
        emb_inputs.append(builder.input("token_type_ids", optional=True))
    h = builder.add("embedding", "embeddings", emb_inputs, emb_weights)
    h = builder.add("layer_norm", "embeddings.LayerNorm", [h], _ln(ckpt, "embeddings.LayerNorm", d, tensors),
                    {"eps": eps})
    for i in range(layers):
        p = f"encoder.layer.{i}"
        names = ("query", "key", "value")
        qkv_w = np.concatenate([ckpt.get(f"{p}.attention.self.{n}.weight", (d, d)) for n in names])  # (3d, d)
        qkv_b = np.concatenate([ckpt.get(f"{p}.attention.self.{n}.bias", (d,)) for n in names]) \
            if ckpt.has(f"{p}.attention.self.query.bias") else None  # (3d,)
        attn_attrs = {"kind": "softmax", "num_heads": heads, "head_dim": head_dim, "scale": 1.0 / math.sqrt(head_dim)}
        attn_weights, gated = {}, False
        if quantizable_options:  # clipped softmax / gated attention (converters/quantizable.py)
            qkv_w, qkv_b, attn_weights, attn_attrs, gated = quantizable.bert_attention(
                config, ckpt, f"{p}.attention.self", heads, head_dim, qkv_w, qkv_b, tensors, attn_attrs)
        qkv = builder.add("linear", f"{p}.attention.qkv", [h], *store(tensors, f"{p}.attention.qkv", qkv_w, qkv_b))
        ctx = builder.add("attention", f"{p}.attention", [qkv, h] if gated else [qkv], attn_weights, attn_attrs)
        a = builder.add("linear", f"{p}.attention.output.dense", [ctx, h],
                        *_linear(ckpt, f"{p}.attention.output.dense", (d, d), tensors, store))
        h1 = builder.add("layer_norm", f"{p}.attention.output.LayerNorm", [a],
                         _ln(ckpt, f"{p}.attention.output.LayerNorm", d, tensors), {"eps": eps})
        up_weights, up_attrs = _linear(ckpt, f"{p}.intermediate.dense", (ffn, d), tensors, store)
        f = builder.add("linear", f"{p}.intermediate.dense", [h1], up_weights, {**up_attrs, "activation": HIDDEN_ACT[act]})
        o = builder.add("linear", f"{p}.output.dense", [f, h1], *_linear(ckpt, f"{p}.output.dense", (d, ffn), tensors, store))
        last = i == layers - 1
        h = builder.add("layer_norm", f"{p}.output.LayerNorm", [o], _ln(ckpt, f"{p}.output.LayerNorm", d, tensors),
                        {"eps": eps}, output="last_hidden_state" if last else None)
    if layers == 0:
        raise EdgeformerError("num_hidden_layers must be >= 1")
    builder.output("last_hidden_state")
    return tensors
