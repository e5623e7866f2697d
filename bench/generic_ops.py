#!/usr/bin/env python3
"""Generic ops against coarse ops: one BERT export converted both ways (and ONNX Runtime as a reference).

    taskset -c 1 python bench/generic_ops.py                         # full run: MiniLM-L12 sizes, 4 shapes
    python bench/generic_ops.py --hidden 64 --layers 2 --shapes 1x8,2x16 --repeat 3 --out /tmp/gen_bench   # smoke

A random-weight BertModel (hidden, heads, layers, ffn from the flags; MiniLM-L12-H384 by default) is exported with
torch.onnx (TorchScript exporter, opset 17, dynamic batch and sequence) and converted twice: the default path
(coarse ops: embedding, linear, layer_norm, attention) and ``generic=True`` (every ONNX node as an "onnx" generic
op, plain NumPy). Both models (threads = --threads) and ORT (same thread count) run the same right-padded feeds
(row 0 full, the others 3/4 of the length), alternating call by call in this one process; medians of --repeat
calls after --warmup calls. Results: OUT/generic_ops.json and .md (default bench/results/), also printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402


def export_bert(path: Path, hidden: int, heads: int, layers: int, ffn: int, vocab: int) -> Path:
    import torch
    import transformers as tf

    from converters.baselines import _Wrapper  # keyword-argument wrapper for transformers 5

    torch.manual_seed(0)
    config = tf.BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                           intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=512)
    config._attn_implementation = "eager"
    net = tf.BertModel(config, add_pooling_layer=False).eval()

    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrapper(net), (ids, mask, torch.zeros_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
    return path


def feeds_for(batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(batch * 1000 + seq)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        mask[b, :seq if b == 0 else max(1, 3 * seq // 4)] = 1
    ids = rng.integers(3, vocab, size=(batch, seq)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--shapes", default="1x16,1x128,8x128,32x64", help="BATCHxSEQ,...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    import edgeformer
    from converters.onnx_import import convert_onnx

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_bert(Path(tmp) / "bert.onnx", args.hidden, args.heads, args.layers, args.ffn, args.vocab)
        convert_onnx(onnx_path, Path(tmp) / "coarse.edgeformer")
        convert_onnx(onnx_path, Path(tmp) / "generic.edgeformer", generic=True)
        engines = {name: edgeformer.load(Path(tmp) / f"{name}.edgeformer", threads=args.threads)
                   for name in ("coarse", "generic")}
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            runners = {"onnxruntime": lambda f: session.run(None, f)}
        except ImportError:
            runners = {}
        runners.update({name: (lambda f, m=m: m.run(f)) for name, m in engines.items()})
        rows = []
        for batch, seq in shapes:
            feeds = feeds_for(batch, seq, args.vocab)
            times = {name: [] for name in runners}
            for i in range(args.warmup + args.repeat):
                for name, run in runners.items():  # alternate engines call by call
                    start = time.perf_counter()
                    run(feeds)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["coarse"])
            for name in runners:
                med = statistics.median(times[name])
                rows.append({"batch": batch, "seq": seq, "engine": name, "median_ms": med * 1e3,
                             "vs_coarse": med / base})
    info = {"cpu": cpu_name(), "threads": args.threads, "numpy": np.__version__, "repeat": args.repeat,
            "model": f"BERT hidden {args.hidden}, {args.heads} heads, {args.layers} layers, ffn {args.ffn}",
            "pid_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    lines = [f"# generic ops vs coarse ops ({info['cpu']}, {args.threads} thread(s))", "", info["model"] +
             f", numpy {info['numpy']}, median of {args.repeat}", "",
             "| batch x seq | engine | median ms | time / coarse |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']}x{r['seq']} | {r['engine']} | {r['median_ms']:.2f} | {r['vs_coarse']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generic_ops.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    (out / "generic_ops.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
