#!/usr/bin/env python3
"""Wide vs deep byte classifiers ("Wide Attention", seed_algorithms §4): accuracy, size, CPU latency.

    python bench/langid/corpus.py --out /tmp/langid
    python bench/langid/train.py --data /tmp/langid --layers 6 --heads 4  --out /tmp/deep
    python bench/langid/train.py --data /tmp/langid --layers 1 --heads 24 --out /tmp/wide
    python bench/langid/evaluate.py --data /tmp/langid --model /tmp/deep      # test accuracy by length
    python bench/langid/evaluate.py --data /tmp/langid --model /tmp/wide
    python bench/wide.py --deep /tmp/deep --wide /tmp/wide --data /tmp/langid   # about 5 min on the 2-vCPU VM

For each thread count (1, 2) one pinned subprocess loads both models into edgeformer and into the
PyTorch reference module (same process, torch.set_num_threads = threads) and times batch-1
classification of byte lengths 1024 and 4096, engines and models interleaved cell by cell, repeated
``--rounds`` times; medians are reported, with deep/wide ratios. It also times one attention op
alone (the wide model's 24 heads, 1024 and 4096 tokens) on 1 and 2 threads: the head-parallel speedup.
Accuracy and parameter counts come from each checkpoint's metrics.json (train.py, evaluate.py); with
--data, edgeformer's predictions on the test split are checked against PyTorch's (evaluate.py's logits).
Results: bench/results/wide.json and wide.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench.minilm import machine_info, median, pin_prefix, thread_env, time_cell  # noqa: E402

LENGTHS = (256, 1024, 4096)


def worker(args) -> dict:
    import numpy as np
    import torch

    import edgeformer
    from converters.wide import ByteClassifierConfig, module
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    text = rng.integers(32, 127, max(LENGTHS)).astype(np.int64)  # printable bytes; content does not change cost
    engines = {}
    for name, path in (("deep", args.deep_file), ("wide", args.wide_file)):
        engines[(name, "edgeformer")] = edgeformer.load(path, threads=args.threads)
        cfg = ByteClassifierConfig.from_json(json.loads((Path(getattr(args, name)) / "config.json").read_text()))
        m = module(cfg).eval()
        m.load_state_dict(load_file(str(Path(getattr(args, name)) / "model.safetensors")), strict=False)
        engines[(name, "torch")] = m
    cells = {}
    for _ in range(args.rounds):
        for length in LENGTHS:
            ids = text[None, :length].copy()  # (1, S)
            mask = np.ones_like(ids)
            tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
            for (name, engine), obj in engines.items():
                if engine == "edgeformer":
                    fn = lambda obj=obj: obj.run({"input_ids": ids, "attention_mask": mask})  # noqa: E731
                else:
                    def fn(obj=obj):
                        with torch.no_grad():
                            obj(tids, tmask)
                cell = time_cell(fn, warmup_runs=2, warmup_time=0.3, repeat=5, min_time=args.min_time)
                cells.setdefault(f"{name}|{engine}|{length}", []).append(cell["median_ms"])
        # one attention op alone: 24 heads of the wide model, packed (S, 3*H*dh) input
        from edgeformer.batch import Batch
        from edgeformer.ops.attention import SoftmaxAttention
        from edgeformer.workers import Workers

        wide = engines[("wide", "edgeformer")]
        node = next(n for n in wide.graph.nodes if n.op == "attention")
        heads, dh = node.attrs["num_heads"], node.attrs["head_dim"]
        for length in LENGTHS:
            qkv = rng.standard_normal((length, 3 * heads * dh)).astype(np.float32)  # (S, 3*H*dh)
            out = np.empty((length, heads * dh), dtype=np.float32)  # (S, H*dh)
            batch = Batch.from_mask(None, 1, length)
            for threads in sorted({1, args.threads}):
                workers = Workers(threads)
                kind = SoftmaxAttention(node, heads, dh)
                cell = time_cell(lambda: kind(qkv, batch, out, workers), 2, 0.3, 5, args.min_time)
                cells.setdefault(f"attention|{threads}|{length}", []).append(cell["median_ms"])
    return {"threads": args.threads, "cells": {k: median(v) for k, v in cells.items()}, "runs": cells}


def agreement(model_file: Path, checkpoint: Path, data: Path, length: int) -> dict:
    """edgeformer's test-split predictions against PyTorch's (train.py saved its test logits)."""
    import numpy as np

    import edgeformer
    from bench.langid import corpus
    from bench.langid.train import heads_of

    files, labels, _ = corpus.load(data, "test")
    ids, mask = heads_of(files, length)
    model = edgeformer.load(model_file)
    got = np.concatenate([model.run({"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]})["logits"]
                          for i in range(0, len(ids), 16)])  # (F, C)
    want = np.load(checkpoint / "test_logits.npy")  # (F, C)
    return {"files": int(len(files)), "same_predictions": int((got.argmax(1) == want.argmax(1)).sum()),
            "max_abs_logit_diff": float(np.abs(got - want).max()),
            "edgeformer_accuracy": float((got.argmax(1) == labels).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deep", required=True, help="checkpoint directory of the deep model (train.py --out)")
    ap.add_argument("--wide", required=True, help="checkpoint directory of the wide model")
    ap.add_argument("--data", type=Path, help="the corpus directory: check edgeformer's test predictions against PyTorch's")
    ap.add_argument("--thread-counts", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--deep-file", help=argparse.SUPPRESS)
    ap.add_argument("--wide-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0

    import subprocess

    from converters.hf import convert_hf_directory

    report = {"machine": machine_info(), "models": {}, "latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("deep", "wide"):
            files[name] = convert_hf_directory(getattr(args, name), Path(tmp) / f"{name}.edgeformer")
            metrics = json.loads((Path(getattr(args, name)) / "metrics.json").read_text())
            report["models"][name] = {k: v for k, v in metrics.items() if k != "history"}
            report["models"][name]["file_bytes"] = files[name].stat().st_size
            if args.data:
                report["models"][name]["agreement"] = agreement(files[name], Path(getattr(args, name)), args.data,
                                                                metrics["logits_length"])
        for threads in [int(t) for t in args.thread_counts.split(",")]:
            result = Path(tmp) / f"r{threads}.json"
            cmd = pin_prefix(threads) + [sys.executable, __file__, "--worker", "--threads", str(threads),
                                         "--deep", args.deep, "--wide", args.wide, "--deep-file", str(files["deep"]),
                                         "--wide-file", str(files["wide"]), "--rounds", str(args.rounds),
                                         "--min-time", str(args.min_time), "--result", str(result)]
            subprocess.run(cmd, env=thread_env(threads), check=True)
            report["latency"][threads] = json.loads(result.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wide.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.out / "wide.md").write_text(md)
    print(md)
    return 0


def markdown(report) -> str:
    m = report["models"]
    lines = ["# Wide (1 layer) vs deep byte classifiers: language of a file from its first bytes", "",
             f"CPU: {report['machine'].get('model_name')}; batch 1; medians of per-round medians; "
             "edgeformer and PyTorch in the same pinned process.", "",
             "| model | layers x heads | head width | parameters | file bytes | test accuracy, first 256 / 512 / 1024 bytes |",
             "|---|---|---|---|---|---|"]
    for name in ("deep", "wide"):
        r = m[name]
        acc = " / ".join(f"{100 * v:.2f} %" for _, v in sorted(r["test_accuracy_by_length"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {name} | {r['layers']} x {r['heads_per_layer']} | {r['attention_size'] // r['heads_per_layer']} "
                     f"| {r['parameters']:,} | {r['file_bytes']:,} | {acc} ({r['test_files']} files) |")
    ctx = str(m["wide"]["context_bytes"])
    diff = m["wide"]["test_accuracy_by_length"][ctx] - m["deep"]["test_accuracy_by_length"][ctx]
    lines += ["", f"Both were trained on {ctx}-byte windows. wide / deep parameters: "
              f"{m['wide']['parameters'] / m['deep']['parameters']:.2f}; accuracy difference (wide - deep) at {ctx} bytes: "
              f"{100 * diff:+.2f} points",
              *[f"{name}: edgeformer and PyTorch agree on {a['same_predictions']} of {a['files']} test predictions "
                f"(max |logit difference| {a['max_abs_logit_diff']:.1e})"
                for name, a in ((n, m[n].get("agreement")) for n in ("deep", "wide")) if a],
              "", "| threads | bytes | edgeformer deep ms | edgeformer wide ms | deep/wide | PyTorch deep ms | PyTorch wide ms "
              "| deep/wide | edgeformer vs PyTorch (wide) |", "|---|---|---|---|---|---|---|---|---|"]
    for threads, r in report["latency"].items():
        c = r["cells"]
        for length in LENGTHS:
            ed, ew = c[f"deep|edgeformer|{length}"], c[f"wide|edgeformer|{length}"]
            td, tw = c[f"deep|torch|{length}"], c[f"wide|torch|{length}"]
            lines.append(f"| {threads} | {length} | {ed:.2f} | {ew:.2f} | **{ed / ew:.2f}x** | {td:.2f} | {tw:.2f} | "
                         f"{td / tw:.2f}x | {tw / ew:.2f}x faster |")
    lines += ["", "Attention op alone (the wide model's heads, one sequence): work items = sequence x head, split over threads.",
              "", "| bytes | 1 thread ms | 2 threads ms | speedup |", "|---|---|---|---|"]
    two = report["latency"].get(2) or report["latency"].get("2")
    if two:
        for length in LENGTHS:
            a1, a2 = two["cells"][f"attention|1|{length}"], two["cells"][f"attention|2|{length}"]
            lines.append(f"| {length} | {a1:.2f} | {a2:.2f} | {a1 / a2:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
