"""Registered loaders, CTranslate2-style: one function per Hugging Face ``model_type``."""
from __future__ import annotations

LOADERS: dict[str, callable] = {}


def register_loader(*model_types: str):
    """Register ``fn(config: dict, weights: Checkpoint, builder) -> dict[str, np.ndarray]``."""

    def wrap(fn):
        for model_type in model_types:
            LOADERS[model_type] = fn
        return fn

    return wrap
