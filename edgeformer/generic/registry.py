"""The table of generic ops: ONNX op type -> OpDef (load-time check, NumPy run, arity, known attributes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeformer.generic.base import MIN_OPSET


@dataclass(frozen=True)
class OpDef:
    name: str
    check: Callable  # check(spec) -> (params: dict, output dtypes: list[str])
    run: Callable  # run(inputs: list[np.ndarray | None], params) -> list[np.ndarray]
    inputs: tuple  # (min, max) ONNX input positions
    outputs: tuple  # (min, max) outputs
    attributes: frozenset  # every attribute name the op accepts; anything else is a GraphError
    since: int = MIN_OPSET  # first model opset whose semantics run() implements (Gelu 20, LayerNormalization 17;
    # ops unchanged since before 11 say so, e.g. Not 1, And 7)


OPS: dict[str, OpDef] = {}


def register(name: str, check, run, inputs=(1, 1), outputs=(1, 1), attributes=(), since: int = MIN_OPSET):
    if name in OPS:
        raise ValueError(f"generic op {name} registered twice")
    OPS[name] = OpDef(name, check, run, tuple(inputs), tuple(outputs), frozenset(attributes), since)
