"""PiSSA and OLoRA initializations: the model starts equal to the base, the saved adapter is converted to a plain
LoRA on the original base (as PEFT's path_initial_model_for_weight_conversion), the randomized SVD is torch's."""

import copy

import pytest
import torch
from peft_refs import VOCAB

from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.peft import PeftConfig, apply, load_adapter, merge_and_unload, save_adapter, unload
from ftcore.peft.lora_init import svd_lowrank

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
INITS = ["pissa", "pissa_niter_2", "olora"]


def tokens():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def perturb(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "qwen2"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rslora", [False, True])
def test_initialized_equals_base_and_saved_adapter_applies_to_the_original(hf_checkpoint, tmp_path, variant, init,
                                                                           rslora):  # fmt: skip
    path, _ = hf_checkpoint(variant)
    base = load_model(path).eval()
    with torch.no_grad():
        expected = base(tokens())
    model = apply(load_model(path).eval(), PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, init=init,
                                                      use_rslora=rslora, target_modules=TARGETS))  # fmt: skip
    q = model.layers[0].self_attn.q_proj
    assert not torch.equal(q.weight, base.layers[0].self_attn.q_proj.weight)  # the base holds the residual
    with torch.no_grad():
        assert (model(tokens()) - expected).abs().max() < 1e-4
    perturb(model)
    with torch.no_grad():
        trained = model(tokens())
    assert (trained - expected).abs().max() > 1e-2
    save_adapter(model, tmp_path)
    loaded = load_adapter(load_model(path).eval(), tmp_path)  # a plain LoRA of rank 8 on the original weights
    assert loaded.peft_config.r == 8 and loaded.peft_config.init == "kaiming-uniform"
    assert loaded.layers[0].self_attn.q_proj.scaling == pytest.approx(q.scaling)
    assert torch.equal(loaded.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert (loaded(tokens()) - trained).abs().max() < 1e-4
        assert (merge_and_unload(model)(tokens()) - trained).abs().max() < 1e-4
    unload(model)  # the original weights come back
    assert (model.layers[0].self_attn.q_proj.weight - base.layers[0].self_attn.q_proj.weight).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(12, 16), (16, 12)])
def test_svd_lowrank_is_torchs_with_a_generator(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected = torch.svd_lowrank(w, 4, niter=2)
    for ours, ref in zip(svd_lowrank(w, 4, 2, torch.Generator().manual_seed(5)), expected):
        assert torch.equal(ours, ref)


def test_peft_converted_pissa_niter_adapter_loads_with_the_same_logits(hf_checkpoint, tmp_path):
    """PEFT's own conversion (path_initial_model_for_weight_conversion) of a fast-SVD PiSSA adapter."""
    peft = pytest.importorskip("peft")
    path, ref = hf_checkpoint("llama_gqa_llama3")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa_niter_3", target_modules=["q_proj", "o_proj"])
    pm = peft.get_peft_model(copy.deepcopy(ref), config)
    pm.save_pretrained(tmp_path / "init")
    perturb(pm)
    pm.eval().save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = load_adapter(load_model(path).eval(), tmp_path / "out")
    with torch.no_grad():
        assert (model(tokens()) - pm(tokens()).logits).abs().max() < 1e-4


def test_peft_unconverted_pissa_niter_adapter_warns(hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    path, ref = hf_checkpoint("llama_gqa_llama3")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa_niter_3", target_modules=["q_proj"])
    peft.get_peft_model(copy.deepcopy(ref), config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"init_lora_weights='pissa_niter_3' was saved unconverted"):
        load_adapter(load_model(path), tmp_path)


@pytest.mark.parametrize("init, expected", [
    ("pisa", r"peft.init='pisa': expected one of kaiming-uniform, gaussian, pissa, pissa_niter_<N>, olora"),
    ("pissa_niter_", r"peft.init='pissa_niter_': expected one of"),
])  # fmt: skip
def test_unknown_init_fails_naming_the_key(init, expected):
    with pytest.raises(FtcoreError, match=expected):
        PeftConfig(method="lora", init=init)


def test_an_unsupported_peft_init_fails_naming_the_file(tmp_path):
    from ftcore.peft.io import config_from_peft

    with pytest.raises(FtcoreError, match=r"adapter_config.json: init_lora_weights='corda' is not supported"):
        config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                          "init_lora_weights": "corda"}, tmp_path / "adapter_config.json")  # fmt: skip


def test_a_principal_init_refuses_a_tied_lm_head(hf_checkpoint):
    path, _ = hf_checkpoint("llama_tied")
    with pytest.raises(FtcoreError, match=r"peft.init='olora': lm_head shares its weight with embed_tokens"):
        apply(load_model(path), PeftConfig(method="lora", init="olora", target_modules=["q_proj", "lm_head"]))
