"""OFT against HF PEFT beyond the logits (test_peft_parity.py): the block sizing, the rotation blocks (Cayley-Neumann
and Cayley), COFT's projection and its in-place updates over training steps, the input-side merge, the saved
adapter_config.json; config errors and the budget knob."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft_refs import ALL_LINEAR, SMOLLM2, SPECS, adapter_configs, peft_config, randomize_, save_both

from ftcore.compare import count_trainable, solve_budget
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, adapter_state, apply, count_parameters, load_adapter, save_adapter
from ftcore.peft.io import config_from_peft
from ftcore.peft.oft import OftLinear, adjust, resolve

peft = pytest.importorskip("peft")
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

OFT = [s for s in SPECS if "oft" in s and not s.startswith("boft")]


def test_defaults_are_peft_s():
    cfg, theirs = PeftConfig(method="oft"), peft.OFTConfig()
    assert (cfg.r, cfg.oft_block_size) == (theirs.r, theirs.oft_block_size) == (0, 32)  # r at our default: unset
    for key in ("coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "module_dropout"):
        assert getattr(cfg, key) == getattr(theirs, key), key
    assert cfg.use_cayley_neumann is True  # PEFT's default path is the Neumann series (its docstring says False)
    assert PeftConfig(method="oft", oft_block_size=0).r == 16  # sized by r: 16 blocks


@pytest.mark.parametrize("in_features", [64, 96, 97, 576, 1536])
def test_block_sizes_move_to_peft_s_divisor(in_features):
    for value in range(1, in_features + 6):
        assert adjust(in_features, value) == OFTLayer.adjust_oft_parameters(None, in_features, value), value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve(64, 0, 12) == (8, 8)  # the tie goes to the smaller divisor
        assert resolve(96, 0, 12) == (8, 12) and resolve(64, 0, 100) == (1, 64) and resolve(64, 5, 0) == (4, 16)
    with pytest.warns(UserWarning, match=r"Invalid `oft_block_size` \(12\)! Adjusted `oft_block_size` to \(8\)"):
        resolve(64, 0, 12)


def _pair(block_size, rows, **kw):
    ours = OftLinear(torch.nn.Linear(block_size * 4, 8), r=0 if rows == 1 else 4, oft_block_size=block_size,
                     block_share=rows == 1, **kw)  # fmt: skip
    theirs = OFTRotationModule(rows if rows == 1 else 4, block_size * (block_size - 1) // 2, block_size, block_size * 4,
                               block_share=rows == 1, **kw)  # fmt: skip
    v = torch.randn(theirs.weight.shape, generator=torch.Generator().manual_seed(block_size))
    with torch.no_grad():
        ours.oft_R.weight.copy_(v)
        theirs.weight.copy_(v)
    return ours, theirs


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 8])
def test_cayley_neumann_blocks_equal_peft(terms):
    ours, theirs = _pair(6, 4, num_cayley_neumann_terms=terms)
    expected = theirs._cayley_batch(theirs.weight, 6, True, terms)
    assert torch.equal(ours.blocks(), expected)
    if terms >= 5:  # small vectors: the series is nearly orthogonal
        with torch.no_grad():
            ours.oft_R.weight.mul_(0.01)
        r = ours.blocks()
        assert (r @ r.transpose(-1, -2) - torch.eye(6)).abs().max() < 1e-5


def test_exact_cayley_is_orthogonal_and_peft_s():
    ours, theirs = _pair(8, 4, use_cayley_neumann=False)
    r = ours.blocks()
    assert torch.equal(r, theirs._cayley_batch(theirs.weight, 8, False))
    assert (r @ r.transpose(-1, -2) - torch.eye(8)).abs().max() < 1e-5
    x = torch.randn(3, 5, 32)
    assert torch.equal(ours.rotate(x), theirs(x))


@pytest.mark.parametrize("rows", [4, 1])
def test_coft_projection_equals_peft(rows):
    ours, theirs = _pair(8, rows, coft=True, eps=0.5)
    x = torch.randn(2, 32)
    assert torch.equal(ours.rotate(x), theirs(x))  # both project their weight in place first
    assert torch.equal(ours.oft_R.weight, theirs.weight)
    norms = ours.skew(ours.oft_R.weight).norm(dim=(1, 2))
    assert (norms - 0.5 / rows**0.5).abs().max() < 1e-6  # every (random, large) block moved onto the eps sphere


def test_merge_rotates_the_input_side():
    base = torch.nn.Linear(16, 5)
    layer = OftLinear(base, oft_block_size=4)
    randomize_([("w", layer.oft_R.weight)], seed=3)
    bd = torch.block_diag(*layer.blocks())
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert (layer(x) - F.linear(x @ bd, base.weight, base.bias)).abs().max() < 1e-6
        assert (layer.merged_weight() - base.weight @ bd.T).abs().max() < 1e-6
        assert torch.equal(layer.merged_bias(), base.bias)


def test_coft_training_steps_equal_peft(hf_checkpoint, tmp_path):
    """Three AdamW steps, both sides projecting their stored vectors in place at every forward (PEFT's COFT)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config("coft"))
    randomize_([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=4)
    pm.save_pretrained(tmp_path)
    model = load_adapter(load_model(path), tmp_path)
    for m in (model, pm):
        m.train()
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    params = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    ours = adapter_state(model)
    opt_ours = torch.optim.AdamW(list(ours.values()), lr=1e-2)
    opt_theirs = torch.optim.AdamW([params[k] for k in ours], lr=1e-2)
    for _ in range(3):
        for m, opt in ((model, opt_ours), (pm, opt_theirs)):
            logits = m(tokens) if m is model else m(input_ids=tokens).logits
            F.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    for k, t in ours.items():
        assert (t - params[k]).abs().max() < 1e-6, k
    with torch.no_grad():
        assert (model(tokens) - pm(input_ids=tokens).logits).abs().max() < 1e-5
    q = model.layers[0].self_attn.q_proj  # projected at the last forward: on the ball of eps / sqrt(4 blocks)
    assert q.skew(q.oft_R.weight).norm(dim=(1, 2)).max() <= 0.5 / 2 + 1e-6


@pytest.mark.parametrize("spec", OFT)
def test_adapter_config_is_peft_s(hf_checkpoint, tmp_path, spec):
    """adapter_config.json has PEFT's keys and values (but the bookkeeping PEFT adds itself)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    save_both(ref, path, spec, tmp_path)
    versions = [json.loads((tmp_path / d / "adapter_config.json").read_text())["peft_version"] for d in ("peft", "ours")]
    assert versions == ["0.21.2", "0.21.2"]
    theirs, ours = adapter_configs(tmp_path)
    assert ours == theirs


def test_module_dropout_is_recorded_and_inert_as_in_peft(hf_checkpoint, tmp_path):
    path, ref = hf_checkpoint("llama_gqa_llama3")
    with pytest.warns(UserWarning, match=r"^peft.module_dropout=0.5: recorded, but HF PEFT 0.21.2's OFT Linear"):
        model = apply(load_model(path), PeftConfig(method="oft", oft_block_size=8, module_dropout=0.5))
    randomize_([(n, p) for n, p in model.named_parameters() if p.requires_grad], seed=6)
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        train = model.train()(tokens)
        assert torch.equal(train, model.eval()(tokens))
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["module_dropout"] == 0.5
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path, is_trainable=True).train()  # PEFT: also inert
    with torch.no_grad():
        assert (pm(input_ids=tokens).logits - train).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="oft", r=4), "peft.r=4: expected 0 with peft.oft_block_size=32 (OFT is sized by one of them"),
    (dict(method="oft", oft_block_size=0, r=0), "peft.oft_block_size=0: expected a positive block size, or peft.r"),
    (dict(method="oft", oft_block_size=-8), "peft.oft_block_size=-8: expected a block size >= 0"),
    (dict(method="oft", r=-1, oft_block_size=0), "peft.r=-1: expected a number of blocks >= 0"),
    (dict(method="oft", eps=0.0), "peft.eps=0.0: expected a positive finite number"),
    (dict(method="oft", num_cayley_neumann_terms=0), "peft.num_cayley_neumann_terms=0: expected a positive integer"),
    (dict(method="oft", module_dropout=1.0), "peft.module_dropout=1.0: expected a probability in [0, 1)"),
    (dict(method="oft", dropout=0.1), "peft.dropout=0.1: expected it unset: it is an option of lora, dora, vera"),
    (dict(method="oft", alpha=8), "peft.alpha=8: expected it unset"),
    (dict(method="lora", coft=True), "peft.coft=True: expected it unset: it is an option of oft, not of lora"),
    (dict(method="lokr", oft_block_size=16), "peft.oft_block_size=16: expected it unset: it is an option of oft"),
    (dict(method="loha", use_cayley_neumann=False), "peft.use_cayley_neumann=False: expected it unset"),
])  # fmt: skip
def test_bad_options_fail_naming_the_key(kwargs, message):
    with pytest.raises(FtcoreError) as e:
        PeftConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"init_weights": False}, "init_weights=False is not supported by ftcore (expected true)"),
    ({"bias": "oft_only"}, "bias='oft_only' is not supported by ftcore (expected 'none')"),
    ({"oft_block_size": None}, "no oft_block_size: an OFT adapter from before PEFT 0.14"),
    ({"layers_to_transform": [0]}, "layers_to_transform=[0] is not supported by ftcore"),
    ({"coft": "yes"}, "coft='yes': expected bool"),
    ({"r": 4}, "peft.r=4: expected 0 with peft.oft_block_size=8"),
])  # fmt: skip
def test_unsupported_peft_values_fail_naming_the_file_and_key(tmp_path, change, message):
    where = tmp_path / "adapter_config.json"
    d = {"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj"], **change}
    if d["oft_block_size"] is None:
        del d["oft_block_size"]
    with pytest.raises(FtcoreError) as e:
        config_from_peft(d, where)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_peft_defaults_when_keys_are_absent(tmp_path):
    cfg = config_from_peft({"peft_type": "OFT", "oft_block_size": 4, "target_modules": ["q_proj"]}, tmp_path / "a")
    assert (cfg.r, cfg.coft, cfg.eps, cfg.block_share, cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms) == (
        0, False, 6e-5, False, True, 5)


def test_budget_solving():
    # in (b - 1) / 2 per layer at block b dividing in: 6 layers of in 576 and down_proj's 1536, 30 blocks
    per_b = 30 * (6 * 576 + 1536) // 2
    settings = {"method": "oft", "r": 0, "oft_block_size": 32, "target_modules": ALL_LINEAR}
    assert count_trainable(SMOLLM2, settings) == 31 * per_b  # conf/peft/oft.yaml's 32: 2,321,280
    # 14 and 13 move to 12 in both 576 and 1536, 15 to 16: the largest block size within the budget is 14 (= 12)
    s = solve_budget(SMOLLM2, settings, 1_000_000, max_size=512)
    assert (s.knob, s.size, s.trainable, s.note, s.peft["r"]) == ("oft_block_size", 14, 11 * per_b, "", 0)
    assert count_trainable(SMOLLM2, {**settings, "oft_block_size": 15}) == 15 * per_b > 1_000_000
    # the count never falls as the block grows (whatever divisor each size moves to), and stops at one block
    counts = [count_trainable(SMOLLM2, {**settings, "oft_block_size": b}) for b in range(1, 80)]
    assert counts == sorted(counts) and counts[0] == 0
    s = solve_budget(SMOLLM2, settings, 10**9, max_size=4096)
    assert s.size == 1536 and s.note.startswith("capped at oft_block_size=1536: one block per layer")
    assert s.trainable == 30 * (6 * 576 * 575 + 1536 * 1535) // 2
    # block_share: b (b - 1) / 2 per layer
    shared = solve_budget(SMOLLM2, {**settings, "block_share": True}, 30 * 7 * 28, max_size=512)
    assert (shared.size, shared.trainable) == (8, 30 * 7 * 28)


@pytest.mark.parametrize("settings", [{"method": "oft", "oft_block_size": 8},
                                      {"method": "oft", "r": 3, "oft_block_size": 0, "block_share": True}])
def test_meta_count_equals_a_real_model(settings):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply(model, PeftConfig(**settings))
    assert count_trainable(cfg, settings) == count_parameters(model)[0] > 0
