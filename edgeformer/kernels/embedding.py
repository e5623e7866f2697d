"""Token embedding: word + position + token-type rows, summed into out (fp32 or int8 word table)."""
import numpy as np

from edgeformer.kernels._jit import kernel


@kernel
def embedding(ids, positions, types, word, pos_table, type_table, out, r0, r1):
    """out[t] = word[ids[t]] + pos_table[positions[t]] + type_table[types[t]] for r0 <= t < r1.

    ids, positions, types (T,) int64, already validated; positions is not read when pos_table is
    (0, d). word (V, d), pos_table (P, d) or (0, d) = no positions, type_table (Y, d) or (0, d) =
    no token types; all f32 read-only. types (0,) with a non-empty type_table means type 0 for
    every token. out (T, d) f32. The sum is taken in this order: (word + pos) + type.
    """
    d = out.shape[1]
    has_pos = pos_table.shape[0] != 0
    has_type = type_table.shape[0] != 0
    per_token_type = types.shape[0] != 0
    for t in range(r0, r1):
        o = out[t]  # (d,)
        wv = word[ids[t]]  # (d,)
        if has_type:
            tv = type_table[types[t] if per_token_type else 0]  # (d,)
            if has_pos:
                pv = pos_table[positions[t]]  # (d,)
                for j in range(d):
                    o[j] = (wv[j] + pv[j]) + tv[j]
            else:
                for j in range(d):
                    o[j] = wv[j] + tv[j]
        elif has_pos:
            pv = pos_table[positions[t]]  # (d,)
            for j in range(d):
                o[j] = wv[j] + pv[j]
        else:
            for j in range(d):
                o[j] = wv[j]


@kernel
def embedding_s8(ids, positions, types, word_q, word_scale, pos_table, type_table, out, r0, r1):
    """As `embedding` with an int8 word table: word row = f32(word_q[id]) * word_scale[id].

    word_q (V, d) int8, word_scale (V,) f32 (per-row scale). The sum is taken in the same order:
    (word + pos) + type, with word = f32(q) * scale.
    """
    d = out.shape[1]
    has_pos = pos_table.shape[0] != 0
    has_type = type_table.shape[0] != 0
    per_token_type = types.shape[0] != 0
    for t in range(r0, r1):
        o = out[t]  # (d,)
        i = ids[t]
        wv = word_q[i]  # (d,) int8
        s = word_scale[i]
        if has_type:
            tv = type_table[types[t] if per_token_type else 0]  # (d,)
            if has_pos:
                pv = pos_table[positions[t]]  # (d,)
                for j in range(d):
                    o[j] = (np.float32(wv[j]) * s + pv[j]) + tv[j]
            else:
                for j in range(d):
                    o[j] = np.float32(wv[j]) * s + tv[j]
        elif has_pos:
            pv = pos_table[positions[t]]  # (d,)
            for j in range(d):
                o[j] = np.float32(wv[j]) * s + pv[j]
        else:
            for j in range(d):
                o[j] = np.float32(wv[j]) * s
