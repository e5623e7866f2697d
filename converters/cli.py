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
    p.add_argument("--quantize", choices=["dynamic-int8", "static-int8", "weights-int8"],
                   help="int8 linears: dynamic-int8 (int8 weights per channel, activations per token at run "
                        "time, int8 GEMM), static-int8 (the same with one calibrated activation scale per "
                        "linear: --calib, --calib-method) or weights-int8 (int8 weights in the file, fp32 compute)")
    p.add_argument("--keep-fp32", action="append", default=[], metavar="PATTERN",
                   help="keep linears whose name matches this fnmatch pattern in fp32 (repeatable)")
    p.add_argument("--activation-quant", choices=["asymmetric", "symmetric"], default="asymmetric")
    p.add_argument("--weight-method", choices=["maxabs", "mse"], default="maxabs",
                   help="per-channel weight range: max |w| or the MSE-optimal clip")
    p.add_argument("--smooth-alpha", type=float, default=None,
                   help="SmoothQuant strength, activation ranges measured on the bundled corpus (static-int8: on "
                        "--calib) (0 turns it off; default 0.5 dynamic-int8, 0.75 static-int8)")
    p.add_argument("--calib-method", choices=["minmax", "percentile", "mse"], default=None,
                   help="static-int8: per-tensor activation range estimator (default minmax); --calib FILE (.npz "
                        "of input_ids/attention_mask/token_type_ids, or texts one per line) is the calibration set "
                        "(default: the bundled corpus)")
    p.add_argument("--calib-percentile", type=float, default=None, metavar="P",
                   help="static-int8 --calib-method percentile: the percentile kept (default 99.99)")
    p.add_argument("--attention-precision", choices=["fp32", "bf16"], default=None,
                   help="softmax attention's P V product: bf16 (probabilities and V rounded to bf16, float32 sums; "
                        "scores stay float32; used where the CPU has AVX512-BF16, fp32 elsewhere) or fp32. "
                        "Default: bf16 with --quantize dynamic-int8/static-int8, fp32 otherwise")
    p.add_argument("--no-embedding-int8", action="store_true",
                   help="when quantizing, keep the word-embedding table in fp32")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                   help="with --quantize: also convert an fp32 copy and print the per-linear error (cosine, SNR, "
                        "max abs error) against it; save it as JSON to PATH (default OUTPUT.report.json). "
                        "Runs over the bundled corpus, or random ids when the model has no tokenizer")
    p.add_argument("--report-texts", metavar="FILE", help="--report over these texts (one per line)")
    p.add_argument("--generic", action="store_true",
                   help="ONNX sources: run the whole graph as generic ops (plain NumPy, any supported ONNX op) "
                        "instead of fusing it into coarse ops; without it, generic ops are only the fallback")
    from converters import memoryformer  # noqa: F401  (registers model_type "memoryformer"; imports no torch)
    from converters.lut_fit import add_lut_arguments, lut_convert

    add_lut_arguments(p)  # --lut, --lut-layers, --lut-subdim, --lut-codebooks, --lut-tables, --lut-no-refit
    from converters.hash_fit import add_hash_arguments, hash_convert

    add_hash_arguments(p)  # --attention, --hash-bits, --anchors, --calib, --hash-layers
    p.set_defaults(func=_static_calib(hash_convert(lut_convert(_convert))))

    p = subparsers.add_parser("check", help="run an ONNX model in ONNX Runtime (or onnx.reference) and edgeformer "
                                            "on the same feeds; print max abs and rel error per output")
    p.add_argument("onnx", help="the source model.onnx")
    p.add_argument("--model", help="an already converted model file (default: convert to a temp file)")
    p.add_argument("--feeds", help=".npz with input_ids / attention_mask / token_type_ids (default: random, padded)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--atol", type=float, default=1e-4, help="max abs error accepted per output (default 1e-4)")
    p.add_argument("--trace", action="store_true",
                   help="always compare the intermediate tensors (default: only when an output exceeds --atol) "
                        "and name the first diverging one")
    p.set_defaults(func=_check)


def _static_calib(inner):
    """--calib is shared: static-int8 calibrates on it; hash_convert takes it only for --attention binary-hash,
    so static-int8 keeps it as args.quant_calib and hides it from hash_convert otherwise."""

    def run(args) -> int:
        static = args.quantize == "static-int8"
        if not static and (args.calib_method is not None or args.calib_percentile is not None):
            raise EdgeformerError("--calib-method and --calib-percentile need --quantize static-int8")
        args.quant_calib = args.calib if static else None
        if static and getattr(args, "attention", "softmax") != "binary-hash":
            args.calib = None
        return inner(args)

    return run


def _convert(args) -> int:
    src, out = Path(args.src), Path(args.output)
    if (args.report is not None or args.report_texts) and not args.quantize:
        raise EdgeformerError("--report and --report-texts need --quantize")
    if args.report_texts and args.report is None:
        args.report = ""
    start = time.perf_counter()
    if args.generic and src.is_dir():
        raise EdgeformerError("--generic applies to ONNX sources only")
    if src.is_dir():
        from converters.hf import convert_hf_directory

        convert_hf_directory(src, out, quantize=args.quantize, keep_fp32=tuple(args.keep_fp32),
                             activation_quant=args.activation_quant, weight_method=args.weight_method,
                             smooth_alpha=args.smooth_alpha, embedding_int8=not args.no_embedding_int8,
                             calib=getattr(args, "quant_calib", None), calib_method=args.calib_method or "minmax",
                             calib_percentile=99.99 if args.calib_percentile is None else args.calib_percentile,
                             attention_precision=args.attention_precision)
    elif src.suffix == ".onnx" and src.is_file():
        if args.quantize:
            raise EdgeformerError("--quantize is not supported for ONNX sources yet; convert the checkpoint directory")
        if args.attention_precision:
            raise EdgeformerError("--attention-precision applies to checkpoint directories")
        from converters.onnx_import import convert_onnx

        convert_onnx(src, out, generic=args.generic)
    else:
        raise EdgeformerError(f"{src} is neither a checkpoint directory nor an .onnx file")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    if args.report is not None:
        _report(src, out, Path(args.report or f"{out}.report.json"), args.report_texts,
                getattr(args, "quant_calib", None))
    return 0


def _report(src: Path, out: Path, path: Path, texts_file, calib=None) -> None:
    """Per-linear error of OUT against an fp32 conversion of src (a temp file): over texts_file's lines,
    else the static-int8 calibration set (calib), else the bundled corpus, else (model file without a
    tokenizer) random ids over the vocabulary."""
    import tempfile

    import edgeformer
    from converters.hf import convert_hf_directory
    from converters.quant_report import format_report, layer_report, random_feeds, save_report
    from converters.quantize import default_calibration_texts

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = convert_hf_directory(src, Path(tmp) / "fp32.edgeformer")
        model = edgeformer.load(fp32, threads=1)
        if calib is not None and not texts_file:
            from converters.quantize import calibration_feeds

            rows = layer_report(fp32, out, feeds_list=calibration_feeds(model, calib))
        elif model.tokenizer_json is None:
            if texts_file:
                raise EdgeformerError("--report-texts: the model has no tokenizer")
            print("no tokenizer in the model: report over random token ids")
            rows = layer_report(fp32, out, feeds_list=random_feeds(model))
        else:
            texts = default_calibration_texts()
            if texts_file:
                lines = Path(texts_file).read_text(encoding="utf-8").splitlines()
                texts = [t.strip() for t in lines if t.strip()]
                if not texts:
                    raise EdgeformerError(f"{texts_file} has no texts")
            rows = layer_report(fp32, out, texts)
        model.close()
    print(format_report(rows))
    print(f"wrote {save_report(rows, path)}")


def _check(args) -> int:
    import numpy as np

    from converters.onnx_import import check_onnx

    feeds = None
    if args.feeds:
        with np.load(args.feeds, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    errors = check_onnx(args.onnx, args.model, feeds, batch=args.batch, seq=args.seq, threads=args.threads,
                        atol=args.atol, trace=True if args.trace else None)
    worst = max((e["max_abs"] for k, e in errors.items() if k != "first_divergence"), default=0.0)
    return 0 if worst <= args.atol and "first_divergence" not in errors else 1
