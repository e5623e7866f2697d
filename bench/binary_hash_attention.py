#!/usr/bin/env python3
"""Binary-hash (EcoFormer) attention against edgeformer's softmax attention, one thread.

    python bench/binary_hash_attention.py                 # attention-only N = 128..8192, dh 32 and 64, + end to end
    python bench/binary_hash_attention.py --smoke         # tiny sizes, numbers are noise
    python bench/binary_hash_attention.py --threshold     # linear vs quadratic form at short lengths
                                                          # (sets kernels/binary_hash.QUADRATIC_MAX_LEN)

1. attention only: one sequence of N tokens, H heads of width dh, b = 16 bits, m = 25 anchors (EcoFormer's
   defaults); the kernels are called directly (kernels.attention.attention_softmax on [Q | K | V] and
   kernels.binary_hash.binary_hash_attention on [U | V], shared QK as in EcoFormer, auto form) with the
   same work range; hashing is included in the binary-hash time. Medians of --repeats calls after a warm-up.
2. end to end: a random long-sequence encoder (converters.ecoformer.EcoEncoder: 2 blocks, d = 128, 4 heads
   of 32) with every attention binary_hash against the same model with softmax attention, Model.run on
   1 x N token ids, threads=1.
The acceptance targets of the issue: >= 10x faster than softmax at N = 4096, faster from N = 512 on.
Results: JSON + Markdown in bench/results/ (binary_hash_attention.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402

import edgeformer  # noqa: E402,F401
from edgeformer import blas  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hash_weights(rng, H, m, dh, b):
    from edgeformer.ops.attention_binary_hash import hash_weights as prepare

    anchors = rng.standard_normal((H, m, dh))
    anchors /= np.linalg.norm(anchors, axis=-1, keepdims=True)
    return prepare("bench", anchors, rng.uniform(0, 0.5, (H, m)), rng.standard_normal((H, b, m)), H, dh)


def attention_only(sizes, head_dims, heads, nbits, m, repeats, rng):
    from edgeformer.kernels.attention import attention_softmax
    from edgeformer.kernels.binary_hash import QUADRATIC_MAX_LEN, binary_hash_attention

    rows = []
    for dh in head_dims:
        an, asq, mv, a_t, b = hash_weights(rng, heads, m, dh, nbits)
        for n in sizes:
            D = heads * dh
            cu = np.array([0, n], np.int64)
            qkv = rng.standard_normal((n, 3 * D)).astype(np.float32)
            uv = np.ascontiguousarray(np.concatenate([qkv[:, :D], qkv[:, 2 * D :]], axis=1))
            out = np.empty((n, D), np.float32)
            reps = max(3, repeats if n <= 2048 else repeats // 3)
            t_soft = median_time(lambda: attention_softmax(qkv, cu, heads, dh, 1.0 / np.sqrt(dh), False, out, 0,
                                                           heads), reps)
            t_hash = median_time(lambda: binary_hash_attention(uv, cu, heads, dh, 0, 0, D, True, an, asq, mv, a_t, b,
                                                               float(b + 1), False, QUADRATIC_MAX_LEN, out, 0, heads),
                                 reps)
            row = {"N": n, "head_dim": dh, "heads": heads, "nbits": b, "m": m, "softmax_ms": t_soft * 1e3,
                   "binary_hash_ms": t_hash * 1e3, "speedup": t_soft / t_hash}
            rows.append(row)
            print(f"attention N={n:5d} dh={dh:3d} H={heads}: softmax {row['softmax_ms']:9.3f} ms  binary_hash "
                  f"{row['binary_hash_ms']:8.3f} ms  x{row['speedup']:.1f}", flush=True)
    return rows


def threshold(lengths, head_dims, nbits, m, repeats, rng, sequences=64):
    """Per-item time of the quadratic and the linear form at short lengths (many sequences per call)."""
    from edgeformer.kernels.binary_hash import binary_hash_attention

    rows = []
    for dh in head_dims:
        an, asq, mv, a_t, b = hash_weights(rng, 1, m, dh, nbits)
        for L in lengths:
            cu = (np.arange(sequences + 1) * L).astype(np.int64)
            uv = rng.standard_normal((int(cu[-1]), 2 * dh)).astype(np.float32)
            out = np.empty((int(cu[-1]), dh), np.float32)
            res = {}
            for name, quad in (("quadratic", 1 << 62), ("linear", 0)):
                res[name] = median_time(lambda: binary_hash_attention(uv, cu, 1, dh, 0, 0, dh, True, an, asq, mv, a_t,
                                                                      b, float(b + 1), False, quad, out, 0, sequences),
                                        repeats) / sequences * 1e6
            rows.append({"L": L, "head_dim": dh, "quadratic_us": res["quadratic"], "linear_us": res["linear"]})
            print(f"threshold L={L:4d} dh={dh}: quadratic {res['quadratic']:.2f} us  linear {res['linear']:.2f} us",
                  flush=True)
    return rows


def end_to_end(sizes, repeats, tmp):
    import torch

    from converters.ecoformer import EcoEncoder, save_edgeformer

    torch.manual_seed(0)
    rows = []
    max_len = max(sizes)
    cfg = dict(vocab_size=100, dim=128, num_heads=4, depths=[2], max_len=max_len, num_classes=10, nbits=16, m=25)
    paths = {}
    for kind in ("ecoformer", "msa"):
        model = EcoEncoder(attn_types=[kind], **cfg).eval()
        for fa in model.attention_modules():
            with torch.no_grad():
                fa.ksh.anchor.copy_(torch.nn.functional.normalize(torch.randn_like(fa.ksh.anchor), dim=-1))
            fa.is_trained = True
        paths[kind] = save_edgeformer(model, Path(tmp) / f"{kind}.edgeformer")
    models = {k: edgeformer.load(p, threads=1) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    for n in sizes:
        ids = rng.integers(0, 100, (1, n))
        reps = max(3, repeats if n <= 2048 else repeats // 3)
        t = {k: median_time(lambda k=k: models[k].run({"input_ids": ids}), reps) for k in models}
        row = {"N": n, "softmax_ms": t["msa"] * 1e3, "binary_hash_ms": t["ecoformer"] * 1e3,
               "speedup": t["msa"] / t["ecoformer"]}
        rows.append(row)
        print(f"end to end N={n:5d}: softmax model {row['softmax_ms']:9.2f} ms  binary_hash model "
              f"{row['binary_hash_ms']:8.2f} ms  x{row['speedup']:.1f}", flush=True)
    for m in models.values():
        m.close()
    return rows


def markdown(result) -> str:
    lines = [f"# Binary-hash vs softmax attention ({result['cpu']}, {result['threads']} thread)", ""]
    if result.get("attention"):
        lines += ["## Attention only (one sequence, kernels called directly)", "",
                  "| N | head dim | heads | softmax ms | binary_hash ms | speedup |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['head_dim']} | {r['heads']} | {r['softmax_ms']:.3f} | {r['binary_hash_ms']:.3f} | "
                  f"{r['speedup']:.1f}x |" for r in result["attention"]]
    if result.get("end_to_end"):
        lines += ["", "## End to end (2-block encoder, d=128, 4 heads, Model.run 1 x N)", "",
                  "| N | softmax model ms | binary_hash model ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['softmax_ms']:.2f} | {r['binary_hash_ms']:.2f} | {r['speedup']:.1f}x |"
                  for r in result["end_to_end"]]
    if result.get("threshold"):
        lines += ["", "## Quadratic vs linear form, per (sequence, head) item", "",
                  "| L | head dim | quadratic us | linear us |", "|---|---|---|---|"]
        lines += [f"| {r['L']} | {r['head_dim']} | {r['quadratic_us']:.2f} | {r['linear_us']:.2f} |"
                  for r in result["threshold"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--head-dims", default="32,64")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--nbits", type=int, default=16)
    p.add_argument("--anchors", type=int, default=25)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--e2e-sizes", default="512,2048,4096")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--threshold", action="store_true", help="only the linear-vs-quadratic sweep")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no result files")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    blas.pin_blas_to_one_thread()
    rng = np.random.default_rng(0)
    head_dims = [int(x) for x in args.head_dims.split(",")]
    result = {"cpu": cpu_name(), "threads": 1, "python": sys.version.split()[0], "nbits": args.nbits,
              "anchors": args.anchors}
    if args.smoke:
        args.sizes, args.e2e_sizes, args.repeats = "64,256", "64,128", 2
    if args.threshold:
        result["threshold"] = threshold([4, 8, 12, 16, 24, 32, 48, 64, 128], head_dims, args.nbits, args.anchors,
                                        args.repeats, rng)
    else:
        sizes = [int(x) for x in args.sizes.split(",")]
        result["attention"] = attention_only(sizes, head_dims, args.heads, args.nbits, args.anchors, args.repeats, rng)
        if not args.no_e2e:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                result["end_to_end"] = end_to_end([int(x) for x in args.e2e_sizes.split(",")], args.repeats, tmp)
    text = markdown(result)
    print(text)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "binary_hash_threshold" if args.threshold else "binary_hash_attention"
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        (out / f"{name}.md").write_text(text)
        print(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
