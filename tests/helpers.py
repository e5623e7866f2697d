"""Builders shared by the tests: tiny random BERTs.

write_tiny_bert needs only numpy and edgeformer (runtime tests, e.g. on the device); save_tiny_bert and
torch_bert_hidden need torch + transformers (converter and end-to-end tests).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_bert_arrays(*, hidden=40, heads=5, layers=2, ffn=72, vocab=120, positions=64, type_vocab=2,
                     seed=0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face BertModel's state_dict names (no pooler).

    Linear weights ~ N(0, 1/fan_in) so attention is far from uniform, biases and embeddings random, and
    LayerNorm gamma in [0.5, 1.5] / beta ~ N(0, 0.1) so that a swapped gamma/beta cannot pass.
    """
    assert hidden % heads == 0
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def layer_norm(prefix):
        arrays[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        arrays[f"{prefix}.bias"] = normal(hidden, 0.1)

    def linear(prefix, n_out, n_in):
        arrays[f"{prefix}.weight"] = normal((n_out, n_in), 1.0 / np.sqrt(n_in))
        arrays[f"{prefix}.bias"] = normal(n_out, 0.1)

    arrays: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": normal((vocab, hidden), 1.0),
        "embeddings.position_embeddings.weight": normal((positions, hidden), 0.5),
        "embeddings.token_type_embeddings.weight": normal((type_vocab, hidden), 0.5),
    }
    layer_norm("embeddings.LayerNorm")
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", hidden, hidden)
        linear(f"{p}.attention.output.dense", hidden, hidden)
        layer_norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", ffn, hidden)
        linear(f"{p}.output.dense", hidden, ffn)
        layer_norm(f"{p}.output.LayerNorm")
    return arrays


def write_tiny_bert(path, *, hidden=40, heads=5, layers=2, ffn=72, vocab=120, positions=64, act="gelu",
                    pooling="mean", normalize=True, seed=0) -> Path:
    """A tiny random BERT written straight to an edgeformer model file, without torch or transformers.

    The weights (tiny_bert_arrays) go through the real BERT loader (converters.bert.load_bert); like
    converters.hf with a sentence-transformers head, ``pooling`` ("mean", "cls" or None) adds a pooling
    node and ``normalize`` an L2 normalize after it, giving the ``sentence_embedding`` output.
    """
    from converters.bert import load_bert
    from converters.checkpoint import Checkpoint
    from converters.hf import add_sentence_head
    from edgeformer.format import write_model
    from edgeformer.graph import GraphBuilder, validate
    from edgeformer.ops import REGISTRY

    path = Path(path)
    arrays = tiny_bert_arrays(hidden=hidden, heads=heads, layers=layers, ffn=ffn, vocab=vocab, positions=positions,
                              seed=seed)
    config = {"model_type": "bert", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "intermediate_size": ffn, "max_position_embeddings": positions,
              "type_vocab_size": 2, "hidden_act": act, "layer_norm_eps": 1e-12}
    ckpt = Checkpoint(arrays)
    builder = GraphBuilder(f"tiny-bert-{hidden}x{layers}")
    tensors = load_bert(config, ckpt, builder)
    assert ckpt.used == set(arrays), sorted(set(arrays) - ckpt.used)  # every weight reached the graph
    add_sentence_head(builder, pooling, normalize)
    graph = builder.build()
    validate(graph, tensors, REGISTRY)
    metadata = {"source": "tests.helpers.write_tiny_bert", "model_type": "bert", "max_length": str(positions)}
    write_model(path, tensors, graph.to_json(), metadata=metadata)
    return path


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
