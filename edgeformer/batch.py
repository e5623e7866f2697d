"""Packing of a padded batch into the valid tokens only (ByteTransformer's padding-free layout).

From the (B, S) attention mask we compute, once per run:
  lengths (B,), cu_seqlens (B+1,) — sequence b owns packed rows cu_seqlens[b]:cu_seqlens[b+1];
  token_index (T,) — flat index b*S + s of each valid token, in order; positions (T,) — its s.
Token-wise ops then run on T rows instead of B*S, attention runs per sequence on its own length,
and padded positions are never read. A mask may mark any positions (left padding, holes): a token
keeps its original position s, as in Hugging Face BERT, and attends to the valid tokens of its row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    batch_size: int  # B
    seq_len: int  # S (padded)
    lengths: np.ndarray  # (B,) int64
    cu_seqlens: np.ndarray  # (B+1,) int64
    token_index: np.ndarray | None  # (T,) int64; None when nothing is padded
    positions: np.ndarray  # (T,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @classmethod
    def from_mask(cls, mask: np.ndarray | None, batch_size: int, seq_len: int) -> "Batch":
        if mask is None or bool(mask.all()):
            lengths = np.full(batch_size, seq_len, dtype=np.int64)  # (B,)
            positions = np.arange(batch_size * seq_len, dtype=np.int64)  # (B*S,)
            if batch_size > 1:
                positions %= seq_len
            token_index = None
        else:
            valid = mask.astype(bool, copy=False)  # (B, S)
            lengths = valid.sum(axis=1, dtype=np.int64)  # (B,)
            token_index = np.flatnonzero(valid).astype(np.int64, copy=False)  # (T,)
            positions = token_index % seq_len  # (T,)
        cu_seqlens = np.zeros(batch_size + 1, dtype=np.int64)  # (B+1,)
        np.cumsum(lengths, out=cu_seqlens[1:])
        return cls(batch_size, seq_len, lengths, cu_seqlens, token_index, positions)

    def pack(self, padded: np.ndarray) -> np.ndarray:
        """(B, S, ...) -> (T, ...) valid tokens."""
        flat = padded.reshape((self.batch_size * self.seq_len,) + padded.shape[2:])
        return flat if self.token_index is None else flat[self.token_index]

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """(T, d) -> (B, S, d) with zeros at padded positions."""
        width = packed.shape[1]
        if self.token_index is None:
            return packed.reshape(self.batch_size, self.seq_len, width)
        out = np.zeros((self.batch_size * self.seq_len, width), dtype=packed.dtype)  # (B*S, d)
        out[self.token_index] = packed
        return out.reshape(self.batch_size, self.seq_len, width)
