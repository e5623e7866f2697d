"""EcoFormer in PyTorch: the reference attention module, KSH hash learning, a small encoder to train with,
and loaders that map such modules (or EcoFormer state dicts with the official PVTv2 naming) into an
edgeformer model file whose attention nodes use the runtime's ``binary_hash`` kind.

Parameter and buffer names follow the official code (ziplab/EcoFormer, pvt/performer.py, pvt/pvt_v2.py):

    <block>.attn.to_qk.{weight,bias}  <block>.attn.to_v.{weight,bias}  <block>.attn.proj.{weight,bias}
    <block>.attn.fast_attention.ksh.A       (H, b, m)
    <block>.attn.fast_attention.ksh.mvec    (1, H, 1, m)
    <block>.attn.fast_attention.ksh.anchor  (1, H, m, dh)
    <block>.attn.fast_attention.projection_matrix   Performer left-over, unused (kept for strict loading)
    softmax blocks (PVTv2's last stage): <block>.attn.qkv.{weight,bias}, <block>.attn.proj.*

Forward = the runtime's (docs/BINARY_HASH.md): u = x / max(|x|, 1e-12) (F.normalize; the official code
has no eps), sigma = mean squared token-anchor distance per (sequence, head) over the valid tokens,
phi = exp(-D2 / (2 sigma)) - mvec, y = phi A^T, code = +1 iff y > 0 else -1 (the official forward uses
torch.sign, 0 at y == 0; KSH's own binarisation is this one), gradient by the official straight-through
estimator (passes where |y| < 1), beta = b + 1, official formula (beta times the own value) unless
normalized=True. Padded batches take a (B, N) bool mask (True = real token); each sequence then behaves
exactly as if it were alone, as in the runtime's packed batches.

KSH (KernelSH.fit, the official ``train_hashing_weight_woeig``): targets +1 for the topk most similar keys
of each query, -1 for the topk least similar, 0 elsewhere, scaled by b; anchors = m random tokens; mvec =
mean of the features; then greedily per bit r: 100 SGD steps (lr 5e-4, momentum 0.9, Nesterov) on the
relaxation y~ = 2 sigmoid(phi a) - 1 of the loss -y_q^T S y_k / (N b), keep the new a_r only if the
*binarised* loss improved (decided per head here; the official code decides for all heads at once),
then deflate S <- S - y_q y_k^T. With y_q = y_k (shared QK) this is exactly the official objective; the
separate form serves converters/hash_fit.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeformer.errors import EdgeformerError

NORM_EPS = 1e-12
SIGMA_FLOOR = 1e-30


class BinaryQuantizer(torch.autograd.Function):
    """+1 where y > 0, else -1; backward: the official straight-through estimator (zero where |y| >= 1)."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return torch.where(y > 0, torch.ones_like(y), -torch.ones_like(y))

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (y.abs() < 1).to(grad.dtype)


def _mask4(mask, x):
    """(B, N) bool -> (B, 1, N, 1) float in x's dtype (all ones when mask is None)."""
    if mask is None:
        return torch.ones(x.shape[0], 1, x.shape[2], 1, dtype=x.dtype, device=x.device)
    return mask[:, None, :, None].to(x.dtype)


def rbf_features(u, anchor, mvec, mask=None):
    """Centred RBF features phi (B, H, N, m) of normalised rows u (B, H, N, dh).

    sigma[b, h] = mean of D2 over the valid tokens and the m anchors (official: over all N tokens)."""
    d2 = ((u.unsqueeze(-2) - anchor.unsqueeze(-3)) ** 2).sum(-1)  # (B, H, N, m)
    mk = _mask4(mask, u)  # (B, 1, N, 1)
    count = mk.sum(dim=(2, 3)).clamp(min=1.0) * anchor.shape[-2]  # (B, 1)
    sigma = ((d2 * mk).sum(dim=(2, 3)) / count).clamp(min=SIGMA_FLOOR)  # (B, H)
    return torch.exp(-d2 / (2 * sigma[..., None, None])) - mvec


class KernelSH(nn.Module):
    """Kernel-based supervised hashing with the official buffers A (H, b, m), mvec (1, H, 1, m),
    anchor (1, H, m, dh)."""

    def __init__(self, num_heads, head_dim, nbits=16, m=25, learning_rate=5e-4, momentum=0.9, iteration_n=100,
                 deflate="all"):
        super().__init__()
        if deflate not in ("all", "labelled"):
            raise ValueError("deflate must be 'all' (official) or 'labelled'")
        self.nbits, self.m, self.head_dim, self.deflate = nbits, m, head_dim, deflate
        self.learning_rate, self.momentum, self.iteration_n = learning_rate, momentum, iteration_n
        self.register_buffer("A", torch.randn(num_heads, nbits, m))
        self.register_buffer("mvec", torch.zeros(1, num_heads, 1, m))
        self.register_buffer("anchor", torch.zeros(1, num_heads, m, head_dim))

    def projection(self, u, mask=None):
        """Pre-sign values y (B, H, N, b) of normalised rows u."""
        phi = rbf_features(u, self.anchor, self.mvec, mask)
        return torch.einsum("bhnm,hkm->bhnk", phi, self.A.detach())

    def forward(self, u, mask=None):
        return BinaryQuantizer.apply(self.projection(u, mask))

    @staticmethod
    def _loss(yq, yk, S, nbits):
        """mean over (B, H) of -y_q^T S y_k / (N b); y (B, H, N), S (B, H, N, N)."""
        n = yq.shape[-1]
        return (-torch.einsum("bhn,bhnl,bhl->bh", yq, S, yk) / (n * nbits)).mean(0)  # (H,)

    @torch.no_grad()
    def fit(self, uq, targets, anchor, uk=None, mask=None, generator=None):
        """Learn mvec and A from normalised queries uq (B, H, N, dh) (keys uk, default uq), the similarity
        targets (B, H, N, N) in {-1, 0, +1} and the anchors (1, H, m, dh). Returns the final binarised loss
        per head."""
        shared = uk is None
        uk = uq if shared else uk
        self.anchor.copy_(anchor)
        self.mvec.zero_()
        mk = _mask4(mask, uq)  # (B, 1, N, 1)
        feats = [rbf_features(u, self.anchor, self.mvec, mask) for u in ((uq,) if shared else (uq, uk))]
        allf = torch.cat(feats, dim=2) if not shared else feats[0]
        allm = torch.cat([mk] * len(feats), dim=2)
        mvec = (allf * allm).sum(dim=(0, 2), keepdim=True) / allm.sum(dim=(0, 2), keepdim=True).clamp(min=1.0)
        self.mvec.copy_(mvec)
        kq = (feats[0] - mvec) * mk  # (B, H, N, m); padded tokens -> 0 features
        kk = kq if shared else (feats[1] - mvec) * mk
        S = targets * self.nbits
        labelled = (targets != 0).to(S.dtype)
        mv = mk[..., 0]  # (B, 1, N)
        loss = torch.zeros(self.A.shape[0], dtype=uq.dtype)
        for r in range(self.nbits):
            a = self.A[:, r, :].clone()  # (H, m)
            a_opt = self._optimise(kq, kk, S, a.clone())
            y_prev = [torch.where(torch.einsum("bhnm,hm->bhn", f, a) > 0, 1.0, -1.0).to(uq.dtype) * mv for f in (kq, kk)]
            y_cur = [torch.where(torch.einsum("bhnm,hm->bhn", f, a_opt) > 0, 1.0, -1.0).to(uq.dtype) * mv
                     for f in (kq, kk)]
            l_prev = self._loss(y_prev[0], y_prev[1], S, self.nbits)
            l_cur = self._loss(y_cur[0], y_cur[1], S, self.nbits)
            better = l_cur < l_prev  # (H,)
            self.A[:, r, :] = torch.where(better[:, None], a_opt, a)
            yq = torch.where(better[None, :, None], y_cur[0], y_prev[0])
            yk = torch.where(better[None, :, None], y_cur[1], y_prev[1])
            loss = torch.where(better, l_cur, l_prev)
            step = torch.einsum("bhn,bhl->bhnl", yq, yk)
            S = S - (step if self.deflate == "all" else step * labelled)
        return loss

    def _optimise(self, kq, kk, S, a):
        with torch.enable_grad():
            a = a.detach().requires_grad_()
            opt = torch.optim.SGD([a], lr=self.learning_rate, momentum=self.momentum, nesterov=True)
            for _ in range(self.iteration_n):
                yq = 2 * torch.sigmoid(torch.einsum("bhnm,hm->bhn", kq, a)) - 1
                yk = yq if kk is kq else 2 * torch.sigmoid(torch.einsum("bhnm,hm->bhn", kk, a)) - 1
                loss = self._loss(yq, yk, S, self.nbits).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return a.detach()


def topk_targets(scores, topk, mask=None):
    """KSH targets (B, H, N, N): +1 at the topk largest scores of each row, -1 at the topk smallest, over
    the valid keys only; rows of padded queries are 0."""
    B, H, N, _ = scores.shape
    k = min(topk, N // 2) if mask is None else topk
    S = torch.zeros_like(scores)
    if mask is None:
        if k < 1:
            return S
        S.scatter_(3, scores.topk(k, dim=3).indices, 1.0)
        S.scatter_(3, scores.topk(k, dim=3, largest=False).indices, -1.0)
        return S
    for bi in range(B):
        L = int(mask[bi].sum())
        kk = min(topk, L // 2)
        if kk < 1:
            continue
        idx = torch.nonzero(mask[bi]).flatten()
        sub = scores[bi][:, idx][:, :, idx]  # (H, L, L)
        t = torch.zeros_like(sub)
        t.scatter_(2, sub.topk(kk, dim=2).indices, 1.0)
        t.scatter_(2, sub.topk(kk, dim=2, largest=False).indices, -1.0)
        S[bi][:, idx[:, None], idx[None, :]] = t
    return S


def random_anchors(u, m, mask=None, generator=None):
    """(1, H, m, dh): m random valid tokens (the same positions for every head). The official code takes
    them from sample 0 of the batch; here from the whole batch."""
    B, H, N, dh = u.shape
    flat = u.permute(1, 0, 2, 3).reshape(H, B * N, dh)
    valid = torch.ones(B * N, dtype=torch.bool) if mask is None else mask.reshape(-1)
    idx = torch.nonzero(valid).flatten()
    if idx.numel() < m:
        raise EdgeformerError(f"KSH needs at least m = {m} tokens to pick anchors, got {idx.numel()}")
    pick = idx[torch.randperm(idx.numel(), generator=generator)[:m]]
    return flat[:, pick].unsqueeze(0).clone()


def linear_attention_bias(cq, ck, v, beta, normalized=False, mask=None):
    """Official ``linear_attention_bias`` (+ normalised variant, + key mask): codes (B, H, N, b), v (B, H, N, dh)."""
    mk = _mask4(mask, v)
    ckm = ck * mk
    n = mk.sum(dim=2, keepdim=True)  # (B, 1, 1, 1) valid tokens per sequence
    den = torch.einsum("bhnk,bhk->bhn", cq, ckm.sum(2)) + n[..., 0] * beta  # (B, H, N)
    context = torch.einsum("bhnk,bhne->bhke", ckm, v * mk)
    extra = beta * (v * mk).sum(2, keepdim=True) if normalized else beta * v
    return (torch.einsum("bhke,bhnk->bhne", context, cq) + extra) / den.unsqueeze(-1)


class EcoformerFastAttention(nn.Module):
    def __init__(self, num_heads, dim_heads, nbits=16, m=25, topk=10, normalized=False, beta=None):
        super().__init__()
        self.num_heads, self.dim_heads, self.topk = num_heads, dim_heads, topk
        self.normalized = normalized
        self.beta = float(nbits + 1 if beta is None else beta)
        if self.beta <= nbits:
            raise ValueError(f"beta must be > nbits = {nbits}")
        nb_features = int(dim_heads * math.log(dim_heads)) if dim_heads > 1 else 1
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_heads))  # unused (official left-over)
        self.ksh = KernelSH(num_heads, dim_heads, nbits, m)
        self.is_trained = False
        self._register_load_state_dict_pre_hook(self._loaded)

    def _loaded(self, state_dict, prefix, *args):
        if prefix + "ksh.A" in state_dict:
            self.is_trained = True  # a loaded hash is never re-learned (official: set_retrain_resume)

    def learn_hash(self, u, mask=None, k=None, targets=None, generator=None):
        """Official first-batch hash learning: targets from u u^T (or u k^T), anchors, mvec, A."""
        uk = u if k is None else k
        if targets is None:
            scores = u @ uk.transpose(-2, -1)
            targets = topk_targets(scores, self.topk, mask)
        anchor = random_anchors(torch.cat([u, uk], 2) if k is not None else u,
                                self.ksh.m, None if mask is None else (mask if k is None else torch.cat([mask, mask], 1)),
                                generator)
        loss = self.ksh.fit(u.detach(), targets, anchor, None if k is None else uk.detach(), mask, generator)
        self.is_trained = True
        return loss

    def forward(self, qk, v, mask=None):
        u = F.normalize(qk, dim=-1, eps=NORM_EPS)
        if self.training and not self.is_trained:
            self.learn_hash(u.detach(), mask)
        c = self.ksh(u, mask)
        return linear_attention_bias(c, c, v, self.beta, self.normalized, mask)


class EcoformerSelfAttention(nn.Module):
    """EcoFormer attention: shared QK projection ``to_qk``, ``to_v``, ``proj`` (official names)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, nbits=16, m=25, topk=10, normalized=False, beta=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError("dim must be divisible by num_heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.fast_attention = EcoformerFastAttention(num_heads, head_dim, nbits, m, topk, normalized, beta)
        self.to_qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t):
        B, N, C = t.shape
        return t.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        o = self.fast_attention(self._heads(self.to_qk(x)), self._heads(self.to_v(x)), mask)
        return self.proj(o.permute(0, 2, 1, 3).reshape(B, N, C))


class Attention(nn.Module):
    """PVTv2's softmax MSA (``qkv``, ``proj``), with a key mask."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
        o = attn.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block with PVTv2's names (norm1, attn, norm2, mlp.fc1/fc2); no depth-wise conv (text)."""

    def __init__(self, dim, num_heads, attn_type="ecoformer", mlp_ratio=2.0, **hash_args):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = (EcoformerSelfAttention(dim, num_heads, **hash_args) if attn_type == "ecoformer"
                     else Attention(dim, num_heads))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


DEFAULT_CONFIG = {"model_type": "ecoformer", "vocab_size": 32, "dim": 64, "num_heads": 2, "depths": [2],
                  "attn_types": ["ecoformer"], "mlp_ratio": 2.0, "max_len": 512, "num_classes": 10,
                  "pool": "mean", "nbits": 16, "m": 25, "topk": 10, "normalized": False}


class EcoEncoder(nn.Module):
    """A small token encoder in PVTv2's naming: ``embed.word``, ``embed.position``, stages of blocks
    ``block{s}.{j}`` each followed by ``norm{s}``, a pooled ``head``. attn_types per stage:
    "ecoformer" or "msa" (PVTv2-EcoFormer keeps its last stage in "msa")."""

    def __init__(self, **config):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **config}
        self.config = cfg
        dim = cfg["dim"]
        heads = cfg["num_heads"] if isinstance(cfg["num_heads"], list) else [cfg["num_heads"]] * len(cfg["depths"])
        self.embed = nn.ModuleDict({"word": nn.Embedding(cfg["vocab_size"], dim),
                                    "position": nn.Embedding(cfg["max_len"], dim)})
        hash_args = {"nbits": cfg["nbits"], "m": cfg["m"], "topk": cfg["topk"], "normalized": cfg["normalized"]}
        for s, (depth, kind, h) in enumerate(zip(cfg["depths"], cfg["attn_types"], heads), start=1):
            setattr(self, f"block{s}", nn.ModuleList(
                [Block(dim, h, kind, cfg["mlp_ratio"], **(hash_args if kind == "ecoformer" else {}))
                 for _ in range(depth)]))
            setattr(self, f"norm{s}", nn.LayerNorm(dim, eps=1e-6))
        self.head = nn.Linear(dim, cfg["num_classes"])

    def hidden(self, ids, mask=None):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed["word"](ids) + self.embed["position"](pos)[None]
        for s in range(1, len(self.config["depths"]) + 1):
            for block in getattr(self, f"block{s}"):
                x = block(x, mask)
            x = getattr(self, f"norm{s}")(x)
        return x

    def forward(self, ids, mask=None):
        x = self.hidden(ids, mask)
        if self.config["pool"] == "cls":
            pooled = x[:, 0]
        elif mask is None:
            pooled = x.mean(1)
        else:
            mf = mask[..., None].to(x.dtype)
            pooled = (x * mf).sum(1) / mf.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, EcoformerFastAttention)]


# ---- loaders: state dicts -> edgeformer graphs -----------------------------------------------------------
UNSUPPORTED_PVT_PARTS = {"patch_embed": "convolutional patch embedding", "dwconv": "depth-wise conv in the MLP",
                         ".attn.sr.": "spatial-reduction conv", ".attn.kv.": "SR attention (q / kv)"}


def hash_attention_tensors(sd, prefix, num_heads, tensors, name):
    """Map one EcoFormer attention's state dict entries (official names under ``prefix``) to the runtime's
    tensors: fused [to_qk; to_v] projection (2C, C) and the binary_hash weights. Returns (uv_weights, attn_weights)."""
    get = _getter(sd)
    wqk, wv = get(prefix + "to_qk.weight"), get(prefix + "to_v.weight")
    C = wqk.shape[1]
    if wqk.shape != (C, C) or wv.shape != (C, C) or C % num_heads:
        raise EdgeformerError(f"{prefix}: to_qk / to_v must be ({C}, {C}) with {num_heads} heads")
    dh = C // num_heads
    bqk = get(prefix + "to_qk.bias", np.zeros(C, np.float32))
    bv = get(prefix + "to_v.bias", np.zeros(C, np.float32))
    A = get(prefix + "fast_attention.ksh.A")
    mvec = get(prefix + "fast_attention.ksh.mvec")
    anchor = get(prefix + "fast_attention.ksh.anchor")
    if anchor.ndim != 4 or anchor.shape[0] != 1 or anchor.shape[1] != num_heads or anchor.shape[3] != dh:
        raise EdgeformerError(f"{prefix}fast_attention.ksh.anchor has shape {anchor.shape}, expected (1, {num_heads}, m, {dh})")
    m = anchor.shape[2]
    if mvec.shape != (1, num_heads, 1, m) or A.ndim != 3 or A.shape[0] != num_heads or A.shape[2] != m:
        raise EdgeformerError(f"{prefix}: ksh.mvec {mvec.shape} / ksh.A {A.shape} do not match anchors {anchor.shape}")
    tensors[f"{name}.uv.weight"] = np.concatenate([wqk, wv])  # (2C, C) -> [U | V]
    tensors[f"{name}.uv.bias"] = np.concatenate([bqk, bv])
    tensors[f"{name}.anchors"] = np.ascontiguousarray(anchor[0])  # (H, m, dh)
    tensors[f"{name}.mvec"] = np.ascontiguousarray(mvec[0, :, 0, :])  # (H, m)
    tensors[f"{name}.A"] = np.ascontiguousarray(A)  # (H, b, m)
    return ({"weight": f"{name}.uv.weight", "bias": f"{name}.uv.bias"},
            {"anchors": f"{name}.anchors", "mvec": f"{name}.mvec", "A": f"{name}.A"})


def _getter(sd):
    def get(key, default=None):
        if key not in sd:
            if default is not None:
                return default
            raise EdgeformerError(f"state dict has no {key!r}")
        value = sd[key]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return np.ascontiguousarray(value, dtype=np.float32)

    return get


def build_encoder_graph(sd, config, builder, normalized=None):
    """EcoEncoder / PVTv2-named state dict -> nodes appended to ``builder``; returns the tensors.
    Outputs: ``last_hidden_state`` (tokens) and ``logits`` (one row per sequence)."""
    unsupported = sorted({why for key in sd for part, why in UNSUPPORTED_PVT_PARTS.items() if part in key})
    if unsupported:
        raise EdgeformerError("this state dict holds parts the runtime cannot run (image PVTv2): "
                              + ", ".join(unsupported) + "; only the attention layers can be extracted "
                              "(converters.ecoformer.pvt_v2_attention_layers)")
    cfg = {**DEFAULT_CONFIG, **config}
    get = _getter(sd)
    dim = cfg["dim"]
    depths = cfg["depths"]
    heads = cfg["num_heads"] if isinstance(cfg["num_heads"], list) else [cfg["num_heads"]] * len(depths)
    normalized = cfg["normalized"] if normalized is None else normalized
    tensors = {"embed.word.weight": get("embed.word.weight"), "embed.position.weight": get("embed.position.weight")}
    ids = builder.input("input_ids")
    builder.input("attention_mask", optional=True)
    x = builder.add("embedding", "embed", [ids], {"word": "embed.word.weight", "position": "embed.position.weight"})

    def ln(name, value, output=None):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = get(f"{name}.weight"), get(f"{name}.bias")
        return builder.add("layer_norm", name, [value], {"gamma": f"{name}.weight", "beta": f"{name}.bias"},
                           {"eps": 1e-6}, output=output)

    def linear(name, inputs, activation="none"):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = get(f"{name}.weight"), get(f"{name}.bias")
        return builder.add("linear", name, inputs, {"weight": f"{name}.weight", "bias": f"{name}.bias"},
                           {"format": "fp32", "activation": activation})

    for s, (depth, kind, h) in enumerate(zip(depths, cfg["attn_types"], heads), start=1):
        dh = dim // h
        for j in range(depth):
            p = f"block{s}.{j}"
            y = ln(f"{p}.norm1", x)
            if kind == "ecoformer":
                uv_w, attn_w = hash_attention_tensors(sd, f"{p}.attn.", h, tensors, f"{p}.attn")
                uv = builder.add("linear", f"{p}.attn.uv", [y], uv_w, {"format": "fp32"})
                attrs = {"kind": "binary_hash", "num_heads": h, "head_dim": dh, "qk_layout": "shared",
                         "normalized": bool(normalized)}
                ctx = builder.add("attention", f"{p}.attn", [uv], attn_w, attrs)
            else:
                qkv = linear(f"{p}.attn.qkv", [y])
                ctx = builder.add("attention", f"{p}.attn", [qkv], attrs={
                    "kind": "softmax", "num_heads": h, "head_dim": dh, "scale": dh ** -0.5})
            x = linear(f"{p}.attn.proj", [ctx, x])
            y = ln(f"{p}.norm2", x)
            f = linear(f"{p}.mlp.fc1", [y], "gelu")
            x = linear(f"{p}.mlp.fc2", [f, x])
        last = s == len(depths)
        x = ln(f"norm{s}", x, output="last_hidden_state" if last else None)
    builder.output("last_hidden_state")
    if "head.weight" in sd:
        pooled = builder.add("pool", "pool", ["last_hidden_state"], attrs={"mode": cfg["pool"]})
        tensors["head.weight"], tensors["head.bias"] = get("head.weight"), get("head.bias")
        builder.add("linear", "head", [pooled], {"weight": "head.weight", "bias": "head.bias"}, {"format": "fp32"},
                    output="logits")
        builder.output("logits")
    return tensors


def save_edgeformer(model_or_state_dict, path, config=None, normalized=None):
    """Write an EcoEncoder (module, or state dict + config) as an edgeformer model file."""
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder, validate
    from edgeformer.ops import REGISTRY

    if isinstance(model_or_state_dict, nn.Module):
        config = {**model_or_state_dict.config, **(config or {})}
        sd = model_or_state_dict.state_dict()
    else:
        sd, config = model_or_state_dict, config or {}
    builder = GraphBuilder("ecoformer-encoder")
    tensors = build_encoder_graph(sd, config, builder, normalized)
    graph = builder.build()
    validate(graph, tensors, REGISTRY)
    cfg = {**DEFAULT_CONFIG, **config}
    write_model(path, tensors, graph.to_json(),
                metadata={"source": "converters.ecoformer", "model_type": "ecoformer", "max_length": str(cfg["max_len"])})
    return Path(path)


def pvt_v2_attention_layers(sd):
    """Every attention of an official PVTv2 state dict (``block{s}.{j}.attn.*``), as runtime tensors:
    {layer prefix: {"kind": "binary_hash" | "softmax", "num_heads": H, "tensors": {...}}}. EcoFormer layers
    give ``anchors`` (H, m, dh), ``mvec`` (H, m), ``A`` (H, b, m) and the fused ``uv.weight`` / ``uv.bias``
    ([to_qk; to_v]); softmax layers their ``qkv`` and ``proj``. num_heads is found from the ksh buffers
    (softmax layers: from ``heads`` {stage: H} if given, else left None)."""
    layers = {}
    prefixes = sorted({k.split(".attn.")[0] for k in sd if ".attn." in k and k.startswith("block")})
    get = _getter(sd)
    for p in prefixes:
        if f"{p}.attn.fast_attention.ksh.A" in sd:
            H = get(f"{p}.attn.fast_attention.ksh.A").shape[0]
            tensors = {}
            hash_attention_tensors(sd, f"{p}.attn.", H, tensors, "attn")
            tensors["attn.proj.weight"], tensors["attn.proj.bias"] = get(f"{p}.attn.proj.weight"), get(f"{p}.attn.proj.bias")
            layers[p] = {"kind": "binary_hash", "num_heads": H, "tensors": tensors}
        elif f"{p}.attn.qkv.weight" in sd:
            tensors = {"attn.qkv.weight": get(f"{p}.attn.qkv.weight"),
                       "attn.qkv.bias": get(f"{p}.attn.qkv.bias", np.zeros(get(f"{p}.attn.qkv.weight").shape[0], np.float32)),
                       "attn.proj.weight": get(f"{p}.attn.proj.weight"), "attn.proj.bias": get(f"{p}.attn.proj.bias")}
            layers[p] = {"kind": "softmax", "num_heads": None, "tensors": tensors}
    return layers


def load_ecoformer(config: dict, ckpt, builder, *, quantize=None):
    """Loader for checkpoint directories with config.json model_type "ecoformer" (an EcoEncoder's
    config and its state dict in model.safetensors)."""
    if quantize is not None:
        raise EdgeformerError("--quantize is not supported for ecoformer models")
    tensors = build_encoder_graph(ckpt.arrays, config, builder)
    ckpt.used.update(ckpt.arrays)
    return tensors


def save_pretrained(model: EcoEncoder, directory):
    """config.json + model.safetensors, convertible with ``edgeformer convert DIR -o FILE``."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def _register():
    from converters.registry import register_loader

    register_loader("ecoformer")(load_ecoformer)


_register()
