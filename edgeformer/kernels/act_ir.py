"""The activations of kernels/mathfn.py as LLVM IR on float vectors, for the GEMM micro-kernels' epilogues.

A micro-kernel holds its output tile in vector registers; applying the activation there, before the store,
saves a separate pass over the output: for int8 a pass over each row chunk (~7 us less per 128x1536
up-projection in a scratch measurement on Zen 4); for fp32 it replaced a loop over each tile's rows in L1 at
equal speed, with one code path instead of three. These emitters repeat mathfn's formulas
operation for operation, with mathfn's float32 constants, so that the two agree (tests/test_act_ir.py):

    relu(x)      = 0 if x < 0 else x                      (NaN and -0.0 pass through)
    gelu_erf(x)  = 0.5 x (1 + z P(z^2) / Q(z^2)),  z = clamp(x / sqrt2, -4, 4)      (rational form)
                 = x/2 + |x| g_i(t), a cubic per interval of |x| looked up by vpermt2ps  (table form,
                   where the host targets AVX-512: mathfn.GELU_ERF_TABLE)
    gelu_tanh(x) = x / (1 + exp(-2u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
    exp          = mathfn.exp_f32 (Cody-Waite reduction, Cephes polynomial, two-step 2**n scaling)

Multiplies and adds carry the `contract` flag (FMAs where the target has them), as the Numba kernels
that call mathfn are compiled with fastmath={"contract"}; clamps are compare + select in mathfn's order,
so NaN propagates. `emit_activation_switch` branches on a run-time activation code; `emit_store_tile` is the
micro-kernels' final store (with the residual added on the way).
"""
from contextlib import contextmanager

from llvmlite import ir

from edgeformer.kernels import mathfn as m

_FLAGS = ("contract",)


def _splat(vty, value):
    return ir.Constant(vty, [float(value)] * vty.count)


class _Ops:
    """Vector float arithmetic with mathfn's constants and the contract flag."""

    def __init__(self, builder, vty):
        self.b, self.t = builder, vty

    def c(self, value):
        return _splat(self.t, value)

    def mul(self, x, y):
        return self.b.fmul(x, y, flags=_FLAGS)

    def add(self, x, y):
        return self.b.fadd(x, y, flags=_FLAGS)

    def sub(self, x, y):
        return self.b.fsub(x, y, flags=_FLAGS)

    def div(self, x, y):
        return self.b.fdiv(x, y, flags=_FLAGS)

    def sel_lt(self, x, bound, then):
        """`then if x < bound else x` (NaN: x)."""
        return self.b.select(self.b.fcmp_ordered("<", x, bound), then, x)

    def sel_gt(self, x, bound, then):
        """`then if x > bound else x` (NaN: x)."""
        return self.b.select(self.b.fcmp_ordered(">", x, bound), then, x)


def _exp(o, x):
    """mathfn.exp_f32 on a vector."""
    b = o.b
    ivty = ir.VectorType(ir.IntType(32), o.t.count)
    under = b.fcmp_ordered("<", x, o.c(m._EXP_LO))
    x = o.sel_gt(x, o.c(m._EXP_HI), o.c(m._EXP_HI))
    x = o.sel_lt(x, o.c(m._EXP_LO), o.c(m._EXP_LO))
    t = o.add(o.mul(x, o.c(m._LOG2E)), o.c(m._ROUND_MAGIC))
    n = o.sub(t, o.c(m._ROUND_MAGIC))
    i = b.sub(b.bitcast(t, ivty), ir.Constant(ivty, [m._ROUND_MAGIC_BITS] * o.t.count))
    r = o.sub(x, o.mul(n, o.c(m._LN2_HI)))
    r = o.sub(r, o.mul(n, o.c(m._LN2_LO)))
    z = o.mul(r, r)
    p = o.add(o.mul(o.c(m._EP0), r), o.c(m._EP1))
    for coef in (m._EP2, m._EP3, m._EP4, m._EP5):
        p = o.add(o.mul(p, r), o.c(coef))
    p = o.add(o.add(o.mul(p, z), r), o.c(m._ONE))
    n1 = b.ashr(i, ir.Constant(ivty, [1] * o.t.count))
    n2 = b.sub(i, n1)
    bias = ir.Constant(ivty, [127] * o.t.count)
    shift = ir.Constant(ivty, [23] * o.t.count)
    s1 = b.bitcast(b.shl(b.add(n1, bias), shift), o.t)
    s2 = b.bitcast(b.shl(b.add(n2, bias), shift), o.t)
    e = o.mul(o.mul(p, s1), s2)
    return b.select(under, o.c(0.0), e)


def _gelu_erf(o, x):
    z = o.mul(x, o.c(m._INV_SQRT2))
    z = o.sel_lt(z, o.c(-m._FOUR), o.c(-m._FOUR))
    z = o.sel_gt(z, o.c(m._FOUR), o.c(m._FOUR))
    z2 = o.mul(z, z)
    p = o.add(o.mul(z2, o.c(m._GA13)), o.c(m._GA11))
    for coef in (m._GA9, m._GA7, m._GA5, m._GA3, m._GA1):
        p = o.add(o.mul(z2, p), o.c(coef))
    q = o.add(o.mul(z2, o.c(m._GB8)), o.c(m._GB6))
    for coef in (m._GB4, m._GB2, m._GB0):
        q = o.add(o.mul(z2, q), o.c(coef))
    return o.mul(o.mul(o.c(m._HALF), x), o.add(o.c(m._ONE), o.div(o.mul(z, p), q)))


def _lookup32(o, table, index):
    """table[index] per lane for a 32-entry float32 table (index in [0, 32)): AVX-512's two-source permute
    (vpermt2ps), on 16-lane pieces of the vector (narrower vectors are padded, wider ones split)."""
    b = o.b
    f32, i32 = ir.FloatType(), ir.IntType(32)
    v16f, v16i = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
    name = "llvm.x86.avx512.vpermi2var.ps.512"
    perm = b.module.globals.get(name)
    if perm is None:
        perm = ir.Function(b.module, ir.FunctionType(v16f, [v16f, v16i, v16f]), name)
    lo = ir.Constant(v16f, [float(v) for v in table[:16]])
    hi = ir.Constant(v16f, [float(v) for v in table[16:]])
    n = o.t.count
    pieces = []
    for start in range(0, n, 16):
        width = min(16, n - start)
        lanes = [start + j if j < width else start for j in range(16)]  # pad with a valid lane
        idx = b.shuffle_vector(index, index, ir.Constant(ir.VectorType(i32, 16), lanes)) if (n, start) != (16, 0) \
            else index
        got = b.call(perm, [lo, idx, hi])
        pieces.append((got, width))
    if n == 16:
        return pieces[0][0]
    flat = [(k, j) for k, (_, width) in enumerate(pieces) for j in range(width)]
    if len(pieces) == 1:
        return b.shuffle_vector(pieces[0][0], pieces[0][0], ir.Constant(ir.VectorType(i32, n), [j for _, j in flat]))
    out = pieces[0][0]
    acc = b.shuffle_vector(out, out, ir.Constant(ir.VectorType(i32, n), [j if j < 16 else 0 for j in range(n)]))
    for k in range(1, len(pieces)):
        wide = b.shuffle_vector(pieces[k][0], pieces[k][0], ir.Constant(ir.VectorType(i32, n),
                                                                        [j - 16 * k if 16 * k <= j < 16 * k + 16 else 0
                                                                         for j in range(n)]))
        mask = ir.Constant(ir.VectorType(i32, n), [n + j if 16 * k <= j < 16 * k + 16 else j for j in range(n)])
        acc = b.shuffle_vector(acc, wide, mask)
    return acc


def _gelu_erf_table(o, x):
    """mathfn.gelu_erf_table on a vector, operation for operation."""
    b = o.b
    ivty = ir.VectorType(ir.IntType(32), o.t.count)
    a = b.bitcast(b.and_(b.bitcast(x, ivty), ir.Constant(ivty, [int(m._ABS)] * o.t.count)), o.t)
    u = o.mul(a, o.c(m._GELU_SCALE))
    u = b.select(b.fcmp_ordered("<", u, o.c(m._GELU_UMAX)), u, o.c(m._GELU_UMAX))
    i = b.fptosi(u, ivty)
    t = o.sub(u, b.sitofp(i, o.t))
    g = _lookup32(o, m._GT3, i)
    for table in (m._GT2, m._GT1, m._GT0):
        g = o.add(o.mul(g, t), _lookup32(o, table, i))
    return o.add(o.mul(a, g), o.mul(o.c(m._HALF), x))


def _gelu_tanh(o, x):
    cube = o.mul(o.mul(o.mul(o.c(m._GELU_TANH_C), x), x), x)
    u = o.mul(o.c(m._SQRT_2_OVER_PI), o.add(x, cube))
    return o.div(x, o.add(o.c(m._ONE), _exp(o, o.mul(o.c(-m._TWO), u))))


def _relu(o, x):
    return o.sel_lt(x, o.c(0.0), o.c(0.0))


EMITTERS = {m.ACT_RELU: _relu, m.ACT_GELU_ERF: _gelu_erf, m.ACT_GELU_TANH: _gelu_tanh}
# GELU's form follows mathfn (GELU_ERF_TABLE: the host targets AVX-512), so that the epilogues and the scalar
# helpers agree; `rational_gelu()` switches the table off for code cross-compiled for other CPUs (micro_asm).
_TABLE_GELU = [m.GELU_ERF_TABLE]


@contextmanager
def rational_gelu():
    """Emit the rational GELU within the block (IR compiled for a CPU that may lack AVX-512)."""
    saved = _TABLE_GELU[0]
    _TABLE_GELU[0] = False
    try:
        yield
    finally:
        _TABLE_GELU[0] = saved


def _emitter(act: int):
    if act == m.ACT_GELU_ERF and _TABLE_GELU[0]:
        return _gelu_erf_table
    return EMITTERS[act]


def emit_activation(builder, act: int, v):
    """act(v) for one float vector v and a compile-time activation code (ACT_NONE: v itself)."""
    if act == m.ACT_NONE:
        return v
    return _emitter(act)(_Ops(builder, v.type), v)


def emit_activation_switch(builder, act_value, vectors, name="act"):
    """[act(v) for v in vectors] for a run-time i64 activation code: one block per activation in EMITTERS,
    joined by phis; any other code (ACT_NONE, unknown) leaves the vectors unchanged. Leaves the builder in
    the join block."""
    fn = builder.function
    start = builder.block
    join = fn.append_basic_block(f"{name}_join")
    incoming = [(list(vectors), None)]
    switch = builder.switch(act_value, join)
    for code in EMITTERS:
        emitter = _emitter(code)
        blk = fn.append_basic_block(f"{name}_{code}")
        switch.add_case(ir.Constant(act_value.type, code), blk)
        builder.position_at_end(blk)
        o = _Ops(builder, vectors[0].type)
        done = [emitter(o, v) for v in vectors]
        incoming.append((done, builder.block))
        builder.branch(join)
    builder.position_at_end(join)
    result = []
    for k in range(len(vectors)):
        ph = builder.phi(vectors[0].type)
        for values, blk in incoming:
            ph.add_incoming(values[k], start if blk is None else blk)
        result.append(ph)
    return result


def emit_store_tile(builder, tile, mr, npn, width, d_base, d_stride, res_base=None, res_stride=None):
    """Store tile[i * npn + j] (float vectors of `width` lanes) at d_base + i*d_stride + j*width, adding the
    vector at res_base + i*res_stride + j*width first when res_base is given (float* bases, i64 strides)."""
    i64 = ir.IntType(64)
    vptr = tile[0].type.as_pointer()
    for i in range(mr):
        d_row = builder.mul(d_stride, ir.Constant(i64, i))
        r_row = builder.mul(res_stride, ir.Constant(i64, i)) if res_base is not None else None
        for j in range(npn):
            v = tile[i * npn + j]
            col = ir.Constant(i64, j * width)
            if res_base is not None:
                rp = builder.gep(res_base, [builder.add(r_row, col)])
                v = builder.fadd(v, builder.load(builder.bitcast(rp, vptr), align=4))
            p = builder.gep(d_base, [builder.add(d_row, col)])
            builder.store(v, builder.bitcast(p, vptr), align=4)
