"""ONNX import: BERT-family encoder and GPT-2 decoder exports (torch.onnx TorchScript and dynamo exporters, ORT
transformer optimizer) -> edgeformer's coarse-op graph. Needs the ``onnx`` package (and onnxruntime for
``check_onnx``)."""
from converters.onnx_import.convert import convert_onnx
from converters.onnx_import.errors import OnnxFormatError, OnnxImportError, UnsupportedOnnxError

__all__ = ["convert_onnx", "check_onnx", "OnnxFormatError", "OnnxImportError", "UnsupportedOnnxError"]


def check_onnx(*args, **kwargs):
    from converters.onnx_import.check import check_onnx as _check

    return _check(*args, **kwargs)


check_onnx.__doc__ = "See converters.onnx_import.check.check_onnx."
