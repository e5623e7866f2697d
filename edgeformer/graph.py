"""The typed graph of coarse transformer ops, its shape rules and its validation.

A graph is plain JSON (stored in the model file's header):

    {"name": str,
     "inputs":  [{"name", "dtype", "shape": ["batch", "seq"], "optional": bool}],
     "outputs": [{"name"}],
     "nodes":   [{"op", "name", "inputs": [value names], "outputs": [value names],
                  "weights": {role: tensor name}, "attrs": {...}}]}

Values between nodes are *packed*: a token value has shape (T, width) holding only the valid
(unpadded) tokens of the batch back to back (ByteTransformer); a sequence value has shape (B, width).
Graph inputs are the padded (B, S) integer arrays a user feeds; the session packs them.
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


@dataclass(frozen=True)
class ValueType:
    """Kind and static width of a value; the leading dim (T or B) is known only at run time."""

    kind: str
    width: int = 0


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


# Graph inputs the session knows how to pack, and their types inside the graph.
KNOWN_INPUTS = {"input_ids": ValueType(IDS), "token_type_ids": ValueType(IDS), "attention_mask": None}


def validate(graph: Graph, tensors: dict, registry: dict) -> dict[str, ValueType]:
    """Check the whole graph once; return the type of every value.

    Nodes must be in topological order (each input defined before use, each value defined once),
    every op known, every weight present with the shape its op requires.
    """
    types: dict[str, ValueType] = {}
    names = [s["name"] for s in graph.inputs]
    if "input_ids" not in names:
        raise GraphError("graph must have an 'input_ids' input")
    for spec in graph.inputs:
        if spec["name"] not in KNOWN_INPUTS:
            raise GraphError(f"unsupported graph input {spec['name']!r}; known: {sorted(KNOWN_INPUTS)}")
        if KNOWN_INPUTS[spec["name"]] is not None:
            types[spec["name"]] = KNOWN_INPUTS[spec["name"]]
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
        if spec["name"] not in types or types[spec["name"]].kind not in (TOKENS, SEQUENCES):
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

    def input(self, name: str, optional: bool = False) -> str:
        self.inputs.append({"name": name, "dtype": "int64", "shape": ["batch", "seq"], "optional": optional})
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
