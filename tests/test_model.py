"""Our model against transformers on random checkpoints of every supported variant."""

import pytest
import torch
from hf_models import VARIANTS

from ftcore.formats.hf import load_model
from ftcore.model import KVCache

VOCAB = 97


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(hf_checkpoint, variant):
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        expected, got = ref(tokens).logits, model(tokens)
    assert got.shape == (2, 40, VOCAB)
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.abs().max().item() > 0.5  # the comparison is not between near-zero tensors


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2", "mistral_window"])
def test_left_padded_logits_match_transformers(hf_checkpoint, variant):
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    tokens = torch.randint(0, VOCAB, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :17] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(tokens, attention_mask=mask, position_ids=positions).logits
        got = model(tokens, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < 1e-4
    assert torch.isfinite(got).all()  # rows of padding tokens are not NaN


def test_sliding_window_changes_long_sequences(hf_checkpoint):
    path, _ = hf_checkpoint("mistral_window")
    model = load_model(path).eval()
    tokens = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        windowed = model(tokens)
        model.cfg.sliding_window = 0
        full = model(tokens)
    assert torch.equal(windowed[:, :8], full[:, :8])  # inside the window: identical
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3  # beyond it: the window matters


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2"])
def test_kv_cache_matches_full_forward(hf_checkpoint, variant):
    path, _ = hf_checkpoint(variant)
    model = load_model(path).eval()
    tokens = torch.randint(0, VOCAB, (2, 20))
    cache = KVCache(model.cfg, 2, 32, torch.float32)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :12], kv_cache=cache)]
        parts += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_tied_embeddings_share_storage(hf_checkpoint):
    path, _ = hf_checkpoint("llama_tied")
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = load_model(hf_checkpoint("llama_gqa_llama3")[0])
    assert untied.lm_head.weight is not untied.embed_tokens.weight
