"""MemoryFormer (seed_algorithms.md §2): PyTorch reference modules for training, and the loader that turns
their state dict, or an official GPT-NeoX-style checkpoint, into an edgeformer graph.

PyTorch modules (need torch; names follow the official code so that state dicts match §2.7):
    MemoryLayer(in_features, out_features, num_tables, code_length, temperature=1, weight_mode, zero_bit)
        .tables (K*2^tau, N), .bias (N,); forward = sign hash + weights + F.embedding_bag(mode="sum")
    RMSNorm(d, eps=1e-8)               GPT-NeoX: x / (rms(x) + eps) * scale
    MemoryAttention                    query_proj / key_proj / value_proj sharing ONE hash of the input,
                                       rotary on the first rotary_pct of each head, causal softmax, NO
                                       output projection
    MemoryFormerLayer                  input_layernorm, attention, post_attention_layernorm,
                                       mlp = [MemoryLayer(d -> K(tau+2)), LayerNorm, MemoryLayer(K(tau+2) -> d,
                                       code_length tau+2)]
    MemoryFormerLM(config)             word_embeddings, layers.i, norm, final_linear (untied; tied if absent)

Graph of one layer (the MemoryFormer block of §2.4):
    h   = rms_norm(x)                                   input_layernorm.scale
    qkv = linear[lut](h)    tables = [T_Q | T_K | T_V] concatenated along the output axis: one hash, one
                            gather of 3d columns (the hash is shared by Q, K and V in the official code)
    qkv = rotary(qkv)       rotary_dims = int(head_dim * rotary_pct) (skipped when 0)
    a   = attention(qkv)    softmax, causal, scale 1/sqrt(head_dim)
    x1  = add(a, x)         no attention output projection (del_dense)
    u   = linear[lut](rms_norm(x1))                     mlp.0: K tables, tau bits, d -> K(tau+2)
    u   = layer_norm(u)                                 mlp.1
    x   = linear[lut](u, residual=x1)                   mlp.2: K tables, tau+2 bits, K(tau+2) -> d
then rms_norm (norm.scale) -> "last_hidden_state", fp32 linear (final_linear.weight) -> "logits".

Accepted state-dict names: this module's (``word_embeddings.weight``, ``layers.{i}.<layer>``, ``norm.scale``,
``final_linear.weight``), or GPT-NeoX pipeline names ``[sequential.]{n}.<...>``, where the pipe index
holding ``word_embeddings.weight`` is the embedding, those holding ``input_layernorm.scale`` are the layers
in increasing order, and those holding ``norm.scale`` / ``final_linear.weight`` the final norm and head.
Per layer (§2.7): input_layernorm.scale, attention.{query,key,value}_proj.{tables,bias},
post_attention_layernorm.scale, mlp.0.{tables,bias}, mlp.1.{weight,bias}, mlp.2.{tables,bias}.
Hash projections (remove_projection: false) are not supported (no released config uses them).

Config keys (config.json with ``"model_type": "memoryformer"`` for ``edgeformer convert``): vocab_size,
hidden_size, num_layers, num_heads, num_tables, code_length, extra_bits (2), rotary_pct (0.25),
rotary_base (10000), rms_norm_epsilon (1e-8), layer_norm_epsilon (1e-5), temperature (1), weight_mode
("code_l1_times_prob"), zero_bit (1), table_dtype ("fp32" | "fp16" | "int8", the stored table format).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from converters.registry import register_loader
from edgeformer.errors import EdgeformerError



@dataclass
class MemoryFormerConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_tables: int = 16  # K; hidden_size must equal num_tables * code_length
    code_length: int = 8  # tau
    extra_bits: int = 2  # FFN: d -> K * (tau + extra_bits) -> d with tau + extra_bits bit codes
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    rms_norm_epsilon: float = 1e-8
    layer_norm_epsilon: float = 1e-5
    temperature: float = 1.0
    weight_mode: str = "code_l1_times_prob"
    zero_bit: int = 1

    @classmethod
    def from_dict(cls, config: dict) -> "MemoryFormerConfig":
        known = {k: config[k] for k in asdict(cls()) if k in config}
        aliases = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "ffn_num_table": "num_tables",
                   "n_embd": "hidden_size"}
        for alias, name in aliases.items():
            if alias in config and name not in known:
                known[name] = config[alias]
        cfg = cls(**known)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return {"model_type": "memoryformer", **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        rot = int(self.head_dim * self.rotary_pct)
        return rot - rot % 2

    @property
    def ffn_width(self) -> int:
        return self.num_tables * (self.code_length + self.extra_bits)

    def check(self) -> None:
        d, h = self.hidden_size, self.num_heads
        if d < 1 or h < 1 or d % h:
            raise EdgeformerError(f"hidden_size {d} is not a positive multiple of num_heads {h}")
        if self.num_tables * self.code_length != d:
            raise EdgeformerError(f"hidden_size {d} must equal num_tables * code_length = "
                                  f"{self.num_tables} * {self.code_length} (remove_projection: true)")
        if not 1 <= self.code_length + self.extra_bits <= 16 or self.extra_bits < 0:
            raise EdgeformerError("code_length + extra_bits must be in [1, 16], extra_bits >= 0")
        if self.num_layers < 1 or self.vocab_size < 1:
            raise EdgeformerError("num_layers and vocab_size must be >= 1")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise EdgeformerError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.weight_mode not in ("code_l1_times_prob", "paper_prob"):
            raise EdgeformerError(f"weight_mode must be 'code_l1_times_prob' or 'paper_prob', got {self.weight_mode!r}")
        if self.zero_bit not in (0, 1):
            raise EdgeformerError(f"zero_bit must be 0 or 1, got {self.zero_bit!r}")


# ---------------------------------------------------------------------------------------------------
# PyTorch reference modules
# ---------------------------------------------------------------------------------------------------
_TORCH_NAMES = ("MemoryLayer", "RMSNorm", "rotate_half", "rotary_cos_sin", "apply_rotary", "MemoryAttention",
                "MemoryFormerLayer", "MemoryFormerLM")


def __getattr__(name):
    """The torch modules are defined on first use (PEP 562), so that the loader (numpy only) and the CLI that
    registers it never import torch."""
    if name in _TORCH_NAMES:
        _define_torch_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_torch_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MemoryLayer(nn.Module):
        """y = sum_k w_k T[k*2^tau + code_k] + bias (seed_algorithms §2.2; official weights by default)."""

        def __init__(self, in_features, out_features, num_tables, code_length, temperature=1.0,
                     weight_mode="code_l1_times_prob", zero_bit=1, bias=True, init_std=None):
            super().__init__()
            if in_features != num_tables * code_length:
                raise ValueError(f"in_features {in_features} != num_tables * code_length "
                                 f"{num_tables} * {code_length}")
            if weight_mode not in ("code_l1_times_prob", "paper_prob"):
                raise ValueError(f"unknown weight_mode {weight_mode!r}")
            self.in_features, self.out_features = in_features, out_features
            self.num_tables, self.code_length = num_tables, code_length
            self.temperature, self.weight_mode, self.zero_bit = float(temperature), weight_mode, int(zero_bit)
            std = init_std if init_std is not None else num_tables ** -0.5
            self.tables = nn.Parameter(torch.randn(num_tables << code_length, out_features) * std)
            self.bias = nn.Parameter(0.001 * torch.randn(out_features)) if bias else None
            self.register_buffer("powers", 2 ** torch.arange(code_length - 1, -1, -1), persistent=False)
            self.register_buffer("offsets", torch.arange(num_tables) << code_length, persistent=False)

        def encode(self, x):
            """x (..., K*tau) -> (row indices (N, K) into tables, weights (N, K))."""
            z = x.reshape(-1, self.num_tables, self.code_length)
            bits = (z >= 0) if self.zero_bit else (z > 0)
            codes = (bits.long() * self.powers).sum(-1)  # first element = MSB
            a = z.abs()
            w = torch.sigmoid(2.0 * a / self.temperature).prod(-1)
            if self.weight_mode == "code_l1_times_prob":
                w = a.sum(-1) * w
            return codes + self.offsets, w

        def gather(self, idx, w, lead_shape):
            y = F.embedding_bag(idx, self.tables, per_sample_weights=w, mode="sum")
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*lead_shape, self.out_features)

        def forward(self, x):
            idx, w = self.encode(x)
            return self.gather(idx, w, x.shape[:-1])

    class RMSNorm(nn.Module):
        """GPT-NeoX RMSNorm: x / (||x||_2 / sqrt(d) + eps) * scale."""

        def __init__(self, d, eps=1e-8):
            super().__init__()
            self.eps = eps
            self.scale = nn.Parameter(torch.ones(d))

        def forward(self, x):
            rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
            return self.scale * (x / (rms + self.eps))

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def rotary_cos_sin(seq_len, rot, base, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, device=device).float() / rot))
        freqs = torch.einsum("i,j->ij", torch.arange(seq_len, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, rot)
        return emb.cos(), emb.sin()

    def apply_rotary(x, rot, base):
        """x (B, H, S, dh): GPT-NeoX rotary on the first rot dims of each head."""
        if rot == 0:
            return x
        cos, sin = rotary_cos_sin(x.shape[2], rot, base, x.device)
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)

    class MemoryAttention(nn.Module):
        def __init__(self, cfg: MemoryFormerConfig):
            super().__init__()
            d, k, tau = cfg.hidden_size, cfg.num_tables, cfg.code_length
            kw = dict(temperature=cfg.temperature, weight_mode=cfg.weight_mode, zero_bit=cfg.zero_bit)
            self.query_proj = MemoryLayer(d, d, k, tau, **kw)
            self.key_proj = MemoryLayer(d, d, k, tau, **kw)
            self.value_proj = MemoryLayer(d, d, k, tau, **kw)
            self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
            self.rot, self.base = cfg.rotary_dims, cfg.rotary_base

        def forward(self, x):  # x (B, S, d)
            b, s, d = x.shape
            idx, w = self.query_proj.encode(x)  # ONE hash shared by Q, K and V
            q, k, v = (m.gather(idx, w, x.shape[:-1]).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                       for m in (self.query_proj, self.key_proj, self.value_proj))
            q, k = apply_rotary(q, self.rot, self.base), apply_rotary(k, self.rot, self.base)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return a.transpose(1, 2).reshape(b, s, d)  # no output projection

    class MemoryFormerLayer(nn.Module):
        def __init__(self, cfg: MemoryFormerConfig):
            super().__init__()
            d, k, tau, wide = cfg.hidden_size, cfg.num_tables, cfg.code_length, cfg.ffn_width
            kw = dict(temperature=cfg.temperature, weight_mode=cfg.weight_mode, zero_bit=cfg.zero_bit)
            self.input_layernorm = RMSNorm(d, cfg.rms_norm_epsilon)
            self.attention = MemoryAttention(cfg)
            self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_epsilon)
            self.mlp = nn.Sequential(MemoryLayer(d, wide, k, tau, **kw),
                                     nn.LayerNorm(wide, eps=cfg.layer_norm_epsilon),
                                     MemoryLayer(wide, d, k, tau + cfg.extra_bits, **kw))

        def forward(self, x):
            x1 = self.attention(self.input_layernorm(x)) + x
            return self.mlp(self.post_attention_layernorm(x1)) + x1

    class MemoryFormerLM(nn.Module):
        """Causal LM: embeddings -> MemoryFormer layers -> RMSNorm -> untied LM head."""

        def __init__(self, cfg: MemoryFormerConfig):
            super().__init__()
            cfg.check()
            self.config = cfg
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            nn.init.normal_(self.word_embeddings.weight, std=1.0)
            self.layers = nn.ModuleList(MemoryFormerLayer(cfg) for _ in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_epsilon)
            self.final_linear = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

        def hidden(self, ids):
            x = self.word_embeddings(ids)
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

        def forward(self, ids):
            return self.final_linear(self.hidden(ids))

    scope = locals()
    globals().update({name: scope[name] for name in _TORCH_NAMES})


# ---------------------------------------------------------------------------------------------------
# state dict -> edgeformer graph
# ---------------------------------------------------------------------------------------------------
_LAYER_KEYS = ("input_layernorm.scale", "post_attention_layernorm.scale")


def canonical_state_dict(arrays: dict, num_layers: int) -> dict[str, np.ndarray]:
    """Rename GPT-NeoX pipeline names (``[sequential.]{n}.<name>``) to this module's names; others pass."""
    if "word_embeddings.weight" in arrays:
        return dict(arrays)
    pipe = {}
    for name, value in arrays.items():
        m = re.fullmatch(r"(?:sequential\.)?(\d+)\.(.+)", name)
        if m is None:
            raise EdgeformerError(f"unrecognised MemoryFormer tensor name {name!r}")
        pipe.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = {}
    layer_ids = sorted(n for n, t in pipe.items() if "input_layernorm.scale" in t)
    if len(layer_ids) != num_layers:
        raise EdgeformerError(f"checkpoint has {len(layer_ids)} transformer layers, config says {num_layers}")
    for n, tensors in pipe.items():
        if n in layer_ids:
            prefix = f"layers.{layer_ids.index(n)}."
        elif "word_embeddings.weight" in tensors or "norm.scale" in tensors or "final_linear.weight" in tensors:
            prefix = ""
        else:
            raise EdgeformerError(f"pipeline stage {n} holds unrecognised tensors {sorted(tensors)}")
        for name, value in tensors.items():
            out[prefix + name] = value
    return out


def _lut(tensors, name, tables, bias, num_tables, code_length, cfg, table_dtype):
    from edgeformer.functional.memory_layer import compact_tables

    stored, scale = compact_tables(tables, table_dtype)
    tensors[f"{name}.tables"] = stored
    weights = {"tables": f"{name}.tables", "bias": f"{name}.bias"}
    tensors[f"{name}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
    if scale is not None:
        tensors[f"{name}.table_scale"] = scale
        weights["table_scale"] = f"{name}.table_scale"
    attrs = {"format": "lut", "encoder": "sign", "table_dtype": table_dtype, "num_tables": num_tables,
             "code_length": code_length, "weight_mode": cfg.weight_mode, "temperature": float(cfg.temperature),
             "zero_bit": int(cfg.zero_bit)}
    return weights, attrs


@register_loader("memoryformer")
def load_memoryformer(config: dict, ckpt, builder, *, quantize=None) -> dict[str, np.ndarray]:
    """config: a MemoryFormerConfig dict (+ optional "table_dtype"); ckpt: converters.checkpoint.Checkpoint."""
    if quantize is not None:
        raise EdgeformerError("--quantize does not apply to MemoryFormer; set table_dtype (fp16 / int8) instead")
    cfg = MemoryFormerConfig.from_dict(config)
    table_dtype = config.get("table_dtype", "fp32")
    if table_dtype not in ("fp32", "fp16", "int8"):
        raise EdgeformerError(f"table_dtype must be fp32, fp16 or int8, got {table_dtype!r}")
    ckpt.arrays = canonical_state_dict(ckpt.arrays, cfg.num_layers)
    d, k, tau, wide, v = cfg.hidden_size, cfg.num_tables, cfg.code_length, cfg.ffn_width, cfg.vocab_size
    tau2 = tau + cfg.extra_bits
    tensors: dict[str, np.ndarray] = {}
    ids = builder.input("input_ids")
    builder.input("attention_mask", optional=True)
    tensors["word_embeddings.weight"] = ckpt.get("word_embeddings.weight", (v, d))
    x = builder.add("embedding", "embeddings", [ids], {"word": "word_embeddings.weight"})

    def rms(name, value, output=None):
        tensors[f"{name}.scale"] = ckpt.get(f"{name}.scale", (d,))
        return builder.add("rms_norm", name, [value], {"scale": f"{name}.scale"},
                           {"eps": float(cfg.rms_norm_epsilon), "eps_outside": True}, output=output)

    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        h = rms(f"{p}.input_layernorm", x)
        parts = [f"{p}.attention.{n}_proj" for n in ("query", "key", "value")]
        tables = np.concatenate([ckpt.get(f"{n}.tables", (k << tau, d)) for n in parts], axis=1)  # (K*2^tau, 3d)
        bias = np.concatenate([ckpt.get(f"{n}.bias", (d,)) for n in parts])
        qkv = builder.add("linear", f"{p}.attention.qkv_proj", [h],
                          *_lut(tensors, f"{p}.attention.qkv_proj", tables, bias, k, tau, cfg, table_dtype))
        if cfg.rotary_dims:
            qkv = builder.add("rotary", f"{p}.attention.rotary", [qkv], attrs={
                "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "rotary_dims": cfg.rotary_dims,
                "base": float(cfg.rotary_base)})
        a = builder.add("attention", f"{p}.attention", [qkv], attrs={
            "kind": "softmax", "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "causal": True})
        x1 = builder.add("add", f"{p}.attention.residual", [a, x])
        g = rms(f"{p}.post_attention_layernorm", x1)
        u = builder.add("linear", f"{p}.mlp.0", [g],
                        *_lut(tensors, f"{p}.mlp.0", ckpt.get(f"{p}.mlp.0.tables", (k << tau, wide)),
                              ckpt.get(f"{p}.mlp.0.bias", (wide,)), k, tau, cfg, table_dtype))
        tensors[f"{p}.mlp.1.weight"] = ckpt.get(f"{p}.mlp.1.weight", (wide,))
        tensors[f"{p}.mlp.1.bias"] = ckpt.get(f"{p}.mlp.1.bias", (wide,))
        u = builder.add("layer_norm", f"{p}.mlp.1", [u], {"gamma": f"{p}.mlp.1.weight", "beta": f"{p}.mlp.1.bias"},
                        {"eps": float(cfg.layer_norm_epsilon)})
        x = builder.add("linear", f"{p}.mlp.2", [u, x1],
                        *_lut(tensors, f"{p}.mlp.2", ckpt.get(f"{p}.mlp.2.tables", (k << tau2, d)),
                              ckpt.get(f"{p}.mlp.2.bias", (d,)), k, tau2, cfg, table_dtype))
    rms("norm", x, output="last_hidden_state")
    head = "final_linear.weight" if ckpt.has("final_linear.weight") else "word_embeddings.weight"  # tied
    tensors["final_linear.weight"] = ckpt.get(head, (v, d))
    builder.add("linear", "final_linear", ["last_hidden_state"], {"weight": "final_linear.weight"}, output="logits")
    builder.output("logits")
    builder.output("last_hidden_state")
    return tensors


def convert_memoryformer(state_dict: dict, config: dict, out, *, table_dtype: str = "fp32", name="memoryformer"):
    """Write an edgeformer model file from a state dict (torch tensors or arrays, either naming) and a config."""
    from pathlib import Path

    from converters.checkpoint import Checkpoint
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder, validate
    from edgeformer.ops import REGISTRY

    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state_dict.items()}
    cfg = dict(config)
    cfg["table_dtype"] = table_dtype
    ckpt = Checkpoint(arrays)
    builder = GraphBuilder(name)
    tensors = load_memoryformer(cfg, ckpt, builder)
    unused = sorted(set(ckpt.arrays) - ckpt.used)
    if unused:
        raise EdgeformerError(f"tensors not used by the MemoryFormer loader: {unused[:8]}")
    graph = builder.build()
    validate(graph, tensors, REGISTRY)
    metadata = {"source": "converters.memoryformer", "model_type": "memoryformer", "table_dtype": table_dtype}
    write_model(Path(out), tensors, graph.to_json(), metadata=metadata)
    return Path(out)
