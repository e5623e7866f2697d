"""The PyTorch MemoryFormer reference modules (converters/memoryformer.py) against the runtime: the memory
layer against edgeformer.functional.memory_layer, RMSNorm/rotary against the graph ops, and a whole random
model against its converted model file (both state-dict namings). Skipped without torch."""
import numpy as np
import pytest

from tests.optional import requires_torch, torch

pytestmark = requires_torch

F32 = np.float32


def _mf():
    from converters import memoryformer

    return memoryformer


@pytest.mark.parametrize("mode", ["code_l1_times_prob", "paper_prob"])
@pytest.mark.parametrize("zero_bit", [0, 1])
def test_memory_layer_module_matches_functional(mode, zero_bit):
    from edgeformer.functional.memory_layer import memory_layer, memory_layer_codes

    torch.manual_seed(0)
    k, tau, n = 5, 8, 70
    layer = _mf().MemoryLayer(k * tau, n, k, tau, temperature=0.7, weight_mode=mode, zero_bit=zero_bit)
    x = torch.randn(3, 9, k * tau)
    x[torch.rand_like(x) < 0.1] = 0.0  # exact zeros: the zero convention decides their bit
    with torch.no_grad():
        idx, w = layer.encode(x)
        want = layer(x).numpy()
    kw = dict(num_tables=k, code_length=tau, temperature=0.7, weight_mode=mode, zero_bit=zero_bit)
    codes, ew = memory_layer_codes(x.numpy(), **kw)
    np.testing.assert_array_equal(codes.reshape(-1, k) + np.arange(k) * (1 << tau), idx.numpy())
    np.testing.assert_allclose(ew.reshape(-1, k), w.numpy(), rtol=2e-6)
    got = memory_layer(x.numpy(), layer.tables.detach().numpy(), layer.bias.detach().numpy(), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_memory_layer_module_gradients_flow_to_tables_and_input():
    torch.manual_seed(0)
    layer = _mf().MemoryLayer(16, 8, 2, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.tables.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # through the weights w(z)
    used = set((layer.encode(x)[0]).flatten().tolist())
    assert (layer.tables.grad.abs().sum(1) > 0).nonzero().flatten().tolist() == sorted(used)  # only gathered rows


def _random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = _mf().MemoryFormerLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or missing tensor cannot pass
        for name, p in model.named_parameters():
            if name.endswith((".scale", "mlp.1.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _neox_names(state_dict, num_layers):
    """GPT-NeoX pipeline naming (sequential.N.*): 0 embedding, 2..L+1 layers, L+3 norm, L+4 head."""
    out = {}
    for name, value in state_dict.items():
        if name.startswith("layers."):
            i, rest = name[len("layers."):].split(".", 1)
            out[f"sequential.{int(i) + 2}.{rest}"] = value
        elif name.startswith("word_embeddings"):
            out[f"sequential.0.{name}"] = value
        elif name.startswith("norm."):
            out[f"sequential.{num_layers + 3}.{name}"] = value
        else:
            out[f"sequential.{num_layers + 4}.{name}"] = value
    return out


@pytest.mark.parametrize("naming", ["module", "neox"])
def test_random_torch_model_and_model_file_agree(tmp_path, naming):
    import edgeformer

    mf = _mf()
    cfg = mf.MemoryFormerConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_tables=4,
                                code_length=8, rotary_pct=0.5)
    model = _random_model(cfg)
    sd = model.state_dict()
    if naming == "neox":
        sd = _neox_names(sd, cfg.num_layers)
    path = mf.convert_memoryformer(sd, cfg.to_dict(), tmp_path / "mf.edgeformer")
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).numpy()
    ef = edgeformer.load(path, threads=2)
    try:
        got = ef.run({"input_ids": ids.numpy()})
        lengths = [20, 13, 1]  # right padding: each sequence must equal the unpadded torch run on its prefix
        mask = (np.arange(20)[None] < np.array(lengths)[:, None]).astype(np.int64)
        padded = ef.run({"input_ids": ids.numpy(), "attention_mask": mask})["logits"]
    finally:
        ef.close()
    np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for b, n in enumerate(lengths):
        with torch.no_grad():
            prefix = model(ids[b:b + 1, :n]).numpy()[0]
        np.testing.assert_allclose(padded[b, :n], prefix, rtol=1e-4, atol=1e-4 * np.abs(prefix).max())


@pytest.mark.parametrize("table_dtype,tol", [("fp16", 3e-3), ("int8", 6e-2)])
def test_compact_tables_stay_close_to_fp32(tmp_path, table_dtype, tol):
    import edgeformer

    mf = _mf()
    cfg = mf.MemoryFormerConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_tables=4, code_length=8)
    model = _random_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).numpy()
    full = mf.convert_memoryformer(model.state_dict(), cfg.to_dict(), tmp_path / "a.edgeformer")
    small = mf.convert_memoryformer(model.state_dict(), cfg.to_dict(), tmp_path / "b.edgeformer",
                                    table_dtype=table_dtype)
    ef = edgeformer.load(small, threads=1)
    try:
        got = ef.run({"input_ids": ids.numpy()})["logits"]
        tables = [ef.tensors[n.weights["tables"]].nbytes for n in ef.graph.nodes if n.attrs.get("format") == "lut"]
    finally:
        ef.close()
    ef32 = edgeformer.load(full, threads=1)
    tables32 = [ef32.tensors[n.weights["tables"]].nbytes for n in ef32.graph.nodes if n.attrs.get("format") == "lut"]
    ef32.close()
    assert sum(tables) * (2 if table_dtype == "fp16" else 4) == sum(tables32)
    err = np.abs(got - want).max(-1) / np.abs(want).max()  # (B, S) per token
    if table_dtype == "fp16":
        assert err.max() < tol, err.max()
    else:
        # int8 rounding (<= max|row| / 254 per entry) moves later memory layers' inputs, and an input near 0
        # flips its sign bit and selects another row: a few tokens jump, the typical token stays close
        assert np.median(err) < tol / 3, np.median(err)
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.mean() > 0.97, cos.mean()


def test_rms_norm_op_matches_neox_module_and_torch_rms_norm():
    from edgeformer.kernels.rms_norm import rms_norm

    torch.manual_seed(0)
    norm = _mf().RMSNorm(48, eps=1e-8)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
    x = torch.randn(7, 48) * 3
    scale = norm.scale.detach().numpy().copy()
    scale.setflags(write=False)
    out = np.empty((7, 48), F32)
    rms_norm(x.numpy(), scale, 1e-8, True, out, 0, 7)
    with torch.no_grad():
        np.testing.assert_allclose(out, norm(x).numpy(), rtol=2e-6, atol=2e-6)
    rms_norm(x.numpy(), scale, 1e-5, False, out, 0, 7)
    want = torch.nn.functional.rms_norm(x, (48,), norm.scale.detach(), eps=1e-5).numpy()
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6)
