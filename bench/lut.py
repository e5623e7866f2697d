#!/usr/bin/env python3
"""Table projections ("lut" weight format) against dense fp32 and dense int8 linears: tokens/s and bytes.

    taskset -c 1 python bench/lut.py                       # full run: 3 shapes x T = 1, 8, 128
    python bench/lut.py --shapes 48x96 --tokens 1,8 --repeat 5 --quick     # smoke run

Each layer maps d_in -> d_out. Formats, all through the runtime's weight-format registry (ops/linear.py),
called exactly as a linear node calls them (Workers pool, fresh output):
    dense-fp32   "fp32"  packed fp32 weights (kernels/gemm_f32.py)
    dense-int8   "int8"  per-channel int8 weights, activations quantised per token (kernels/gemm_s8.py)
    lut-fp32/fp16/int8   "lut" sign encoder, K = d_in / tau tables of 2^tau rows (tau = 8, MemoryFormer),
                 official weights; tables float32 / float16 bits / int8 + per-row scale
Inputs are realistic: a pool of --pool different random (T, d_in) batches is cycled, so every call hashes
different tokens and gathers different table rows (the same input every call keeps the gathered rows in
cache and overstates the table formats, numba.md §3). All formats alternate call by call in this one process;
the median of --repeat calls is reported. Bytes per layer = the tensors the format reads (weights, scales,
bias). Results: bench/results/lut.json and lut.md (also printed), with the crossover: the largest T at which
each table format is still faster than dense fp32 / dense int8.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402

TAU = 8
FORMATS = ("dense-fp32", "dense-int8", "lut-fp32", "lut-fp16", "lut-int8")


def _ro(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def build_formats(d_in: int, d_out: int, seed: int = 0) -> dict:
    """{format name: (callable fmt(x, residual, act, out, workers), bytes of its tensors)}."""
    from converters.quantize import int8_linear
    from edgeformer.functional.memory_layer import compact_tables
    from edgeformer.graph import Node
    from edgeformer.ops.linear import FORMATS as REG

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b = _ro((rng.standard_normal(d_out) * 0.1).astype(np.float32))
    out = {}
    node = Node("linear", "dense", ["x"], ["y"], {"weight": "w", "bias": "b"}, {})
    out["dense-fp32"] = (REG["fp32"](node, {"weight": _ro(w), "bias": b}), w.nbytes + b.nbytes)
    tensors = {}
    roles, attrs = int8_linear(tensors, "q", w, b)
    weights = {role: _ro(tensors[name]) for role, name in roles.items()}
    node = Node("linear", "q", ["x"], ["y"], roles, attrs)
    out["dense-int8"] = (REG["int8"](node, weights), sum(a.nbytes for a in weights.values()))
    if d_in % TAU:
        raise SystemExit(f"d_in {d_in} is not a multiple of tau = {TAU}")
    k = d_in // TAU
    tables = (rng.standard_normal((k << TAU, d_out)) / np.sqrt(k)).astype(np.float32)
    for dt in ("fp32", "fp16", "int8"):
        stored, scale = compact_tables(tables, dt)
        weights = {"tables": _ro(stored), "bias": b}
        if scale is not None:
            weights["table_scale"] = _ro(scale)
        node = Node("linear", f"lut-{dt}", ["x"], ["y"], {r: r for r in weights},
                    {"format": "lut", "table_dtype": dt, "num_tables": k, "code_length": TAU})
        out[f"lut-{dt}"] = (REG["lut"](node, weights), sum(a.nbytes for a in weights.values()))
    del tables
    return out


def bench_shape(d_in, d_out, tokens, repeat, pool, workers, warmup) -> list[dict]:
    from edgeformer.ops.base import NO_MATRIX

    formats = build_formats(d_in, d_out)
    rows = []
    for t in tokens:
        rng = np.random.default_rng(t)
        inputs = [rng.standard_normal((t, d_in)).astype(np.float32) for _ in range(pool)]
        times = {name: [] for name in formats}
        for i in range(warmup + repeat):
            x = inputs[i % pool]
            for name, (fmt, _) in formats.items():  # alternate formats call by call
                out = np.empty((t, d_out), np.float32)
                start = time.perf_counter()
                fmt(x, NO_MATRIX, 0, out, workers)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed)
        for name, (_, nbytes) in formats.items():
            med = statistics.median(times[name])
            rows.append({"d_in": d_in, "d_out": d_out, "T": t, "format": name, "median_s": med,
                         "tokens_per_s": t / med, "bytes": int(nbytes)})
    return rows


def crossover(rows) -> list[str]:
    lines = []
    for (d_in, d_out) in sorted({(r["d_in"], r["d_out"]) for r in rows}, key=lambda s: s[0] * s[1]):
        cell = {(r["format"], r["T"]): r for r in rows if (r["d_in"], r["d_out"]) == (d_in, d_out)}
        ts = sorted({r["T"] for r in rows if (r["d_in"], r["d_out"]) == (d_in, d_out)})
        for lut in ("lut-fp32", "lut-fp16", "lut-int8"):
            for dense in ("dense-fp32", "dense-int8"):
                ratios = [cell[(lut, t)]["tokens_per_s"] / cell[(dense, t)]["tokens_per_s"] for t in ts]
                wins = [t for t, q in zip(ts, ratios) if q > 1]
                detail = ", ".join(f"T={t}: {q:.2f}x" for t, q in zip(ts, ratios))
                if not wins:
                    verdict = "never faster"
                elif wins == ts:
                    verdict = f"faster at every T measured (up to T={ts[-1]})"
                else:
                    verdict = f"faster up to T={max(wins)}" if wins == ts[:len(wins)] else f"faster at T in {wins}"
                lines.append(f"{d_in}x{d_out}: {lut} vs {dense}: {verdict} ({detail})")
    return lines


def markdown(rows, info, cross) -> str:
    lines = [f"# lut vs dense linears ({info['cpu']}, {info['threads']} thread(s))", "",
             f"numba {info['numba']}, numpy {info['numpy']}, repeat {info['repeat']}, input pool {info['pool']}, "
             f"tau = {TAU}", "",
             "| d_in x d_out | T | format | tokens/s | median ms | ratio vs dense-fp32 | MiB per layer |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["d_in"], r["d_out"], r["T"]): r["tokens_per_s"] for r in rows if r["format"] == "dense-fp32"}
    for r in rows:
        ratio = r["tokens_per_s"] / base[(r["d_in"], r["d_out"], r["T"])]
        lines.append(f"| {r['d_in']}x{r['d_out']} | {r['T']} | {r['format']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['median_s'] * 1e3:.3f} | {ratio:.2f} | {r['bytes'] / 2 ** 20:.2f} |")
    lines += ["", "## Crossover", ""] + [f"- {c}" for c in cross]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="384x1536,1536x384,768x3072", help="comma-separated d_inxd_out")
    p.add_argument("--tokens", default="1,8,128", help="comma-separated tokens per call")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pool", type=int, default=64, help="distinct input batches cycled (realistic gathers)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="repeat 7, pool 8")
    p.add_argument("--out", default=str(HERE / "results" / "lut"), help="results path stem (.json, .md)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.pool = 7, 8
    import numba

    from edgeformer import blas
    from edgeformer.workers import Workers

    blas.pin_blas_to_one_thread()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    info = {"cpu": cpu_name(), "threads": args.threads, "numba": numba.__version__, "numpy": np.__version__,
            "repeat": args.repeat, "pool": args.pool, "affinity": sorted(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else None}
    print(f"CPU {info['cpu']}; threads {args.threads}; affinity {info['affinity']}; shapes {shapes}; T {tokens}")
    workers = Workers(args.threads)
    rows = []
    try:
        for d_in, d_out in shapes:
            shape_rows = bench_shape(d_in, d_out, tokens, args.repeat, args.pool, workers, args.warmup)
            rows += shape_rows
            for r in shape_rows:
                print(f"{d_in}x{d_out} T={r['T']:<4} {r['format']:<11} {r['tokens_per_s']:>12,.0f} tok/s  "
                      f"{r['median_s'] * 1e3:8.3f} ms  {r['bytes'] / 2 ** 20:8.2f} MiB")
    finally:
        workers.close()
    cross = crossover(rows)
    print("\n".join(cross))
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows, "crossover": cross}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, info, cross))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
