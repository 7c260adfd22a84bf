"""LoHa and LoKr against HF PEFT beyond the logits (test_peft_parity.py): the init draws, the training-mode rank
and module dropouts, the saved adapter_config.json, LoKr's factorization and shapes; their config errors and
their budget knob."""

import copy
import dataclasses

import pytest
import torch
from peft_refs import SMOLLM2, SPECS, adapter_configs, our_config, peft_config, randomize_, save_both

from ftcore.compare import count_trainable, solve_budget
from ftcore.config import run_config
from ftcore.errors import FtcoreError
from ftcore.formats.hf import load_model
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, adapter_state, apply, count_parameters, load_adapter
from ftcore.peft.io import config_from_peft
from ftcore.peft.loha import HadaWeight
from ftcore.peft.lokr import factorization, lokr_shapes

peft = pytest.importorskip("peft")

LYCORIS = [s for s in SPECS if s.startswith(("loha", "lokr"))]


@pytest.mark.parametrize("spec", LYCORIS)
def test_init_draws_equal_peft(hf_checkpoint, spec):
    """Our seeded generator replays PEFT's global-RNG draws exactly: same tensors, same order, same zeros."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(ref), peft_config(spec))
    expected = {n.removesuffix(".default"): p for n, p in pm.named_parameters() if p.requires_grad}
    model = apply(load_model(path), dataclasses.replace(our_config(spec), seed=11))
    ours = adapter_state(model)
    assert ours.keys() == expected.keys()
    for name, t in ours.items():
        assert torch.equal(t, expected[name]), name
    assert any(t.abs().sum() > 0 for t in ours.values()) and any(t.abs().sum() == 0 for t in ours.values())


DROPOUTS = {
    "loha": peft.LoHaConfig(r=4, alpha=8, rank_dropout=0.5, module_dropout=0.3, target_modules=["q_proj", "down_proj"]),
    "lokr": peft.LoKrConfig(r=4, alpha=8, rank_dropout=0.5, module_dropout=0.3, target_modules=["q_proj", "down_proj"]),
    "lokr_scaled": peft.LoKrConfig(r=2, alpha=4, rank_dropout=0.4, module_dropout=0.2, rank_dropout_scale=True,
                                   decompose_both=True, target_modules=["q_proj", "down_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DROPOUTS))
def test_training_mode_dropouts_replay_peft(hf_checkpoint, tmp_path, name):
    """Under the same seed a training-mode layer draws PEFT's module-dropout u, then its rank-dropout row mask."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    pm = peft.get_peft_model(copy.deepcopy(ref), DROPOUTS[name])
    randomize_([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=1)
    pm.save_pretrained(tmp_path)
    model = load_adapter(load_model(path), tmp_path)
    for ours, theirs, width in [(model.layers[1].self_attn.q_proj, pm.base_model.model.model.layers[1].self_attn.q_proj,
                                 64), (model.layers[0].mlp.down_proj, pm.base_model.model.model.layers[0].mlp.down_proj,
                                       96)]:  # fmt: skip
        ours.train(), theirs.train()
        x = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            base = torch.nn.functional.linear(x, ours.weight, ours.bias)
            skipped = 0
            for step in range(20):
                torch.manual_seed(100 + step)
                expected = theirs(x)
                torch.manual_seed(100 + step)
                got = ours(x)
                assert (got - expected).abs().max() < 1e-5, step
                skipped += bool((got - base).abs().max() == 0)
                ours.eval()
                assert (ours(x) - got).abs().max() > 1e-3  # the rank dropout changed the update
                ours.train()
            assert 0 < skipped < 20  # module dropout skipped some calls, not all


def test_no_dropout_draws_nothing_in_training_mode(hf_checkpoint):
    path, _ = hf_checkpoint("llama_gqa_llama3")
    for method in ("loha", "lokr"):
        model = apply(load_model(path), PeftConfig(method=method, r=4, alpha=8)).train()
        torch.manual_seed(0)
        state = torch.get_rng_state()
        model(torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0)))
        assert torch.equal(torch.get_rng_state(), state), method


def test_hada_weight_gradients_equal_autograd():
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=g, requires_grad=True) for shape in [(6, 3), (3, 5), (6, 3), (3, 5)]]
    upstream = torch.randn(6, 5, generator=g)
    (HadaWeight.apply(*factors, 1.5) * upstream).sum().backward()
    ours = [f.grad.clone() for f in factors]
    for f in factors:
        f.grad = None
    w1a, w1b, w2a, w2b = factors
    (((w1a @ w1b) * (w2a @ w2b)) * 1.5 * upstream).sum().backward()
    for a, f in zip(ours, factors):
        assert (a - f.grad).abs().max() < 1e-5 and f.grad.abs().max() > 0.1


@pytest.mark.parametrize("spec", LYCORIS)
def test_adapter_config_is_peft_s(hf_checkpoint, tmp_path, spec):
    """adapter_config.json has PEFT's keys and values (but the bookkeeping PEFT adds itself)."""
    path, ref = hf_checkpoint("llama_gqa_llama3")
    save_both(ref, path, spec, tmp_path)
    theirs, ours = adapter_configs(tmp_path)
    assert ours == theirs


@pytest.mark.parametrize("dim, factor, expected", [
    (64, -1, (8, 8)), (32, -1, (4, 8)), (128, -1, (8, 16)), (4096, -1, (64, 64)), (11008, -1, (86, 128)),
    (14336, -1, (112, 128)), (7, -1, (1, 7)), (64, 4, (4, 16)), (32, 16, (16, 2)), (128, 16, (16, 8)),
    (4096, 8, (8, 512)), (64, 64, (64, 1)), (64, 1, (1, 64)), (64, 16, (16, 4)), (96, 10, (8, 12)), (96, 5, (4, 24)),
    (64, 100, (8, 8)), (12, 5, (3, 4)), (576, -1, (24, 24)), (1536, -1, (32, 48)),
])  # fmt: skip
def test_factorization_is_peft_s(dim, factor, expected):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dim, factor) == peft_factorization(dim, factor) == expected


def test_lokr_shapes():
    # the spec's table (r = 4): q 64 -> 64, v 64 -> 32, down 128 -> 64
    assert lokr_shapes(64, 64, 4, False, -1) == {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}  # r < 8 / 2 is false: full
    assert lokr_shapes(32, 64, 4, False, -1) == {"lokr_w1": (4, 8), "lokr_w2": (8, 8)}
    assert lokr_shapes(64, 128, 4, False, -1) == {"lokr_w1": (8, 8), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 16)}
    assert lokr_shapes(64, 64, 4, True, 16) == {"lokr_w1_a": (16, 4), "lokr_w1_b": (4, 16), "lokr_w2": (4, 4)}
    assert lokr_shapes(32, 64, 4, True, 16) == {"lokr_w1_a": (16, 4), "lokr_w1_b": (4, 16), "lokr_w2": (2, 4)}
    assert lokr_shapes(64, 128, 4, True, 4) == {"lokr_w1": (4, 4), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 32)}


def test_lokr_scale_applies_with_full_factors(hf_checkpoint):
    """PEFT's rule: alpha / r even when both factors are full (r plays no part in the shapes there)."""
    path, _ = hf_checkpoint("llama_gqa_llama3")
    model = apply(load_model(path), PeftConfig(method="lokr", r=4, alpha=8, target_modules=["q_proj"]))
    q = model.layers[0].self_attn.q_proj
    assert q.lokr_w1.shape == q.lokr_w2.shape == (8, 8)
    randomize_([(n, p) for n, p in q.named_parameters() if p.requires_grad], seed=3)
    assert torch.equal(q.delta_weight(), 2.0 * torch.kron(q.lokr_w1, q.lokr_w2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="lora", decompose_both=True), "peft.decompose_both=True: expected it unset: it is an option of lokr, "
                                               "not of lora"),
    (dict(method="loha", decompose_factor=4), "peft.decompose_factor=4: expected it unset: it is an option of lokr"),
    (dict(method="hira", rank_dropout=0.1), "peft.rank_dropout=0.1: expected it unset: it is an option of loha, lokr"),
    (dict(method="lora", module_dropout=0.1), "peft.module_dropout=0.1: expected it unset"),
    (dict(method="vera", rank_dropout_scale=True), "peft.rank_dropout_scale=True: expected it unset"),
    (dict(method="loha", dropout=0.1), "peft.dropout=0.1: expected it unset: it is an option of lora, dora, vera, "
                                       "hira, adalora, not of loha"),
    (dict(method="ia3", alpha=8), "peft.alpha=8: expected it unset: it is an option of lora, dora, loha, lokr"),
    (dict(method="loha", r=0), "peft.r=0: expected a positive integer"),
    (dict(method="lokr", r=-2), "peft.r=-2: expected a positive integer"),
    (dict(method="lokr", alpha=0), "peft.alpha=0: expected a positive number"),
    (dict(method="lokr", decompose_factor=0), "peft.decompose_factor=0: expected a positive integer, or -1"),
    (dict(method="lokr", decompose_factor=-2), "peft.decompose_factor=-2: expected a positive integer, or -1"),
    (dict(method="loha", rank_dropout=1.0), "peft.rank_dropout=1.0: expected a probability in [0, 1)"),
    (dict(method="lokr", module_dropout=-0.1), "peft.module_dropout=-0.1: expected a probability in [0, 1)"),
    (dict(method="loha", init="lycoris"), "peft.init='lycoris': expected one of kaiming-uniform"),
    (dict(method="lokr", init="gaussian"), "peft.init='gaussian': expected one of kaiming-uniform, lycoris"),
])  # fmt: skip
def test_bad_options_fail_naming_the_key(kwargs, message):
    with pytest.raises(FtcoreError) as e:
        PeftConfig(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"init_weights": False}, "init_weights=False is not supported by ftcore (expected true or 'lycoris')"),
    ({"peft_type": "LOHA", "init_weights": "lycoris"}, "init_weights='lycoris' is not supported by ftcore "
                                                       "(expected true)"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8} is not supported by ftcore"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern={'q_proj': 2} is not supported by ftcore"),
    ({"decompose_factor": 0}, "decompose_factor=0 is not supported by ftcore (expected -1 or a positive integer)"),
    ({"decompose_both": "yes"}, "decompose_both='yes': expected bool"),
])  # fmt: skip
def test_unsupported_peft_values_fail_naming_the_file_and_key(tmp_path, change, message):
    where = tmp_path / "adapter_config.json"
    d = {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": ["q_proj"], "use_effective_conv2d": True, **change}
    with pytest.raises(FtcoreError) as e:
        config_from_peft(d, where)
    assert str(e.value).startswith(f"{where}: {message}") and "\n" not in str(e.value)


def test_peft_defaults_when_keys_are_absent(tmp_path):
    d = {"peft_type": "LOKR", "r": 4, "target_modules": ["q_proj"]}
    cfg = config_from_peft(d, tmp_path / "adapter_config.json")
    assert (cfg.alpha, cfg.decompose_both, cfg.decompose_factor, cfg.rank_dropout_scale, cfg.init) == (
        8, False, -1, False, "kaiming-uniform")


def test_cuda_graph_refuses_host_side_dropouts():
    with pytest.raises(FtcoreError, match=r"^train.cuda_graph: peft.rank_dropout and peft.module_dropout draw"):
        run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True},
                    "peft": {"method": "loha", "module_dropout": 0.1}})  # fmt: skip
    run_config({"data": {"static_shape": True}, "train": {"cuda_graph": True}, "peft": {"method": "lokr"}})


def test_budget_solving():
    # LoHa: 2 r (in + out) per layer, like LoRA at rank 2r; SmolLM2's conf/peft/loha.yaml (r = 8): 4,884,480
    per_rank = 30 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
    s = solve_budget(SMOLLM2, {"method": "loha", "r": 8, "alpha": 8}, 5_000_000, max_size=512)
    assert (s.knob, s.size, s.trainable, s.note) == ("r", 8, 2 * 8 * per_rank, "")
    # LoKr: 576 = 24 x 24, 192 = 12 x 16, 1536 = 32 x 48; W1 [a, c] x W2 [b, d], all full from r = 48 / 2
    full = 30 * (2 * (24 * 24 + 24 * 24) + 2 * (12 * 24 + 16 * 24) + 2 * (32 * 24 + 48 * 24) + (24 * 32 + 24 * 48))
    assert count_trainable(SMOLLM2, {"method": "lokr", "r": 8, "alpha": 8}) == 215_040
    s = solve_budget(SMOLLM2, {"method": "lokr", "r": 8, "alpha": 8}, 1_000_000, max_size=512)
    assert (s.size, s.trainable) == (24, full) and s.note.startswith("capped at r=24: every LoKr factor is a full")
    assert count_trainable(SMOLLM2, {"method": "lokr", "r": 400, "alpha": 8}) == full
    # below it the count is not affine: from r = 12 only gate/up/down's W2 (48 x 24) is low-rank, 72 r instead of
    # 1152 (more for r > 16): the largest r within the budget
    s = solve_budget(SMOLLM2, {"method": "lokr", "r": 8, "alpha": 8}, 300_000, max_size=512)
    assert (s.size, s.trainable, s.note) == (18, full + 30 * 3 * (18 * 72 - 48 * 24), "")
    assert count_trainable(SMOLLM2, {"method": "lokr", "r": 19, "alpha": 8}) > 300_000


@pytest.mark.parametrize("settings", [{"method": "loha", "r": 4}, {"method": "lokr", "r": 2, "decompose_both": True}])
def test_meta_count_equals_a_real_model(settings):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    apply(model, PeftConfig(**settings))
    assert count_trainable(cfg, settings) == count_parameters(model)[0] > 0
