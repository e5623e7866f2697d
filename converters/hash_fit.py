"""Hash fitting: turn the softmax attentions of a converted model file into EcoFormer binary-hash attentions.

A post-processing pass over any model file whose attention nodes are non-causal ``softmax`` kinds on a
fused [Q | K | V] input (converters/bert.py, converters/hf.py, converters/ecoformer.py msa blocks):

1. run the fp32 model over calibration feeds and record every selected attention's Q|K|V input;
2. per layer (all heads at once, every head its own hash): normalise q and k, take the model's own
   attention logits q k^T per sequence, KSH targets +1 / -1 at each query's topk largest / smallest
   logits (the ordering of the softmax map), m anchors drawn from the calibration q and k rows,
   mvec = mean RBF feature, and A learned bit by bit with the KSH objective -y_q^T S y_k / (N b)
   (converters.ecoformer.KernelSH.fit with separate keys; deflation on the labelled pairs and step 0.1,
   which fits far better than EcoFormer's all-pairs deflation and step 5e-4, see docs/BINARY_HASH.md);
3. replace the node by ``kind = binary_hash, qk_layout = separate`` (queries and keys hashed with the
   same functions), keeping the Q|K|V projection; the formula (official or normalised) is chosen per
   layer by the better output cosine on the calibration data (``formula="auto"``) or forced;
4. fidelity report: per converted layer the cosine between the binary-hash and the softmax attention
   outputs on the same inputs, and for every graph output the mean cosine of the converted model to the
   fp32 model (per token for token outputs, per sequence otherwise).

Layer selection (``layers``): "all", "all-but-last" (default; EcoFormer keeps its last stage in
softmax), or a list / comma string of attention indices and ranges ("0-3,5"), counted over the model's
attention nodes in graph order. Without fine-tuning, the hashed model approximates the softmax one only
roughly — the report says how roughly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError


def attention_nodes(graph):
    return [n for n in graph.nodes if n.op == "attention"]


def select_layers(spec, count: int) -> list[int]:
    if spec is None or spec == "all-but-last":
        return list(range(max(0, count - 1))) if count > 1 else list(range(count))
    if spec == "all":
        return list(range(count))
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s.strip()]
    chosen = set()
    for item in items:
        text = str(item).strip()
        try:
            if "-" in text:
                lo, hi = (int(t) for t in text.split("-", 1))
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(text))
        except ValueError:
            raise EdgeformerError(f"bad layer selection {spec!r}: use all, all-but-last, or indices like 0-3,5") from None
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise EdgeformerError(f"layer selection {spec!r}: indices {bad} out of range (the model has {count} attentions)")
    return sorted(chosen)


def calibration_feeds(model, calib=None, batch_size=16, max_length=128):
    """Feeds from ``calib``: an .npz (input_ids, attention_mask, token_type_ids), a text file (one text per
    line; needs the model's tokenizer), a list of texts, or None (the runtime's bundled corpus when the model
    has a tokenizer, else random token ids)."""
    names = {spec.name for spec in model.inputs}
    if isinstance(calib, (str, Path)) and str(calib).endswith(".npz"):
        with np.load(calib, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k in names}
        if "input_ids" not in arrays:
            raise EdgeformerError(f"{calib} has no input_ids")
        n = arrays["input_ids"].shape[0]
        return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    if calib is None and model.tokenizer_json is None:
        from converters.quant_report import random_feeds

        return random_feeds(model, n_batches=4, batch_size=8, seq_len=64)
    if calib is None:
        from converters.quantize import default_calibration_texts

        texts = default_calibration_texts()
    elif isinstance(calib, (str, Path)):
        texts = [t.strip() for t in Path(calib).read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        texts = list(calib)
    if not texts:
        raise EdgeformerError("no calibration texts")
    if model.tokenizer_json is None:
        raise EdgeformerError("calibration texts need a tokenizer in the model file; pass an .npz of input_ids")
    encoder = model.text_encoder()
    feeds = []
    for i in range(0, len(texts), batch_size):
        f = encoder(texts[i : i + batch_size])
        feeds.append({k: v for k, v in f.items() if k in names})
    return feeds


def _record(model, feeds, wanted: set[str]):
    """{attention node name: list of (x (L, width) float32, ) per sequence} over all feeds."""
    from edgeformer.batch import Batch

    seen = {name: [] for name in wanted}
    for feed in feeds:
        ids = np.asarray(feed["input_ids"])
        mask = feed.get("attention_mask")
        batch = Batch.from_mask(None if mask is None else np.asarray(mask), ids.shape[0], ids.shape[1])

        def observe(node, inputs, batch=batch):
            if node.name in seen:
                x = inputs[0]
                for b in range(batch.batch_size):
                    s, e = batch.cu_seqlens[b], batch.cu_seqlens[b + 1]
                    if e > s:
                        seen[node.name].append(np.array(x[s:e]))

        model.run(feed, observe=observe)
    return seen


def _padded(seqs, col, H, dh):
    """List of (L, width) -> (B, H, N, dh) float64 torch tensor of the head blocks at col, and a (B, N) mask."""
    import torch

    N = max(s.shape[0] for s in seqs)
    out = np.zeros((len(seqs), H, N, dh))
    mask = np.zeros((len(seqs), N), bool)
    for i, s in enumerate(seqs):
        L = s.shape[0]
        out[i, :, :L] = s[:, col : col + H * dh].reshape(L, H, dh).transpose(1, 0, 2)
        mask[i, :L] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def _softmax_out(seq, H, dh, scale):
    from edgeformer.reference.attention import packed_attention_ref

    return packed_attention_ref(seq, np.array([0, seq.shape[0]]), H, dh, scale, False)


def _hash_out(seq, H, dh, weights, normalized):
    from edgeformer.reference.binary_hash import packed_ref

    return packed_ref(seq, np.array([0, seq.shape[0]]), H, dh, weights["anchors"], weights["mvec"], weights["A"],
                      layout="separate", normalized=normalized)


def _cosine(a, b):
    a, b = a.ravel(), b.ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 1.0


def fit_layer(seqs, H, dh, scale, *, nbits=16, m=25, topk=10, iterations=100, learning_rate=0.1, seed=0):
    """KSH fit of one attention layer from its calibration Q|K|V rows. Returns float32 anchors (H, m, dh),
    mvec (H, m), A (H, b, m) and the final binarised KSH loss per head."""
    import torch

    from converters.ecoformer import KernelSH, random_anchors, topk_targets

    D = H * dh
    q, mask = _padded(seqs, 0, H, dh)
    k, _ = _padded(seqs, D, H, dh)
    uq = torch.nn.functional.normalize(q, dim=-1, eps=1e-12)
    uk = torch.nn.functional.normalize(k, dim=-1, eps=1e-12)
    logits = (q @ k.transpose(-2, -1)) * scale
    targets = topk_targets(logits, topk, mask)
    gen = torch.Generator().manual_seed(seed)
    anchor = random_anchors(torch.cat([uq, uk], 2), m, torch.cat([mask, mask], 1), gen)
    torch.manual_seed(seed)
    ksh = KernelSH(H, dh, nbits, m, learning_rate=learning_rate, iteration_n=iterations, deflate="labelled").double()
    loss = ksh.fit(uq, targets, anchor, uk=uk, mask=mask)
    return {"anchors": ksh.anchor[0].numpy().astype(np.float32), "mvec": ksh.mvec[0, :, 0].numpy().astype(np.float32),
            "A": ksh.A.numpy().astype(np.float32)}, loss.numpy()


def hash_fit_file(src, out, *, nbits=16, anchors=25, calib=None, layers="all-but-last", formula="auto", topk=10,
                  iterations=100, learning_rate=0.1, seed=0, max_sequences=64, report_path=None) -> dict:
    """Rewrite model file ``src`` into ``out`` with the selected softmax attentions hash-fitted; return the
    fidelity report (also saved as JSON to report_path when given)."""
    import torch

    import edgeformer
    from edgeformer.format import read_model, write_model
    from edgeformer.graph import Graph, validate
    from edgeformer.ops import REGISTRY

    if formula not in ("auto", "official", "normalized"):
        raise EdgeformerError("formula must be auto, official or normalized")
    if nbits < 1 or anchors < 1:
        raise EdgeformerError("--hash-bits and --anchors must be >= 1")
    torch.set_num_threads(1)
    model = edgeformer.load(src, threads=1)
    try:
        nodes = attention_nodes(model.graph)
        chosen = select_layers(layers, len(nodes))
        targets = []
        for i in chosen:
            n = nodes[i]
            if n.attrs.get("kind", "softmax") != "softmax" or n.attrs.get("causal"):
                raise EdgeformerError(f"attention #{i} ({n.name}) is not a non-causal softmax attention")
            targets.append((i, n))
        feeds = calibration_feeds(model, calib)
        recorded = _record(model, feeds, {n.name for _, n in targets})
    finally:
        model.close()

    mf = read_model(src)
    tensors = {k: np.array(v) for k, v in mf.tensors.items()}
    graph_json, metadata, tokenizer = mf.graph, dict(mf.metadata), mf.tokenizer_json
    mf.close()
    report = {"nbits": nbits, "anchors": anchors, "topk": topk, "layers": [], "outputs": {}}
    by_name = {n["name"]: n for n in graph_json["nodes"]}
    rng = np.random.default_rng(seed)
    for index, node in targets:
        H, dh = int(node.attrs["num_heads"]), int(node.attrs["head_dim"])
        scale = float(node.attrs.get("scale", 1.0 / np.sqrt(dh)))
        seqs = recorded[node.name]
        if not seqs:
            raise EdgeformerError(f"no calibration tokens reached {node.name}")
        if len(seqs) > max_sequences:
            seqs = [seqs[i] for i in sorted(rng.choice(len(seqs), max_sequences, replace=False))]
        if sum(s.shape[0] for s in seqs) < anchors:
            raise EdgeformerError(f"{node.name}: {anchors} anchors need at least as many calibration tokens")
        weights, loss = fit_layer(seqs, H, dh, scale, nbits=nbits, m=anchors, topk=topk, iterations=iterations,
                                  learning_rate=learning_rate, seed=seed + index)
        cos = {}
        for name, norm in (("official", False), ("normalized", True)):
            if formula in ("auto", name):
                got = np.concatenate([_hash_out(s, H, dh, weights, norm) for s in seqs])
                want = np.concatenate([_softmax_out(s, H, dh, scale) for s in seqs])
                cos[name] = _cosine(got, want)
        pick = max(cos, key=cos.get)
        entry = by_name[node.name]
        for role, array in weights.items():
            tensors[f"{node.name}.hash.{role}"] = array
        entry["weights"] = {role: f"{node.name}.hash.{role}" for role in weights}
        entry["attrs"] = {"kind": "binary_hash", "num_heads": H, "head_dim": dh, "qk_layout": "separate",
                          "normalized": pick == "normalized"}
        report["layers"].append({"index": index, "node": node.name, "formula": pick, "ksh_loss": loss.tolist(),
                                 "attention_cosine": cos})
    graph = Graph.from_json(graph_json)
    validate(graph, tensors, REGISTRY)
    metadata["hash_fit"] = json.dumps({"nbits": nbits, "anchors": anchors, "layers": [i for i, _ in targets]})
    write_model(out, tensors, graph.to_json(), tokenizer_json=tokenizer, metadata=metadata)
    report["outputs"] = output_fidelity(src, out, feeds)
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=1))
    return report


def output_fidelity(reference_path, converted_path, feeds) -> dict:
    """Mean cosine similarity of each graph output of the converted model to the reference model's."""
    import edgeformer

    ref, conv = edgeformer.load(reference_path, threads=1), edgeformer.load(converted_path, threads=1)
    try:
        sums: dict[str, list] = {}
        for feed in feeds:
            a, b = ref.run(feed), conv.run(feed)
            mask = np.asarray(feed.get("attention_mask", np.ones_like(feed["input_ids"]))).astype(bool)
            for name in a:
                x, y = a[name].astype(np.float64), b[name].astype(np.float64)
                rows_x = x[mask] if x.ndim == 3 else x
                rows_y = y[mask] if y.ndim == 3 else y
                num = (rows_x * rows_y).sum(-1)
                den = np.linalg.norm(rows_x, axis=-1) * np.linalg.norm(rows_y, axis=-1)
                cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
                sums.setdefault(name, []).extend(cos.tolist())
        return {name: {"mean_cosine": float(np.mean(v)), "min_cosine": float(np.min(v)), "rows": len(v)}
                for name, v in sums.items()}
    finally:
        ref.close()
        conv.close()


def format_report(report) -> str:
    lines = [f"hash fitting: {report['nbits']} bits, {report['anchors']} anchors, topk {report['topk']}",
             f"{'layer':<40} {'formula':<11} {'attention cosine (official / normalized)':>42}"]
    for layer in report["layers"]:
        cos = layer["attention_cosine"]
        text = " / ".join(f"{cos[k]:.4f}" if k in cos else "-" for k in ("official", "normalized"))
        lines.append(f"{layer['node']:<40} {layer['formula']:<11} {text:>42}")
    for name, o in report["outputs"].items():
        lines.append(f"output {name}: mean cosine to the softmax model {o['mean_cosine']:.4f} (min {o['min_cosine']:.4f}, "
                     f"{o['rows']} rows)")
    return "\n".join(lines)


# ---- `edgeformer convert --attention binary-hash` -----------------------------------------------------------
def add_hash_arguments(p) -> None:
    g = p.add_argument_group("binary-hash attention (--attention binary-hash: softmax -> EcoFormer hashing)")
    g.add_argument("--attention", choices=["softmax", "binary-hash"], default="softmax",
                   help="binary-hash: fit EcoFormer hash functions per layer and head on calibration activations "
                        "and replace the selected softmax attentions; prints a fidelity report (saved as "
                        "OUTPUT.hashfit.json)")
    g.add_argument("--hash-bits", type=int, default=16, metavar="B", help="bits per code (default 16)")
    g.add_argument("--anchors", type=int, default=25, metavar="M", help="RBF anchors per head (default 25)")
    g.add_argument("--calib", metavar="FILE",
                   help="calibration data: .npz (input_ids, attention_mask) or a text file, one text per line "
                        "(default: the bundled corpus, random ids for models without a tokenizer)")
    g.add_argument("--hash-layers", default="all-but-last", metavar="SPEC",
                   help="attention layers to convert: all, all-but-last (default, as EcoFormer keeps its last "
                        "stage in softmax) or indices like 0-3,5")


def hash_convert(fallback):
    """Wrap the `convert` entry: ecoformer checkpoint directories get their loader registered; with
    --attention binary-hash the ordinary conversion goes to a temp file, then hash_fit_file writes OUTPUT."""

    def run(args) -> int:
        src = Path(args.src)
        config = src / "config.json"
        if config.is_file() and '"ecoformer"' in config.read_text(encoding="utf-8", errors="replace"):
            from converters import ecoformer  # noqa: F401  (registers model_type "ecoformer"; imports torch)
        if getattr(args, "attention", "softmax") != "binary-hash":
            if args.calib or args.hash_layers != "all-but-last":
                raise EdgeformerError("--calib and --hash-layers need --attention binary-hash")
            return fallback(args)
        import tempfile

        out = Path(args.output)
        with tempfile.TemporaryDirectory() as tmp:
            args.output = str(Path(tmp) / "softmax.edgeformer")
            code = fallback(args)
            if code:
                return code
            report = hash_fit_file(args.output, out, nbits=args.hash_bits, anchors=args.anchors, calib=args.calib,
                                   layers=args.hash_layers, report_path=f"{out}.hashfit.json")
            args.output = str(out)
        print(format_report(report))
        print(f"wrote {out} and {out}.hashfit.json")
        return 0

    return run
