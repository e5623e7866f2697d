"""Quantizable Transformers (Bondarenko et al. 2023; seed_algorithms §3) in PyTorch and in the BERT / ViT converters.

The options live in a Hugging Face BERT or ViT config (config.json), under the official run_mlm.py flag names
(Qualcomm-AI-research/outlier-free-transformers), plus an explicit pair:

    attn_softmax     "vanilla" (default) or "clipped(GAMMA:ZETA)", e.g. "clipped(-.025:1)"
    alpha            with max_seq_length T: clipped softmax with gamma = -alpha / T, zeta = 1 (T is the
                     *training* length; the converted model keeps this gamma at every input length)
    clip_gamma       explicit gamma (<= 0), with optional clip_zeta (>= 1, default 1)
    attn_gate_type   "none" (default), "conditional_per_token" (sigmoid(G(x)) per head and token, the paper's
                     gated attention), "unconditional_per_head" (a learned scalar per head). The official
                     enum's integers 0 / 1 / 3 are accepted too; "conditional_per_head" (2, a gate averaged over
                     the tokens) is not supported.
    attn_gate_linear_all_features   true: one Linear(d_model -> H) on all of x; default: per head Linear(dh -> 1)
                     on head i's slice x[..., i*dh:(i+1)*dh]
    attn_gate_init   pi_init: gate bias initialised to logit(pi_init) (per-head Linear only, as the official code)
    fine_tuning      with attn_gate_init: the gate output is multiplied by 1 / pi_init (official fine-tuning mode)
    attn_gate_mlp, attn_gate_mlp2   MLP gates: not supported by the runtime (rejected)

Only one of attn_softmax "clipped(...)", alpha and clip_gamma may be given. Parameter names follow the official
BertSelfAttentionWithExtras: ``<layer>.attention.self.{query,key,value}.*``, per-head gate
``...self.alpha.{i}.weight`` (1, dh) / ``alpha.{i}.bias`` (1,), all-heads ``alpha.weight`` (H, d) /
``alpha.bias`` (H,), unconditional ``alpha`` (H,).

ViT checkpoints use the same names under ``<layer>.attention.attention`` (the official ViTSelfAttentionWithExtras;
``patch_vit`` builds them from a transformers ViT model).

Runtime mapping (converters/bert.py and converters/vit.py call ``bert_attention``): clipped softmax -> attention kind
``clipped_softmax`` (gamma, zeta); a conditional gate -> kind ``gated`` (gate "per_head" | "all_heads",
softmax "softmax" | "clipped", gate_scale) whose second input is the layer input (the Q/K/V linear's input: h
in BERT, layernorm_before(h) in the pre-LN ViT);
an unconditional gate sigmoid(alpha_h) is a constant per head, so it is folded into head h's rows of the
value projection and the kind stays (clipped) softmax.

Torch is imported only by the module classes (``QuantizableBertSelfAttention``, ``patch_bert``,
``QuantizableBertClassifier``), so converting a plain BERT never imports torch.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError

GATE_TYPES = {"none": "none", 0: "none", "unconditional_per_head": "unconditional", 1: "unconditional",
              "conditional_per_token": "conditional", 3: "conditional"}
UNSUPPORTED_GATES = {"conditional_per_head", 2}
_CLIPPED = re.compile(r"^clipped\(\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*\)$")
CONFIG_KEYS = ("attn_softmax", "alpha", "clip_gamma", "clip_zeta", "attn_gate_type", "attn_gate_linear_all_features",
               "attn_gate_init", "attn_gate_mlp", "attn_gate_mlp2")


def _get(config, key, default=None):
    if isinstance(config, dict):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _number(value, what) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeformerError(f"config {what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise EdgeformerError(f"config {what} must be finite, got {value!r}")
    return value


def clip_from_config(config) -> tuple[float, float] | None:
    """(gamma, zeta) of the clipped softmax the config asks for, or None for the vanilla softmax."""
    sources = []
    spec = _get(config, "attn_softmax", "vanilla")
    if not isinstance(spec, str):
        raise EdgeformerError(f"config attn_softmax must be a string, got {spec!r}")
    if spec.strip() not in ("vanilla", "softmax"):
        match = _CLIPPED.match(spec.strip())
        if not match:
            raise EdgeformerError(f"config attn_softmax {spec!r} is not supported; use \"vanilla\" or "
                                  f"\"clipped(GAMMA:ZETA)\", e.g. \"clipped(-.025:1)\"")
        try:
            sources.append(("attn_softmax", float(match.group(1)), float(match.group(2))))
        except ValueError:
            raise EdgeformerError(f"config attn_softmax {spec!r}: cannot read the numbers") from None
    if _get(config, "alpha") is not None:
        alpha = _number(_get(config, "alpha"), "alpha")
        T = _get(config, "max_seq_length")
        if T is None:
            raise EdgeformerError("config alpha (clipped softmax gamma = -alpha / T) needs max_seq_length T, the "
                                  "training sequence length")
        T = _number(T, "max_seq_length")
        if alpha < 0 or T < 1:
            raise EdgeformerError(f"config alpha must be >= 0 and max_seq_length >= 1, got {alpha}, {T}")
        sources.append(("alpha", -alpha / T, 1.0))
    if _get(config, "clip_gamma") is not None:
        sources.append(("clip_gamma", _number(_get(config, "clip_gamma"), "clip_gamma"),
                        _number(_get(config, "clip_zeta", 1.0), "clip_zeta")))
    elif _get(config, "clip_zeta") is not None:
        raise EdgeformerError("config clip_zeta needs clip_gamma")
    if len(sources) > 1:
        raise EdgeformerError(f"config sets the clipped softmax twice: {[s[0] for s in sources]}")
    if not sources:
        return None
    _, gamma, zeta = sources[0]
    if not (math.isfinite(gamma) and math.isfinite(zeta)) or gamma > 0 or zeta < 1:
        raise EdgeformerError(f"clipped softmax needs gamma <= 0 and zeta >= 1, got gamma={gamma}, zeta={zeta}")
    return float(gamma), float(zeta)


def gate_from_config(config) -> tuple[str, float, float | None]:
    """(gate: "none" | "per_head" | "all_heads" | "unconditional", gate_scale, pi_init or None)."""
    kind = _get(config, "attn_gate_type", "none")
    if kind in UNSUPPORTED_GATES:
        raise EdgeformerError("attn_gate_type conditional_per_head (a gate averaged over the tokens) is not supported")
    if isinstance(kind, bool) or kind not in GATE_TYPES:
        raise EdgeformerError(f"config attn_gate_type {kind!r} is not supported; supported: none, "
                              f"conditional_per_token, unconditional_per_head")
    for key in ("attn_gate_mlp", "attn_gate_mlp2"):
        if _get(config, key, False):
            raise EdgeformerError(f"config {key}: MLP attention gates are not supported (use the Linear gate)")
    kind = GATE_TYPES[kind]
    if kind == "conditional":
        kind = "all_heads" if _get(config, "attn_gate_linear_all_features", False) else "per_head"
    init = _get(config, "attn_gate_init")
    if init is not None:
        init = _number(init, "attn_gate_init")
        if not 0 < init < 1:
            raise EdgeformerError(f"config attn_gate_init must lie in (0, 1), got {init}")
    scale = 1.0 / init if (_get(config, "fine_tuning", False) and init is not None) else 1.0
    return kind, scale, init


def has_options(config) -> bool:
    return any(_get(config, key) is not None for key in CONFIG_KEYS)


# ---- converter side (numpy only) ---------------------------------------------------------------------------
def bert_attention(config, ckpt, prefix, heads, head_dim, qkv_w, qkv_b, tensors, attrs):
    """For converters/bert.py: the attention node of one BERT layer under Quantizable-Transformers options.

    prefix: the self-attention's checkpoint prefix (``encoder.layer.{i}.attention.self``); qkv_w (3d, d),
    qkv_b (3d,) or None: the fused projection, returned changed when an unconditional gate is folded into V;
    attrs: the plain softmax node's attributes. Returns (qkv_w, qkv_b, weights, attrs, takes_layer_input)."""
    clip = clip_from_config(config)
    gate, gate_scale, _ = gate_from_config(config)
    d = heads * head_dim
    attrs = dict(attrs)
    weights = {}
    if gate == "unconditional":
        # sigmoid(alpha_h) * (P V_h) = P (sigmoid(alpha_h) V_h): scale head h's value rows and bias
        alpha = ckpt.get(f"{prefix}.alpha", (heads,)).astype(np.float64)
        g = np.repeat(gate_scale / (1.0 + np.exp(-alpha)), head_dim)  # (d,)
        qkv_w = qkv_w.copy()
        qkv_w[2 * d :] = (qkv_w[2 * d :] * g[:, None]).astype(np.float32)
        if qkv_b is not None:
            qkv_b = qkv_b.copy()
            qkv_b[2 * d :] = (qkv_b[2 * d :] * g).astype(np.float32)
    if gate in ("per_head", "all_heads"):
        if gate == "per_head":
            w = np.concatenate([ckpt.get(f"{prefix}.alpha.{i}.weight", (1, head_dim)) for i in range(heads)])  # (H, dh)
            b = np.concatenate([ckpt.get(f"{prefix}.alpha.{i}.bias", (1,)) for i in range(heads)])  # (H,)
        else:
            w, b = ckpt.get(f"{prefix}.alpha.weight", (heads, d)), ckpt.get(f"{prefix}.alpha.bias", (heads,))
        tensors[f"{prefix}.gate.weight"], tensors[f"{prefix}.gate.bias"] = w, b
        weights = {"gate_weight": f"{prefix}.gate.weight", "gate_bias": f"{prefix}.gate.bias"}
        attrs.update(kind="gated", gate=gate, gate_scale=float(gate_scale))
        if clip is not None:
            attrs.update(softmax="clipped", gamma=clip[0], zeta=clip[1])
        return qkv_w, qkv_b, weights, attrs, True
    if clip is not None:
        attrs.update(kind="clipped_softmax", gamma=clip[0], zeta=clip[1])
    return qkv_w, qkv_b, weights, attrs, False


# ---- PyTorch reference modules -----------------------------------------------------------------------------
def clipped_softmax(scores, gamma: float, zeta: float = 1.0, dim: int = -1):
    """clip((zeta - gamma) softmax(scores) + gamma, 0, 1) (the official ``clipped_softmax``, eta = zeta)."""
    import torch

    p = torch.softmax(scores, dim=dim)
    return torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)


def _torch_modules():
    import torch
    from torch import nn

    class QuantizableBertSelfAttention(nn.Module):
        """BERT self-attention with clipped softmax and / or gated attention (official names: query, key,
        value, alpha). A drop-in for transformers' BertSelfAttention: forward(hidden_states, attention_mask,
        ...) -> (context (B, N, d), probabilities (B, H, N, N)). attention_mask: None, a (B, N) key mask
        (True / 1 = real token), a boolean mask broadcastable to (B, H, N, N), or an additive float mask."""

        def __init__(self, config, is_causal=False, layer_idx=None):
            super().__init__()
            d, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
            if d % heads:
                raise EdgeformerError(f"hidden_size {d} is not divisible by num_attention_heads {heads}")
            self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, d // heads, d
            self.is_causal = bool(is_causal)
            self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.dropout = nn.Dropout(float(_get(config, "attention_probs_dropout_prob", 0.0)))
            self.clip = clip_from_config(config)
            self.gate, self.gate_scale, init = gate_from_config(config)
            dh = d // heads
            if self.gate == "per_head":
                self.alpha = nn.ModuleList(nn.Linear(dh, 1) for _ in range(heads))
                for fc in self.alpha:
                    if init is not None:
                        nn.init.constant_(fc.bias, math.log(init / (1 - init)))  # logit(pi_init)
                    if _get(config, "fine_tuning", False):
                        nn.init.normal_(fc.weight, 0.0, 0.01)
            elif self.gate == "all_heads":
                self.alpha = nn.Linear(d, heads)
            elif self.gate == "unconditional":
                self.alpha = nn.Parameter(torch.zeros(heads))

        def _heads(self, t):
            B, N, _ = t.shape
            return t.view(B, N, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, N, dh)

        def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
            x = hidden_states  # (B, N, d)
            B, N, d = x.shape
            q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
            s = (q @ k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)  # (B, H, N, N)
            low = torch.finfo(s.dtype).min
            if attention_mask is not None:
                m = attention_mask
                if m.dim() == 2:
                    m = m.bool()[:, None, None, :]
                s = s.masked_fill(~m, low) if m.dtype == torch.bool else s + m
            if self.is_causal:
                s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=s.device).tril(), low)
            p = torch.softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)  # fp32 at least
            if self.clip is not None:
                p = torch.clamp((self.clip[1] - self.clip[0]) * p + self.clip[0], 0.0, 1.0)
            p = self.dropout(p.to(v.dtype))
            o = p @ v  # (B, H, N, dh)
            if self.gate == "unconditional":
                o = o * (self.gate_scale * torch.sigmoid(self.alpha))[None, :, None, None]
            elif self.gate == "all_heads":
                o = o * (self.gate_scale * torch.sigmoid(self.alpha(x))).transpose(1, 2)[..., None]  # (B, H, N, 1)
            elif self.gate == "per_head":
                xh = self._heads(x)  # (B, H, N, dh): head i reads x[..., i*dh:(i+1)*dh]
                z = torch.stack([fc(xh[:, i]) for i, fc in enumerate(self.alpha)], dim=1)  # (B, H, N, 1)
                o = o * (self.gate_scale * torch.sigmoid(z))
            self.last_output = o  # (B, H, N, dh) for outlier statistics
            return o.transpose(1, 2).reshape(B, N, d), p

    def patch_bert(model):
        """Replace every BertSelfAttention of a transformers BERT model by QuantizableBertSelfAttention built
        from model.config (Q/K/V weights kept); returns the model."""
        from transformers.models.bert.modeling_bert import BertSelfAttention

        config = model.config
        config._attn_implementation = "eager"  # additive float masks; our module computes attention itself
        for module in list(model.modules()):
            child = getattr(module, "self", None)
            if isinstance(child, BertSelfAttention):
                new = QuantizableBertSelfAttention(config, is_causal=getattr(child, "is_causal", False))
                new.load_state_dict(child.state_dict(), strict=False)
                module.self = new
        return model

    class QuantizableViTAttention(nn.Module):
        """A ViT layer's attention block (self-attention + output projection) with clipped softmax / gated
        attention, under the classic parameter names the official code and transformers 4 use:
        ``attention.{query,key,value,alpha}`` and ``output.dense``. A drop-in for transformers' ViTAttention
        (4.x: ViTSelfAttention + ViTSelfOutput; 5.x: q_proj, k_proj, v_proj, o_proj in one module):
        forward(hidden_states, ...) -> (output (B, N, d), probabilities (B, H, N, N)). ViT has no padding."""

        def __init__(self, config):
            super().__init__()
            d = int(_get(config, "hidden_size"))
            self.attention = QuantizableBertSelfAttention(config)
            self.output = nn.Module()
            self.output.dense = nn.Linear(d, d)

        def forward(self, hidden_states, *args, **kwargs):
            context, probs = self.attention(hidden_states)
            return self.output.dense(context), probs

    _VIT_V5_NAMES = {"q_proj.": "attention.query.", "k_proj.": "attention.key.", "v_proj.": "attention.value.",
                     "o_proj.": "output.dense."}

    def patch_vit(model):
        """Replace every ViTAttention of a transformers ViT model (ViTModel, ViTForImageClassification) by
        QuantizableViTAttention built from model.config, keeping the Q/K/V/O weights; returns the model."""
        from transformers.models.vit.modeling_vit import ViTAttention

        for module in list(model.modules()):
            child = getattr(module, "attention", None)
            if isinstance(child, ViTAttention):
                new = QuantizableViTAttention(model.config)
                state = {}
                for key, value in child.state_dict().items():
                    for old, classic in _VIT_V5_NAMES.items():
                        if key.startswith(old):
                            key = classic + key[len(old):]
                    state[key] = value
                new.load_state_dict(state, strict=False)
                module.attention = new
        return model

    class QuantizableBertClassifier(nn.Module):
        """A transformers BertModel (no pooler) with Quantizable-Transformers self-attention, masked mean
        pooling and a linear ``classifier``. config: a dict of BertConfig keys plus the options above and
        num_labels."""

        def __init__(self, config: dict):
            super().__init__()
            from transformers import BertConfig, BertModel

            config = dict(config)
            self.num_labels = int(config.pop("num_labels", 2))
            self.config = BertConfig(**config)
            self.bert = patch_bert(BertModel(self.config, add_pooling_layer=False))
            self.classifier = nn.Linear(self.config.hidden_size, self.num_labels)

        def hidden(self, input_ids, attention_mask=None):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, N, d)

        def pooled(self, input_ids, attention_mask=None):
            h = self.hidden(input_ids, attention_mask)
            if attention_mask is None:
                return h.mean(1)
            m = attention_mask[..., None].to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

        def forward(self, input_ids, attention_mask=None):
            return self.classifier(self.pooled(input_ids, attention_mask))

    return {"QuantizableBertSelfAttention": QuantizableBertSelfAttention, "patch_bert": patch_bert,
            "QuantizableBertClassifier": QuantizableBertClassifier, "QuantizableViTAttention": QuantizableViTAttention,
            "patch_vit": patch_vit}


_TORCH_NAMES = ("QuantizableBertSelfAttention", "patch_bert", "QuantizableBertClassifier", "QuantizableViTAttention",
                "patch_vit")


def __getattr__(name):
    """The torch classes are built on first use, so that importing this module (converters/bert.py does)
    never imports torch."""
    if name in _TORCH_NAMES:
        globals().update(_torch_modules())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- saving and converting ---------------------------------------------------------------------------------
def save_pretrained(model, directory):
    """A QuantizableBertClassifier as a Hugging Face directory: config.json (model_type bert + the options +
    num_labels), model.safetensors (``bert.*`` encoder, ``classifier.*``), and a sentence-transformers mean
    Pooling module, so that ``edgeformer convert DIR`` gives last_hidden_state and the pooled
    ``sentence_embedding`` (logits = sentence_embedding @ classifier.weight.T + classifier.bias)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "1_Pooling").mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.update(model_type="bert", num_labels=model.num_labels)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return directory


def convert(model, out, **convert_kwargs):
    """QuantizableBertClassifier -> edgeformer model file (via save_pretrained and convert_hf_directory, which
    takes quantize=..., calib=... and the other options). Returns (path, classifier weight (C, d), bias (C,))."""
    import tempfile

    from converters.hf import convert_hf_directory

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        path = convert_hf_directory(tmp, out, **convert_kwargs)
    w = model.classifier.weight.detach().numpy().astype(np.float32)
    b = model.classifier.bias.detach().numpy().astype(np.float32)
    return Path(path), w, b
