"""GPT-2-style decoders (GPT2Model, and the transformer of GPT2LMHeadModel) into coarse ops.

Full-sequence forward only (no KV cache yet); the output is last_hidden_state (after ln_f).

GPT-2 blocks are pre-LN:  a = x + c_proj(attn(ln_1(x))),  y = a + mlp.c_proj(act(mlp.c_fc(ln_2(a)))).
The residual of each sub-block is the block's *input*, so it is the second input of the sub-block's
output linear (``linear(ctx, x)``), and the layer norms take no residual. GPT-2's Conv1D stores weights
as (in, out): they are transposed to PyTorch's (out, in) before packing. c_attn is already Q|K|V, which
is the attention op's column order. Positions are learned (wpe) and HF GPT-2 numbers them 0..S-1 in the
padded row (it does not derive them from the mask), which is exactly the runtime's position of a token
(its index in the padded row), for right and left padding alike; the causal attention over the packed
valid tokens of a sequence equals HF's causal + padding mask.
"""
from __future__ import annotations

import numpy as np

from converters.bert import HIDDEN_ACT, packed_linear
from converters.registry import register_loader
from edgeformer.errors import EdgeformerError


def _conv1d(ckpt, name, n_in, n_out, tensors, store):
    """A GPT-2 Conv1D (weight (in, out)) as a linear node's (weights, attrs)."""
    w = np.ascontiguousarray(ckpt.get(f"{name}.weight", (n_in, n_out)).T)  # (out, in)
    b = ckpt.get(f"{name}.bias", (n_out,)) if ckpt.has(f"{name}.bias") else None
    return store(tensors, name, w, b)


def _ln(ckpt, name, width, tensors):
    tensors[f"{name}.weight"] = ckpt.get(f"{name}.weight", (width,))
    tensors[f"{name}.bias"] = ckpt.get(f"{name}.bias", (width,))
    return {"gamma": f"{name}.weight", "beta": f"{name}.bias"}


@register_loader("gpt2")
def load_gpt2(config: dict, ckpt, builder, *, quantize=None) -> dict[str, np.ndarray]:
    """quantize: None (fp32) or a converters.quantize.LinearPolicy deciding each block linear's format."""
    store = packed_linear if quantize is None else quantize.linear
    d = int(config.get("n_embd", config.get("hidden_size", 0)))
    heads = int(config.get("n_head", config.get("num_attention_heads", 0)))
    layers = int(config.get("n_layer", config.get("num_hidden_layers", 0)))
    ffn = config.get("n_inner") or 4 * d
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    if d < 1 or heads < 1 or d % heads:
        raise EdgeformerError(f"n_embd {d} is not a positive multiple of n_head {heads}")
    if layers < 1:
        raise EdgeformerError("n_layer must be >= 1")
    if config.get("add_cross_attention"):
        raise EdgeformerError("GPT-2 with cross attention (add_cross_attention) is not supported")
    act = config.get("activation_function", "gelu_new")
    if act not in HIDDEN_ACT:
        raise EdgeformerError(f"activation_function {act!r} is not supported; supported: {sorted(HIDDEN_ACT)}")
    head_dim = d // heads
    scale = head_dim ** -0.5 if config.get("scale_attn_weights", True) else 1.0
    by_layer = bool(config.get("scale_attn_by_inverse_layer_idx", False))
    # hf.py records max_length from max_position_embeddings, which GPT-2's config.json calls n_positions
    if "max_position_embeddings" not in config and config.get("n_positions"):
        config["max_position_embeddings"] = int(config["n_positions"])

    ckpt.strip_prefix("transformer.", "wte.weight")  # GPT2LMHeadModel and other task heads
    tensors: dict[str, np.ndarray] = {}
    ids = builder.input("input_ids")
    builder.input("attention_mask", optional=True)
    tensors["wte.weight"] = ckpt.get("wte.weight")
    if tensors["wte.weight"].ndim != 2 or tensors["wte.weight"].shape[1] != d:
        raise EdgeformerError(f"wte.weight has shape {tensors['wte.weight'].shape}, expected (vocab, {d})")
    tensors["wpe.weight"] = ckpt.get("wpe.weight")
    if tensors["wpe.weight"].ndim != 2 or tensors["wpe.weight"].shape[1] != d:
        raise EdgeformerError(f"wpe.weight has shape {tensors['wpe.weight'].shape}, expected (positions, {d})")
    h = builder.add("embedding", "embeddings", [ids], {"word": "wte.weight", "position": "wpe.weight"})
    for i in range(layers):
        p = f"h.{i}"
        x = builder.add("layer_norm", f"{p}.ln_1", [h], _ln(ckpt, f"{p}.ln_1", d, tensors), {"eps": eps})
        qkv = builder.add("linear", f"{p}.attn.c_attn", [x],
                          *_conv1d(ckpt, f"{p}.attn.c_attn", d, 3 * d, tensors, store))
        ctx = builder.add("attention", f"{p}.attn", [qkv], attrs={
            "kind": "softmax", "num_heads": heads, "head_dim": head_dim, "causal": True,
            "scale": float(scale / (i + 1) if by_layer else scale)})
        a = builder.add("linear", f"{p}.attn.c_proj", [ctx, h],
                        *_conv1d(ckpt, f"{p}.attn.c_proj", d, d, tensors, store))
        x = builder.add("layer_norm", f"{p}.ln_2", [a], _ln(ckpt, f"{p}.ln_2", d, tensors), {"eps": eps})
        up_weights, up_attrs = _conv1d(ckpt, f"{p}.mlp.c_fc", d, ffn, tensors, store)
        f = builder.add("linear", f"{p}.mlp.c_fc", [x], up_weights, {**up_attrs, "activation": HIDDEN_ACT[act]})
        h = builder.add("linear", f"{p}.mlp.c_proj", [f, a],
                        *_conv1d(ckpt, f"{p}.mlp.c_proj", ffn, d, tensors, store))
    builder.add("layer_norm", "ln_f", [h], _ln(ckpt, "ln_f", d, tensors), {"eps": eps}, output="last_hidden_state")
    builder.output("last_hidden_state")
    return tensors
