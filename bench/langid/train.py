"""Train a byte-level language-identification classifier (converters/wide.py) on the machine's own files.

    python bench/langid/train.py --data /tmp/langid --layers 1 --heads 24 --out /tmp/wide
    python bench/langid/train.py --data /tmp/langid --layers 6 --heads 4 --out /tmp/deep

Fixed seed, one thread, deterministic order: the same command gives the same model. Training sees
random windows of ``--train-len`` bytes (half of them at the start of the file, where the demo
reads); validation classifies the first ``--val-len`` bytes of each file, test the first ``--eval-len``. The checkpoint with
the best validation accuracy is written as a checkpoint directory (config.json + model.safetensors),
plus ``metrics.json`` (accuracies, parameters, training time).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.langid import corpus  # noqa: E402
from converters.wide import ByteClassifierConfig, module, save_directory  # noqa: E402


def batch_windows(files, indices, length, rng, start_prob=0.5):
    """Random windows of up to ``length`` bytes of the given files -> (ids (B, S), mask (B, S))."""
    ids = np.zeros((len(indices), length), dtype=np.int64)  # (B, S)
    mask = np.zeros((len(indices), length), dtype=np.int64)  # (B, S)
    for row, i in enumerate(indices):
        data = files[i]
        start = 0 if rng.random() < start_prob or len(data) <= length else int(rng.integers(0, len(data) - length))
        chunk = data[start:start + length]
        ids[row, :len(chunk)] = chunk
        mask[row, :len(chunk)] = 1
    return ids, mask


def heads_of(files, length):
    """The first ``length`` bytes of every file, padded -> (ids (F, S), mask (F, S))."""
    ids = np.zeros((len(files), length), dtype=np.int64)  # (F, S)
    mask = np.zeros((len(files), length), dtype=np.int64)  # (F, S)
    for row, data in enumerate(files):
        chunk = data[:length]
        ids[row, :len(chunk)] = chunk
        mask[row, :len(chunk)] = 1
    return ids, mask


def predict(model, ids, mask, batch=8):
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            out.append(model(torch.from_numpy(ids[i:i + batch]), torch.from_numpy(mask[i:i + batch])).numpy())
    model.train()
    return np.concatenate(out)  # (F, labels)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="corpus directory (built by corpus.py if missing)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True, help="heads per layer")
    ap.add_argument("--attention-size", type=int, default=192, help="Q/K/V width per layer (all heads)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--eval-len", type=int, default=1024, help="bytes per test file")
    ap.add_argument("--val-len", type=int, default=512, help="bytes per validation file (model selection)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if not (args.data / "train.npz").is_file():
        corpus.save(corpus.build(), args.data)
    labels = json.loads((args.data / "labels.json").read_text())
    train, train_y, _ = corpus.load(args.data, "train")
    val, val_y, _ = corpus.load(args.data, "val")
    test, test_y, _ = corpus.load(args.data, "test")
    config = ByteClassifierConfig(num_layers=args.layers, heads_per_layer=args.heads,
                                  attention_size=args.attention_size, hidden_size=args.hidden, ffn_size=args.ffn,
                                  labels=labels, context_bytes=args.train_len)
    config.check()
    model = module(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rng = np.random.default_rng(args.seed)
    val_ids, val_mask = heads_of(val, args.val_len)
    best, history, start = -1.0, [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(train), args.batch)
        ids, mask = batch_windows(train, idx, args.train_len, rng)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(ids), torch.from_numpy(mask)),
                                                 torch.from_numpy(train_y[idx]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = float((predict(model, val_ids, val_mask).argmax(1) == val_y).mean())
            history.append({"step": step, "loss": loss.item(), "val_accuracy": acc,
                            "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(history[-1]), flush=True)
            if acc > best:
                best = acc
                save_directory(model, args.out)
    # the best checkpoint, re-read, scores the test split
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(args.out / "model.safetensors")), strict=False)
    test_ids, test_mask = heads_of(test, args.eval_len)
    logits = predict(model, test_ids, test_mask)
    metrics = {
        "layers": args.layers, "heads_per_layer": args.heads, "attention_size": args.attention_size,
        "hidden": args.hidden, "ffn": args.ffn, "parameters": parameters(model), "train_len": args.train_len,
        "eval_len": args.eval_len, "val_len": args.val_len, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "val_accuracy": best, "test_accuracy": float((logits.argmax(1) == test_y).mean()),
        "test_files": int(len(test)), "train_seconds": round(time.perf_counter() - start, 1), "history": history,
    }
    np.save(args.out / "test_logits.npy", logits.astype(np.float32))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))


if __name__ == "__main__":
    main()
