"""Quantizable-Transformers PyTorch modules (converters/quantizable.py) against the NumPy reference, and
random torch models converted through converters/bert.py against the runtime (padding included)."""
import math

import numpy as np
import pytest

from tests.optional import torch

pytestmark = pytest.mark.skipif(torch is None, reason="needs torch")

from edgeformer.errors import EdgeformerError  # noqa: E402
from edgeformer.reference.attention import packed_attention_ref, packed_gated_attention_ref  # noqa: E402

TINY = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 48,
        "vocab_size": 60, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "num_labels": 3}

OPTIONS = [
    ({"attn_softmax": "clipped(-.1:1)"}, "clipped_softmax"),
    ({"clip_gamma": -0.08, "clip_zeta": 1.1}, "clipped_softmax"),
    ({"attn_gate_type": "conditional_per_token"}, "gated"),
    ({"attn_gate_type": "conditional_per_token", "attn_gate_linear_all_features": True, "alpha": 4.0,
      "max_seq_length": 40}, "gated"),
    ({"attn_gate_type": 3, "attn_gate_init": 0.25, "fine_tuning": True, "attn_softmax": "clipped(-.05:1)"}, "gated"),
    ({"attn_gate_type": "unconditional_per_head", "attn_gate_init": 0.25, "fine_tuning": True}, "softmax"),
    ({}, "softmax"),
]


def perturbed(module, seed, std=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def padded_batch(seed, B=3, S=20, vocab=60):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 13:] = 0
    mask[2, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("options, kind", OPTIONS)
def test_self_attention_matches_reference(options, kind):
    from converters.quantizable import QuantizableBertSelfAttention, clip_from_config, gate_from_config

    cfg = {**TINY, **options}
    attn = perturbed(QuantizableBertSelfAttention(cfg), seed=1).double()  # float64: compare to 1e-9
    H, dh, d = 4, 8, 32
    rng = np.random.default_rng(2)
    ids, mask = padded_batch(3)
    x = rng.standard_normal((3, 20, d)) * 2
    with torch.no_grad():
        got, probs = attn(torch.from_numpy(x), torch.from_numpy(mask))
    got = got.numpy()
    clip = clip_from_config(cfg) or (0.0, 1.0)
    gate, gate_scale, _ = gate_from_config(cfg)
    sd = {k: v.numpy().astype(np.float64) for k, v in attn.state_dict().items()}
    for b in range(3):
        L = int(mask[b].sum())
        xb = x[b, :L].astype(np.float64)
        qkv = np.concatenate([xb @ sd[f"{n}.weight"].T + sd[f"{n}.bias"] for n in ("query", "key", "value")], 1)
        cu = np.array([0, L])
        if gate in ("per_head", "all_heads"):
            if gate == "per_head":
                w = np.concatenate([sd[f"alpha.{i}.weight"] for i in range(H)])
                bias = np.concatenate([sd[f"alpha.{i}.bias"] for i in range(H)])
            else:
                w, bias = sd["alpha.weight"], sd["alpha.bias"]
            want = packed_gated_attention_ref(qkv, xb, cu, H, dh, dh ** -0.5, False, w, bias, *clip, gate_scale)
        else:
            want = packed_attention_ref(qkv, cu, H, dh, dh ** -0.5, False, *clip)
            if gate == "unconditional":
                g = gate_scale / (1 + np.exp(-sd["alpha"]))
                want = (want.reshape(L, H, dh) * g[None, :, None]).reshape(L, d)
        np.testing.assert_allclose(got[b, :L], want, rtol=1e-9, atol=1e-10)
    if kind != "softmax" and clip != (0.0, 1.0):
        p = probs.numpy()
        assert (p == 0).sum() > 0 and np.abs(p.sum(-1)[0] - 1).max() > 1e-3  # clipped: zeros, rows != 1


def test_official_parameter_names():
    from converters.quantizable import QuantizableBertSelfAttention

    per_head = QuantizableBertSelfAttention({**TINY, "attn_gate_type": "conditional_per_token", "attn_gate_init": 0.25})
    names = dict((k, tuple(v.shape)) for k, v in per_head.state_dict().items())
    assert names["alpha.3.weight"] == (1, 8) and names["alpha.3.bias"] == (1,)
    assert abs(float(per_head.alpha[0].bias.detach()) - math.log(1 / 3)) < 1e-6  # logit(0.25)
    all_heads = QuantizableBertSelfAttention({**TINY, "attn_gate_type": "conditional_per_token",
                                              "attn_gate_linear_all_features": True})
    assert tuple(all_heads.state_dict()["alpha.weight"].shape) == (4, 32)
    uncond = QuantizableBertSelfAttention({**TINY, "attn_gate_type": "unconditional_per_head"})
    assert tuple(uncond.state_dict()["alpha"].shape) == (4,)


@pytest.mark.parametrize("options, kind", OPTIONS)
def test_converted_model_matches_torch_with_padding(tmp_path, options, kind):
    import edgeformer
    from converters.quantizable import QuantizableBertClassifier, convert

    model = perturbed(QuantizableBertClassifier({**TINY, **options}), seed=4, std=0.1)
    path, w, b = convert(model, tmp_path / "m.edgeformer")
    ids, mask = padded_batch(5)
    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        hidden = model.hidden(t_ids, t_mask).numpy()
        logits = model(t_ids, t_mask).numpy()
    m = edgeformer.load(path, threads=2)
    try:
        kinds = {n.attrs.get("kind") for n in m.graph.nodes if n.op == "attention"}
        out = m.run({"input_ids": ids, "attention_mask": mask})
    finally:
        m.close()
    assert kinds == {kind}
    for bi in range(3):
        L = int(mask[bi].sum())
        np.testing.assert_allclose(out["last_hidden_state"][bi, :L], hidden[bi, :L], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["sentence_embedding"] @ w.T + b, logits, rtol=1e-4, atol=1e-4)


def test_hf_bert_model_patched_converts(tmp_path):
    """A plain transformers BertModel, patched in place, saved with save_pretrained, converted from the directory."""
    import edgeformer
    from transformers import BertConfig, BertModel

    from converters.hf import convert_hf_directory
    from converters.quantizable import patch_bert

    cfg = {k: v for k, v in TINY.items() if k != "num_labels"}
    config = BertConfig(**cfg, attn_softmax="clipped(-.025:1)", attn_gate_type="conditional_per_token")
    model = perturbed(patch_bert(BertModel(config, add_pooling_layer=False)), seed=6, std=0.1)
    model.save_pretrained(tmp_path / "hf")
    path = convert_hf_directory(tmp_path / "hf", tmp_path / "m.edgeformer")
    ids, mask = padded_batch(7)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    m = edgeformer.load(path, threads=1)
    try:
        kinds = {(n.attrs["kind"], n.attrs.get("softmax")) for n in m.graph.nodes if n.op == "attention"}
        got = m.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    finally:
        m.close()
    assert kinds == {("gated", "clipped")}
    for bi in range(3):
        L = int(mask[bi].sum())
        np.testing.assert_allclose(got[bi, :L], want[bi, :L], rtol=1e-4, atol=1e-4)


VIT_OPTIONS = [({"attn_softmax": "clipped(-.05:1.02)"}, {("clipped_softmax", None)}),
               ({"attn_gate_type": "conditional_per_token", "attn_gate_init": 0.25}, {("gated", None)}),
               ({"attn_gate_type": "conditional_per_token", "attn_gate_linear_all_features": True,
                 "clip_gamma": -0.03}, {("gated", "clipped")}),
               ({"attn_gate_type": "unconditional_per_head"}, {("softmax", None)})]


@pytest.mark.parametrize("options, kinds", VIT_OPTIONS, ids=["clipped", "gated", "gated-all-clipped", "uncond"])
def test_hf_vit_model_patched_converts(tmp_path, options, kinds):
    """A transformers ViTForImageClassification whose attention is replaced (patch_vit), saved with
    save_pretrained, converted from the directory: the logits equal PyTorch's."""
    import edgeformer
    from transformers import ViTConfig, ViTForImageClassification

    from converters.hf import convert_hf_directory
    from converters.quantizable import patch_vit

    config = ViTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=40,
                       image_size=16, patch_size=4, num_channels=3, num_labels=5, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, **options)
    model = perturbed(patch_vit(ViTForImageClassification(config)), seed=11, std=0.1)
    model.save_pretrained(tmp_path / "hf")
    path = convert_hf_directory(tmp_path / "hf", tmp_path / "m.edgeformer")
    pixels = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels))
    m = edgeformer.load(path, threads=1)
    try:
        got_kinds = {(n.attrs["kind"], n.attrs.get("softmax")) for n in m.graph.nodes if n.op == "attention"}
        got = m.run({"pixel_values": pixels})
    finally:
        m.close()
    assert got_kinds == kinds
    np.testing.assert_allclose(got["logits"], out.logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"attn_softmax": "clipped(0.1:1)"}, "gamma <= 0"),
    ({"attn_softmax": "clipped(-0.1:0.9)"}, "zeta >= 1"),
    ({"attn_softmax": "sparsemax"}, "not supported"),
    ({"attn_softmax": "clipped(-.1:1)", "clip_gamma": -0.1}, "twice"),
    ({"alpha": 4.0}, "max_seq_length"),
    ({"clip_zeta": 1.1}, "needs clip_gamma"),
    ({"clip_gamma": "x"}, "number"),
    ({"attn_gate_type": "conditional_per_head"}, "not supported"),
    ({"attn_gate_type": "sometimes"}, "not supported"),
    ({"attn_gate_type": "conditional_per_token", "attn_gate_mlp": True}, "MLP"),
    ({"attn_gate_type": "conditional_per_token", "attn_gate_init": 1.5}, r"\(0, 1\)"),
])
def test_bad_options_rejected(tmp_path, options, message):
    from converters.quantizable import QuantizableBertSelfAttention, bert_attention

    with pytest.raises(EdgeformerError, match=message):
        QuantizableBertSelfAttention({**TINY, **options})
    with pytest.raises(EdgeformerError, match=message):
        bert_attention({**TINY, **options}, None, "p", 4, 8, np.zeros((96, 32), np.float32), None, {}, {})


def test_static_int8_conversion_runs_and_stays_close(tmp_path):
    """The clipped + gated model through --quantize static-int8 (per-tensor static activations) stays close."""
    import edgeformer
    from converters.quantizable import QuantizableBertClassifier, convert

    model = perturbed(QuantizableBertClassifier({**TINY, "attn_softmax": "clipped(-.05:1)",
                                                 "attn_gate_type": "conditional_per_token"}), seed=8, std=0.05)
    ids, mask = padded_batch(9, B=16)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    fp32, _, _ = convert(model, tmp_path / "fp32.edgeformer")
    q8, _, _ = convert(model, tmp_path / "q8.edgeformer", quantize="static-int8", calib=str(tmp_path / "calib.npz"))
    outs = []
    for path in (fp32, q8):
        m = edgeformer.load(path, threads=1)
        try:
            outs.append(m.run({"input_ids": ids, "attention_mask": mask})["sentence_embedding"])
            kinds = {n.attrs.get("kind") for n in m.graph.nodes if n.op == "attention"}
        finally:
            m.close()
        assert kinds == {"gated"}
    a, b = outs
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)
