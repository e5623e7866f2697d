"""Generic ops: ONNX operators (opsets 11-25 semantics) run with plain NumPy, for graph parts the ONNX importer
cannot fuse into coarse ops. The runtime never imports onnx: attributes arrive as JSON (see ``base.Spec``).

    op = prepare("Softmax", {"axis": -1}, opset=17, dtypes=["float32"])   # load time: GraphError if malformed
    (y,) = op([x])                                                           # run time: InputError if bad data

One module per family (elementwise, shape, reduce, matmul, nn, gather); ``OPS`` lists them all. Output sizes
that come from data are bounded by ``max_elements()`` ($EDGEFORMER_MAX_ELEMENTS, default 2**28).
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import EdgeformerError, GraphError, InputError
from edgeformer.generic import elementwise, gather, matmul, nn, reduce, shape  # noqa: F401  (register the ops)
from edgeformer.generic.base import (DEFAULT_MAX_ELEMENTS, DTYPES, LIMIT_ENV, MAX_OPSET, MIN_OPSET, Spec,
                                     decode_tensor, encode_float, encode_tensor, max_elements)
from edgeformer.generic.registry import OPS, OpDef

__all__ = ["OPS", "OpDef", "Prepared", "prepare", "max_elements", "DTYPES", "DEFAULT_MAX_ELEMENTS", "LIMIT_ENV",
           "MIN_OPSET", "MAX_OPSET", "decode_tensor", "encode_tensor", "encode_float", "DOMAINS"]

DOMAINS = ("", "ai.onnx")
_RUN_ERRORS = (ValueError, IndexError, TypeError, ArithmeticError, MemoryError, np.exceptions.AxisError)


class Prepared:
    """One validated node: call it with the input arrays in ONNX positions (None for omitted optional inputs)."""

    def __init__(self, opdef: OpDef, params: dict, in_dtypes: list, out_dtypes: list, name: str):
        self.opdef, self.params, self.name = opdef, params, name
        self.in_dtypes = list(in_dtypes)
        self.out_dtypes = list(out_dtypes)

    @property
    def op_type(self) -> str:
        return self.opdef.name

    def __call__(self, inputs) -> list:
        inputs = [np.asarray(x) if isinstance(x, np.generic) else x for x in inputs]  # NumPy scalars: 0-d arrays
        if len(inputs) != len(self.in_dtypes):
            raise InputError(f"node {self.name!r} ({self.op_type}): expected {len(self.in_dtypes)} inputs, "
                             f"got {len(inputs)}")
        for i, (x, dtype) in enumerate(zip(inputs, self.in_dtypes)):
            if dtype is None:
                if x is not None:
                    raise InputError(f"node {self.name!r} ({self.op_type}): input #{i} is declared absent")
            elif not isinstance(x, np.ndarray) or x.dtype != DTYPES[dtype]:
                got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
                raise InputError(f"node {self.name!r} ({self.op_type}): input #{i} must be a {dtype} array, got {got}")
        try:
            with np.errstate(all="ignore"):
                outs = self.opdef.run(inputs, self.params)
        except EdgeformerError as exc:
            raise InputError(f"node {self.name!r} ({self.op_type}): {exc}") from None
        except _RUN_ERRORS as exc:
            raise InputError(f"node {self.name!r} ({self.op_type}): {type(exc).__name__}: {exc}") from None
        result = []
        for out, dtype in zip(outs, self.out_dtypes):
            out = np.asarray(out)
            result.append(out if out.dtype == DTYPES[dtype] else out.astype(DTYPES[dtype]))
        return result


def prepare(op_type: str, attributes: dict, *, opset: int, dtypes: list, ranks: list | None = None,
            consts: list | None = None, n_outputs: int = 1, name: str | None = None, domain: str = "") -> Prepared:
    """Validate one node at load time and return it ready to run.

    ``dtypes`` per ONNX input position (None: omitted optional input), ``ranks`` the known ranks (None: unknown),
    ``consts`` the values of inputs known at load time. GraphError for an unknown op, an unsupported opset,
    domain or dtype, an unknown or malformed attribute, a wrong number of inputs or outputs.
    """
    name = op_type if name is None else name
    where = f"node {name!r} ({op_type})"
    if domain not in DOMAINS:
        raise GraphError(f"{where}: domain {domain!r} has no generic ops (only the default ONNX domain)")
    opdef = OPS.get(op_type)
    if opdef is None:
        raise GraphError(f"{where}: no generic op {op_type!r}; supported: {', '.join(sorted(OPS))}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not opdef.since <= opset <= MAX_OPSET:
        raise GraphError(f"{where}: opset {opset!r} is outside the supported {opdef.since}..{MAX_OPSET}")
    if not isinstance(attributes, dict) or not all(isinstance(k, str) for k in attributes):
        raise GraphError(f"{where}: attributes must be an object")
    unknown = sorted(set(attributes) - opdef.attributes)
    if unknown:
        raise GraphError(f"{where}: unknown attributes {unknown}; {op_type} takes {sorted(opdef.attributes)}")
    dtypes = list(dtypes)
    while dtypes and dtypes[-1] is None:  # trailing omitted optional inputs
        dtypes.pop()
    for d in dtypes:
        if d is not None and d not in DTYPES:
            raise GraphError(f"{where}: input dtype {d!r} is not one of {sorted(DTYPES)}")
    low, high = opdef.inputs
    if not low <= len(dtypes) <= high:
        raise GraphError(f"{where}: takes {low} to {high} inputs, got {len(dtypes)}")
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, int) or \
            not opdef.outputs[0] <= n_outputs <= opdef.outputs[1]:
        raise GraphError(f"{where}: has {opdef.outputs[0]} to {opdef.outputs[1]} outputs, got {n_outputs!r}")
    n = len(dtypes)
    ranks = (list(ranks or []) + [None] * n)[:n]
    consts = (list(consts or []) + [None] * n)[:n]
    spec = Spec(op_type, opset, attributes, dtypes, ranks, consts, n_outputs, name)
    try:
        params, out_dtypes = opdef.check(spec)
    except GraphError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # a malformed attribute value
        raise GraphError(f"{where}: {type(exc).__name__}: {exc}") from None
    return Prepared(opdef, params, dtypes, out_dtypes[:n_outputs], name)
