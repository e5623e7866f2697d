"""`edgeformer check`: run an ONNX graph and its conversion on the same feeds and compare every output."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from converters.onnx_import.errors import OnnxImportError


def _onnx_runner(onnx_path: Path):
    """(input names, run(feeds) -> {output name: array}) through onnxruntime, else onnx.reference."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        types = {i.name: i.type for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]

        def run(feeds):
            cast = {k: _cast(v, types[k] == "tensor(int32)") for k, v in feeds.items()}
            return dict(zip(outputs, session.run(None, cast)))

        return names, run, "onnxruntime"
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(onnx_path))
        ev = ReferenceEvaluator(model)
        init = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in init]
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        outputs = [o.name for o in model.graph.output]

        def run(feeds):
            cast = {k: _cast(v, types[k] == 6) for k, v in feeds.items()}
            return dict(zip(outputs, ev.run(None, cast)))

        return names, run, "onnx.reference"


def _cast(array, int32: bool):
    """Integer feeds to the ONNX input's int width; float feeds (pixels) as float32."""
    array = np.asarray(array)
    if array.dtype.kind in "iub":
        return array.astype(np.int32 if int32 else np.int64)
    return array.astype(np.float32)


def random_feeds(batch: int, seq: int, vocab: int, *, type_vocab: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded random feeds (row 0 full, the others random lengths >= 1); ids avoid 0..2 (special ids)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for b in range(batch):
        mask[b, :seq if b == 0 else int(rng.integers(1, seq + 1))] = 1
    ids[mask == 0] = 0
    types = rng.integers(0, max(type_vocab, 1), size=(batch, seq), dtype=np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def check_onnx(onnx_path, model_path=None, feeds: dict | None = None, *, batch: int = 2, seq: int = 16,
               threads: int = 1, verbose: bool = True, seed: int = 0, atol: float = 1e-4,
               trace: bool | None = None) -> dict[str, dict[str, float]]:
    """Compare the ONNX graph (onnxruntime, else onnx.reference) with its edgeformer conversion.

    ``model_path``: a converted model file, or None to convert ``onnx_path`` into a temporary file first.
    ``feeds``: padded (B, S) integer arrays by role name (input_ids, attention_mask, token_type_ids), plus any
    dense input by name (pixel_values); default random right-padded feeds of shape (batch, seq) and standard
    normal dense inputs. Token outputs are compared on valid tokens only (edgeformer returns zeros at padded
    positions). Returns ``{output: {"max_abs": ..., "max_rel": ...}}`` and prints it.

    ``trace`` (default: when some output's max abs error exceeds ``atol``): also compare every intermediate
    tensor that the conversion recorded as equal to an ONNX tensor (metadata ``onnx.trace``), in graph order,
    and report the first whose error exceeds ``atol`` plus 1e-3 of its magnitude, under the key
    ``"first_divergence"`` of the result: {value, node, op, onnx_tensor, onnx_node, max_abs, max_ref}.
    """
    import edgeformer

    onnx_path = Path(onnx_path)
    tmp = None
    if model_path is None:
        from converters.onnx_import.convert import convert_onnx

        tmp = tempfile.TemporaryDirectory(prefix="edgeformer-check-")
        model_path = convert_onnx(onnx_path, Path(tmp.name) / "model.edgeformer")
    try:
        model = edgeformer.load(model_path, threads=threads)
        meta = model.metadata
        out_map = json.loads(meta.get("onnx.outputs", "{}")) or {s.name: s.name for s in model.outputs}
        in_map = json.loads(meta.get("onnx.inputs", "{}"))  # role -> onnx input name
        names, run_onnx, engine = _onnx_runner(onnx_path)
        if not in_map:
            in_map = {n: n for n in names}
        for spec in model.inputs:  # dense inputs keep their ONNX name
            in_map.setdefault(spec.name, spec.name)
        if feeds is None:
            feeds = _random_feeds_for(model, batch, seq, seed)
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        if "position_ids" in in_map and "position_ids" not in feeds and "input_ids" in feeds:
            # Optimum's GPT-2 exports take positions; the conversion assumes the index in the padded row
            ids = feeds["input_ids"]
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        onnx_feeds = {in_map[r]: feeds[r] for r in in_map if r in feeds and in_map[r] in names}
        missing = [n for n in names if n not in onnx_feeds]
        if missing:
            raise OnnxImportError(f"no feed for ONNX inputs {missing}")
        want = run_onnx(onnx_feeds)
        ours = {r: feeds[r] for r in feeds if r in {s.name for s in model.inputs}}
        got = model.run(ours)
        valid = _valid_mask(feeds, got, out_map)
        report = {}
        for ours_name, onnx_name in out_map.items():
            report[ours_name] = _compare(got[ours_name], want[onnx_name], valid, ours_name)
        worst = max((r["max_abs"] for r in report.values()), default=0.0)
        if trace or (trace is None and worst > atol):
            divergence = _first_divergence(model, onnx_path, onnx_feeds, ours, valid, atol)
            if divergence is not None:
                report["first_divergence"] = divergence
        model.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    if verbose:
        shape = {k: tuple(v.shape) for k, v in feeds.items()}
        for name, r in report.items():
            if name == "first_divergence":
                continue
            print(f"{name}: max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g} "
                  f"(edgeformer vs {engine}, feeds {shape})", file=sys.stdout)
        d = report.get("first_divergence")
        if d:
            print(f"first diverging tensor: {d['value']!r} (node {d['node']!r}, {d['op']}) vs ONNX {d['onnx_tensor']!r} "
                  f"(node {d['onnx_node']!r}, {d['onnx_op']}): max abs {d['max_abs']:.3g} "
                  f"(max |ref| {d['max_ref']:.3g})", file=sys.stdout)
        elif trace is not False and worst > atol:
            print("no recorded intermediate tensor diverges: the difference arises after the last traced tensor",
                  file=sys.stdout)
    return report


def _random_feeds_for(model, batch, seq, seed) -> dict[str, np.ndarray]:
    """Random right-padded id feeds for id inputs; standard normal arrays for dense float inputs."""
    feeds = random_feeds(batch, seq, _vocab(model), type_vocab=_type_vocab(model), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for spec in model.inputs:
        if spec.name in feeds or spec.dtype != "float32":
            continue
        shape = tuple(batch if d == "batch" else d if isinstance(d, int) else seq for d in spec.shape)
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    names = {s.name for s in model.inputs}
    if "input_ids" not in names:  # no id inputs: drop the id feeds
        feeds = {k: v for k, v in feeds.items() if k in names}
    return feeds


def _valid_mask(feeds, got, out_map):
    if "attention_mask" in feeds:
        return feeds["attention_mask"].astype(bool)
    if "input_ids" in feeds:
        return np.ones(feeds["input_ids"].shape, dtype=bool)
    return None


def _compare(ours, ref, valid, name) -> dict[str, float]:
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.ndim == 3 and valid is not None and a.shape[:2] == valid.shape:
        a, b = a[valid], b[valid]
    if a.shape != b.shape:
        raise OnnxImportError(f"output {name!r}: shape {a.shape} vs ONNX {b.shape}")
    diff = np.abs(a - b)
    # relative to the output's scale (elementwise ratios explode near zero)
    return {"max_abs": float(diff.max(initial=0.0)),
            "max_rel": float(diff.max(initial=0.0) / max(float(np.abs(b).max(initial=0.0)), 1e-30))}


def _first_divergence(model, onnx_path, onnx_feeds, ours, valid, atol):
    """Run both again exposing the traced intermediates; the first (in edgeformer's order) that differs."""
    import onnx

    trace = json.loads(model.metadata.get("onnx.trace", "{}"))
    if not trace:
        return None
    captured: dict[str, np.ndarray] = {}

    def observe(node, inputs):
        for name, array in zip(node.inputs, inputs):
            if name in trace and name not in captured:
                captured[name] = np.array(array, dtype=np.float64)

    outs = model.run(ours, observe=observe)
    order = []  # values in the order they are produced
    for node in model.graph.nodes:
        order.extend((v, node) for v in node.outputs if v in trace)
    source = onnx.load(str(onnx_path))
    producers = {o: n for n in source.graph.node for o in n.output}
    existing = {o.name for o in source.graph.output}
    for onnx_name in trace.values():
        if onnx_name not in existing:
            source.graph.output.append(onnx.helper.make_tensor_value_info(onnx_name, onnx.TensorProto.FLOAT, None))
            existing.add(onnx_name)
    ref = _run_model_proto(source, onnx_feeds)
    for value, node in order:
        ours_array = captured.get(value)
        if ours_array is None and value in outs:
            ours_array = np.asarray(outs[value], np.float64)
            if ours_array.ndim == 3 and valid is not None:
                ours_array = ours_array[valid]
        onnx_name = trace[value]
        if ours_array is None or onnx_name not in ref:
            continue
        theirs = _as_packed(np.asarray(ref[onnx_name], np.float64), ours_array.shape, valid)
        if theirs is None:
            continue
        err = float(np.abs(ours_array - theirs).max(initial=0.0))
        scale = float(np.abs(theirs).max(initial=0.0))
        if not err <= atol + 1e-3 * scale:  # also catches NaN
            producer = producers.get(onnx_name)
            return {"value": value, "node": node.name, "op": node.op, "onnx_tensor": onnx_name,
                    "onnx_node": producer.name if producer is not None else "",
                    "onnx_op": producer.op_type if producer is not None else "input", "max_abs": err,
                    "max_ref": scale}
    return None


def _as_packed(array, shape, valid):
    """An ONNX tensor (B, S, W) or (B*S, W) as edgeformer's packed (T, W) valid rows, or (B, W) as is."""
    if array.shape == shape:
        return array
    if valid is None or array.size != valid.size * shape[-1]:
        return None
    rows = array.reshape(valid.size, shape[-1])[valid.reshape(-1)]
    return rows if rows.shape == shape else None


def _run_model_proto(model, feeds) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in session.get_inputs()}
        cast = {k: (v.astype(np.int32) if types.get(k) == "tensor(int32)" else v) for k, v in feeds.items()}
        return dict(zip(names, session.run(None, cast)))
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))


def _vocab(model) -> int:
    for node in model.graph.nodes:
        if node.op == "embedding":
            return int(model.tensors[node.weights["word"]].shape[0])
    return 100


def _type_vocab(model) -> int:
    for node in model.graph.nodes:
        if node.op == "embedding" and "token_type" in node.weights:
            return int(model.tensors[node.weights["token_type"]].shape[0])
    return 1
