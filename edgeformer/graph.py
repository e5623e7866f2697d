"""The typed graph of coarse transformer ops, its shape rules and its validation.

A graph is plain JSON (stored in the model file's header):

    {"name": str,
     "inputs":  [{"name", "dtype", "shape": ["batch", "seq"], "optional": bool}],
     "outputs": [{"name"}],
     "nodes":   [{"op", "name", "inputs": [value names], "outputs": [value names],
                  "weights": {role: tensor name}, "attrs": {...}}]}

Values between nodes are *packed*: a token value has shape (T, width) holding only the valid
(unpadded) tokens of the batch back to back (ByteTransformer); a sequence value has shape (B, width).
Graph inputs of kind "ids" (input_ids, token_type_ids) and "mask" (attention_mask) are the padded
(B, S) integer arrays a user feeds; the session packs them. Inputs of kind "dense" (pixel values, or every
input of a graph made of generic ops) are fed and passed on as they are: *dense* values hold a plain array
of any shape and dtype in the user's (padded) layout.
Every op declares, through its class in ``edgeformer.ops``, how to check its attributes and weights
and the kind and width of its outputs; ``validate`` runs those rules once at load time so that
``Model.run`` does no graph work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeformer.errors import GraphError

TOKENS = "tokens"  # (T, width): packed valid tokens
SEQUENCES = "sequences"  # (B, width): one row per sequence
IDS = "ids"  # (T,) int64 packed token ids, fed by the user as (B, S)
DENSE = "dense"  # any shape and dtype, unpacked (padded layout): dense graph inputs, generic ops

INPUT_KINDS = ("ids", "mask", "dense")
INPUT_DTYPES = ("float32", "int64", "int32", "bool")
_DEFAULT_KIND = {"input_ids": "ids", "token_type_ids": "ids", "attention_mask": "mask"}


@dataclass(frozen=True)
class ValueType:
    """Kind and static width of a value; the leading dim (T or B) is known only at run time.

    Dense values also carry their dtype and, where known, their shape (ints and symbolic strings);
    token and sequence values are always float32."""

    kind: str
    width: int = 0
    dtype: str = "float32"
    shape: tuple | None = None


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    weights: dict[str, str] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "name": self.name, "inputs": self.inputs, "outputs": self.outputs,
                "weights": self.weights, "attrs": self.attrs}


@dataclass
class Graph:
    name: str
    inputs: list[dict]
    outputs: list[dict]
    nodes: list[Node]

    def to_json(self) -> dict:
        return {"name": self.name, "inputs": self.inputs, "outputs": self.outputs,
                "nodes": [n.to_json() for n in self.nodes]}

    @classmethod
    def from_json(cls, data) -> "Graph":
        if not isinstance(data, dict):
            raise GraphError("graph must be a JSON object")
        try:
            nodes = [_node_from_json(n, i) for i, n in enumerate(_list(data, "nodes"))]
            inputs = [_spec(s, "input") for s in _list(data, "inputs")]
            outputs = [_spec(s, "output") for s in _list(data, "outputs")]
        except (TypeError, KeyError) as exc:
            raise GraphError(f"malformed graph: {exc}") from None
        return cls(str(data.get("name", "model")), inputs, outputs, nodes)


def _list(data, key):
    value = data.get(key)
    if not isinstance(value, list):
        raise GraphError(f"graph field {key!r} must be a list")
    return value


def _spec(spec, what):
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise GraphError(f"every graph {what} needs a non-empty string 'name'")
    return dict(spec)


def _node_from_json(data, index) -> Node:
    if not isinstance(data, dict):
        raise GraphError(f"node #{index} is not an object")
    op, name = data.get("op"), data.get("name", f"node{index}")
    if not isinstance(op, str) or not isinstance(name, str):
        raise GraphError(f"node #{index}: 'op' and 'name' must be strings")
    inputs, outputs = data.get("inputs", []), data.get("outputs", [])
    weights, attrs = data.get("weights", {}), data.get("attrs", {})
    if not (isinstance(inputs, list) and all(isinstance(v, str) for v in inputs)):
        raise GraphError(f"node {name!r}: 'inputs' must be a list of value names")
    if not (isinstance(outputs, list) and outputs and all(isinstance(v, str) and v for v in outputs)):
        raise GraphError(f"node {name!r}: 'outputs' must be a non-empty list of value names")
    if not (isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values())):
        raise GraphError(f"node {name!r}: 'weights' must map roles to tensor names")
    if not isinstance(attrs, dict):
        raise GraphError(f"node {name!r}: 'attrs' must be an object")
    return Node(op, name, list(inputs), list(outputs), dict(weights), dict(attrs))


def input_kind(spec: dict) -> str:
    """"ids" / "mask" (packed by the session) or "dense" (passed on as fed); defaults by name."""
    return spec.get("kind") or _DEFAULT_KIND.get(spec["name"], "dense")


def check_input_spec(spec: dict) -> None:
    """Validate one graph input declaration (kind, dtype, shape, tokens_per_item)."""
    name, kind = spec["name"], input_kind(spec)
    if kind not in INPUT_KINDS:
        raise GraphError(f"graph input {name!r}: kind must be one of {list(INPUT_KINDS)}, got {kind!r}")
    if kind == "ids" and name not in ("input_ids", "token_type_ids"):
        raise GraphError(f"graph input {name!r}: only input_ids and token_type_ids can be packed ids")
    if kind == "mask" and name != "attention_mask":
        raise GraphError(f"graph input {name!r}: only attention_mask can be the padding mask")
    if kind != "dense":
        return
    if spec.get("dtype") not in INPUT_DTYPES:
        raise GraphError(f"graph input {name!r}: dtype must be one of {list(INPUT_DTYPES)}, got {spec.get('dtype')!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > 8:
        raise GraphError(f"graph input {name!r}: shape must be a list of at most 8 dims")
    for dim in shape:
        ok = (isinstance(dim, str) and dim) or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)
        if not ok:
            raise GraphError(f"graph input {name!r}: every dim must be a non-negative int or a name, got {dim!r}")
    tokens = spec.get("tokens_per_item")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 1 << 20:
            raise GraphError(f"graph input {name!r}: tokens_per_item must be an int in [1, 2^20], got {tokens!r}")
        if not shape or shape[0] != "batch":
            raise GraphError(f"graph input {name!r}: an input with tokens_per_item must have 'batch' as first dim")


def _input_type(spec: dict) -> ValueType | None:
    kind = input_kind(spec)
    if kind == "ids":
        return ValueType(IDS, dtype="int64")
    if kind == "mask":
        return None  # consumed by the session (packing), not a value of the graph
    return ValueType(DENSE, dtype=spec["dtype"], shape=tuple(spec["shape"]))


def validate(graph: Graph, tensors: dict, registry: dict) -> dict[str, ValueType]:
    """Check the whole graph once; return the type of every value.

    Nodes must be in topological order (each input defined before use, each value defined once),
    every op known, every weight present with the shape its op requires.
    """
    types: dict[str, ValueType] = {}
    if not graph.inputs:
        raise GraphError("graph declares no inputs")
    names = [s["name"] for s in graph.inputs]
    if len(set(names)) != len(names):
        raise GraphError("graph input names must be unique")
    for spec in graph.inputs:
        check_input_spec(spec)
    kinds = {s["name"]: input_kind(s) for s in graph.inputs}
    if "ids" in kinds.values() and kinds.get("input_ids") != "ids":
        raise GraphError("a graph with packed id inputs needs a packed 'input_ids' input")
    if "mask" in kinds.values() and "ids" not in kinds.values():
        raise GraphError("attention_mask as a padding mask needs a packed 'input_ids' input")
    if sum(1 for s in graph.inputs if s.get("tokens_per_item") is not None) > 1:
        raise GraphError("at most one graph input may declare tokens_per_item")
    if "ids" in kinds.values() and any(s.get("tokens_per_item") is not None for s in graph.inputs):
        raise GraphError("tokens_per_item cannot be combined with packed id inputs")
    for spec in graph.inputs:
        vtype = _input_type(spec)
        if vtype is not None:
            types[spec["name"]] = vtype
    seen_nodes = set()
    for node in graph.nodes:
        if node.name in seen_nodes:
            raise GraphError(f"duplicate node name {node.name!r}")
        seen_nodes.add(node.name)
        op = registry.get(node.op)
        if op is None:
            raise GraphError(f"node {node.name!r}: unknown op {node.op!r}; known ops: {sorted(registry)}")
        for value in node.inputs:
            if value not in types:
                raise GraphError(f"node {node.name!r}: input {value!r} is not defined before use")
        for role, tensor in node.weights.items():
            if tensor not in tensors:
                raise GraphError(f"node {node.name!r}: weight {role!r} refers to missing tensor {tensor!r}")
        try:
            out_types = op.infer(node, [types[v] for v in node.inputs], {r: tensors[t] for r, t in node.weights.items()})
        except GraphError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise GraphError(f"node {node.name!r} ({node.op}): {exc}") from None
        if len(out_types) != len(node.outputs):
            raise GraphError(f"node {node.name!r}: expected {len(out_types)} outputs, got {len(node.outputs)}")
        for value, vtype in zip(node.outputs, out_types):
            if value in types:
                raise GraphError(f"node {node.name!r}: value {value!r} is defined twice")
            types[value] = vtype
    if not graph.outputs:
        raise GraphError("graph declares no outputs")
    for spec in graph.outputs:
        if spec["name"] not in types or types[spec["name"]].kind not in (TOKENS, SEQUENCES, DENSE):
            raise GraphError(f"graph output {spec['name']!r} is not produced by any node")
    return types


def last_uses(graph: Graph) -> dict[str, int]:
    """Index of the last node reading each value; outputs live to the end."""
    last = {}
    for index, node in enumerate(graph.nodes):
        for value in node.inputs:
            last[value] = index
    for spec in graph.outputs:
        last[spec["name"]] = len(graph.nodes)
    return last


class GraphBuilder:
    """Small helper for converters: append nodes with fresh value names."""

    def __init__(self, name: str):
        self.name = name
        self.inputs: list[dict] = []
        self.outputs: list[dict] = []
        self.nodes: list[Node] = []
        self._counter = 0

    def input(self, name: str, optional: bool = False, *, dtype: str = "int64", shape=("batch", "seq"),
              kind: str | None = None, tokens_per_item: int | None = None) -> str:
        spec = {"name": name, "dtype": dtype, "shape": list(shape), "optional": optional}
        if kind is not None:
            spec["kind"] = kind
        if tokens_per_item is not None:
            spec["tokens_per_item"] = int(tokens_per_item)
        self.inputs.append(spec)
        return name

    def add(self, op: str, name: str, inputs: list[str], weights: dict | None = None,
            attrs: dict | None = None, output: str | None = None) -> str:
        if output is None:
            self._counter += 1
            output = f"v{self._counter}"
        self.nodes.append(Node(op, name, list(inputs), [output], dict(weights or {}), dict(attrs or {})))
        return output

    def output(self, value: str) -> None:
        self.outputs.append({"name": value})

    def build(self) -> Graph:
        return Graph(self.name, self.inputs, self.outputs, self.nodes)
