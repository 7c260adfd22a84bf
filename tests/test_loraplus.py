"""LoRA+: the optimizer's parameter groups and learning rates equal PEFT's create_loraplus_optimizer."""

import copy

import pytest
import torch

from ftcore.config import OptimConfig
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.peft import PeftConfig, apply
from ftcore.train.optim import build_optimizer, set_lr

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def our_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.model.").replace(".default", "").removesuffix(
        "lora_magnitude_vector.weight") + ("lora_magnitude_vector" if "magnitude" in peft_name else "")


@pytest.mark.parametrize("dora,embed", [(False, False), (True, False), (False, True)])
def test_groups_and_learning_rates_equal_peft(hf_checkpoint, dora, embed):
    """embed: LoRA on embed_tokens too, whose A and B form PEFT's embedding group (loraplus_lr_embedding)."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    path, ref = hf_checkpoint("llama_untied_bias")
    targets = ALL_LINEAR + ["embed_tokens"] * embed
    pm = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=dora))  # fmt: skip
    expected = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.01)  # fmt: skip
    names = {id(p): n for n, p in pm.named_parameters()}
    model = apply(load_model(path), PeftConfig(method="dora" if dora else "lora", r=4, alpha=8,
                                               target_modules=targets))  # fmt: skip
    ours = build_optimizer(model, OptimConfig(lr=2e-4, weight_decay=0.01, loraplus_lr_ratio=16))
    our_names = {id(p): n for n, p in model.named_parameters()}
    assert len(ours.param_groups) == len(expected.param_groups) == 4
    for g, e in zip(ours.param_groups, expected.param_groups):
        # the same parameters (the order inside a group does not change AdamW's per-parameter update)
        assert sorted(our_names[id(p)] for p in g["params"]) == sorted(our_name(names[id(p)]) for p in e["params"])
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-12) and g["weight_decay"] == e["weight_decay"]
    assert sum(len(g["params"]) for g in ours.param_groups[2:]) > 0 and ours.param_groups[0]["params"]
    assert len(ours.param_groups[1]["params"]) == 2 * embed  # lora_embedding_A and _B
    set_lr(ours, 1e-4)  # the schedule scales every group alike (as a LambdaLR over PEFT's groups would)
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([1e-4, 5e-7, 1.6e-3, 1.6e-3])


def test_loraplus_needs_a_lora_adapter(hf_checkpoint):
    path, _ = hf_checkpoint("llama_untied_bias")
    model = apply(load_model(path), PeftConfig(method="ia3"))
    with pytest.raises(FtcoreError, match=r"optim.loraplus_lr_ratio=16: LoRA\+ needs a LoRA adapter"):
        build_optimizer(model, OptimConfig(loraplus_lr_ratio=16))


def test_a_negative_ratio_fails_naming_the_key():
    with pytest.raises(FtcoreError, match=r"optim.loraplus_lr_ratio=-1: expected >= 0"):
        OptimConfig(loraplus_lr_ratio=-1)
