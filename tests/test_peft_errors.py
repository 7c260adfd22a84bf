"""Bad input fails with one clear FtcoreError line naming the key, module or tensor and what was expected."""

import dataclasses
import json

import pytest
import torch

from ftcore.errors import FtcoreError
from ftcore.model import ModelConfig, Transformer
from ftcore.peft import PeftConfig, adapter_layers, apply, load_adapter, merge, merge_and_unload, save_adapter
from ftcore.schema import build

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4)


def model(num_kv_heads=2, **kw):
    m = Transformer(ModelConfig(num_kv_heads=num_kv_heads, **{**SMALL, **kw}))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    return m


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(FtcoreError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_method_lists_the_supported_ones():
    msg = error(PeftConfig, method="fourierft")
    assert "peft.method" in msg and "'fourierft'" in msg
    assert "none, full, lora, dora, ia3, prefix, prompt" in msg


@pytest.mark.parametrize("kwargs,key", [
    (dict(r=0), "peft.r"), (dict(alpha=-1), "peft.alpha"), (dict(dropout=1.5), "peft.dropout"),
    (dict(init="xavier"), "peft.init"), (dict(prompt_init="words"), "peft.prompt_init"),
    (dict(method="prompt", prompt_init="text", tokenizer_path="x"), "peft.init_text"),
    (dict(num_virtual_tokens=0), "peft.num_virtual_tokens"), (dict(target_modules=[]), "peft.target_modules"),
    (dict(feedforward_modules=["up_proj"]), "peft.feedforward_modules"),
    (dict(method="oft", r=4), "peft.r"), (dict(method="oft", oft_block_size=0, r=0), "peft.oft_block_size"),
    (dict(method="oft", eps=-1.0), "peft.eps"), (dict(method="oft", num_cayley_neumann_terms=0), "peft.num_cayley_neumann_terms"),
])  # fmt: skip
def test_bad_values_name_the_key(kwargs, key):
    assert error(PeftConfig, **kwargs).startswith(key + "=")


def test_unknown_config_key_lists_known_keys():
    msg = error(build, PeftConfig, {"method": "lora", "rank": 8}, "peft.")
    assert "peft.rank" in msg and "target_modules" in msg


@pytest.mark.parametrize("values,message", [
    ({"r": "8"}, "peft.r='8': expected int"), ({"dropout": "x"}, "peft.dropout='x': expected float"),
    ({"target_modules": 3}, "peft.target_modules=3: expected list or str"),
    ({"target_modules": ["q_proj", 3]}, "peft.target_modules[1]=3: expected str"),
    ({"freeze": "embed_tokens.*"}, "peft.freeze='embed_tokens.*': expected list"),
])  # fmt: skip
def test_wrong_types_name_the_key(values, message):
    assert error(build, PeftConfig, values, "peft.") == message


def test_unknown_target_module_lists_the_linear_modules():
    msg = error(apply, model(), PeftConfig(target_modules=["q_proj", "qkv_proj"]))
    assert msg.startswith("peft.target_modules: 'qkv_proj' matches no linear or embedding module of this model; ")
    assert "embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in msg
    msg = error(apply, model(), PeftConfig(method="ia3", ia3_target_modules=r".*attn_c"))
    assert "peft.ia3_target_modules" in msg and "down_proj" in msg
    assert "invalid regex" in error(apply, model(), PeftConfig(target_modules="(q_proj"))


@pytest.mark.parametrize("method,init", [("dora", "kaiming-uniform"), ("lora", "pissa"), ("lora", "olora")])
def test_embedding_takes_plain_lora_only(method, init):
    msg = error(apply, model(), PeftConfig(method=method, init=init, target_modules=["embed_tokens", "q_proj"]))
    what = "peft.method=dora" if method == "dora" else f"peft.init={init!r}"
    assert msg.startswith(f"{what}: embed_tokens is an embedding; it applies to linear layers only")


def test_text_init_needs_a_tokenizer():
    cfg = PeftConfig(method="prompt", prompt_init="text", init_text="hi")
    assert error(apply, model(), cfg).startswith("peft.tokenizer_path:")


def test_bad_freeze_pattern():
    msg = error(apply, model(), PeftConfig(method="full", freeze=["embeddings.*"]))
    assert "'embeddings.*'" in msg and "embed_tokens" in msg


def test_adapter_for_another_base_names_the_tensor_and_shapes(tmp_path):
    src = apply(model(num_kv_heads=2), PeftConfig(r=8, target_modules=["v_proj"]))
    save_adapter(src, tmp_path)
    dst = model(num_kv_heads=4)
    msg = error(load_adapter, dst, tmp_path)
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" in msg
    assert "[32, 8]" in msg and "[64, 8]" in msg
    assert not adapter_layers(dst) and dst.peft_config is None  # the failed load left the model as it was


def test_prefix_for_another_base(tmp_path):
    save_adapter(apply(model(num_kv_heads=2), PeftConfig(method="prefix", num_virtual_tokens=2)), tmp_path)
    msg = error(load_adapter, model(num_kv_heads=1), tmp_path)
    assert "token_dim=32" in msg and "16" in msg


def test_unsupported_peft_features_and_types(tmp_path):
    save_adapter(apply(model(), PeftConfig()), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 16}}))
    assert "rank_pattern" in error(load_adapter, model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "FOURIERFT"}))
    msg = error(load_adapter, model(), tmp_path)
    assert "'FOURIERFT'" in msg and "LORA, IA3, PREFIX_TUNING, PROMPT_TUNING" in msg
    (tmp_path / "adapter_config.json").unlink()
    assert "adapter_config.json" in error(load_adapter, model(), tmp_path)


def test_misuse():
    full = apply(model(), PeftConfig(method="full"))
    assert "full fine-tuning" in error(save_adapter, full, "/tmp/unused")
    assert "prefix tuning" in error(merge, apply(model(), PeftConfig(method="prefix")))
    assert error(merge, apply(model(), PeftConfig(method="ptuning"))).startswith("peft: p-tuning adds virtual tokens")
    assert "p-tuning adds virtual tokens" in error(merge_and_unload, apply(model(), PeftConfig(method="ptuning")))
    assert "already has" in error(apply, apply(model(), PeftConfig()), PeftConfig())


def test_config_from_hydra_style_mapping():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"method": "dora", "r": 4, "target_modules": ["q_proj", "k_proj"]})
    cfg = build(PeftConfig, node, "peft.")
    assert cfg.method == "dora" and cfg.target_modules == ["q_proj", "k_proj"]
    assert build(PeftConfig, dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("method", ["vera", "hira", "hra", "adalora", "lily"])
def test_new_methods_name_the_key_of_a_bad_setting(method):
    size = "peft.init_r" if method == "adalora" else "peft.r"
    assert size in error(PeftConfig, method=method, **{size.removeprefix("peft."): 0})
    msg = error(apply, model(), PeftConfig(method=method, target_modules=["q_proj", "qkv_proj"]))
    assert msg.startswith("peft.target_modules: 'qkv_proj' matches no linear module of this model")
    msg = error(PeftConfig, method=method, use_rslora=True)
    assert msg == f"peft.use_rslora=True: expected it unset: it is an option of lora, dora, not of {method}"
    if method not in ("adalora", "lily"):
        assert "peft.init" in error(PeftConfig, method=method, init="xavier")


def test_lily_settings_and_files(tmp_path):
    assert error(PeftConfig, method="lily", stride_A=0).startswith("peft.stride_A=0: expected a positive integer")
    assert error(PeftConfig, method="lily", num_B=1).startswith("peft.num_B=1: expected an integer >= 2")
    assert error(PeftConfig, method="lora", num_B=4).startswith("peft.num_B=4: expected it unset: it is an option of lily")
    # a layer matched by two entries: PEFT's grouping would depend on a set's order
    msg = error(apply, model(), PeftConfig(method="lily", target_modules=["q_proj", "self_attn.q_proj"]))
    assert msg.startswith("peft.target_modules: model.layers.0.self_attn.q_proj ends with 2 entries (q_proj, self_attn")
    lily = apply(model(), PeftConfig(method="lily", r=2, stride_A=2, target_modules=["v_proj"]))
    assert "cannot be merged" in error(merge, lily)
    save_adapter(lily, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lily_A.weight"  # layer 0's A, saved under layer 1 too
    save_file({**tensors, key: tensors[key] + 1}, tmp_path / "adapter_model.safetensors")
    msg = error(load_adapter, model(), tmp_path)
    assert key in msg and "layers.0.self_attn.v_proj.lily_A.weight" in msg and "one shared tensor" in msg


def test_ptuning_settings_and_files(tmp_path):
    msg = error(PeftConfig, method="ptuning", encoder_reparameterization_type="GRU")
    assert msg.startswith("peft.encoder_reparameterization_type='GRU': expected one of MLP, LSTM")
    assert error(PeftConfig, method="ptuning", encoder_hidden_size=-1).startswith("peft.encoder_hidden_size=-1")
    lstm = dict(method="ptuning", encoder_reparameterization_type="LSTM")
    assert error(PeftConfig, **lstm, encoder_num_layers=0).startswith("peft.encoder_num_layers=0")
    assert error(PeftConfig, **lstm, encoder_dropout=1.0).startswith("peft.encoder_dropout=1.0")
    msg = error(PeftConfig, method="ptuning", encoder_num_layers=3)  # the MLP's layers are fixed (PEFT ignores it)
    assert msg.startswith("peft.encoder_num_layers=3: expected 2: it is an option of the LSTM encoder")
    assert error(PeftConfig, method="prompt", encoder_hidden_size=8).startswith("peft.encoder_hidden_size=8: expected "
                                                                                 "it unset: it is an option of ptuning")
    save_adapter(apply(model(), PeftConfig(method="ptuning", num_virtual_tokens=2, encoder_hidden_size=8)), tmp_path)
    msg = error(load_adapter, model(hidden_size=32), tmp_path)
    assert "token_dim=64" in msg and "32" in msg
