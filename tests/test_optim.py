"""LR schedules (pure functions of the step) and AdamW parameter groups."""

import math

import pytest
import torch

from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer
from ftcore.train.optim import OptimConfig, build_optimizer, lr_at, param_groups


def test_warmup_is_linear_to_peak():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(4, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "schedule, middle, end",
    [("cosine", 0.5 * (1e-3 + 1e-4), 1e-4), ("linear", 0.5 * (1e-3 + 1e-4), 1e-4), ("constant", 1e-3, 1e-3)],
)
def test_schedule_values_at_warmup_end_middle_and_end(schedule, middle, end):
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    max_steps = 111  # decay spans steps 10..110: the middle is step 60
    assert lr_at(10, cfg, max_steps) == pytest.approx(1e-3)
    assert lr_at(60, cfg, max_steps) == pytest.approx(middle)
    assert lr_at(110, cfg, max_steps) == pytest.approx(end)
    assert lr_at(500, cfg, max_steps) == pytest.approx(end)  # past the end: stays at the floor


def test_cosine_quarter_point():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(25, cfg, 101) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_names_allowed_values():
    with pytest.raises(FtcoreError, match="optim.schedule='cosin': expected one of cosine, linear, constant"):
        OptimConfig(schedule="cosin")


def test_no_decay_on_norms_and_biases():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2, qkv_bias=True)
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("norm.weight", "bias")) for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"layers.0.self_attn.q_proj.weight", "embed_tokens.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    model.requires_grad_(False)
    with pytest.raises(FtcoreError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


def test_flop_accounting_counts_every_matmul_parameter():
    from ftcore.train.flops import matmul_params, train_flops_per_token

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=False)  # fmt: skip
    model = Transformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg) == linear
    assert train_flops_per_token(cfg, 1, True) == pytest.approx(6 * linear + 3 * 2 * 2 * 32)
    assert train_flops_per_token(cfg, 1, False) == pytest.approx(4 * linear + 2 * 2 * 2 * 32)
