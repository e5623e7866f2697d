"""NumPy reference of the token embedding sum (float64 result)."""
import numpy as np


def embedding_ref(ids, word, positions=None, pos_table=None, types=None, type_table=None):
    """word[ids] + pos_table[positions] + type_table[types]; None = absent.

    With a type_table but types None, every token has type 0 (BERT's default token_type_ids).
    """
    out = np.asarray(word, np.float64)[np.asarray(ids)]
    if pos_table is not None:
        out = out + np.asarray(pos_table, np.float64)[np.asarray(positions)]
    if type_table is not None:
        t = np.zeros(len(out), np.int64) if types is None else np.asarray(types)
        out = out + np.asarray(type_table, np.float64)[t]
    return out
