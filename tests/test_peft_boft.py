"""BOFT against HF PEFT beyond the logits (test_peft_parity.py): the block layouts PEFT accepts, its butterfly
permutations, the rotation and its gradients, the training-mode block dropout, the saved adapter_config.json, an
adapter PEFT trained without its CUDA extension (one factor whatever the config says); the config errors and the
budget knob.

PEFT runs boft_n_butterfly_factor > 1 only with its fbd_cuda extension; here a plain-PyTorch stand-in of that
block-diagonal op (peft_refs.FbdStandin) lets PEFT's own code run them on the CPU."""

import copy
import json
import warnings

import pytest
import torch
from peft_refs import SMOLLM2, SPECS, adapter_configs, randomize_, save_both, use_fbd_standin

from ftcore.compare import count_trainable, solve_budget
from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, apply, count_parameters, load_adapter, merge_and_unload
from ftcore.peft.boft import BoftLinear, block_layout
from ftcore.peft.io import config_from_peft

peft = pytest.importorskip("peft")
use_fbd_standin()
from peft.tuners.boft.layer import Linear as PeftBoftLinear  # noqa: E402

BOFT = [s for s in SPECS if s.startswith("boft")]


def peft_layer(in_features, out_features, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftBoftLinear(torch.nn.Linear(in_features, out_features), "default", peft.BOFTConfig(**kwargs))


LAYOUTS = [(i, size, num, m) for i in (64, 96, 12, 7) for size, num in ((4, 0), (8, 0), (3, 0), (2, 0), (0, 8),
                                                                         (0, 4), (0, 6), (0, 2), (64, 0), (0, 1))
           for m in (1, 2, 3)]  # fmt: skip


@pytest.mark.parametrize("in_features, size, num, m", LAYOUTS)
def test_block_layouts_and_permutations_equal_peft(in_features, size, num, m):
    """The combinations PEFT refuses we refuse; where it accepts, the same blocks and permutations (boft_P)."""
    ours = block_layout(in_features, size, num, m)
    try:
        theirs = peft_layer(in_features, 5, boft_block_size=size, boft_block_num=num, boft_n_butterfly_factor=m)
    except ValueError:
        assert isinstance(ours, str)
        return
    assert ours == (theirs.boft_block_num["default"], theirs.boft_block_size["default"])
    layer = BoftLinear(torch.nn.Linear(in_features, 5), size, num, m)
    perm_mats = torch.stack([torch.eye(in_features)[p] for p in layer.boft_perm])
    assert torch.equal(perm_mats, theirs.boft_P)
    assert layer.boft_R.shape == theirs.boft_R["default"].shape and layer.boft_s.shape == (5, 1)
    assert layer.permuted == [not torch.equal(p, torch.eye(in_features)) for p in theirs.boft_P]


@pytest.mark.parametrize("size, num, m", [(8, 0, 1), (4, 0, 3), (0, 8, 2), (2, 0, 4)])
def test_rotation_and_gradients_equal_peft(size, num, m):
    """R is PEFT's butterfly_oft_mat (orthogonal); outputs and the gradients of boft_R and boft_s are PEFT's."""
    theirs = peft_layer(96, 40, boft_block_size=size, boft_block_num=num, boft_n_butterfly_factor=m)
    ours = BoftLinear(copy.deepcopy(theirs.base_layer), size, num, m)
    randomize_([("boft_R", theirs.boft_R["default"]), ("boft_s", theirs.boft_s["default"])], seed=3)
    with torch.no_grad():
        ours.boft_R.copy_(theirs.boft_R["default"]), ours.boft_s.copy_(theirs.boft_s["default"])
    rotation, _ = theirs.get_delta_weight("default")
    assert (ours.rotation() - rotation).abs().max() < 1e-5
    assert (ours.rotation() @ ours.rotation().T - torch.eye(96)).abs().max() < 1e-5
    assert (ours.rotation() - torch.eye(96)).abs().max() > 0.1
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(5))
    (theirs(x) * upstream).sum().backward()
    (ours(x) * upstream).sum().backward()
    assert (ours(x) - theirs(x)).abs().max() < 1e-5
    for name, p in (("boft_R", ours.boft_R), ("boft_s", ours.boft_s)):
        ref = getattr(theirs, name)["default"].grad
        assert (p.grad - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item()) and ref.abs().max() > 1e-2


@pytest.mark.parametrize("kwargs", [dict(boft_block_size=8, boft_dropout=0.5),
                                    dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3,
                                         boft_dropout=0.3)])  # fmt: skip
def test_training_mode_block_dropout_replays_peft(kwargs):
    """Under the same seed a training-mode layer draws PEFT's factor (randint) and blocks (randperm) to set to I."""
    theirs = peft_layer(64, 32, **kwargs)
    ours = BoftLinear(copy.deepcopy(theirs.base_layer), kwargs.get("boft_block_size", 4),
                      kwargs.get("boft_block_num", 0), kwargs.get("boft_n_butterfly_factor", 1),
                      kwargs["boft_dropout"])  # fmt: skip
    randomize_([("boft_R", theirs.boft_R["default"]), ("boft_s", theirs.boft_s["default"])], seed=1)
    with torch.no_grad():
        ours.boft_R.copy_(theirs.boft_R["default"]), ours.boft_s.copy_(theirs.boft_s["default"])
    ours.train(), theirs.train()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        evaluated = ours.eval()(x)
        ours.train()
        outputs = set()
        for step in range(8):
            torch.manual_seed(100 + step)
            expected = theirs(x)
            torch.manual_seed(100 + step)
            got = ours(x)
            assert (got - expected).abs().max() < 1e-5, step
            assert (got - evaluated).abs().max() > 1e-3  # some blocks were dropped
            outputs.add(round(got.sum().item(), 4))
        assert len(outputs) > 1  # a new draw every forward


def test_no_dropout_draws_nothing_in_training_mode(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path), PeftConfig(method="boft", boft_block_size=8, boft_n_butterfly_factor=2)).train()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model(torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("spec", BOFT)
def test_adapter_config_is_peft_s(hf_checkpoint, tmp_path, spec):
    """adapter_config.json has PEFT's keys and values (but the bookkeeping PEFT adds itself)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    save_both(ref, path, spec, tmp_path)
    theirs, ours = adapter_configs(tmp_path)
    assert ours == theirs
    # the same tensors under the same names and shapes (boft_P is not saved by either); PEFT also saves a targeted
    # lm_head's base weight
    from safetensors import safe_open

    files = [safe_open(tmp_path / d / "adapter_model.safetensors", "pt") for d in ("peft", "ours")]
    shapes = [{k: f.get_slice(k).get_shape() for k in f.keys() if "base_layer" not in k} for f in files]
    assert shapes[0] == shapes[1] and not any("boft_P" in k for k in shapes[0])


def test_peft_without_its_cuda_extension_trains_one_factor(hf_checkpoint, tmp_path, monkeypatch):
    """PEFT without fbd_cuda keeps boft_n_butterfly_factor=3 in its config but builds and trains one factor: we load
    what its tensors hold (with a warning), so the logits are PEFT's."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    path, ref = hf_checkpoint("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(ref), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3,
                                                                     target_modules=["q_proj", "down_proj"]))
    randomize_([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=6)
    pm.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 3
    with pytest.warns(UserWarning, match=r"boft_n_butterfly_factor=3 but the saved boft_R tensors hold 1 factor"):
        model = load_adapter(load_model(path).eval(), tmp_path)
    assert model.peft_config.boft_n_butterfly_factor == 1
    assert model.layers[0].mlp.down_proj.boft_R.shape == (1, 24, 4, 4)
    tokens = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, base = pm(input_ids=tokens).logits, ref(tokens).logits
        assert (model(tokens) - expected).abs().max() < 1e-4 and (expected - base).abs().max() > 1e-2


def test_merged_model_equals_the_adapted_one(hf_checkpoint):
    path, _ = hf_checkpoint("llama_untied_bias")
    cfg = PeftConfig(method="boft", boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3,
                     target_modules=["o_proj", "down_proj"])
    model = apply(load_model(path).eval(), cfg)
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=8)
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (merge_and_unload(model)(tokens) - model(tokens)).abs().max() < 1e-4
        o = model.layers[1].self_attn.o_proj
        rotation = o.rotation()
        assert torch.allclose(o.merged_weight(), (o.weight @ rotation.T) * o.boft_s, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="boft", boft_block_size=0), "peft.boft_block_size=0: expected exactly one of boft_block_size and "
                                             "boft_block_num non-zero"),
    (dict(method="boft", boft_block_num=8), "peft.boft_block_num=8: expected exactly one of boft_block_size and "
                                            "boft_block_num non-zero (boft_block_size=4, boft_block_num=8; set the "
                                            "other to 0)"),
    (dict(method="boft", boft_block_size=-4), "peft.boft_block_size=-4: expected >= 0"),
    (dict(method="boft", boft_block_size=0, boft_block_num=-1), "peft.boft_block_num=-1: expected >= 0"),
    (dict(method="boft", boft_n_butterfly_factor=0), "peft.boft_n_butterfly_factor=0: expected a positive integer"),
    (dict(method="boft", boft_dropout=1.0), "peft.boft_dropout=1.0: expected a probability in [0, 1)"),
    (dict(method="lora", boft_block_size=8), "peft.boft_block_size=8: expected it unset: it is an option of boft, "
                                             "not of lora"),
    (dict(method="loha", boft_dropout=0.1), "peft.boft_dropout=0.1: expected it unset: it is an option of boft"),
    (dict(method="boft", r=4), "peft.r=4: expected it unset: it is an option of lora"),
    (dict(method="boft", dropout=0.1), "peft.dropout=0.1: expected it unset"),
    (dict(method="boft", init="gaussian"), "peft.init='gaussian': expected it unset"),
])  # fmt: skip
def test_bad_options_fail_naming_the_key(kwargs, message):
    with pytest.raises(FtcoreError) as e:
        PeftConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(boft_block_size=5), "peft.boft_block_size=5: layers.0.self_attn.q_proj: in_features 64 is not a multiple "
                              "of boft_block_size=5"),
    (dict(boft_block_size=64, target_modules=["down_proj"]), "peft.boft_block_size=64: layers.0.mlp.down_proj: "
                                                             "in_features 96 is not a multiple of boft_block_size=64"),
    (dict(boft_block_size=16, boft_n_butterfly_factor=4), "peft.boft_block_size=16: layers.0.self_attn.q_proj: "
                                                          "in_features 64 is not a multiple of boft_block_size * 2^3"),
    (dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=3),
     "peft.boft_block_num=2: layers.0.self_attn.q_proj: boft_block_num=2 must be a multiple of 2^2"),
    (dict(boft_block_size=0, boft_block_num=64, target_modules=["down_proj"]),
     "peft.boft_block_num=64: layers.0.mlp.down_proj: in_features 96 is not a multiple of boft_block_num=64"),
    (dict(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2, target_modules=["down_proj"]),
     "peft.boft_block_num=32: layers.0.mlp.down_proj: the 32 blocks of size 3 must both be even numbers"),
])  # fmt: skip
def test_layouts_a_layer_refuses_fail_naming_the_key_and_layer(hf_checkpoint, kwargs, message):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    with pytest.raises(FtcoreError) as e:
        apply(load_model(path), PeftConfig(method="boft", **kwargs))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported by ftcore"),
    ({"bias": "boft_only"}, "bias='boft_only' is not supported by ftcore (expected 'none')"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported by ftcore"),
    ({"boft_block_size": "8"}, "boft_block_size='8': expected int"),
    ({"boft_block_num": 8}, "peft.boft_block_num=8: expected exactly one of boft_block_size and boft_block_num"),
])  # fmt: skip
def test_unsupported_peft_values_fail_naming_the_file_and_key(tmp_path, change, message):
    where = tmp_path / "adapter_config.json"
    d = {"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 0, "target_modules": ["q_proj"], **change}
    with pytest.raises(FtcoreError) as e:
        config_from_peft(d, where)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_peft_defaults_when_keys_are_absent_and_init_weights_is_ignored(tmp_path):
    d = {"peft_type": "BOFT", "target_modules": ["q_proj"], "init_weights": False}  # the file's values replace it
    cfg = config_from_peft(d, tmp_path / "adapter_config.json")
    assert (cfg.boft_block_size, cfg.boft_block_num, cfg.boft_n_butterfly_factor, cfg.boft_dropout) == (4, 0, 1, 0.0)


def test_cuda_graph_refuses_block_dropout():
    with pytest.raises(FtcoreError, match=r"^train.cuda_graph: peft.boft_dropout draws on the host"):
        run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True},
                    "peft": {"method": "boft", "boft_dropout": 0.1}})  # fmt: skip
    run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True}, "peft": {"method": "boft"}})


def test_budget_solving():
    """boft_block_size H: m in H + out per layer; only the H dividing every in_features (576 and 1536) count."""
    ins, outs = 6 * 576 + 1536, 2 * 576 + 2 * 192 + 2 * 1536 + 576  # the 7 linear layers of a block
    assert count_trainable(SMOLLM2, {"method": "boft"}) == 30 * (4 * ins + outs) == 754_560  # conf/peft/boft.yaml
    s = solve_budget(SMOLLM2, {"method": "boft", "boft_block_size": 4}, 1_700_000, max_size=512)
    # H = 10 would fit (1,653,120) but does not divide 576, nor 9 1536: the largest valid one is 8
    assert (s.knob, s.size, s.trainable, s.note) == ("boft_block_size", 8, 30 * (8 * ins + outs), "")
    assert 30 * (10 * ins + outs) == 1_653_120
    assert count_trainable(SMOLLM2, {"method": "boft", "boft_block_size": 12}) > 1_700_000
    # block_num settings are replaced by a block size; two butterfly factors double the blocks' count
    settings = {"method": "boft", "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 2}
    s = solve_budget(SMOLLM2, settings, 3_000_000, max_size=512)
    assert (s.size, s.peft["boft_block_num"], s.trainable) == (8, 0, 30 * (2 * 8 * ins + outs))
    s = solve_budget(SMOLLM2, {"method": "boft"}, 10**9, max_size=100)
    assert (s.size, s.trainable) == (96, 30 * (96 * ins + outs)) and s.note.startswith("capped at boft_block_size=96")
    s = solve_budget(SMOLLM2, {"method": "boft"}, 1000, max_size=512)
    assert (s.size, s.note) == (1, "over budget at the smallest valid boft_block_size=1")
    # with 3 factors H must be even and 4 H divide 576 and 1536
    s = solve_budget(SMOLLM2, {"method": "boft", "boft_n_butterfly_factor": 3}, 10**9, max_size=512)
    assert s.size == 48
    with pytest.raises(FtcoreError, match=r"^compare: no boft_block_size up to 1 \(compare.max_r\)"):
        solve_budget(SMOLLM2, {"method": "boft", "boft_n_butterfly_factor": 2}, 10**6, max_size=1)


@pytest.mark.parametrize("settings", [{"method": "boft"}, {"method": "boft", "boft_block_size": 0, "boft_block_num": 4,
                                                           "boft_n_butterfly_factor": 3, "target_modules": ["o_proj"]}])
def test_meta_count_equals_a_real_model(settings):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    apply(model, PeftConfig(**settings))
    assert count_trainable(cfg, settings) == count_parameters(model)[0] > 0
