"""Rotary position embedding (GPT-NeoX "rotate_half" layout) applied to the Q and K blocks of a fused qkv.

qkv (T, 3*H*dh) holds columns [Q | K | V], head h at h*dh:(h+1)*dh inside each block (the attention op's
layout). For a token at position p, the first ``rot`` dims of every Q and K head are rotated in pairs
(i, i + rot/2), i < rot/2 (NeoX rotate_half, not GPT-J's interleaved pairs):

    out[i]         = v[i] cos(p f_i) - v[i + rot/2] sin(p f_i)
    out[i + rot/2] = v[i + rot/2] cos(p f_i) + v[i] sin(p f_i),     f_i = base^(-2i/rot)

the other dims of Q and K, and all of V, are copied. cos/sin come precomputed per position (cos_t,
sin_t: (P, rot/2) float32), so the kernel is pure multiply-adds.
"""
from edgeformer.kernels._jit import kernel


@kernel
def rotary_qkv(qkv, positions, cos_t, sin_t, num_heads, head_dim, rot, out, r0, r1):
    """out[r] = qkv[r] with Q and K heads rotated at positions[r], for r0 <= r < r1.

    positions (T,) int64 in [0, P) (not checked); cos_t, sin_t (P, rot/2) f32; rot even, <= head_dim;
    out (T, 3*H*dh) f32, not aliasing qkv.
    """
    half = rot // 2
    width = num_heads * head_dim
    for r in range(r0, r1):
        src = qkv[r]  # (3*H*dh,)
        dst = out[r]
        for j in range(3 * width):
            dst[j] = src[j]
        p = positions[r]
        c = cos_t[p]  # (rot/2,)
        s = sin_t[p]
        for h in range(2 * num_heads):  # Q heads then K heads
            base = h * head_dim
            for i in range(half):
                a = src[base + i]
                b = src[base + i + half]
                dst[base + i] = a * c[i] - b * s[i]
                dst[base + i + half] = b * c[i] + a * s[i]
