"""Abstract values of the ONNX importer's interpreter.

Every ONNX value gets one of these while the graph is walked in topological order:

Const   an array known at conversion time (initializers, folded constants)
Dyn     a non-float "side" value computable from the graph inputs alone: shapes, position ids, the attention
        mask bias; kept as a function of probe feeds (``Env``) and identified by evaluating it (a ViT's pixel
        input is a Dyn too, so that its Shape subgraphs fold; only its patch Conv reads the pixels)
Row     a token tensor (B, S, width): a source (``Src``) and an optional row-wise function (elementwise ops,
        reductions over the last axis) still to be identified (identity, GELU, layer norm, ...); or, when its
        source is ``pooled``, a sequence tensor (B, width) (ViT's CLS token and the classifier / pooler after it)
Heads   a Row viewed as (B, S, H, D) in some axis order, with a pending scale
Scores  Q K^T of two Heads, with scale and whether the padding / causal masks were applied; Probs = softmax(Scores)
Patches a ViT patch Conv's output (B, d, Hp, Wp) on its way to tokens (Reshape / Transpose regroup its axes)
Bad     could not be translated; carries the (node, reason) causes for the final error report
"""
from __future__ import annotations

import numpy as np


class Value:
    pass


class Const(Value):
    def __init__(self, array):
        self.array = np.asarray(array)


class Env:
    """Probe feeds: one concrete (B, S) batch with its inputs; caches Dyn evaluations.

    ViT probes feed random pixels; their S (tokens per image) is set once the patch embedding is recognised."""

    def __init__(self, batch: int, seq: int, inputs: dict[str, np.ndarray]):
        self.batch, self.seq, self.inputs, self.cache = batch, seq, inputs, {}


class Dyn(Value):
    def __init__(self, fn, label: str = "", node_key=None):
        self.fn, self.label, self.node_key = fn, label, node_key

    def eval(self, env: Env):
        key = id(self)
        if key not in env.cache:
            env.cache[key] = self.fn(env)
        return env.cache[key]


class Bad(Value):
    def __init__(self, causes):
        self.causes = list(causes)


class Unsupported(Exception):
    """Raised inside handlers; turned into a Bad value with these causes."""

    def __init__(self, causes, reason: str | None = None):
        super().__init__(reason or "unsupported")
        self.causes = list(causes)


# ---- token tensors ----------------------------------------------------------------------------
class Src:
    width: int
    value: str | None = None  # set once materialized
    pooled: bool = False  # a sequence value (B, width): one row per item (ViT's CLS token), not (B, S, width)


class ValueSrc(Src):
    def __init__(self, name: str, width: int, pooled: bool = False):
        self.value, self.width, self.pooled = name, width, pooled


class LinearSrc(Src):
    """y = act(x W^T + b) + res; W (N, K) float32."""

    def __init__(self, x: "Row", w: np.ndarray, b: np.ndarray | None = None, act: str | None = None,
                 res: "Row | None" = None, name: str = "linear", nodes=()):
        self.x, self.w, self.b, self.act, self.res, self.name = x, w, b, act, res, name
        self.width = int(w.shape[0])
        self.nodes = list(nodes)
        self.pooled = x.pooled

    def replace(self, **changes) -> "LinearSrc":
        kw = dict(x=self.x, w=self.w, b=self.b, act=self.act, res=self.res, name=self.name, nodes=self.nodes)
        kw.update(changes)
        return LinearSrc(**kw)

    @property
    def plain(self) -> bool:
        return self.act is None and self.res is None


class SumSrc(Src):
    """a + b of two token tensors of equal width (a residual connection, not yet placed)."""

    def __init__(self, a: "Row", b: "Row", nodes=()):
        self.a, self.b, self.width, self.nodes = a, b, a.width, list(nodes)
        self.pooled = a.pooled


class EmbSrc(Src):
    """Sum of embedding lookups: slots word / token_type -> table, position -> (table, offset), const -> row."""

    def __init__(self, slots: dict, width: int, nodes=()):
        self.slots, self.width, self.nodes = dict(slots), width, list(nodes)


class PatchSrc(Src):
    """ViT patch embedding of the pixel input: Conv2d(kernel = stride = patch) as a linear over flattened (C, ph, pw)
    patches, tokens in row-major patch order after an optional class token, plus an optional position table.

    kernel (d, C, ph, pw); bias (d,) or None; cls (d,) or None; position (tokens, d) or None; grid (Hp, Wp)."""

    def __init__(self, kernel, bias, grid, cls=None, position=None, nodes=()):
        self.kernel, self.bias, self.grid, self.cls, self.position = kernel, bias, tuple(grid), cls, position
        self.width = int(kernel.shape[0])
        self.nodes = list(nodes)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] + (self.cls is not None)

    def replace(self, **changes) -> "PatchSrc":
        kw = dict(kernel=self.kernel, bias=self.bias, grid=self.grid, cls=self.cls, position=self.position,
                  nodes=self.nodes)
        kw.update(changes)
        return PatchSrc(**kw)


class PoolSrc(Src):
    """The first token of every item of a token tensor (ViT's ``hidden[:, 0]``): a sequence value (B, width)."""

    pooled = True

    def __init__(self, x: "Row", nodes=()):
        self.x, self.width, self.nodes = x, x.width, list(nodes)


class Patches(Value):
    """A ViT patch Conv's output, axes named like Heads: B (batch), C (channels = hidden size d), Y, X (patch grid
    rows, columns); starts as ('B', 'C', 'Y', 'X'); an axis may merge consecutive ones ('B', 'C', 'YX'). Becomes a
    token Row once it reads ('B', 'YX', 'C')."""

    def __init__(self, src: PatchSrc, order=("B", "C", "Y", "X"), nodes=()):
        self.src, self.order, self.nodes = src, tuple(order), list(nodes)

    def with_(self, order) -> "Patches":
        return Patches(self.src, order, self.nodes)

    def dims(self, env: "Env") -> tuple:
        sizes = {"B": env.batch, "C": self.src.width, "Y": self.src.grid[0], "X": self.src.grid[1]}
        return tuple(int(np.prod([sizes[c] for c in a])) for a in self.order)

    @property
    def letters(self) -> str:
        return "".join(self.order)


class Row(Value):
    """A (B, S, width) token tensor: ``fn(src probe (1, n, src.width)) -> (1, n, width)``, None = identity.

    ``flat``: the same tokens viewed as (B*S, width) (GPT-2's Conv1D: Reshape, Gemm, Reshape back); only Shape
    and Reshape see the difference."""

    def __init__(self, src: Src, fn=None, width: int | None = None, nodes=(), flat: bool = False):
        self.src, self.fn = src, fn
        self.width = src.width if width is None else width
        self.nodes = list(nodes)
        self.flat = flat

    def apply(self, x):
        return x if self.fn is None else self.fn(x)

    @property
    def pooled(self) -> bool:
        return self.src.pooled


class Heads(Value):
    """A plain Row (fn None) reshaped to heads; ``order`` names the axes, e.g. ('B', 'H', 'S', 'D'); an axis may
    merge consecutive ones, e.g. ('BH', 'S', 'D') for the 3-D batched matmuls of dynamo's SDPA decomposition."""

    def __init__(self, row: Row, order: tuple, heads: int, head_dim: int, scale: float = 1.0):
        self.row, self.order, self.heads, self.head_dim, self.scale = row, tuple(order), heads, head_dim, scale

    def with_(self, **changes) -> "Heads":
        kw = dict(row=self.row, order=self.order, heads=self.heads, head_dim=self.head_dim, scale=self.scale)
        kw.update(changes)
        return Heads(**kw)

    def dims(self, env: Env) -> tuple:
        sizes = {"B": env.batch, "S": env.seq, "H": self.heads, "D": self.head_dim}
        return tuple(int(np.prod([sizes[c] for c in a])) for a in self.order)

    @property
    def letters(self) -> str:
        return "".join(self.order)


class Scores(Value):
    def __init__(self, q: Heads, k: Heads, scale: float = 1.0, masked: bool = False, causal: bool = False):
        self.q, self.k, self.scale, self.masked, self.causal = q, k, scale, masked, causal

    def with_(self, **changes) -> "Scores":
        kw = dict(q=self.q, k=self.k, scale=self.scale, masked=self.masked, causal=self.causal)
        kw.update(changes)
        return Scores(**kw)


class Probs(Value):
    def __init__(self, scores: Scores):
        self.scores = scores


class ProbsNaN(Value):
    """IsNaN(Probs): SDPA exports zero the NaN rows of fully masked queries; a no-op for valid tokens."""

    def __init__(self, probs: Probs):
        self.probs = probs
