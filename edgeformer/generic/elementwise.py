"""Element-wise generic ops: unary maths, binary arithmetic and comparisons with NumPy (multidirectional)
broadcasting, variadic Min/Max/Sum/Mean, Where, Clip, Cast, CastLike, Dropout (inference).

Float ops compute in float32 (NumPy's float32 loops; erf and the logistic function from scipy.special, imported
on first use, keep float32). Integer Div truncates toward zero and Mod follows ONNX's ``fmod`` attribute; an integer division
by zero is an InputError (ONNX leaves it undefined).
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import InputError
from edgeformer.generic.base import ANY, DTYPES, FLOAT, NUMERIC, broadcast, scalar
from edgeformer.generic.registry import register

def _erf(x):
    from scipy.special import erf  # imported on first use: scipy.special costs ~0.15 s at `import edgeformer`

    return erf(x)


def _expit(x):
    from scipy.special import expit  # 1 / (1 + exp(-x)) without overflow warnings, float32 kept

    return expit(x)


_SQRT_HALF = np.float32(np.sqrt(0.5))
_TANH_C = np.float32(np.sqrt(2.0 / np.pi))


def _same(dtype):
    return lambda x: dtype


# -- unary ------------------------------------------------------------------------------------------------------
def _gelu(x, approximate):
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(_TANH_C * (x + np.float32(0.044715) * x * x * x)))
    return np.float32(0.5) * x * (np.float32(1) + _erf(x * _SQRT_HALF))  # x Phi(x)


_FLOAT_UNARY = {
    "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Tanh": np.tanh,
    "Sigmoid": _expit, "Erf": _erf, "Floor": np.floor, "Ceil": np.ceil, "Sin": np.sin,
    "Cos": np.cos, "Round": np.round,  # np.round: halves to even, as ONNX Round
    "Softplus": lambda x: np.logaddexp(np.float32(0), x),
}
_NUMERIC_UNARY = {"Abs": np.abs, "Neg": np.negative, "Sign": np.sign, "Relu": lambda x: np.maximum(x, x.dtype.type(0))}


def _unary(name, fn, allowed, out=None, attributes=(), since=None, params=lambda spec: {}):
    def check(spec):
        dtype = spec.dtype(0, allowed)
        return params(spec), [out or dtype]

    def run(inputs, p):
        return [fn(inputs[0], **p)]

    kwargs = {"since": since} if since else {}
    register(name, check, run, attributes=attributes, **kwargs)


_SINCE = {"Exp": 6, "Log": 6, "Sqrt": 6, "Reciprocal": 6, "Tanh": 6, "Sigmoid": 6, "Floor": 6, "Ceil": 6, "Sin": 7,
          "Cos": 7, "Erf": 9, "Abs": 6, "Neg": 6, "Relu": 6, "Sign": 9, "Not": 1, "Identity": 1}  # unchanged since
for _name, _fn in _FLOAT_UNARY.items():
    _unary(_name, _fn, FLOAT, since=_SINCE.get(_name))
for _name, _fn in _NUMERIC_UNARY.items():
    _unary(_name, _fn, NUMERIC, since=_SINCE.get(_name))
_unary("Identity", lambda x: x, ANY, since=1)
_unary("Not", np.logical_not, {"bool"}, since=1)
_unary("IsNaN", np.isnan, FLOAT, out="bool")
_unary("IsInf", lambda x, neg, pos: (np.isneginf(x) & neg) | (np.isposinf(x) & pos), FLOAT, out="bool",
       attributes=("detect_negative", "detect_positive"),
       params=lambda s: {"neg": s.flag("detect_negative", 1), "pos": s.flag("detect_positive", 1)})
_unary("LeakyRelu", lambda x, alpha: np.where(x < 0, np.float32(alpha) * x, x), FLOAT, attributes=("alpha",),
       params=lambda s: {"alpha": s.float("alpha", 0.01)})
_unary("Gelu", _gelu, FLOAT, attributes=("approximate",), since=20,
       params=lambda s: {"approximate": s.string("approximate", "none", {"none", "tanh"})})


# -- binary -----------------------------------------------------------------------------------------------------
def _int_div(a, b):
    """Integer division truncating toward zero (C semantics, as ONNX Runtime)."""
    if np.any(b == 0):
        raise InputError("integer division by zero")
    q = np.floor_divide(a, b)
    fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))  # floor rounded a negative quotient down
    return q + fix.astype(q.dtype)


def _div(a, b):
    return _int_div(a, b) if a.dtype.kind in "iu" else np.divide(a, b)


def _mod(a, b, fmod):
    if a.dtype.kind in "iu" and np.any(b == 0):
        raise InputError("integer modulo by zero")
    return np.fmod(a, b) if fmod else np.mod(a, b)  # fmod: sign of the dividend; mod: sign of the divisor


def _pow(a, b):
    if a.dtype.kind == "f":
        return np.power(a, b.astype(np.float32))
    if b.dtype.kind in "iu" and np.any(b < 0):
        raise InputError("integer Pow with a negative exponent")
    if b.dtype.kind == "f":
        return np.power(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype))


_BINARY = {  # name: (function, allowed dtypes, output dtype or None = input dtype, must share dtype)
    "Add": (np.add, NUMERIC, None), "Sub": (np.subtract, NUMERIC, None), "Mul": (np.multiply, NUMERIC, None),
    "Div": (_div, NUMERIC, None),
    "Equal": (np.equal, ANY, "bool"), "Less": (np.less, NUMERIC, "bool"), "Greater": (np.greater, NUMERIC, "bool"),
    "LessOrEqual": (np.less_equal, NUMERIC, "bool"), "GreaterOrEqual": (np.greater_equal, NUMERIC, "bool"),
    "And": (np.logical_and, {"bool"}, "bool"), "Or": (np.logical_or, {"bool"}, "bool"),
    "Xor": (np.logical_xor, {"bool"}, "bool"),
}


def _binary(name, fn, allowed, out, since=7):  # multidirectional broadcasting since opset 7
    def check(spec):
        spec.dtype(0, allowed)
        spec.dtype(1, allowed)
        return {}, [out or spec.same(0, 1)]

    def run(inputs, params):
        a, b = inputs
        broadcast(a.shape, b.shape)
        return [fn(a, b)]

    register(name, check, run, inputs=(2, 2), since=since)


for _name, (_fn, _allowed, _out) in _BINARY.items():
    _binary(_name, _fn, _allowed, _out, since=12 if _name.endswith("OrEqual") else 7)


def _check_mod(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.dtype(1, NUMERIC)
    spec.same(0, 1)
    return {"fmod": spec.flag("fmod", 0)}, [dtype]  # float with fmod=0: floor semantics (opset 28 defines it)


def _run_mod(inputs, params):
    broadcast(inputs[0].shape, inputs[1].shape)
    return [_mod(inputs[0], inputs[1], params["fmod"])]


register("Mod", _check_mod, _run_mod, inputs=(2, 2), attributes=("fmod",))


def _check_pow(spec):
    dtype = spec.dtype(0, NUMERIC)
    spec.dtype(1, NUMERIC)
    return {}, [dtype]


def _run_pow(inputs, params):
    broadcast(inputs[0].shape, inputs[1].shape)
    return [_pow(inputs[0], inputs[1])]


register("Pow", _check_pow, _run_pow, inputs=(2, 2))


# -- variadic -----------------------------------------------------------------------------------------------------
def _variadic(name, fn, allowed, mean=False):
    def check(spec):
        for i in range(len(spec.dtypes)):
            spec.dtype(i, allowed)
        return {}, [spec.same(*range(len(spec.dtypes)))]

    def run(inputs, params):
        broadcast(*[x.shape for x in inputs])
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, x)
        if mean:
            out = out / np.float32(len(inputs))
        return [np.array(out, copy=True) if out is inputs[0] else out]

    register(name, check, run, inputs=(1, 64))


_variadic("Min", np.minimum, NUMERIC)
_variadic("Max", np.maximum, NUMERIC)
_variadic("Sum", np.add, NUMERIC)
_variadic("Mean", np.add, FLOAT, mean=True)


# -- Where, Clip ----------------------------------------------------------------------------------------------------
def _check_where(spec):
    spec.dtype(0, {"bool"})
    spec.dtype(1, ANY)
    spec.dtype(2, ANY)
    return {}, [spec.same(1, 2)]


def _run_where(inputs, params):
    cond, x, y = inputs
    broadcast(cond.shape, x.shape, y.shape)
    return [np.where(cond, x, y)]


register("Where", _check_where, _run_where, inputs=(3, 3))


def _check_clip(spec):
    dtype = spec.dtype(0, NUMERIC)
    for i in (1, 2):
        if spec.dtype(i, NUMERIC, optional=True) not in (None, dtype):
            raise spec.error(f"input #{i} must have the input's dtype {dtype}")
    return {}, [dtype]


def _run_clip(inputs, params):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    out = x
    if low is not None:  # max(x, min) first, then min(., max): min > max gives max everywhere (ONNX)
        out = np.maximum(out, x.dtype.type(scalar(low, "Clip min")))
    if high is not None:
        out = np.minimum(out, x.dtype.type(scalar(high, "Clip max")))
    return [np.array(out, copy=True) if out is x else out]


register("Clip", _check_clip, _run_clip, inputs=(1, 3))


# -- Cast, CastLike, Dropout ------------------------------------------------------------------------------------------
ONNX_TYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool"}  # TensorProto element types the runtime has


def _check_cast(spec):
    spec.dtype(0, ANY)
    to = spec.int("to")
    if to not in ONNX_TYPES:
        raise spec.error(f"Cast to ONNX element type {to} is not supported (the runtime has float32, int32, int64 "
                         f"and bool: types 1, 6, 7, 9)")
    spec.int("saturate", 1, 0, 1)  # only meaningful for float8 targets
    spec.string("round_mode", "up", {"up"})  # ditto (opset 24+)
    return {"dtype": DTYPES[ONNX_TYPES[to]]}, [ONNX_TYPES[to]]


def _run_cast(inputs, params):
    return [inputs[0].astype(params["dtype"])]


register("Cast", _check_cast, _run_cast, attributes=("to", "saturate", "round_mode"))


def _check_cast_like(spec):
    spec.dtype(0, ANY)
    target = spec.dtype(1, ANY)
    spec.int("saturate", 1, 0, 1)
    spec.string("round_mode", "up", {"up"})
    return {"dtype": DTYPES[target]}, [target]


register("CastLike", _check_cast_like, _run_cast, inputs=(2, 2), attributes=("saturate", "round_mode"))


def _check_dropout(spec):
    dtype = spec.dtype(0, FLOAT)
    spec.dtype(1, FLOAT, optional=True)
    spec.dtype(2, {"bool"}, optional=True)
    spec.int("seed", 0)
    return {}, [dtype, "bool"]


def _run_dropout(inputs, params):
    """Inference Dropout: the identity and an all-true mask. Training mode is refused unless the ratio is 0."""
    x = inputs[0]
    training = len(inputs) > 2 and inputs[2] is not None and bool(scalar(inputs[2], "training_mode"))
    if training:
        ratio = 0.5 if len(inputs) < 2 or inputs[1] is None else float(scalar(inputs[1], "ratio"))
        if ratio != 0.0:
            raise InputError("training-mode Dropout (random) is not supported")
    return [x, np.ones(x.shape, dtype=bool)]


register("Dropout", _check_dropout, _run_dropout, inputs=(1, 3), outputs=(1, 2), attributes=("seed",))
