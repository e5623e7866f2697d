#!/usr/bin/env python3
"""ListOps (Long Range Arena style, generated here) with EcoFormer attention: train in PyTorch, serve with
edgeformer, compare with softmax attention and with a softmax model converted by hash fitting.

    python bench/train_ecoformer_listops.py               # ~3 min of training per model, 1 thread
    python bench/train_ecoformer_listops.py --smoke       # seconds; numbers are meaningless

Task: nested prefix expressions over digits 0-9 with MAX, MIN, MED (median, lower middle) and SM (sum mod
10), e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9; 10 classes; lengths --min-len..--max-len tokens (LRA uses up
to 2000; shorter here so that training fits in minutes on one core). Data generated with a fixed seed.

Models (converters.ecoformer.EcoEncoder, d = 64, 2 heads of 32, 2 blocks, mean pooling):
1. softmax    every block softmax attention ("msa"), trained from scratch;
2. ecoformer  the same network with EcoFormer attention (b = 16, m = 25), initialised from the softmax
              model (to_qk <- its query rows, to_v <- its value rows, as EcoFormer fine-tunes from an MSA
              model), hash learned by KSH on the first batch, then fine-tuned;
3. hash-fit   the softmax model converted without training by converters.hash_fit (KSH against the
              model's own attention maps on training sequences), all layers and all-but-last.
Each is evaluated on the test split in PyTorch (1, 2) and in edgeformer (all); the script checks that
edgeformer's predictions equal PyTorch's. Results: bench/results/train_ecoformer_listops.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

OPS = ["[MAX", "[MIN", "[MED", "[SM"]
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + OPS + ["]"]
TOK = {t: i for i, t in enumerate(VOCAB)}


def _tree(rng, depth, max_args, budget):
    """A random expression of at most ``budget`` tokens (budget >= 1): (tree, tokens used)."""
    if depth <= 0 or budget < 4 or rng.random() < 0.3:
        return int(rng.integers(0, 10)), 1
    op = OPS[int(rng.integers(0, 4))]
    left = budget - 2  # the operator and its closing bracket
    args = []
    for _ in range(int(rng.integers(2, max_args + 1))):
        if left < 1:
            break
        t, used = _tree(rng, depth - 1, max_args, min(left, max(1, budget // 2)))
        args.append(t)
        left -= used
    if len(args) < 2:
        return int(rng.integers(0, 10)), 1
    return (op, args), budget - left


def _value(t):
    if isinstance(t, int):
        return t
    op, args = t
    vals = sorted(_value(a) for a in args)
    if op == "[MAX":
        return vals[-1]
    if op == "[MIN":
        return vals[0]
    if op == "[MED":
        return vals[(len(vals) - 1) // 2]
    return sum(vals) % 10


def _tokens(t):
    if isinstance(t, int):
        return [str(t)]
    op, args = t
    return [op] + [tok for a in args for tok in _tokens(a)] + ["]"]


def listops(n, min_len, max_len, seed, max_depth=6, max_args=6):
    """n examples: ids (n, max_len) int64 right-padded with 0, mask (n, max_len), labels (n,)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, max_len), np.int64)
    labels = np.zeros(n, np.int64)
    i = 0
    while i < n:
        t, _ = _tree(rng, max_depth, max_args, int(rng.integers(min_len, max_len + 1)))
        toks = _tokens(t)
        if not min_len <= len(toks) <= max_len:
            continue
        ids[i, : len(toks)] = [TOK[x] for x in toks]
        labels[i] = _value(t)
        i += 1
    return ids, (ids != 0).astype(np.int64), labels


def train(model, data, seconds, batch_size, lr, seed, log, max_steps=None):
    """Train for ``max_steps`` steps when given (reproducible), else for ``seconds`` of wall time."""
    import torch

    ids, mask, labels = (torch.from_numpy(a) for a in data)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, steps = time.perf_counter(), 0
    def done():
        return steps >= max_steps if max_steps else time.perf_counter() - start >= seconds

    while not done():
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            L = int(mask[idx].sum(1).max())
            logits = model(ids[idx, :L], mask[idx, :L].bool())
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps % 50 == 0:
                log(f"  step {steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
            if done():
                break
    model.eval()
    return steps


def torch_predict(model, data, batch_size=64):
    import torch

    ids, mask, _ = data
    preds = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            L = int(mask[i : i + batch_size].sum(1).max())
            logits = model(torch.from_numpy(ids[i : i + batch_size, :L]), torch.from_numpy(mask[i : i + batch_size, :L]).bool())
            preds.append(logits.argmax(-1).numpy())
    return np.concatenate(preds)


def edge_predict(path, data, batch_size=64):
    import edgeformer

    ids, mask, _ = data
    model = edgeformer.load(path, threads=1)
    preds = []
    for i in range(0, len(ids), batch_size):
        L = int(mask[i : i + batch_size].sum(1).max())
        out = model.run({"input_ids": ids[i : i + batch_size, :L], "attention_mask": mask[i : i + batch_size, :L]})
        preds.append(out["logits"].argmax(-1))
    model.close()
    return np.concatenate(preds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--minutes", type=float, default=3.0, help="training time per model (softmax, then ecoformer)")
    p.add_argument("--steps", type=int, default=None,
                   help="train each model for exactly this many steps instead of --minutes (reproducible)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.test, args.minutes, args.min_len, args.max_len = 256, 64, 0.1, 16, 64

    import torch

    from converters.ecoformer import EcoEncoder, save_edgeformer
    from converters.hash_fit import hash_fit_file

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    train_data = listops(args.train, args.min_len, args.max_len, args.seed)
    test_data = listops(args.test, args.min_len, args.max_len, args.seed + 1)
    log(f"ListOps: {args.train} train / {args.test} test, lengths {args.min_len}-{args.max_len}, "
        f"majority class {np.bincount(test_data[2]).max() / args.test:.3f}")
    cfg = dict(vocab_size=len(VOCAB), dim=64, num_heads=2, depths=[2], max_len=args.max_len, num_classes=10,
               mlp_ratio=2.0, nbits=16, m=25, topk=10, pool="mean")
    result = {"config": cfg, "args": vars(args), "models": {}}

    def evaluate(name, torch_model, path, train_steps=None, seconds=None):
        labels = test_data[2]
        edge = edge_predict(path, test_data)
        row = {"edgeformer_accuracy": float((edge == labels).mean())}
        if torch_model is not None:
            ref = torch_predict(torch_model, test_data)
            row.update(torch_accuracy=float((ref == labels).mean()), same_predictions=int((ref == edge).sum()),
                       test=len(labels))
        if train_steps is not None:
            row.update(train_steps=train_steps, train_seconds=seconds)
        result["models"][name] = row
        log(f"{name}: {row}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        soft = EcoEncoder(attn_types=["msa"], **cfg)
        log("training softmax model")
        start = time.perf_counter()
        steps = train(soft, train_data, args.minutes * 60, args.batch_size, args.lr, args.seed, log, args.steps)
        soft_path = save_edgeformer(soft, tmp / "softmax.edgeformer")
        evaluate("softmax", soft, soft_path, steps, time.perf_counter() - start)

        eco = EcoEncoder(attn_types=["ecoformer"], **cfg)
        sd = soft.state_dict()
        init = {}
        C = cfg["dim"]
        for k, v in sd.items():
            if ".attn.qkv." in k:
                base = k.replace(".qkv.", ".")
                init[base.replace(".attn.", ".attn.to_qk.")] = v[:C]
                init[base.replace(".attn.", ".attn.to_v.")] = v[2 * C :]
            else:
                init[k] = v
        missing = eco.load_state_dict(init, strict=False)
        assert all("fast_attention" in k for k in missing.missing_keys), missing
        log("fine-tuning ecoformer model from the softmax one (hash learned on the first batch)")
        start = time.perf_counter()
        eco.train()
        with torch.no_grad():  # KSH on the first batch (official), outside the training-time budget
            first = slice(0, args.batch_size)
            L = int(train_data[1][first].sum(1).max())
            eco(torch.from_numpy(train_data[0][first, :L]), torch.from_numpy(train_data[1][first, :L]).bool())
        result["hash_learning_seconds"] = time.perf_counter() - start
        log(f"  hash learned in {result['hash_learning_seconds']:.1f} s")
        start = time.perf_counter()
        steps = train(eco, train_data, args.minutes * 60, args.batch_size, args.lr, args.seed + 1, log, args.steps)
        eco_path = save_edgeformer(eco, tmp / "ecoformer.edgeformer")
        evaluate("ecoformer", eco, eco_path, steps, time.perf_counter() - start)

        calib = tmp / "calib.npz"
        np.savez(calib, input_ids=train_data[0][:64], attention_mask=train_data[1][:64])
        for layers in ("all", "all-but-last"):
            out = tmp / f"hashfit-{layers}.edgeformer"
            report = hash_fit_file(soft_path, out, nbits=16, anchors=25, calib=str(calib), layers=layers)
            evaluate(f"hash-fit ({layers})", None, out)
            result["models"][f"hash-fit ({layers})"]["report"] = report

    lines = ["# ListOps: EcoFormer vs softmax attention (edgeformer serving)", "",
             f"{args.train} train / {args.test} test sequences of {args.min_len}-{args.max_len} tokens; model d=64, "
             f"2 heads, 2 blocks; " + (f"{args.steps} training steps" if args.steps else f"{args.minutes} min of training")
             + f" of batch {args.batch_size} per model, 1 thread.", "",
             "| model | PyTorch accuracy | edgeformer accuracy | same predictions |", "|---|---|---|---|"]
    for name, row in result["models"].items():
        same = f"{row['same_predictions']}/{row['test']}" if "same_predictions" in row else "-"
        acc = f"{row['torch_accuracy']:.3f}" if "torch_accuracy" in row else "-"
        lines.append(f"| {name} | {acc} | {row['edgeformer_accuracy']:.3f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_ecoformer_listops.json").write_text(json.dumps(result, indent=1, default=float))
        (out / "train_ecoformer_listops.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
