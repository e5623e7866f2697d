"""embedding: x[t] = word[id_t] + position[pos_t + offset] + token_type[type_t].

Inputs: input_ids and optionally token_type_ids (packed by the session). Ids, types and positions
are range-checked here, at the Python boundary, because the kernel does not bounds-check.

The word table is either float32 (V, d), or int8 (V, d) with the weight role ``word_scale`` (V,)
float32 (per-row symmetric scale, finite and > 0; any int8 value is valid, and the table is not read
at load, so its pages stay unmapped until gathered): word[v] = scale[v] * q[v],
dequantised per gathered row by the kernel (written by the converter when quantising: a quarter of
the bytes of the largest tensor of a small encoder).
"""
from __future__ import annotations

import numpy as np

from edgeformer.errors import GraphError, InputError
from edgeformer.graph import IDS, TOKENS, ValueType
from edgeformer.ops.base import NO_IDS, attr, inputs_count, no_table, same_width, weight


class Embedding:
    op = "embedding"
    gathered_weights = ("word",)  # read at random rows: the session advises the kernel (MADV_RANDOM)

    @staticmethod
    def _tables(node, weights):
        scale = weight(node, weights, "word_scale", 1, optional=True)  # (V,) with an int8 table
        word = weight(node, weights, "word", 2, dtype=np.float32 if scale is None else np.int8)  # (V, d)
        if scale is not None:
            same_width(node, "word_scale", scale.shape[0], word.shape[0])
        position = weight(node, weights, "position", 2, optional=True)  # (P, d)
        token_type = weight(node, weights, "token_type", 2, optional=True)  # (Y, d)
        for role, table in (("position", position), ("token_type", token_type)):
            if table is not None:
                same_width(node, role, table.shape[1], word.shape[1])
        return word, scale, position, token_type

    @classmethod
    def infer(cls, node, in_types, weights):
        inputs_count(node, in_types, 1, 2)
        if any(t.kind != IDS for t in in_types):
            raise GraphError(f"node {node.name!r}: embedding inputs must be graph id inputs")
        word, scale, position, token_type = cls._tables(node, weights)
        if scale is not None:
            if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
                raise GraphError(f"node {node.name!r}: word_scale must be finite and > 0")
        if word.shape[0] == 0:
            raise GraphError(f"node {node.name!r}: empty vocabulary")
        if len(in_types) == 2 and token_type is None:
            raise GraphError(f"node {node.name!r}: token_type_ids given but no token_type table")
        if attr(node, "position_offset", int, 0) < 0:
            raise GraphError(f"node {node.name!r}: position_offset must be >= 0")
        return [ValueType(TOKENS, word.shape[1])]

    @classmethod
    def bind(cls, node, weights):
        word, scale, position, token_type = cls._tables(node, weights)
        offset = node.attrs.get("position_offset", 0)
        width = word.shape[1]
        position = no_table(width) if position is None else position
        token_type = no_table(width) if token_type is None else token_type

        def run(inputs, batch, workers):
            from edgeformer.kernels.embedding import embedding, embedding_s8

            ids = inputs[0]  # (T,)
            _check_range(ids, word.shape[0], "input_ids", "vocabulary size")
            types = inputs[1] if len(inputs) == 2 else NO_IDS  # (T,) or (0,)
            if types.size:
                _check_range(types, token_type.shape[0], "token_type_ids", "number of token types")
            positions = batch.positions + offset if offset else batch.positions  # (T,)
            if position.shape[0] and positions.size and int(positions.max()) >= position.shape[0]:
                raise InputError(f"sequence of {batch.seq_len} tokens is longer than the model's "
                                 f"{position.shape[0] - offset} positions")
            out = np.empty((ids.shape[0], width), dtype=np.float32)  # (T, d)
            if scale is None:
                workers.split(embedding, ids.shape[0], ids, positions, types, word, position, token_type, out,
                              min_per_thread=64)
            else:
                workers.split(embedding_s8, ids.shape[0], ids, positions, types, word, scale, position, token_type,
                              out, min_per_thread=64)
            return [out]

        return run


def _check_range(ids: np.ndarray, limit: int, name: str, what: str) -> None:
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise InputError(f"{name} contains {bad}, outside [0, {limit}) (the model's {what})")
