"""`edgeformer convert`, registered into the runtime's CLI through the ``edgeformer.cli`` entry point."""
from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint directory into a model file")
    p.add_argument("src", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from converters.hf import convert_hf_directory

    src = Path(args.src)
    start = time.perf_counter()
    if not src.is_dir():
        raise SystemExit(f"edgeformer convert: {src} is not a directory (ONNX import comes with a later release)")
    out = convert_hf_directory(src, args.output, progress=True)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0
