"""NumPy references of the table projections (kernels/lut.py), float64 inside.

Written from the formulas of seed_algorithms.md §2.2-2.3, independently of the kernels: codes from an
explicit bit loop, weights both from the closed form and (``sign_pattern_prob_bruteforce``) from the
softmax over all 2^tau sign patterns that the closed form replaces.
"""
from __future__ import annotations

import itertools

import numpy as np


def sign_codes_ref(x, num_tables: int, code_length: int, zero_bit: int = 1) -> np.ndarray:
    """(T, K) int64 codes: bit_j = [z_j >= 0] (zero_bit=1) or [z_j > 0] (zero_bit=0); first element = MSB."""
    z = np.asarray(x).reshape(-1, num_tables, code_length)
    bits = (z >= 0) if zero_bit else (z > 0)
    codes = np.zeros(z.shape[:2], dtype=np.int64)
    for j in range(code_length):
        codes = codes * 2 + bits[:, :, j]
    return codes


def sign_weights_ref(x, num_tables: int, code_length: int, weight_mode: str = "code_l1_times_prob",
                     temperature: float = 1.0) -> np.ndarray:
    """(T, K) float64: p = prod_j sigmoid(2|z_j|/t); official w = ||z||_1 * p, paper w = p."""
    z = np.asarray(x, np.float64).reshape(-1, num_tables, code_length)
    a = np.abs(z)
    p = np.prod(1.0 / (1.0 + np.exp(-2.0 * a / temperature)), axis=-1)
    if weight_mode == "code_l1_times_prob":
        return a.sum(-1) * p
    if weight_mode == "paper_prob":
        return p
    raise ValueError(f"unknown weight_mode {weight_mode!r}")


def sign_pattern_prob_bruteforce(z, temperature: float = 1.0) -> float:
    """exp(<sign z, z>/t) / sum over all s in {-1, +1}^tau of exp(<s, z>/t), by enumeration (float64).

    sign(0) is taken as +1; <sign z, z> = ||z||_1 either way."""
    z = np.asarray(z, np.float64)
    own = np.exp(np.abs(z).sum() / temperature)
    total = 0.0
    for s in itertools.product((-1.0, 1.0), repeat=z.shape[0]):
        total += np.exp(np.dot(s, z) / temperature)
    return float(own / total)


def pq_codes_ref(x, centroids) -> np.ndarray:
    """(T, K) int64 nearest-centroid codes; x (T, K*S), centroids (K, R, S); first index on ties."""
    c = np.asarray(centroids, np.float64)
    k, _, s = c.shape
    z = np.asarray(x, np.float64).reshape(-1, k, s)
    d = ((z[:, :, None, :] - c[None, :, :, :]) ** 2).sum(-1)  # (T, K, R)
    return np.argmin(d, axis=-1)


def dequantize_tables(tables, table_dtype: str = "fp32", table_scale=None) -> np.ndarray:
    """The stored tables as float64: fp32 as is, fp16 from uint16 bits, int8 times the per-row scale."""
    t = np.asarray(tables)
    if table_dtype == "fp32":
        return t.astype(np.float64)
    if table_dtype == "fp16":
        return t.view(np.float16).astype(np.float64)
    if table_dtype == "int8":
        return t.astype(np.float64) * np.asarray(table_scale, np.float64)[:, None]
    raise ValueError(f"unknown table_dtype {table_dtype!r}")


def gather_ref(codes, weights, tables64, rows_per_table: int, bias=None, residual=None) -> np.ndarray:
    """y[r] = sum_k weights[r, k] * tables64[k*R + codes[r, k]] + bias (+ residual), float64, by explicit loops."""
    codes = np.asarray(codes)
    t, k = codes.shape
    y = np.zeros((t, tables64.shape[1]), np.float64)
    for r in range(t):
        for kk in range(k):
            y[r] += float(weights[r, kk]) * tables64[kk * rows_per_table + int(codes[r, kk])]
    if bias is not None:
        y += np.asarray(bias, np.float64)
    if residual is not None:
        y += np.asarray(residual, np.float64)
    return y


def memory_layer_ref(x, tables, bias=None, *, num_tables: int, code_length: int, temperature: float = 1.0,
                     weight_mode: str = "code_l1_times_prob", zero_bit: int = 1, table_dtype: str = "fp32",
                     table_scale=None, residual=None) -> np.ndarray:
    """The whole sign-encoder memory layer in float64: (T, K*tau) -> (T, N)."""
    codes = sign_codes_ref(x, num_tables, code_length, zero_bit)
    w = sign_weights_ref(x, num_tables, code_length, weight_mode, temperature)
    return gather_ref(codes, w, dequantize_tables(tables, table_dtype, table_scale), 2 ** code_length, bias, residual)


def pq_projection_ref(x, centroids, tables, bias=None, *, table_dtype: str = "fp32", table_scale=None,
                      residual=None) -> np.ndarray:
    """Product-quantisation table projection in float64: y = sum_k T_k[code_k] + bias."""
    codes = pq_codes_ref(x, centroids)
    rows = np.asarray(centroids).shape[1]
    return gather_ref(codes, np.ones(codes.shape), dequantize_tables(tables, table_dtype, table_scale), rows, bias,
                      residual)
