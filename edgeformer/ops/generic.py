"""onnx: one ONNX operator run by edgeformer.generic (plain NumPy) over dense values; unpack / pack: the bridges
between packed token values and dense (B, S, width) arrays, so coarse and generic ops can mix in one graph.

Node attributes of an "onnx" node::

    {"op_type": "Softmax", "domain": "", "opset": 17,
     "attributes": {"axis": -1},                    # the ONNX attributes as JSON (non-finite floats as "inf"/"nan",
                                                    # tensors as {"dtype", "shape", "data"})
     "args": [{"input": 0, "dtype": "float32"},     # one entry per ONNX input position: node input #0 ...
              {"weight": "const1"},                 # ... a tensor of the model file (node.weights role) ...
              {"const": {"dtype": "int64", "shape": [1], "data": [-1]}},   # ... a small inline constant ...
              null],                                # ... or an omitted optional input
     "output_shapes": [["batch", "seq", 384]]}      # optional: declared shapes (ints / names), checked at run time

Everything is validated at load time (GraphError): the op, its opset and attributes (edgeformer.generic.prepare),
every arg, the declared input dtypes against the producers' types. At run time a problem with the data (a
Reshape that does not fit, an index out of range, an output above the element limit) is an InputError naming
the node; a result whose shape contradicts the declared one too.
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError, InputError
from edgeformer.graph import DENSE, SEQUENCES, TOKENS, ValueType
from edgeformer.ops.base import inputs_count

_KEYS = {"op_type", "domain", "opset", "attributes", "args", "output_shapes"}


def _where(node) -> str:
    return f"node {node.name!r} (onnx {node.attrs.get('op_type', '?')})"


def _args(node, weights) -> list:
    """Decode ``args``: per ONNX position ("input", k, dtype) / ("weight", array) / ("const", array) / None."""
    from edgeformer.generic import DTYPES, decode_tensor  # imported with the first generic node (~30 ms)

    args = node.attrs.get("args")
    if not isinstance(args, list) or len(args) > 1024:
        raise GraphError(f"{_where(node)}: 'args' must be a list (one entry per ONNX input)")
    out, used_inputs, used_roles = [], set(), set()
    for position, arg in enumerate(args):
        what = f"{_where(node)}: args[{position}]"
        if arg is None:
            out.append(None)
        elif not isinstance(arg, dict) or len(arg) not in (1, 2):
            raise GraphError(f"{what} must be null or an object")
        elif "input" in arg:
            k, dtype = arg["input"], arg.get("dtype")
            if set(arg) != {"input", "dtype"} or isinstance(k, bool) or not isinstance(k, int) \
                    or not 0 <= k < len(node.inputs) or dtype not in DTYPES:
                raise GraphError(f"{what} must be {{'input': index < {len(node.inputs)}, 'dtype': one of "
                                 f"{sorted(DTYPES)}}}, got {arg!r}")
            used_inputs.add(k)
            out.append(("input", k, dtype))
        elif "weight" in arg:
            role = arg["weight"]
            if len(arg) != 1 or role not in weights:
                raise GraphError(f"{what}: weight role {role!r} is not among the node's weights {sorted(weights)}")
            array = weights[role]
            if array.dtype not in DTYPES.values():
                raise GraphError(f"{what}: weight {role!r} has dtype {array.dtype}, not one of {sorted(DTYPES)}")
            used_roles.add(role)
            out.append(("const", np.asarray(array)))
        elif "const" in arg and len(arg) == 1:
            out.append(("const", decode_tensor(arg["const"], what)))
        else:
            raise GraphError(f"{what} must have 'input', 'weight' or 'const', got {sorted(arg)}")
    if used_inputs != set(range(len(node.inputs))):
        raise GraphError(f"{_where(node)}: node inputs {sorted(set(range(len(node.inputs))) - used_inputs)} are not "
                         f"used by any arg")
    if used_roles != set(weights):
        raise GraphError(f"{_where(node)}: weights {sorted(set(weights) - used_roles)} are not used by any arg")
    return out


def _declared_shapes(node, n_outputs) -> list:
    shapes = node.attrs.get("output_shapes")
    if shapes is None:
        return [None] * n_outputs
    if not isinstance(shapes, list) or len(shapes) != n_outputs:
        raise GraphError(f"{_where(node)}: 'output_shapes' must list {n_outputs} shapes")
    out = []
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        if not isinstance(shape, list) or len(shape) > 32 or not all(
                (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d)
                for d in shape):
            raise GraphError(f"{_where(node)}: a declared output shape must be a list of at most 32 non-negative ints "
                             f"or names, got {shape!r}")
        out.append(tuple(shape))
    return out


def _prepare(node, weights, in_types=None):
    from edgeformer.generic import prepare

    attrs = node.attrs
    unknown = sorted(set(attrs) - _KEYS)
    if unknown:
        raise GraphError(f"{_where(node)}: unknown attrs {unknown}; an onnx node has {sorted(_KEYS)}")
    op_type, domain, opset = attrs.get("op_type"), attrs.get("domain", ""), attrs.get("opset")
    if not isinstance(op_type, str) or not isinstance(domain, str):
        raise GraphError(f"{_where(node)}: 'op_type' and 'domain' must be strings")
    args = _args(node, weights)
    dtypes, ranks, consts = [], [], []
    for arg in args:
        if arg is None:
            dtypes.append(None), ranks.append(None), consts.append(None)
        elif arg[0] == "input":
            dtypes.append(arg[2])
            rank = None
            if in_types is not None:
                vtype = in_types[arg[1]]
                if vtype.kind != DENSE:
                    raise GraphError(f"{_where(node)}: input {node.inputs[arg[1]]!r} is a {vtype.kind} value; generic "
                                     f"ops take dense values (insert an 'unpack' node)")
                if vtype.dtype != arg[2]:
                    raise GraphError(f"{_where(node)}: input {node.inputs[arg[1]]!r} is {vtype.dtype}, the node "
                                     f"declares {arg[2]}")
                rank = None if vtype.shape is None else len(vtype.shape)
            ranks.append(rank)
            consts.append(None)
        else:
            dtypes.append(arg[1].dtype.name)
            ranks.append(arg[1].ndim)
            consts.append(arg[1])
    prepared = prepare(op_type, attrs.get("attributes", {}), opset=opset, dtypes=dtypes, ranks=ranks, consts=consts,
                       n_outputs=len(node.outputs), name=node.name, domain=domain)
    return prepared, args


class OnnxOp:
    op = "onnx"

    @staticmethod
    def infer(node, in_types, weights):
        prepared, _ = _prepare(node, weights, in_types)
        shapes = _declared_shapes(node, len(node.outputs))
        return [ValueType(DENSE, dtype=d, shape=s) for d, s in zip(prepared.out_dtypes, shapes)]

    @staticmethod
    def bind(node, weights):
        prepared, args = _prepare(node, weights)
        shapes = _declared_shapes(node, len(node.outputs))
        name, op_type = node.name, prepared.op_type

        def run(inputs, batch, workers):
            values = [None if a is None else inputs[a[1]] if a[0] == "input" else a[1] for a in args]
            outs = prepared(values)
            for out, shape in zip(outs, shapes):
                if shape is not None and (out.ndim != len(shape) or any(
                        isinstance(d, int) and d != n for d, n in zip(shape, out.shape))):
                    raise InputError(f"node {name!r} ({op_type}) produced shape {list(out.shape)}, the graph "
                                     f"declares {list(shape)}")
            return outs

        return run


class Unpack:
    """tokens (T, width) -> dense float32 (B, S, width), zeros at padded positions; with {"from": "sequences"}, a
    sequence value (B, width) -> the same array as a dense value."""

    op = "unpack"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        kind, width = in_types[0].kind, in_types[0].width
        source = node.attrs.get("from", TOKENS)
        if set(node.attrs) - {"from"} or weights or source not in (TOKENS, SEQUENCES) or kind != source:
            raise GraphError(f"node {node.name!r}: unpack takes one token value (or, with 'from': 'sequences', one "
                             f"sequence value), no weights; got a {kind} value and attrs {node.attrs}")
        return [ValueType(DENSE, dtype="float32", shape=("batch", "seq", width) if kind == TOKENS else ("batch", width))]

    @staticmethod
    def bind(node, weights):
        if node.attrs.get("from", TOKENS) == SEQUENCES:
            return lambda inputs, batch, workers: [inputs[0]]
        return lambda inputs, batch, workers: [batch.unpack(inputs[0])]


class Pack:
    """dense float32 (B, S, width) -> tokens (T, width): the valid tokens of the session's batch; a dense
    (B, width) -> sequences with ``{"to": "sequences"}``."""

    op = "pack"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        vtype = in_types[0]
        to = node.attrs.get("to", "tokens")
        if set(node.attrs) - {"to"} or weights or to not in ("tokens", "sequences"):
            raise GraphError(f"node {node.name!r}: pack takes one dense value and attribute 'to' (tokens or "
                             f"sequences), no weights")
        rank = 3 if to == "tokens" else 2
        if vtype.kind != DENSE or vtype.dtype != "float32" or vtype.shape is None or len(vtype.shape) != rank \
                or not isinstance(vtype.shape[-1], int):
            raise GraphError(f"node {node.name!r}: pack to {to} needs a dense float32 value of rank {rank} with a fixed "
                             f"last dim, got {vtype}")
        return [ValueType(TOKENS if to == "tokens" else SEQUENCES, width=vtype.shape[-1])]

    @staticmethod
    def bind(node, weights):
        tokens = node.attrs.get("to", "tokens") == "tokens"

        def run(inputs, batch, workers):
            x = inputs[0]
            want = (batch.batch_size, batch.seq_len) if tokens else (batch.batch_size,)
            if x.shape[:len(want)] != want:
                raise InputError(f"node {node.name!r} (pack): shape {list(x.shape)} does not start with the batch's "
                                 f"{list(want)}")
            out = batch.pack(x) if tokens else x
            return [np.ascontiguousarray(out, dtype=np.float32)]

        return run
