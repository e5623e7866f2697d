"""ONNX encoder / GPT-2 decoder export -> edgeformer model file (coarse ops only)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from converters.onnx_import.errors import OnnxFormatError, UnsupportedOnnxError, group_problems
from converters.onnx_import.interpret import ROLES, Interpreter
from converters.onnx_import.loader import check_structure, initializers, load_onnx
from converters.onnx_import.values import Bad, Row, Unsupported

INT_TYPES = {6, 7}  # INT32, INT64
FLOAT_INPUT_TYPES = {1}  # FLOAT: pixel inputs (ViT)
_ALIASES = {"input_ids": ("input_ids", "input", "ids", "input.1", "input_ids:0"),
            "attention_mask": ("attention_mask", "mask", "input_mask", "attention_mask:0"),
            "token_type_ids": ("token_type_ids", "segment_ids", "token_type", "token_type_ids:0"),
            "position_ids": ("position_ids", "position_ids:0")}  # Optimum GPT-2: taken to be arange(S) (interpret.py)


def input_roles(model) -> dict[str, str]:
    """ONNX graph input name -> role (input_ids / attention_mask / token_type_ids, or pixel_values), with dtype checks.

    A float input of rank 4 is a ViT's pixel input (B, C, H, W), whatever its name, and must be the graph's only
    input (the position table fixes the number of patches, so the converted model takes one image size)."""
    init_names = {t.name for t in model.graph.initializer}
    roles = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        elem = inp.type.tensor_type.elem_type
        dims = inp.type.tensor_type.shape.dim
        if elem in FLOAT_INPUT_TYPES and len(dims) == 4:
            role = "pixel_values"  # symbolic C, H, W are inferred by the Interpreter (_pixel_input)
        else:
            role = next((r for r, names in _ALIASES.items() if inp.name.lower() in names), None)
        if role is None:
            raise OnnxFormatError(f"unsupported graph input {inp.name!r}; the importer knows {list(ROLES)} "
                                  f"(also spelled {sorted({a for v in _ALIASES.values() for a in v})}) and float "
                                  f"(batch, channels, height, width) pixel inputs")
        if role in roles.values():
            raise OnnxFormatError(f"two graph inputs for {role}")
        if role == "pixel_values":
            roles[inp.name] = role
            continue
        if elem not in INT_TYPES and not (role == "attention_mask" and elem in (1, 9)):
            raise OnnxFormatError(f"graph input {inp.name!r} has element type {_type_name(elem)}; "
                                  f"{role} must be int64 or int32")
        rank = len(dims)
        if inp.type.tensor_type.HasField("shape") and rank != 2:
            raise OnnxFormatError(f"graph input {inp.name!r} has rank {rank}; expected (batch, sequence)")
        roles[inp.name] = role
    if "pixel_values" in roles.values():
        if len(roles) > 1:
            raise OnnxFormatError(f"a pixel input must be the graph's only input, got {sorted(roles)}")
    elif "input_ids" not in roles.values():
        raise OnnxFormatError("the graph has no input_ids input")
    return roles


def _type_name(elem: int) -> str:
    try:
        import onnx

        return onnx.TensorProto.DataType.Name(elem)
    except Exception:
        return str(elem)


def build_graph(model, *, outputs: list[str] | None = None):
    """Interpret the model; returns (graph, tensors, info) or raises UnsupportedOnnxError."""
    from edgeformer.graph import validate
    from edgeformer.ops import REGISTRY

    roles = input_roles(model)
    order = check_structure(model)
    interp = Interpreter(model, initializers(model), roles)
    interp.run(order)

    wanted = [o.name for o in model.graph.output] if outputs is None else list(outputs)
    unknown = [o for o in wanted if o not in {x.name for x in model.graph.output}]
    if unknown:
        raise OnnxFormatError(f"unknown outputs {unknown}; the graph has {[o.name for o in model.graph.output]}")
    produced, failures = {}, {}
    for name in wanted:
        value = interp.values.get(name)
        try:
            if isinstance(value, Bad):
                raise Unsupported(value.causes)
            if not isinstance(value, Row):
                raise Unsupported([], f"output {name!r} is a {type(value).__name__}, not a token tensor")
            produced[name] = interp.materialize_row(value)
        except Unsupported as exc:
            causes = list(exc.causes)
            if not causes:
                causes = [((name, "", "output", 0), str(exc))]
            failures[name] = causes
    if failures and (outputs is not None or not produced):
        raise UnsupportedOnnxError(group_problems([c for cs in failures.values() for c in cs]), list(failures))
    for name in failures:
        warnings.warn(f"ONNX output {name!r} cannot be converted and is left out:\n"
                      f"{UnsupportedOnnxError(group_problems(failures[name]), [name])}", stacklevel=3)

    # graph outputs: the one token output is last_hidden_state; graph values renamed accordingly
    rename, out_names = {}, {}
    for onnx_name, value in produced.items():
        # the one token output is last_hidden_state, unless it is a (B, d) output or an LM head's logits
        single = len(produced) == 1 and not interp.values[onnx_name].pooled and onnx_name != "logits"
        target = "last_hidden_state" if single or onnx_name == "last_hidden_state" else onnx_name
        target = target if target not in rename.values() else f"{target}_{len(rename)}"
        if value in rename:  # the same value output twice: the runtime needs one name per value
            raise UnsupportedOnnxError({("", "output", 0): [(onnx_name, "output duplicates another output")]})
        rename[value] = target
        out_names[target] = onnx_name
    b = interp.builder
    for node in b.nodes:
        node.inputs = [rename.get(v, v) for v in node.inputs]
        node.outputs = [rename.get(v, v) for v in node.outputs]
    needed = set(out_names)
    kept = []
    for node in reversed(b.nodes):  # prune nodes no output needs
        if any(o in needed for o in node.outputs):
            kept.append(node)
            needed.update(node.inputs)
    b.nodes = kept[::-1]
    if interp.pixels is not None:  # ViT: dense float32 pixels
        interp.declare_pixel_input(b)
    else:
        b.input("input_ids")
        b.input("attention_mask", optional=True)
        if "token_type_ids" in needed:
            b.input("token_type_ids", optional=True)
    for name in out_names:
        b.output(name)
    graph = b.build()
    used = {t for n in graph.nodes for t in n.weights.values()}
    tensors = {k: v for k, v in interp.tensors.items() if k in used}
    validate(graph, tensors, REGISTRY)
    info = {"outputs": out_names, "inputs": {r: n for n, r in roles.items()}, "warnings": interp.warnings,
            "trace": trace_map(interp, rename, {v for n in graph.nodes for v in n.outputs})}
    return graph, tensors, info


def trace_map(interp, rename: dict, values: set) -> dict[str, str]:
    """{edgeformer value: the ONNX tensor holding the same numbers} for `edgeformer check`'s divergence search.

    An ONNX tensor qualifies when the interpreter holds it as a token tensor that was materialised as a whole
    (row-wise function included: a layer norm, a GELU fused into its linear), or as a token tensor with no
    pending function whose source was materialised: the source *is* that value (a linear fused with a residual
    is a different source from the plain linear, so the pre-residual ONNX tensor does not map onto the fused
    output). The first ONNX tensor in graph order wins (later ones are reshapes / identities of it)."""
    trace: dict[str, str] = {}
    for onnx_name, value in interp.values.items():
        if not isinstance(value, Row):
            continue
        ours = getattr(value, "_value", None)
        if ours is None and value.fn is None:
            ours = value.src.value
        if ours is None:
            continue
        ours = rename.get(ours, ours)
        if ours in values and ours not in trace:
            trace[ours] = onnx_name
    return trace


def convert_onnx(src_path, out_path, *, tokenizer_json: str | None = None, outputs: list[str] | None = None,
                 generic: bool = False) -> Path:
    """Convert a BERT-family or GPT-2 ONNX export (plain or ORT-optimized) into an edgeformer model file.

    Graphs (or outputs) the coarse ops cannot express run as generic ops (converters/onnx_import/generic.py);
    ``generic=True`` forces that path. Raises OnnxFormatError for malformed files and UnsupportedOnnxError
    (listing every node the runtime cannot run, grouped by (domain, op_type, opset)).
    """
    from converters.onnx_import.generic import build_with_fallback
    from edgeformer.format import write_model

    src_path, out_path = Path(src_path), Path(out_path)
    model = load_onnx(src_path)
    graph, tensors, info = build_with_fallback(model, build_graph, outputs=outputs, generic=generic)
    for message in info["warnings"][:3]:
        warnings.warn(message, stacklevel=2)
    metadata = {"source": "onnx", "onnx.file": src_path.name,
                "onnx.outputs": json.dumps(info["outputs"]), "onnx.inputs": json.dumps(info["inputs"]),
                "onnx.trace": json.dumps(info.get("trace", {}))}
    max_len = max((t.shape[0] - n.attrs.get("position_offset", 0) for n in graph.nodes if n.op == "embedding"
                   for role, t in ((r, tensors[w]) for r, w in n.weights.items()) if role == "position"), default=None)
    if max_len:
        metadata["max_length"] = str(int(max_len))
    write_model(out_path, tensors, graph.to_json(), tokenizer_json=tokenizer_json, metadata=metadata)
    return out_path
