"""`edgeformer convert` and `edgeformer check`, registered into the runtime's CLI through the
``edgeformer.cli`` entry point (the runtime never imports the converters)."""
from __future__ import annotations

import time
from pathlib import Path

from edgeformer.errors import EdgeformerError


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint directory or an ONNX file")
    p.add_argument("src", help="checkpoint directory (config.json + model.safetensors) or model.onnx")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--quantize", choices=["dynamic-int8", "weights-int8"],
                   help="int8 linears: dynamic-int8 (int8 weights per channel, activations per token at run "
                        "time, int8 GEMM) or weights-int8 (int8 weights in the file, fp32 compute)")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="keep linears whose name matches this fnmatch pattern in fp32 (repeatable)")
    p.add_argument("--activation-quant", choices=["asymmetric", "symmetric"], default="asymmetric")
    p.add_argument("--weight-method", choices=["maxabs", "mse"], default="maxabs",
                   help="per-channel weight range: max |w| or the MSE-optimal clip")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="dynamic-int8: SmoothQuant strength, activation ranges measured on the bundled corpus "
                        "(0 turns it off; default 0.5)")
    p.add_argument("--no-embedding-int8", action="store_true",
                   help="when quantizing, keep the word-embedding table in fp32")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("check", help="run an ONNX model in ONNX Runtime (or onnx.reference) and edgeformer "
                                            "on the same feeds; print max abs and rel error per output")
    p.add_argument("onnx", help="the source model.onnx")
    p.add_argument("--model", help="an already converted model file (default: convert to a temp file)")
    p.add_argument("--feeds", help=".npz with input_ids / attention_mask / token_type_ids (default: random, padded)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_check)


def _convert(args) -> int:
    src, out = Path(args.src), Path(args.output)
    start = time.perf_counter()
    if src.is_dir():
        from converters.hf import convert_hf_directory

        convert_hf_directory(src, out, quantize=args.quantize, keep_fp32=tuple(args.keep_fp32),
                             activation_quant=args.activation_quant, weight_method=args.weight_method,
                             smooth_alpha=args.smooth_alpha, embedding_int8=not args.no_embedding_int8)
    elif src.suffix == ".onnx" and src.is_file():
        if args.quantize:
            raise EdgeformerError("--quantize is not supported for ONNX sources yet; convert the checkpoint directory")
        from converters.onnx_import import convert_onnx

        convert_onnx(src, out)
    else:
        raise EdgeformerError(f"{src} is neither a checkpoint directory nor an .onnx file")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


def _check(args) -> int:
    import numpy as np

    from converters.onnx_import import check_onnx

    feeds = None
    if args.feeds:
        with np.load(args.feeds, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    errors = check_onnx(args.onnx, args.model, feeds, batch=args.batch, seq=args.seq, threads=args.threads)
    worst = max((e["max_abs"] for e in errors.values()), default=0.0)
    return 0 if worst <= 1e-4 else 1
