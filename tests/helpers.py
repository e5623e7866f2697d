"""Builders shared by the tests: tiny random Hugging Face BERTs, converted once per session."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tiny_bert(directory: Path, *, hidden=40, heads=5, layers=2, ffn=72, vocab=120, positions=64,
                   act="gelu", seed=0, sentence_transformers=None) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=positions, type_vocab_size=2, hidden_act=act)
    net = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # random LayerNorm parameters too, so a swapped gamma/beta cannot pass
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    net.save_pretrained(directory)
    if sentence_transformers:
        import json

        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": sentence_transformers == "cls",
            "pooling_mode_mean_tokens": sentence_transformers == "mean"}))
    return directory


def torch_bert_hidden(directory: Path, ids, mask, types) -> np.ndarray:
    import torch
    from transformers import BertModel

    net = BertModel.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.no_grad():
        out = net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  token_type_ids=torch.from_numpy(types)).last_hidden_state
    return out.numpy()
