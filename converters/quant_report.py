"""Per-layer quantisation error report (issue 7): every linear's output in a quantised model against the
same linear's output in the fp32 model, over a calibration set.

``layer_report(fp32_path, quant_path, texts)`` runs both model files on the same batches and, for every
linear node (matched by node name), accumulates over all valid tokens:
    cosine          cosine similarity of the whole output, flattened
    min_token_cos   the smallest cosine of one token's output row (one row per token)
    snr_db          10 log10(sum fp32^2 / sum (q - fp32)^2); inf when the outputs are identical
    max_abs_err     max |q - fp32|
    clipped         static-int8 linears only (else None): the fraction of the layer's input values (in the
                    quantised model's own run, after the smoothing vector) outside the calibrated range,
                    which the runtime clips to the end codes
Each model runs on its own activations, so a row measures the error accumulated up to that layer's output
(propagated from earlier layers plus the layer's own), not the layer in isolation.
Outputs are read through ``Model.run(observe=...)`` (a node's output is an input of a later node); an
output that no node consumes must be a graph output and is read from run's result at the valid positions.
``format_report(rows)`` prints an aligned table, ``save_report(rows, path)`` writes JSON (inf as null).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError


def random_feeds(model, n_batches=8, batch_size=8, seq_len=32, seed=0) -> list[dict]:
    """Random padded feeds over the model's vocabulary, for model files without a tokenizer."""
    vocab = next(model.tensors[n.weights["word"]].shape[0] for n in model.graph.nodes if n.op == "embedding")
    seq_len = min(seq_len, model.max_length or seq_len)
    rng = np.random.default_rng(seed)
    feeds_list = []
    for _ in range(n_batches):
        ids = rng.integers(0, vocab, (batch_size, seq_len), dtype=np.int64)
        lengths = rng.integers(1, seq_len + 1, batch_size)
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        feeds_list.append({"input_ids": ids * mask, "attention_mask": mask})
    return feeds_list


def static_range(model, node):
    """(lo, hi, smooth) of a static-int8 linear, None for any other linear: the representable values are
    [-zp s, (255 - zp) s] (asymmetric) or [-127 s, 127 s] (symmetric); an input value v = x * smooth is
    clipped when v <= lo or v >= hi with lo, hi those ends widened by half a step (gemm_s8.quantize_rows_static)."""
    if node.attrs.get("format") != "int8" or "input_scale" not in node.weights:
        return None
    s = float(model.tensors[node.weights["input_scale"]][0])
    if "input_zero_point" in node.weights:
        z = int(model.tensors[node.weights["input_zero_point"]][0])
        lo, hi = -z * s, (255 - z) * s
    else:
        lo, hi = -127 * s, 127 * s
    smooth = model.tensors[node.weights["smooth"]] if "smooth" in node.weights else None
    return lo - s / 2, hi + s / 2, smooth


def _linear_outputs(model, feeds, clip=None) -> dict[str, np.ndarray]:
    """Run once; {linear node name: its packed output (rows, n) as float64}. clip: a dict accumulating
    {static linear name: [values outside the calibrated range, values]}."""
    linears = {n.outputs[0]: n.name for n in model.graph.nodes if n.op == "linear"}
    ranges = {} if clip is None else {n.name: r for n in model.graph.nodes if n.op == "linear"
                                      for r in [static_range(model, n)] if r is not None}
    seen: dict[str, np.ndarray] = {}

    def observe(node, inputs):
        if node.name in ranges and inputs[0].size:
            lo, hi, smooth = ranges[node.name]
            x = inputs[0] if smooth is None else inputs[0] * smooth[None, :]
            count = clip.setdefault(node.name, [0, 0])
            count[0] += int(np.count_nonzero((x <= lo) | (x >= hi)))
            count[1] += x.size
        for value, array in zip(node.inputs, inputs):
            if value in linears and value not in seen:
                seen[value] = np.array(array, dtype=np.float64)  # a copy: buffers may be reused later

    graph_outputs = {s.name for s in model.outputs}
    missing = [v for v in linears if v in graph_outputs]  # possibly never consumed by a node
    returned = model.run(feeds, outputs=missing, observe=observe)
    mask = feeds.get("attention_mask")
    for value in missing:
        if value not in seen:
            out = returned[value]  # (B, S, n) unpacked, zeros at padding: keep the valid positions only
            valid = np.ones(out.shape[:2], bool) if mask is None else np.asarray(mask).astype(bool)
            seen[value] = out[valid].astype(np.float64)
    lost = sorted(name for value, name in linears.items() if value not in seen)
    if lost:
        raise EdgeformerError(f"outputs of {lost} are neither consumed nor graph outputs")
    return {linears[v]: a for v, a in seen.items()}


def layer_report(fp32_path, quant_path, texts=None, batch_size: int = 16, feeds_list=None) -> list[dict]:
    """One row per linear of the quantised model, in graph order. Give texts (needs a tokenizer in the fp32
    file) or feeds_list (a list of feed dicts, e.g. random_feeds(model))."""
    import edgeformer

    ref, quant = edgeformer.load(fp32_path, threads=1), edgeformer.load(quant_path, threads=1)
    try:
        return _compare(ref, quant, texts, batch_size, feeds_list)
    finally:
        ref.close()
        quant.close()


def _compare(ref, quant, texts, batch_size, feeds_list) -> list[dict]:
    if feeds_list is None:
        if texts is None:
            raise EdgeformerError("layer_report needs texts or feeds_list")
        encoder, names, texts = ref.text_encoder(), {s.name for s in ref.inputs}, list(texts)
        feeds_list = [{k: v for k, v in encoder(texts[i:i + batch_size]).items() if k in names}
                      for i in range(0, len(texts), batch_size)]
    nodes = [n for n in quant.graph.nodes if n.op == "linear"]
    acc = {n.name: dict(ref2=0.0, err2=0.0, dot=0.0, q2=0.0, max_abs=0.0, min_cos=1.0, rows=0) for n in nodes}
    clip: dict = {}
    for feeds in feeds_list:
        a_out, b_out = _linear_outputs(ref, feeds), _linear_outputs(quant, feeds, clip)
        for name, s in acc.items():
            if name not in a_out:
                raise EdgeformerError(f"linear {name!r} of the quantised model is not in the fp32 model")
            a, b = a_out[name], b_out[name]
            if a.shape != b.shape:
                raise EdgeformerError(f"{name}: output shapes differ, {a.shape} vs {b.shape}")
            err = b - a
            s["ref2"] += float((a * a).sum())
            s["q2"] += float((b * b).sum())
            s["dot"] += float((a * b).sum())
            s["err2"] += float((err * err).sum())
            s["max_abs"] = max(s["max_abs"], float(np.abs(err).max(initial=0.0)))
            s["rows"] += a.shape[0]
            row_dot, row_norm = (a * b).sum(1), np.sqrt((a * a).sum(1) * (b * b).sum(1))
            row_cos = np.where(row_norm > 0, row_dot / np.maximum(row_norm, 1e-300), 1.0)
            s["min_cos"] = min(s["min_cos"], float(row_cos.min(initial=1.0)))
    rows = []
    for node in nodes:
        s = acc[node.name]
        norm = math.sqrt(s["ref2"] * s["q2"])
        rows.append({
            "name": node.name,
            "format": node.attrs.get("format", "fp32"),
            "tokens": s["rows"],
            "cosine": min(1.0, s["dot"] / norm) if norm > 0 else 1.0,
            "min_token_cos": min(1.0, s["min_cos"]),
            "snr_db": _snr_db(s["ref2"], s["err2"]),
            "max_abs_err": s["max_abs"],
            "activations": ("static" if static_range(quant, node) is not None else "dynamic")
            if node.attrs.get("format") == "int8" else None,
            "clipped": clip[node.name][0] / max(1, clip[node.name][1]) if node.name in clip else None,
        })
    return rows


def _snr_db(signal, noise) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def format_report(rows) -> str:
    """An aligned text table, one line per linear, and the worst layer by SNR."""
    width = max([len("linear")] + [len(r["name"]) for r in rows])
    clips = any(r.get("clipped") is not None for r in rows)
    lines = [f"{'linear':<{width}}  {'format':<12} {'cosine':>9} {'min tok cos':>11} {'SNR dB':>8} {'max abs err':>11}"
             + (f" {'clipped %':>9}" if clips else "")]
    for r in rows:
        fmt = r["format"] + ("/static" if r.get("activations") == "static" else "")
        clipped = "" if not clips else (f" {100 * r['clipped']:>9.4f}" if r.get("clipped") is not None
                                        else f" {'-':>9}")
        lines.append(f"{r['name']:<{width}}  {fmt:<12} {r['cosine']:>9.6f} {r['min_token_cos']:>11.6f} "
                     f"{r['snr_db']:>8.2f} {r['max_abs_err']:>11.4g}{clipped}")
    if rows:
        worst = min(rows, key=lambda r: r["snr_db"])
        lines.append(f"worst: {worst['name']} ({worst['snr_db']:.2f} dB, {len(rows)} linears, "
                     f"{rows[0]['tokens']} tokens)")
    return "\n".join(lines)


def save_report(rows, path) -> Path:
    """JSON {"layers": rows}; an infinite SNR (identical outputs) is written as null."""
    def finite(v):
        return None if isinstance(v, float) and math.isinf(v) else v

    path = Path(path)
    path.write_text(json.dumps({"layers": [{k: finite(v) for k, v in r.items()} for r in rows]}, indent=1,
                               allow_nan=False) + "\n", encoding="utf-8")
    return path
