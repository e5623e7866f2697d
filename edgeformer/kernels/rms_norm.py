"""RMS normalisation of rows, in the two conventions found in checkpoints.

    eps_outside (GPT-NeoX / MemoryFormer):  y = x / (sqrt(mean(x^2)) + eps) * scale   (NeoX RMSNorm, eps 1e-8)
    eps inside  (T5 / LLaMA):               y = x / sqrt(mean(x^2) + eps) * scale

The sum of squares is accumulated in float64 (no overflow for large float32 values); fastmath
reassoc/contract lets that reduction vectorise and keeps NaN/inf propagation (no nnan/ninf).
"""
import numpy as np

from edgeformer.kernels._jit import kernel


@kernel(fastmath={"reassoc", "contract"})
def rms_norm(x, scale, eps, eps_outside, out, r0, r1):
    """out[r] = x[r] / (rms(x[r]) + eps) * scale (eps_outside) or x[r] / sqrt(ms(x[r]) + eps) * scale, r0 <= r < r1.

    x (T, d) f32; scale (d,) f32 read-only; eps float; eps_outside bool; out (T, d) f32 (may be x).
    """
    d = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]  # (d,)
        ss = 0.0
        for j in range(d):
            v = np.float64(xr[j])
            ss += v * v
        ms = ss / d
        inv = 1.0 / (np.sqrt(ms) + eps) if eps_outside else 1.0 / np.sqrt(ms + eps)
        inv32 = np.float32(inv)
        o = out[r]
        for j in range(d):
            o[j] = np.float32(xr[j] * inv32) * scale[j]
