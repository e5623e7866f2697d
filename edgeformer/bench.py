"""`edgeformer bench MODEL`: latency medians over shapes and thread counts, as text or JSON.

Timing method: warm-up runs first (at least ``--warmup`` runs and 0.3 s), then timed runs until both
``--repeat`` runs and ``--min-time`` seconds are reached; the median and quartiles are reported.
Inputs are random ordinary token ids with an all-ones mask (or ``--pad-fraction`` of padding).
"""
from __future__ import annotations

import json
import platform
import time

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("--shapes", default="1x16,1x128,8x128", help="comma-separated BATCHxSEQ (default 1x16,1x128,8x128)")
    p.add_argument("--thread-counts", default=None, help="comma-separated thread counts (default: --threads)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per cell at least")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--vs", default="", help="baselines in the same process: onnxruntime,torch (need --source); "
                                             "unfused: this model loaded with --no-fuse")
    p.add_argument("--source", help="Hugging Face checkpoint directory the model was converted from (for --vs)")
    p.set_defaults(func=cmd_bench)


def random_feeds(batch: int, seq: int, vocab: int, rng, pad_fraction: float = 0.0) -> dict[str, np.ndarray]:
    low, high = (1000, min(vocab, 29000)) if vocab > 2000 else (1, vocab)  # ordinary word pieces of a BERT vocab
    ids = rng.integers(low, high, size=(batch, seq), dtype=np.int64)  # (B, S)
    mask = np.ones((batch, seq), dtype=np.int64)  # (B, S)
    if pad_fraction > 0:
        lengths = np.maximum(1, (seq * (1 - pad_fraction) * rng.uniform(0.5, 1.5, batch)).astype(int).clip(1, seq))
        for row, length in enumerate(lengths):
            mask[row, length:] = 0
            ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def time_call(fn, warmup: int, repeat: int, min_time: float) -> dict:
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < 0.3:
        fn()
        done += 1
    samples = []
    start = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    ms = np.array(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p25_ms": float(np.percentile(ms, 25)),
            "p75_ms": float(np.percentile(ms, 75)), "runs": len(samples)}


def cmd_bench(args) -> int:
    import edgeformer

    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    thread_counts = [int(t) for t in args.thread_counts.split(",")] if args.thread_counts else [args.threads or 1]
    baselines = [b for b in args.vs.split(",") if b and b != "unfused"]
    rng = np.random.default_rng(0)
    results = []
    for threads in thread_counts:
        model = edgeformer.load(args.model, threads=threads, fuse=not args.no_fuse)
        vocab = _vocab_size(model)
        engines = {"edgeformer": None}
        if "unfused" in args.vs.split(","):  # the same file without load-time fusion, same process
            unfused = edgeformer.load(args.model, threads=threads, fuse=False)
            engines["unfused"] = lambda feeds, m=unfused: m.run(feeds, outputs=["last_hidden_state"])
        if baselines:
            engines.update(_baseline_maker()(baselines, args.source, threads, model))
        for batch, seq in shapes:
            feeds = random_feeds(batch, seq, vocab, rng)
            feeds = {k: v for k, v in feeds.items() if k in {s.name for s in model.inputs}}
            # interleave engines cell by cell so drifts of the machine hit them alike
            for name, engine in engines.items():
                fn = (lambda: model.run(feeds, outputs=["last_hidden_state"])) if engine is None else \
                    (lambda engine=engine: engine(feeds))
                cell = {"engine": name, "threads": threads, "shape": f"{batch}x{seq}"}
                cell.update(time_call(fn, args.warmup, args.repeat, args.min_time))
                results.append(cell)
                print(f"{name:12} {threads}t {batch}x{seq:<5} median {cell['median_ms']:9.3f} ms "
                      f"(p25 {cell['p25_ms']:.3f}, p75 {cell['p75_ms']:.3f}, {cell['runs']} runs)", flush=True)
        model.close()
    report = {"model": str(args.model), "cpu": platform.processor() or platform.machine(),
              "python": platform.python_version(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _baseline_maker():
    """The baselines (ONNX Runtime, PyTorch) live with the converters, registered as an entry point,
    so that the runtime never imports torch or onnxruntime."""
    from importlib import metadata

    from edgeformer.errors import EdgeformerError

    for entry in metadata.entry_points(group="edgeformer.baselines"):
        return entry.load()
    raise EdgeformerError("--vs needs the converters' extras: pip install 'edgeformer[bench]'")


def _vocab_size(model) -> int:
    for node in model.graph.nodes:
        if node.op == "embedding":
            return int(model.tensors[node.weights["word"]].shape[0])
    return 30000
