"""Optional text front end: the tokenizer.json carried in a model file, run by the `tokenizers` package.

`tokenizers` is not a runtime dependency; it is imported only when text is given.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import EdgeformerError, InputError


class TextEncoder:
    def __init__(self, tokenizer_json: str, max_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise EdgeformerError("text input needs the 'tokenizers' package: pip install tokenizers") from None
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()

    def __call__(self, texts) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a non-empty list of strings")
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(1, max(len(e.ids) for e in encodings))
        ids = np.zeros((len(texts), width), dtype=np.int64)  # (B, S)
        types = np.zeros((len(texts), width), dtype=np.int64)  # (B, S)
        mask = np.zeros((len(texts), width), dtype=np.int64)  # (B, S)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n], types[row, :n], mask[row, :n] = enc.ids, enc.type_ids, 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
