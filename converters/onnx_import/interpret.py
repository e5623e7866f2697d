"""Walk an ONNX encoder / GPT-2 decoder graph once, in topological order, giving every value an abstract meaning
(``values.py``), and emit edgeformer's coarse ops for whatever the graph outputs need.

Matching is by dataflow and by numerical probing, never by node names:

* constant folding: nodes whose inputs are all constants are evaluated (onnx.reference);
* shape, position-id and mask subgraphs become ``Dyn`` values, functions of probe feeds; where they meet
  the data path they are *evaluated* on probe batches and recognised: a Gather index that equals input_ids,
  token_type_ids, arange(S) + c (BERT / DistilBERT buffers, RoBERTa's cumsum of the id mask) or a constant;
  an attention bias that is 0 on valid keys and very negative on padded ones; Reshape targets [B, S, H, D];
* MatMul with a constant weight is a pending linear; a constant Add becomes its bias, an Add of another token
  tensor its residual; Q/K/V linears of one input feeding one attention are fused into one linear;
* row-wise subgraphs (elementwise ops and reductions over the hidden axis, whatever their decomposition) are
  composed as functions and identified by probing: identity, GELU (erf or tanh), ReLU -> the linear's or an
  activation op; layer norm (gamma, beta and eps recovered, then verified) -> layer_norm.

ORT contrib ops (EmbedLayerNormalization, Attention, MultiHeadAttention, SkipLayerNormalization, BiasGelu, FastGelu,
Gelu, LayerNormalization) are translated into the same abstract values.
"""
from __future__ import annotations

import math
import re

import numpy as np

from converters.onnx_import.errors import OnnxFormatError
from converters.onnx_import.evaluate import EvalError, NodeEvaluator, _ln, gelu, gelu_tanh
from converters.onnx_import.values import (Bad, Const, Dyn, EmbSrc, Env, Heads, LinearSrc, Patches, PatchSrc,
                                           PoolSrc, Probs, ProbsNaN, Row, Scores, Src, SumSrc, Unsupported, Value,
                                           ValueSrc)

ROLES = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")

ROW_LOCAL = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Reciprocal", "Neg", "Relu", "Sigmoid", "Exp",
             "Abs", "Cast", "Identity", "Dropout", "ReduceMean", "LayerNormalization", "Gelu", "Max", "Min", "Clip",
             "BiasGelu", "FastGelu", "Softplus", "HardSigmoid"}
FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16

ACTIVATIONS = {"gelu": gelu, "gelu_tanh": gelu_tanh, "relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}
EPILOGUE_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # fused into a linear; others (tanh) are activation nodes


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _close(got, want, tol=2e-5) -> bool:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return False
    return bool(np.all(np.abs(got - want) <= tol * (1.0 + np.abs(want))))


def _fail(nodes, reason: str) -> Unsupported:
    """An Unsupported blaming every node of a fused group (deduplicated)."""
    seen = list(dict.fromkeys(nodes))
    return Unsupported([(k, reason) for k in seen], reason)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_.") or "node"


class Interpreter:
    def __init__(self, model, consts: dict[str, np.ndarray], role_of_input: dict[str, str]):
        from converters.onnx_import.loader import opset_of
        from edgeformer.graph import GraphBuilder

        self.model = model
        self.opset = opset_of(model, "")
        self.ms_opset = opset_of(model, "com.microsoft")
        self.ev = NodeEvaluator({"": self.opset, "com.microsoft": self.ms_opset})
        self.values: dict[str, Value] = {}
        self.role_of_input = dict(role_of_input)  # onnx input name -> role
        self.input_of_role = {r: n for n, r in role_of_input.items()}
        self.builder = GraphBuilder(model.graph.name or "onnx")
        self.tensors: dict[str, np.ndarray] = {}
        self._hashes: dict[tuple, str] = {}
        self._names: set[str] = set()
        self.used_roles: set[str] = set()
        self.warnings: list[str] = []
        for name, array in consts.items():
            self.values[name] = Const(array)
        for name, role in self.role_of_input.items():
            self.values[name] = Dyn(lambda env, r=role: env.inputs[r], label=role)
        rng = np.random.default_rng(1234)
        self.pixels = self._pixel_input(model, consts)  # ViT: (C, H, W) of the pixel input, else None
        if self.pixels is None:
            self.probe_envs = [self._env(2, 5, [5, 5], rng), self._env(3, 8, [8, 8, 8], rng)]
            self.mask_env = self._env(3, 6, [6, 3, 1], rng)
        else:  # random images; S (tokens per image) is set once the patch embedding is recognised
            self.probe_envs = [self._pixel_env(b, rng) for b in (2, 3)]
            self.mask_env = self._pixel_env(3, rng)
        self.vision_tokens = None  # ViT: tokens per image of the patch embedding (the graph input's tokens_per_item)
        if "position_ids" in self.input_of_role:
            self.warnings.append("the position_ids input is taken to be arange(S), the index in the padded row: exact "
                                 "for right padding, not for left padding with optimum's cumsum(mask) - 1 positions")

    # ---- probe feeds ------------------------------------------------------------------------
    @staticmethod
    def _env(batch, seq, lengths, rng) -> Env:
        mask = np.zeros((batch, seq), dtype=np.int64)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
        ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)  # far from special ids (pad, cls)
        types = rng.integers(0, 2, size=(batch, seq), dtype=np.int64)
        types[0, :2] = [0, 1]
        # Optimum's GPT-2 exports take position_ids: the runtime numbers positions by index in the padded row, so
        # the graph is probed (and converted) with position_ids = arange(S) (HF's default; equal to optimum's
        # cumsum(mask) - 1 on the valid tokens of right-padded rows)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        return Env(batch, seq, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                                "position_ids": positions})

    # ---- bookkeeping ------------------------------------------------------------------------
    def key(self, node):
        from converters.onnx_import.loader import opset_of

        opset = self.opset if node.domain in ("", "ai.onnx") else opset_of(self.model, node.domain)
        return (node.name or f"{node.op_type}:{node.output[0]}", node.domain, node.op_type, opset)

    def unique(self, base: str) -> str:
        base = _safe(base)
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def value_of(self, v: Value, env: Env):
        if isinstance(v, Const):
            return v.array
        if isinstance(v, Dyn):
            return v.eval(env)
        raise Unsupported([], f"a {type(v).__name__} value is used where a shape or index value is expected")

    # ---- the walk ---------------------------------------------------------------------------
    def run(self, order):
        for index in order:
            node = self.model.graph.node[index]
            ins = [self.values.get(name) if name else None for name in node.input]
            try:
                outs = self.interpret(node, ins)
            except Unsupported as exc:
                outs = Bad(exc.causes + [(self.key(node), str(exc))])
            except EvalError as exc:
                outs = Bad([(self.key(node), f"cannot evaluate: {exc}")])
            except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:  # never crash
                outs = Bad([(self.key(node), f"internal error while translating: {type(exc).__name__}: {exc}")])
            if isinstance(outs, Value):
                outs = [outs] * len(node.output)
            for name, value in zip(node.output, outs):
                if name:
                    self.values[name] = value if value is not None else Bad([(self.key(node), "output not produced")])

    def interpret(self, node, ins):
        # deduplicated: a failure reaches later nodes along many paths (a layer norm reads x 3 times), and
        # concatenating cause lists would double them at every such node
        bad = list(dict.fromkeys(c for v in ins if isinstance(v, Bad) for c in v.causes))
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            raise Unsupported(bad, f"unknown domain {node.domain!r}")
        if node.domain == "com.microsoft" and not hasattr(self, f"ms_{node.op_type}"):
            raise Unsupported(bad, f"ORT contrib op {node.op_type} is not supported")
        if bad:
            return Bad(bad)
        op = node.op_type
        if node.domain == "com.microsoft":
            handler = getattr(self, f"ms_{op}", None)
            if handler is None:
                raise Unsupported([], f"ORT contrib op {op} is not supported")
            return handler(node, ins)
        present = [v for v in ins if v is not None]
        if all(isinstance(v, Const) for v in present):  # constant folding
            if op in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
                raise Unsupported([], "random op")
            outs = self.ev.run(node, [None if v is None else v.array for v in ins])
            return [Const(o) if o is not None else None for o in outs]
        if op == "Gather" and isinstance(ins[0], Const) and isinstance(ins[1], Dyn):
            row = self.embedding_gather(node, ins[0].array, ins[1])
            if row is not None:
                return row
        if op == "Conv" and self.pixels is not None and ins and isinstance(ins[0], Dyn) \
                and ins[0].label == "pixel_values":
            return self.patch_conv(node, ins)
        if all(isinstance(v, (Const, Dyn)) for v in present):
            return self.dyn_node(node, ins)
        if op == "Shape":
            return self.shape_of(node, ins[0])
        handler = getattr(self, f"op_{op}", None)
        if handler is not None:
            result = handler(node, ins)
            if result is not None:
                return result
        if op in ROW_LOCAL:
            return self.row_local(node, ins)
        kinds = ", ".join(type(v).__name__ for v in present)
        raise Unsupported([], f"no translation of {op} on ({kinds})")

    def dyn_node(self, node, ins):
        key = self.key(node)
        shared = {}

        def run_all(env):
            if id(env) not in shared:
                shared.clear()
                shared[id(env)] = self.ev.run(node, [None if v is None else self.value_of(v, env) for v in ins])
            return shared[id(env)]

        return [Dyn(lambda env, k=k: run_all(env)[k], label=node.op_type, node_key=key) for k in range(len(node.output))]

    def shape_of(self, node, x):
        start, end = _attr(node, "start", 0), _attr(node, "end", None)

        def dims(env):
            if isinstance(x, Row) and x.pooled:
                shape = (env.batch, x.width)
            elif isinstance(x, Row):
                seq = x.src.tokens if isinstance(x.src, PatchSrc) else env.seq
                shape = (env.batch * seq, x.width) if x.flat else (env.batch, seq, x.width)
            elif isinstance(x, (Heads, Patches)):
                shape = x.dims(env)
            elif isinstance(x, (Scores, Probs, ProbsNaN)):
                q = self._scores_of(x).q
                shape = q.with_(order=q.order[:-2] + ("S", "S")).dims(env)
            else:
                raise EvalError(f"Shape of {type(x).__name__}")
            return np.array(shape[start:end], dtype=np.int64)

        return Dyn(dims, label="Shape", node_key=self.key(node))

    @staticmethod
    def _scores_of(x) -> Scores:
        while not isinstance(x, Scores):
            x = x.probs if isinstance(x, ProbsNaN) else x.scores
        return x

    # ---- probing of Dyn values --------------------------------------------------------------
    def probe(self, dyn: Value, env: Env):
        try:
            return np.asarray(self.value_of(dyn, env))
        except EvalError as exc:
            raise Unsupported([], f"cannot evaluate a shape/index subgraph on probe feeds: {exc}") from None

    def scalar(self, v: Value) -> float | None:
        """A value that is the same scalar on every probe batch (a scale), or None."""
        if isinstance(v, Const):
            a = v.array
            return float(a.reshape(-1)[0]) if a.size == 1 else None
        if isinstance(v, Dyn):
            got = []
            for env in self.probe_envs:
                try:
                    a = np.asarray(self.value_of(v, env))
                except (EvalError, Unsupported):
                    return None
                if a.size != 1:
                    return None
                got.append(float(a.reshape(-1)[0]))
            return got[0] if all(abs(g - got[0]) <= 1e-7 * max(1.0, abs(got[0])) for g in got) else None
        return None

    def classify_index(self, idx: Dyn):
        """('word'|'token_type', None) / ('position', offset) / ('const', c) / None."""
        results = []
        for env in self.probe_envs:
            try:
                a = np.asarray(self.value_of(idx, env))
            except (EvalError, Unsupported):
                return None
            if a.dtype.kind not in "iub":
                return None
            try:
                a = np.broadcast_to(a, (env.batch, env.seq)).astype(np.int64)
            except ValueError:
                return None
            results.append((env, a))
        for role in ("input_ids", "token_type_ids"):
            if role in self.input_of_role and all(np.array_equal(a, env.inputs[role]) for env, a in results):
                return (role, None)
        offsets = {int(a[0, 0]) for _, a in results}
        if len(offsets) == 1:
            c = offsets.pop()
            if all(np.all(a == c) for _, a in results):
                return ("const", c)
            if all(np.array_equal(a, np.broadcast_to(np.arange(env.seq) + c, a.shape)) for env, a in results):
                return ("position", c)
        return None

    def verify_mask(self, bias_fn, masked_value_check) -> tuple[bool, bool]:
        """Probe an attention-mask subgraph on a right-padded batch; returns (padding mask?, causal mask?).

        Between valid tokens the bias must keep every key at or before the query; keys after it must be all kept
        (bidirectional) or all dropped (causal, GPT-2). Padded keys must be all dropped (padding mask) or all kept
        (no padding mask; edgeformer never attends to padding anyway)."""
        env = self.mask_env
        valid = env.inputs["attention_mask"].astype(bool)  # (B, S)
        try:
            m = bias_fn(env)
        except (EvalError, Unsupported) as exc:
            raise Unsupported([], f"cannot evaluate the attention mask subgraph: {exc}") from None
        m = np.asarray(m)
        if m.ndim > 4:
            raise Unsupported([], f"attention mask of rank {m.ndim}")
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        try:
            m = np.broadcast_to(m, (env.batch, m.shape[1], env.seq, env.seq))
        except ValueError:
            raise Unsupported([], f"attention mask of shape {m.shape} does not broadcast to (B, H, S, S)") from None
        q_valid = valid[:, None, :, None]
        k_valid = valid[:, None, None, :]
        later = (np.arange(env.seq)[None, :] > np.arange(env.seq)[:, None])[None, None]  # key after query
        keep = np.broadcast_to(q_valid & k_valid & ~later, m.shape)
        ahead = np.broadcast_to(q_valid & k_valid & later, m.shape)
        drop = np.broadcast_to(q_valid & ~k_valid, m.shape)
        kept_ok, dropped = masked_value_check(m)
        if not np.all(kept_ok[keep]):
            raise Unsupported([], "the attention bias changes scores between valid tokens (not a padding or causal "
                                  "mask; relative-position biases are not supported)")
        if np.all(dropped[ahead]) and np.any(ahead):
            causal = True
        elif np.all(kept_ok[ahead]):
            causal = False
        else:
            raise Unsupported([], "the attention bias masks some later keys only (neither bidirectional nor causal)")
        if np.all(dropped[drop]):
            return True, causal
        if not np.any(dropped[drop]):
            return False, causal
        raise Unsupported([], "the attention bias masks only some padded keys (not a padding mask)")

    # ---- embeddings --------------------------------------------------------------------------
    def embedding_gather(self, node, table, idx):
        if table.ndim != 2 or table.dtype.kind != "f" or (_attr(node, "axis", 0) != 0):
            return None
        kind = self.classify_index(idx)
        if kind is None:
            return None
        role, arg = kind
        table = np.ascontiguousarray(table, dtype=np.float32)
        if role == "input_ids":
            slots = {"word": table}
        elif role == "token_type_ids":
            slots = {"token_type": table}
        elif role == "position":
            if arg < 0:
                return None
            slots = {"position": (table, arg)}
        else:
            if not 0 <= arg < table.shape[0]:
                return None
            slots = {"const": table[arg].astype(np.float32)}
        return Row(EmbSrc(slots, table.shape[1], [self.key(node)]), nodes=[self.key(node)])

    # ---- row-wise ops ------------------------------------------------------------------------
    def row_local(self, node, ins):
        op = node.op_type
        rows = [v for v in ins if isinstance(v, Row)]
        if not rows or any(v is not None and not isinstance(v, (Row, Const)) for v in ins):
            raise Unsupported([], f"{op} mixes token tensors with {sorted({type(v).__name__ for v in ins if v})}")
        srcs = {id(r.src) for r in rows}
        if len(srcs) > 1:
            raise Unsupported([], f"{op} of two different token tensors")
        src = rows[0].src
        if op == "Cast" and _attr(node, "to") not in FLOAT_TYPES:
            raise Unsupported([], "Cast of a float tensor to a non-float type")
        if op in ("ReduceMean",):
            axes = _attr(node, "axes")
            if axes is None and len(ins) > 1 and isinstance(ins[1], Const):
                axes = ins[1].array.tolist()
            if list(np.atleast_1d(axes) if axes is not None else []) not in ([-1], [2]) or _attr(node, "keepdims", 1) != 1:
                raise Unsupported([], f"ReduceMean over axes {axes} (only the hidden axis, keepdims=1)")
        if op == "LayerNormalization" and _attr(node, "axis", -1) not in (-1, 2):
            raise Unsupported([], "LayerNormalization over other than the hidden axis")
        widths = []
        for v in ins:
            if isinstance(v, Row):
                widths.append(v.width)
            elif isinstance(v, Const) and op not in ("ReduceMean", "Clip", "Pow") and v.array.dtype.kind == "f":
                a = v.array
                if a.ndim > 3 or any(d != 1 for d in a.shape[:-1]):
                    raise Unsupported([], f"{op} with a constant of shape {list(a.shape)} (only per-channel "
                                          f"constants are row-wise)")
                widths.append(a.shape[-1] if a.ndim else 1)
        width = 1 if op == "ReduceMean" else max(widths)
        if op != "ReduceMean" and any(w not in (1, width) for w in widths):
            raise Unsupported([], f"{op} with incompatible widths {widths}")
        if op in ("Cast", "Identity", "Dropout"):  # float -> float: probes stay in float64
            return [Row(src, rows[0].fn, rows[0].width, rows[0].nodes + [self.key(node)], flat=rows[0].flat)] + \
                [None] * (len(node.output) - 1)
        # probes run in float64: float constants are promoted (onnx.reference insists on equal input types)
        fns = [None if v is None else (v.apply if isinstance(v, Row) else
                                       (lambda x, a=(v.array.astype(np.float64) if v.array.dtype.kind == "f"
                                                     else v.array): a)) for v in ins]
        ev = self.ev

        def fn(x):
            return ev.run(node, [None if f is None else f(x) for f in fns])[0]

        nodes = [k for r in rows for k in r.nodes] + [self.key(node)]
        return [Row(src, fn, width, nodes, flat=rows[0].flat)] + [None] * (len(node.output) - 1)

    def identify(self, row: Row):
        """('identity',) / ('act', name) / ('ln', gamma, beta, eps) / None."""
        w = row.src.width
        if row.width != w:
            return None
        x = np.random.default_rng(7).standard_normal((1, 24, w)) * 3.0
        try:
            y = row.apply(x)
        except EvalError:
            return None
        if _close(y, x):
            return ("identity",)
        for name, g in ACTIVATIONS.items():
            if _close(y, g(x)):
                return ("act", name)
        return self.fit_layer_norm(row, w)

    @staticmethod
    def fit_layer_norm(row, w):
        if w < 2:
            return None
        rng = np.random.default_rng(11)
        try:
            beta = np.asarray(row.apply(np.zeros((1, 1, w))), dtype=np.float64).reshape(-1)
            z = rng.standard_normal((1, 2, w))
            z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
            y1 = np.asarray(row.apply(z), dtype=np.float64)[0] - beta  # gamma * z / sqrt(1 + eps)
            eps = None
            for k in range(0, 10):
                s = 10.0 ** -k
                ys = np.asarray(row.apply(s * z), dtype=np.float64)[0] - beta
                r = float(np.sum(ys * y1) / max(np.sum(y1 * y1), 1e-300))
                if 0.05 < r < 0.97:
                    eps = s * s * (1 - r * r) / (r * r - s * s)
                    break
            if eps is None or not eps > 0:
                eps = 1e-12
            pick = np.argmax(np.abs(z[0]), axis=0)
            cols = np.arange(w)
            gamma = y1[pick, cols] / z[0][pick, cols] * math.sqrt(1 + eps)
            xs = rng.standard_normal((1, 6, w)) * np.array([1, 10, 0.1, 3, 1e-2, 50.0])[None, :, None] \
                + rng.standard_normal((1, 6, 1)) * 5
            want = _ln(xs, gamma, beta, eps)
            got = row.apply(xs)
        except (EvalError, FloatingPointError, ValueError):
            return None
        if not _close(got, want, tol=1e-4):
            return None
        return ("ln", gamma.astype(np.float32), beta.astype(np.float32), float(eps))

    # ---- data ops ----------------------------------------------------------------------------
    def as_plain(self, v, node) -> Row:
        """A Row without a pending function (materialize the function if needed)."""
        if not isinstance(v, Row):
            raise Unsupported([], f"{node.op_type}: expected a token tensor, got {type(v).__name__}")
        if v.fn is None:
            return v
        return Row(ValueSrc(self.materialize_row(v), v.width, pooled=v.pooled), nodes=v.nodes, flat=v.flat)

    def op_Identity(self, node, ins):
        return ins[0]

    def op_Dropout(self, node, ins):
        return [ins[0]] + [Bad([(self.key(node), "Dropout mask output")])] * (len(node.output) - 1)

    def op_Cast(self, node, ins):
        if isinstance(ins[0], Row):
            return None  # row-local (float to float)
        if isinstance(ins[0], (Heads, Scores, Probs)) and _attr(node, "to") in FLOAT_TYPES:
            return ins[0]
        return None

    def op_MatMul(self, node, ins):
        a, b = ins
        if isinstance(a, Row) and isinstance(b, Const):
            w = b.array
            if w.ndim != 2 or w.shape[0] != a.width or w.dtype.kind != "f":
                raise Unsupported([], f"MatMul of a width-{a.width} token tensor by a {list(w.shape)} constant")
            lin = LinearSrc(a, np.ascontiguousarray(w.T, dtype=np.float32), name=node.name or "linear",
                            nodes=[self.key(node)])
            return Row(lin, nodes=[self.key(node)], flat=a.flat)
        if isinstance(a, Heads) and isinstance(b, Heads):
            if a.letters == "BHSD" and b.letters == "BHDS" and a.order[:-2] == b.order[:-2] \
                    and a.order[-2:] == ("S", "D") and b.order[-2:] == ("D", "S") and a.heads == b.heads \
                    and a.head_dim == b.head_dim:
                return Scores(a, b)
            raise Unsupported([], f"MatMul of heads {a.order} x {b.order}")
        if isinstance(a, (Probs, ProbsNaN)) and isinstance(b, Heads):
            probs = a.probs if isinstance(a, ProbsNaN) else a
            return self.emit_attention(node, probs.scores, b)
        return None

    def op_Add(self, node, ins):
        a, b = ins
        if isinstance(b, Row) and not isinstance(a, Row):
            a, b = b, a
        if isinstance(a, Row) and isinstance(a.src, PatchSrc) and a.fn is None and isinstance(b, Const):
            return self.patch_add(node, a, b.array)
        if isinstance(a, Row) and isinstance(b, Row):
            if a.pooled != b.pooled:
                raise Unsupported([], "Add of a token tensor and a pooled (one row per item) tensor")
            if a.fn is None and b.fn is None and isinstance(a.src, EmbSrc) and isinstance(b.src, EmbSrc) \
                    and a.src is not b.src:
                if set(a.src.slots) & set(b.src.slots) - {"const"} or a.width != b.width:
                    raise Unsupported([], "two embedding lookups of the same kind")
                slots = {**a.src.slots, **b.src.slots}
                if "const" in a.src.slots and "const" in b.src.slots:
                    slots["const"] = a.src.slots["const"] + b.src.slots["const"]
                nodes = a.nodes + b.nodes + [self.key(node)]
                return Row(EmbSrc(slots, a.width, nodes), nodes=nodes)
            if a.src is b.src:
                return None  # row-local
            if a.width != b.width or a.flat != b.flat:
                raise Unsupported([], f"Add of token tensors of widths {a.width} and {b.width}")
            nodes = a.nodes + b.nodes + [self.key(node)]
            return Row(SumSrc(a, b, nodes), nodes=nodes, flat=a.flat)
        if isinstance(a, Row) and isinstance(b, Const):
            c = b.array
            vec = c.reshape(-1) if c.ndim <= 3 and all(d == 1 for d in c.shape[:-1]) and c.size == a.width else None
            if vec is not None and a.fn is None and c.dtype.kind == "f":
                if isinstance(a.src, LinearSrc) and a.src.plain:
                    bias = vec.astype(np.float32) if a.src.b is None else a.src.b + vec.astype(np.float32)
                    return Row(a.src.replace(b=bias, nodes=a.src.nodes + [self.key(node)]),
                               nodes=a.nodes + [self.key(node)], flat=a.flat)
                if isinstance(a.src, EmbSrc):
                    slots = dict(a.src.slots)
                    slots["const"] = slots.get("const", 0) + vec.astype(np.float32)
                    return Row(EmbSrc(slots, a.width, a.nodes), nodes=a.nodes + [self.key(node)])
            return None  # row-local
        if isinstance(b, Scores) or isinstance(a, Scores):
            scores, bias = (a, b) if isinstance(a, Scores) else (b, a)
            if isinstance(bias, (Dyn, Const)):
                masked, causal = self.verify_mask(lambda env: self.value_of(bias, env),
                                                  lambda m: (np.abs(m) <= 1e-6, m <= -1e4))
                return scores.with_(masked=scores.masked or masked, causal=scores.causal or causal)
        return None

    def _scale(self, node, ins, divide=False):
        a, b = ins
        if not divide and not isinstance(a, (Heads, Scores)):
            a, b = b, a
        if isinstance(a, (Heads, Scores)):
            c = self.scalar(b)
            if c is None or c == 0:
                raise Unsupported([], f"{node.op_type} of attention values by a non-scalar")
            return a.with_(scale=a.scale * (1.0 / c if divide else c))
        return None

    def op_Mul(self, node, ins):
        return self._scale(node, ins)

    def op_Div(self, node, ins):
        return self._scale(node, ins, divide=True)

    def op_Softmax(self, node, ins):
        if isinstance(ins[0], Scores):
            axis = _attr(node, "axis", -1 if self.opset >= 13 else 1)
            if axis not in (-1, 3):
                raise Unsupported([], f"Softmax over axis {axis} of attention scores")
            return Probs(ins[0])
        return None

    def op_IsNaN(self, node, ins):
        if isinstance(ins[0], Probs):
            return ProbsNaN(ins[0])
        return None

    def op_Where(self, node, ins):
        cond, x, y = ins
        if isinstance(cond, ProbsNaN) and isinstance(y, Probs) and cond.probs is y and isinstance(x, Const) \
                and np.all(x.array == 0):
            return y
        if isinstance(cond, (Dyn, Const)) and (isinstance(x, Scores) or isinstance(y, Scores)):
            scores, fill, scores_if_true = (x, y, True) if isinstance(x, Scores) else (y, x, False)
            if not isinstance(fill, (Dyn, Const)):
                return None

            def check(m):  # m = where(cond, 0, fill) as a bias: kept where the scores are taken
                return np.abs(m) <= 0, m <= -1e4

            def bias(env):
                c = np.asarray(self.value_of(cond, env)).astype(bool)
                f = np.asarray(self.value_of(fill, env), dtype=np.float64)
                return np.where(c, 0.0, f) if scores_if_true else np.where(c, f, 0.0)

            masked, causal = self.verify_mask(bias, check)
            return scores.with_(masked=scores.masked or masked, causal=scores.causal or causal)
        return None

    def _resolve_shape(self, node, target: Value, current_fn):
        """The Reshape target on each probe batch, with 0 and -1 resolved; list of (env, dims)."""
        out = []
        for env in self.probe_envs:
            t = [int(d) for d in self.probe(target, env).reshape(-1)]
            cur = current_fn(env)
            allow_zero = _attr(node, "allowzero", 0)
            t = [cur[i] if d == 0 and not allow_zero and i < len(cur) else d for i, d in enumerate(t)]
            if t.count(-1) == 1:
                known = int(np.prod([d for d in t if d != -1]))
                total = int(np.prod(cur))
                if known == 0 or total % known:
                    raise Unsupported([], f"Reshape target {t} does not fit {list(cur)}")
                t[t.index(-1)] = total // known
            out.append((env, t))
        return out

    def op_Reshape(self, node, ins):
        x, target = ins
        if isinstance(x, Patches):
            return self.patch_regroup(node, x, self._regroup(x, self._resolve_shape(node, target, x.dims)))
        if isinstance(x, Row) and x.pooled:
            shapes = self._resolve_shape(node, target, lambda env: (env.batch, x.width))
            if all(t == [env.batch, x.width] for env, t in shapes):
                return x
            raise Unsupported([], f"Reshape of a pooled (B, width) tensor to {[t for _, t in shapes]}")
        if isinstance(x, Row):
            row = self.as_plain(x, node)
            shapes = self._resolve_shape(node, target, lambda env: (env.batch * env.seq, row.width) if row.flat
                                         else (env.batch, env.seq, row.width))
            if all(t == [env.batch, env.seq, row.width] for env, t in shapes):
                return self._with_flat(row, False)
            if all(t == [env.batch * env.seq, row.width] for env, t in shapes):  # Conv1D / Linear on 2-D
                return self._with_flat(row, True)
            hd = {tuple(t[2:]) for _, t in shapes}
            if len(hd) == 1 and all(len(t) == 4 and t[:2] == [env.batch, env.seq] for env, t in shapes):
                heads, head_dim = hd.pop()
                if heads * head_dim == row.width:
                    return Heads(row, ("B", "S", "H", "D"), heads, head_dim)
            raise Unsupported([], f"Reshape of a token tensor to {[t for _, t in shapes]}")
        if isinstance(x, Heads):
            shapes = self._resolve_shape(node, target, x.dims)
            if all(tuple(t) == x.dims(env) for env, t in shapes):
                return x
            order = self._regroup(x, shapes)
            if order is None:
                raise Unsupported([], f"Reshape of heads {x.order} to {[t for _, t in shapes]}")
            if order in (("B", "S", "HD"), ("BS", "HD")):  # heads merged back into a token tensor
                if x.scale != 1.0:
                    raise Unsupported([], "scaled heads merged back into a token tensor")
                return self._with_flat(x.row, order == ("BS", "HD"))
            return x.with_(order=order)
        return None

    @staticmethod
    def _regroup(x: Heads, shapes):
        """The axis grouping of x's letters (memory order) that gives the Reshape target on every probe, or None."""
        letters = x.letters

        def groupings(rest, parts):
            if parts == 1:
                yield (rest,)
                return
            for cut in range(1, len(rest) - parts + 2):
                for tail in groupings(rest[cut:], parts - 1):
                    yield (rest[:cut],) + tail

        n = {len(t) for _, t in shapes}
        if len(n) != 1:
            return None
        n = n.pop()
        if not 1 <= n <= len(letters):
            return None
        for order in groupings(letters, n):
            if all(tuple(t) == x.with_(order=order).dims(env) for env, t in shapes):
                return order
        return None

    @staticmethod
    def _with_flat(row: Row, flat: bool) -> Row:
        if row.flat == flat:
            return row
        return Row(row.src, row.fn, row.width, row.nodes, flat=flat)

    def op_Gemm(self, node, ins):
        """Y = alpha A' B' + beta C with A a (B*S, K) token tensor, B and C constants (GPT-2's Conv1D)."""
        a, w, c = ins[0], ins[1], ins[2] if len(ins) > 2 else None
        if not isinstance(a, Row) or not isinstance(w, Const) or (c is not None and not isinstance(c, Const)):
            return None
        if _attr(node, "transA", 0):
            raise Unsupported([], "Gemm with transA of a token tensor")
        w = w.array
        if w.ndim != 2 or w.dtype.kind != "f":
            raise Unsupported([], f"Gemm by a {list(w.shape)} constant")
        w = w if _attr(node, "transB", 0) else w.T  # (N, K)
        if w.shape[1] != a.width:
            raise Unsupported([], f"Gemm of a width-{a.width} token tensor by a {list(ins[1].array.shape)} constant")
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        row = self.as_plain(a, node) if a.fn is not None else a
        lin = LinearSrc(row, np.ascontiguousarray(w * np.float32(alpha), dtype=np.float32), name=node.name or "linear",
                        nodes=[self.key(node)])
        if c is not None and beta != 0.0:
            cv = c.array
            if cv.size not in (1, lin.width) or (cv.ndim == 2 and cv.shape[0] != 1) or cv.ndim > 2:
                raise Unsupported([], f"Gemm bias of shape {list(cv.shape)} (only per-column biases)")
            lin = lin.replace(b=np.ascontiguousarray(np.broadcast_to(cv.reshape(-1) * beta, (lin.width,)), np.float32))
        return Row(lin, nodes=[self.key(node)], flat=a.flat)

    def op_Split(self, node, ins):
        """Split of a fused projection along the hidden axis (GPT-2's c_attn into Q, K, V): one linear each."""
        x = ins[0]
        if not isinstance(x, Row):
            return None
        axis = _attr(node, "axis", 0)
        if axis not in (-1, 1 if x.flat else 2):
            raise Unsupported([], f"Split of a token tensor along axis {axis} (only the hidden axis)")
        n = len(node.output)
        sizes = _attr(node, "split")
        if sizes is None and len(ins) > 1 and ins[1] is not None:
            if not isinstance(ins[1], Const):
                raise Unsupported([], "Split sizes are not constant")
            sizes = ins[1].array.reshape(-1).tolist()
        if sizes is None:
            if x.width % n:
                if _attr(node, "num_outputs") is None:
                    raise Unsupported([], f"Split of width {x.width} into {n} equal parts")
                part = -(-x.width // n)
                sizes = [part] * (n - 1) + [x.width - part * (n - 1)]
            else:
                sizes = [x.width // n] * n
        sizes = [int(v) for v in sizes]
        if len(sizes) != n or sum(sizes) != x.width or min(sizes) < 0:
            raise Unsupported([], f"Split sizes {sizes} of a width-{x.width} token tensor")
        return self._column_slices(node, x, np.cumsum([0] + sizes))

    def _column_slices(self, node, x: Row, bounds):
        if x.fn is not None or not isinstance(x.src, LinearSrc) or not x.src.plain:
            raise Unsupported([], f"{node.op_type} of a token tensor that is not a plain linear projection")
        lin, outs = x.src, []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = lin.replace(w=lin.w[start:stop], b=None if lin.b is None else lin.b[start:stop],
                               nodes=lin.nodes + [self.key(node)])
            part.name = f"{lin.name}.{start}_{stop}"
            outs.append(Row(part, nodes=x.nodes + [self.key(node)], flat=x.flat))
        return outs

    def op_Transpose(self, node, ins):
        x = ins[0]
        if isinstance(x, Patches):
            perm = _attr(node, "perm", list(range(len(x.order) - 1, -1, -1)))
            if sorted(perm) != list(range(len(x.order))):
                raise Unsupported([], f"Transpose of patches {x.order} by {list(perm)}")
            return self.patch_regroup(node, x, tuple(x.order[p] for p in perm))
        if isinstance(x, Heads):
            perm = _attr(node, "perm", list(range(len(x.order) - 1, -1, -1)))
            if sorted(perm) != list(range(len(x.order))):
                raise Unsupported([], f"Transpose of heads {x.order} by {list(perm)}")
            return x.with_(order=tuple(x.order[p] for p in perm))
        return None

    # ---- attention ----------------------------------------------------------------------------
    def _projection(self, heads: Heads, what: str) -> LinearSrc:
        row = heads.row
        if row.fn is not None or not isinstance(row.src, LinearSrc) or not row.src.plain:
            raise Unsupported([], f"attention {what} is not a plain linear projection")
        return row.src

    def emit_attention(self, node, scores: Scores, v: Heads):
        q, k = scores.q, scores.k
        if v.letters != "BHSD" or v.order[-2:] != ("S", "D") or v.order[:-2] != q.order[:-2] \
                or v.heads != q.heads or v.head_dim != q.head_dim:
            raise Unsupported([], f"attention values of layout {v.order}")
        lq, lk, lv = (self._projection(h, n) for h, n in ((q, "query"), (k, "key"), (v, "value")))
        xq, xk, xv = lq.x, lk.x, lv.x
        if not (self._same_row(xq, xk) and self._same_row(xq, xv)):
            raise Unsupported([], "query, key and value are projections of different tensors (cross attention)")
        width = q.heads * q.head_dim
        if lk.width != width or lv.width != width:
            raise Unsupported([], "query, key and value projections of different widths")
        vw, vb = lv.w, lv.b
        if v.scale != 1.0:
            vw = vw * np.float32(v.scale)
            vb = None if vb is None else vb * np.float32(v.scale)
        w = np.concatenate([lq.w, lk.w, vw])
        biases = [lq.b, lk.b, vb]
        b = None if all(x is None for x in biases) else np.concatenate(
            [np.zeros(width, np.float32) if x is None else x for x in biases])
        qkv = LinearSrc(xq, w, b, name=(lq.name or "attention") + ".qkv")
        qkv_value = self.materialize_src(qkv)
        scale = scores.scale * q.scale * k.scale
        if not scores.masked and not scores.causal and self.pixels is None:  # images have no padding
            self.warnings.append(f"attention at {node.name!r} applies no padding mask in the ONNX graph; edgeformer "
                                 "always attends to the valid tokens only (same result without padding)")
        attrs = {"kind": "softmax", "num_heads": q.heads, "head_dim": q.head_dim, "scale": float(scale)}
        if scores.causal:
            attrs["causal"] = True
        out = self.builder.add("attention", self.unique((node.name or "attention") + ".attention"), [qkv_value],
                               attrs=attrs)
        return Heads(Row(ValueSrc(out, width)), v.order, q.heads, q.head_dim)

    @staticmethod
    def _same_row(a: Row, b: Row) -> bool:
        return a is b or (a.src is b.src and a.fn is None and b.fn is None)

    # ---- ViT ------------------------------------------------------------------------------------
    # pixel_values is a Dyn (its Shape subgraphs fold on random probe images); its one Conv with kernel = stride
    # becomes Patches (B, d, Hp, Wp), regrouped by Reshape / Transpose into the token Row (B, Hp*Wp, d) of a
    # PatchSrc; a Concat of a constant row in front adds the class token, an Add of a constant (P', d) table the
    # positions. Gather of token 0 along the sequence axis gives a pooled Row (B, d) (classifier, pooler).
    def _pixel_input(self, model, consts):
        """(C, H, W) of the graph's pixel input (the pixel_values role), or None for text models.

        Symbolic dims (Optimum declares (batch_size, num_channels, height, width)) are inferred: C from the kernel
        of the Conv reading the pixels; H, W from the position table (1, P', d) — the one dim given, or a square
        grid of patches (as HF ViT's own position interpolation assumes). The converted model then takes images
        of exactly that size."""
        name = next((n for n, r in self.role_of_input.items() if r == "pixel_values"), None)
        if name is None:
            return None
        spec = next(i for i in model.graph.input if i.name == name)
        fixed = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in spec.type.tensor_type.shape.dim[1:]]
        if None not in fixed:
            return tuple(fixed)
        conv = next((n for n in model.graph.node if n.op_type == "Conv" and n.input and n.input[0] == name), None)
        kernel = consts.get(conv.input[1]) if conv is not None and len(conv.input) > 1 else None
        if kernel is None or kernel.ndim != 4:
            raise OnnxFormatError(f"pixel input {name!r} has symbolic dims {fixed} and no constant patch Conv reads "
                                  f"it; export with a fixed image size")
        d, channels, ph, pw = (int(v) for v in kernel.shape)
        c, height, width = fixed
        tables = {a.shape[1] for a in consts.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == d
                  and a.shape[1] >= 2 and a.dtype.kind == "f"}  # (1, P', d) position tables
        has_cls = any(a.shape == (1, 1, d) and a.dtype.kind == "f" for a in consts.values())
        grid = None
        if len(tables) == 1:
            patches = tables.pop() - has_cls
            if height is not None and height >= ph and patches % (height // ph) == 0:
                grid = (height // ph, patches // (height // ph))
            elif width is not None and width >= pw and patches % (width // pw) == 0:
                grid = (patches // (width // pw), width // pw)
            elif height is None and width is None and math.isqrt(patches) ** 2 == patches:
                grid = (math.isqrt(patches),) * 2
        if grid is None:
            raise OnnxFormatError(f"pixel input {name!r} has symbolic dims {fixed}: the image size cannot be "
                                  f"inferred from the patch Conv and the position table; export with a fixed size")
        size = (c or channels, height or grid[0] * ph, width or grid[1] * pw)
        self.warnings.append(f"pixel input {name!r} declares dims {fixed}; the converted model takes images of "
                             f"{list(size)} ({grid[0]}x{grid[1]} patches of {ph}x{pw})")
        return size

    def _pixel_env(self, batch, rng) -> Env:
        images = rng.standard_normal((batch,) + self.pixels).astype(np.float32)  # (B, C, H, W)
        return Env(batch, None, {"pixel_values": images})

    def _set_tokens(self, tokens: int) -> None:
        """Tokens per image, once known: the probes' S, and an all-valid mask for verify_mask (no padding)."""
        for env in self.probe_envs + [self.mask_env]:
            env.seq = tokens
            env.inputs["attention_mask"] = np.ones((env.batch, tokens), dtype=np.int64)
            env.cache.clear()

    def patch_conv(self, node, ins):
        """Conv(pixels, W (d, C, ph, pw), b) with stride = kernel, no padding / dilation / groups -> Patches."""
        w = ins[1]
        b = ins[2] if len(ins) > 2 else None
        if not isinstance(w, Const) or w.array.ndim != 4 or w.array.dtype.kind != "f" or \
                (b is not None and not (isinstance(b, Const) and b.array.size == w.array.shape[0])):
            raise Unsupported([], "Conv of the pixel input by a non-constant or non-2-D kernel")
        d, channels, ph, pw = (int(v) for v in w.array.shape)
        kernel = [int(v) for v in _attr(node, "kernel_shape", [ph, pw])]
        strides = [int(v) for v in _attr(node, "strides", [1, 1])]
        pads = [int(v) for v in _attr(node, "pads", [0, 0, 0, 0])]
        dilations = [int(v) for v in _attr(node, "dilations", [1, 1])]
        auto_pad = _attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if kernel != [ph, pw] or strides != kernel or any(pads) or dilations != [1, 1] or \
                _attr(node, "group", 1) != 1 or auto_pad not in ("NOTSET", "VALID"):
            raise Unsupported([], f"Conv of the pixel input with kernel {kernel}, strides {strides}, pads {pads}, "
                                  f"dilations {dilations}, auto_pad {auto_pad} (only patch embeddings: stride = "
                                  f"kernel, no padding, dilation or groups)")
        c, height, width = self.pixels
        if channels != c or height < ph or width < pw:
            raise Unsupported([], f"Conv kernel {list(w.array.shape)} does not fit the pixel input {list(self.pixels)}")
        bias = None if b is None else np.ascontiguousarray(b.array.reshape(-1), np.float32)
        src = PatchSrc(np.ascontiguousarray(w.array, np.float32), bias, (height // ph, width // pw),
                       nodes=[self.key(node)])
        return Patches(src, nodes=[self.key(node)])

    def patch_regroup(self, node, x: Patches, order):
        """Patches with a new axis order; the token Row once it reads (B, Hp*Wp, d)."""
        if order is None:
            raise Unsupported([], f"{node.op_type} of patches {x.order} to other than (batch, channels, patches) "
                                  f"/ (batch, patches, channels)")
        if tuple(order) == ("B", "YX", "C"):
            self._set_tokens(x.src.tokens)
            return Row(x.src, nodes=x.nodes + [self.key(node)])
        return Patches(x.src, order, x.nodes + [self.key(node)])

    def op_Concat(self, node, ins):
        """ViT: Concat([cls (B, 1, d) identical rows, patch tokens], axis=1) -> the class token in front."""
        if len(ins) != 2 or not isinstance(ins[1], Row) or not isinstance(ins[1].src, PatchSrc):
            return None
        row, cls = ins[1], ins[0]
        if _attr(node, "axis") not in (1, -2) or row.fn is not None or row.src.cls is not None \
                or row.src.position is not None or not isinstance(cls, (Const, Dyn)):
            raise Unsupported([], "Concat of patch tokens other than one class token in front")
        first = None
        for env in self.probe_envs:
            a = np.asarray(self.value_of(cls, env), dtype=np.float64)
            if a.ndim != 3 or a.shape[1:] != (1, row.width) or a.shape[0] not in (1, env.batch) or \
                    not np.all(a == a[:1]) or (first is not None and not np.array_equal(a[0, 0], first)):
                raise Unsupported([], f"Concat of patch tokens with a {list(a.shape)} tensor that is not one constant "
                                      f"class token per image")
            first = a[0, 0]
        src = row.src.replace(cls=first.astype(np.float32), nodes=row.src.nodes + [self.key(node)])
        self._set_tokens(src.tokens)
        return Row(src, nodes=row.nodes + [self.key(node)])

    def patch_add(self, node, row: Row, c):
        """Patch tokens + a constant: a (P', d) position table, or a per-channel vector, folded into the positions."""
        tokens, d = row.src.tokens, row.width
        c = np.asarray(c)
        while c.ndim > 2 and c.shape[0] == 1:
            c = c[0]
        try:
            if c.dtype.kind != "f" or c.ndim > 2:
                raise ValueError
            table = np.broadcast_to(c.astype(np.float32), (tokens, d))  # (P', d)
        except ValueError:
            raise Unsupported([], f"Add of a {list(np.shape(c))} constant to {tokens} patch tokens of width {d}") \
                from None
        position = table if row.src.position is None else row.src.position + table
        src = row.src.replace(position=np.ascontiguousarray(position), nodes=row.src.nodes + [self.key(node)])
        return Row(src, nodes=row.nodes + [self.key(node)])

    def op_Gather(self, node, ins):
        """ViT: hidden[:, 0] (Gather of index 0 along the sequence axis) -> one row per image (the CLS token)."""
        x, index = ins
        if not isinstance(x, Row) or self.pixels is None:
            return None
        if x.flat or x.pooled or _attr(node, "axis", 0) not in (1, -2) or not isinstance(index, Const) \
                or index.array.size != 1 or index.array.ndim != 0 or int(index.array) != 0:
            raise Unsupported([], "Gather from token tensors other than the first token (hidden[:, 0])")
        src = PoolSrc(self.as_plain(x, node), nodes=[self.key(node)])
        return Row(src, nodes=x.nodes + [self.key(node)])

    def emit_patch_embedding(self, src: PatchSrc) -> str:
        from converters.bert import packed_linear

        d, c, ph, pw = src.kernel.shape
        name = self.unique(src.nodes[0][0] if src.nodes else "patch_embedding")
        weights, attrs = self._packed(packed_linear, name, src.kernel.reshape(d, c * ph * pw), src.bias)
        if src.cls is not None:
            weights["cls"] = self.store(f"{name}.cls", src.cls)
        if src.position is not None:
            weights["position"] = self.store(f"{name}.position", src.position)
        attrs["patch_size"] = [int(ph), int(pw)]
        self.vision_tokens = src.tokens
        self.used_roles.add("pixel_values")
        return self.builder.add("patch_embedding", name, ["pixel_values"], weights, attrs)

    def declare_pixel_input(self, builder) -> None:
        """The graph input of a ViT: dense float32 (batch, C, H, W), tokens_per_item from the patch embedding."""
        builder.input("pixel_values", dtype="float32", shape=("batch",) + self.pixels, kind="dense",
                      tokens_per_item=self.vision_tokens)

    # ---- ORT contrib ops ------------------------------------------------------------------------
    def _row_fn(self, node, x: Row, fn, width=None):
        return Row(x.src, (lambda z, f=x.apply: fn(f(z))), width or x.width, x.nodes + [self.key(node)], flat=x.flat)

    def _add_bias(self, node, x, bias):
        if bias is None:
            return x
        if not isinstance(bias, Const):
            raise Unsupported([], f"{node.op_type} bias is not a constant")
        return self.op_Add(node, [x, bias]) or self.row_add(node, x, bias.array)

    def row_add(self, node, x: Row, c):
        c = np.asarray(c)
        return self._row_fn(node, x, lambda z: z + c)

    def ms_Gelu(self, node, ins):
        x = ins[0]
        if not isinstance(x, Row):
            raise Unsupported([], "Gelu of a non-token tensor")
        return self._row_fn(node, x, gelu)

    def ms_BiasGelu(self, node, ins):
        x = self._add_bias(node, ins[0], ins[1])
        return self._row_fn(node, x, gelu)

    def ms_FastGelu(self, node, ins):
        x = self._add_bias(node, ins[0], ins[1] if len(ins) > 1 else None)
        return self._row_fn(node, x, gelu_tanh)

    def ms_LayerNormalization(self, node, ins):
        return self.row_local(node, ins)

    def ms_SkipLayerNormalization(self, node, ins):
        get = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
        x, skip, gamma, beta, bias = ins[0], ins[1], ins[2], get(3), get(4)
        if not (isinstance(x, Row) and isinstance(skip, Row) and isinstance(gamma, Const)
                and (beta is None or isinstance(beta, Const))):
            raise Unsupported([], "SkipLayerNormalization inputs are not token tensors and constants")
        x = self._add_bias(node, x, bias)
        s = self.op_Add(node, [x, skip])
        if s is None:  # same source: a row-local sum
            s = self._row_fn(node, x, lambda z, f=skip.apply: z + f(z))
        eps = float(_attr(node, "epsilon", 1e-12))
        g, bt = gamma.array.astype(np.float64), None if beta is None else beta.array.astype(np.float64)
        out = self._row_fn(node, s, lambda z: _ln(z, g, bt, eps))
        bad = Bad([(self.key(node), "SkipLayerNormalization mean / inv_std outputs")])
        return [out, bad, bad, s]

    def ms_EmbedLayerNormalization(self, node, ins):
        get = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
        ids, seg, word, pos, seg_table, gamma, beta, mask, pos_ids = (get(i) for i in range(9))
        if not all(isinstance(t, Const) for t in (word, pos, gamma, beta)) or \
                (seg is not None and not isinstance(seg_table, Const)):
            raise Unsupported([], "EmbedLayerNormalization tables are not constants")
        key = self.key(node)
        slots = {}
        for value, table, want in ((ids, word, "input_ids"), (seg, seg_table, "token_type_ids")):
            if value is None:
                continue
            kind = self.classify_index(value) if isinstance(value, Dyn) else None
            if kind is None or kind[0] != want:
                raise Unsupported([], f"EmbedLayerNormalization input is not the graph's {want}")
            slots["word" if want == "input_ids" else "token_type"] = np.ascontiguousarray(table.array, np.float32)
        offset = 0
        if pos_ids is not None:
            kind = self.classify_index(pos_ids) if isinstance(pos_ids, Dyn) else None
            if kind is None or kind[0] != "position":
                raise Unsupported([], "EmbedLayerNormalization position_ids are not arange(S) + offset")
            offset = kind[1]
        slots["position"] = (np.ascontiguousarray(pos.array, np.float32), offset)
        emb = Row(EmbSrc(slots, word.array.shape[1], [key]), nodes=[key])
        eps = float(_attr(node, "epsilon", 1e-12))
        g, b = gamma.array.astype(np.float64), beta.array.astype(np.float64)
        out = self._row_fn(node, emb, lambda z: _ln(z, g, b, eps))
        if mask is not None:
            mask_index = Dyn(lambda env: (np.asarray(self.value_of(mask, env)) != 0).sum(axis=1).astype(np.int32),
                             label="mask_index", node_key=key)
        else:
            mask_index = Bad([(key, "EmbedLayerNormalization without a mask input")])
        return [out, mask_index, emb]

    def ms_Attention(self, node, ins):
        get = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
        x, w, b, mask = get(0), get(1), get(2), get(3)
        if any(get(i) is not None for i in range(4, 8)):
            raise Unsupported([], "Attention with past state, attention bias or past length")
        if not isinstance(x, Row) or not isinstance(w, Const) or (b is not None and not isinstance(b, Const)):
            raise Unsupported([], "Attention inputs are not a token tensor and constant weights")
        heads = int(_attr(node, "num_heads"))
        sizes = _attr(node, "qkv_hidden_sizes")
        total = w.array.shape[1]
        if sizes is not None and len(set(sizes)) != 1:
            raise Unsupported([], f"Attention with qkv_hidden_sizes {list(sizes)}")
        width = total // 3
        if total % 3 or width % heads or w.array.shape[0] != x.width:
            raise Unsupported([], f"Attention weights of shape {list(w.array.shape)} with {heads} heads")
        if _attr(node, "do_rotary", 0) or _attr(node, "past_present_share_buffer", 0):
            raise Unsupported([], "Attention with rotary embeddings or shared past buffers")
        head_dim = width // heads
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        causal = bool(_attr(node, "unidirectional", 0))
        if mask is not None:
            self.verify_mask_index(mask)
        elif not causal:
            self.warnings.append(f"Attention {node.name!r} has no mask_index input")
        x = self.as_plain(x, node)
        lin = LinearSrc(x, np.ascontiguousarray(w.array.T, dtype=np.float32),
                        None if b is None else b.array.astype(np.float32), name=(node.name or "attention") + ".qkv")
        qkv_value = self.materialize_src(lin)
        attrs = {"kind": "softmax", "num_heads": heads, "head_dim": head_dim, "scale": scale}
        if causal:
            attrs["causal"] = True
        out = self.builder.add("attention", self.unique(node.name or "attention"), [qkv_value], attrs=attrs)
        return [Row(ValueSrc(out, width), nodes=[self.key(node)])] + [None] * (len(node.output) - 1)

    def ms_MultiHeadAttention(self, node, ins):
        """Self-attention with separate Q, K, V projections of one token tensor (ORT optimizer's MHA fusion).

        Supported: optional packed bias (3*hidden), key_padding_mask as key lengths (B,), a (B, L) padding mask or a
        (B, S, L) mask (padding and/or causal), attention_bias verified like an exported mask bias, unidirectional.
        Not supported: packed QKV (query (B, S, N, 3, H)), BNSH key/value (cross attention), past/present state."""
        get = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
        q, k, v, bias, padding, attn_bias = (get(i) for i in range(6))
        if any(get(i) is not None for i in range(6, len(ins))):
            raise Unsupported([], "MultiHeadAttention with past key/value state")
        if k is None or v is None:
            raise Unsupported([], "MultiHeadAttention with packed QKV (query of shape (B, S, N, 3, H))")
        if not all(isinstance(t, Row) for t in (q, k, v)):
            raise Unsupported([], "MultiHeadAttention key/value are not token tensors (BNSH key/value or cross "
                                  "attention)")
        heads = int(_attr(node, "num_heads", 0))
        width = q.width
        if heads < 1 or width % heads or k.width != width or v.width != width:
            raise Unsupported([], f"MultiHeadAttention of widths {q.width}/{k.width}/{v.width} with {heads} heads")
        head_dim = width // heads
        rows = [q, k, v]
        if bias is not None:
            if not isinstance(bias, Const) or bias.array.size != 3 * width:
                raise Unsupported([], "MultiHeadAttention bias is not a constant of size 3 * hidden")
            b = bias.array.reshape(-1).astype(np.float32)
            rows = [self.op_Add(node, [r, Const(b[i * width:(i + 1) * width])]) or
                    self.row_add(node, r, b[i * width:(i + 1) * width]) for i, r in enumerate(rows)]
        masked = causal = False
        check = lambda m: (np.abs(m) <= 1e-6, m <= -1e4)  # noqa: E731
        if padding is not None:
            m = np.asarray(self.probe(padding, self.mask_env))
            if m.ndim == 3:  # (B, S, L): 1 = attend
                masked, causal = self.verify_mask(
                    lambda env: np.where(np.asarray(self.value_of(padding, env))[:, None] != 0, 0.0, -1e9), check)
            else:
                self.verify_mask_index(padding)
                masked = True
        if attn_bias is not None:
            if not isinstance(attn_bias, (Const, Dyn)):
                raise Unsupported([], "MultiHeadAttention attention_bias is not a mask")
            bias_masked, bias_causal = self.verify_mask(lambda env: self.value_of(attn_bias, env), check)
            masked, causal = masked or bias_masked, causal or bias_causal
        causal = causal or bool(_attr(node, "unidirectional", 0))
        scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(head_dim)
        qh, kh, vh = (Heads(r, ("B", "H", "S", "D"), heads, head_dim) for r in rows)
        scores = Scores(qh, kh.with_(order=("B", "H", "D", "S")), scale=scale, masked=masked, causal=causal)
        out = self.emit_attention(node, scores, vh).row
        out.nodes = [self.key(node)]
        present = Bad([(self.key(node), "MultiHeadAttention present key/value outputs")])
        return [out] + [present] * (len(node.output) - 1)

    def verify_mask_index(self, mask):
        env = self.mask_env
        m = np.asarray(self.probe(mask, env))
        valid = env.inputs["attention_mask"]
        if m.shape == (env.batch,) and np.array_equal(m, valid.sum(axis=1)):
            return
        if m.shape == valid.shape and np.array_equal(m != 0, valid != 0):
            return
        raise Unsupported([], f"Attention mask_index of shape {list(m.shape)} is not the padding mask")

    # ---- materialization ---------------------------------------------------------------------
    def materialize_row(self, row: Row) -> str:
        if getattr(row, "_value", None) is not None:
            return row._value
        if row.fn is None:
            value = self.materialize_src(row.src)
        else:
            kind = self.identify(row)
            if kind is None:
                raise _fail(row.nodes[-12:], "row-wise subgraph is not identity, GELU (erf/tanh), ReLU or "
                                             "layer normalization")
            src = row.src
            label = row.nodes[-1][0] if row.nodes else "node"
            if kind[0] == "identity":
                value = self.materialize_src(src)
            elif kind[0] == "act":
                if isinstance(src, LinearSrc) and src.plain and kind[1] in EPILOGUE_ACTIVATIONS:
                    value = self.materialize_src(src.replace(act=kind[1]))
                else:
                    value = self.builder.add("activation", self.unique(label), [self.materialize_src(src)],
                                             attrs={"function": kind[1]})
            else:
                _, gamma, beta, eps = kind
                name = self.unique(label)
                if isinstance(src, SumSrc):
                    fused = src.value is not None or self.fuse_residual(src.a, src.b) or \
                        self.fuse_residual(src.b, src.a)
                    # materialize_src records the fused linear as the sum's value: a pre-LN block (GPT-2) reads
                    # the sum again as the next residual, which must not recompute the linear
                    inputs = [self.materialize_src(src)] if fused else [self.materialize_row(src.a),
                                                                        self.materialize_row(src.b)]
                else:
                    inputs = [self.materialize_src(src)]
                weights = {"gamma": self.store(f"{name}.gamma", gamma), "beta": self.store(f"{name}.beta", beta)}
                value = self.builder.add("layer_norm", name, inputs, weights, {"eps": eps})
        row._value = value
        return value

    @staticmethod
    def fuse_residual(a: Row, other: Row):
        if a.fn is None and isinstance(a.src, LinearSrc) and a.src.plain and a.src.value is None:
            return a.src.replace(res=other)
        return None

    def materialize_src(self, src: Src) -> str:
        if src.value is not None:
            return src.value
        if isinstance(src, LinearSrc):
            from converters.bert import packed_linear

            x = self.materialize_row(src.x)
            inputs = [x] + ([self.materialize_row(src.res)] if src.res is not None else [])
            name = self.unique(src.name)
            weights, attrs = self._packed(packed_linear, name, src.w, src.b)
            if src.act:
                attrs["activation"] = src.act
            src.value = self.builder.add("linear", name, inputs, weights, attrs)
        elif isinstance(src, SumSrc):
            fused = self.fuse_residual(src.a, src.b) or self.fuse_residual(src.b, src.a)
            if fused is None:
                raise _fail(src.nodes, "a residual Add that is neither fused into a linear nor followed by a "
                                             "layer norm")
            src.value = self.materialize_src(fused)
        elif isinstance(src, EmbSrc):
            src.value = self.emit_embedding(src)
        elif isinstance(src, PatchSrc):
            src.value = self.emit_patch_embedding(src)
        elif isinstance(src, PoolSrc):
            src.value = self.builder.add("pool", self.unique(src.nodes[-1][0] if src.nodes else "pool_cls"),
                                         [self.materialize_row(src.x)], attrs={"mode": "cls"})
        else:
            raise Unsupported([], f"cannot materialize {type(src).__name__}")
        return src.value

    def emit_embedding(self, src: EmbSrc) -> str:
        slots = dict(src.slots)
        if "word" not in slots:
            raise _fail(src.nodes, "embedding sum without a word (input_ids) lookup")
        word = slots["word"]
        inputs, weights, attrs = ["input_ids"], {}, {}
        self.used_roles.add("input_ids")
        const = slots.get("const")
        name = self.unique(src.nodes[0][0] if src.nodes else "embeddings")
        if "position" in slots:
            table, offset = slots["position"]
            if const is not None:
                table, const = table + const[None, :], None
            weights["position"] = self.store(f"{name}.position", table)
            if offset:
                attrs["position_offset"] = int(offset)
        if const is not None:
            word = word + const[None, :]
        weights["word"] = self.store(f"{name}.word", word)
        if "token_type" in slots:
            inputs.append("token_type_ids")
            self.used_roles.add("token_type_ids")
            weights["token_type"] = self.store(f"{name}.token_type", slots["token_type"])
        return self.builder.add("embedding", name, inputs, weights, attrs)

    # ---- tensors -------------------------------------------------------------------------------
    def store(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        import hashlib

        key = (array.shape, hashlib.sha1(array.tobytes()).hexdigest())
        if key in self._hashes:
            return self._hashes[key]
        self.tensors[name] = array
        self._hashes[key] = name
        return name

    def _packed(self, packed_linear, name, w, b):
        import hashlib

        key = ("linear", w.shape, hashlib.sha1(w.tobytes()).hexdigest(),
               None if b is None else hashlib.sha1(np.ascontiguousarray(b, np.float32).tobytes()).hexdigest())
        if key in self._hashes:
            return dict(self._hashes[key][0]), dict(self._hashes[key][1])
        tensors: dict = {}
        weights, attrs = packed_linear(tensors, name, np.ascontiguousarray(w, np.float32),
                                       None if b is None else np.ascontiguousarray(b, np.float32))
        self.tensors.update(tensors)
        self._hashes[key] = (weights, attrs)
        return dict(weights), dict(attrs)
