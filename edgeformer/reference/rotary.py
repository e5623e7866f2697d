"""NumPy reference of rotary position embedding on a fused qkv (GPT-NeoX rotate_half), float64."""
import numpy as np


def rotary_ref(qkv, positions, num_heads, head_dim, rotary_dims, base=10000.0):
    """qkv (T, 3*H*dh): Q and K heads rotated on their first rotary_dims dims at positions (T,); V unchanged."""
    qkv = np.asarray(qkv, np.float64)
    t = qkv.shape[0]
    half = rotary_dims // 2
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)  # (half,)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = qkv.copy()
    for block in (0, 1):  # Q, K
        cols = slice(block * num_heads * head_dim, (block + 1) * num_heads * head_dim)
        h = qkv[:, cols].reshape(t, num_heads, head_dim)
        a, b = h[:, :, :half], h[:, :, half:rotary_dims]
        r = h.copy()
        r[:, :, :half] = a * cos - b * sin
        r[:, :, half:rotary_dims] = b * cos + a * sin
        out[:, cols] = r.reshape(t, -1)
    return out
