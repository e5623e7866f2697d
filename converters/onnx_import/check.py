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
            cast = {k: v.astype(np.int32 if types[k] == "tensor(int32)" else np.int64) for k, v in feeds.items()}
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
            cast = {k: v.astype(np.int32 if types[k] == 6 else np.int64) for k, v in feeds.items()}
            return dict(zip(outputs, ev.run(None, cast)))

        return names, run, "onnx.reference"


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
               threads: int = 1, verbose: bool = True, seed: int = 0) -> dict[str, dict[str, float]]:
    """Compare the ONNX graph (onnxruntime, else onnx.reference) with its edgeformer conversion.

    ``model_path``: a converted model file, or None to convert ``onnx_path`` into a temporary file first.
    ``feeds``: padded (B, S) integer arrays by role name (input_ids, attention_mask, token_type_ids); default
    random right-padded feeds of shape (batch, seq). Token outputs are compared on valid tokens only (edgeformer
    returns zeros at padded positions). Returns ``{output: {"max_abs": ..., "max_rel": ...}}`` and prints it.
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
        if feeds is None:
            vocab = _vocab(model)
            feeds = random_feeds(batch, seq, vocab, type_vocab=_type_vocab(model), seed=seed)
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        onnx_feeds = {in_map[r]: feeds[r] for r in in_map if r in feeds and in_map[r] in names}
        missing = [n for n in names if n not in onnx_feeds]
        if missing:
            raise OnnxImportError(f"no feed for ONNX inputs {missing}")
        want = run_onnx(onnx_feeds)
        ours = {r: feeds[r] for r in ("input_ids", "attention_mask", "token_type_ids")
                if r in feeds and r in {s.name for s in model.inputs}}
        got = model.run(ours)
        valid = feeds.get("attention_mask", np.ones_like(feeds["input_ids"])).astype(bool)
        report = {}
        for ours_name, onnx_name in out_map.items():
            a, b = np.asarray(got[ours_name], np.float64), np.asarray(want[onnx_name], np.float64)
            if a.ndim == 3:
                a, b = a[valid], b[valid]
            if a.shape != b.shape:
                raise OnnxImportError(f"output {ours_name!r}: shape {a.shape} vs ONNX {b.shape}")
            diff = np.abs(a - b)
            report[ours_name] = {"max_abs": float(diff.max(initial=0.0)),
                                 # relative to the output's scale (elementwise ratios explode near zero)
                                 "max_rel": float(diff.max(initial=0.0) / max(float(np.abs(b).max(initial=0.0)),
                                                                               1e-30))}
        model.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    if verbose:
        shape = tuple(feeds["input_ids"].shape)
        for name, r in report.items():
            print(f"{name}: max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g} "
                  f"(edgeformer vs {engine}, feeds {shape})", file=sys.stdout)
    return report


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
