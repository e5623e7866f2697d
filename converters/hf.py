"""Hugging Face checkpoint directory -> edgeformer model file.

Reads config.json, the weights (safetensors, or torch.load with weights_only=True), and where the
directory is a sentence-transformers model its modules.json: Pooling (mean or cls) and Normalize
become graph ops, sentence_bert_config.json's max_seq_length becomes the text truncation length.
tokenizer.json is carried in the file so that ``model.embed(texts)`` works on the device.
"""
from __future__ import annotations

import json
from pathlib import Path

from converters import bert, vit  # noqa: F401  (registers the loaders)
from converters.checkpoint import load_checkpoint
from converters.registry import LOADERS
from edgeformer.errors import EdgeformerError
from edgeformer.format import write_model
from edgeformer.graph import GraphBuilder, validate
from edgeformer.ops import REGISTRY


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeformerError(f"cannot read {path}: {exc}") from None


def sentence_transformers_head(directory: Path) -> tuple[str | None, bool, int | None]:
    """(pooling mode or None, normalize?, max_seq_length) declared by a sentence-transformers directory."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None, False, None
    pooling, normalize = None, False
    for module in _read_json(modules_file):
        kind = module.get("type", "")
        if kind.endswith("models.Pooling"):
            cfg = _read_json(directory / module.get("path", "") / "config.json")
            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                                 "lasttoken") if cfg.get(f"pooling_mode_{m}")]
            if modes not in (["mean_tokens"], ["cls_token"]):
                raise EdgeformerError(f"unsupported sentence-transformers pooling {modes}; supported: mean, cls")
            pooling = "mean" if modes == ["mean_tokens"] else "cls"
        elif kind.endswith("models.Normalize"):
            normalize = True
        elif not kind.endswith("models.Transformer"):
            raise EdgeformerError(f"unsupported sentence-transformers module {kind!r}")
    max_len = None
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = _read_json(st_config).get("max_seq_length")
    return pooling, normalize, max_len


def add_sentence_head(builder, pooling: str | None, normalize: bool) -> None:
    """Pooling (mean or cls) and optional L2 normalisation after last_hidden_state -> sentence_embedding."""
    if not pooling:
        return
    value = builder.add("pool", "pooling", ["last_hidden_state"], attrs={"mode": pooling},
                        output=None if normalize else "sentence_embedding")
    if normalize:
        builder.add("normalize", "normalize", [value], attrs={"p": 2, "eps": 1e-12}, output="sentence_embedding")
    builder.output("sentence_embedding")


DEFAULT_ATTENTION_PRECISION = {"dynamic-int8": "bf16", "static-int8": "bf16"}


def set_attention_precision(nodes, precision: str) -> None:
    """Set attribute precision on every non-causal softmax attention node ("fp32" removes it)."""
    if precision not in ("fp32", "bf16"):
        raise EdgeformerError(f"attention precision must be fp32 or bf16, got {precision!r}")
    for node in nodes:
        if node.op != "attention" or node.attrs.get("kind", "softmax") != "softmax" or node.attrs.get("causal"):
            continue
        if precision == "fp32":
            node.attrs.pop("precision", None)
        else:
            node.attrs["precision"] = precision


def convert_hf_directory(src, out, *, progress: bool = False, quantize: str | None = None, keep_fp32=(),
                         activation_quant: str = "asymmetric", weight_method: str = "maxabs",
                         embedding_int8: bool = True, smooth_alpha: float | None = None, calib_texts=None, calib=None,
                         calib_method: str = "minmax", calib_percentile: float = 99.99,
                         attention_precision: str | None = None) -> Path:
    """Convert a checkpoint directory. quantize: None (fp32), "dynamic-int8", "static-int8" or "weights-int8" for the
    encoder linears (converters/quantize.py); keep_fp32: fnmatch patterns of linear names kept in fp32
    (e.g. "encoder.layer.5.*"); activation_quant: "asymmetric" (u8 + zero point) or "symmetric" per token;
    weight_method: "maxabs" or "mse" (per-channel clipping range minimising the weight rounding error);
    embedding_int8: when quantizing, store the word-embedding table int8 with per-row scales;
    smooth_alpha: SmoothQuant strength (0 = off; None = the mode's default, quantize.DEFAULT_SMOOTH_ALPHA:
    0.5 dynamic-int8, 0.75 static-int8): per-channel activation ranges are measured by
    running the fp32 conversion over calib_texts (default: the runtime's built-in corpus).
    quantize="static-int8": per-tensor activation scales calibrated on the fp32 conversion over calib (an .npz
    of feeds, a text file, a list of texts; default calib_texts, else the built-in corpus) with calib_method
    "minmax", "percentile" (calib_percentile) or "mse" (converters.quantize.calibrate_static).
    attention_precision: "fp32" or "bf16" for the softmax attention nodes (ops/attention.py: bf16 products
    where the CPU has AVX512-BF16); None = the mode's default, DEFAULT_ATTENTION_PRECISION: bf16 for
    dynamic-int8 and static-int8 (whose activations are 8-bit already), fp32 otherwise."""
    directory, out = Path(src), Path(out)
    if not (directory / "config.json").is_file():
        raise EdgeformerError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    config = _read_json(directory / "config.json")
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise EdgeformerError(f"model_type {model_type!r} is not supported; supported: {sorted(LOADERS)}")
    ckpt = load_checkpoint(directory)
    builder = GraphBuilder(config.get("_name_or_path") or directory.name)
    if quantize is None:
        tensors = LOADERS[model_type](config, ckpt, builder)
    else:
        from converters.quantize import DEFAULT_SMOOTH_ALPHA, LinearPolicy

        act_amax = act_qparams = None
        if smooth_alpha is None:
            smooth_alpha = DEFAULT_SMOOTH_ALPHA.get(quantize, 0.0)
        if quantize == "static-int8":
            import tempfile

            from converters.quantize import calibrate_static

            with tempfile.TemporaryDirectory() as tmp:
                fp32 = convert_hf_directory(directory, Path(tmp) / "fp32.edgeformer")
                act_qparams = calibrate_static(fp32, calib if calib is not None else calib_texts, method=calib_method,
                                               percentile=calib_percentile, activation_quant=activation_quant,
                                               smooth_alpha=smooth_alpha)
        if quantize == "dynamic-int8" and smooth_alpha > 0:
            import tempfile

            from converters.quantize import calibrate_inputs, default_calibration_texts

            with tempfile.TemporaryDirectory() as tmp:
                fp32 = convert_hf_directory(directory, Path(tmp) / "fp32.edgeformer")
                act_amax = calibrate_inputs(fp32, calib_texts or default_calibration_texts())
        policy = LinearPolicy(quantize, keep_fp32=keep_fp32, activation_quant=activation_quant,
                              weight_method=weight_method, embedding_int8=embedding_int8, act_amax=act_amax,
                              smooth_alpha=smooth_alpha, act_qparams=act_qparams)
        tensors = LOADERS[model_type](config, ckpt, builder, quantize=policy)

    if attention_precision is None:
        attention_precision = DEFAULT_ATTENTION_PRECISION.get(quantize, "fp32")
    set_attention_precision(builder.nodes, attention_precision)
    pooling, normalize, max_len = sentence_transformers_head(directory)
    add_sentence_head(builder, pooling, normalize)
    graph = builder.build()
    validate(graph, tensors, REGISTRY)  # fail here, not on the device

    tokenizer_file = directory / "tokenizer.json"
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    max_len = max_len or config.get("max_position_embeddings")
    metadata = {"source": "huggingface", "model_type": model_type}
    if max_len:
        metadata["max_length"] = str(int(max_len))
    if quantize is not None:
        metadata["quantize"] = quantize
    extra = getattr(LOADERS[model_type], "metadata", None)  # a loader may describe its model (labels, ...)
    if extra is not None:
        metadata.update(extra(config))
    write_model(out, tensors, graph.to_json(), tokenizer_json=tokenizer_json, metadata=metadata)
    return out
