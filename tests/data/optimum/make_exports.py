"""Regenerate the Hugging Face Optimum ONNX fixtures of tests/test_onnx_optimum.py (issue 3).

Runs in its own venv, because optimum-onnx 0.1.0 needs transformers < 4.58 and the project venv has transformers 5:

    python3.11 -m venv /work/venv-optimum
    /work/venv-optimum/bin/pip install torch==2.13.0        # FIRST: the local CPU wheel (anything else pulls CUDA)
    /work/venv-optimum/bin/pip install "optimum-onnx[onnxruntime]" "transformers<4.58"
    /work/venv-optimum/bin/python tests/data/optimum/make_exports.py   # from the repository root

Nothing is downloaded: every model is a random-weight tiny model built from a config (LayerNorm parameters and
biases randomised too, fixed seeds), saved with save_pretrained to a temp dir and exported with optimum's
``main_export`` (TorchScript exporter inside; optimum validates each export against PyTorch).
Writes, next to this file:

* ``<name>.onnx`` for each entry of FIXTURES (inline weights, each well under 1 MB), and
* ``manifest.json``: per fixture the family, task, opset, optimization level, graph input/output names, config
  sizes, byte size and sha256; plus the optimum / optimum-onnx / transformers / torch / onnx versions used.

Usage: ``make_exports.py [NAME ...]`` regenerates only the named fixtures (the manifest keeps the other entries).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
VOCAB = 300
POSITIONS = 320

# name -> (family, task, opset or None for optimum's default, optimize level or None, config kwargs)
FIXTURES = {
    # BERT: hidden 48 / 4 heads (head dim 12), FFN 100 (not a multiple of 64), token_type_ids input
    "bert": ("bert", "feature-extraction", None, None,
             dict(hidden_size=48, num_attention_heads=4, intermediate_size=100, type_vocab_size=2)),
    "bert_op14": ("bert", "feature-extraction", 14, None,
                  dict(hidden_size=48, num_attention_heads=4, intermediate_size=100, type_vocab_size=2)),
    # optimum's ORT optimizer (O2: EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu fusions)
    "bert_o2": ("bert", "feature-extraction", None, "O2",
                dict(hidden_size=48, num_attention_heads=4, intermediate_size=100, type_vocab_size=2)),
    # RoBERTa: no token_type_ids input (optimum's RoBERTa config), positions cumsum(ids != pad) + pad
    "roberta": ("roberta", "feature-extraction", None, None,
                dict(hidden_size=32, num_attention_heads=2, intermediate_size=72, type_vocab_size=1,
                     pad_token_id=1, max_position_embeddings=POSITIONS + 2)),
    # DistilBERT: no token types at all; FFN 90
    "distilbert": ("distilbert", "feature-extraction", None, None,
                   dict(dim=40, n_heads=4, hidden_dim=90)),
    # ELECTRA: embedding_size 24 != hidden 48 (embeddings_project linear), 3 heads of 16
    "electra": ("electra", "feature-extraction", None, None,
                dict(hidden_size=48, num_attention_heads=3, intermediate_size=80, embedding_size=24,
                     type_vocab_size=2)),
    # ALBERT: factorised embedding 16, one shared layer applied twice, gelu_new (tanh GELU), 3 heads of 12
    "albert": ("albert", "feature-extraction", None, None,
               dict(hidden_size=36, num_attention_heads=3, intermediate_size=60, embedding_size=16,
                    hidden_act="gelu_new", type_vocab_size=2)),
    # GPT-2: optimum adds a position_ids input for these tasks; n_inner 136 (not a multiple of 64)
    "gpt2": ("gpt2", "feature-extraction", None, None, dict(n_embd=48, n_head=4, n_inner=136)),
    "gpt2_op14": ("gpt2", "feature-extraction", 14, None, dict(n_embd=48, n_head=4, n_inner=136)),
    "gpt2_lm": ("gpt2", "text-generation", None, None, dict(n_embd=48, n_head=4, n_inner=136)),
    # ViT image classifier: 32x32 images, 8x8 patches (16 + CLS tokens), 5 labels
    "vit": ("vit", "image-classification", None, None,
            dict(hidden_size=32, num_attention_heads=2, intermediate_size=80, image_size=32, patch_size=8,
                 num_channels=3, num_labels=5)),
}


def build_config(family: str, kwargs: dict):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    if family == "bert":
        return tf.BertConfig(num_hidden_layers=2, **common, **kwargs)
    if family == "roberta":
        return tf.RobertaConfig(num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, **kwargs)
    if family == "distilbert":
        return tf.DistilBertConfig(n_layers=2, **common, **kwargs)
    if family == "electra":
        return tf.ElectraConfig(num_hidden_layers=2, **common, **kwargs)
    if family == "albert":
        return tf.AlbertConfig(num_hidden_layers=2, **common, **kwargs)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=2, vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=VOCAB - 1,
                             eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, **kwargs)
    if family == "vit":
        return tf.ViTConfig(num_hidden_layers=2, **kwargs)
    raise ValueError(family)


def build_model(family: str, task: str, kwargs: dict, seed: int):
    """A random-weight model for the task, eval mode, LayerNorm parameters and all biases randomised."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = build_config(family, kwargs)
    if task == "text-generation":
        cls = tf.AutoModelForCausalLM
    elif task == "image-classification":
        cls = tf.AutoModelForImageClassification
    else:
        cls = tf.AutoModel
    net = cls.from_config(config).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        for name, param in net.named_parameters():  # HF initialises biases to 0: make them matter
            if name.endswith(".bias") and "LayerNorm" not in name and "layer_norm" not in name and ".ln" not in name:
                param.normal_(0.0, 0.05)
    return net


def export_one(name: str, spec, workdir: Path) -> dict:
    import onnx
    from optimum.exporters.onnx import main_export

    family, task, opset, optimize, kwargs = spec
    seed = sum(map(ord, name))  # fixed per fixture
    net = build_model(family, task, kwargs, seed)
    model_dir, out_dir = workdir / f"{name}_hf", workdir / f"{name}_onnx"
    net.save_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(model_dir), out_dir, task=task, opset=opset, optimize=optimize, device="cpu",
                    library_name="transformers", do_validation=True, atol=1e-4)
    candidates = sorted(out_dir.glob("model*.onnx"))
    src = next((p for p in candidates if "optimized" in p.name), candidates[0]) if optimize else out_dir / "model.onnx"
    if any(out_dir.glob("*.onnx_data")) or any(out_dir.glob("*.data")):
        raise RuntimeError(f"{name}: export has external data; fixtures must be inline")
    dst = HERE / f"{name}.onnx"
    shutil.copyfile(src, dst)
    model = onnx.load(dst)
    inits = {t.name for t in model.graph.initializer}
    data = dst.read_bytes()
    return {
        "file": dst.name, "family": family, "task": task,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "opset_requested": opset, "optimize": optimize,
        "domains": sorted({o.domain or "ai.onnx" for o in model.opset_import}),
        "inputs": [i.name for i in model.graph.input if i.name not in inits],
        "outputs": [o.name for o in model.graph.output],
        "config": {"vocab_size": VOCAB, "max_positions": POSITIONS, "layers": 2, "seed": seed, **kwargs},
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
    }


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("optimum", "optimum-onnx", "transformers", "torch", "onnx", "onnxruntime")}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in FIXTURES]
    if unknown:
        sys.exit(f"unknown fixtures {unknown}; known: {list(FIXTURES)}")
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = manifest.get("fixtures", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(FIXTURES):
            entry = export_one(name, FIXTURES[name], Path(tmp))
            entries[name] = entry
            print(f"{name:12s} {entry['task']:22s} opset {entry['opset']:2d} {entry['bytes'] / 1024:7.1f} KiB "
                  f"inputs {entry['inputs']} outputs {entry['outputs']}")
    manifest = {"generator": "tests/data/optimum/make_exports.py", "versions": versions(),
                "fixtures": {k: entries[k] for k in FIXTURES if k in entries}}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(e["bytes"] for e in manifest["fixtures"].values())
    print(f"total {total / 1024:.1f} KiB in {len(manifest['fixtures'])} fixtures -> {manifest_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
