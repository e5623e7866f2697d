"""patch_embedding: ViT's Conv2d(kernel = stride = patch) + class token + position table, as tokens.

Input: a dense float32 (B, C, H, W) graph input (pixel_values). Output: tokens (B*P', d), item b owning rows
b*P' .. (b+1)*P' - 1, with P' = Hp*Wp (+1 with a class token), Hp = H // ph, Wp = W // pw (rows / columns past
the last whole patch are dropped, as Conv2d does):

    row b*P' (class token)          = cls + position[0]
    row b*P' + c + i*Wp + j         = W_flat . x[b, :, i*ph:(i+1)*ph, j*pw:(j+1)*pw].ravel() + bias + position[c + i*Wp + j]

(c = 1 with a class token, else 0). The convolution is a linear over flattened (C, ph, pw) patches, so the weight
is an fp32 linear weight (``weight_packed`` (ceil(d/NR), C*ph*pw, NR) with ``out_features`` = d, or a plain
``weight`` (d, C*ph*pw), i.e. the Conv2d kernel (d, C, ph, pw) reshaped) and ``kernels/gemm_f32.py``'s
``linear_packed_f32`` does the product, with the bias and the position rows fused as its residual. Patch
extraction (im2col) is one NumPy reshape + transpose copy: the patches do not overlap.

Weights: weight / weight_packed, optional bias (d,), optional cls (d,), optional position (P', d).
Attributes: patch_size [ph, pw], out_features (with weight_packed). The input's declared shape must fix C, H, W
(checked against the weights at load time, GraphError); every run checks the fed array (InputError).
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError, InputError
from edgeformer.graph import DENSE, TOKENS, ValueType
from edgeformer.ops.base import NO_MATRIX, inputs_count, same_width, weight
from edgeformer.ops.linear import Fp32Weights


def _patch_size(node) -> tuple[int, int]:
    value = node.attrs.get("patch_size")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in value)):
        raise GraphError(f"node {node.name!r}: attribute 'patch_size' must be [ph, pw] with ints in [1, 4096], "
                         f"got {value!r}")
    return value[0], value[1]


class _Spec:
    """Everything infer and bind check: weights, patch size, channels, optional cls and position table."""

    def __init__(self, node, weights):
        self.fmt = Fp32Weights(node, weights)
        self.ph, self.pw = _patch_size(node)
        area = self.ph * self.pw
        if self.fmt.in_features % area:
            raise GraphError(f"node {node.name!r}: weight has {self.fmt.in_features} input features, not a multiple "
                             f"of the patch area {self.ph}x{self.pw}")
        self.channels = self.fmt.in_features // area
        self.width = self.fmt.out_features
        self.cls = weight(node, weights, "cls", 1, optional=True)  # (d,)
        self.position = weight(node, weights, "position", 2, optional=True)  # (P', d)
        if self.cls is not None:
            same_width(node, "cls", self.cls.shape[0], self.width)
        if self.position is not None:
            same_width(node, "position", self.position.shape[1], self.width)

    def patches(self, height: int, width: int) -> tuple[int, int]:
        return height // self.ph, width // self.pw

    def tokens(self, height: int, width: int) -> int:
        hp, wp = self.patches(height, width)
        return hp * wp + (self.cls is not None)


class PatchEmbedding:
    op = "patch_embedding"

    @staticmethod
    def infer(node, in_types, weights):
        inputs_count(node, in_types, 1)
        spec = _Spec(node, weights)
        x = in_types[0]
        if x.kind != DENSE or x.dtype != "float32":
            raise GraphError(f"node {node.name!r}: patch_embedding input must be a dense float32 (B, C, H, W) "
                             f"graph input")
        if x.shape is None or len(x.shape) != 4:
            raise GraphError(f"node {node.name!r}: patch_embedding input must have shape (batch, C, H, W), "
                             f"got {x.shape}")
        _, c, h, w = x.shape
        if not all(isinstance(v, int) for v in (c, h, w)):
            raise GraphError(f"node {node.name!r}: the input must declare fixed C, H, W, got {list(x.shape)}")
        if c != spec.channels:
            raise GraphError(f"node {node.name!r}: input has {c} channels, the weight takes {spec.channels} "
                             f"({spec.fmt.in_features} features / patch {spec.ph}x{spec.pw})")
        hp, wp = spec.patches(h, w)
        if hp < 1 or wp < 1:
            raise GraphError(f"node {node.name!r}: image {h}x{w} is smaller than the patch {spec.ph}x{spec.pw}")
        tokens = spec.tokens(h, w)
        if spec.position is not None and spec.position.shape[0] != tokens:
            raise GraphError(f"node {node.name!r}: position table has {spec.position.shape[0]} rows, the image gives "
                             f"{tokens} tokens ({hp}x{wp} patches{' + class token' if spec.cls is not None else ''})")
        return [ValueType(TOKENS, spec.width)]

    @staticmethod
    def bind(node, weights):
        spec = _Spec(node, weights)
        fmt, ph, pw, d = spec.fmt, spec.ph, spec.pw, spec.width
        has_cls = spec.cls is not None
        # residual of the per-image GEMM: the patch rows of the position table (writable copy, so the kernel's
        # residual argument has the same Numba type as an activation and no new specialisation is compiled)
        patch_pos = None if spec.position is None else np.array(spec.position[int(has_cls):], dtype=np.float32)
        cls_row = None
        if has_cls:
            cls_row = spec.cls.astype(np.float32) + (0 if spec.position is None else spec.position[0])  # (d,)

        def run(inputs, batch, workers):
            from edgeformer.kernels.mathfn import ACT_NONE

            x = inputs[0]
            if x.ndim != 4 or x.dtype != np.float32:
                raise InputError(f"{node.name}: expected float32 (B, C, H, W) pixels, got {x.dtype} {x.shape}")
            items, channels, height, width = x.shape
            hp, wp = spec.patches(height, width)
            if channels != spec.channels or hp < 1 or wp < 1:
                raise InputError(f"{node.name}: image of shape {list(x.shape[1:])} does not fit the weights "
                                 f"({spec.channels} channels, patch {ph}x{pw})")
            tokens = hp * wp + has_cls
            if tokens != batch.seq_len or items != batch.batch_size or \
                    (patch_pos is not None and patch_pos.shape[0] != hp * wp):
                raise InputError(f"{node.name}: image {height}x{width} gives {tokens} tokens per item, the model "
                                 f"expects {batch.seq_len}")
            # im2col: (B, C, Hp, ph, Wp, pw) -> (B, Hp, Wp, C, ph, pw), one copy; the flattened (C, ph, pw)
            # order is the Conv2d kernel's, so W_flat = kernel.reshape(d, C*ph*pw)
            crop = x[:, :, :hp * ph, :wp * pw].reshape(items, channels, hp, ph, wp, pw)
            cols = np.ascontiguousarray(crop.transpose(0, 2, 4, 1, 3, 5)).reshape(items * hp * wp, -1)  # (B*P, K)
            out = np.empty((items * tokens, d), dtype=np.float32)  # (B*P', d)
            residual = NO_MATRIX if patch_pos is None else patch_pos  # (P, d)
            per_item = hp * wp
            for b in range(items):
                start = b * tokens + has_cls
                # the item's patch rows are contiguous in out: one GEMM each (bias + positions fused)
                fmt(cols[b * per_item:(b + 1) * per_item], residual, ACT_NONE, out[start:start + per_item], workers)
                if has_cls:
                    out[b * tokens] = cls_row
            return [out]

        return run
