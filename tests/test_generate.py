"""Batched KV-cache generation against greedy decoding over transformers' forward, its generate(), and recompute."""

import pytest
import torch
from greedy_ref import assert_greedy_equal, reference_greedy
from hf_models import LONG_ROPE

from ftcore.formats.hf import load_model
from ftcore.model.generate import generate, left_pad, sample_next

VOCAB = 97


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


VARIANTS = ["llama_gqa_llama3", "llama_tied", "mistral", "qwen2", "qwen3", "olmo2", "smollm3", "gemma2", "gemma3",
            "phi3", "phi4_mini"]


def hf_forward(ref):
    return lambda ids: ref(input_ids=ids).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_batched_equals_reference_greedy(hf_checkpoint, variant):
    """Greedy by definition over transformers' forward, for each prompt alone; ours batched with left padding.

    LongRoPE's factors follow the batch's longest row (HF's rule), so there each prompt runs alone too; its
    prompts of 1-12 tokens cross the original 16-token context while generating (generate re-prefills).
    """
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    prompts = random_prompts((5, 12, 1))
    ours = generate(model, prompts, 32, pad_id=0)  # no stop ids: always 32 tokens
    if variant in LONG_ROPE:
        ours = [generate(model, [p], 32, pad_id=0)[0] for p in prompts]
    assert [len(r) for r in ours] == [32, 32, 32]
    for prompt, row in zip(prompts, ours):
        expected, gaps = reference_greedy(hf_forward(ref), prompt, 32)
        assert_greedy_equal(row, expected, gaps, min_decisive=16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_batched_equals_hf_generate(hf_checkpoint, variant):
    """transformers' own batched generate() with the same left padding, up to each row's first near-tie."""
    path, ref = hf_checkpoint(variant)
    model = load_model(path).eval()
    prompts = random_prompts((5, 12, 1))
    ours = generate(model, prompts, 32, pad_id=0)
    tokens, mask = left_pad(prompts, 0, "cpu")
    ref.generation_config.eos_token_id = None
    out = ref.generate(tokens, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    theirs = out[:, tokens.shape[1] :].tolist()
    for prompt, row, their_row in zip(prompts, ours, theirs):
        _, gaps = reference_greedy(hf_forward(ref), prompt, 32)
        assert_greedy_equal(row, their_row, gaps, min_decisive=16)
    if variant not in LONG_ROPE:  # a padded row generates what it generates alone
        assert generate(model, [prompts[0]], 32, pad_id=0)[0] == ours[0]
    else:  # the re-prefill at the switch is what the cache must reproduce
        assert generate(model, prompts, 32, pad_id=0, use_cache=False) == ours


def test_cache_equals_recompute_and_stops(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = load_model(path).eval()
    prompts = random_prompts((4, 9))
    cached = generate(model, prompts, 16, pad_id=0)
    assert cached == generate(model, prompts, 16, pad_id=0, use_cache=False)
    stop = cached[0][5]
    stopped = generate(model, prompts, 16, pad_id=0, stop_ids={stop})
    assert stopped[0] == cached[0][: cached[0].index(stop)]
    assert stop not in stopped[1]


def test_sampling_is_seeded_and_top_p_restricts():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(2000, 1)
    a = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    b = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.tolist()) >= {0, 1, 2}  # full distribution: the tail is sampled too
    # p(0) = 0.71, p(1) = 0.26: the nucleus for top_p=0.9 is {0, 1}
    nucleus = sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1}
    assert torch.equal(sample_next(logits, 0.0, 1.0, None), torch.zeros(2000, dtype=torch.long))
