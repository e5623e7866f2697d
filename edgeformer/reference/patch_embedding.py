"""NumPy reference of the ViT patch embedding (float64 inside, float64 result).

A Conv2d with kernel = stride = patch (ph, pw), no padding, no dilation: patch (i, j) of image b is
x[b, :, i*ph:(i+1)*ph, j*pw:(j+1)*pw]; rows/columns past the last whole patch are dropped, as Conv2d does.
Tokens are the patches in row-major (i, j) order, after an optional class token, plus a position table:

    tokens[b, 0]            = cls + pos[0]                                  (with a class token)
    tokens[b, c + i*Wp + j] = sum_{ch, u, v} w[n, ch, u, v] x[b, ch, i*ph+u, j*pw+v] + bias[n] + pos[c + i*Wp + j]

with c = 1 if there is a class token else 0, Hp = H // ph, Wp = W // pw. Written patch by patch, independently of
the runtime's single reshape/transpose im2col.
"""
import numpy as np


def patch_embedding_ref(x, w, bias=None, cls=None, position=None):
    """x (B, C, H, W), w (d, C, ph, pw) Conv2d layout, bias (d,), cls (d,), position (P', d) -> (B, P', d) float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    batch, channels, height, width = x.shape
    d, wc, ph, pw = w.shape
    if wc != channels:
        raise ValueError(f"weight takes {wc} channels, image has {channels}")
    hp, wp = height // ph, width // pw
    rows = []
    if cls is not None:
        rows.append(np.broadcast_to(np.asarray(cls, np.float64), (batch, d)))
    for i in range(hp):
        for j in range(wp):
            patch = x[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]  # (B, C, ph, pw)
            rows.append(np.einsum("bcuv,ncuv->bn", patch, w))  # (B, d)
    out = np.stack(rows, axis=1)  # (B, P', d)
    if bias is not None:
        start = 0 if cls is None else 1
        out[:, start:] += np.asarray(bias, np.float64)
    if position is not None:
        out = out + np.asarray(position, np.float64)[None]
    return out
