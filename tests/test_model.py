"""Our model against transformers on random checkpoints of every supported variant."""

import pytest
import torch
import torch.nn.functional as F
from hf_models import LONG_ROPE, VARIANTS

from ftcore.data.format import IGNORE
from ftcore.formats.hf import load_model, save_pretrained
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


NEW_FAMILIES = ["qwen3", "olmo2", "smollm3", "gemma2", "gemma3", "phi3", "phi4_mini"]


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2", "mistral_window", *NEW_FAMILIES])
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


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2", *NEW_FAMILIES])
def test_kv_cache_matches_full_forward(hf_checkpoint, variant):
    path, _ = hf_checkpoint(variant)
    model = load_model(path).eval()
    n = 16 if variant in LONG_ROPE else 20  # within LongRoPE's short range (crossing it: test_long_rope_switch)
    tokens = torch.randint(0, VOCAB, (2, n))
    cache = KVCache(model.cfg, 2, 32, torch.float32)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :12], kv_cache=cache)]
        parts += [model(tokens[:, t : t + 1], kv_cache=cache) for t in range(12, n)]
    assert cache.length == n
    # float32 rounding of other kernel shapes only; Gemma 3's logits reach 5 and differ by up to 2.7e-5 (30 seeds)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < (5e-5 if variant == "gemma3" else 1e-5)


@pytest.mark.parametrize("variant", LONG_ROPE)
def test_long_rope_switches_factors_past_the_original_context(hf_checkpoint, variant):
    """A sequence of 16 tokens (the original context) takes the short factors, one of 17 the long ones for every
    position, as transformers' Phi-3 does; the attention factor applies to both."""
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    assert model.cfg.long_rope_after == 16 and abs(model.rope_scale - 2**0.5) < 1e-12  # 256 / 16 = 16x extension
    tokens = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        short, long = model(tokens[:, :16]), model(tokens)
        assert (long - ref(tokens).logits).abs().max().item() < 1e-4
    assert (long[:, :16] - short).abs().max().item() > 1e-3  # the first 16 positions moved to the long factors
    assert model.cfg.rotary_dim == (12 if variant == "phi4_mini" else 16)


def test_tied_embeddings_share_storage(hf_checkpoint):
    path, _ = hf_checkpoint("llama_tied")
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = load_model(hf_checkpoint("llama_gqa_llama3")[0])
    assert untied.lm_head.weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "llama_tied", *NEW_FAMILIES, "qwen3_tied"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_training_loss_equals_cross_entropy_over_transformers_logits(hf_checkpoint, variant, chunk):
    """The loss inside forward (plain, or chunked over 7 target tokens at a time) against F.cross_entropy over
    transformers' logits, with left padding and ignored positions."""
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    model.loss_chunk_size = chunk
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :6] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = torch.randint(0, VOCAB, (2, 24), generator=g)
    targets[mask == 0] = IGNORE
    targets[0, :4] = IGNORE
    with torch.no_grad():
        logits = ref(tokens, attention_mask=mask, position_ids=positions).logits
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        loss, count = model(tokens, attention_mask=mask, position_ids=positions, targets=targets)
    assert count.item() == (targets != IGNORE).sum().item()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_saved_model_loads_in_transformers_with_equal_logits(hf_checkpoint, variant, tmp_path):
    import transformers

    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    save_pretrained(model, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (back(tokens).logits - ref(tokens).logits).abs().max().item() < 1e-5


def test_long_rope_factors_follow_real_tokens_not_static_padding(hf_checkpoint):
    """A 10-token example padded to a fixed 40 (data.static_shape) trains on the short factors, as unpadded."""
    from ftcore.data.collate import collate

    path, _ = hf_checkpoint("phi3")
    model = load_model(path).eval()
    ex = {"input_ids": list(range(3, 13)), "labels": list(range(3, 13))}
    losses = []
    for length in (None, 40):
        b = collate([[ex]], pad_id=0, length=length)
        with torch.no_grad():
            loss, n = model(b["input_ids"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                            targets=b["targets"])  # fmt: skip
        losses.append(loss.item() / n.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
