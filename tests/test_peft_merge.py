"""LoRA/DoRA/IA3/VeRA/HiRA/HRA/LoHa/LoKr/AdaLoRA/OFT/BOFT/LN tuning invariants: zero-init is a no-op, base names
survive, merge/unmerge, init choices."""

from dataclasses import replace

import pytest
import torch
from peft_refs import ALL_LINEAR, randomize_

from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer
from ftcore.model.decoder import RMSNorm
from ftcore.peft import PeftConfig, adapter_layers, apply, merge, merge_and_unload, unload, unmerge

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  qkv_bias=True, o_bias=True, mlp_bias=True)  # biases: IA3 scales them, DoRA must skip them
METHODS = {
    "lora": PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR + ["lm_head"]),
    "rslora": PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, use_rslora=True, target_modules=ALL_LINEAR),
    "lora_embed": PeftConfig(method="lora", r=4, alpha=8, use_rslora=True, target_modules=["embed_tokens", "v_proj"]),
    "gaussian": PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, init="gaussian", target_modules=ALL_LINEAR),
    "dora": PeftConfig(method="dora", r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR + ["lm_head"]),
    "ia3": PeftConfig(method="ia3"),
    "olora": PeftConfig(method="lora", r=4, alpha=8, dropout=0.0, init="olora", target_modules=ALL_LINEAR),
    "vera": PeftConfig(method="vera", r=8, dropout=0.0, target_modules=ALL_LINEAR + ["lm_head"]),
    "hira": PeftConfig(method="hira", r=4, dropout=0.0, target_modules=ALL_LINEAR + ["lm_head"]),
    "hra": PeftConfig(method="hra", r=4, target_modules=ALL_LINEAR + ["lm_head"]),
    "hra_gs": PeftConfig(method="hra", r=4, apply_GS=True, init="random", target_modules=ALL_LINEAR),
    "ln_tuning": PeftConfig(method="ln_tuning"),
    "adalora": PeftConfig(method="adalora", init_r=4, target_r=2, dropout=0.0, target_modules=ALL_LINEAR),
    "loha": PeftConfig(method="loha", r=4, alpha=32, rank_dropout=0.5, module_dropout=0.5,
                       target_modules=ALL_LINEAR + ["lm_head"]),
    "lokr": PeftConfig(method="lokr", r=4, alpha=8, target_modules=ALL_LINEAR + ["lm_head"]),
    "lokr_lycoris": PeftConfig(method="lokr", r=2, alpha=4, decompose_both=True, decompose_factor=8, init="lycoris",
                               rank_dropout=0.5, target_modules=ALL_LINEAR + ["lm_head"]),
    "oft": PeftConfig(method="oft", oft_block_size=8, target_modules=ALL_LINEAR + ["lm_head"]),
    "oft_cayley": PeftConfig(method="oft", r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=ALL_LINEAR),
    # the projection binds (the random vectors are far outside the eps ball), one shared block per layer
    "coft_share": PeftConfig(method="oft", oft_block_size=16, coft=True, eps=0.3, block_share=True,
                             target_modules=ALL_LINEAR + ["lm_head"]),
    "boft": PeftConfig(method="boft", boft_block_size=8, boft_dropout=0.5, target_modules=ALL_LINEAR + ["lm_head"]),
    "boft_butterfly": PeftConfig(method="boft", boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3,
                                 target_modules=ALL_LINEAR),
    "ia3_all": PeftConfig(method="ia3", ia3_target_modules=ALL_LINEAR, feedforward_modules=["down_proj", "o_proj"]),
}
UNMERGEABLE = {  # adapter layers HF PEFT does not merge either
    "lily": PeftConfig(method="lily", r=4, stride_A=2, num_B=3, target_modules=ALL_LINEAR + ["lm_head"]),
}


def tiny_model(seed=0):
    model = Transformer(CFG)
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def tokens():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(UNMERGEABLE))
def test_fresh_adapter_is_a_no_op_and_keeps_base_names(name):
    model = tiny_model()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        before = model(tokens())
    apply(model, {**METHODS, **UNMERGEABLE}[name])
    with torch.no_grad():
        after = model(tokens())
    # OLoRA's residual W - s B A (s B A is the whole QR part, not its scale-free top) rounds at ~1e-6
    # HRA's paired reflections cancel up to rounding: ~1.5e-6 on these logits, as PEFT's own identity start
    tolerance = 1e-5 if name == "olora" else 5e-6 if name == "hra" else 1e-6
    if name == "hra_gs":  # HRA's random init (PEFT's init_weights=False) starts at random reflections
        assert (after - before).abs().max() > 1e-2
    else:
        assert torch.equal(before, after) if name.startswith("ia3") else (after - before).abs().max() < tolerance
    keys = set(model.state_dict())
    assert base_keys <= keys  # `layers.0.self_attn.q_proj.weight` is still `...q_proj.weight`
    extra = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in keys - base_keys
             if not k.startswith("lily_projectors.")}
    assert extra <= {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "ia3_l", "vera_lambda_b", "vera_lambda_d", "hira_A",
                     "hira_B", "lora_E", "ranknum", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
                     "hra_u", "ln_tuning_layers", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "oft_R",
                     "lily_router", "boft_R", "boft_s"}
    # a base checkpoint still loads into the adapted model, by the same names
    fresh = tiny_model(seed=1).state_dict()
    missing, unexpected = model.load_state_dict(fresh, strict=False)
    assert not unexpected and set(missing) == keys - base_keys


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merge_unmerge(name):
    model = apply(tiny_model(), METHODS[name])
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=4, std=0.1)
    with torch.no_grad():
        base = tiny_model()(tokens())
        unmerged = model(tokens())  # (COFT projects its vectors in place here, as PEFT)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = merge_and_unload(model)(tokens())  # a separate plain model; `model` is untouched
        merge(model)
        merged = model(tokens())
        unmerge(model)
        again = model(tokens())
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters
    assert (merged - unmerged).abs().max() < 1e-5
    assert (plain - unmerged).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5
    for k, v in model.state_dict().items():
        assert (v - weights[k]).abs().max() < 1e-5, k


def test_lily_shares_projectors_as_peft_and_refuses_to_merge():
    model = apply(tiny_model(), UNMERGEABLE["lily"])
    shared = model.lily_projectors
    q0, q1 = model.layers[0].self_attn.q_proj, model.layers[1].self_attn.q_proj
    v0, down1 = model.layers[0].self_attn.v_proj, model.layers[1].mlp.down_proj
    assert q0.lily_A is q1.lily_A and q0.lily_B is q1.lily_B  # stride_A=2: both layers' A, and the group's B
    assert q0.lily_A is not v0.lily_A and q0.lily_B is not v0.lily_B  # another target entry, another group
    assert q0.lily_router is not q1.lily_router and q0.lily_router.shape == (3, 4)  # per layer
    assert down1.lily_A.shape == (4, 96) and down1.lily_B.shape == (3 * 4, 64)
    # 8 groups (7 entries + lm_head) x one A (2 layers, stride 2) and one B
    assert len(list(shared.parameters())) == 16 and {n for n, _ in shared.named_parameters()} >= {"A_0_0", "B_0"}
    assert torch.equal(q0.lily_B, torch.zeros_like(q0.lily_B))
    bound = 1 / 64**0.5  # kaiming-uniform(a=sqrt(5)) on A [r, in]
    assert q0.lily_A.abs().max() <= bound and q0.lily_A.abs().max() > 0.8 * bound
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=4, std=0.1)
    for fn in (merge, merge_and_unload):
        with pytest.raises(FtcoreError, match=r"^peft.method=lily: its router mixes .* cannot be merged"):
            fn(model)
    # the update's formula: scaling * h (sum_e p_e B_e) with p the softmax of router h averaged over all tokens
    x = torch.randn(2, 5, 64)
    h = x @ q1.lily_A.T
    p = torch.softmax(h @ q1.lily_router.T, -1).reshape(-1, 3).mean(0)
    b = (p[:, None, None] * q1.lily_B.reshape(3, 4, 64)).sum(0)
    with torch.no_grad():
        assert (q1(x) - (x @ q1.weight.T + q1.bias + h @ b)).abs().max() < 1e-5
    unload(model)
    assert model.lily_projectors is None and type(model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lora_init_choices_and_scaling():
    model = apply(tiny_model(), METHODS["gaussian"])
    q = model.layers[0].self_attn.q_proj
    assert torch.equal(q.lora_B.weight, torch.zeros_like(q.lora_B.weight))
    assert abs(q.lora_A.weight.std().item() - 1 / 4) < 0.05  # PEFT's gaussian: N(0, 1/r)
    assert q.scaling == 8 / 4
    kaiming = apply(tiny_model(), METHODS["lora"]).layers[0].self_attn.q_proj
    bound = 1 / 64**0.5  # kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert kaiming.lora_A.weight.abs().max() <= bound and kaiming.lora_A.weight.abs().max() > 0.8 * bound
    rs = apply(tiny_model(), METHODS["rslora"]).layers[0].self_attn.q_proj
    assert rs.scaling == 8 / 4**0.5
    # the seed, not the global RNG, decides the init
    again = apply(tiny_model(), METHODS["lora"]).layers[0].self_attn.q_proj
    assert torch.equal(again.lora_A.weight, kaiming.lora_A.weight)


def test_dora_magnitude_starts_at_the_weight_norm():
    model = apply(tiny_model(), METHODS["dora"])
    v = model.layers[1].self_attn.v_proj
    assert torch.allclose(v.lora_magnitude_vector, v.weight.norm(dim=1))


def test_dora_with_dropout_trains_like_peft_formula():
    """Train mode with dropout takes PEFT's other DoRA branch: W dropout(x) instead of reusing W x."""
    torch.manual_seed(0)
    layer_model = apply(tiny_model(), PeftConfig(method="dora", r=4, alpha=8, dropout=0.5, target_modules=["q_proj"]))
    q = layer_model.layers[0].self_attn.q_proj.train()
    randomize_([(n, p) for n, p in q.named_parameters() if p.requires_grad], seed=5)
    x = torch.randn(3, 64)
    torch.manual_seed(1)
    y = q(x)
    torch.manual_seed(1)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    w = q.weight
    delta = q.lora_B.weight @ q.lora_A.weight * q.scaling
    scale = q.lora_magnitude_vector / (w + delta).norm(dim=1)
    expected = x @ w.T + q.bias + (scale - 1) * (xd @ w.T) + scale * (xd @ delta.T)
    assert (y - expected).abs().max() < 1e-5


def test_embedding_lora_on_tied_weights_merges_only_by_export():
    """With tie_word_embeddings the embedding's adapter changes the lookup, not lm_head: an in-place merge would
    change both (an error), the merged export unties them."""
    model = Transformer(replace(CFG, tie_word_embeddings=True))
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(0))
    apply(model.eval(), PeftConfig(method="lora", r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=4, std=0.1)
    assert model.lm_head.weight is model.embed_tokens.weight
    with pytest.raises(FtcoreError, match=r"^peft.merge: embed_tokens shares its weight with lm_head"):
        merge(model)
    plain = merge_and_unload(model)
    assert not plain.cfg.tie_word_embeddings and plain.lm_head.weight is not plain.embed_tokens.weight
    with torch.no_grad():
        assert (plain(tokens()) - model(tokens())).abs().max() < 1e-5
        assert torch.equal(plain.lm_head.weight, model.lm_head.weight)


def test_new_layers_take_the_models_mode():
    """apply() on an eval model: the swapped-in layers are in eval mode too (their dropout is off)."""
    model = apply(tiny_model(), PeftConfig(method="lora", r=4, alpha=8, dropout=0.5, target_modules=ALL_LINEAR))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=4, std=0.1)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens()), model(tokens()))


@pytest.mark.parametrize("name", ["lora", "lora_embed", "ln_tuning"])
def test_unload_restores_plain_layers(name):
    model = apply(tiny_model(), METHODS[name])
    with torch.no_grad():
        before = tiny_model()(tokens())
    unload(model)
    assert not adapter_layers(model) and model.peft_config is None
    assert type(model.layers[0].self_attn.v_proj) is torch.nn.Linear
    assert type(model.embed_tokens) is torch.nn.Embedding
    assert type(model.layers[1].input_layernorm) is type(model.norm) is RMSNorm
    with torch.no_grad():
        assert torch.equal(model(tokens()), before)
