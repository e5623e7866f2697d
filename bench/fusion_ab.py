"""Load-time fusion, measured: one model file loaded with and without fusion (edgeformer/fusion.py), timed
call by call in the same process, in a random order per round, so that the host's drift hits both alike.

    taskset -c 1 python bench/fusion_ab.py MODEL.edgeformer --shapes 1x16,1x128,8x128 --rounds 300

Prints, per shape, the median latency of each and the ratio fused / unfused [median of the per-round
ratios]; --out writes the same as Markdown. Inputs: random ordinary token ids, no padding.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

import edgeformer
from edgeformer.bench import _vocab_size, random_feeds


def measure(path, shapes, rounds, threads, seed=0):
    models = {"fused": edgeformer.load(path, threads=threads), "unfused": edgeformer.load(path, threads=threads, fuse=False)}
    vocab = _vocab_size(models["fused"])
    rng = np.random.default_rng(seed)
    rows = []
    for batch, seq in shapes:
        feeds = random_feeds(batch, seq, vocab, rng)
        feeds = {k: v for k, v in feeds.items() if k in {s.name for s in models["fused"].inputs}}
        for m in models.values():
            for _ in range(3):
                m.run(feeds)
        n = rounds if batch * seq <= 256 else max(20, rounds // (batch * seq // 128))
        times = {k: [] for k in models}
        for _ in range(n):
            for name in rng.permutation(list(models)):
                start = time.perf_counter()
                models[name].run(feeds)
                times[name].append(time.perf_counter() - start)
        fused, unfused = np.array(times["fused"]), np.array(times["unfused"])
        rows.append({"shape": f"{batch}x{seq}", "fused_ms": 1e3 * float(np.median(fused)),
                     "unfused_ms": 1e3 * float(np.median(unfused)),
                     "ratio": float(np.median(fused) / np.median(unfused)), "paired": float(np.median(fused / unfused)),
                     "rounds": n, "fused_layers": len(models["fused"].fused_layers)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--shapes", default="1x16,1x128,8x128")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write a Markdown table here")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    rows = measure(args.model, shapes, args.rounds, args.threads)
    lines = [f"# fused vs unfused steps: {Path(args.model).name}", "",
             f"{platform.machine()}; {args.threads} thread(s); {time.strftime('%Y-%m-%d %H:%M')}; "
             f"{rows[0]['fused_layers']} fused encoder layers; calls interleaved in a random order per round", "",
             "| shape | fused ms | unfused ms | fused / unfused [median of per-round ratios] | rounds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} | {r['ratio']:.3f} [{r['paired']:.3f}] | "
              f"{r['rounds']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
