"""Baselines for `edgeformer bench --vs` (registered as the `edgeformer.baselines` entry point): ONNX Runtime and PyTorch on the same checkpoint, same process.

Both are optional and imported only when asked for. The ONNX file is exported once from the
checkpoint directory with torch.onnx (TorchScript exporter, opset 17) into edgeformer's cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError


def _source_dir(source, model) -> Path:
    if source:
        return Path(source)
    raise EdgeformerError("--vs needs --source DIR: the Hugging Face checkpoint the model was converted from")


def make_baselines(names, source, threads: int, model) -> dict:
    engines = {}
    for name in names:
        if name == "torch":
            engines["torch"] = torch_engine(_source_dir(source, model), threads)
        elif name in ("onnxruntime", "ort"):
            engines["onnxruntime"] = ort_engine(export_onnx(_source_dir(source, model)), threads)
        else:
            raise EdgeformerError(f"unknown baseline {name!r}; known: onnxruntime, torch")
    return engines


def torch_engine(directory: Path, threads: int):
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise EdgeformerError(f"--vs torch needs torch and transformers: {exc}") from None
    torch.set_num_threads(threads)
    net = AutoModel.from_pretrained(str(directory)).eval()

    def run(feeds):
        with torch.inference_mode():
            args = {k: torch.from_numpy(v) for k, v in feeds.items()}
            return net(**args).last_hidden_state.numpy()

    return run


class _Wrapper:
    """Keyword-argument wrapper so torch.onnx.export works with transformers 5's forward signature."""

    def __new__(cls, net):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.net(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state

        return Wrapper()


def export_onnx(directory: Path) -> Path:
    from edgeformer._cache import base_cache_dir

    weights = directory / "model.safetensors"
    stamp = f"{weights.stat().st_size}-{int(weights.stat().st_mtime)}" if weights.exists() else "x"
    target = (base_cache_dir() or Path(".")) / "onnx" / f"{directory.name}-{stamp}.onnx"
    if target.is_file():
        return target
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise EdgeformerError(f"exporting the ONNX baseline needs torch and transformers: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    net = AutoModel.from_pretrained(str(directory)).eval()
    wrapper = _Wrapper(net)
    ids = torch.ones((1, 8), dtype=torch.long)
    torch.onnx.export(wrapper, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(target), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                    ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")})
    return target


def ort_engine(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EdgeformerError(f"--vs onnxruntime needs onnxruntime: {exc}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(feeds):
        return session.run(None, {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items() if k in names})[0]

    return run
