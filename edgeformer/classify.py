"""Byte-level text classification with a model whose metadata says ``task = byte_classification``.

The package ships one such model, ``edgeformer/data/langid.edgeformer``: a single wide layer of 24
attention heads trained (bench/langid/train.py) to tell which language a file is written in, from its
first bytes. Bytes are the tokens (ids 0..255), so no tokenizer is needed.

    clf = edgeformer.classify.ByteClassifier()            # the embedded default
    clf.classify([b"#include <stdio.h>\nint main..."])    # -> [Prediction(label='c', confidence=0.99, ...)]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeformer.errors import InputError, ModelFileError

DEFAULT_MODEL = Path(__file__).parent / "data" / "langid.edgeformer"
DEFAULT_BYTES = 256  # when the model does not say how long a window it was trained on


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float  # softmax probability of the label
    probabilities: dict  # label -> probability


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)  # (B, C)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ByteClassifier:
    """Wraps a loaded byte classifier: bytes in, labels with probabilities out."""

    def __init__(self, path=None, threads: int | None = None):
        import edgeformer

        self.model = edgeformer.load(DEFAULT_MODEL if path is None else path, threads=threads)
        meta = self.model.metadata
        if meta.get("task") != "byte_classification":
            raise ModelFileError(f"{self.model.path} is not a byte classifier (metadata task = {meta.get('task')!r})")
        try:
            labels = json.loads(meta.get("labels", ""))
        except json.JSONDecodeError:
            labels = None
        width = self.model.value_width("logits") if "logits" in [o.name for o in self.model.outputs] else None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != width:
            raise ModelFileError(f"{self.model.path}: metadata 'labels' must be a JSON list of {width} names")
        self.labels: list[str] = labels
        self.max_bytes = self.model.max_length or DEFAULT_BYTES
        context = meta.get("context_bytes", "")
        self.context_bytes = min(int(context), self.max_bytes) if context.isdigit() and int(context) > 0 \
            else min(DEFAULT_BYTES, self.max_bytes)

    def logits(self, texts, max_bytes: int | None = None) -> np.ndarray:
        """(B, labels) logits of the first ``max_bytes`` (default: the model's training window, metadata
        ``context_bytes``) bytes of each text (bytes or str, UTF-8)."""
        max_bytes = self.context_bytes if max_bytes is None else max_bytes
        if not 1 <= max_bytes <= self.max_bytes:
            raise InputError(f"max_bytes must be in 1..{self.max_bytes}, got {max_bytes}")
        chunks = [(t.encode("utf-8") if isinstance(t, str) else bytes(t))[:max_bytes] for t in texts]
        if not chunks:
            raise InputError("nothing to classify: empty list")
        if any(len(c) == 0 for c in chunks):
            raise InputError("cannot classify an empty text")
        width = max(len(c) for c in chunks)
        ids = np.zeros((len(chunks), width), dtype=np.int64)  # (B, S)
        mask = np.zeros((len(chunks), width), dtype=np.int64)  # (B, S)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            mask[row, :len(chunk)] = 1
        return self.model.run({"input_ids": ids, "attention_mask": mask}, outputs=["logits"])["logits"]

    def classify(self, texts, max_bytes: int | None = None) -> list[Prediction]:
        probs = softmax(self.logits(texts, max_bytes))  # (B, C)
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(Prediction(self.labels[best], float(row[best]),
                                  {label: float(p) for label, p in zip(self.labels, row)}))
        return out
