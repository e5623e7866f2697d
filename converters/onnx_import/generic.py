"""Generic-op fallback of the ONNX importer: "onnx" nodes over dense values (edgeformer/generic/ in the runtime).

``build_with_fallback`` (called by convert_onnx) keeps the coarse translation (interpret.py) when it converts every
output; when it converts only some, ``build_hybrid`` adds the others as generic ops reading the coarse values
through ``unpack`` (verified on padded probe batches); otherwise, or when forced (``convert_onnx(...,
generic=True)``, ``edgeformer convert --generic``), ``build_generic_graph`` turns the whole graph into generic ops:

1. constant folding: every node whose inputs are all constants is evaluated at conversion time (with the
   runtime's own generic op when it has one, so folding obeys the same semantics and element limit; otherwise
   onnx.reference); random ops are never folded;
2. shape subgraphs: ``Shape`` of a value whose dims onnx shape inference knows becomes a constant, or a
   partly known vector that ``Gather`` / ``Slice`` / ``Concat`` / ``Squeeze`` / ``Cast`` / ``Identity`` carry on
   until a fully known result folds (``Shape -> Gather(2)`` of a (batch, seq, 384) tensor is the constant 384);
3. dead nodes (not needed by a wanted output) are dropped; every remaining node becomes one "onnx" node whose
   constant inputs are model-file tensors (shared by name between nodes) or, when small, inline JSON;
4. every node is validated with the runtime's own load-time checks (edgeformer.generic.prepare): unsupported
   (domain, op type, opset), attribute kinds (subgraphs), dtypes or malformed attributes are all collected and
   raised as one UnsupportedOnnxError;
5. declared output shapes come from onnx shape inference; two probe runs rename the dims it could not name
   (``unk__3``) after the graph inputs' dims they turn out to be (``batch``, ``seq``).

float64 / float16 / bfloat16 constants, graph inputs and Cast targets become float32 (with one warning);
other dtypes the runtime lacks (int8, uint8, strings...) are unsupported.
"""
from __future__ import annotations

import re

import numpy as np

from converters.onnx_import.errors import OnnxFormatError, UnsupportedOnnxError, group_problems
from converters.onnx_import.loader import check_structure, initializers, opset_of

ELEM_TYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool"}
FLOAT_LIKE = {10: "float16", 11: "float64", 16: "bfloat16"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
INLINE_MAX = 16  # constants with at most this many elements are written into the node's JSON
SHAPE_OPS = {"Shape", "Gather", "Slice", "Concat", "Squeeze", "Cast", "Identity"}


class Rejected(Exception):
    """One node cannot be expressed as a generic op (the reason goes into UnsupportedOnnxError)."""


# -- dtypes and attributes -------------------------------------------------------------------------------------------
def runtime_array(array: np.ndarray, what: str, notes: list) -> np.ndarray:
    """The array in a dtype the runtime has: float16/float64/bfloat16 -> float32 (noted), others rejected."""
    from edgeformer.generic import DTYPES

    array = np.asarray(array)
    if array.dtype.name in DTYPES:
        return array
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        notes.append(f"{what}: {array.dtype.name} -> float32")
        return array.astype(np.float32)
    raise Rejected(f"{what} has dtype {array.dtype}; the runtime has float32, int64, int32 and bool")


def elem_dtype(elem: int, what: str, notes: list) -> str:
    if elem in ELEM_TYPES:
        return ELEM_TYPES[elem]
    if elem in FLOAT_LIKE:
        notes.append(f"{what}: {FLOAT_LIKE[elem]} -> float32")
        return "float32"
    try:
        import onnx

        name = onnx.TensorProto.DataType.Name(elem)
    except Exception:
        name = str(elem)
    raise Rejected(f"{what} has element type {name}; the runtime has float32, int64, int32 and bool")


def onnx_attributes(node, notes: list | None = None) -> dict:
    """The node's ONNX attributes as the runtime's JSON (see edgeformer/ops/generic.py)."""
    from onnx import AttributeProto, numpy_helper

    from edgeformer.generic import encode_float, encode_tensor
    from edgeformer.generic.base import MAX_INLINE

    notes = [] if notes is None else notes
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise Rejected(f"attribute {a.name!r} refers to a function attribute")
        t = a.type
        if t == AttributeProto.INT:
            out[a.name] = int(a.i)
        elif t == AttributeProto.FLOAT:
            out[a.name] = encode_float(a.f)
        elif t == AttributeProto.STRING:
            try:
                out[a.name] = a.s.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(f"attribute {a.name!r} is not UTF-8 text") from None
        elif t == AttributeProto.INTS:
            out[a.name] = [int(v) for v in a.ints]
        elif t == AttributeProto.FLOATS:
            out[a.name] = [encode_float(v) for v in a.floats]
        elif t == AttributeProto.STRINGS:
            try:
                out[a.name] = [s.decode("utf-8") for s in a.strings]
            except UnicodeDecodeError:
                raise Rejected(f"attribute {a.name!r} is not UTF-8 text") from None
        elif t == AttributeProto.TENSOR:
            try:
                array = numpy_helper.to_array(a.t)
            except Exception as exc:
                raise Rejected(f"attribute {a.name!r}: unreadable tensor: {exc}") from None
            array = runtime_array(array, f"attribute {a.name!r}", notes)
            if array.size > MAX_INLINE:
                raise Rejected(f"attribute {a.name!r}: a tensor of {array.size} elements is too large to inline")
            out[a.name] = encode_tensor(array)
        else:
            raise Rejected(f"attribute {a.name!r} of type {AttributeProto.AttributeType.Name(t)} (subgraphs, sparse "
                           f"tensors, type protos) has no generic-op form")
    if node.op_type == "Cast" and out.get("to") in FLOAT_LIKE:
        notes.append(f"Cast to {FLOAT_LIKE[out['to']]} -> float32")
        out["to"] = 1
    return out


# -- shapes ------------------------------------------------------------------------------------------------------------
def inferred_shapes(model) -> dict:
    """ONNX value name -> (elem type, dims) from onnx shape inference (dims: int, name or None)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True) if model.ByteSize() < 2 ** 31 - 1 else model
    except Exception:
        inferred = model
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None:
            continue
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[vi.name] = (tt.elem_type, dims)
    return out


class _Partial:
    """A 1-D int64 shape vector whose entries are partly known (None = known only at run time)."""

    def __init__(self, dims):
        self.dims = list(dims)

    def known(self):
        return None if any(d is None for d in self.dims) else np.array(self.dims, dtype=np.int64)


# -- the converter -----------------------------------------------------------------------------------------------------
class GenericBuilder:
    def __init__(self, model):
        self.model = model
        self.opset = opset_of(model, "")
        self.notes: list[str] = []
        self.consts: dict[str, np.ndarray] = dict(initializers(model))
        self.partial: dict[str, _Partial] = {}
        self.shapes = inferred_shapes(model)
        self._evaluator = None

    # ---- folding -----------------------------------------------------------------------------------
    def key(self, node, index):
        opset = self.opset if node.domain in ("", "ai.onnx") else opset_of(self.model, node.domain)
        return (node.name or f"{node.op_type}:{node.output[0] if node.output else index}", node.domain, node.op_type,
                opset)

    def evaluate(self, node, arrays):
        """Outputs of a node on constant inputs: the runtime's generic op when it applies, else onnx.reference."""
        from edgeformer.errors import GraphError, InputError
        from edgeformer.generic import DTYPES, prepare

        if node.domain in ("", "ai.onnx") and all(a is None or a.dtype.name in DTYPES for a in arrays):
            try:
                attributes = onnx_attributes(node, [])
                op = prepare(node.op_type, attributes, opset=self.opset,
                             dtypes=[None if a is None else a.dtype.name for a in arrays],
                             ranks=[None if a is None else a.ndim for a in arrays], consts=list(arrays),
                             n_outputs=len(node.output), name=node.name or node.op_type)
            except (GraphError, Rejected):
                op = None
            if op is not None:
                try:
                    return op(arrays[:len(op.in_dtypes)])
                except InputError as exc:
                    raise Rejected(f"constant folding fails: {exc}") from None
        from converters.onnx_import.evaluate import EvalError, NodeEvaluator

        if self._evaluator is None:
            self._evaluator = NodeEvaluator({"": self.opset, "com.microsoft": opset_of(self.model, "com.microsoft")})
        try:
            return self._evaluator.run(node, arrays)
        except EvalError as exc:
            raise Rejected(f"constant folding fails: {exc}") from None

    def fold_shape(self, node) -> list | None:
        """Shape-subgraph folding on partly known shape vectors; returns the outputs (arrays / _Partial) or None."""
        from edgeformer.generic import OPS

        op, ins = node.op_type, list(node.input)
        if any(a.name not in OPS[op].attributes for a in node.attribute):
            return None  # left to the emission, which reports the unknown attribute
        get = lambda i: self.partial.get(ins[i]) if i < len(ins) and ins[i] else None  # noqa: E731
        const = lambda i: self.consts.get(ins[i]) if i < len(ins) and ins[i] else None  # noqa: E731
        attrs = {a.name: a for a in node.attribute}
        if op == "Shape":
            dims = (self.shapes.get(ins[0]) or (None, None))[1]
            if dims is None:
                return None
            rank = len(dims)
            start = attrs["start"].i if "start" in attrs and self.opset >= 15 else 0
            end = attrs["end"].i if "end" in attrs and self.opset >= 15 else rank
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = min(max(end + rank if end < 0 else end, 0), rank)
            part = _Partial([d if isinstance(d, int) else None for d in dims[start:end]])
        elif op in ("Identity", "Cast") and get(0) is not None:
            if op == "Cast" and attrs["to"].i not in (6, 7):
                return None
            part = get(0)
            if op == "Cast" and attrs["to"].i == 6:
                known = part.known()
                return None if known is None else [known.astype(np.int32)]
        elif op == "Gather" and get(0) is not None and const(1) is not None:
            axis = attrs["axis"].i if "axis" in attrs else 0
            idx = const(1)
            if axis not in (0, -1) or idx.ndim > 1 or idx.dtype.kind not in "iu":
                return None
            n = len(get(0).dims)
            if any(not -n <= int(i) < n for i in idx.reshape(-1)):
                return None
            picked = [get(0).dims[int(i)] for i in idx.reshape(-1)]
            if idx.ndim == 0:
                return None if picked[0] is None else [np.array(picked[0], dtype=np.int64)]
            part = _Partial(picked)
        elif op == "Slice" and get(0) is not None and all(const(i) is not None for i in range(1, len(ins)) if ins[i]):
            from edgeformer.errors import InputError
            from edgeformer.generic.shape import slice_index

            vals = [None if not (i < len(ins) and ins[i]) else [int(v) for v in const(i).reshape(-1)]
                    for i in range(1, 5)]
            try:
                index = slice_index((len(get(0).dims),), vals[0], vals[1], vals[2], vals[3])
            except InputError:
                return None
            part = _Partial(get(0).dims[index[0]])
        elif op == "Concat" and any(get(i) is not None for i in range(len(ins))):
            dims = []
            for i in range(len(ins)):
                if get(i) is not None:
                    dims.extend(get(i).dims)
                elif const(i) is not None and const(i).ndim == 1 and const(i).dtype == np.int64:
                    dims.extend(int(v) for v in const(i))
                else:
                    return None
            part = _Partial(dims)
        elif op == "Squeeze" and get(0) is not None and len(get(0).dims) == 1:
            value = get(0).dims[0]
            return None if value is None else [np.array(value, dtype=np.int64)]
        else:
            return None
        known = part.known()
        return [known] if known is not None else [part]

    # ---- the walk --------------------------------------------------------------------------------------
    def build(self, outputs=None, available: dict | None = None):
        """(graph, tensors, info). ``available``: ONNX values that already exist as dense float32 values of another
        graph (the coarse part of a hybrid), name -> shape: the walk stops there, no graph input is declared and
        the partial graph is not validated on its own."""
        from edgeformer.errors import GraphError
        from edgeformer.generic import MAX_OPSET, OPS, encode_tensor, prepare
        from edgeformer.graph import GraphBuilder, validate
        from edgeformer.ops import REGISTRY

        model = self.model
        graph_outputs = [o.name for o in model.graph.output]
        wanted = graph_outputs if outputs is None else list(outputs)
        unknown = [o for o in wanted if o not in graph_outputs]
        if unknown:
            raise OnnxFormatError(f"unknown outputs {unknown}; the graph has {graph_outputs}")
        order = check_structure(model)
        problems, fold_problems = [], {}
        available = dict(available or {})

        # 1-2: constant folding and shape subgraphs
        dynamic = []
        for index in order:
            node = model.graph.node[index]
            key = self.key(node, index)
            present = [name for name in node.input if name]
            try:
                if node.op_type in RANDOM_OPS:
                    outs = None
                elif all(name in self.consts for name in present):
                    arrays = [self.consts[n] if n else None for n in node.input]
                    outs = self.evaluate(node, arrays)
                    if _inflates(node, arrays, outs):
                        outs = None  # an Expand / Tile / ConstantOfShape of a small constant: cheaper at run time
                elif node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx"):
                    outs = self.fold_shape(node)
                else:
                    outs = None
            except Rejected as exc:
                fold_problems[index] = (key, str(exc))  # reported if an output needs the node
                outs = None
            if outs is None:
                dynamic.append(index)
                continue
            for name, value in zip(node.output, outs):
                if not name or value is None:
                    continue
                if isinstance(value, _Partial):
                    self.partial[name] = value
                else:
                    self.consts[name] = np.asarray(value)
            if any(isinstance(v, _Partial) for v in outs):
                dynamic.append(index)  # still needed at run time unless every consumer folds

        # 3: keep the nodes a wanted output needs (through values that did not fold)
        producer = {name: i for i in dynamic for name in model.graph.node[i].output if name}
        needed, stack, keep = set(), [o for o in wanted if o not in self.consts], set()
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            if name in producer:
                keep.add(producer[name])
                stack.extend(n for n in model.graph.node[producer[name]].input
                             if n and n not in self.consts and n not in available)
        problems.extend(fold_problems[i] for i in sorted(keep) if i in fold_problems)

        # 4: emit and validate every node with the runtime's checks
        b = GraphBuilder(model.graph.name or "onnx")
        init_inputs = {t.name for t in model.graph.initializer}
        dtypes, ranks = {}, {}
        lead = self._leading_dim_name(init_inputs)
        for name, shape in available.items():
            dtypes[name], ranks[name] = "float32", len(shape)
        for inp in model.graph.input:  # every input the ONNX graph takes; those no output needs are optional
            if inp.name in init_inputs:
                continue
            if available:
                if inp.name in needed:
                    problems.append(((inp.name, "", "input", self.opset), "the generic part of a hybrid graph "
                                                                           "reads this graph input directly"))
                continue
            tt = inp.type.tensor_type
            try:
                dtype = elem_dtype(tt.elem_type, f"graph input {inp.name!r}", self.notes)
            except Rejected as exc:
                if inp.name in needed:
                    problems.append(((inp.name, "", "input", self.opset), str(exc)))
                continue
            dims = []
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    name = d.dim_param or f"{inp.name}_dim{i}"
                    dims.append("batch" if name == lead else name)
            b.input(inp.name, inp.name not in needed, dtype=dtype, shape=dims, kind="dense")
            dtypes[inp.name], ranks[inp.name] = dtype, len(dims)
        tensors, names, failed = {}, set(), set()
        for index in sorted(keep):
            node = model.graph.node[index]
            key = self.key(node, index)
            if node.domain not in ("", "ai.onnx"):
                problems.append((key, f"ORT contrib op {node.op_type} has no generic op" if node.domain == "com.microsoft"
                                 else f"unknown domain {node.domain!r}"))
                failed.update(node.output)
                continue
            if node.op_type not in OPS:
                problems.append((key, f"{node.op_type} has no generic op"))
                failed.update(node.output)
                continue
            if not OPS[node.op_type].since <= self.opset <= MAX_OPSET:
                problems.append((key, f"opset {self.opset} is outside the generic op's "
                                      f"{OPS[node.op_type].since}..{MAX_OPSET}"))
                failed.update(node.output)
                continue
            if any(name in failed for name in node.input) or index in fold_problems:
                failed.update(node.output)
                continue
            try:
                self._emit(node, index, b, tensors, names, dtypes, ranks, lead, prepare, encode_tensor)
            except (Rejected, GraphError) as exc:
                problems.append((key, str(exc)))
                failed.update(node.output)
        # outputs that are constants or graph inputs need an Identity node of their own
        produced = {o for n in b.nodes for o in n.outputs}
        for name in wanted:
            if name in produced or name in failed:
                continue
            if name in self.consts:
                array = runtime_array(self.consts[name], f"output {name!r}", self.notes)
                arg = self._const_arg(name, array, "const0", tensors, encode_tensor)
                node_name = self._unique(f"{name}_const", names)
                weights = {"const0": arg["weight"]} if "weight" in arg else {}
                b.nodes.append(_node("onnx", node_name, [], [name], weights,
                                     {"op_type": "Identity", "domain": "", "opset": self.opset, "attributes": {},
                                      "args": [arg], "output_shapes": [list(array.shape)]}))
            else:
                problems.append(((name, "", "output", self.opset), "a graph input used directly as a graph output"))
        if problems:
            error = UnsupportedOnnxError(group_problems(problems), wanted if outputs is not None else None)
            error.outputs = wanted if outputs is not None else None
            raise error
        for name in wanted:
            b.output(name)
        graph = b.build()
        try:
            if not available:
                validate(graph, tensors, REGISTRY)
        except GraphError as exc:
            raise UnsupportedOnnxError({("", "graph", self.opset): [("graph", f"generic graph rejected: {exc}")]}) \
                from None
        if not available:
            name_dims(graph, tensors)
        # every float value of a generic graph *is* the ONNX tensor of that name (edgeformer check's divergence search)
        trace = {o: o for node in graph.nodes for o in node.outputs if dtypes.get(o) == "float32"
                 and not o.startswith(f"{node.name}/unused")}
        info = {"outputs": {n: n for n in wanted}, "inputs": {s["name"]: s["name"] for s in b.inputs},
                "warnings": self.warnings(), "generic": True, "trace": trace}
        return graph, tensors, info

    def warnings(self) -> list[str]:
        if not self.notes:
            return []
        unique = list(dict.fromkeys(self.notes))
        shown = "; ".join(unique[:3]) + (f"; ... ({len(unique) - 3} more)" if len(unique) > 3 else "")
        return [f"converted to float32 (the runtime computes in float32): {shown}"]

    def _leading_dim_name(self, init_inputs):
        """The symbolic first dim shared by every graph input (becomes "batch", the runtime's shared dim)."""
        firsts = set()
        for inp in self.model.graph.input:
            if inp.name in init_inputs:
                continue
            dims = inp.type.tensor_type.shape.dim
            if not dims or dims[0].HasField("dim_value") or not dims[0].dim_param:
                return None
            firsts.add(dims[0].dim_param)
        return firsts.pop() if len(firsts) == 1 else None

    @staticmethod
    def _unique(base, names):
        base = re.sub(r"\s+", "_", base) or "node"
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        return name

    def _const_arg(self, value_name, array, role, tensors, encode_tensor):
        if array.size <= INLINE_MAX:
            return {"const": encode_tensor(array)}
        tensor = value_name if not value_name.startswith("__") else f"c{value_name}"
        if tensor in tensors and (tensors[tensor].shape != array.shape or tensors[tensor].dtype != array.dtype):
            tensor = f"{tensor}#{len(tensors)}"
        tensors[tensor] = np.ascontiguousarray(array)
        return {"weight": tensor}

    def _emit(self, node, index, b, tensors, names, dtypes, ranks, lead, prepare, encode_tensor):
        attributes = onnx_attributes(node, self.notes)
        args, inputs, weights, in_dtypes, in_ranks, consts = [], [], {}, [], [], []
        for position, name in enumerate(node.input):
            if not name:
                args.append(None)
                in_dtypes.append(None), in_ranks.append(None), consts.append(None)
            elif name in self.consts:
                array = runtime_array(self.consts[name], f"constant {name!r}", self.notes)
                arg = self._const_arg(name, array, f"const{position}", tensors, encode_tensor)
                if "weight" in arg:
                    weights[f"const{position}"] = arg["weight"]
                    arg = {"weight": f"const{position}"}
                args.append(arg)
                in_dtypes.append(array.dtype.name), in_ranks.append(array.ndim), consts.append(array)
            else:
                if name not in dtypes:
                    raise Rejected(f"input {name!r} is not available (an unsupported or folded producer)")
                if name not in inputs:
                    inputs.append(name)
                args.append({"input": inputs.index(name), "dtype": dtypes[name]})
                in_dtypes.append(dtypes[name]), in_ranks.append(ranks.get(name)), consts.append(None)
        outputs = list(node.output)
        while outputs and not outputs[-1]:
            outputs.pop()
        if not outputs:
            raise Rejected("the node has no outputs")
        node_name = self._unique(node.name or f"{node.op_type}_{index}", names)
        outputs = [o or f"{node_name}/unused{i}" for i, o in enumerate(outputs)]
        prepared = prepare(node.op_type, attributes, opset=self.opset, dtypes=in_dtypes, ranks=in_ranks,
                           consts=consts, n_outputs=len(outputs), name=node_name)
        shapes = []
        for out, dtype in zip(outputs, prepared.out_dtypes):
            elem, dims = self.shapes.get(out, (None, None))
            shape = None
            if dims is not None:
                shape = [d if isinstance(d, int) else ("batch" if d == lead else d) if d else f"?{out}_{i}"
                         for i, d in enumerate(dims)]
            shapes.append(shape)
            dtypes[out], ranks[out] = dtype, None if shape is None else len(shape)
        attrs = {"op_type": node.op_type, "domain": "", "opset": self.opset, "attributes": attributes, "args": args}
        if any(s is not None for s in shapes):
            attrs["output_shapes"] = shapes
        b.nodes.append(_node("onnx", node_name, inputs, outputs, weights, attrs))


def _inflates(node, arrays, outs) -> bool:
    """A folded result far larger than the node's constant inputs (> 2^20 elements and 4x the inputs) would bloat
    the model file; when the runtime has the op, it stays a node."""
    from edgeformer.generic import OPS

    size = sum(int(np.asarray(o).size) for o in outs if o is not None)
    given = sum(int(a.size) for a in arrays if a is not None)
    return node.domain in ("", "ai.onnx") and node.op_type in OPS and size > max(1 << 20, 4 * given)


def _node(op, name, inputs, outputs, weights, attrs):
    from edgeformer.graph import Node

    return Node(op, name, list(inputs), list(outputs), dict(weights), dict(attrs))


def build_generic_graph(model, *, outputs: list[str] | None = None):
    """(graph, tensors, info) of generic "onnx" nodes for the whole model; UnsupportedOnnxError lists every node
    the generic ops cannot run (grouped by (domain, op_type, opset))."""
    return GenericBuilder(model).build(outputs)


def generic_op_count(graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "onnx")



def name_dims(graph, tensors) -> None:
    """Check the declared output shapes on two probe runs and name their symbolic dims after the graph inputs' dims.

    onnx shape inference loses names through broadcasting and computed Reshape targets (`unk__3`); two probe runs
    with different sizes for every input dim name tell which dims are really `batch` or `seq`, so that inspect and
    plan_memory see them. A declared int the probes contradict becomes a name, a declared rank they contradict is
    dropped (shape inference is not always right, and the runtime checks declared shapes). A probe that does not
    run (inputs it cannot invent) leaves the shapes as they are."""
    from edgeformer.errors import EdgeformerError
    from edgeformer.graph import Graph, Node

    names = sorted({d for spec in graph.inputs for d in spec["shape"] if isinstance(d, str)})
    sizes = [{n: (2 if n == "batch" else 5 + 2 * i) for i, n in enumerate(names)},
             {n: (3 if n == "batch" else 6 + 3 * i) for i, n in enumerate(names)}]
    seen: dict = {}
    rng = np.random.default_rng(0)
    for probe in sizes:
        feeds = {}
        for spec in graph.inputs:
            shape = [probe[d] if isinstance(d, str) else d for d in spec["shape"]]
            if spec["dtype"] == "float32":
                feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
            else:  # ids 0 (valid in any table), masks 1 (nothing padded)
                feeds[spec["name"]] = np.full(shape, "mask" in spec["name"].lower(), dtype=spec["dtype"])
        undeclared = Graph(graph.name, graph.inputs, graph.outputs,
                           [Node(n.op, n.name, n.inputs, n.outputs, n.weights,
                                 {k: v for k, v in n.attrs.items() if k != "output_shapes"}) for n in graph.nodes])
        try:
            with np.errstate(all="ignore"):
                run_graph(undeclared, tensors, feeds, after=lambda n, v: seen.setdefault(n, []).append(v.shape) or v)
        except (EdgeformerError, ValueError, TypeError, IndexError, KeyError, ArithmeticError, MemoryError):
            return
    by_sizes = {(sizes[0][n], sizes[1][n]): n for n in names}
    for node in graph.nodes:
        declared = node.attrs.get("output_shapes")
        if node.op != "onnx" or not declared:
            continue
        for k, (value, shape) in enumerate(zip(node.outputs, declared)):
            observed = seen.get(value, ())
            if shape is None or len(observed) != 2:
                continue
            if any(len(o) != len(shape) for o in observed):
                declared[k] = None
                continue
            for i, dim in enumerate(shape):
                sizes_i = (observed[0][i], observed[1][i])
                if isinstance(dim, str) or sizes_i != (dim, dim):
                    shape[i] = by_sizes.get(sizes_i, dim if isinstance(dim, str) else f"?{value}_{i}")


def run_graph(graph, tensors, feeds, after=None) -> dict:
    """Run a graph of generic ops with plain NumPy (no session, no Numba kernels): the converter's probe executor.
    ``after(name, array)`` may replace each computed value."""
    from edgeformer.ops import REGISTRY

    env = {spec["name"]: np.asarray(feeds[spec["name"]], dtype=spec["dtype"]) for spec in graph.inputs
           if spec["name"] in feeds}
    for node in graph.nodes:
        run = REGISTRY[node.op].bind(node, {role: tensors[t] for role, t in node.weights.items()})
        for name, value in zip(node.outputs, run([env[v] for v in node.inputs], None, None)):
            env[name] = value if after is None else after(name, value)
    return {spec["name"]: env[spec["name"]] for spec in graph.outputs}


def build_hybrid(model, coarse_result, outputs: list[str] | None = None):
    """Coarse ops for the outputs the coarse translation converts, generic ops for the others, reading the coarse
    values they need through ``unpack`` (dense (B, S, width), zeros at padded positions).

    Exact only if the generic part never looks at padded positions of those values; this is checked by running the
    whole graph as generic ops on right-padded probe batches twice, once as is and once with the shared values
    zeroed at padded positions (what ``unpack`` gives). Generic outputs laid out (B, S, ...) are compared on valid
    tokens only (at padded positions they hold whatever the generic ops make of the zeros, as coarse token outputs
    hold zeros there). Raises Rejected / UnsupportedOnnxError when not possible.
    """
    from edgeformer.graph import SEQUENCES, TOKENS, Graph, Node, validate
    from edgeformer.ops import REGISTRY

    graph, tensors, info = coarse_result
    wanted = [o.name for o in model.graph.output] if outputs is None else list(outputs)
    missing = [o for o in wanted if o not in set(info["outputs"].values())]
    types = validate(graph, tensors, REGISTRY)
    shapes = inferred_shapes(model)
    ours_of = {onnx_name: target for target, onnx_name in info["outputs"].items()}
    for ours, onnx_name in info.get("trace", {}).items():
        ours_of.setdefault(onnx_name, ours)
    available = {}
    for onnx_name, ours in ours_of.items():
        vtype = types.get(ours)
        if vtype is None or vtype.kind not in (TOKENS, SEQUENCES):
            continue
        dims = (shapes.get(onnx_name) or (None, None))[1]
        if dims is None or len(dims) != (3 if vtype.kind == TOKENS else 2) or dims[-1] != vtype.width:
            continue  # a flat (B*S, width) view or an unknown shape: not what unpack gives
        available[onnx_name] = ["batch", "seq", vtype.width] if vtype.kind == TOKENS else ["batch", vtype.width]
    part, part_tensors, part_info = GenericBuilder(model).build(missing, available=available)
    verified = _padding_blind(model, info, missing, available)
    if verified is None:
        raise Rejected("the generic part reads padded positions of the coarse values (not exact with unpack)")
    for node in part.nodes:  # declared shapes as checked by the probes of the whole generic graph
        if node.attrs.get("output_shapes") is not None:
            node.attrs["output_shapes"] = [verified.get(o, s) for o, s in zip(node.outputs,
                                                                               node.attrs["output_shapes"])]
    rename = {name: name if name not in types else f"{name}:unpacked"
              for name in {v for n in part.nodes for v in n.inputs if v in available}}
    nodes = list(graph.nodes)
    for name, dense in sorted(rename.items()):
        kind = types[ours_of[name]].kind
        nodes.append(Node("unpack", f"unpack:{name}", [ours_of[name]], [dense], {},
                          {} if kind == TOKENS else {"from": SEQUENCES}))
    merged = dict(tensors)
    clash = {t: f"{t}:generic" for t, array in part_tensors.items() if t in merged}
    for t, array in part_tensors.items():
        merged[clash.get(t, t)] = array
    taken = set(types) | set(rename.values())
    for node in part.nodes:
        if any(o in taken for o in node.outputs):
            raise Rejected(f"value names of the generic part clash with the coarse graph's ({node.outputs})")
        nodes.append(Node(node.op, f"generic:{node.name}", [rename.get(v, v) for v in node.inputs], node.outputs,
                          {r: clash.get(t, t) for r, t in node.weights.items()}, node.attrs))
    hybrid = Graph(graph.name, graph.inputs, graph.outputs + [{"name": o} for o in missing], nodes)
    validate(hybrid, merged, REGISTRY)
    out = dict(info)
    out["outputs"] = {**info["outputs"], **{o: o for o in missing}}
    out["trace"] = {**info.get("trace", {}), **part_info.get("trace", {})}
    out["warnings"] = list(info.get("warnings", [])) + part_info["warnings"]
    return hybrid, merged, out


def _padding_blind(model, info, missing, available):
    """If the missing outputs do not change when the shared values are zeroed at padded positions, on two
    right-padded probe batches run through the whole graph as generic ops: {value: declared shape} of that graph
    (checked by its own probes); None otherwise."""
    from edgeformer.errors import EdgeformerError

    full, full_tensors, _ = GenericBuilder(model).build(missing)
    shapes = {o: s for n in full.nodes for o, s in zip(n.outputs, n.attrs.get("output_shapes") or [])}
    try:
        with np.errstate(all="ignore"):
            same = _same_when_zeroed(model, full, full_tensors, info, missing, available)
    except (EdgeformerError, ValueError, TypeError, IndexError, KeyError, ArithmeticError, MemoryError):
        return None
    return shapes if same else None


def _same_when_zeroed(model, full, full_tensors, info, missing, available) -> bool:
    roles = {name: role for role, name in info.get("inputs", {}).items()}
    vocab, type_vocab = _vocab_sizes(model, roles)
    rng = np.random.default_rng(0)
    for lengths, seq in (([7, 4, 1], 7), ([5, 2], 5)):
        mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)  # (B, S) right padding
        feeds = {}
        for spec in full.inputs:
            role = roles.get(spec["name"])
            if role == "input_ids":
                feeds[spec["name"]] = rng.integers(0, vocab, size=mask.shape) * mask
            elif role == "attention_mask":
                feeds[spec["name"]] = mask
            elif role == "token_type_ids":
                feeds[spec["name"]] = rng.integers(0, type_vocab, size=mask.shape) * mask
            elif not spec.get("optional"):
                return False  # an input we cannot make a probe for
        plain = run_graph(full, full_tensors, feeds)
        zeroed = run_graph(full, full_tensors, feeds, after=lambda name, v: v * mask[:, :, None].astype(v.dtype)
                           if name in available and v.ndim == 3 and v.shape[:2] == mask.shape else v)
        for name in missing:
            a, b = np.asarray(plain[name], np.float64), np.asarray(zeroed[name], np.float64)
            if a.shape != b.shape:
                return False
            if a.shape[:2] == mask.shape:  # a token output (B, S, ...): like the coarse ones, valid tokens only
                a, b = a[mask.astype(bool)], b[mask.astype(bool)]
            if np.abs(a - b).max(initial=0.0) > 1e-5 * max(1.0, np.abs(a).max(initial=0.0)):
                return False
    return True


def _vocab_sizes(model, roles) -> tuple[int, int]:
    """Rows of the tables the id inputs index (Gather of an initializer), to keep probe ids in range."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in roles and node.input[0] in inits:
            dims = inits[node.input[0]].dims
            if dims:
                role = roles[node.input[1]]
                sizes[role] = min(sizes.get(role, dims[0]), int(dims[0]))
    return max(sizes.get("input_ids", 3), 1), max(sizes.get("token_type_ids", 1), 1)


def build_with_fallback(model, coarse, *, outputs: list[str] | None = None, generic: bool = False):
    """The coarse translation ``coarse(model, outputs=...)`` when it converts every wanted output; otherwise the
    whole graph as generic ops. ``generic=True`` skips the coarse attempt. When both fail, the generic path's
    UnsupportedOnnxError (every node the runtime cannot run) is raised, unless the coarse path converted some
    outputs: then its partial result (other outputs left out with a warning, as before) is kept."""
    import warnings

    from edgeformer.errors import EdgeformerError

    if generic:
        return build_generic_graph(model, outputs=outputs)
    wanted = [o.name for o in model.graph.output] if outputs is None else list(outputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, coarse_error = coarse(model, outputs=outputs), None
        except (UnsupportedOnnxError, OnnxFormatError) as exc:
            result, coarse_error = None, exc
    if result is not None and len(result[2]["outputs"]) >= len(wanted):
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=3)
        return result
    if result is not None:
        try:
            graph, tensors, info = build_hybrid(model, result, outputs)
        except (Rejected, EdgeformerError):  # not possible or not exact: the whole graph goes generic
            pass
        else:
            extra = [o for o in info["outputs"].values() if o not in result[2]["outputs"].values()]
            info["warnings"].insert(0, f"outputs {extra} run as {generic_op_count(graph)} generic ops (plain NumPy) "
                                       f"after the coarse ops, which compute the others")
            return graph, tensors, info
    try:
        graph, tensors, info = build_generic_graph(model, outputs=outputs)
    except UnsupportedOnnxError as exc:
        if result is None:
            raise _merged(exc, coarse_error) from None
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=3)
        return result
    if isinstance(coarse_error, UnsupportedOnnxError):
        kinds = sorted(coarse_error.problems.items(), key=lambda kv: -len(kv[1]))
        reason = "untranslated: " + ", ".join(f"{op} x{len(items)}" for (_, op, _), items in kinds[:6]) + \
            (", ..." if len(kinds) > 6 else "")
    elif coarse_error is not None:
        reason = str(coarse_error).splitlines()[0]
        reason = reason if len(reason) <= 160 else reason[:160] + "..."
    else:
        reason = f"it converts only {sorted(result[2]['outputs'].values())} of {wanted}"
    info["warnings"].insert(0, f"the coarse-op translation does not cover this graph ({reason}); it runs as "
                               f"{generic_op_count(graph)} generic ops instead (plain NumPy, slower than coarse ops)")
    return graph, tensors, info


def _merged(generic_error: UnsupportedOnnxError, coarse_error) -> UnsupportedOnnxError:
    """The generic path's problems (what the runtime cannot run at all), each node with the coarse path's reason
    when that one is more specific (an ORT contrib op the coarse path knows but cannot translate in this form)."""
    if not isinstance(coarse_error, UnsupportedOnnxError):
        return generic_error
    problems = {}
    for key, items in generic_error.problems.items():
        coarse = dict(coarse_error.problems.get(key, []))
        problems[key] = [(name, coarse.get(name, reason)) for name, reason in items]
    merged = UnsupportedOnnxError(problems, getattr(generic_error, "outputs", None))
    merged.outputs = getattr(generic_error, "outputs", None)
    return merged
