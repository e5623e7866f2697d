"""Convert pretrained dense linears into table projections ("lut" format, encoder "pq") at convert time.

Product-quantisation approximate matrix multiplication (Jégou et al.'s PQ; Blalock & Guttag's MADDNESS/Bolt):
the input x (d_in) is cut into C = d_in / S contiguous subspaces of S dims; in each subspace k a codebook of R
centroids is fitted by k-means on calibration activations of THAT layer's input; a token is encoded by its
nearest centroid per subspace, and

    y = x W^T + b  ~  sum_k T_k[code_k] + b,   T_k[c] = W[:, kS:(k+1)S] @ centroid_kc      (R x d_out each)

Optionally the tables are refitted by ridge regression on the calibration set, as MADDNESS does: with G the
one-hot code matrix (M, C*R) and Y = X W^T, T = argmin ||G T - Y||^2 + lam ||T - T0||^2 (T0 = the centroid
tables above), solved per output column at once through the (C*R)^2 normal equations. The refit is kept only
if it lowers the squared error on a held-out 20 % of the calibration rows.

Costs per token: encode C*R*S = R*d_in multiply-adds (vs d_in*d_out for the dense layer), gather C rows of
d_out. Bytes: C*R*d_out table entries = (R/S) x the dense weight (R=16, S=4: 4x in fp32, 1x with int8 tables).

``LutPolicy(patterns, acts, ...)`` plays the role of converters.quantize.LinearPolicy for the loaders
(bert.py, gpt2.py): ``policy.linear(tensors, name, w, b)`` stores linears whose name matches one of the fnmatch
``patterns`` as "lut" (when calibration inputs for that name exist), others as packed fp32, and records a
per-layer fit report. ``convert_hf_directory_lut`` runs the whole thing on a checkpoint directory:
fp32 conversion -> calibration inputs of every linear (observe) -> conversion with the policy -> per-layer
fidelity report (cosine / SNR of every linear's output against the fp32 model, converters/quant_report.py).
"""
from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError


def kmeans(x, k, iters=25, seed=0):
    """Lloyd's k-means with k-means++ initialisation (float64); returns centroids (k, S). x (M, S)."""
    x = np.asarray(x, np.float64)
    m = x.shape[0]
    rng = np.random.default_rng(seed)
    if m <= k:  # fewer points than centroids: every point is a centroid, the rest duplicate the first
        return np.concatenate([x, np.repeat(x[:1], k - m, axis=0)]) if m else np.zeros((k, x.shape[1]))
    cent = [x[rng.integers(m)]]
    d2 = ((x - cent[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.integers(m) if total <= 0 else rng.choice(m, p=d2 / total)
        cent.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(cent)
    for _ in range(iters):
        dist = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]  # (M, k)
        assign = dist.argmin(1)
        new = np.zeros_like(c)
        counts = np.bincount(assign, minlength=k)
        np.add.at(new, assign, x)
        empty = counts == 0
        new[~empty] /= counts[~empty, None]
        if empty.any():  # re-seed empty clusters at the points farthest from their centroid
            far = np.argsort(dist[np.arange(m), assign])[::-1][:int(empty.sum())]
            new[empty] = x[far]
        if np.allclose(new, c):
            c = new
            break
        c = new
    return c


def _encode(x, centroids):
    """Nearest-centroid codes (M, C) in float64 (converter side; the runtime kernel uses float32)."""
    c, r, s = centroids.shape
    codes = np.empty((x.shape[0], c), np.int64)
    for k in range(c):
        z = x[:, k * s:(k + 1) * s]
        dist = (z * z).sum(1)[:, None] - 2 * z @ centroids[k].T + (centroids[k] ** 2).sum(1)[None, :]
        codes[:, k] = dist.argmin(1)
    return codes


def _gather(codes, tables, rows):
    idx = codes + np.arange(codes.shape[1]) * rows  # (M, C)
    return tables[idx].sum(1)  # (M, N)


def fit_pq_tables(w, acts, *, sub_dim=4, rows=16, iters=25, refit=True, ridge=1.0, seed=0) -> dict:
    """Fit a PQ table projection of the dense weight w (N, K) on calibration inputs acts (M, K).

    Returns {"centroids" (C, R, S) f32, "tables" (C*R, N) f32, "refit": bool, "train_snr_db", "heldout_snr_db"}.
    """
    w = np.asarray(w, np.float64)
    x = np.asarray(acts, np.float64)
    n, k = w.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise EdgeformerError(f"calibration inputs have shape {x.shape}, expected (M, {k})")
    if sub_dim < 1 or k % sub_dim:
        raise EdgeformerError(f"in_features {k} is not a multiple of the subspace size {sub_dim}")
    if not 1 <= rows <= 1 << 16:
        raise EdgeformerError(f"rows per table must be in [1, 65536], got {rows}")
    if x.shape[0] < 2 * rows:
        raise EdgeformerError(f"{x.shape[0]} calibration rows are too few for {rows} centroids per subspace")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(x))):
        raise EdgeformerError("weights or calibration inputs hold non-finite values")
    c = k // sub_dim
    rng = np.random.default_rng(seed)
    order = rng.permutation(x.shape[0])
    cut = max(rows, int(0.8 * x.shape[0]))
    fit_x, hold_x = x[order[:cut]], x[order[cut:]]
    centroids = np.stack([kmeans(fit_x[:, i * sub_dim:(i + 1) * sub_dim], rows, iters, seed + i) for i in range(c)])
    tables = np.concatenate([centroids[i] @ w[:, i * sub_dim:(i + 1) * sub_dim].T for i in range(c)])  # (C*R, N)

    def snr(xs, t):
        if xs.shape[0] == 0:
            return float("nan")
        y = xs @ w.T
        err = _gather(_encode(xs, centroids), t, rows) - y
        return float(10 * np.log10((y * y).sum() / max((err * err).sum(), 1e-300)))

    used_refit = False
    if refit:
        from scipy import sparse

        codes = _encode(fit_x, centroids) + np.arange(c) * rows  # (M, C) row indices
        m = fit_x.shape[0]
        g = sparse.csr_matrix((np.ones(codes.size), codes.ravel(), np.arange(0, codes.size + 1, c)),
                              shape=(m, c * rows))  # one-hot codes (M, C*R)
        gtg = (g.T @ g).toarray()  # (C*R, C*R) co-occurrence counts
        gty = g.T @ (fit_x @ w.T)  # (C*R, N)
        lam = ridge * m / rows
        refitted = np.linalg.solve(gtg + lam * np.eye(c * rows), gty + lam * tables)
        if hold_x.shape[0] == 0 or snr(hold_x, refitted) > snr(hold_x, tables):
            tables, used_refit = refitted, True
    return {"centroids": centroids.astype(np.float32), "tables": tables.astype(np.float32), "refit": used_refit,
            "train_snr_db": snr(fit_x, tables), "heldout_snr_db": snr(hold_x, tables)}


def pq_linear(tensors, name, fit, b=None, table_dtype="fp32"):
    """Store a fitted PQ projection as a "lut" node's (weights, attrs)."""
    from edgeformer.functional.memory_layer import compact_tables

    stored, scale = compact_tables(fit["tables"], table_dtype)
    tensors[f"{name}.tables"] = stored
    tensors[f"{name}.centroids"] = np.ascontiguousarray(fit["centroids"], np.float32)
    weights = {"tables": f"{name}.tables", "centroids": f"{name}.centroids"}
    if scale is not None:
        tensors[f"{name}.table_scale"] = scale
        weights["table_scale"] = f"{name}.table_scale"
    if b is not None:
        tensors[f"{name}.bias"] = np.asarray(b, np.float32)
        weights["bias"] = f"{name}.bias"
    attrs = {"format": "lut", "encoder": "pq", "table_dtype": table_dtype,
             "num_tables": int(fit["centroids"].shape[0])}
    return weights, attrs


class LutPolicy:
    """Which linears become PQ tables (fnmatch ``patterns`` on the node name), fitted on ``acts[name]``."""

    def __init__(self, patterns=("*",), acts=None, *, sub_dim=4, rows=16, table_dtype="fp32", refit=True,
                 iters=25, seed=0):
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.acts = dict(acts or {})
        self.sub_dim, self.rows, self.table_dtype = int(sub_dim), int(rows), table_dtype
        self.refit, self.iters, self.seed = refit, iters, seed
        self.fits: dict[str, dict] = {}
        self.kept: list[str] = []
        self.embedding_int8 = False

    def matches(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.patterns)

    def linear(self, tensors, name, w, b=None):
        from converters.bert import packed_linear

        w = np.asarray(w, np.float32)
        if not self.matches(name) or name not in self.acts or w.shape[1] % self.sub_dim:
            self.kept.append(name)
            return packed_linear(tensors, name, w, b)
        fit = fit_pq_tables(w, self.acts[name], sub_dim=self.sub_dim, rows=self.rows, iters=self.iters,
                            refit=self.refit, seed=self.seed)
        self.fits[name] = {k: v for k, v in fit.items() if k not in ("centroids", "tables")}
        self.fits[name]["table_bytes"] = int(fit["tables"].shape[0] * fit["tables"].shape[1]
                                             * {"fp32": 4, "fp16": 2, "int8": 1}[self.table_dtype])
        self.fits[name]["dense_bytes"] = int(w.nbytes)
        return pq_linear(tensors, name, fit, b, self.table_dtype)


def collect_linear_inputs(model_path, feeds_list, max_rows=8192, seed=0) -> dict[str, np.ndarray]:
    """Run a model file over feeds; return {linear node name: up to max_rows of its input rows (M, K) f32}."""
    import edgeformer

    model = edgeformer.load(model_path, threads=1)
    seen: dict[str, list] = {}
    try:
        def observe(node, inputs):
            if node.op == "linear" and inputs[0].shape[0]:
                seen.setdefault(node.name, []).append(np.array(inputs[0], np.float32))

        for feeds in feeds_list:
            model.run(feeds, outputs=[model.outputs[0].name], observe=observe)
    finally:
        model.close()
    rng = np.random.default_rng(seed)
    out = {}
    for name, parts in seen.items():
        rows = np.concatenate(parts)
        if rows.shape[0] > max_rows:
            rows = rows[np.sort(rng.choice(rows.shape[0], max_rows, replace=False))]
        out[name] = rows
    return out


def calibration_feeds(model_path, texts=None, batch_size=8):
    """Feeds over texts (model with a tokenizer; default: the runtime's bundled corpus), else random ids."""
    import edgeformer
    from converters.quant_report import random_feeds
    from converters.quantize import default_calibration_texts

    model = edgeformer.load(model_path, threads=1)
    try:
        if model.tokenizer_json is None:
            if texts:
                raise EdgeformerError("calibration texts given, but the model file has no tokenizer")
            return random_feeds(model, n_batches=16)
        texts = list(texts or default_calibration_texts())
        encoder, names = model.text_encoder(), {s.name for s in model.inputs}
        return [{k: v for k, v in encoder(texts[i:i + batch_size]).items() if k in names}
                for i in range(0, len(texts), batch_size)]
    finally:
        model.close()


def convert_hf_directory_lut(src, out, *, patterns=("*",), sub_dim=4, rows=16, table_dtype="fp32", refit=True,
                             texts=None, report_path=None, max_rows=8192) -> dict:
    """Checkpoint directory -> model file whose linears matching ``patterns`` are PQ tables; returns the report
    {"layers": per-linear fidelity rows (name, format, cosine, min_token_cos, snr_db, max_abs_err, and for
    table layers: refit, heldout_snr_db of the layer alone, table_bytes, dense_bytes)}. Feeds: texts, else the
    bundled corpus, else random ids (no tokenizer); the last quarter of the batches is held out of the fit and
    used for the fidelity report."""
    import tempfile

    from converters.checkpoint import load_checkpoint
    from converters.hf import _read_json, add_sentence_head, convert_hf_directory, sentence_transformers_head
    from converters.quant_report import layer_report
    from converters.registry import LOADERS
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder, validate
    from edgeformer.ops import REGISTRY

    directory, out = Path(src), Path(out)
    if table_dtype not in ("fp32", "fp16", "int8"):
        raise EdgeformerError(f"table dtype must be fp32, fp16 or int8, got {table_dtype!r}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = convert_hf_directory(directory, Path(tmp) / "fp32.edgeformer")
        feeds = calibration_feeds(fp32, texts)
        if len(feeds) < 2:
            raise EdgeformerError("need at least two batches of calibration data (one is held out for the report)")
        held = max(1, len(feeds) // 4)  # the fidelity report runs on batches the tables were not fitted on
        calib_feeds, report_feeds = feeds[:-held], feeds[-held:]
        acts = collect_linear_inputs(fp32, calib_feeds, max_rows=max_rows)
        config = _read_json(directory / "config.json")
        policy = LutPolicy(patterns, acts, sub_dim=sub_dim, rows=rows, table_dtype=table_dtype, refit=refit)
        builder = GraphBuilder(config.get("_name_or_path") or directory.name)
        tensors = LOADERS[config["model_type"]](config, load_checkpoint(directory), builder, quantize=policy)
        if not policy.fits:
            raise EdgeformerError(f"no linear matched {list(patterns)} (linears: {policy.kept})")
        pooling, normalize, max_len = sentence_transformers_head(directory)
        add_sentence_head(builder, pooling, normalize)
        graph = builder.build()
        validate(graph, tensors, REGISTRY)
        tokenizer_file = directory / "tokenizer.json"
        tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
        max_len = max_len or config.get("max_position_embeddings")
        metadata = {"source": "huggingface", "model_type": config["model_type"], "lut": f"pq S={sub_dim} R={rows} "
                    f"{table_dtype}"}
        if max_len:
            metadata["max_length"] = str(int(max_len))
        write_model(out, tensors, graph.to_json(), tokenizer_json=tokenizer_json, metadata=metadata)
        rows_report = layer_report(fp32, out, feeds_list=report_feeds)
    for row in rows_report:
        row.update(policy.fits.get(row["name"], {}))
    report = {"layers": rows_report, "sub_dim": sub_dim, "rows": rows, "table_dtype": table_dtype,
              "calibration_batches": len(calib_feeds), "report_batches": len(report_feeds)}
    if report_path is not None:
        def clean(v):
            return None if isinstance(v, float) and not np.isfinite(v) else v

        data = dict(report, layers=[{k: clean(v) for k, v in r.items()} for r in rows_report])
        Path(report_path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return report


# ---- `edgeformer convert --lut` -------------------------------------------------------------------------

def add_lut_arguments(p) -> None:
    """The --lut options of `edgeformer convert` (converters/cli.py)."""
    g = p.add_argument_group("table projections (--lut: dense linears -> product-quantisation tables)")
    g.add_argument("--lut", action="store_true",
                   help="replace dense linears by PQ table projections fitted on calibration activations (bundled "
                        "corpus or --report-texts; random ids without a tokenizer); prints a per-layer fidelity "
                        "report (cosine, SNR against the fp32 model, on held-out batches)")
    g.add_argument("--lut-layers", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of linear names to convert (repeatable; default: all)")
    g.add_argument("--lut-subdim", type=int, default=4, metavar="S", help="input dims per subspace (default 4)")
    g.add_argument("--lut-codebooks", type=int, default=16, metavar="R",
                   help="centroids (table rows) per subspace (default 16)")
    g.add_argument("--lut-tables", choices=["fp32", "fp16", "int8"], default="fp32", help="stored table format")
    g.add_argument("--lut-no-refit", action="store_true", help="keep the centroid tables (no ridge refit)")


def lut_convert(fallback):
    """`convert` entry: with --lut run convert_hf_directory_lut (report printed and saved as JSON to --report PATH,
    default OUTPUT.report.json), otherwise the ordinary convert ``fallback(args)``."""

    def run(args) -> int:
        if not getattr(args, "lut", False):
            return fallback(args)
        import time

        from converters.quant_report import format_report

        src, out = Path(args.src), Path(args.output)
        if not src.is_dir():
            raise EdgeformerError("--lut needs a Hugging Face checkpoint directory")
        if args.quantize:
            raise EdgeformerError("--lut and --quantize cannot be combined (use --lut-tables int8 for int8 tables)")
        texts = None
        if args.report_texts:
            texts = [t.strip() for t in Path(args.report_texts).read_text(encoding="utf-8").splitlines() if t.strip()]
        start = time.perf_counter()
        report_path = Path(args.report) if args.report else Path(f"{out}.report.json")
        report = convert_hf_directory_lut(src, out, patterns=tuple(args.lut_layers or ["*"]), sub_dim=args.lut_subdim,
                                          rows=args.lut_codebooks, table_dtype=args.lut_tables,
                                          refit=not args.lut_no_refit, texts=texts, report_path=report_path)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
        print(format_report(report["layers"]))
        for row in report["layers"]:
            if "heldout_snr_db" in row:
                print(f"  {row['name']}: layer alone {row['heldout_snr_db']:.2f} dB on held-out calibration rows, "
                      f"refit {'yes' if row['refit'] else 'no'}, tables {row['table_bytes'] / 1e6:.2f} MB "
                      f"({row['table_bytes'] / row['dense_bytes']:.2f}x the fp32 weight)")
        print(f"wrote {report_path}")
        return 0

    return run
