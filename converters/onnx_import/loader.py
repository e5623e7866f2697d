"""Read and validate an ONNX file before any graph work; malformed input raises OnnxFormatError."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.onnx_import.errors import OnnxFormatError

KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")
_TWO_GB = 2 ** 31 - 1


def load_onnx(path):
    """onnx.load with external data, structural checks (missing values, cycles), then onnx.checker."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise OnnxFormatError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise OnnxFormatError(f"{path}: not a valid ONNX protobuf (truncated or corrupt file?): {exc}") from None
    except Exception as exc:  # protobuf backends raise their own types
        raise OnnxFormatError(f"{path}: cannot parse ONNX protobuf: {type(exc).__name__}: {exc}") from None
    if not model.HasField("graph") or not len(model.graph.node):
        raise OnnxFormatError(f"{path}: the ONNX model has no graph or an empty graph (truncated file?)")
    try:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        if any(uses_external_data(t) for t in model.graph.initializer):
            load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise OnnxFormatError(f"{path}: cannot read the ONNX external data: {type(exc).__name__}: {exc}") from None
    check_structure(model, str(path))
    try:
        if model.ByteSize() < _TWO_GB:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise OnnxFormatError(f"{path}: onnx.checker rejects the model: {' '.join(msg[:6])[:800]}") from None
    return model


def check_structure(model, label: str = "model") -> list:
    """Every node input defined, no value defined twice, no cycle; returns the nodes in topological order."""
    graph = model.graph
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producer = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in {i.name for i in graph.input}:
                raise OnnxFormatError(f"{label}: value {out!r} is defined more than once "
                                      f"(node {node.name or index!r})")
            producer[out] = index
    for index, node in enumerate(graph.node):
        for value in node.input:
            if value and value not in defined and value not in producer:
                raise OnnxFormatError(
                    f"{label}: node {node.name or index!r} ({node.op_type}) reads {value!r}, which is neither a graph "
                    f"input, an initializer nor any node's output (missing initializer?)")
    for out in graph.output:
        if out.name not in defined and out.name not in producer:
            raise OnnxFormatError(f"{label}: graph output {out.name!r} is not produced by any node")
    # Kahn's algorithm: anything left over sits on a cycle
    deps = [{producer[v] for v in node.input if v in producer} for node in graph.node]
    users: dict = {}
    for index, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(index)
    remaining = [len(ds) for ds in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for u in users.get(i, ()):
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        stuck = [graph.node[i].name or f"#{i}" for i, r in enumerate(remaining) if r > 0]
        raise OnnxFormatError(f"{label}: the graph has a cycle through nodes {stuck[:8]}")
    for init in graph.initializer:
        if init.data_type == 0 or init.data_type == 8:  # UNDEFINED, STRING
            raise OnnxFormatError(f"{label}: initializer {init.name!r} has unsupported data type {init.data_type}")
    return sorted(order)


def opset_of(model, domain: str) -> int:
    for imp in model.opset_import:
        if imp.domain == domain or (domain in ("", "ai.onnx") and imp.domain in ("", "ai.onnx")):
            return int(imp.version)
    return 1 if domain == "com.microsoft" else 0


def initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for init in model.graph.initializer:
        try:
            out[init.name] = numpy_helper.to_array(init)
        except Exception as exc:
            raise OnnxFormatError(f"initializer {init.name!r} cannot be read: {type(exc).__name__}: {exc}") from None
    return out
