"""Tiny random-weight GPT-2 models (offline), shared by the GPT-2 loader and ONNX import tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def build_gpt2(*, n_embd=40, n_head=5, n_layer=2, n_inner=None, vocab=120, positions=128, seed=0, attn="eager",
               lm_head=False, **extra):
    """A random-weight GPT2Model (or GPT2LMHeadModel) in eval mode, LayerNorm parameters randomised too."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                           n_inner=n_inner, bos_token_id=vocab - 1, eos_token_id=vocab - 1, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, **extra)
    config._attn_implementation = attn
    net = (tf.GPT2LMHeadModel if lm_head else tf.GPT2Model)(config).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        for name, param in net.named_parameters():  # HF initialises biases to 0: make them matter
            if name.endswith(".bias") and "ln" not in name:
                param.normal_(0.0, 0.05)
    return net


def gpt2_hidden(net, ids, mask) -> np.ndarray:
    import torch

    body = getattr(net, "transformer", net)
    with torch.no_grad():
        return body(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    use_cache=False).last_hidden_state.numpy()


def export_gpt2(net, path: Path, *, opset: int = 17, dynamo: bool = False) -> Path:
    """torch.onnx.export of GPT2Model(input_ids, attention_mask) -> last_hidden_state, dynamic batch and seq."""
    import warnings

    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded example, so that no mask branch is traced away
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(Wrapper(), (ids, mask), str(path), dynamo=True, opset_version=opset,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        else:
            torch.onnx.export(Wrapper(), (ids, mask), str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
    return path


def padded_feeds(batch: int, length: int, *, vocab=120, seed=0, layout="right"):
    """Random ids with a mask: row 0 full, the others random lengths >= 1 (right / left padded, or holes)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for b in range(batch):
        n = length if b == 0 else int(rng.integers(1, length + 1))
        if layout == "right":
            mask[b, :n] = 1
        elif layout == "left":
            mask[b, length - n:] = 1
        else:
            mask[b] = rng.integers(0, 2, size=length)
            mask[b, rng.integers(0, length)] = 1
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}
