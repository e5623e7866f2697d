"""Convert-time int8 quantisation of linear layers (the "int8" / "int8_weights" weight formats).

``LinearPolicy(mode, keep_fp32=..., activation_quant=...)`` is handed to a loader (converters/bert.py)
in place of ``packed_linear``: ``policy.linear(tensors, name, w, b)`` stores the layer either as fp32
(default, or when ``name`` matches one of the ``keep_fp32`` fnmatch patterns) or as int8.

Modes:
    "dynamic-int8"  format "int8": int8 per-output-channel weights, activations quantised per token at run
                    time, int8 GEMM (kernels/gemm_s8.py).
    "weights-int8"  format "int8_weights": the same int8 tensors (same file size), dequantised to fp32 once at
                    load and run by the fp32 kernel (accuracy of weight-only quantisation, fp32 speed/RAM).

In both modes the word-embedding table is stored int8 with a per-row scale (``embedding_int8``, default on;
ops/embedding.py dequantises the gathered rows), which takes MiniLM's file from 59 MB to about 24 MB.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np

from edgeformer.errors import EdgeformerError
from edgeformer.kernels import gemm_s8

MODES = {"dynamic-int8": "int8", "weights-int8": "int8_weights"}
ACTIVATION_QUANT = ("asymmetric", "symmetric")


def smoothing_vector(act_amax, w, alpha=0.5):
    """SmoothQuant: per input channel k, s[k] = max|x_k|^alpha / max|w_:,k|^(1-alpha) (clamped to [1e-2, 1e2]
    around 1 after normalising to geometric mean 1); activations are then quantised as x / s and the weight
    as w * s. Returns smooth = 1 / s (the multiplier the runtime applies to x)."""
    a = np.maximum(np.asarray(act_amax, np.float64), 1e-5)
    wmax = np.maximum(np.abs(np.asarray(w, np.float64)).max(axis=0), 1e-5)
    sv = a ** alpha / wmax ** (1 - alpha)
    sv = sv / np.exp(np.mean(np.log(sv)))
    sv = np.clip(sv, 1e-2, 1e2)
    return (1.0 / sv).astype(np.float32)


def int8_linear(tensors, name, w, b=None, *, fmt="int8", activation_quant="asymmetric", weight_method="maxabs",
                smooth=None):
    """Quantise a dense (N, K) float weight per output channel, pack it for gemm_s8; return (weights, attrs).
    smooth (K,) > 0: SmoothQuant vector, the stored weight is w[:, k] / smooth[k] (format "int8" only)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if smooth is not None:
        smooth = np.asarray(smooth, np.float32)
        if smooth.shape != (k,) or not np.all(np.isfinite(smooth)) or not np.all(smooth > 0):
            raise EdgeformerError(f"{name}: smoothing vector must be ({k},) finite and > 0")
        w = (w / smooth[None, :]).astype(np.float32)
    if k > gemm_s8.K_MAX:
        raise EdgeformerError(f"{name}: in_features {k} exceeds the int8 accumulation bound {gemm_s8.K_MAX}; "
                              f"keep this layer in fp32 (keep_fp32)")
    if not np.all(np.isfinite(w)):
        raise EdgeformerError(f"{name}: weight has non-finite values")
    wq, scale = gemm_s8.quantize_weight(w, weight_method)
    tensors[f"{name}.weight_s8"] = gemm_s8.pack_weight(wq)
    tensors[f"{name}.weight_scale"] = scale
    weights = {"weight_s8": f"{name}.weight_s8", "weight_scale": f"{name}.weight_scale"}
    if b is not None:
        tensors[f"{name}.bias"] = np.asarray(b, dtype=np.float32)
        weights["bias"] = f"{name}.bias"
    if smooth is not None:
        tensors[f"{name}.smooth"] = smooth
        weights["smooth"] = f"{name}.smooth"
    attrs = {"format": fmt, "out_features": int(n), "in_features": int(k)}
    if fmt == "int8":
        attrs["activation_quant"] = activation_quant
    return weights, attrs


class LinearPolicy:
    """Which format each linear layer is stored in."""

    def __init__(self, mode: str, keep_fp32=(), activation_quant: str = "asymmetric", weight_method: str = "maxabs",
                 embedding_int8: bool = True, act_amax: dict | None = None, smooth_alpha: float = 0.5):
        if mode not in MODES:
            raise EdgeformerError(f"unknown quantize mode {mode!r}; known: {sorted(MODES)}")
        if activation_quant not in ACTIVATION_QUANT:
            raise EdgeformerError(f"activation_quant must be one of {ACTIVATION_QUANT}, got {activation_quant!r}")
        if isinstance(keep_fp32, str):
            keep_fp32 = [keep_fp32]
        self.mode, self.keep_fp32, self.activation_quant = mode, list(keep_fp32 or ()), activation_quant
        if weight_method not in ("maxabs", "mse"):
            raise EdgeformerError(f"weight_method must be 'maxabs' or 'mse', got {weight_method!r}")
        self.weight_method = weight_method
        self.embedding_int8 = bool(embedding_int8)
        self.act_amax = dict(act_amax or {})  # linear name -> per-input-channel max |x| (calibrate_inputs)
        self.smooth_alpha = float(smooth_alpha)
        self.kept: list[str] = []
        self.quantized: list[str] = []

    def keeps(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.keep_fp32)

    def linear(self, tensors, name, w, b=None):
        from converters.bert import packed_linear

        if self.keeps(name):
            self.kept.append(name)
            return packed_linear(tensors, name, w, b)
        self.quantized.append(name)
        smooth = None
        if self.mode == "dynamic-int8" and self.smooth_alpha > 0 and name in self.act_amax:
            smooth = smoothing_vector(self.act_amax[name], w, self.smooth_alpha)
        return int8_linear(tensors, name, w, b, fmt=MODES[self.mode], activation_quant=self.activation_quant,
                           weight_method=self.weight_method, smooth=smooth)

    @staticmethod
    def embedding_table(w):
        """word table (V, d) float -> (int8 (V, d), per-row scale f32 (V,)), symmetric max-abs per row."""
        return quantize_embedding(w)


def quantize_embedding(w):
    """Per-row symmetric int8 of an embedding table: scale[v] = max|w[v]| / 127 (1 for a zero row)."""
    w = np.asarray(w, dtype=np.float32)
    if not np.all(np.isfinite(w)):
        raise EdgeformerError("embedding table has non-finite values")
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def calibrate_inputs(model_path, texts, batch_size: int = 16) -> dict:
    """Run an fp32 model file over texts; return {linear node name: per-input-channel max |x| (K,)}.
    A model without a tokenizer cannot read texts: {} (no smoothing)."""
    import edgeformer

    model = edgeformer.load(model_path, threads=1)
    if model.tokenizer_json is None:
        return {}
    stats: dict = {}

    def observe(node, inputs):
        if node.op != "linear" or not inputs[0].shape[0]:
            return
        a = np.abs(inputs[0]).max(axis=0)  # (K,)
        stats[node.name] = np.maximum(stats.get(node.name, a), a)

    encoder = model.text_encoder()
    names = {spec.name for spec in model.inputs}
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        feeds = {k: v for k, v in encoder(texts[start:start + batch_size]).items() if k in names}
        model.run(feeds, outputs=[model.outputs[0].name], observe=observe)
    return stats


def default_calibration_texts():
    """The small built-in corpus shipped with the runtime (edgeformer/data/corpus.txt)."""
    from pathlib import Path

    import edgeformer

    path = Path(edgeformer.__file__).parent / "data" / "corpus.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
