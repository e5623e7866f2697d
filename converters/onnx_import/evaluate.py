"""Numeric evaluation of single ONNX nodes: onnx.reference for standard ops, NumPy for ORT contrib ops.

Used for constant folding, for the shape / mask / position-id subgraphs (evaluated on probe feeds),
and for the row-wise subgraphs (layer norm, GELU) that the importer identifies by probing.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf


class EvalError(Exception):
    """A node could not be evaluated on given inputs."""


def _ln(x, gamma, beta, eps):
    x64 = x.astype(np.float64, copy=False)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps)
    y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _contrib(node, inputs):
    op = node.op_type
    get = lambda i: inputs[i] if i < len(inputs) else None  # noqa: E731
    if op == "Gelu":
        return [gelu(inputs[0])]
    if op == "BiasGelu":
        return [gelu(inputs[0] + inputs[1])]
    if op == "FastGelu":
        x = inputs[0] if get(1) is None else inputs[0] + inputs[1]
        return [gelu_tanh(x)]
    if op == "LayerNormalization":
        axis = _attr(node, "axis", -1)
        if axis not in (-1, inputs[0].ndim - 1):
            raise EvalError("LayerNormalization over other than the last axis")
        return [_ln(inputs[0], inputs[1], get(2), _attr(node, "epsilon", 1e-5))]
    if op == "SkipLayerNormalization":
        s = inputs[0] + inputs[1]
        if get(4) is not None:
            s = s + inputs[4]
        return [_ln(s, inputs[2], get(3), _attr(node, "epsilon", 1e-12)), None, None, s]
    raise EvalError(f"no evaluator for com.microsoft {op}")


def _gather_elements(node, inputs):
    data, index = inputs[0], np.asarray(inputs[1]).astype(np.int64)
    axis = _attr(node, "axis", 0)
    index = np.where(index < 0, index + data.shape[axis], index)
    return [np.take_along_axis(data, index, axis=axis)]


def _gelu(node, inputs):
    approximate = _attr(node, "approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return [gelu_tanh(inputs[0]) if approximate == "tanh" else gelu(inputs[0])]


# standard ops whose onnx.reference implementation is wrong, missing (function ops) or too slow for our use
OVERRIDES = {"GatherElements": _gather_elements, "Gelu": _gelu}


class NodeEvaluator:
    """Evaluate nodes one at a time; reference evaluators are cached per node."""

    def __init__(self, opsets: dict[str, int]):
        self.opsets = {d or "": v for d, v in opsets.items()}
        self._cache: dict[int, object] = {}

    def run(self, node, inputs: list) -> list:
        if node.domain == "com.microsoft" or (node.op_type == "LayerNormalization" and self.opsets.get("", 0) < 17):
            try:
                return _contrib(node, inputs)
            except EvalError:
                raise
            except Exception as exc:
                raise EvalError(f"{node.op_type}: {type(exc).__name__}: {exc}") from None
        if node.op_type in OVERRIDES and node.domain in ("", "ai.onnx"):
            try:
                return OVERRIDES[node.op_type](node, inputs)
            except Exception as exc:
                raise EvalError(f"{node.op_type}: {type(exc).__name__}: {exc}") from None
        key = id(node)
        ev = self._cache.get(key)
        if ev is None:
            from onnx.reference import ReferenceEvaluator

            try:
                ev = ReferenceEvaluator(node, opsets={"": self.opsets.get("", 17)})
            except Exception as exc:
                raise EvalError(f"{node.op_type}: cannot build a reference evaluator: {exc}") from None
            self._cache[key] = ev
        feeds = {name: value for name, value in zip(node.input, inputs) if name}
        try:
            outs = ev.run(None, feeds)
        except Exception as exc:
            raise EvalError(f"{node.op_type}: {type(exc).__name__}: {exc}") from None
        return [np.asarray(o) if o is not None else None for o in outs]
