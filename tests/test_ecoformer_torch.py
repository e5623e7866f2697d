"""The PyTorch EcoFormer module (converters/ecoformer.py) against the NumPy reference and the runtime:
hash, attention, KSH learning, the encoder exported to a model file, the PVTv2-named state-dict loader.

Torch runs in float64 where outputs are compared with the runtime, so that codes can only differ where a
pre-sign value is within ~1e-6 of zero (the runtime hashes float32 activations in float64); the seeds
used here have no such value (the tests would say so).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.optional import torch

pytestmark = pytest.mark.skipif(torch is None, reason="torch is not installed (optional oracle)")

if torch is not None:
    from converters import ecoformer as E

    torch.set_num_threads(1)  # tiny problems: threads only add contention

from edgeformer.errors import EdgeformerError
from edgeformer.functional.binary_hash import binary_hash_attention, kernelized_hash, unpack_codes
from edgeformer.reference import binary_hash as R


def random_hash(module, rng):
    ksh = module.fast_attention.ksh if hasattr(module, "fast_attention") else module.ksh
    H, m, dh = ksh.anchor.shape[1:]
    anchors = rng.standard_normal((1, H, m, dh))
    anchors /= np.linalg.norm(anchors, axis=-1, keepdims=True)
    with torch.no_grad():
        ksh.anchor.copy_(torch.from_numpy(anchors))
        ksh.mvec.copy_(torch.from_numpy(rng.uniform(0, 0.5, (1, H, 1, m))))
        ksh.A.copy_(torch.from_numpy(rng.standard_normal(ksh.A.shape)))


def test_hash_projection_matches_reference():
    rng = np.random.default_rng(0)
    ksh = E.KernelSH(3, 16, nbits=20, m=7).double()
    fa = type("FA", (), {"ksh": ksh})()
    random_hash(fa, rng)
    x = rng.standard_normal((2, 3, 30, 16))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 12:] = False
    u = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1, eps=1e-12)
    y = ksh.projection(u, mask).numpy()
    for bi, L in ((0, 30), (1, 12)):
        for h in range(3):
            want = R.hash_projection_ref(x[bi, h, :L], ksh.anchor[0, h].numpy(), ksh.mvec[0, h, 0].numpy(),
                                         ksh.A[h].numpy())
            np.testing.assert_allclose(y[bi, h, :L], want, rtol=1e-10, atol=1e-12)
    codes = kernelized_hash(x, ksh.anchor[0].numpy(), ksh.mvec[0, :, 0].numpy(), ksh.A.numpy(),
                            lengths=np.array([30, 12]))
    signs = ksh(u, mask).numpy()
    assert (unpack_codes(codes[0], 20) == signs[0]).all()
    assert (unpack_codes(codes[1, :, :12], 20) == signs[1, :, :12]).all()


@pytest.mark.parametrize("normalized", [False, True])
def test_attention_module_matches_runtime(normalized):
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    att = E.EcoformerSelfAttention(32, num_heads=2, nbits=16, m=9, normalized=normalized).double().eval()
    random_hash(att.fast_attention, rng)
    att.fast_attention.is_trained = True
    x = torch.from_numpy(rng.standard_normal((2, 40, 32)))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 33:] = False
    with torch.no_grad():
        got = att(x, mask).numpy()
        qk, v = att._heads(att.to_qk(x)).numpy(), att._heads(att.to_v(x)).numpy()
    ksh = att.fast_attention.ksh
    o = binary_hash_attention(qk, v, ksh.anchor[0].numpy(), ksh.mvec[0, :, 0].numpy(), ksh.A.numpy(),
                              normalized=normalized, lengths=np.array([33, 40]))  # (B, H, N, dh)
    o = torch.from_numpy(o.transpose(0, 2, 1, 3).reshape(2, 40, 32).astype(np.float64))
    with torch.no_grad():
        want = att.proj(o).numpy()
    np.testing.assert_allclose(got[0, :33], want[0, :33], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def clustered_tokens(rng, B=2, H=2, N=48, dh=8, clusters=4):
    centres = rng.standard_normal((H, clusters, dh)) * 2
    labels = rng.integers(0, clusters, (B, N))
    x = centres[:, labels].transpose(1, 0, 2, 3) + 0.3 * rng.standard_normal((B, H, N, dh))
    return torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)


def agreement(codes, S):
    """Mean of S_ij c_i . c_j over the labelled pairs (b = perfect)."""
    return float(((codes @ codes.transpose(-2, -1)) * S).sum() / (S != 0).sum())


def test_ksh_fit_official_settings_accept_only_improvements_and_are_reproducible():
    rng = np.random.default_rng(2)
    u = clustered_tokens(rng)
    S = E.topk_targets(u @ u.transpose(-2, -1), 5)
    anchor = E.random_anchors(u, 10, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fa = E.EcoformerFastAttention(2, 8, nbits=8, m=10, topk=5).double()
    A0 = fa.ksh.A.clone()
    fa.ksh.fit(u, S, anchor)
    # mvec is the mean of the features, anchors are copied
    feats = E.rbf_features(u, anchor, torch.zeros_like(fa.ksh.mvec))
    torch.testing.assert_close(fa.ksh.mvec, feats.mean(dim=(0, 2), keepdim=True))
    assert torch.equal(fa.ksh.anchor, anchor)
    # bit 0 sees the undeflated targets: its binarised loss never gets worse, and improves for some head
    first = E.KernelSH(2, 8, nbits=1, m=10).double()
    first.A.copy_(A0[:, :1])
    loss1 = first.fit(u, S, anchor)
    ref = E.KernelSH(2, 8, nbits=1, m=10, iteration_n=0).double()
    ref.A.copy_(A0[:, :1])
    loss0 = ref.fit(u, S, anchor)
    assert (loss1 <= loss0).all() and (loss1 < loss0).any()
    torch.manual_seed(0)
    again = E.KernelSH(2, 8, nbits=8, m=10).double()
    again.fit(u, S, anchor)
    assert torch.equal(again.A, fa.ksh.A)


def test_ksh_labelled_deflation_learns_the_neighbourhoods():
    """With deflation on the labelled pairs only (the KSH paper's residual) and a larger step, the codes
    reproduce the top-k / bottom-k structure of clustered data far better than random projections."""
    rng = np.random.default_rng(2)
    u = clustered_tokens(rng)
    S = E.topk_targets(u @ u.transpose(-2, -1), 5)
    anchor = E.random_anchors(u, 10, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    k = E.KernelSH(2, 8, nbits=8, m=10, learning_rate=0.1, deflate="labelled").double()
    A0 = k.A.clone()
    k.fit(u, S, anchor)
    random = E.KernelSH(2, 8, nbits=8, m=10).double()
    random.anchor.copy_(k.anchor)
    random.mvec.copy_(k.mvec)
    random.A.copy_(A0)
    assert agreement(k(u), S) > agreement(random(u), S) + 1.0
    assert agreement(k(u), S) > 7.0  # out of b = 8


def test_hash_is_learned_once_in_training_and_never_after_loading():
    torch.manual_seed(0)
    att = E.EcoformerSelfAttention(16, num_heads=2, nbits=8, m=5, topk=3).train()
    x = torch.randn(2, 20, 16)
    att(x)
    assert att.fast_attention.is_trained
    A = att.fast_attention.ksh.A.clone()
    att(torch.randn(2, 20, 16))
    assert torch.equal(A, att.fast_attention.ksh.A)
    fresh = E.EcoformerSelfAttention(16, num_heads=2, nbits=8, m=5, topk=3).train()
    fresh.load_state_dict(att.state_dict())
    assert fresh.fast_attention.is_trained
    fresh(torch.randn(2, 20, 16))
    assert torch.equal(fresh.fast_attention.ksh.A, A)


def tiny_encoder(seed=0, **cfg):
    torch.manual_seed(seed)
    config = dict(vocab_size=20, dim=32, num_heads=[2, 4], depths=[2, 1], attn_types=["ecoformer", "msa"],
                  max_len=64, num_classes=5, nbits=16, m=9, pool="mean")
    config.update(cfg)
    model = E.EcoEncoder(**config)
    rng = np.random.default_rng(seed)
    for fa in model.attention_modules():
        random_hash(fa, rng)
        fa.is_trained = True
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("normalized, pool", [(False, "mean"), (True, "cls")])
def test_encoder_file_matches_torch(tmp_path, normalized, pool):
    import edgeformer

    model = tiny_encoder(normalized=normalized, pool=pool)
    path = E.save_edgeformer(model, tmp_path / "enc.edgeformer")
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 20, (3, 50))
    mask = np.ones((3, 50), bool)
    mask[1, 31:] = False
    mask[2, 5:] = False
    m64 = model.double()
    with torch.no_grad():
        logits = m64(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        hidden = m64.hidden(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    rt = edgeformer.load(path, threads=2)
    out = rt.run({"input_ids": ids, "attention_mask": mask.astype(np.int64)})
    rt.close()
    for bi in range(3):
        L = mask[bi].sum()
        np.testing.assert_allclose(out["last_hidden_state"][bi, :L], hidden[bi, :L], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)


def test_state_dict_loader_and_pvt_names(tmp_path):
    import edgeformer
    from converters.checkpoint import Checkpoint
    from edgeformer.graph import GraphBuilder

    model = tiny_encoder(seed=4)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # the loader registered for model_type "ecoformer" (checkpoint directories) builds the same graph
    builder = GraphBuilder("x")
    tensors = E.load_ecoformer(model.config, Checkpoint(dict(sd)), builder)
    assert any(n.attrs.get("kind") == "binary_hash" for n in builder.nodes)
    assert "block1.0.attn.anchors" in tensors and tensors["block1.0.attn.anchors"].shape == (2, 9, 16)
    # official PVTv2 layer names
    layers = E.pvt_v2_attention_layers(sd)
    assert sorted(layers) == ["block1.0", "block1.1", "block2.0"]
    assert layers["block1.0"]["kind"] == "binary_hash" and layers["block2.0"]["kind"] == "softmax"
    t = layers["block1.1"]["tensors"]
    assert t["attn.A"].shape == (2, 16, 9) and t["attn.mvec"].shape == (2, 9) and t["attn.uv.weight"].shape == (64, 32)
    # an image PVTv2 state dict: clear error naming what the runtime lacks
    bad = dict(sd)
    bad["patch_embed1.proj.weight"] = np.zeros((32, 3, 7, 7), np.float32)
    bad["block1.0.mlp.dwconv.dwconv.weight"] = np.zeros((64, 1, 3, 3), np.float32)
    with pytest.raises(EdgeformerError, match="patch embedding.*|depth-wise"):
        E.save_edgeformer(bad, tmp_path / "x.edgeformer", model.config)
    # broken ksh shapes
    bad = dict(sd)
    bad["block1.0.attn.fast_attention.ksh.mvec"] = np.zeros((1, 2, 1, 8), np.float32)
    with pytest.raises(EdgeformerError, match="mvec"):
        E.save_edgeformer(bad, tmp_path / "y.edgeformer", model.config)
    # a directory written by save_pretrained converts through the registered loader
    from converters.hf import convert_hf_directory

    out = convert_hf_directory(E.save_pretrained(model, tmp_path / "dir"), tmp_path / "dir.edgeformer")
    rt = edgeformer.load(out, threads=1)
    ids = np.random.default_rng(0).integers(0, 20, (2, 17))
    got = rt.run({"input_ids": ids})["logits"]
    rt.close()
    with torch.no_grad():
        want = model.double()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- hash fitting of a softmax model ------------------------------------------------------------------
def test_select_layers():
    from converters.hash_fit import select_layers

    assert select_layers("all-but-last", 4) == [0, 1, 2]
    assert select_layers(None, 1) == [0]
    assert select_layers("all", 3) == [0, 1, 2]
    assert select_layers("0-1,3", 5) == [0, 1, 3]
    assert select_layers([2], 3) == [2]
    with pytest.raises(EdgeformerError, match="out of range"):
        select_layers("7", 3)
    with pytest.raises(EdgeformerError, match="bad layer selection"):
        select_layers("first", 3)


def test_convert_bert_with_hash_fitting(tmp_path, capsys):
    """`edgeformer convert DIR --attention binary-hash`: layer 0 hashed (KSH against the model's own
    attention maps), layer 1 kept softmax, fidelity report printed and saved, the model runs."""
    pytest.importorskip("transformers")
    import json

    import edgeformer
    from edgeformer.cli import main
    from tests.helpers import save_tiny_bert

    src = save_tiny_bert(tmp_path / "bert", layers=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 120, (6, 24))
    mask = np.ones_like(ids)
    mask[2, 15:] = 0
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "hash.edgeformer"
    code = main(["convert", str(src), "-o", str(out), "--attention", "binary-hash", "--hash-bits", "8", "--anchors",
                 "10", "--calib", str(tmp_path / "calib.npz"), "--hash-layers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "attention cosine" in printed and "mean cosine" in printed
    report = json.loads((tmp_path / "hash.edgeformer.hashfit.json").read_text())
    assert [layer["index"] for layer in report["layers"]] == [0]
    layer = report["layers"][0]
    assert set(layer["attention_cosine"]) == {"official", "normalized"}
    assert -1.0 <= layer["attention_cosine"][layer["formula"]] <= 1.0
    assert 0.0 < report["outputs"]["last_hidden_state"]["mean_cosine"] <= 1.0 + 1e-9
    model = edgeformer.load(out, threads=1)
    kinds = [(n.attrs["kind"], n.attrs.get("qk_layout")) for n in model.graph.nodes if n.op == "attention"]
    assert kinds == [("binary_hash", "separate"), ("softmax", None)]
    node = next(n for n in model.graph.nodes if n.op == "attention")
    assert model.tensors[node.weights["A"]].shape == (5, 8, 10)
    assert model.tensors[node.weights["anchors"]].shape == (5, 10, 8)
    got = model.run({"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    model.close()
    assert np.isfinite(got).all()
    # options without --attention binary-hash are refused
    assert main(["convert", str(src), "-o", str(tmp_path / "x.edgeformer"), "--hash-layers", "all"]) == 1
