"""load -> validate -> bind -> fuse -> run.

``load`` reads the model file (zero-copy mmap), validates the graph once, binds every node to its
weights and fuses what can be fused (edgeformer/fusion.py: an int8 linear feeding only another int8 linear
hands it quantised rows; a post-LN encoder layer of int8 linears runs as one Numba call), so ``Model.run``
only checks the feeds, packs the valid tokens, calls the bound steps in order and unpacks the outputs.
A Model is immutable after load and safe to share between Python threads.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from edgeformer import blas, llvm_pages
from edgeformer.batch import Batch
from edgeformer.errors import InputError, ModelFileError
from edgeformer.format import read_model
from edgeformer.fusion import fuse_encoder_layers, fuse_requantize
from edgeformer.graph import DENSE, IDS, TOKENS, Graph, input_kind, last_uses, validate
from edgeformer.ops import REGISTRY
from edgeformer.workers import Workers, default_threads


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # symbolic dims as strings
    optional: bool = False


class Model:
    """A loaded model. ``run(feeds)`` maps input names to padded (B, S) integer arrays."""

    def __init__(self, model_file, graph: Graph, threads: int, fuse: bool = True):
        self._file = model_file
        self._graph = graph
        self._types = validate(graph, model_file.tensors, REGISTRY)
        self._steps = []
        for node in graph.nodes:
            for role in getattr(REGISTRY[node.op], "gathered_weights", ()):
                if role in node.weights:
                    model_file.advise_random(node.weights[role])
            weights = {role: model_file.tensors[t] for role, t in node.weights.items()}
            self._steps.append((node, REGISTRY[node.op].bind(node, weights)))
        self._plain_steps = self._steps  # what observers see: every value as its op defines it
        if fuse:
            graph_outputs = {s["name"] for s in graph.outputs}
            self._steps = fuse_encoder_layers(self._plain_steps, fuse_requantize(self._plain_steps, graph_outputs),
                                              graph_outputs)
        self._last_use = last_uses(graph)
        self._workers = Workers(threads)
        self._kinds = {s["name"]: input_kind(s) for s in graph.inputs}
        self._specs = {s["name"]: s for s in graph.inputs}
        self.inputs = tuple(self._input_spec(s) for s in graph.inputs)
        self.outputs = tuple(self._output_spec(s["name"]) for s in graph.outputs)
        self._input_names = {s.name for s in self.inputs}
        self._types_of_ids = [name for name, t in self._types.items() if t.kind == IDS]
        self._required = [s.name for s in self.inputs if not s.optional]
        self._packed = "ids" in self._kinds.values()
        self._tokens_input = next((s["name"] for s in graph.inputs if s.get("tokens_per_item") is not None), None)
        self._text = None
        self._first_run_done = False  # until then, LLVM's pages are released after every step

    def _input_spec(self, spec):
        if self._kinds[spec["name"]] == "dense":
            return TensorSpec(spec["name"], spec["dtype"], tuple(spec["shape"]), bool(spec.get("optional")))
        return TensorSpec(spec["name"], "int64", ("batch", "seq"), bool(spec.get("optional")))

    def _output_spec(self, name):
        vtype = self._types[name]
        if vtype.kind == DENSE:
            return TensorSpec(name, vtype.dtype, tuple(vtype.shape) if vtype.shape is not None else None)
        shape = ("batch", "seq", vtype.width) if vtype.kind == TOKENS else ("batch", vtype.width)
        return TensorSpec(name, "float32", shape)

    # -- properties -------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return self._workers.threads

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def metadata(self) -> dict:
        return dict(self._file.metadata)

    @property
    def tensors(self) -> Mapping[str, np.ndarray]:
        return self._file.tensors

    @property
    def path(self) -> str:
        return str(self._file.path)

    @property
    def format_version(self) -> int:
        return self._file.version

    @property
    def tokenizer_json(self) -> str | None:
        return self._file.tokenizer_json

    @property
    def fused_layers(self) -> list[str]:
        """Names of the encoder layers that run as one fused call with one thread (edgeformer/fusion.py)."""
        return [node.name for node, _ in self._steps if node.op == "encoder_layer"]

    def value_width(self, name: str) -> int:
        """Static width (last dim) of a value of the graph."""
        return self._types[name].width

    @property
    def max_length(self) -> int | None:
        value = self._file.metadata.get("max_length")
        return int(value) if value and value.isdigit() else None

    # -- running --------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray], outputs=None, profile: dict | None = None,
            observe=None) -> dict[str, np.ndarray]:
        """Run the graph on padded (B, S) feeds.

        ``profile``, if given, accumulates seconds per op label (e.g. "linear[fp32]"; a fused encoder layer
        counts as "encoder_layer": load with fuse=False to see its nodes one by one).
        ``observe(node, inputs)``, if given, is called before each node with its (packed) input arrays:
        calibration reads activation statistics through it. It must not modify the arrays. The run then uses
        the unfused steps (edgeformer/fusion.py), so every input is the float32 value the graph defines.
        """
        arrays = self._check_feeds(feeds)
        wanted = self._check_outputs(outputs)
        batch = self._batch(arrays)
        env = {name: batch.pack(a) if self._kinds[name] == "ids" else a
               for name, a in arrays.items() if name in self._types}
        for name in self._types_of_ids:
            if name not in env:  # an optional id input that was not fed (token_type_ids): all zeros
                env[name] = np.zeros(batch.num_tokens, dtype=np.int64)
        for index, (node, step) in enumerate(self._steps if observe is None else self._plain_steps):
            if observe is not None:
                observe(node, [env[v] for v in node.inputs])
            if step is not None:  # None: run by the fused step before it (edgeformer/fusion.py)
                if profile is None:
                    results = step([env[v] for v in node.inputs], batch, self._workers)
                else:
                    start = time.perf_counter()
                    results = step([env[v] for v in node.inputs], batch, self._workers)
                    label = _label(node)
                    profile[label] = profile.get(label, 0.0) + time.perf_counter() - start
                for value, result in zip(node.outputs, results):
                    env[value] = result
            for value in node.inputs:
                if self._last_use.get(value) == index:
                    env.pop(value, None)
            if not self._first_run_done:  # kernels load step by step: do not let LLVM and weights add up
                llvm_pages.release_if_new_kernels()
        self._first_run_done = True
        llvm_pages.release_if_new_kernels()
        return {name: batch.unpack(env[name]) if self._types[name].kind == TOKENS else env[name]
                for name in wanted}

    def _batch(self, arrays) -> Batch:
        """The packing of the coarse ops: from the ids and mask, else from the input that declares
        tokens_per_item (B items of P tokens, none padded), else a trivial (B, 1)."""
        if self._packed:
            ids = arrays["input_ids"]
            return Batch.from_mask(arrays.get("attention_mask"), ids.shape[0], ids.shape[1])
        if self._tokens_input is not None:
            items = arrays[self._tokens_input].shape[0]
            return Batch.from_mask(None, items, self._specs[self._tokens_input]["tokens_per_item"])
        first = next(iter(arrays.values()), None)  # None: only optional inputs, none fed
        return Batch.from_mask(None, first.shape[0] if first is not None and first.ndim else 1, 1)

    def _check_outputs(self, outputs):
        names = [s.name for s in self.outputs]
        if outputs is None:
            return names
        if isinstance(outputs, str):
            outputs = [outputs]
        unknown = [o for o in outputs if o not in names]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model has {names}")
        return list(outputs)

    def _check_feeds(self, feeds) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError("feeds must be a mapping from input name to array")
        unknown = sorted(set(feeds) - self._input_names)
        if unknown:
            raise InputError(f"unknown inputs {unknown}; the model takes {sorted(self._input_names)}")
        missing = [name for name in self._required if name not in feeds]
        if missing:
            raise InputError(f"missing inputs {missing}")
        arrays = {}
        for name, value in feeds.items():
            if self._kinds[name] == "dense":
                arrays[name] = _dense_feed(name, value, self._specs[name])
            else:
                arrays[name] = _id_feed(name, value)
        if self._packed:
            shape = arrays["input_ids"].shape
            if shape[0] == 0 or shape[1] == 0:
                raise InputError(f"empty batch: input_ids has shape {shape}")
            for name, array in arrays.items():
                if self._kinds[name] != "dense" and array.shape != shape:
                    raise InputError(f"{name} has shape {array.shape}, but input_ids has {shape}")
            mask = arrays.get("attention_mask")
            if mask is not None and (mask.view(np.uint64) > 1).any():  # int64: negatives wrap to > 1
                raise InputError("attention_mask must contain only 0 and 1")
        _check_symbolic_dims(arrays, self._specs, self._kinds)
        if self._tokens_input is not None and arrays[self._tokens_input].shape[0] == 0:
            raise InputError(f"empty batch: {self._tokens_input} has shape {arrays[self._tokens_input].shape}")
        return arrays

    # -- text -----------------------------------------------------------------------------
    def embed(self, texts, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings (B, d) for a list of strings; needs a tokenizer in the file and `tokenizers`."""
        if "sentence_embedding" not in {s.name for s in self.outputs}:
            raise InputError("this model has no 'sentence_embedding' output")
        encoder = self.text_encoder()
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InputError("texts must be a non-empty list of strings")
        rows = []
        for start in range(0, len(texts), batch_size):
            feeds = encoder(texts[start:start + batch_size])
            feeds = {k: v for k, v in feeds.items() if k in self._input_names}
            rows.append(self.run(feeds, outputs=["sentence_embedding"])["sentence_embedding"])
        return np.concatenate(rows)

    def text_encoder(self):
        if self._text is None:
            tokenizer = self._file.tokenizer_json
            if not tokenizer:
                raise InputError("this model file carries no tokenizer; feed input_ids instead")
            from edgeformer.text import TextEncoder

            self._text = TextEncoder(tokenizer, self.max_length or 512)
        return self._text

    # -- planning ------------------------------------------------------------------------
    def plan_memory(self, batch_size: int, seq_len: int) -> int:
        """Peak bytes of activations for an unpadded (batch_size, seq_len) run, freeing at last use.

        Dense values count when their shape is known ("batch" -> batch_size, other names -> seq_len);
        values of unknown shape (most generic-op results) are not counted."""
        tokens, live, peak = batch_size * seq_len, {}, 0
        for name, vtype in self._types.items():
            if vtype.kind == IDS:
                live[name] = tokens * 8
        for index, (node, _) in enumerate(self._steps):
            for value in node.outputs:
                vtype = self._types[value]
                if vtype.kind == DENSE:
                    live[value] = _dense_bytes(vtype, batch_size, seq_len)
                    continue
                rows = tokens if vtype.kind == TOKENS else batch_size
                live[value] = rows * vtype.width * 4
            peak = max(peak, sum(live.values()))
            for value in node.inputs:
                if self._last_use.get(value) == index:
                    live.pop(value, None)
        return peak

    def close(self) -> None:
        self._workers.close()


def _id_feed(name, value) -> np.ndarray:
    """A padded (B, S) integer array (ids or mask), as int64."""
    array = np.asarray(value)
    if array.dtype == bool and name == "attention_mask":
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise InputError(f"{name} must be an integer array, got dtype {array.dtype}"
                         + (" (float inputs, NaN included, are not accepted for ids and masks)"
                            if array.dtype.kind in "fc" else ""))
    if array.ndim != 2:
        raise InputError(f"{name} must have 2 dims (batch, seq), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


_DTYPE_KINDS = {"float32": "f", "int64": "iu", "int32": "iu", "bool": "b"}


def _dense_feed(name, value, spec) -> np.ndarray:
    """An input passed on as fed: dtype kind and rank/fixed dims checked, cast to the declared dtype."""
    array = np.asarray(value)
    want = spec["dtype"]
    if array.dtype.kind not in _DTYPE_KINDS[want]:
        raise InputError(f"{name} must be a {want} array, got dtype {array.dtype}")
    shape = spec["shape"]
    if array.ndim != len(shape):
        raise InputError(f"{name} must have {len(shape)} dims {shape}, got shape {array.shape}")
    for axis, (dim, size) in enumerate(zip(shape, array.shape)):
        if isinstance(dim, int) and dim != size:
            raise InputError(f"{name} must have size {dim} on axis {axis} (shape {shape}), got shape {array.shape}")
    if want == "int32" and array.size and (int(array.min()) < -2**31 or int(array.max()) >= 2**31):
        raise InputError(f"{name} has values outside the int32 range")
    return np.require(array, dtype=np.dtype(want), requirements="C")  # keeps 0-d (scalar) feeds 0-d


def _check_symbolic_dims(arrays, specs, kinds) -> None:
    """Equal dim names must have equal sizes within one run; 'batch' is shared by every input."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, array in arrays.items():
        dims = specs[name]["shape"] if kinds[name] == "dense" else ["batch", "seq"]
        for dim, size in zip(dims, array.shape):
            if not isinstance(dim, str):
                continue
            if dim in sizes and sizes[dim][0] != size:
                raise InputError(f"dim {dim!r} is {size} in {name} but {sizes[dim][0]} in {sizes[dim][1]}")
            sizes.setdefault(dim, (size, name))


def _dense_bytes(vtype, batch_size: int, seq_len: int) -> int:
    if vtype.shape is None:
        return 0
    count = 1
    for dim in vtype.shape:
        count *= dim if isinstance(dim, int) else (batch_size if dim == "batch" else seq_len)
    return count * np.dtype(vtype.dtype).itemsize


def _label(node) -> str:
    if node.op == "linear":
        return f"linear[{node.attrs.get('format', 'fp32')}]"
    if node.op == "attention":
        return f"attention[{node.attrs.get('kind', 'softmax')}]"
    if node.op == "onnx":
        return f"onnx[{node.attrs.get('op_type', '?')}]"
    return node.op


def load(path, threads: int | None = None, fuse: bool = True) -> Model:
    """Open a model file and prepare it to run with ``threads`` threads (default: the usable cores).

    ``fuse=False`` skips the load-time fusions (edgeformer/fusion.py: whole int8 encoder layers in one call,
    quantised rows handed from one int8 linear to the next): every node then runs as its own step, as
    ``run(observe=...)`` always does. For comparisons and debugging; the outputs are the same."""
    threads = default_threads() if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    model_file = read_model(path)
    try:
        graph = Graph.from_json(model_file.graph)
    except json.JSONDecodeError as exc:  # pragma: no cover - read_model already decoded it
        raise ModelFileError(f"graph is not valid JSON: {exc}") from None
    blas.import_cython_blas()
    blas.pin_blas_to_one_thread()
    model = Model(model_file, graph, threads, fuse=fuse)
    llvm_pages.release_if_new_kernels()  # the first call also drops what `import numba` touched
    return model
