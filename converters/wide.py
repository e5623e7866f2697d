"""Byte-level transformer classifiers — the wide single-layer family of "Wide Attention" and its deep
counterparts — as a PyTorch reference module, and their loader into edgeformer's coarse ops.

One family, one config: ``num_layers`` x ``heads_per_layer`` heads; every layer projects the model
width ``hidden_size`` to ``attention_size`` = heads_per_layer x head_dim for each of Q, K and V
(head_dim = attention_size / heads_per_layer), so that, as in the paper's setting (the Long Range
Arena code's ``qkv_dim``), a deep model and a wide one with the same total heads share every other
hyper-parameter: a 1 x 24 model has the attention width of one 6 x 4 layer, split into 24 narrow heads.

Architecture (post-LN, BERT-like): x = byte_embedding[b] + sinusoid[t]; LayerNorm; per layer
(qkv linear -> softmax attention with padding mask -> output linear + residual -> LayerNorm ->
up linear + GELU(erf) -> down linear + residual -> LayerNorm); mean over valid tokens; linear
classifier -> logits. The sinusoidal position table is fixed (not a parameter), so a model trained
on short windows runs on files of any length up to ``max_positions``.

A checkpoint directory is ``config.json`` (``"model_type": "byte_classifier"``) + ``model.safetensors``
with this module's state-dict names; ``edgeformer convert DIR -o model.edgeformer`` (or
:func:`write_edgeformer`) turns it into a model file whose metadata carries the label names.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from converters.registry import register_loader
from edgeformer.errors import EdgeformerError

MODEL_TYPE = "byte_classifier"


@dataclass
class ByteClassifierConfig:
    num_layers: int
    heads_per_layer: int
    attention_size: int
    hidden_size: int
    ffn_size: int
    labels: list = field(default_factory=list)
    max_positions: int = 4096
    context_bytes: int = 256  # the window length the model was trained on: classify this many bytes by default
    vocab_size: int = 256
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.attention_size // self.heads_per_layer

    def check(self) -> None:
        for name in ("num_layers", "heads_per_layer", "attention_size", "hidden_size", "ffn_size", "max_positions",
                     "context_bytes", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EdgeformerError(f"byte_classifier config: {name} must be an integer >= 1, got {value!r}")
        if self.attention_size % self.heads_per_layer:
            raise EdgeformerError("byte_classifier config: attention_size must be a multiple of heads_per_layer")
        if len(self.labels) < 2 or not all(isinstance(x, str) for x in self.labels):
            raise EdgeformerError("byte_classifier config: labels must list at least two class names")

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_json(cls, config: dict) -> "ByteClassifierConfig":
        known = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        try:
            cfg = cls(**known)
        except TypeError as e:
            raise EdgeformerError(f"byte_classifier config: {e}") from None
        cfg.check()
        return cfg


def sinusoid_table(positions: int, width: int) -> np.ndarray:
    """The Transformer's fixed table: sin on even features, cos on odd, wavelengths 2pi..10000*2pi."""
    pos = np.arange(positions, dtype=np.float64)[:, None]  # (P, 1)
    rate = np.exp(-math.log(10000.0) * (np.arange(0, width, 2, dtype=np.float64) / width))  # (ceil(w/2),)
    table = np.zeros((positions, width), dtype=np.float64)  # (P, w)
    table[:, 0::2] = np.sin(pos * rate)
    table[:, 1::2] = np.cos(pos * rate[: width // 2])
    return table.astype(np.float32)


def module(config: ByteClassifierConfig):
    """The PyTorch reference module (imports torch lazily: the runtime never needs it)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Layer(nn.Module):
        def __init__(self, c: ByteClassifierConfig):
            super().__init__()
            self.heads, self.head_dim = c.heads_per_layer, c.head_dim
            self.qkv = nn.Linear(c.hidden_size, 3 * c.attention_size)
            self.out = nn.Linear(c.attention_size, c.hidden_size)
            self.ln1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.up = nn.Linear(c.hidden_size, c.ffn_size)
            self.down = nn.Linear(c.ffn_size, c.hidden_size)
            self.ln2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

        def forward(self, x, keep):  # x (B, S, d); keep (B, 1, 1, S) bool, True = attend
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, S, dh)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, S, dh)
            a = a.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)  # (B, S, H*dh)
            x = self.ln1(x + self.out(a))
            return self.ln2(x + self.down(F.gelu(self.up(x))))

    class ByteClassifier(nn.Module):
        def __init__(self, c: ByteClassifierConfig):
            super().__init__()
            self.config = c
            self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
            self.register_buffer("position", torch.from_numpy(sinusoid_table(c.max_positions, c.hidden_size)),
                                 persistent=False)
            self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
            self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
            self.classifier = nn.Linear(c.hidden_size, len(c.labels))

        def forward(self, input_ids, attention_mask):  # (B, S) int64, (B, S) 0/1
            s = input_ids.shape[1]
            x = self.ln(self.embed(input_ids) + self.position[:s])  # (B, S, d)
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
            for layer in self.layers:
                x = layer(x, keep)
            m = attention_mask.to(x.dtype)[:, :, None]  # (B, S, 1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
            return self.classifier(pooled)  # (B, labels)

    return ByteClassifier(config)


def save_directory(model, directory) -> Path:
    """Write config.json + model.safetensors (the module's state dict, fp32) into ``directory``."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_json(), indent=1))
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    return directory


@register_loader(MODEL_TYPE)
def load_byte_classifier(config: dict, ckpt, builder, *, quantize=None) -> dict[str, np.ndarray]:
    """Coarse ops of a byte classifier: embedding, layer_norm, per layer 5 linears + attention, pool, linear."""
    from converters.bert import packed_linear

    if quantize is not None:
        raise EdgeformerError("byte_classifier: quantized conversion is not supported yet")
    c = ByteClassifierConfig.from_json(config)
    d, a, f = c.hidden_size, c.attention_size, c.ffn_size
    tensors: dict[str, np.ndarray] = {}

    def linear(name, src, inputs, shape, **attrs):
        w = ckpt.get(f"{src}.weight", shape)
        b = ckpt.get(f"{src}.bias", (shape[0],))
        weights, base = packed_linear(tensors, name, w, b)
        return builder.add("linear", name, inputs, weights, {**base, **attrs})

    def layer_norm(name, src, inputs):
        tensors[f"{name}.weight"] = ckpt.get(f"{src}.weight", (d,))
        tensors[f"{name}.bias"] = ckpt.get(f"{src}.bias", (d,))
        return builder.add("layer_norm", name, inputs, {"gamma": f"{name}.weight", "beta": f"{name}.bias"},
                           {"eps": c.layer_norm_eps})

    ids = builder.input("input_ids")
    builder.input("attention_mask", optional=True)
    tensors["embed.word"] = ckpt.get("embed.weight", (c.vocab_size, d))
    tensors["embed.position"] = sinusoid_table(c.max_positions, d)
    h = builder.add("embedding", "embed", [ids], {"word": "embed.word", "position": "embed.position"})
    h = layer_norm("ln", "ln", [h])
    for i in range(c.num_layers):
        p = f"layers.{i}"
        qkv = linear(f"{p}.qkv", f"{p}.qkv", [h], (3 * a, d))
        ctx = builder.add("attention", f"{p}.attention", [qkv], attrs={
            "kind": "softmax", "num_heads": c.heads_per_layer, "head_dim": c.head_dim,
            "scale": 1.0 / math.sqrt(c.head_dim)})
        h1 = layer_norm(f"{p}.ln1", f"{p}.ln1", [linear(f"{p}.out", f"{p}.out", [ctx, h], (d, a))])
        up = linear(f"{p}.up", f"{p}.up", [h1], (f, d), activation="gelu")
        h = layer_norm(f"{p}.ln2", f"{p}.ln2", [linear(f"{p}.down", f"{p}.down", [up, h1], (d, f))])
    pooled = builder.add("pool", "pool", [h], attrs={"mode": "mean"})
    w = ckpt.get("classifier.weight", (len(c.labels), d))
    weights, base = packed_linear(tensors, "classifier", w, ckpt.get("classifier.bias", (len(c.labels),)))
    builder.add("linear", "classifier", [pooled], weights, base, output="logits")
    builder.output("logits")
    return tensors


def write_edgeformer(directory, out) -> Path:
    """Convert a checkpoint directory; the file's metadata carries the labels and the position limit."""
    from converters.hf import convert_hf_directory

    return convert_hf_directory(directory, out)


def _metadata(config: dict) -> dict[str, str]:
    c = ByteClassifierConfig.from_json(config)
    return {"task": "byte_classification", "labels": json.dumps(c.labels), "max_length": str(c.max_positions),
            "context_bytes": str(min(c.context_bytes, c.max_positions))}


load_byte_classifier.metadata = _metadata
