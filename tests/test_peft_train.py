"""Training invariants: only adapter parameters get gradients; activation checkpointing changes nothing."""

import pytest
import torch
import torch.nn.functional as F
from peft_refs import ALL_LINEAR, randomize_
from torch.utils.checkpoint import checkpoint

from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, adapter_parameters, apply, count_parameters, summary

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True)
METHODS = {
    "lora": PeftConfig(method="lora", r=4, alpha=8, dropout=0.1, target_modules=ALL_LINEAR + ["lm_head"]),
    "rslora": PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "lora_embed": PeftConfig(method="lora", r=4, alpha=8, dropout=0.1, target_modules=["embed_tokens", "q_proj"]),
    "dora": PeftConfig(method="dora", r=4, alpha=8, dropout=0.1, target_modules=ALL_LINEAR),
    "ia3": PeftConfig(method="ia3"),
    "pissa": PeftConfig(method="lora", r=4, alpha=8, dropout=0.1, init="pissa", target_modules=ALL_LINEAR),
    "vera": PeftConfig(method="vera", r=8, dropout=0.1, target_modules=ALL_LINEAR),
    "hira": PeftConfig(method="hira", r=4, dropout=0.1, target_modules=ALL_LINEAR),
    "hra": PeftConfig(method="hra", r=4, target_modules=ALL_LINEAR + ["lm_head"]),
    "hra_gs": PeftConfig(method="hra", r=3, apply_GS=True, target_modules=ALL_LINEAR),
    "ln_tuning": PeftConfig(method="ln_tuning"),
    "adalora": PeftConfig(method="adalora", init_r=4, target_r=2, dropout=0.1, target_modules=ALL_LINEAR),
    "loha": PeftConfig(method="loha", r=4, alpha=8, rank_dropout=0.1, target_modules=ALL_LINEAR + ["lm_head"]),
    "lokr": PeftConfig(method="lokr", r=4, alpha=8, rank_dropout=0.1, rank_dropout_scale=True,
                       target_modules=ALL_LINEAR + ["lm_head"]),
    "lokr_decompose": PeftConfig(method="lokr", r=2, alpha=4, decompose_both=True, decompose_factor=8, init="lycoris",
                                 target_modules=ALL_LINEAR),
    "oft": PeftConfig(method="oft", oft_block_size=8, target_modules=ALL_LINEAR + ["lm_head"]),
    "oft_cayley": PeftConfig(method="oft", r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=ALL_LINEAR),
    "coft_share": PeftConfig(method="oft", oft_block_size=16, coft=True, eps=0.3, block_share=True,
                             target_modules=ALL_LINEAR),
    "lily": PeftConfig(method="lily", r=4, stride_A=2, num_B=3, target_modules=ALL_LINEAR + ["lm_head"]),
    "boft": PeftConfig(method="boft", boft_block_size=8, boft_n_butterfly_factor=2, boft_dropout=0.25,
                       target_modules=ALL_LINEAR + ["lm_head"]),
    "prefix": PeftConfig(method="prefix", num_virtual_tokens=3),
    "prefix_proj": PeftConfig(method="prefix", num_virtual_tokens=3, prefix_projection=True, prefix_hidden_size=16),
    "prompt": PeftConfig(method="prompt", num_virtual_tokens=4, prompt_init="sample_vocab"),
    "ptuning_mlp": PeftConfig(method="ptuning", num_virtual_tokens=3, encoder_hidden_size=16),
    "ptuning_lstm": PeftConfig(method="ptuning", num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                               encoder_hidden_size=8, encoder_num_layers=2, encoder_dropout=0.1),
    "full_frozen": PeftConfig(method="full", freeze=["embed_tokens.*", "layers.0.*"]),
}


def make(name):
    model = Transformer(CFG)
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(0))
    apply(model, METHODS[name])
    if name != "full_frozen":  # move off the zero init so that every adapter tensor gets a gradient
        randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=1, std=0.1)
    return model.train()


def loss_and_grads(model, ckpt: bool):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    if ckpt:  # per-block activation checkpointing, as parallel.py will apply it
        for block in model.layers:
            block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    torch.manual_seed(3)  # dropout masks; checkpoint replays the RNG state on recompute
    logits = model(tokens[:, :-1], attention_mask=mask[:, :-1])
    labels = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_adapter_parameters_get_gradients(name):
    model = make(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if name == "full_frozen":
        assert not any(n.startswith(("embed_tokens.", "layers.0.")) for n in trainable)
        assert "layers.1.mlp.up_proj.weight" in trainable and "norm.weight" in trainable
    else:
        assert {id(p) for n, p in model.named_parameters() if n in trainable} == {id(p) for p in adapter_parameters(model)}
        assert all(any(s in n for s in ("lora_", "ia3_l", "vera_lambda_", "hira_", "hra_u", "ln_tuning_layers.",
                                        "hada_w", "lokr_w", "oft_R.", "boft_", "lily_", "_encoder.")) for n in trainable)  # fmt: skip
    _, grads = loss_and_grads(model, ckpt=False)
    for n, grad in grads.items():
        if n in trainable:
            assert grad is not None and grad.abs().sum() > 0, n
        else:
            assert grad is None, n
    trainable_count, total = count_parameters(model)
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad) and total > trainable_count
    assert f"trainable params: {trainable_count:,}" in summary(model)


@pytest.mark.parametrize("name", ["lora", "lora_embed", "dora", "ia3", "prefix_proj", "prompt", "loha", "lokr", "pissa",
                                  "vera", "hira", "hra", "hra_gs", "adalora", "ln_tuning", "oft", "oft_cayley",
                                  "coft_share", "lily", "ptuning_mlp", "ptuning_lstm", "boft"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    loss, grads = loss_and_grads(make(name), ckpt=False)
    loss_ckpt, grads_ckpt = loss_and_grads(make(name), ckpt=True)
    assert torch.equal(loss, loss_ckpt)
    for n, g in grads.items():
        if g is not None:
            assert (g - grads_ckpt[n]).abs().max() < 1e-6, n


def test_dora_weight_norm_gets_no_gradient():
    """DoRA's row norm is detached: the magnitude's gradient is dL/dy * (Wx + sBAx) / ||W + sBA|| exactly."""
    model = make("dora")
    q = model.layers[0].self_attn.q_proj.eval()
    x = torch.randn(5, 64)
    q(x).sum().backward()
    w = q.weight + q.lora_B.weight @ q.lora_A.weight * q.scaling
    expected = (x @ w.T).sum(0) / w.norm(dim=1)
    assert (q.lora_magnitude_vector.grad - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["lora", "lora_embed", "dora", "ia3", "prefix_proj", "prompt", "loha", "lokr", "pissa",
                                  "vera", "hira", "hra", "hra_gs", "adalora", "ln_tuning", "oft", "oft_cayley",
                                  "coft_share", "lily", "ptuning_mlp", "ptuning_lstm", "boft"])
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_base_keeps_fp32_adapters(name, autocast):
    """A bf16 base (plain or under autocast) trains fp32 adapter parameters without dtype errors."""
    model = Transformer(CFG).to(torch.bfloat16)
    model.init_weights(std=0.08)
    apply(model, METHODS[name])
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model))
    tokens = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(model))
