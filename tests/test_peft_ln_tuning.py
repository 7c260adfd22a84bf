"""LN tuning against HF PEFT beyond the logits (test_peft_parity.py): the saved keys and adapter_config.json,
PEFT's per-architecture defaults read back, targets that are not norms, merge; config errors and the fixed size."""

import copy

import pytest
import torch
from peft_refs import SPECS, adapter_configs, our_config, peft_config, randomize_

from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.formats.safetensors import SafetensorsFile
from ftcore.peft import PeftConfig, adapter_state, apply, count_parameters, load_adapter, merge, save_adapter, unmerge
from ftcore.peft.ln_tuning import LnTuningNorm

peft = pytest.importorskip("peft")

LN = [s for s in SPECS if s.startswith("ln_tuning")]


@pytest.mark.parametrize("spec", LN)
def test_saved_keys_and_config_are_peft_s(hf_checkpoint, tmp_path, spec):
    """The same tensor names and shapes (`...input_layernorm.ln_tuning_layers.weight` [D]) and adapter_config.json
    (but the bookkeeping PEFT adds itself); the copies start at the base weights."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config(spec))
    pm.save_pretrained(tmp_path / "peft")
    model = apply(load_model(path), our_config(spec))
    save_adapter(model, tmp_path / "ours")
    theirs, ours = (SafetensorsFile(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(ours.names()) == sorted(theirs.names()) and len(ours.names()) > 0
    for name in ours.names():
        assert name.endswith(("layernorm.ln_tuning_layers.weight", "model.norm.ln_tuning_layers.weight"))
        assert ours.shape(name) == theirs.shape(name) == (64,)
        assert torch.equal(ours.get(name), theirs.get(name))  # the base weight, copied
    theirs, ours = adapter_configs(tmp_path)
    assert ours == theirs


def test_peft_s_qwen2_default_reads_back(hf_checkpoint, tmp_path):
    """PEFT resolves LN tuning's default per architecture (Qwen2: post_attention_layernorm only) and saves it."""
    path, ref = hf_checkpoint("qwen2")
    pm = peft.get_peft_model(copy.deepcopy(ref), peft.LNTuningConfig())
    randomize_([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=3)
    pm.save_pretrained(tmp_path)
    model = load_adapter(load_model(path).eval(), tmp_path)
    assert model.peft_config.ln_tuning_target_modules == ["post_attention_layernorm"]
    assert sorted(adapter_state(model)) == sorted(n.replace(".default", "") for n, p in pm.named_parameters()
                                                  if p.requires_grad)  # fmt: skip
    assert count_parameters(model) == pm.get_nb_trainable_parameters() == (2 * 64, count_parameters(model)[1])
    assert isinstance(model.layers[0].post_attention_layernorm, LnTuningNorm)
    assert not isinstance(model.layers[0].input_layernorm, LnTuningNorm) and not isinstance(model.norm, LnTuningNorm)


def test_merge_swaps_the_tuned_weights_in(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path).eval(), PeftConfig(method="ln_tuning"))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=4)
    norm = model.layers[1].input_layernorm
    base, tuned = norm.weight.clone(), norm.ln_tuning_layers.weight.clone()
    assert not torch.equal(base, tuned) and not norm.weight.requires_grad and norm.ln_tuning_layers.weight.requires_grad
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        merge(model)
        assert torch.equal(norm.weight, tuned) and torch.equal(model(tokens), before)
        key = "base_model.model.model.layers.1.input_layernorm.ln_tuning_layers.weight"
        assert torch.equal(adapter_state(model)[key], tuned)  # saving while merged still saves the tuned copy
        unmerge(model)
        assert torch.equal(norm.weight, base) and torch.equal(model(tokens), before)


def test_fast_paths_reach_the_tuned_norms(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path), PeftConfig(method="ln_tuning"))
    model.set_fast_paths(fused_kernels=True, loss_chunk_size=0)
    assert model.norm.fused_kernels and model.norm.ln_tuning_layers.fused_kernels


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(FtcoreError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_targets_must_be_norms(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    known = "norm modules: input_layernorm, post_attention_layernorm, norm"
    msg = error(apply, load_model(path), PeftConfig(method="ln_tuning", ln_tuning_target_modules=["q_proj"]))
    assert msg == f"peft.ln_tuning_target_modules: 'q_proj' matches no norm module of this model; {known}"
    msg = error(apply, load_model(path), PeftConfig(method="ln_tuning", ln_tuning_target_modules=r".*\.(norm|q_proj)"))
    assert msg.startswith(r"peft.ln_tuning_target_modules: '.*\\.(norm|q_proj)' also matches "
                          "model.layers.0.self_attn.q_proj, which is not a norm (LN tuning tunes norm layers only)")
    msg = error(apply, load_model(path), PeftConfig(method="ln_tuning", ln_tuning_target_modules=r".*proj"))
    assert msg.startswith(r"peft.ln_tuning_target_modules: '.*proj' matches no norm module of this model")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lora", ln_tuning_target_modules=["norm"]), "peft.ln_tuning_target_modules=['norm']: expected it "
                                                             "unset: it is an option of ln_tuning, not of lora"),
    (dict(method="ln_tuning", target_modules=["input_layernorm"]), "peft.target_modules=['input_layernorm']: expected "
                                                                   "it unset: it is an option of lora"),
    (dict(method="ln_tuning", r=4), "peft.r=4: expected it unset"),
    (dict(method="ln_tuning", ln_tuning_target_modules=[]), "peft.ln_tuning_target_modules=[]: expected at least one"),
    (dict(method="ln_tuning", ln_tuning_target_modules=""), "peft.ln_tuning_target_modules='': expected a list of "
                                                            "module names or one regex"),
])  # fmt: skip
def test_bad_options_fail_naming_the_key(kwargs, message):
    assert error(PeftConfig, **kwargs).startswith(message)
