"""HRA against HF PEFT beyond the logits (test_peft_parity.py): the init draws and its identity start, the
reflections' product against PEFT's own get_delta_weight, the saved adapter_config.json; config errors and the
budget knob."""

import copy
import dataclasses

import pytest
import torch
from peft_refs import SMOLLM2, SPECS, adapter_configs, our_config, peft_config, randomize_, save_both

from ftcore.compare import count_trainable, solve_budget
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.peft import PeftConfig, adapter_state, apply, merge, unmerge
from ftcore.peft.io import config_from_peft

peft = pytest.importorskip("peft")

HRA = [s for s in SPECS if s.startswith("hra")]


@pytest.mark.parametrize("spec", HRA)
def test_init_draws_equal_peft(hf_checkpoint, spec):
    """Our seeded generator replays PEFT's global-RNG draws exactly (even r: the half draw, repeated columns)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config(spec))
    expected = {n.removesuffix(".default"): p for n, p in pm.named_parameters() if p.requires_grad}
    model = apply(load_model(path), dataclasses.replace(our_config(spec), seed=11))
    ours = adapter_state(model)
    assert ours.keys() == expected.keys() and len(ours) > 0
    for name, t in ours.items():
        assert torch.equal(t, expected[name]), name
        assert t.abs().max() > 0


def test_even_r_starts_at_the_identity(hf_checkpoint):
    """PEFT's symmetric init: columns 2k and 2k+1 equal, so the reflections cancel in pairs (the base model)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path).eval(), PeftConfig(method="hra", r=6, target_modules=["q_proj", "down_proj"]))
    u = model.layers[0].mlp.down_proj.hra_u
    assert u.shape == (96, 6) and torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() < 1e-5
    with pytest.warns(UserWarning, match="needs an even r"):
        apply(load_model(path), PeftConfig(method="hra", r=3, target_modules=["q_proj"]))


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_merged_weight_is_peft_s_product(hf_checkpoint, apply_gs, r):
    """W R with R = PEFT's get_delta_weight (the [in, in] product of reflections, or I - 2QQ^T), from the same hra_u;
    unmerge multiplies by PEFT's reverse product (R^T)."""
    path, ref = hf_checkpoint("llama_untied_bias")
    cfg = peft.HRAConfig(r=r, apply_GS=apply_gs, init_weights=False, target_modules=["down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(ref), cfg)
    randomize_([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=r)
    theirs = pm.base_model.model.model.layers[1].mlp.down_proj
    model = apply(load_model(path), PeftConfig(method="hra", r=r, apply_GS=apply_gs, init="random",
                                               target_modules=["down_proj"]))  # fmt: skip
    ours = model.layers[1].mlp.down_proj
    with torch.no_grad():
        ours.hra_u.copy_(theirs.hra_u["default"])
        rot = theirs.get_delta_weight("default")  # [in, in]
        assert (rot @ rot.T - torch.eye(96)).abs().max() < 1e-5
        expected = theirs.get_base_layer().weight @ rot
        assert (ours.merged_weight() - expected).abs().max() < 1e-5
        assert (ours.merged_weight() - ours.weight).abs().max() > 1e-2
        x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
        w = ours.weight.clone()
        merge(model)
        assert (ours.weight - expected).abs().max() < 1e-5 and (ours(x) - theirs(x)).abs().max() < 1e-5
        unmerge(model)
        assert (ours.weight - w).abs().max() < 1e-5


@pytest.mark.parametrize("spec", HRA)
def test_adapter_config_is_peft_s(hf_checkpoint, tmp_path, spec):
    """adapter_config.json has PEFT's keys and values (but the bookkeeping PEFT adds itself)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    save_both(ref, path, spec, tmp_path)
    theirs, ours = adapter_configs(tmp_path)
    assert ours == theirs


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lora", apply_GS=True), "peft.apply_GS=True: expected it unset: it is an option of hra, not of lora"),
    (dict(method="hra", init="gaussian"), "peft.init='gaussian': expected one of kaiming-uniform, random"),
    (dict(method="hra", r=0), "peft.r=0: expected a positive integer"),
    (dict(method="hra", dropout=0.1), "peft.dropout=0.1: expected it unset: it is an option of lora, dora, vera"),
    (dict(method="hra", alpha=4), "peft.alpha=4: expected it unset"),
])  # fmt: skip
def test_bad_options_fail_naming_the_key(kwargs, message):
    with pytest.raises(FtcoreError) as e:
        PeftConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_peft_config_both_ways(tmp_path):
    where = tmp_path / "adapter_config.json"
    cfg = config_from_peft({"peft_type": "HRA", "target_modules": ["q_proj"], "init_weights": False,
                            "apply_GS": True}, where)  # fmt: skip
    assert (cfg.method, cfg.r, cfg.init, cfg.apply_GS) == ("hra", 8, "random", True)
    for change, message in [({"init_weights": "gaussian"}, "init_weights='gaussian' is not supported by ftcore "
                                                            "for HRA"),
                            ({"apply_GS": "yes"}, "apply_GS='yes': expected bool"),
                            ({"bias": "hra_only"}, "bias='hra_only' is not supported by ftcore"),
                            ({"layers_to_transform": [0]}, "layers_to_transform=[0] is not supported")]:  # fmt: skip
        with pytest.raises(FtcoreError) as e:
            config_from_peft({"peft_type": "HRA", "r": 4, "target_modules": ["q_proj"], **change}, where)
        assert str(e.value).startswith(f"{where}: {message}"), str(e.value)


def test_budget_knob_is_r():
    # hra_u [in, r] per adapted layer: q, k, v, gate, up read 576 features, o 576, down 1536
    per_rank = 30 * (576 * 6 + 1536)
    settings = {"method": "hra", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]}  # fmt: skip
    assert count_trainable(SMOLLM2, settings) == 8 * per_rank
    s = solve_budget(SMOLLM2, settings, 1_000_000, max_size=512)
    assert (s.knob, s.size, s.trainable, s.note) == ("r", 1_000_000 // per_rank, (1_000_000 // per_rank) * per_rank, "")
