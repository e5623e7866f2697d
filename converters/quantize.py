"""Convert-time int8 quantisation of linear layers (the "int8" / "int8_weights" weight formats).

``LinearPolicy(mode, keep_fp32=..., activation_quant=...)`` is handed to a loader (converters/bert.py)
in place of ``packed_linear``: ``policy.linear(tensors, name, w, b)`` stores the layer either as fp32
(default, or when ``name`` matches one of the ``keep_fp32`` fnmatch patterns) or as int8.

Modes:
    "dynamic-int8"  format "int8": int8 per-output-channel weights, activations quantised per token at run
                    time, int8 GEMM (kernels/gemm_s8.py).
    "weights-int8"  format "int8_weights": the same int8 tensors (same file size), dequantised to fp32 once at
                    load and run by the fp32 kernel (accuracy of weight-only quantisation, fp32 speed/RAM).
    "static-int8"   format "int8" plus a calibrated per-tensor activation scale (and zero point, asymmetric)
                    per linear: ``input_scale`` / ``input_zero_point``; the runtime quantises every token
                    with them (no per-token range pass). The ranges come from ``calibrate_static``: min-max,
                    percentile or MSE (``RangeHistogram``) over every linear's input, gathered in one pass
                    over the fp32 model (SmoothQuant, alpha > 0, adds one earlier pass for the per-channel
                    maxima that the smoothing vectors need).

In both modes the word-embedding table is stored int8 with a per-row scale (``embedding_int8``, default on;
ops/embedding.py dequantises the gathered rows), which takes MiniLM's file from 59 MB to about 24 MB.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np

from edgeformer.errors import EdgeformerError
from edgeformer.kernels import gemm_s8

MODES = {"dynamic-int8": "int8", "weights-int8": "int8_weights", "static-int8": "int8"}
ACTIVATION_QUANT = ("asymmetric", "symmetric")
# SmoothQuant strength per mode when none is given (measured on MiniLM, docs/QUANTIZATION.md): per-token
# scales tolerate channel outliers, one per-tensor scale needs them flattened more
DEFAULT_SMOOTH_ALPHA = {"dynamic-int8": 0.5, "static-int8": 0.75}


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
                smooth=None, input_scale=None, input_zero_point=None):
    """Quantise a dense (N, K) float weight per output channel, pack it for gemm_s8; return (weights, attrs).
    smooth (K,) > 0: SmoothQuant vector, the stored weight is w[:, k] / smooth[k] (format "int8" only).
    input_scale (> 0) [and input_zero_point in [0, 255], asymmetric only]: static per-tensor activation
    quantisation (static_qparams gives both from a calibrated range)."""
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
    if input_scale is not None:
        scale = np.float32(input_scale)
        with np.errstate(over="ignore", divide="ignore"):
            if not (np.isfinite(scale) and scale > 0 and np.isfinite(np.float32(1) / scale)):
                raise EdgeformerError(f"{name}: input_scale must be finite and > 0, got {input_scale!r}")
        tensors[f"{name}.input_scale"] = np.array([scale], np.float32)
        weights["input_scale"] = f"{name}.input_scale"
        if activation_quant == "asymmetric":
            if input_zero_point is None or not 0 <= int(input_zero_point) <= 255:
                raise EdgeformerError(f"{name}: static asymmetric quantisation needs input_zero_point in [0, 255], "
                                      f"got {input_zero_point!r}")
            tensors[f"{name}.input_zero_point"] = np.array([int(input_zero_point)], np.int32)
            weights["input_zero_point"] = f"{name}.input_zero_point"
        elif input_zero_point is not None:
            raise EdgeformerError(f"{name}: input_zero_point is only for asymmetric activation quantisation")
    elif input_zero_point is not None:
        raise EdgeformerError(f"{name}: input_zero_point without input_scale")
    attrs = {"format": fmt, "out_features": int(n), "in_features": int(k)}
    if fmt == "int8":
        attrs["activation_quant"] = activation_quant
    return weights, attrs


class LinearPolicy:
    """Which format each linear layer is stored in."""

    def __init__(self, mode: str, keep_fp32=(), activation_quant: str = "asymmetric", weight_method: str = "maxabs",
                 embedding_int8: bool = True, act_amax: dict | None = None, smooth_alpha: float = 0.5,
                 act_qparams: dict | None = None):
        """act_qparams (static-int8, required): {linear name: {"scale", "zero_point", "smooth"}} from
        calibrate_static (with the same activation_quant)."""
        if mode not in MODES:
            raise EdgeformerError(f"unknown quantize mode {mode!r}; known: {sorted(MODES)}")
        if mode == "static-int8" and act_qparams is None:
            raise EdgeformerError("static-int8 needs calibrated activation ranges "
                                  "(converters.quantize.calibrate_static)")
        self.act_qparams = dict(act_qparams or {})
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
        if self.mode == "static-int8":
            if name not in self.act_qparams:
                raise EdgeformerError(f"static-int8: no calibrated activation range for linear {name!r} (did the "
                                      f"calibration data reach it?); keep it in fp32 with keep_fp32")
            q = self.act_qparams[name]
            if (q["zero_point"] is None) != (self.activation_quant == "symmetric"):
                raise EdgeformerError(f"{name}: calibration was done for the other activation_quant")
            return int8_linear(tensors, name, w, b, fmt="int8", activation_quant=self.activation_quant,
                               weight_method=self.weight_method, smooth=q.get("smooth"), input_scale=q["scale"],
                               input_zero_point=q["zero_point"])
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


# ---- static-int8 calibration ---------------------------------------------------------------------------

CALIB_METHODS = ("minmax", "percentile", "mse")
SCALE_FLOOR = 1e-30  # a calibrated scale is at least this (its reciprocal must be a finite float32)
MSE_BINS = 1024  # the MSE search runs on the histogram merged to at most this many bins over the data


def static_qparams(lo: float, hi: float, symmetric: bool):
    """A calibrated range -> (scale float32 > 0, zero point int in [0, 255] or None when symmetric), the
    runtime's quantiser (gemm_s8.quantize_rows_static):
        symmetric:  c = max(|lo|, |hi|), scale = c / 127, codes [-127, 127]
        asymmetric: lo <= 0 <= hi (widened to include 0, so that 0 is exact), scale = (hi - lo) / 255,
                    zero_point = clip(rint(-lo / scale), 0, 255)
    A zero range (the input was always 0) gets scale 1: every code is the zero point."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise EdgeformerError(f"calibrated range [{lo}, {hi}] is not finite")
    if symmetric:
        c = max(-lo, hi)
        scale = np.float32(c / 127.0) if c > 0 else np.float32(1)
        return np.float32(max(scale, SCALE_FLOOR)), None
    rng = hi - lo
    scale = np.float32(rng / 255.0) if rng > 0 else np.float32(1)
    scale = np.float32(max(scale, SCALE_FLOOR))
    return scale, int(np.clip(np.rint(-lo / np.float64(scale)), 0, 255))


def _grid(lo, hi, symmetric):
    """Vectorised static_qparams over candidate ranges: (scale, lowest, highest representable value)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        c = np.maximum(-lo, hi)
        s = np.maximum(np.where(c > 0, c / 127.0, 1.0).astype(np.float32), SCALE_FLOOR).astype(np.float64)
        return s, -127 * s, 127 * s
    s = np.maximum(np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32), SCALE_FLOOR).astype(np.float64)
    z = np.clip(np.rint(-lo / s), 0, 255)
    return s, -z * s, (255 - z) * s


def _round_err_integral(x, s):
    """Phi(x) = integral from -s/2 to x of (Q(t) - t)^2 dt for the unclipped grid {k s}: with t = x / s,
    n = floor(t + 1/2), r = t - n in [-1/2, 1/2): s^3 (n / 12 + (r^3 + 1/8) / 3) (a full step contributes
    s^3 / 12, the uniform rounding noise)."""
    t = x / s
    n = np.floor(t + 0.5)
    r = t - n
    return s ** 3 * (n / 12.0 + (r ** 3 + 0.125) / 3.0)


def expected_sq_error(edges, counts, s, ql, qh):
    """Expected sum of squared quantisation errors of a histogram (mass uniform inside each bin) under
    the quantiser with step s, grid {k s} and clip range [ql, qh] (values below ql become ql, above qh
    become qh). edges (nb+1,), counts (nb,); s, ql, qh (C,) candidates -> (C,). Exact for piecewise
    uniform densities: clipped parts integrate (x - q)^2, the inside part the rounding error (Phi)."""
    a, b = edges[None, :-1], edges[1:][None, :]  # (1, nb)
    s, ql, qh = s[:, None], ql[:, None], qh[:, None]  # (C, 1)
    width = b - a
    # below ql
    b1 = np.minimum(b, ql)
    low = np.where(a < ql, ((b1 - ql) ** 3 - (a - ql) ** 3) / 3.0, 0.0)
    # above qh
    a3 = np.maximum(a, qh)
    high = np.where(b > qh, ((b - qh) ** 3 - (a3 - qh) ** 3) / 3.0, 0.0)
    # inside
    a2, b2 = np.maximum(a, ql), np.minimum(b, qh)
    mid = np.where(b2 > a2, _round_err_integral(b2, s) - _round_err_integral(a2, s), 0.0)
    return ((low + mid + high) / width * counts[None, :]).sum(axis=1)


class RangeHistogram:
    """Running statistics of one tensor's values: exact min / max / count and a signed histogram of
    2 * BINS bins of equal width w on [-BINS w, BINS w) with 0 on a bin edge. w is set by the first
    non-zero batch (max |x| / BINS) and doubled (adjacent bins merged, exactly) whenever a later batch
    reaches beyond, so the data always spans at least BINS / 2 bins per side of its largest magnitude."""

    BINS = 2048

    def __init__(self):
        self.lo, self.hi, self.count = 0.0, 0.0, 0
        self.width = 0.0  # 0 until a non-zero value arrives (zeros always count in bin [0, w): index BINS)
        self.counts = np.zeros(2 * self.BINS, np.int64)

    def update(self, x) -> None:
        x = np.asarray(x, np.float32).reshape(-1)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise EdgeformerError("calibration activations hold NaN or inf")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.size
        m = max(-lo, hi)
        if m == 0 and self.width == 0:
            self.counts[self.BINS] += x.size
            return
        if self.width == 0:
            self.width = m / self.BINS * (1 + 2 ** -20)
        while m >= self.BINS * self.width:
            merged = self.counts.reshape(self.BINS, 2).sum(axis=1)  # bins (2j, 2j+1) -> j, about 0
            self.counts[:] = 0
            self.counts[self.BINS // 2:3 * self.BINS // 2] = merged
            self.width *= 2
        idx = np.floor(x.astype(np.float64) / self.width).astype(np.int64) + self.BINS
        self.counts += np.bincount(np.clip(idx, 0, 2 * self.BINS - 1), minlength=2 * self.BINS)

    def _merged(self, max_bins):
        """(counts, width) with adjacent bins merged about 0 (as a doubling does) until the occupied span of
        the signed histogram has at most max_bins bins."""
        counts, width = self.counts.copy(), self.width
        while True:
            nz = np.flatnonzero(counts)
            if max_bins is None or nz[-1] + 1 - nz[0] <= max_bins:
                return counts, width
            merged = counts.reshape(self.BINS, 2).sum(axis=1)
            counts = np.zeros_like(counts)
            counts[self.BINS // 2:3 * self.BINS // 2] = merged
            width *= 2

    def _signed(self, max_bins=None):
        """(edges, counts) of the occupied part of the signed histogram; the end edges are clamped to the exact
        extremes (the smallest value lies inside the first bin, the largest inside the last)."""
        counts, width = self._merged(max_bins)
        nz = np.flatnonzero(counts)
        i0, i1 = nz[0], nz[-1] + 1
        edges = (np.arange(i0, i1 + 1) - self.BINS) * width
        return _clamp_ends(edges, self.lo, self.hi, width), counts[i0:i1].astype(np.float64)

    def _quantile(self, edges, counts, q):
        """The q-quantile (0..1) of the histogram, interpolated linearly inside its bin."""
        cum = np.concatenate([[0.0], np.cumsum(counts)])
        target = q * cum[-1]
        i = int(np.clip(np.searchsorted(cum, target, side="left") - 1, 0, len(counts) - 1))
        frac = 0.0 if counts[i] == 0 else (target - cum[i]) / counts[i]
        return float(edges[i] + np.clip(frac, 0, 1) * (edges[i + 1] - edges[i]))

    def range(self, method: str = "minmax", symmetric: bool = False, percentile: float = 99.99):
        """The calibrated (lo, hi), lo <= 0 <= hi (symmetric: lo = -hi):
        minmax      the exact extremes;
        percentile  the percentile of |x| (symmetric), or the (100 - p) and p percentiles of x;
        mse         the range whose quantiser (static_qparams) has the least expected squared error over
                    the histogram (merged to <= MSE_BINS bins; expected_sq_error), searched over
                    c = max|x| * 2^(-i/32), i = 0..320 (symmetric), or (asymmetric) over the pairs
                    (lo * 2^(-i/4), hi * 2^(-j/4)), i, j = 0..28, then 2^(+-k/32), k <= 8, around the best."""
        if method not in CALIB_METHODS:
            raise EdgeformerError(f"unknown calibration method {method!r}; known: {CALIB_METHODS}")
        if not 50 < percentile <= 100:
            raise EdgeformerError(f"calibration percentile must lie in (50, 100], got {percentile}")
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        amax = max(-lo, hi)
        if method == "minmax" or amax == 0 or self.width == 0:
            return (-amax, amax) if symmetric else (lo, hi)
        if method == "percentile":
            p = percentile / 100.0
            if symmetric:
                edges, counts = self._folded()
                c = min(self._quantile(edges, counts, p), amax)
                return -c, c
            edges, counts = self._signed()
            return min(self._quantile(edges, counts, 1 - p), 0.0), max(self._quantile(edges, counts, p), 0.0)
        if symmetric:
            edges, counts = self._folded(MSE_BINS)
            c = amax * 2.0 ** (-np.arange(321) / 32.0)
            best = c[int(np.argmin(expected_sq_error(edges, counts, *_grid(-c, c, True))))]
            return -best, best
        # asymmetric: a coarse grid of (lo, hi) fractions 2^(-i/4), then 2^(-j/32) steps around the best pair
        edges, counts = self._signed(MSE_BINS)

        def search(fl, fh):
            los = np.broadcast_to((lo * fl)[:, None], (len(fl), len(fh))).ravel()
            his = np.broadcast_to((hi * fh)[None, :], (len(fl), len(fh))).ravel()
            best = int(np.argmin(expected_sq_error(edges, counts, *_grid(los, his, False))))
            return fl[best // len(fh)], fh[best % len(fh)]

        one, coarse = np.ones(1), 2.0 ** (-np.arange(29) / 4.0)  # 1 .. 2^-7
        fl, fh = search(coarse if lo < 0 else one, coarse if hi > 0 else one)
        fine = 2.0 ** (np.arange(-8, 9) / 32.0)
        fl, fh = search(np.minimum(fl * fine, 1.0) if lo < 0 else one, np.minimum(fh * fine, 1.0) if hi > 0 else one)
        return float(lo * fl), float(hi * fh)

    def _folded(self, max_bins=None):
        """Histogram of |x| from the signed one (its bins are symmetric about 0): bin i holds |x| in
        [i w, (i + 1) w)."""
        n = self.BINS
        counts, width = self._merged(None if max_bins is None else 2 * max_bins)
        folded = counts[n:] + counts[:n][::-1]
        last = np.flatnonzero(folded)[-1] + 1
        e = np.arange(last + 1) * width
        return _clamp_ends(e, 0.0, max(-self.lo, self.hi), width), folded[:last].astype(np.float64)


def _clamp_ends(edges, lo, hi, width):
    """Clamp a histogram's first and last edges to the data's extremes lo, hi (lo lies in the first bin, hi in
    the last; a bin whose lower edge is hi keeps a sliver of width)."""
    edges = edges.astype(np.float64)
    edges[0] = max(edges[0], lo)
    edges[-1] = max(min(edges[-1], hi), edges[-2] + 1e-6 * width)
    return edges


def calibration_feeds(model, calib=None, batch_size: int = 16) -> list[dict]:
    """Feed dicts for a calibration pass: calib = an .npz of input_ids (B, S) int [attention_mask,
    token_type_ids (B, S)], a text file (one text per line), a list of texts, or None (the bundled corpus,
    default_calibration_texts()). Texts need the model's tokenizer."""
    from pathlib import Path

    names = {spec.name for spec in model.inputs}
    if isinstance(calib, (str, Path)) and str(calib).endswith(".npz"):
        try:
            with np.load(calib, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise EdgeformerError(f"cannot read calibration feeds {calib}: {exc}") from None
        if "input_ids" not in arrays:
            raise EdgeformerError(f"{calib} has no input_ids")
        ids = arrays["input_ids"]
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or not ids.size:
            raise EdgeformerError(f"{calib}: input_ids must be a non-empty (batch, seq) integer array")
        feeds = {"input_ids": ids.astype(np.int64)}
        for key in ("attention_mask", "token_type_ids"):
            if key in arrays and key in names:
                if arrays[key].shape != ids.shape or arrays[key].dtype.kind not in "iub":
                    raise EdgeformerError(f"{calib}: {key} must be an integer array shaped like input_ids")
                feeds[key] = arrays[key].astype(np.int64)
        unknown = sorted(set(arrays) - {"input_ids", "attention_mask", "token_type_ids"})
        if unknown:
            raise EdgeformerError(f"{calib}: unexpected arrays {unknown}")
        n = ids.shape[0]
        return [{k: v[i:i + batch_size] for k, v in feeds.items()} for i in range(0, n, batch_size)]
    if calib is None:
        texts = default_calibration_texts()
    elif isinstance(calib, (str, Path)):
        try:
            lines = Path(calib).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeformerError(f"cannot read calibration texts {calib}: {exc}") from None
        texts = [t.strip() for t in lines if t.strip()]
    else:
        texts = [str(t) for t in calib]
    if not texts:
        raise EdgeformerError("no calibration texts")
    if model.tokenizer_json is None:
        raise EdgeformerError("calibration texts need a tokenizer in the model file; pass an .npz of input_ids")
    encoder = model.text_encoder()
    return [{k: v for k, v in encoder(texts[i:i + batch_size]).items() if k in names}
            for i in range(0, len(texts), batch_size)]


def _dense_weight(model, node):
    """The (N, K) fp32 weight of an fp32 linear node of a loaded model (packed or plain)."""
    from edgeformer.kernels.gemm_f32 import unpack_weight

    if "weight_packed" in node.weights:
        return unpack_weight(np.asarray(model.tensors[node.weights["weight_packed"]]), int(node.attrs["out_features"]))
    return np.asarray(model.tensors[node.weights["weight"]], np.float32)


def calibrate_static(model_path, calib=None, *, method: str = "minmax", percentile: float = 99.99,
                     activation_quant: str = "asymmetric", smooth_alpha: float = 0.0, batch_size: int = 16) -> dict:
    """Static per-tensor activation ranges of every fp32 linear of a model file, from calibration data
    (calibration_feeds(calib)). Returns {linear name: {"lo", "hi" (calibrated range), "scale", "zero_point"
    (static_qparams; None when symmetric), "smooth" ((K,) f32 or None), "tokens"}}.

    One pass with Model.run(observe=...) over the feeds feeds every linear's input (T, K) into its
    RangeHistogram. With smooth_alpha > 0 (SmoothQuant) a first pass takes the per-input-channel max |x|,
    from which (and the fp32 weight's column maxima) smoothing_vector gives smooth; the histogram pass then
    sees x * smooth, which is what the runtime quantises."""
    import edgeformer

    if activation_quant not in ACTIVATION_QUANT:
        raise EdgeformerError(f"activation_quant must be one of {ACTIVATION_QUANT}, got {activation_quant!r}")
    if method not in CALIB_METHODS:
        raise EdgeformerError(f"unknown calibration method {method!r}; known: {CALIB_METHODS}")
    if not 50 < float(percentile) <= 100:
        raise EdgeformerError(f"calibration percentile must lie in (50, 100], got {percentile}")
    model = edgeformer.load(model_path, threads=1)
    try:
        feeds_list = calibration_feeds(model, calib, batch_size)
        linears = {n.name: n for n in model.graph.nodes if n.op == "linear" and n.attrs.get("format", "fp32") == "fp32"}
        out = model.outputs[0].name
        smooth: dict = {}
        if smooth_alpha > 0:
            amax: dict = {}

            def observe_amax(node, inputs):
                if node.name in linears and inputs[0].shape[0]:
                    a = np.abs(inputs[0]).max(axis=0)  # (K,)
                    amax[node.name] = np.maximum(amax.get(node.name, a), a)

            for feeds in feeds_list:
                model.run(feeds, outputs=[out], observe=observe_amax)
            smooth = {name: smoothing_vector(a, _dense_weight(model, linears[name]), smooth_alpha)
                      for name, a in amax.items()}
        hists = {name: RangeHistogram() for name in linears}
        tokens = dict.fromkeys(linears, 0)

        def observe(node, inputs):
            if node.name in hists and inputs[0].shape[0]:
                x = inputs[0]  # (T, K), must not be modified
                tokens[node.name] += x.shape[0]
                if node.name in smooth:
                    x = x * smooth[node.name][None, :]
                try:
                    hists[node.name].update(x)
                except EdgeformerError as exc:
                    raise EdgeformerError(f"calibration of {node.name!r}: {exc}") from None

        for feeds in feeds_list:
            model.run(feeds, outputs=[out], observe=observe)
    finally:
        model.close()
    symmetric = activation_quant == "symmetric"
    result = {}
    for name, h in hists.items():
        if not h.count:
            continue  # never reached: LinearPolicy refuses to quantise it without a range
        lo, hi = h.range(method, symmetric, percentile)
        scale, zero = static_qparams(lo, hi, symmetric)
        result[name] = {"lo": float(lo), "hi": float(hi), "scale": scale, "zero_point": zero,
                        "smooth": smooth.get(name), "tokens": tokens[name]}
    return result
