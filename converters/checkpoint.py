"""Read a checkpoint directory's weights without ever unpickling arbitrary objects.

model.safetensors (one file or sharded with model.safetensors.index.json) is preferred;
pytorch_model.bin is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError


class Checkpoint:
    """Name -> float32 numpy array, with an optional architecture prefix (``bert.``) stripped."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
        if name not in self.arrays:
            raise EdgeformerError(f"checkpoint has no tensor {name!r}")
        array = np.ascontiguousarray(self.arrays[name], dtype=np.float32)
        if shape is not None and array.shape != tuple(shape):
            raise EdgeformerError(f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
        self.used.add(name)
        return array

    def strip_prefix(self, prefix: str, marker: str) -> None:
        """Drop ``prefix`` from every name when the checkpoint holds ``prefix + marker`` but not ``marker``
        (BertForSequenceClassification stores the encoder as ``bert.embeddings...``)."""
        if marker not in self.arrays and prefix + marker in self.arrays:
            self.arrays = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in self.arrays.items()}


def load_checkpoint(directory: Path) -> Checkpoint:
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        from safetensors.numpy import load_file

        files = [single] if single.is_file() else sorted(
            {directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        arrays = {}
        for path in files:
            arrays.update(load_file(str(path)))
        return Checkpoint(arrays)
    binary = directory / "pytorch_model.bin"
    if binary.is_file():
        import torch

        state = torch.load(str(binary), map_location="cpu", weights_only=True)
        return Checkpoint({k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")})
    raise EdgeformerError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
