"""Converters: turn Hugging Face checkpoints (and later ONNX graphs and PyTorch modules) into
edgeformer model files. They may use safetensors, tokenizers, onnx and torch; the runtime never
imports this package."""
from converters import gpt2  # noqa: F401  (registers the gpt2 loader)
from converters import wide  # noqa: F401  (registers the byte_classifier loader)
from converters.hf import convert_hf_directory
from converters.registry import LOADERS, register_loader

__all__ = ["convert_hf_directory", "LOADERS", "register_loader"]
