#!/usr/bin/env python3
"""Quantizable Transformers on a small BERT: vanilla softmax vs clipped softmax vs gated attention, trained here
by masked-byte language modelling, served by edgeformer in fp32 and after static W8A8 (per-tensor) quantization.

    python bench/train_quantizable.py              # 1200 steps (~5 min) of training per variant, 1 thread, fixed seed
    python bench/train_quantizable.py --smoke      # seconds; numbers are meaningless

Data (offline, found on the machine): the English text of Python's own documentation topics
(``pydoc_data.topics``, ~465 KB), as bytes; the first 90 % trains, the last 10 % tests. A sequence is
[CLS] + 126 bytes + [SEP] (T = 128, the BERT-base setting of the paper). Masked-byte LM as BERT: 15 % of the
byte positions are selected, 80 % of those replaced by [MASK], 10 % by a random byte, 10 % kept; the metric is
the accuracy of predicting the original byte at the selected positions (test masks fixed by the seed).

Model: transformers BertModel, 4 layers, d = 128, 4 heads of 32, FFN 512, GELU, post-LN, no dropout, its
self-attention replaced by converters.quantizable.QuantizableBertSelfAttention; an MLM head (dense, GELU,
LayerNorm, decoder) in fp32. Variants (config keys as the official code's flags):
  vanilla   softmax
  clipped   attn_softmax "clipped(-.025:1)"  (gamma = -0.025, zeta = 1: alpha = 3.2 at T = 128, paper Table 5)
  gated     attn_gate_type "conditional_per_token" (per-head Linear(dh -> 1) gate, pi_init 0.5)
  clipped_small   attn_softmax "clipped(-.005:1)": at d = 128 the untrained model's attention is almost uniform
            (p ~ 1/128 = 0.0078 < 0.0244, the clip threshold of gamma = -0.025), so "clipped" starts with every
            probability clipped to exactly 0 and no gradient into Q/K/V; gamma = -0.005 (threshold 0.005) does not
Training: AdamW (lr 1e-3, betas 0.9/0.98, weight decay 0.01), 5 % warm-up then linear decay, batch 16, grad-norm
clip 1, --steps steps, torch.set_num_threads(1), seed --seed.

Evaluation: PyTorch fp32; the edgeformer file (converters.hf.convert_hf_directory) in fp32; and with
quantize="static-int8": int8 weights (symmetric, per output channel), int8 activations at every linear input with
static per-tensor asymmetric ranges calibrated (min-max, and 99.99th percentile) on 16 training batches, as the
paper's recipe (App. C.4: 16 batches, running min-max), SmoothQuant off (smooth_alpha=0: plain per-tensor
W8A8); a third column adds SmoothQuant (alpha 0.75, the CLI's static-int8 default), which migrates per-channel
activation outliers into the weights. The encoder's LayerNorm, residual sums, attention and
the gate stay fp32 in edgeformer (the paper also quantizes those; see docs/QUANTIZABLE.md). The MLM head runs in
fp32 NumPy on the runtime's last_hidden_state.
Outlier statistics (paper §5 / seed_algorithms §3.5) on the test set, PyTorch fp32: per batch the max |x| over
every layer's output x (the hidden state after each transformer layer) and the max |input| of the FFN
down-projection (the tensor with BERT's outliers), averaged over batches; the kurtosis of each layer's output
(over all its elements), averaged over layers and batches.
Results: bench/results/train_quantizable.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB = 260
SEQ = 128
# (column, calibration method, SmoothQuant alpha): plain per-tensor W8A8 first (the paper's setting)
QUANT_SETTINGS = (("minmax", "minmax", 0.0), ("percentile", "percentile", 0.0), ("minmax_smooth", "minmax", 0.75))
VARIANTS = {
    "vanilla": {},
    "clipped": {"attn_softmax": "clipped(-.025:1)"},
    "gated": {"attn_gate_type": "conditional_per_token"},
    # gamma -0.025 puts the clip threshold (0.0244) above the uniform 1/128 of an untrained model: every
    # probability is clipped to 0, so no gradient reaches Q/K/V; -0.005 (threshold 0.005) keeps them alive
    "clipped_small": {"attn_softmax": "clipped(-.005:1)"},
}


def corpus() -> tuple[np.ndarray, np.ndarray]:
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def windows(data: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(N, SEQ) sequences [CLS] bytes [SEP]."""
    body = data[starts[:, None] + np.arange(SEQ - 2)[None, :]]  # (N, SEQ-2)
    n = len(starts)
    return np.concatenate([np.full((n, 1), CLS), body, np.full((n, 1), SEP)], axis=1)


def mask_tokens(ids: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of the byte positions: (inputs, labels with -100 where not selected)."""
    inputs, labels = ids.copy(), np.full_like(ids, -100)
    selectable = ids < 256
    sel = (rng.random(ids.shape) < 0.15) & selectable
    labels[sel] = ids[sel]
    u = rng.random(ids.shape)
    inputs[sel & (u < 0.8)] = MASK
    rand = sel & (u >= 0.8) & (u < 0.9)
    inputs[rand] = rng.integers(0, 256, rand.sum())
    return inputs, labels


def build(options, seed):
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    from converters.quantizable import patch_bert

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=PAD, **options)
    encoder = patch_bert(BertModel(config, add_pooling_layer=False))
    head = nn.ModuleDict({"dense": nn.Linear(128, 128), "LayerNorm": nn.LayerNorm(128, eps=1e-12),
                          "decoder": nn.Linear(128, VOCAB)})
    return encoder, head


def head_forward(head, h):
    import torch.nn.functional as F

    return head["decoder"](head["LayerNorm"](F.gelu(head["dense"](h))))


def head_numpy(head, h: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    sd = {k: v.detach().numpy().astype(np.float64) for k, v in head.state_dict().items()}
    t = h.astype(np.float64) @ sd["dense.weight"].T + sd["dense.bias"]
    t = 0.5 * t * (1 + erf(t / math.sqrt(2)))
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-12)
    t = t * sd["LayerNorm.weight"] + sd["LayerNorm.bias"]
    return t @ sd["decoder.weight"].T + sd["decoder.bias"]


def train(encoder, head, train_data, steps, batch, lr, seed, log):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    params = list(encoder.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    encoder.train()
    head.train()
    start = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(train_data) - SEQ, batch)
        inputs, labels = mask_tokens(windows(train_data, starts), rng)
        h = encoder(input_ids=torch.from_numpy(inputs)).last_hidden_state
        loss = F.cross_entropy(head_forward(head, h).reshape(-1, VOCAB), torch.from_numpy(labels).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s")
    encoder.eval()
    head.eval()
    return time.perf_counter() - start


def kurtosis(x: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    c = x - x.mean()
    return float((c ** 4).mean() / max((c ** 2).mean() ** 2, 1e-300))


def torch_eval(encoder, head, test_inputs, test_labels, batch):
    """fp32 accuracy and outlier statistics (module docstring)."""
    import torch

    layer_out, ffn_in, probs, gates = [], [], [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: layer_out.append((o[0] if isinstance(o, tuple) else o).detach()))
             for layer in encoder.encoder.layer]
    hooks += [layer.output.dense.register_forward_hook(lambda m, i, o: ffn_in.append(i[0].detach()))
              for layer in encoder.encoder.layer]
    for layer in encoder.encoder.layer:
        attn = layer.attention.self
        hooks.append(attn.register_forward_hook(lambda m, i, o: probs.append(o[1].detach())))
        if attn.gate in ("per_head", "all_heads"):
            hooks.append(attn.register_forward_hook(lambda m, i, o: gates.append(gate_values(m, i[0]))))
    correct = total = 0
    max_inf, max_ffn, kurt, zeros, gate_mean = [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(test_inputs), batch):
            layer_out.clear()
            ffn_in.clear()
            ids = torch.from_numpy(test_inputs[i:i + batch])
            pred = head_forward(head, encoder(input_ids=ids).last_hidden_state).argmax(-1).numpy()
            lab = test_labels[i:i + batch]
            sel = lab >= 0
            correct += int((pred[sel] == lab[sel]).sum())
            total += int(sel.sum())
            max_inf.append(max(float(x.abs().max()) for x in layer_out))
            max_ffn.append(max(float(x.abs().max()) for x in ffn_in))
            kurt.append(np.mean([kurtosis(x.numpy()) for x in layer_out]))
            zeros.append(float(np.mean([(pr == 0).float().mean() for pr in probs])))
            probs.clear()
            if gates:
                gate_mean.append(float(np.mean([g.mean() for g in gates])))
                gates.clear()
    for hk in hooks:
        hk.remove()
    return {"accuracy": correct / total, "max_inf_norm": float(np.mean(max_inf)),
            "max_ffn_down_input": float(np.mean(max_ffn)), "avg_kurtosis": float(np.mean(kurt)),
            "zero_prob_fraction": float(np.mean(zeros)), "mean_gate": float(np.mean(gate_mean)) if gate_mean else None}


def gate_values(attn, x):
    """sigmoid(G(x)) (B, H, N) of a gated QuantizableBertSelfAttention for its input x (B, N, d)."""
    import torch

    if attn.gate == "all_heads":
        return torch.sigmoid(attn.alpha(x)).transpose(1, 2).detach()
    xh = attn._heads(x)
    return torch.sigmoid(torch.stack([fc(xh[:, i])[..., 0] for i, fc in enumerate(attn.alpha)], dim=1)).detach()


def edge_accuracy(path, head, test_inputs, test_labels, batch):
    import edgeformer

    model = edgeformer.load(path, threads=1)
    try:
        correct = total = 0
        for i in range(0, len(test_inputs), batch):
            ids = test_inputs[i:i + batch]
            h = model.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["last_hidden_state"]
            pred = head_numpy(head, h).argmax(-1)
            lab = test_labels[i:i + batch]
            sel = lab >= 0
            correct += int((pred[sel] == lab[sel]).sum())
            total += int(sel.sum())
    finally:
        model.close()
    return correct / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="training steps per variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test", type=int, default=384, help="test sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--append", action="store_true",
                   help="add these variants to the existing results JSON (same steps, batch, lr, test, seed)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.test = 20, 32

    import torch

    from converters.hf import convert_hf_directory

    torch.set_num_threads(1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    train_data, test_data = corpus()
    rng = np.random.default_rng(args.seed + 1000)
    starts = np.linspace(0, len(test_data) - SEQ, args.test).astype(np.int64)
    test_inputs, test_labels = mask_tokens(windows(test_data, starts), rng)
    calib_rng = np.random.default_rng(args.seed + 2000)
    calib_ids, _ = mask_tokens(windows(train_data, calib_rng.integers(0, len(train_data) - SEQ, 16 * args.batch_size)),
                               calib_rng)
    result = {"args": vars(args), "cpu": platform.processor() or platform.machine(), "threads": 1,
              "torch": torch.__version__, "train_bytes": int(len(train_data)), "test_bytes": int(len(test_data)),
              "variants": {}}
    previous = Path(args.out) / "train_quantizable.json"
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        same = ("steps", "batch_size", "lr", "test", "seed")
        if any(old["args"].get(k) != getattr(args, k) for k in same):
            raise SystemExit(f"--append: {previous} was made with other settings ({same})")
        result["variants"] = old["variants"]
    log(f"masked-byte LM on pydoc topics: {len(train_data)} train / {len(test_data)} test bytes; "
        f"{args.test} test sequences of {SEQ}; {args.steps} steps x batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.npz"
        np.savez(calib, input_ids=calib_ids, attention_mask=np.ones_like(calib_ids))
        for name in args.variants.split(","):
            options = VARIANTS[name]
            log(f"{name}: {options or 'softmax'}")
            encoder, head = build(options, args.seed)
            seconds = train(encoder, head, train_data, args.steps, args.batch_size, args.lr, args.seed, log)
            row = {"options": options, "train_seconds": seconds, **torch_eval(encoder, head, test_inputs, test_labels,
                                                                            args.batch_size)}
            hf_dir = tmp / name
            encoder.save_pretrained(hf_dir)
            row["edgeformer_fp32"] = edge_accuracy(convert_hf_directory(hf_dir, tmp / f"{name}.edgeformer"), head,
                                                   test_inputs, test_labels, args.batch_size)
            for key, method, smooth in QUANT_SETTINGS:
                path = convert_hf_directory(hf_dir, tmp / f"{name}-{key}.edgeformer", quantize="static-int8",
                                            calib=str(calib), calib_method=method, smooth_alpha=smooth)
                row[f"edgeformer_w8a8_{key}"] = edge_accuracy(path, head, test_inputs, test_labels, args.batch_size)
            result["variants"][name] = row
            log(f"  {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})}")

    lines = ["# Quantizable Transformers: masked-byte LM, BERT 4L d=128 (edgeformer serving)", "",
             f"pydoc topics bytes, T = {SEQ}, {args.steps} steps x batch {args.batch_size}, 1 thread, seed {args.seed}; "
             f"{args.test} test sequences. Accuracy = masked-byte prediction accuracy (%). W8A8 = edgeformer "
             f"static-int8: int8 per-channel weights, static per-tensor asymmetric int8 inputs of every linear "
             f"(16 calibration batches).", "",
             "| variant | torch fp32 | edgeformer fp32 | W8A8 min-max | W8A8 p99.99 | W8A8 min-max + SmoothQuant 0.75 "
             "| max inf-norm | max FFN-down input | avg kurtosis | exact-zero probs | mean gate | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        gate = "-" if r["mean_gate"] is None else f"{r['mean_gate']:.3f}"
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['edgeformer_fp32']:.2f} | "
                     f"{100 * r['edgeformer_w8a8_minmax']:.2f} | {100 * r['edgeformer_w8a8_percentile']:.2f} | "
                     f"{100 * r['edgeformer_w8a8_minmax_smooth']:.2f} | {r['max_inf_norm']:.1f} | "
                     f"{r['max_ffn_down_input']:.1f} | {r['avg_kurtosis']:.1f} | {100 * r['zero_prob_fraction']:.1f}% | "
                     f"{gate} | {r['train_seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_quantizable.json").write_text(json.dumps(result, indent=1, default=float))
        (out / "train_quantizable.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
