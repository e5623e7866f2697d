"""ViT image encoders (ViTModel, ViTForImageClassification) into coarse ops.

    pixel_values (B, C, H, W) --patch_embedding--> tokens (B*P', d)   [Conv2d kernel = stride = patch, + CLS, + positions]
    per layer (pre-LN, bidirectional, no mask):
        x = layernorm_before(h); ctx = attention(qkv(x)); a = o_proj(ctx) + h          (residual fused)
        y = layernorm_after(a);  h = fc2(act(fc1(y))) + a                              (activation, residual fused)
    last_hidden_state = layernorm(h)
    logits        = classifier(last_hidden_state[:, 0])            (ViTForImageClassification)
    pooler_output = act(pooler.dense(last_hidden_state[:, 0]))     (ViTModel with its pooler; tanh by default)

The graph input is pixel_values, dense float32 ("batch", C, H, W) with fixed C, H, W and tokens_per_item P'
(the session batches B images of P' tokens, nothing padded). Checkpoints name the layers
``encoder.layer.{i}.attention.attention.query`` ... (transformers 4 and what transformers 5 writes) or
``layers.{i}.attention.q_proj`` ... (transformers 5's module names); both are read. The conv kernel
(d, C, ph, pw) becomes a linear over flattened (C, ph, pw) patches, packed for the fp32 GEMM.
"""
from __future__ import annotations

import json
import math

import numpy as np

from converters import quantizable
from converters.bert import HIDDEN_ACT, packed_linear
from converters.registry import register_loader
from edgeformer.errors import EdgeformerError

POOLER_ACT = {"tanh": "tanh", **HIDDEN_ACT}

# transformers 5 module names -> the checkpoint names of transformers 4 (which transformers 5 still writes)
_V5_NAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
             ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."),
             ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))


def _pair(value, what) -> tuple[int, int]:
    """An int or a 2-list (height, width) from config.json."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise EdgeformerError(f"config {what} must be a positive int or [height, width], got {value!r}")
    return pair


def _normalize_names(ckpt) -> None:
    """Strip the task heads' ``vit.`` prefix; rename transformers 5 module names to the classic checkpoint names."""
    ckpt.strip_prefix("vit.", "embeddings.patch_embeddings.projection.weight")
    arrays = {}
    for name, array in ckpt.arrays.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            for new, old in _V5_NAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            name = f"encoder.layer.{index}.{rest}"
        arrays[name] = array
    ckpt.arrays = arrays


def _ln(ckpt, name, width, tensors):
    tensors[f"{name}.weight"] = ckpt.get(f"{name}.weight", (width,))
    tensors[f"{name}.bias"] = ckpt.get(f"{name}.bias", (width,))
    return {"gamma": f"{name}.weight", "beta": f"{name}.bias"}


def _linear(ckpt, name, shape, tensors, out_name=None):
    bias = ckpt.get(f"{name}.bias", (shape[0],)) if ckpt.has(f"{name}.bias") else None
    return packed_linear(tensors, out_name or name, ckpt.get(f"{name}.weight", shape), bias)


@register_loader("vit")
def load_vit(config: dict, ckpt, builder, *, quantize=None) -> dict[str, np.ndarray]:
    if quantize is not None:
        raise EdgeformerError("ViT: quantized conversion is not supported yet (calibration reads text)")
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    layers, ffn = int(config["num_hidden_layers"]), int(config["intermediate_size"])
    head_dim = int(config.get("head_dim") or (d // heads if heads else 0))
    eps = float(config.get("layer_norm_eps", 1e-12))
    channels = int(config.get("num_channels", 3))
    height, width = _pair(config.get("image_size", 224), "image_size")
    ph, pw = _pair(config.get("patch_size", 16), "patch_size")
    if heads < 1 or head_dim < 1 or ("head_dim" not in config and d % heads):
        raise EdgeformerError(f"hidden_size {d} is not a positive multiple of num_attention_heads {heads}")
    if layers < 1 or channels < 1:
        raise EdgeformerError("num_hidden_layers and num_channels must be >= 1")
    if height < ph or width < pw:
        raise EdgeformerError(f"image_size {height}x{width} is smaller than patch_size {ph}x{pw}")
    act = config.get("hidden_act", "gelu")
    if act not in HIDDEN_ACT:
        raise EdgeformerError(f"hidden_act {act!r} is not supported; supported: {sorted(HIDDEN_ACT)}")
    _normalize_names(ckpt)
    attn_width = heads * head_dim
    quantizable_options = quantizable.has_options(config)
    if quantizable_options and attn_width != d:
        raise EdgeformerError("clipped softmax / gated attention need heads * head_dim == hidden_size")
    patches = (height // ph) * (width // pw)
    tensors: dict[str, np.ndarray] = {}

    # patch embedding: Conv2d kernel (d, C, ph, pw) as a linear over flattened (C, ph, pw) patches
    prefix = "embeddings.patch_embeddings.projection"
    kernel = ckpt.get(f"{prefix}.weight", (d, channels, ph, pw))
    bias = ckpt.get(f"{prefix}.bias", (d,)) if ckpt.has(f"{prefix}.bias") else None
    emb_weights, emb_attrs = packed_linear(tensors, "embeddings.patch", kernel.reshape(d, channels * ph * pw), bias)
    tokens = patches
    if ckpt.has("embeddings.cls_token"):
        tensors["embeddings.cls"] = ckpt.get("embeddings.cls_token", (1, 1, d)).reshape(d)
        emb_weights["cls"] = "embeddings.cls"
        tokens += 1
    if ckpt.has("embeddings.position_embeddings"):
        tensors["embeddings.position"] = ckpt.get("embeddings.position_embeddings", (1, tokens, d)).reshape(tokens, d)
        emb_weights["position"] = "embeddings.position"
    if ckpt.has("embeddings.mask_token"):
        ckpt.used.add("embeddings.mask_token")  # masked image modelling only (bool_masked_pos); unused at inference
    pixels = builder.input("pixel_values", dtype="float32", shape=("batch", channels, height, width), kind="dense",
                           tokens_per_item=tokens)
    h = builder.add("patch_embedding", "embeddings", [pixels], emb_weights, {**emb_attrs, "patch_size": [ph, pw]})

    for i in range(layers):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention.attention"
        x = builder.add("layer_norm", f"{p}.layernorm_before", [h], _ln(ckpt, f"{p}.layernorm_before", d, tensors),
                        {"eps": eps})
        qkv_w = np.concatenate([ckpt.get(f"{a}.{n}.weight", (attn_width, d)) for n in ("query", "key", "value")])
        qkv_b = np.concatenate([ckpt.get(f"{a}.{n}.bias", (attn_width,)) for n in ("query", "key", "value")]) \
            if ckpt.has(f"{a}.query.bias") else None  # (3 * attn_width,)
        attn_attrs = {"kind": "softmax", "num_heads": heads, "head_dim": head_dim, "scale": 1.0 / math.sqrt(head_dim)}
        attn_weights, gated = {}, False
        if quantizable_options:  # clipped softmax / gated attention (converters/quantizable.py)
            qkv_w, qkv_b, attn_weights, attn_attrs, gated = quantizable.bert_attention(
                config, ckpt, a, heads, head_dim, qkv_w, qkv_b, tensors, attn_attrs)
        qkv = builder.add("linear", f"{p}.attention.qkv", [x], *packed_linear(tensors, f"{p}.attention.qkv", qkv_w, qkv_b))
        ctx = builder.add("attention", f"{p}.attention", [qkv, x] if gated else [qkv], attn_weights, attn_attrs)
        h = builder.add("linear", f"{p}.attention.output.dense", [ctx, h],
                        *_linear(ckpt, f"{p}.attention.output.dense", (d, attn_width), tensors))
        x = builder.add("layer_norm", f"{p}.layernorm_after", [h], _ln(ckpt, f"{p}.layernorm_after", d, tensors),
                        {"eps": eps})
        up_weights, up_attrs = _linear(ckpt, f"{p}.intermediate.dense", (ffn, d), tensors)
        f = builder.add("linear", f"{p}.intermediate.dense", [x], up_weights, {**up_attrs, "activation": HIDDEN_ACT[act]})
        h = builder.add("linear", f"{p}.output.dense", [f, h], *_linear(ckpt, f"{p}.output.dense", (d, ffn), tensors))
    h = builder.add("layer_norm", "layernorm", [h], _ln(ckpt, "layernorm", d, tensors), {"eps": eps},
                    output="last_hidden_state")
    builder.output("last_hidden_state")

    heads_out = []
    if ckpt.has("classifier.weight"):  # ViTForImageClassification (num_labels > 0)
        heads_out.append("logits")
    if ckpt.has("pooler.dense.weight"):  # ViTModel(add_pooling_layer=True)
        heads_out.append("pooler_output")
    cls = builder.add("pool", "pool_cls", [h], attrs={"mode": "cls"}) if heads_out else None
    if "logits" in heads_out:
        n_labels = ckpt.arrays["classifier.weight"].shape[0]
        builder.add("linear", "classifier", [cls], *_linear(ckpt, "classifier", (n_labels, d), tensors),
                    output="logits")
        builder.output("logits")
    if "pooler_output" in heads_out:
        pooler_act = config.get("pooler_act", "tanh")
        if pooler_act not in POOLER_ACT:
            raise EdgeformerError(f"pooler_act {pooler_act!r} is not supported; supported: {sorted(POOLER_ACT)}")
        n_out = ckpt.arrays["pooler.dense.weight"].shape[0]
        dense = builder.add("linear", "pooler.dense", [cls], *_linear(ckpt, "pooler.dense", (n_out, d), tensors))
        builder.add("activation", "pooler.activation", [dense], attrs={"function": POOLER_ACT[pooler_act]},
                    output="pooler_output")
        builder.output("pooler_output")
    return tensors


def _metadata(config: dict) -> dict[str, str]:
    """Image geometry, and the class names when config.json has them (id2label)."""
    classifier = any("ImageClassification" in str(a) for a in config.get("architectures") or [])
    meta = {"task": "image_classification" if classifier else "image_features",
            "image_size": json.dumps(list(_pair(config.get("image_size", 224), "image_size"))),
            "patch_size": json.dumps(list(_pair(config.get("patch_size", 16), "patch_size"))),
            "num_channels": str(int(config.get("num_channels", 3)))}
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        labels = {int(k): str(v) for k, v in id2label.items()}
        meta["id2label"] = json.dumps({str(k): labels[k] for k in sorted(labels)})
        if sorted(labels) == list(range(len(labels))):
            meta["labels"] = json.dumps([labels[k] for k in range(len(labels))])
    return meta


load_vit.metadata = _metadata
