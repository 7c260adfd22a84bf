"""Adapters move both ways between HF PEFT and ftcore.peft with the same logits, for every method."""

import copy

import pytest
import torch
from peft_refs import (
    SPECS,
    VOCAB,
    make_tokenizer,
    our_config,
    peft_config,
    peft_logits,
    peft_model,
    randomize_,
    use_fbd_standin,
)

from ftcore.formats.hf import load_model
from ftcore.peft import apply, count_parameters, load_adapter, save_adapter

peft = pytest.importorskip("peft")
use_fbd_standin()  # PEFT's BOFT with every butterfly factor on the CPU (else it silently keeps one)

CASES = [(spec, "llama_gqa_llama3") for spec in SPECS]
CASES += [(spec, "llama_untied_bias") for spec in ("dora", "ia3", "lora_regex", "prefix", "vera", "hira", "hra", "hra_gs",
                                                   "loha", "lokr", "ln_tuning", "oft", "coft", "lily", "boft")]  # biases, n_kv = 1
CASES += [(spec, "qwen2") for spec in ("pissa", "vera", "hira", "hra", "hra_gs", "loha", "lokr_decompose", "adalora",
                                       "ln_tuning", "ln_tuning_list", "ln_tuning_regex", "oft", "oft_r_cayley", "oft_share",
                                       "coft", "lily", "lily_regex", "ptuning_mlp", "ptuning_lstm", "boft",
                                       "boft_butterfly", "boft_regex")]
CASES += [("lora_embed", "llama_tied"), ("lora_embed", "gemma2"), ("lora_embed", "gemma3")]  # the lookup only; lm_head
# keeps the base; Gemma scales the adapter's rows by sqrt(hidden) with the table's, as PEFT does
# q/k norms, post-norms, NoPE (PEFT has no default LN-tuning targets for OLMo 2 and SmolLM3)
CASES += [("lora", "qwen3"), ("ln_tuning", "qwen3"), ("lora", "olmo2"), ("ln_tuning_regex", "olmo2"), ("lora", "smollm3"),
          ("ln_tuning_regex", "smollm3"), ("lora", "gemma2"), ("ln_tuning", "gemma2"), ("lora", "gemma3"),
          ("ln_tuning", "gemma3")]  # fmt: skip
# Phi-3's fused qkv_proj / gate_up_proj as PEFT targets them; "all-linear" finds them (and Llama's seven); PEFT
# has no default LN-tuning targets for Phi-3
CASES += [("lora_all_linear", "phi3"), ("dora_fused", "phi3"), ("ia3_fused", "phi3"), ("oft_fused", "phi4_mini"),
          ("ln_tuning_list", "phi4_mini"), ("lora_all_linear", "llama_gqa_llama3"), ("lora_all_linear", "gemma2")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    return tokens, mask


def assert_close(ours, ref, mask, base):
    real = mask.bool()
    assert ours.shape == ref.shape
    assert (ours - ref)[real].abs().max().item() < 1e-4
    assert (ref - base)[real].abs().max().item() > 1e-2  # the adapter really changes the logits


@pytest.mark.parametrize("spec,variant", CASES)
def test_peft_adapter_loads_with_same_logits(hf_checkpoint, tokenizer_dir, tmp_path, spec, variant):
    path, ref = hf_checkpoint(variant)
    tokens, mask = batch()
    pm = peft_model(ref, spec, tokenizer_dir, seed=1)
    pm.save_pretrained(tmp_path)
    model = load_adapter(load_model(path).eval(), tmp_path)
    with torch.no_grad():
        base = ref(tokens, attention_mask=mask).logits
        assert_close(model(tokens, attention_mask=mask), peft_logits(pm, tokens, mask), mask, base)
        assert_close(model(tokens), peft_logits(pm, tokens), torch.ones_like(mask), ref(tokens).logits)


@pytest.mark.parametrize("spec,variant", CASES)
def test_our_adapter_loads_in_peft_with_same_logits(hf_checkpoint, tokenizer_dir, tmp_path, spec, variant):
    path, ref = hf_checkpoint(variant)
    tokens, mask = batch()
    model = apply(load_model(path).eval(), our_config(spec, tokenizer_dir))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=2)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path).eval()
    with torch.no_grad():
        base = ref(tokens, attention_mask=mask).logits
        assert_close(model(tokens, attention_mask=mask), peft_logits(pm, tokens, mask), mask, base)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_trainable_parameter_counts_equal_peft(hf_checkpoint, tokenizer_dir, spec):
    path, ref = hf_checkpoint("llama_gqa_llama3")
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config(spec, tokenizer_dir))
    model = apply(load_model(path), our_config(spec, tokenizer_dir))
    assert count_parameters(model) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("spec", ["ptuning_mlp", "ptuning_lstm"])
@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2"])
def test_ptuning_encoder_computes_peft_soft_tokens(hf_checkpoint, tmp_path, spec, variant):
    """With PEFT's encoder weights (same module names), our encoder's soft tokens and logits are PEFT's training-mode
    ones (its encoder runs: not what either saves), in eval mode and with the LSTM's dropout in train mode."""
    path, ref = hf_checkpoint(variant)
    tokens, mask = batch()
    pm = peft_model(ref, spec, seed=3)
    theirs = pm.prompt_encoder["default"]
    model = apply(load_model(path).eval(), our_config(spec))
    model.prompt_encoder.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        diff = (model.prompt_encoder.output() - pm.get_prompt(1)[0]).abs().max().item()
        assert diff < 1e-6
        base = ref(tokens, attention_mask=mask).logits
        assert_close(model(tokens, attention_mask=mask), peft_logits(pm, tokens, mask), mask, base)
    pm.train()
    model.train()
    torch.manual_seed(7)
    train_theirs = pm.get_prompt(1)[0]
    torch.manual_seed(7)
    train_ours = model.prompt_encoder.output()
    assert (train_ours - train_theirs).abs().max() < 1e-6
    if spec == "ptuning_lstm":  # the dropout between the LSTM layers did act
        assert (train_ours - model.eval().prompt_encoder.output()).abs().max() > 1e-3
    # what PEFT saves is that output (eval mode), and ftcore writes the same tensor
    pm.eval()
    model.eval()
    pm.save_pretrained(tmp_path / "peft")
    save_adapter(model, tmp_path / "ours")
    from safetensors.torch import load_file

    saved, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == ours.keys() == {"prompt_embeddings"}
    assert (saved["prompt_embeddings"] - ours["prompt_embeddings"]).abs().max() < 1e-6


def test_all_linear_lists_what_peft_lists_and_llama_targets_fail_on_phi3(hf_checkpoint, tmp_path):
    """"all-linear" resolves to PEFT's layer set (saved as such); Llama's default names name no Phi-3 layer."""
    import json

    from ftcore.errors import FtcoreError
    from ftcore.peft import PeftConfig

    path, ref = hf_checkpoint("phi3")
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config("lora_all_linear"))
    model = apply(load_model(path), our_config("lora_all_linear"))
    theirs = set(pm.peft_config["default"].target_modules)
    assert set(model.peft_config.target_modules) == theirs and len(theirs) == 8  # 2 layers x 4 (no lm_head)
    save_adapter(model, tmp_path)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == theirs
    with pytest.raises(FtcoreError, match="peft.target_modules: 'q_proj' matches no linear or embedding module of "
                                          "this model; linear or embedding modules: embed_tokens, qkv_proj, o_proj, "
                                          'gate_up_proj, down_proj, lm_head; or "all-linear"'):
        apply(load_model(path), PeftConfig())
