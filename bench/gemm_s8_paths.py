#!/usr/bin/env python3
"""int8 GEMM paths on this CPU: micro-kernel peak and whole linears, against fp32, in one run.

    taskset -c 1 python bench/gemm_s8_paths.py               # writes bench/results/gemm_s8_paths.{json,md}
    taskset -c 1 python bench/gemm_s8_paths.py --rounds 20 --out /tmp/r

1. micro  every runnable int8 path's micro-kernel in a loop over 126 rows x K of activations and all
          panels of B (the activations stay in L2, a panel in L1, the tile in L1): the kernel's own rate.
2. linear the whole int8 linear as the runtime calls it (per-token quantisation, GEMM, fused store, bias,
          activation) for the MiniLM shapes (128 tokens: QKV 384->1152, FFN up 384->1536 + GELU, FFN down
          1536->384), against edgeformer's fp32 linear and numpy's fp32 BLAS on the same input.
Every measurement of a shape runs the candidates call by call in a random order per round (the host's speed
drifts); GOP/s = 2*M*K*N / median time. 1 thread: pin the process yourself.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from edgeformer.kernels import gemm_f32 as f32  # noqa: E402
from edgeformer.kernels import gemm_s8 as g  # noqa: E402
from edgeformer.kernels.mathfn import ACT_GELU_ERF, ACT_NONE  # noqa: E402

NO_VEC = np.zeros(0, np.float32)
NO_MAT = np.zeros((0, 0), np.float32)
NO_RAW = np.zeros((0, 0), np.int32)


def micro_loop(path, mr):
    @numba.njit(nogil=True)
    def loop(aflat, lda, rows, wflat, pstride, k4, tile, width, zp, cs, panels, npn):
        for p in range(0, panels - npn + 1, npn):
            for b0 in range(0, rows - mr + 1, mr):
                g._micro_s8(path, mr, aflat, b0 * lda, lda, wflat, p * pstride, pstride, k4, tile, 0, width, zp, 0,
                            cs, p * 16)
    return loop


def interleaved(fns: dict, rounds: int, rng) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    names = list(fns)
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            t = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    paths = g.available_paths()
    res = {"machine": f"{platform.machine()} {cpu_name()}", "date": time.strftime("%Y-%m-%d %H:%M"),
           "selected": g.PATH_NAMES[g.select_path()], "paths": [g.PATH_NAMES[q] for q in paths],
           "micro": {}, "linear": {}}

    rows = 126  # a multiple of every path's MR (2, 4, 6)
    for k, n in ((384, 1536), (1536, 384)):
        w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        wp, cs = g.pack_weight(w), None
        cs = g.column_sums(wp)
        a = rng.integers(0, 256, size=(rows, wp.shape[1] * 4)).astype(np.uint8)
        zp = np.zeros(rows, np.int32)
        fns = {}
        for q in paths:
            mr, npn = g.path_blocking(q)
            src = a.astype(np.int16) if q in g.A16_PATHS else a
            tile = np.zeros(mr * npn * 16, np.int32)
            loop = micro_loop(q, mr)
            fns[g.PATH_NAMES[q]] = (lambda loop=loop, src=src, tile=tile, npn=npn:
                                    loop(src.reshape(-1), src.shape[1], rows, wp.reshape(-1), wp.shape[1] * 64,
                                         wp.shape[1], tile, npn * 16, zp, cs, wp.shape[0], npn))
        med = interleaved(fns, args.rounds, rng)
        res["micro"][f"{rows}x{k}x{n}"] = {name: 2 * rows * k * n / t / 1e9 for name, t in med.items()}

    m = 128
    for label, k, n, act in (("QKV 384->1152", 384, 1152, ACT_NONE), ("FFN up 384->1536 + GELU", 384, 1536, ACT_GELU_ERF),
                             ("FFN down 1536->384", 1536, 384, ACT_NONE)):
        wf = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        wq, ws = g.quantize_weight(wf)
        wp = g.pack_weight(wq)
        cs = g.column_sums(wp)
        wpf = f32.pack_weight(wf)
        wt = np.ascontiguousarray(wf.T)
        x = rng.standard_normal((m, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        aq = np.empty((m, wp.shape[1] * 4), np.uint8)
        sa, zpr = np.empty(m, np.float32), np.empty(m, np.int32)
        outs = {}
        fns = {}
        for q in paths:
            kern = g.linear_q(q)
            o = outs.setdefault(q, np.empty((m, n), np.float32))
            fns[f"int8 {g.PATH_NAMES[q]}"] = (lambda kern=kern, o=o: kern(x, 1, NO_VEC, 1, aq, sa, zpr, wp, cs, ws, n,
                                                                          bias, NO_MAT, act, o, NO_RAW, 0, m, 0,
                                                                          wp.shape[0]))
        of = np.empty((m, n), np.float32)
        fns["fp32 edgeformer"] = lambda: f32.linear_packed_f32(x, wpf, n, bias, NO_MAT, act, of, 0, m, 0, wpf.shape[0])
        ob = np.empty((m, n), np.float32)
        fns["fp32 numpy BLAS (no bias/act)"] = lambda: np.dot(x, wt, out=ob)
        med = interleaved(fns, args.rounds, rng)
        ref = outs[paths[0]]
        for q in paths[1:]:  # every path computes the same integers, so the same floats
            assert np.array_equal(outs[q], ref), g.PATH_NAMES[q]
        res["linear"][f"{m}x{k}x{n} {label}"] = {name: {"ms": t * 1e3, "gops": 2 * m * k * n / t / 1e9}
                                                  for name, t in med.items()}

    lines = ["# int8 GEMM paths", "", f"{res['machine']}; 1 thread; {res['date']}; selected path {res['selected']}; "
             f"runnable paths {', '.join(res['paths'])}; median of {args.rounds} rounds, candidates interleaved "
             "in a random order per round", "", "## Micro-kernel loop (GOP/s)", "",
             "| rows x K x N | " + " | ".join(res["paths"]) + " |", "|---" * (1 + len(res["paths"])) + "|"]
    for shape, v in res["micro"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{v[name]:.1f}" for name in res["paths"]) + " |")
    names = list(next(iter(res["linear"].values())))
    lines += ["", "## Whole linear, 128 tokens (ms, GOP/s)", "", "| shape | " + " | ".join(names) + " |",
              "|---" * (1 + len(names)) + "|"]
    for shape, v in res["linear"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{v[nm]['ms']:.3f} ({v[nm]['gops']:.0f})" for nm in names) + " |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_s8_paths.json").write_text(json.dumps(res, indent=2))
    (out / "gemm_s8_paths.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
